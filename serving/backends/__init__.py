"""Serving backends: where a deployed model version's replicas run.

The controller only speaks the `Backend` protocol, so docker or kubernetes backends
can slot in beside the default local-process backend.
"""
