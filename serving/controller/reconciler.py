"""The reconcile loop: make serving match the registry, idempotently.

Desired state is read from the registry on every pass (`desired.py`); actual state is
the running replicas and the gateway's routes. Nothing else is remembered between
passes that the registry and the running processes could not rebuild: a deployment's
outcome is written back to the model version as tags (`flowline.deployment.*`), which
is also what stops a failed version from being retried in a loop. A model's canary and
shadow versions (aliases ``canary`` / ``shadow``) are converged after its production
version by ``serving/controller/variants.py``, with the same start, smoke test, heal,
scale and drain steps; production's blue/green rollout does not depend on them.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import mlflow
import requests
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from common.registry import (
    ANALYSIS_ERROR_MODEL_TAG,
    ANALYSIS_MODEL_TAG,
    BATCHING_MODEL_TAG,
    CACHE_MODEL_TAG,
    CANARY_MODEL_TAG,
    GATE_REASON_TAG,
    RATE_LIMIT_MODEL_TAG,
    REASON_TAG,
    REPLICAS_MODEL_TAG,
    SHADOW_MODEL_TAG,
    STATUS_TAG,
    TIMEOUT_MODEL_TAG,
    gate_blocks,
    parse_canary_tag,
    parse_shadow_tag,
    production_version,
)
from serving.backends.base import Backend, BackendError, Replica
from serving.controller.analysis import AnalysisConfig, CanaryAnalyst
from serving.controller.desired import Wanted, desired_state
from serving.controller.gateway_client import GatewayClient, GatewayError
from serving.controller.variants import Variants
from serving.deployment import (
    CANARY,
    ROLES,
    SHADOW,
    BatchingSettings,
    CacheSettings,
    Deployment,
    Variant,
    parse_rate_limit,
    parse_timeout,
)
from serving.model_metadata import read_model_metadata

log = logging.getLogger("flowline.controller")

SMOKE_TIMEOUT_SECONDS = 30.0
MAX_REPLICAS = 32


class ModelSettings(NamedTuple):
    """A registered model's serving settings, read from its tags (see docs/serving.md)."""

    replicas: int
    batching: BatchingSettings
    timeout_s: float | None
    rate_limit: str | None
    cache: CacheSettings | None


class RolloutFailed(Exception):
    """A new version could not be made to serve; the reason goes on the version's tags."""


# What a rollout may fail with; anything else is a bug and propagates.
ROLLOUT_ERRORS = (RolloutFailed, GatewayError, MlflowException, OSError, ValueError)
PRODUCTION = "production"


def failure_reason(exc: BaseException) -> str:
    """The first line of a rollout failure, short enough for a tag."""
    return str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__


@dataclass
class Deployed:
    """A model version the controller has put behind the gateway, in one role."""

    model: str
    version: str
    replicas: list[Replica]
    deployment: Deployment
    since: float = field(default_factory=time.time)
    role: str = PRODUCTION  # or "canary" / "shadow"
    share: float = 0.0  # a canary's weight (percent) or a shadow's sample
    sticky: str | None = None

    def as_variant(self) -> Variant:
        """The canary or shadow as the gateway's admin API takes it."""
        return Variant(self.role, self.deployment, self.share, self.sticky)


def smoke_test(url: str, example: dict[str, Any] | None) -> None:
    """Score the version's own input example on one replica; raise RolloutFailed if it fails."""
    if example is None:
        return
    try:
        response = requests.post(f"{url}/invocations", json=example, timeout=SMOKE_TIMEOUT_SECONDS)
    except requests.RequestException as exc:
        raise RolloutFailed(f"smoke test could not reach {url}: {type(exc).__name__}") from None
    if response.status_code != 200:
        try:
            error = response.json()
        except ValueError:
            error = {"message": response.text}
        # The stock scorer hides the model's own exception in stack_trace; its last line
        # is the one a person needs to see on the version's tag.
        cause = (error.get("stack_trace") or "").strip().splitlines()[-1:] or [""]
        message = " ".join(p for p in (error.get("message", ""), cause[0]) if p)
        raise RolloutFailed(f"smoke test got HTTP {response.status_code}: {message[:400]}")
    predictions = response.json().get("predictions")
    rows = example.get("dataframe_split", {}).get("data") or example.get("dataframe_records")
    if predictions is None or (rows is not None and len(predictions) != len(rows)):
        raise RolloutFailed("smoke test answer does not hold one prediction per example row")


class Reconciler:
    """Converges replicas and gateway routes to the registry's production versions (and
    their canary and shadow versions, through ``self.variants``)."""

    def __init__(
        self,
        client: MlflowClient,
        backend: Backend,
        gateway: GatewayClient,
        replicas: int = 1,
        drain_timeout: float = 30.0,
        analyst: CanaryAnalyst | None = None,
    ) -> None:
        self.client = client
        self.analyst = analyst
        self.backend = backend
        self.gateway = gateway
        self.default_replicas = replicas
        self.drain_timeout = drain_timeout
        self.deployed: dict[str, Deployed] = {}
        self.last_error: dict[str, str] = {}
        self.last_pass: float | None = None
        # Start of the pass now running, once it has read the registry: a long rollout
        # is work in progress, not a failure (see ``fresh_since``).
        self.working_since: float | None = None
        self._retry: set[tuple[str, str]] = set()
        self.variants = Variants(self)
        # Held for a whole pass; the HTTP handlers never take it, so /status and
        # webhooks answer at once even while replicas are starting.
        self._lock = threading.RLock()
        self._retry_lock = threading.Lock()

    # -- triggers -------------------------------------------------------------------

    def retry(self, model: str, version: str) -> None:
        """Allow one more rollout of a version marked failed (a fresh promotion asked)."""
        with self._retry_lock:
            self._retry.add((model, str(version)))

    def adopt(self, replicas: list[Replica]) -> None:
        """Seed state with replicas a previous controller left running."""
        groups: dict[tuple[str, str], list[Replica]] = {}
        for replica in replicas:
            groups.setdefault((replica.model, replica.version), []).append(replica)
        for (model, version), members in groups.items():
            role = self._adopted_role(model, version)
            if role is not None:
                # A canary or shadow left running: the next pass keeps or retires it.
                meta = self._metadata(model, version)
                deployment = self._deployment(model, version, members, meta)
                found = Deployed(model, version, members, deployment, role=role[0])
                found.share, found.sticky = role[1], role[2]
                self.variants.deployed[(model, role[0])] = found
                log.info(
                    "adopted %d replica(s) of the %s %s/%s", len(members), role[0], model, version
                )
                continue
            if model in self.deployed:
                for replica in members:
                    self.backend.stop_replica(replica)
                continue
            meta = self._metadata(model, version)
            deployment = self._deployment(model, version, members, meta)
            self.deployed[model] = Deployed(model, version, members, deployment)
            log.info("adopted %d running replica(s) of %s/%s", len(members), model, version)

    def _adopted_role(self, model: str, version: str) -> tuple[str, float, str | None] | None:
        """(role, share, sticky) when the registry names ``version`` the model's canary or
        shadow (and not its production version); None otherwise."""
        try:
            registered = self.client.get_registered_model(model)
        except MlflowException:
            return None
        aliases = {k: str(v) for k, v in (registered.aliases or {}).items()}
        if production_version(registered) == version:
            return None
        tags = registered.tags or {}
        try:
            if aliases.get(CANARY) == version:
                config = parse_canary_tag(tags.get(CANARY_MODEL_TAG))
                return CANARY, config.weight, config.sticky
            if aliases.get(SHADOW) == version:
                return SHADOW, parse_shadow_tag(tags.get(SHADOW_MODEL_TAG)), None
        except ValueError:
            # Refused: adopted with no share, so the next pass removes it properly.
            return (CANARY if aliases.get(CANARY) == version else SHADOW), 0.0, None
        return None

    def take_retry(self, model: str, version: str) -> bool:
        """Consume a retry asked for ``version`` (a fresh promotion); True if there was one."""
        with self._retry_lock:
            if (model, version) in self._retry:
                self._retry.discard((model, version))
                return True
        return False

    # -- the pass -------------------------------------------------------------------

    def reconcile(self) -> None:
        """One idempotent pass: deploy, heal, re-route and undeploy as the registry says."""
        with self._lock:
            try:
                self._pass()
            finally:
                self.working_since = None

    def _pass(self) -> None:
        started = time.time()
        wanted = desired_state(self.client)
        desired = {model: w.version for model, w in wanted.items()}
        self.working_since = started
        try:
            routes = self.gateway.routes()
        except GatewayError as exc:
            log.warning("%s; routes will be pushed when it answers", exc)
            routes = None
        for model, version in desired.items():
            current = self.deployed.get(model)
            if current is not None and current.version == version:
                self._upkeep(current, routes)
            elif self._may_roll_out(model, version):
                self._roll_out(model, version)
            elif current is not None:
                # The wanted version failed: the one still serving is looked after until
                # a fixed version is promoted, or a replica dying now would stay dead.
                self._upkeep(current, routes)
        for model in [m for m in self.deployed if m not in desired]:
            self._undeploy(model)
        # After production: a canary's share is of production's traffic, and a variant
        # needs production routed first.
        with_variants = {m for m, _ in self.variants.deployed}
        for model in sorted(set(wanted) | with_variants):
            self.variants.converge(model, wanted.get(model), routes)
        if self.analyst is not None:
            for model, want in wanted.items():
                self._analyze(model, want)
        self.last_pass = time.time()

    def _analyze(self, model: str, want: Wanted) -> None:
        """Judge the model's running canary and shadow (serving/controller/analysis.py)."""
        assert self.analyst is not None
        production = self.deployed.get(model)
        running = {
            role: d.version
            for role in ROLES
            if (d := self.variants.deployed.get((model, role))) is not None
            and d.version == want.variant_version(role)
        }
        if production is None or production.version != want.version or not running:
            return
        text = want.tags.get(ANALYSIS_MODEL_TAG)
        try:
            config = AnalysisConfig.from_tag(text)
        except ValueError as exc:
            self._model_tag(model, ANALYSIS_ERROR_MODEL_TAG, str(exc), want.tags)
            return
        self._model_tag(model, ANALYSIS_ERROR_MODEL_TAG, None, want.tags)
        try:
            self.analyst.analyze(
                model, config, production.version, running.get(CANARY), running.get(SHADOW)
            )
        except MlflowException as exc:  # the registry is away: the next pass tries again
            log.warning("canary analysis of %s: %s", model, str(exc).splitlines()[0][:300])

    def _model_tag(self, model: str, key: str, value: str | None, tags: dict[str, str]) -> None:
        """Set (or, with None, delete) a registered-model tag when it differs."""
        if tags.get(key) == value:
            return
        try:
            if value is None:
                self.client.delete_registered_model_tag(model, key)
            else:
                self.client.set_registered_model_tag(model, key, value[:500])
        except MlflowException as exc:
            log.warning("could not tag %s: %s", model, exc)

    def _upkeep(self, current: Deployed, routes: dict[str, Any] | None) -> None:
        """Keep a deployed version whole: replace dead replicas, match the replica count,
        and put its route back if the gateway lost it."""
        self._heal(current)
        self._scale(current)
        if routes is not None:
            self._sync_route(current, routes.get(current.model))

    def fresh_since(self) -> float | None:
        """When the controller last knew the registry's state: the end of the last
        successful pass, or the start of a running pass that has read the registry."""
        known = [t for t in (self.last_pass, self.working_since) if t is not None]
        return max(known) if known else None

    def _may_roll_out(self, model: str, version: str) -> bool:
        try:
            tags = self.client.get_model_version(model, version).tags
        except MlflowException:
            return False
        if gate_blocks(tags):
            # Before the retry below: promoting again does not get past the gate. Checked
            # on every pass, so flowline.gate.override=true (set by a person, in the
            # registry UI) lets the version through at the next one.
            reason = tags.get(GATE_REASON_TAG, "")
            message = f"version {version}: held back by the champion/challenger gate: {reason}"
            if self.last_error.get(model) != message:
                log.warning("%s/%s %s", model, version, message.split(": ", 1)[1])
            self.last_error[model] = message
            return False
        if self.take_retry(model, version):
            return True
        return tags.get(STATUS_TAG) != "failed"

    def _model_settings(self, model: str) -> ModelSettings:
        # Per-model settings live on the registered model as tags, editable in the UI.
        tags = self.client.get_registered_model(model).tags
        replicas = int(tags.get(REPLICAS_MODEL_TAG, self.default_replicas))
        batching = BatchingSettings.from_dict(json.loads(tags.get(BATCHING_MODEL_TAG, "null")))
        timeout = tags.get(TIMEOUT_MODEL_TAG)
        timeout_s = parse_timeout(timeout) if timeout else None
        rate = tags.get(RATE_LIMIT_MODEL_TAG)
        rate_limit = parse_rate_limit(rate) if rate else None
        cache_tag = tags.get(CACHE_MODEL_TAG)
        cache = CacheSettings.from_dict(json.loads(cache_tag)) if cache_tag else None
        # A typo in a tag must not start a thousand processes.
        count = max(1, min(MAX_REPLICAS, replicas))
        return ModelSettings(count, batching, timeout_s, rate_limit, cache)

    def _metadata(self, model: str, version: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            uri = f"models:/{model}/{version}"
            mlflow.artifacts.download_artifacts(artifact_uri=f"{uri}/MLmodel", dst_path=tmp)
            try:
                mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{uri}/serving_input_example.json", dst_path=tmp
                )
            except (MlflowException, OSError):
                pass  # a model without an example is smoke-tested by /ping alone
            return read_model_metadata(tmp)

    def _deployment(
        self, model: str, version: str, replicas: list[Replica], meta: dict[str, Any]
    ) -> Deployment:
        settings = self._model_settings(model)
        return Deployment(
            model=model,
            version=version,
            replicas=tuple(r.url for r in replicas),
            input_example=meta["input_example"],
            signature=meta["signature"],
            batching=settings.batching,
            timeout_s=settings.timeout_s,
            rate_limit=settings.rate_limit,
            cache=settings.cache,
        )

    def _start_replicas(self, model: str, version: str, count: int) -> list[Replica]:
        uri = f"models:/{model}/{version}"
        with ThreadPoolExecutor(max_workers=count) as pool:
            futures = [
                pool.submit(self.backend.start_replica, model, version, uri) for _ in range(count)
            ]
        started, errors = [], []
        for future in futures:
            try:
                started.append(future.result())
            except BackendError as exc:
                errors.append(str(exc))
        if errors:
            for replica in started:
                self.backend.stop_replica(replica)
            raise RolloutFailed(errors[0])
        return started

    def start_tested(self, model: str, version: str) -> tuple[list[Replica], dict[str, Any]]:
        """Start the model's replica count of ``version`` and smoke-test each; the replicas
        and the version's metadata. On failure none is left running (ROLLOUT_ERRORS)."""
        count = self._model_settings(model)[0]
        meta = self._metadata(model, version)
        new = self._start_replicas(model, version, count)
        try:
            for replica in new:
                smoke_test(replica.url, meta["input_example"])
        except RolloutFailed:
            for replica in new:
                self.backend.stop_replica(replica)
            raise
        return new, meta

    def _roll_out(self, model: str, version: str) -> None:
        """Blue/green: start and smoke-test the new replicas, switch, then drain the old."""
        log.info("deploying %s/%s", model, version)
        self._tag(model, version, "deploying", "")
        new: list[Replica] = []
        try:
            new, meta = self.start_tested(model, version)
            deployment = self._deployment(model, version, new, meta)
            self.gateway.put(deployment)
        except ROLLOUT_ERRORS as exc:
            for replica in new:
                self.backend.stop_replica(replica)
            reason = failure_reason(exc)
            log.error("deployment of %s/%s failed: %s", model, version, reason)
            self.last_error[model] = f"version {version}: {reason}"
            self._tag(model, version, "failed", reason)
            return
        old = self.deployed.get(model)
        self.deployed[model] = Deployed(model, version, new, deployment)
        self.last_error.pop(model, None)
        self._tag(model, version, "deployed", "")
        log.info("%s/%s serving on %s", model, version, ", ".join(r.url for r in new))
        if old is not None:
            self._retire(old, f"replaced by version {version}")

    def _retire(self, old: Deployed, reason: str) -> None:
        self._drain([r.url for r in old.replicas])
        for replica in old.replicas:
            self.backend.stop_replica(replica)
        self._tag(old.model, old.version, "undeployed", reason)

    def _heal(self, current: Deployed) -> None:
        """Replace replicas that died; the gateway routes around them meanwhile."""
        dead = [r for r in current.replicas if not self.backend.is_alive(r)]
        if not dead:
            return
        log.warning(
            "%d replica(s) of %s/%s died; restarting", len(dead), current.model, current.version
        )
        try:
            fresh = self._start_replicas(current.model, current.version, len(dead))
        except RolloutFailed as exc:
            self.last_error[current.model] = f"restart failed: {exc}"
            return
        for replica in dead:
            self.backend.stop_replica(replica)
        self._publish(current, [r for r in current.replicas if r not in dead] + fresh)

    def _publish(self, current: Deployed, replicas: list[Replica]) -> bool:
        """Route ``current`` to ``replicas``; False when the gateway did not take it."""
        current.replicas = replicas
        current.deployment = replace(current.deployment, replicas=tuple(r.url for r in replicas))
        try:
            if current.role == PRODUCTION:
                self.gateway.put(current.deployment)
            else:
                self.gateway.put_variant(current.as_variant())
        except GatewayError as exc:
            log.warning("could not update the gateway: %s", exc)
            return False
        return True

    def _scale(self, current: Deployed) -> None:
        """Converge a served version's replica count to its model's ``flowline.replicas``.

        Up: new replicas are smoke-tested before they join the route. Down: the route
        loses the extra replicas first, they drain, then stop; no request is cut.
        """
        try:
            wanted = self._model_settings(current.model)[0]
        except (MlflowException, ValueError) as exc:
            self.last_error[current.model] = f"replica count: {str(exc).splitlines()[0][:300]}"
            return
        have = list(current.replicas)
        if wanted == len(have):
            return
        model, version = current.model, current.version
        log.info("scaling %s/%s from %d to %d replica(s)", model, version, len(have), wanted)
        if wanted > len(have):
            fresh: list[Replica] = []
            try:
                fresh = self._start_replicas(current.model, current.version, wanted - len(have))
                for replica in fresh:
                    smoke_test(replica.url, current.deployment.input_example)
            except RolloutFailed as exc:
                for replica in fresh:
                    self.backend.stop_replica(replica)
                self.last_error[current.model] = f"scaling up failed: {exc}"
                return
            if self._publish(current, have + fresh):
                self._clear_scaling_error(current.model)
            return
        if not self._publish(current, have[:wanted]):
            current.replicas = have  # still routed to all of them: stop none
            return
        self._clear_scaling_error(current.model)
        extra = have[wanted:]
        self._drain([r.url for r in extra])
        for replica in extra:
            self.backend.stop_replica(replica)

    def _clear_scaling_error(self, model: str) -> None:
        # Only the scaling error: a failed newer version's reason must stay visible.
        if self.last_error.get(model, "").startswith(("scaling up failed", "replica count")):
            self.last_error.pop(model)

    def _drain(self, urls: list[str]) -> None:
        """Wait (bounded) until the gateway has no request in flight to ``urls``."""
        try:
            self.gateway.drain(urls, self.drain_timeout)
        except GatewayError as exc:
            log.warning("could not drain %s: %s", ", ".join(urls), exc)

    def _sync_route(self, current: Deployed, route: dict[str, Any] | None) -> None:
        # A restarted gateway has no routes: give it ours back.
        urls = {r.url for r in current.replicas}
        if (
            route is None
            or str(route.get("version")) != current.version
            or set(route.get("replicas", [])) != urls
        ):
            try:
                self.gateway.put(current.deployment)
            except GatewayError as exc:
                log.warning("could not restore the route of %s: %s", current.model, exc)

    def _undeploy(self, model: str) -> None:
        current = self.deployed.pop(model)
        log.info("undeploying %s/%s", model, current.version)
        try:
            self.gateway.delete(model)
        except GatewayError as exc:
            log.warning("could not remove the route of %s: %s", model, exc)
        self._retire(current, "no longer in production")

    def _tag(self, model: str, version: str, status: str, reason: str) -> None:
        try:
            # Reason first: whoever sees the new status must also see its reason.
            self.client.set_model_version_tag(model, version, REASON_TAG, reason)
            self.client.set_model_version_tag(model, version, STATUS_TAG, status)
        except MlflowException as exc:
            log.warning("could not tag %s/%s: %s", model, version, exc)

    # The variants' entry points into the shared machinery.
    publish = _publish
    heal = _heal
    scale = _scale
    drain = _drain
    deployment_of = _deployment

    def tag(self, model: str, version: str, status: str, reason: str) -> None:
        """Write a version's deployment status and reason (reason first)."""
        self._tag(model, version, status, reason)

    def forget(self) -> None:
        """Drop what this controller knows of its deployments, stopping nothing: another
        controller now leads (or is about to), and adopts the replicas as they run."""
        with self._lock:
            self.deployed.clear()
            self.variants.deployed.clear()

    def stop_all(self) -> None:
        """Stop every replica (clean shutdown); routes vanish with the gateway."""
        with self._lock:
            for current in [*self.deployed.values(), *self.variants.all()]:
                for replica in current.replicas:
                    self.backend.stop_replica(replica)
            self.deployed.clear()
            self.variants.deployed.clear()

    def status(self) -> dict[str, Any]:
        """The controller's view, for `GET /status` and `flowline status` (lock-free)."""
        deployed = [*self.deployed.values(), *self.variants.all()]
        errors = dict(self.last_error)
        errors.update({f"{m} ({role})": e for (m, role), e in dict(self.variants.errors).items()})
        return {
            "last_reconcile": self.last_pass,
            "deployments": [self._describe(d) for d in deployed],
            "errors": errors,
        }

    def _describe(self, d: Deployed) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "model": d.model,
            "version": d.version,
            "role": d.role,
            "since": d.since,
            "replicas": [
                {"url": r.url, "alive": self.backend.is_alive(r)} for r in list(d.replicas)
            ],
        }
        if d.role == CANARY:
            shown.update(weight=d.share, sticky=d.sticky)
        elif d.role == SHADOW:
            shown["sample"] = d.share
        return shown
