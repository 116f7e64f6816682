"""Desired state: which versions of each registered model should serve, read from the registry.

The registry is the only source of truth. A version is wanted in production when it
carries the alias ``production``; failing that, the version in the legacy stage
``Production`` (stages fire no webhook, so the reconcile loop is what notices them).
Beside production, the aliases ``canary`` and ``shadow`` name the versions that get a
share of its traffic or a copy of it, set by the model's tags (docs/serving.md).
"""

from __future__ import annotations

from typing import NamedTuple

from mlflow import MlflowClient

from common.registry import CANARY_ALIAS, SHADOW_ALIAS, production_version


class Wanted(NamedTuple):
    """What the registry asks of one model in production."""

    version: str
    aliases: dict[str, str]  # alias -> version (canary and shadow among them)
    tags: dict[str, str]  # the registered model's tags

    def variant_version(self, role: str) -> str | None:
        """The version carrying the alias ``canary`` or ``shadow``, or None."""
        alias = {"canary": CANARY_ALIAS, "shadow": SHADOW_ALIAS}[role]
        found = self.aliases.get(alias)
        return None if found is None else str(found)


def desired_state(client: MlflowClient) -> dict[str, Wanted]:
    """{registered model name: what it wants} for every model promoted to production."""
    wanted: dict[str, Wanted] = {}
    token = None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        for model in page:
            version = production_version(model)
            if version is not None:
                aliases = {k: str(v) for k, v in (model.aliases or {}).items()}
                wanted[model.name] = Wanted(version, aliases, dict(model.tags or {}))
        token = page.token
        if not token:
            return wanted


def desired_versions(client: MlflowClient) -> dict[str, str]:
    """{registered model name: version to serve} for every model promoted to production."""
    return {name: wanted.version for name, wanted in desired_state(client).items()}
