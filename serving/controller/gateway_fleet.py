"""The controller's view of several gateways: publish each change, then push it to all.

``GatewayFleet`` has ``GatewayClient``'s methods, so the reconciler drives one gateway or
many the same way. Each change is first written to the published route table
(``serving/coordination.py``) — from which every gateway converges by itself — and then
pushed to each live gateway (their heartbeats say where), carrying its generation, so
the switch takes effect at once where a gateway answers. A push that fails is no
failure: that gateway polls the table within a second.

Draining old replicas waits until every live gateway has applied the switch (its
reported generation) *and* has nothing in flight to them, so no gateway is still
sending to a replica being stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from serving.controller.gateway_client import GatewayClient, GatewayError
from serving.coordination import GATEWAY, CoordinationStore
from serving.deployment import Deployment, RouteSnapshot, Variant

log = logging.getLogger("flowline.controller")


class GatewayFleet:
    """Publishes route changes and pushes them to every live gateway."""

    def __init__(
        self,
        store: CoordinationStore,
        client_for: Callable[[str], GatewayClient],
    ) -> None:
        self.store = store
        self.client_for = client_for
        self._clients: dict[str, GatewayClient] = {}
        self.generation = 0
        self._deployments: dict[str, Deployment] = {}  # in first-deployed order
        self._variants: dict[tuple[str, str], Variant] = {}

    # -- the published table -------------------------------------------------------------

    def load(self) -> None:
        """Start from the table the previous leader published (a new leader's first step)."""
        try:
            published = self.store.published()
        except SQLAlchemyError as exc:
            raise GatewayError(f"cannot read the published routes: {_first_line(exc)}") from None
        self._deployments, self._variants = {}, {}
        if published is None:
            return
        self.generation = published.generation
        for deployment in published.snapshot.deployments:
            self._deployments[deployment.model] = deployment
        for variant in published.snapshot.variants:
            self._variants[(variant.model, variant.role)] = variant

    def snapshot(self) -> RouteSnapshot:
        """The table as it is to be published."""
        deployments = tuple(self._deployments.values())
        default = deployments[0].model if deployments else None
        return RouteSnapshot(deployments, default, tuple(self._variants.values()))

    def _publish(self) -> int:
        try:
            self.generation = self.store.publish(self.snapshot())
        except SQLAlchemyError as exc:
            raise GatewayError(f"cannot publish the routes: {_first_line(exc)}") from None
        return self.generation

    # -- the GatewayClient interface -----------------------------------------------------

    def put(self, deployment: Deployment) -> None:
        """Make ``deployment`` its model's route everywhere (the blue/green switch)."""
        before = self._deployments.get(deployment.model)
        if before is None or replace(before, since=0) != replace(deployment, since=0):
            self._deployments[deployment.model] = deployment
            self._publish()
        self._push(lambda c, g: c.put(deployment, generation=g))

    def delete(self, model: str) -> None:
        """Stop routing ``model`` (and its canary and shadow) everywhere."""
        changed = self._deployments.pop(model, None) is not None
        for key in [k for k in self._variants if k[0] == model]:
            del self._variants[key]
            changed = True
        if changed:
            self._publish()
        self._push(lambda c, g: c.delete(model, generation=g))

    def put_variant(self, variant: Variant) -> None:
        """Make ``variant`` its model's canary or shadow everywhere."""
        key = (variant.model, variant.role)
        if not variant.same_as(self._variants.get(key)):
            self._variants[key] = variant
            self._publish()
        self._push(lambda c, g: c.put_variant(variant, generation=g))

    def delete_variant(self, model: str, role: str) -> None:
        """Remove the model's canary or shadow everywhere."""
        if self._variants.pop((model, role), None) is not None:
            self._publish()
        self._push(lambda c, g: c.delete_variant(model, role, generation=g))

    def routes(self) -> dict[str, dict[str, Any]]:
        """{model: route} where every live gateway routes it alike; a model some gateway
        routes otherwise is left out, so the reconciler puts it again (idempotently)."""
        views = []
        for url, client in self._live():
            try:
                views.append(client.routes())
            except GatewayError as exc:
                log.warning("gateway %s: %s", url, exc)
        if not views:
            return {}
        agreed = {}
        for model, route in views[0].items():
            if all(_same_route(route, other.get(model)) for other in views[1:]):
                agreed[model] = route
        return agreed

    def metrics_texts(self) -> list[str]:
        """Every live gateway's Prometheus text: the canary analysis sums them."""
        texts = []
        for url, client in self._live():
            try:
                texts.extend(client.metrics_texts())
            except GatewayError as exc:
                log.warning("gateway %s: %s", url, exc)
        if not texts:
            raise GatewayError("no gateway answered GET /metrics")
        return texts

    def models(self) -> list[dict[str, Any]]:
        """``GET /models`` of the first live gateway that answers."""
        for url, client in self._live():
            try:
                return client.models()
            except GatewayError as exc:
                log.warning("gateway %s: %s", url, exc)
        raise GatewayError("no gateway answered GET /models")

    def inflight(self, replica_url: str) -> int:
        """Requests every live gateway is sending to ``replica_url``, summed."""
        return sum(self._inflight_of(client, replica_url)[0] for _, client in self._live())

    def drain(self, replica_urls: list[str], timeout: float) -> bool:
        """Wait until every live gateway has applied the current generation and has no
        request in flight to any of ``replica_urls``; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._drained(client, replica_urls) for _, client in self._live()):
                return True
            time.sleep(0.05)
        return False

    # -- helpers -------------------------------------------------------------------------

    def _drained(self, client: GatewayClient, urls: list[str]) -> bool:
        try:
            for url in urls:
                count, generation = self._inflight_of(client, url)
                if count or generation < self.generation:
                    return False
        except GatewayError:
            return True  # gone: it sends nothing; restarted, it syncs before serving
        return True

    @staticmethod
    def _inflight_of(client: GatewayClient, url: str) -> tuple[int, int]:
        answer = client.inflight_report(url)
        return int(answer["inflight"]), int(answer.get("generation", 0))

    def _live(self) -> list[tuple[str, GatewayClient]]:
        try:
            urls = sorted({m.url for m in self.store.members(GATEWAY)})
        except SQLAlchemyError as exc:
            log.warning("cannot list the gateways: %s", _first_line(exc))
            urls = sorted(self._clients)
        for url in urls:
            if url not in self._clients:
                self._clients[url] = self.client_for(url)
        return [(url, self._clients[url]) for url in urls]

    def _push(self, call: Callable[[GatewayClient, int], None]) -> None:
        for url, client in self._live():
            try:
                call(client, self.generation)
            except GatewayError as exc:
                # Not a failed rollout: the change is published, and that gateway
                # applies it from there within its sync interval.
                log.warning("push to gateway %s failed (it syncs by itself): %s", url, exc)


def _same_route(route: dict[str, Any], other: dict[str, Any] | None) -> bool:
    if other is None:
        return False
    keys = ("version", "replicas")
    roles = ("canary", "shadow")
    if any(route.get(k) != other.get(k) for k in keys):
        return False
    return all(
        (route.get(r) or {}).get("deployment", {}).get("replicas")
        == (other.get(r) or {}).get("deployment", {}).get("replicas")
        and (route.get(r) is None) == (other.get(r) is None)
        for r in roles
    )


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
