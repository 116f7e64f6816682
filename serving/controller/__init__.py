"""The deployment controller: converges serving to the MLflow registry's production versions."""
