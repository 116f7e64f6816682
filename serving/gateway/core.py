"""The gateway's logic, apart from its HTTP surface: checks, scoring, state for the endpoints.

`Gateway` holds the route table, replica pool, metrics, limits and capture hook;
the endpoint classes (serving/gateway/endpoints.py, serving/gateway/admin.py)
call it, and serving/gateway/app.py assembles them into the Starlette app.
Nothing here imports those modules, so the dependency runs one way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from common import http_auth
from serving.deployment import Deployment
from serving.gateway import errors
from serving.gateway.batching import AdaptiveBatcher, Outcome
from serving.gateway.cache import CachedAnswer, ResponseCache
from serving.gateway.canary import chooser
from serving.gateway.capture import CaptureDispatcher, CapturedRequest, OnScored
from serving.gateway.config import GatewayConfig
from serving.gateway.csv_bodies import (
    PARQUET_MIME,
    CsvBodyError,
    bad_csv_body,
    csv_as_parquet,
    has_any_columns,
    is_csv_content_type,
)
from serving.gateway.limits import RateLimiter, cached_item, key_id
from serving.gateway.metrics import GatewayMetrics, RouteMetrics
from serving.gateway.replicas import ReplicaPool
from serving.gateway.route_sync import RouteSync
from serving.gateway.routes import ErrorNote, ModelRoute, RouteTable
from serving.gateway.shadow import ShadowMirror
from serving.gateway.wire import BatchSchema, is_json_content_type, parse_tabular, scrub_error_body

logger = logging.getLogger(__name__)

VERSION_HEADER = "X-Flowline-Model-Version"
# On every scoring answer (errors too): the id the request is captured under, the key
# that label feedback will refer to.
REQUEST_ID_HEADER = "X-Flowline-Request-Id"
BATCH_HEADER = "X-Flowline-Batch-Size"
# "hit" or "miss" on the answers of models with a response cache (absent otherwise).
CACHE_HEADER = "X-Flowline-Cache"
# Labels of flowline_gateway_rejected_total.
REJECT_REASONS = (
    "unauthorized",
    "body_too_large",
    "body_timeout",
    "overloaded",
    "not_deployed",
    "routes_unknown",
    "no_content_type",
    "bad_request",
)
# Makes the /invocations body from the deployment a request was routed to.
BodyFor = Callable[[Deployment], bytes]


class Gateway:
    """State shared by the gateway's endpoints: routes, backend pool, metrics, limits."""

    def __init__(
        self,
        config: GatewayConfig | None = None,
        table: RouteTable | None = None,
        on_scored: OnScored | None = None,
    ) -> None:
        self.config = config or GatewayConfig.from_env()
        self.table = table or RouteTable(self.config.default_model)
        self.metrics = GatewayMetrics()
        self.metrics.watch(self.table)
        self.metrics.inflight.set_function(lambda: self._inflight)
        self.replicas = ReplicaPool(
            self.table,
            self.config.backend_timeout_s,
            self.config.max_connections,
            self.config.upstream,
        )
        self.capture = CaptureDispatcher(on_scored, self.metrics.capture_dropped.inc)
        self.shadow = ShadowMirror(
            self.table, self.dispatch, self.metrics, self.config.shadow_max_inflight
        )
        self._inflight = 0
        # Set by serve_gateway when a coordination database is configured.
        self.route_sync: RouteSync | None = None
        # Request ids: unique across restarts and gateway processes by the random prefix.
        self._request_prefix = secrets.token_hex(4)
        self._request_count = 0
        self._api_keys = sorted(self.config.api_keys)
        self._rejected = {reason: self.metrics.rejected.labels(reason) for reason in REJECT_REASONS}
        # Budgets are keyed by a hash of the key; hash each configured key once.
        self._key_ids = {key: key_id(key) for key in self._api_keys}
        store_errors = self.metrics.store_errors
        self.limiter = RateLimiter(
            self.config.redis_url,
            self.config.redis_prefix,
            store_errors.labels("limit").inc,
        )
        self.cache = ResponseCache(
            self.config.redis_url,
            self.config.redis_prefix,
            store_errors.labels("cache").inc,
        )

    # --- checks ----------------------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """True when no API keys are configured or the request bears one of them."""
        return self.authorization_valid(request.headers.get("authorization"))

    def authorization_valid(self, authorization: str | None) -> bool:
        """True when no API keys are configured or `authorization` bears one of them
        (the value of an Authorization header or of gRPC's authorization metadata)."""
        if not self._api_keys:
            return True
        return http_auth.bearer_matches(authorization, self._api_keys)

    def reject(
        self,
        reason: str,
        status: int,
        error_code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """Count a refusal in flowline_gateway_rejected_total and answer it in MLflow's shape."""
        self._rejected[reason].inc()
        return errors.error_response(status, error_code, message, headers=headers)

    def unauthorized(self) -> Response:
        """401 in MLflow's error shape."""
        return self.reject(
            "unauthorized",
            401,
            errors.UNAUTHENTICATED,
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            headers=http_auth.challenge(),
        )

    async def read_body(self, request: Request) -> bytes | Response:
        """The request body, or the error answer: 413 over the size limit (read no
        further), 408 when it takes longer than `body_timeout_s` (the connection is
        closed), 400 when the client went away."""
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                body = await self._read_limited(request)
        except TimeoutError:
            return self.reject(
                "body_timeout",
                408,
                errors.DEADLINE_EXCEEDED,
                f"The request body was not received within {self.config.body_timeout_s:g} s.",
                # The rest of the body may still trickle in: do not wait for it.
                headers={"Connection": "close"},
            )
        except ClientDisconnect:
            # Nobody is left to answer; skip routing and the error log.
            return Response(status_code=400)
        if body is None:
            return self.reject(
                "body_too_large",
                413,
                errors.REQUEST_LIMIT_EXCEEDED,
                f"Request body exceeds the limit of {self.config.max_body_bytes} bytes.",
            )
        return body

    async def _read_limited(self, request: Request) -> bytes | None:
        # None when the body exceeds the size limit (read no further).
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit():
            if int(length) > limit:
                return None
            return await request.body()
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    # --- scoring ---------------------------------------------------------------------------

    async def score(self, request: Request, model: str | None) -> Response:
        """Authenticate, read, limit, route and forward one scoring request."""
        started = time.perf_counter()
        if self._api_keys and not self.authorized(request):
            return self.with_request_id(self.unauthorized(), self.next_request_id())
        # The body is read before taking an in-flight slot, under its own deadline, so
        # slow senders cannot hold the slots that requests with a body need.
        body = await self.read_body(request)
        if isinstance(body, Response):
            return self.with_request_id(body, self.next_request_id())
        headers = request.headers
        return await self.score_body(
            model,
            body,
            headers.get("content-type"),
            headers.get("authorization"),
            started,
            headers=headers,
        )

    def next_request_id(self) -> str:
        """A new request id: this gateway process's random prefix and a counter."""
        self._request_count += 1
        return f"{self._request_prefix}-{self._request_count:x}"

    @staticmethod
    def with_request_id(response: Response, request_id: str) -> Response:
        """`response` with `request_id` as its request id, unless it already has one."""
        if REQUEST_ID_HEADER not in response.headers:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    async def score_body(
        self,
        model: str | None,
        body: bytes | BodyFor,
        content_type: str | None,
        authorization: str | None,
        started: float,
        version: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Limit, route and forward a request whose caller is already authenticated.

        `body` is the `/invocations` body, or a function that makes it from the
        deployment the request was routed to (the V2 protocol maps its inputs onto
        that version's signature); a `ClientError` it raises is answered with 400.
        `version` pins the model version (production's or the canary's): another one
        answers 404. Without it, a model with a canary sends its share there
        (serving/gateway/canary.py), by the sticky header of `headers` when it names
        one. Every answer carries a new request id (`REQUEST_ID_HEADER`), which capture
        stores, and names the version that answered (`VERSION_HEADER`).
        """
        request_id = self.next_request_id()
        response = await self._score_body(
            model, body, content_type, authorization, started, version, request_id, headers
        )
        return self.with_request_id(response, request_id)

    async def _score_body(
        self,
        model: str | None,
        body: bytes | BodyFor,
        content_type: str | None,
        authorization: str | None,
        started: float,
        version: str | None,
        request_id: str,
        headers: Mapping[str, str] | None,
    ) -> Response:
        if self._inflight >= self.config.max_inflight:
            return self.reject(
                "overloaded",
                503,
                errors.TEMPORARILY_UNAVAILABLE,
                f"The gateway is at its limit of {self.config.max_inflight} requests in flight.",
                headers={"Retry-After": "1"},
            )
        self._inflight += 1
        try:
            route, reason = self.table.admit(model, chooser(version, headers))
            if route is None:
                return self._not_routed(reason)
            cached: str | None = None
            try:
                deployment = route.deployment
                if version is not None and deployment.version != version:
                    return self.reject(
                        "not_deployed",
                        404,
                        errors.RESOURCE_DOES_NOT_EXIST,
                        f"Version '{version}' of model '{deployment.model}' is not deployed; "
                        f"version '{deployment.version}' is.",
                    )
                # Both are off unless configured: no store call and no hashing then.
                limit = deployment.rate_limit or self.config.rate_limits
                if limit is not None:
                    refused = await self._over_limit(deployment, limit, authorization)
                    if refused is not None:
                        return refused
                if content_type is None:
                    # Stock answers 500 here (it splits None); a client mistake is a 4xx.
                    return self.reject(
                        "no_content_type",
                        415,
                        errors.BAD_REQUEST,
                        "Missing Content-Type: send application/json, text/csv or "
                        "application/vnd.apache.parquet.",
                    )
                if not isinstance(body, bytes):
                    try:
                        body = body(deployment)
                    except errors.ClientError as exc:
                        return self.reject("bad_request", 400, errors.BAD_REQUEST, str(exc))
                settings = deployment.cache
                if settings is None:
                    outcome = await self.dispatch(route, body, content_type)
                else:
                    cache_key = self.cache.key(
                        deployment.model, deployment.version, body, content_type
                    )
                    hit = await self.cache.get(deployment.model, cache_key, settings)
                    if hit is not None:
                        cached = "hit"
                        outcome = Outcome(200, hit.body, hit.content_type)
                    else:
                        cached = "miss"
                        outcome = await self.dispatch(route, body, content_type)
                        if outcome.status == 200 and not outcome.gateway_error:
                            answer = CachedAnswer(outcome.body, outcome.content_type)
                            await self.cache.put(deployment.model, cache_key, answer, settings)
                    self.metrics.cache_lookups.labels(deployment.model, cached).inc()
            finally:
                self.table.release(route)
            return self._answer(route, body, content_type, outcome, started, cached, request_id)
        finally:
            self._inflight -= 1

    async def _over_limit(
        self, deployment: Deployment, limit: str, authorization: str | None
    ) -> Response | None:
        """None when the caller may send this request to `deployment`, else its 429."""
        if self._api_keys:
            token = http_auth.bearer_token(authorization) or ""
            identity = self._key_ids.get(token) or key_id(token)
        else:
            identity = key_id(None)
        verdict = await self.limiter.check(cached_item(limit), deployment.model, identity)
        if verdict.allowed:
            return None
        self.metrics.rate_limited.labels(deployment.model).inc()
        return errors.error_response(
            429,
            errors.REQUEST_LIMIT_EXCEEDED,
            f"Rate limit of {limit} exceeded for model '{deployment.model}'; "
            f"retry in {verdict.retry_after_s} s.",
            headers={"Retry-After": str(verdict.retry_after_s)},
        )

    def _not_routed(self, reason: str) -> Response:
        if not self.table.loaded:
            # Just restarted with nothing saved: the model may well be served; say when
            # to retry instead of a 404 the client would take as final.
            return self.reject(
                "routes_unknown",
                503,
                errors.TEMPORARILY_UNAVAILABLE,
                "The gateway has no route table yet; the controller has not pushed its routes.",
                headers={"Retry-After": "1"},
            )
        return self.reject("not_deployed", 404, errors.RESOURCE_DOES_NOT_EXIST, reason)

    async def dispatch(self, route: ModelRoute, body: bytes, content_type: str | None) -> Outcome:
        """Send through the route's batcher when the request may be merged, else directly."""
        batcher = self._batcher(route)
        if (
            batcher is not None
            and batcher.disabled_reason is None
            and is_json_content_type(content_type)
        ):
            if batcher.idle:
                # Sent alone and unchanged, so no need to parse it; the slot it takes
                # makes concurrent requests queue (and coalesce) behind it.
                return await batcher.send_alone(body, content_type)
            item = parse_tabular(body, batcher.schema, batcher.settings.max_batch_size)
            if item is not None:
                return await batcher.submit(item, body, content_type)
        if is_csv_content_type(content_type) and has_any_columns(route.deployment.input_columns()):
            # Stock cannot read CSV for `any` columns; see serving/gateway/csv_bodies.py.
            try:
                body, content_type = csv_as_parquet(body), PARQUET_MIME
            except CsvBodyError as exc:
                return Outcome(400, bad_csv_body(exc), "application/json", True)
        return await self._send(route, body, content_type, "single")

    async def _send(
        self, route: ModelRoute, body: bytes, content_type: str | None, kind: str
    ) -> Outcome:
        result = await self.replicas.invoke(route, body, content_type)
        _route_metrics(self, route).backend_call(kind)
        answer = result.body
        if result.status >= 400 and not result.gateway_error:
            answer = scrub_error_body(answer)
        return Outcome(result.status, answer, result.content_type, result.gateway_error)

    def _batcher(self, route: ModelRoute) -> AdaptiveBatcher | None:
        # False marks "decided: no batching" so the signature is examined once per route.
        if route.batcher is None:
            route.batcher = self._make_batcher(route) or False
        return route.batcher or None

    def _make_batcher(self, route: ModelRoute) -> AdaptiveBatcher | None:
        deployment = route.deployment
        if not deployment.batching.enabled:
            return None
        try:
            schema = BatchSchema.from_signature_inputs(deployment.input_columns())
        except ValueError:
            schema = None
        if schema is None:
            logger.info("batching off for %s: no named scalar input columns", deployment.label)
            return None
        route_metrics = _route_metrics(self, route)
        per_replica = deployment.batching.calls_per_replica
        return AdaptiveBatcher(
            deployment.batching,
            schema,
            lambda body, ct, kind: self._send(route, body, ct, kind),
            lambda: max(1, self.table.healthy_count(route)) * per_replica,
            route_metrics.batch,
            deployment.label,
        )

    def _answer(
        self,
        route: ModelRoute,
        body: bytes,
        content_type: str | None,
        outcome: Outcome,
        started: float,
        cached: str | None = None,
        request_id: str | None = None,
    ) -> Response:
        deployment = route.deployment
        headers = {VERSION_HEADER: deployment.label}
        if request_id is not None:
            headers[REQUEST_ID_HEADER] = request_id
        if cached is not None:
            headers[CACHE_HEADER] = cached
        if outcome.content_type is not None:
            headers["content-type"] = outcome.content_type
        if outcome.batch_size > 1:
            headers[BATCH_HEADER] = str(outcome.batch_size)
        status = outcome.status
        if status >= 500 or outcome.gateway_error:
            route.last_error = ErrorNote(time.time(), status, message_of(outcome.body))
        if status == 503 and outcome.gateway_error:
            headers["Retry-After"] = "1"  # no replica now; the probe loop checks every second
        elif status == 200 and self.capture.enabled:
            self.capture.submit(
                deployment.model,
                deployment.version,
                CapturedRequest(body, content_type, cached=cached == "hit", request_id=request_id),
                outcome.body,
                outcome.predictions,
            )
        if status == 200 and route.variant is None and cached != "hit":
            # Production scored it: a copy may go to the shadow, after this answer.
            self.shadow.offer(deployment.model, body, content_type, outcome.body)
        _route_metrics(self, route).request(
            status, time.perf_counter() - started, outcome.gateway_error
        )
        return Response(outcome.body, status_code=status, headers=headers)

    # --- state for the read-only endpoints -------------------------------------------------

    def deployed(self) -> tuple[list[Deployment], Deployment | None]:
        """The active deployments and the default one (what the OpenAPI spec and docs show)."""
        default_route, _ = self.table.resolve_default()
        return (
            [r.deployment for r in self.table.routes()],
            default_route.deployment if default_route else None,
        )

    def model_states(self) -> list[dict[str, Any]]:
        """What GET /models shows for each active deployment."""
        default_route, _ = self.table.resolve_default()
        inflight = self.table.inflight_by_replica()
        return [
            self._model_state(route, route is default_route, inflight)
            for route in self.table.routes()
        ]

    def _model_state(
        self, route: ModelRoute, is_default: bool, inflight: dict[str, int]
    ) -> dict[str, Any]:
        d = route.deployment
        replicas = []
        for url in d.replicas:
            state = self.table.replica(url)
            replicas.append(
                {
                    "url": url,
                    "healthy": state.healthy,
                    "inflight": inflight.get(url, 0),
                    "last_error": state.last_error,
                }
            )
        healthy = sum(r["healthy"] for r in replicas)
        if healthy == len(replicas):
            readiness = "ready"
        else:
            readiness = "degraded" if healthy else "unavailable"
        note = route.last_error
        last_error = None
        if note is not None:
            last_error = {"at": note.at, "status": note.status, "message": note.message}
        return {
            "name": d.model,
            "version": d.version,
            "state": readiness,
            "default": is_default,
            "since": d.since,
            "replicas": replicas,
            "batching": {
                "enabled": d.batching.enabled and bool(self._batcher(route)),
                "max_batch_size": d.batching.max_batch_size,
                "max_wait_ms": d.batching.max_wait_ms,
                "calls_per_replica": d.batching.calls_per_replica,
                "hold_ms": d.batching.hold_ms,
            },
            "timeout_s": d.timeout_s or self.config.backend_timeout_s,
            # The model's own limit (tag), else the gateway's default; None: unlimited.
            "rate_limit": d.rate_limit or self.config.rate_limits,
            "cache": None
            if d.cache is None
            else {"ttl_s": d.cache.ttl_s, "max_entries": d.cache.max_entries},
            "last_error": last_error,
            "canary": self._variant_state(d.model, "canary", inflight),
            "shadow": self._variant_state(d.model, "shadow", inflight),
        }

    def _variant_state(
        self, model: str, role: str, inflight: dict[str, int]
    ) -> dict[str, Any] | None:
        route = self.table.variant(model, role)
        if route is None or route.variant is None:
            return None
        d, variant = route.deployment, route.variant
        state: dict[str, Any] = {
            "version": d.version,
            "since": d.since,
            "replicas": [
                {"url": u, "healthy": self.table.replica(u).healthy, "inflight": inflight.get(u, 0)}
                for u in d.replicas
            ],
        }
        if role == "canary":
            state.update(weight=variant.share, sticky=variant.sticky)
        else:
            state.update(sample=variant.share, **self.shadow.stats(model, d.version).to_dict())
        return state

    # --- lifetime ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """While the app serves: probe replicas marked down; after it: flush captures, close."""
        prober = asyncio.create_task(
            self.replicas.probe_down_replicas(self.config.health_interval_s)
        )
        syncer = None
        if self.route_sync is not None:
            # Before the first request: a restarted gateway routes as published, not
            # as its route file said when it died.
            await self.route_sync.sync_once()
            syncer = asyncio.create_task(self.route_sync.run())
        try:
            yield
        finally:
            for task in (prober, syncer):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.route_sync is not None:
                await asyncio.to_thread(self.route_sync.leave)
            await self.shadow.aclose()
            await self.capture.drain()
            await self.replicas.aclose()
            await self.cache.aclose()


def _route_metrics(gateway: Gateway, route: ModelRoute) -> RouteMetrics:
    d = route.deployment
    return gateway.metrics.for_route(d.model, d.version)


def message_of(body: bytes) -> str:
    """The `message` of an MLflow error body (at most 500 characters), else its text."""
    try:
        payload = json.loads(body)
        if isinstance(payload, dict) and "message" in payload:
            return str(payload["message"])[:500]
    except (ValueError, UnicodeDecodeError):
        pass
    return body[:500].decode("utf-8", "replace")
