"""Calls to scoring replicas: replica choice, retry, health probes."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import httpx

from serving.gateway import errors
from serving.gateway.routes import ModelRoute, RouteTable
from serving.gateway.upstream import (
    AiohttpUpstream,
    HttpxUpstream,
    Upstream,
    UpstreamError,
    UpstreamTimeout,
)

logger = logging.getLogger(__name__)

# A replica's uvicorn closes idle keep-alive connections after 5 s; expiring ours
# first avoids sending a request on a socket the server is closing.
KEEPALIVE_EXPIRY_S = 4.0
CONNECT_TIMEOUT_S = 2.0
PROBE_TIMEOUT_S = 2.0


@dataclass(slots=True)
class ReplicaResult:
    """What a replica (or the gateway on its behalf) answered."""

    status: int
    body: bytes
    content_type: str | None
    replica: str | None
    gateway_error: bool = False  # True when the gateway generated this answer


class ReplicaPool:
    """Sends scoring calls to a route's replicas; pings replicas marked down."""

    def __init__(
        self,
        table: RouteTable,
        timeout_s: float,
        max_connections: int,
        upstream: str = "aiohttp",
    ) -> None:
        self.table = table
        self.timeout_s = timeout_s
        # httpx serves the control plane (health probes) and, on request, scoring.
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(
                max_connections=max_connections,
                max_keepalive_connections=max_connections,
                keepalive_expiry=KEEPALIVE_EXPIRY_S,
            ),
            # Replicas are plain loopback/cluster URLs: no proxies from the environment.
            trust_env=False,
        )
        if upstream == "httpx":
            self.upstream: Upstream = HttpxUpstream(self.client)
        elif upstream == "aiohttp":
            self.upstream = AiohttpUpstream(max_connections, KEEPALIVE_EXPIRY_S, CONNECT_TIMEOUT_S)
        else:
            raise ValueError(f"unknown upstream client {upstream!r} (aiohttp or httpx)")

    async def invoke(
        self, route: ModelRoute, body: bytes, content_type: str | None
    ) -> ReplicaResult:
        """POST `body` to /invocations of one of the route's replicas and relay the answer.

        On a connection-level failure the call is retried once (scoring is
        idempotent), on another replica when the route has one; a refused
        connection marks the replica down so later requests route around it.
        """
        if self.table.circuit_open(route):
            # Every replica is known to be down: answer now instead of waiting on one. The
            # probe loop (or the controller) marks a replica up again, closing the circuit.
            return _gateway_error(
                503,
                errors.TEMPORARILY_UNAVAILABLE,
                f"No healthy replica of model '{route.deployment.label}'.",
                None,
            )
        timeout_s = route.deployment.timeout_s or self.timeout_s
        tried: list[str] = []
        last_error = ""
        for _ in range(2):
            url = self.table.choose_replica(route, exclude=tuple(tried))
            if url is None:
                # A single-replica route retries on the same replica: a reset
                # connection does not mean the server is gone.
                if not tried:
                    break
                url = tried[-1]
            tried.append(url)
            state = self.table.replica(url)
            state.active += 1
            try:
                answer = await self.upstream.post(
                    f"{url}/invocations", body, content_type, timeout_s
                )
            except UpstreamTimeout:
                # Not retried: a slow model would only get twice the load.
                return _gateway_error(
                    504,
                    errors.DEADLINE_EXCEEDED,
                    f"Model '{route.deployment.label}' did not answer within {timeout_s:g} s.",
                    url,
                )
            except UpstreamError as exc:
                last_error = str(exc)
                if exc.connect:
                    self.table.mark_down(url, last_error)
                    logger.warning("replica %s marked down: %s", url, last_error)
                continue
            finally:
                state.active -= 1
            return ReplicaResult(answer.status, answer.body, answer.content_type, url)
        return _gateway_error(
            503,
            errors.TEMPORARILY_UNAVAILABLE,
            f"No replica of model '{route.deployment.label}' could be reached"
            + (f" ({last_error})." if last_error else "."),
            None,
        )

    async def ping(self, url: str) -> bool:
        """True when the replica answers GET /ping with 200."""
        try:
            response = await self.client.get(f"{url}/ping", timeout=PROBE_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def probe_down_replicas(self, interval_s: float) -> None:
        """Forever: ping replicas marked down, mark them up once they answer; prune idle sockets."""
        while True:
            await asyncio.sleep(interval_s)
            self.upstream.prune()
            down = self.table.replicas_to_probe()
            if not down:
                continue
            results = await asyncio.gather(*(self.ping(u) for u in down))
            for url, ok in zip(down, results, strict=True):
                if ok and not self.table.replica(url).held_down:
                    self.table.mark_up(url)
                    logger.info("replica %s answers /ping again; marked up", url)

    async def aclose(self) -> None:
        """Close pooled connections."""
        await self.upstream.aclose()
        await self.client.aclose()


def _gateway_error(status: int, code: str, message: str, replica: str | None) -> ReplicaResult:
    return ReplicaResult(
        status, errors.error_body(code, message), errors.JSON_TYPE, replica, gateway_error=True
    )
