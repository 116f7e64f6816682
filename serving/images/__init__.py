"""OCI images for model versions: the offline base image and per-version serving images."""
