"""Canary and shadow versions beside production: desired from the registry, converged here.

A model in production may name a second version with the alias ``canary`` (its share of
traffic in the registered-model tag ``flowline.canary``, ``{"weight": 10}``) and a third
with the alias ``shadow`` (``flowline.shadow``, ``{"sample": 0.25}``, default 1.0). Each
pass, for each role, the wanted version is compared with the one running:

- wanted and running the same version: heal, scale, and push its route (and share) to
  the gateway when the gateway's differs;
- another version wanted: start replicas, smoke-test them (as production), put the new
  route (the gateway switches in one step), then drain and stop the old replicas;
- nothing wanted (alias or tag removed, production undeployed) or refused: the route is
  removed, the replicas drain and stop. Production is never touched by any of this.

Refusals (docs/serving.md, "Canary and shadow"): a tag that is not the JSON asked for, a
weight outside 0-100, a sample outside 0-1, a canary or shadow alias on the production
version, or a canary whose version the champion/challenger gate holds back (a shadow
answers nobody, so the gate does not apply to it). The reason is written on the
registered model (``flowline.canary.error`` / ``flowline.shadow.error``, removed once
fixed) and listed in ``GET /status`` under ``errors`` as ``"<model> (canary)"``.

Version tags: the same ``flowline.deployment.status`` / ``.reason`` as production, with
the values ``deploying``, ``canary`` or ``shadow`` (serving in that role), ``failed``
(not retried by the periodic pass; setting the alias again retries) and ``undeployed``.
Nothing is remembered that the registry, the replicas and the gateway cannot rebuild.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, NamedTuple

from mlflow.exceptions import MlflowException

from common.registry import (
    ANALYSIS_CHECK_TAG,
    ANALYSIS_REASON_TAG,
    ANALYSIS_VERDICT_TAG,
    CANARY_ERROR_MODEL_TAG,
    CANARY_MODEL_TAG,
    GATE_REASON_TAG,
    SHADOW_ERROR_MODEL_TAG,
    SHADOW_MODEL_TAG,
    STATUS_TAG,
    analysis_blocks,
    gate_blocks,
    parse_canary_tag,
    parse_shadow_tag,
)
from serving.controller.desired import Wanted
from serving.controller.gateway_client import GatewayError
from serving.deployment import CANARY, ROLES, SHADOW, Variant

if TYPE_CHECKING:
    from serving.backends.base import Replica
    from serving.controller.reconciler import Deployed, Reconciler

log = logging.getLogger("flowline.controller")

ERROR_TAGS = {CANARY: CANARY_ERROR_MODEL_TAG, SHADOW: SHADOW_ERROR_MODEL_TAG}


class Target(NamedTuple):
    """The variant the registry asks for: its version and share (and sticky header)."""

    version: str
    share: float
    sticky: str | None


def wanted_variant(
    client: Any, model: str, role: str, wanted: Wanted, serving: str | None
) -> tuple[Target | None, str | None]:
    """(the wanted canary or shadow, None) or (None, the reason it is refused).

    (None, None) when nothing is wanted: no alias, or no production version serving
    for it to stand beside.
    """
    version = wanted.variant_version(role)
    if version is None or serving is None:
        return None, None
    if version in (wanted.version, serving):
        return None, f"the {role} alias is on the production version {version}"
    try:
        if role == CANARY:
            config = parse_canary_tag(wanted.tags.get(CANARY_MODEL_TAG))
            share, sticky = config.weight, config.sticky
        else:
            share, sticky = parse_shadow_tag(wanted.tags.get(SHADOW_MODEL_TAG)), None
    except ValueError as exc:
        return None, str(exc)
    try:
        tags = client.get_model_version(model, version).tags
    except MlflowException as exc:
        return None, f"version {version}: {str(exc).splitlines()[0][:300]}"
    if role == CANARY and gate_blocks(tags):
        reason = tags.get(GATE_REASON_TAG, "")
        return None, f"version {version}: held back by the champion/challenger gate: {reason}"
    if analysis_blocks(tags):
        check, reason = tags.get(ANALYSIS_CHECK_TAG, ""), tags.get(ANALYSIS_REASON_TAG, "")
        return None, (
            f"version {version} was rolled back by the canary analysis ({check}: {reason}); "
            f"delete its tag {ANALYSIS_VERDICT_TAG} to allow it again"
        )
    return Target(version, share, sticky), None


class Variants:
    """The canary and shadow deployments of every model, kept by one `Reconciler`."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.r = reconciler
        self.deployed: dict[tuple[str, str], Deployed] = {}
        self.errors: dict[tuple[str, str], str] = {}

    def converge(self, model: str, wanted: Wanted | None, routes: dict[str, Any] | None) -> None:
        """One pass for one model: make its canary and shadow what the registry says."""
        serving = self.r.deployed.get(model)
        for role in ROLES:
            target, refused = None, None
            if wanted is not None:
                target, refused = wanted_variant(
                    self.r.client, model, role, wanted, serving.version if serving else None
                )
            current = self.deployed.get((model, role))
            if target is None:
                self._note(model, role, refused, wanted)
                if current is not None:
                    self.remove(current, refused or f"no longer the {role}")
                elif _gateway_variant(routes, model, role) is not None:
                    self._delete_route(model, role)  # left by a controller before this one
                continue
            if current is not None and current.version == target.version:
                self._note(model, role, None, wanted)
                self._upkeep(current, target, routes)
            elif self._may_roll_out(model, role, target.version):
                self._roll_out(model, role, target, current, wanted)
            elif current is not None:
                self._upkeep(current, None, routes)

    # -- the decisions ----------------------------------------------------------------------

    def _may_roll_out(self, model: str, role: str, version: str) -> bool:
        try:
            tags = self.r.client.get_model_version(model, version).tags
        except MlflowException:
            return False
        if self.r.take_retry(model, version):
            return True
        return tags.get(STATUS_TAG) != "failed"

    def _roll_out(
        self, model: str, role: str, target: Target, old: Deployed | None, wanted: Wanted | None
    ) -> None:
        """Start, smoke-test and route the new variant version, then retire the old one."""
        from serving.controller.reconciler import ROLLOUT_ERRORS, Deployed, failure_reason

        version = target.version
        log.info("deploying %s/%s as the %s", model, version, role)
        self.r.tag(model, version, "deploying", "")
        started: list[Replica] = []
        try:
            started, meta = self.r.start_tested(model, version)
            deployment = self.r.deployment_of(model, version, started, meta)
            fresh = Deployed(
                model, version, started, deployment, role=role, share=target.share,
                sticky=target.sticky,
            )  # fmt: skip
            self.r.gateway.put_variant(fresh.as_variant())
        except ROLLOUT_ERRORS as exc:
            for replica in started:
                self.r.backend.stop_replica(replica)
            reason = failure_reason(exc)
            log.error("%s %s/%s failed: %s", role, model, version, reason)
            self._note(model, role, f"version {version}: {reason}", wanted)
            self.r.tag(model, version, "failed", reason)
            return
        self.deployed[(model, role)] = fresh
        self._note(model, role, None, wanted)
        self.r.tag(model, version, role, "")
        log.info("%s/%s is the %s on %s", model, version, role, ", ".join(r.url for r in started))
        if old is not None:
            self._retire(old, f"replaced as the {role} by version {version}")

    def _upkeep(self, current: Deployed, target: Target | None, routes: Any) -> None:
        before = current.as_variant()
        if target is not None and (target.share, target.sticky) != (current.share, current.sticky):
            current.share, current.sticky = target.share, target.sticky
            self.r.publish(current, current.replicas)
        self.r.heal(current)
        self.r.scale(current)
        # `routes` was read at the start of the pass: compare only when this upkeep has
        # pushed nothing, or the old view would undo the new weight or replicas.
        if routes is not None and current.as_variant().same_as(before):
            found = _gateway_variant(routes, current.model, current.role)
            if not current.as_variant().same_as(found):
                self.r.publish(current, current.replicas)

    def remove(self, current: Deployed, reason: str) -> None:
        """Take the variant out of the gateway, drain and stop its replicas."""
        self.deployed.pop((current.model, current.role), None)
        log.info("removing the %s %s/%s: %s", current.role, current.model, current.version, reason)
        self._delete_route(current.model, current.role)
        self._retire(current, reason)

    def _retire(self, old: Deployed, reason: str) -> None:
        self.r.drain([r.url for r in old.replicas])
        for replica in old.replicas:
            self.r.backend.stop_replica(replica)
        serving = self.r.deployed.get(old.model)
        # A canary promoted to production carries production's tags now: leave them.
        if serving is None or serving.version != old.version:
            self.r.tag(old.model, old.version, "undeployed", reason)

    def _delete_route(self, model: str, role: str) -> None:
        try:
            self.r.gateway.delete_variant(model, role)
        except GatewayError as exc:
            log.warning("could not remove the %s of %s: %s", role, model, exc)

    def _note(self, model: str, role: str, reason: str | None, wanted: Wanted | None) -> None:
        """Show (or clear) why a variant is refused: in /status and on the registered model."""
        key = (model, role)
        if reason is None:
            self.errors.pop(key, None)
        else:
            if self.errors.get(key) != reason:
                log.warning("%s of %s refused: %s", role, model, reason)
            self.errors[key] = reason
        if wanted is None:
            return
        tag = ERROR_TAGS[role]
        try:
            if reason is not None and wanted.tags.get(tag) != reason:
                self.r.client.set_registered_model_tag(model, tag, reason)
            elif reason is None and tag in wanted.tags:
                self.r.client.delete_registered_model_tag(model, tag)
        except MlflowException as exc:
            log.warning("could not tag %s: %s", model, exc)

    def all(self) -> list[Deployed]:
        """Every canary and shadow deployment."""
        return list(self.deployed.values())


def _gateway_variant(routes: dict[str, Any] | None, model: str, role: str) -> Variant | None:
    # The gateway's view of the variant (GET /admin/deployments), parsed; None if absent.
    route = (routes or {}).get(model) or {}
    found = route.get(role)
    if not isinstance(found, dict):
        return None
    try:
        return Variant.from_dict(role, {k: v for k, v in found.items() if k != "admitted"}, model)
    except (ValueError, TypeError):
        return None
