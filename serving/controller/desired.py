"""Desired state: which version of each registered model should serve, read from the registry.

The registry is the only source of truth. A version is wanted in production when it
carries the alias ``production``; failing that, the version in the legacy stage
``Production`` (stages fire no webhook, so the reconcile loop is what notices them).
"""

from __future__ import annotations

from mlflow import MlflowClient

from common.registry import production_version


def desired_versions(client: MlflowClient) -> dict[str, str]:
    """{registered model name: version to serve} for every model promoted to production."""
    wanted: dict[str, str] = {}
    token = None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        for model in page:
            version = production_version(model)
            if version is not None:
                wanted[model.name] = version
        token = page.token
        if not token:
            return wanted
