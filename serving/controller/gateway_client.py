"""The controller's client for the gateway's admin API (see docs/gateway.md)."""

from __future__ import annotations

import time
from typing import Any

import requests

from serving.deployment import GENERATION_HEADER, Deployment, Variant


class GatewayError(RuntimeError):
    """The gateway refused or did not answer an admin call."""


class GatewayClient:
    """PUT/DELETE deployments, read routes and in-flight counts, with the admin token.

    ``verify`` and ``cert`` are requests' (``common.tls.client_tls`` gives both): the
    CA bundle an https gateway is verified against (True: the system store) and the
    client certificate and key presented to a gateway under mutual TLS.
    """

    def __init__(
        self,
        base_url: str,
        token: str,
        timeout: float = 30.0,
        *,
        verify: str | bool = True,
        cert: tuple[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        # Passed with every call, not set on the session: requests lets REQUESTS_CA_BUNDLE
        # (when set) override a session's verify, but not a call's.
        self.tls: dict[str, Any] = {"verify": verify, "cert": cert}
        self.timeout = timeout

    def _call(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        try:
            response = self.session.request(
                method, f"{self.base_url}{path}", timeout=self.timeout, **self.tls, **kwargs
            )
        except requests.RequestException as exc:
            raise GatewayError(
                f"gateway unreachable at {self.base_url}: {type(exc).__name__}"
            ) from None
        if response.status_code >= 400 and not (method == "DELETE" and response.status_code == 404):
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise GatewayError(f"gateway answered {response.status_code}: {message[:500]}")
        return response

    def put(self, deployment: Deployment, generation: int | None = None) -> None:
        """Make ``deployment`` the model's active route (the blue/green switch).

        The replicas were smoke-tested by the reconciler before this call, so the
        gateway is asked to switch, not to check them again. ``generation``: the
        published route generation this change makes (serving/controller/gateway_fleet.py).
        """
        path = f"/admin/deployments/{deployment.model}"
        self._call("PUT", path, json=deployment.to_dict(), headers=_stamp(generation))

    def delete(self, model: str, generation: int | None = None) -> None:
        """Stop routing ``model``; absent already is fine."""
        self._call("DELETE", f"/admin/deployments/{model}", headers=_stamp(generation))

    def put_variant(self, variant: Variant, generation: int | None = None) -> None:
        """Make ``variant`` its model's canary or shadow (smoke-tested before, as ``put``)."""
        path = f"/admin/deployments/{variant.model}/{variant.role}"
        self._call("PUT", path, json=variant.to_dict(), headers=_stamp(generation))

    def delete_variant(self, model: str, role: str, generation: int | None = None) -> None:
        """Remove the model's canary or shadow; absent already is fine."""
        path = f"/admin/deployments/{model}/{role}"
        self._call("DELETE", path, headers=_stamp(generation))

    def routes(self) -> dict[str, dict[str, Any]]:
        """{model: the gateway's view of its deployment}."""
        data = self._call("GET", "/admin/deployments").json()
        return {d["model"]: d for d in data.get("deployments", [])}

    def metrics_texts(self) -> list[str]:
        """The gateway's Prometheus text (a list: a fleet answers one per gateway)."""
        return [self._call("GET", "/metrics").text]

    def models(self) -> list[dict[str, Any]]:
        """What the gateway's ``GET /models`` lists."""
        return self._call("GET", "/models").json().get("models", [])

    def inflight(self, replica_url: str) -> int:
        """Requests the gateway is sending to ``replica_url`` right now."""
        return int(self.inflight_report(replica_url)["inflight"])

    def inflight_report(self, replica_url: str) -> dict[str, Any]:
        """{"inflight": n, "generation": the published route generation it holds}."""
        return self._call("GET", "/admin/inflight", params={"replica": replica_url}).json()

    def drain(self, replica_urls: list[str], timeout: float) -> bool:
        """Wait until no request is in flight to any of ``replica_urls``; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self.inflight(url) == 0 for url in replica_urls):
                return True
            time.sleep(0.05)
        return False


def _stamp(generation: int | None) -> dict[str, str]:
    return {} if generation is None else {GENERATION_HEADER: str(generation)}
