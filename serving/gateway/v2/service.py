"""The Open Inference Protocol's operations over a `Gateway`, for its REST and gRPC fronts.

Both fronts (serving/gateway/v2/rest.py, serving/gateway/v2/grpc_server.py) only
decode and encode; what an operation means lives here once. Inference goes
through `Gateway.score_body`, the same path as `/invocations`: rate limits,
the cache, batching, capture, metrics and the version header apply unchanged.
"""

from __future__ import annotations

import importlib.metadata
import json
import time
from dataclasses import dataclass, field
from typing import Any

from serving.deployment import Deployment
from serving.gateway.core import (
    BATCH_HEADER,
    CACHE_HEADER,
    REQUEST_ID_HEADER,
    VERSION_HEADER,
    Gateway,
    message_of,
)
from serving.gateway.errors import JSON_TYPE
from serving.gateway.routes import ModelRoute
from serving.gateway.v2.codec import (
    InferRequest,
    OutputTensor,
    answer_json,
    invocation_body,
    model_metadata,
    outputs_from_answer,
    signature_columns,
)
from serving.gateway.v2.tensors import TensorError

SERVER_NAME = "flowline"
# Headers of the /invocations answer that a V2 answer keeps.
KEPT_HEADERS = (VERSION_HEADER, REQUEST_ID_HEADER, CACHE_HEADER, BATCH_HEADER, "retry-after")


@dataclass
class InferResult:
    """What a V2 inference produced: an answer (status 200) or an error message."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    deployment: Deployment | None = None
    outputs: list[OutputTensor] = field(default_factory=list)
    answer: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class InferenceService:
    """Health, metadata and inference of the V2 protocol over one `Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # The signature's column names of the last deployment of each model: decoding
        # the signature per request would cost more than the rest of the mapping.
        self._columns: dict[str, tuple[Deployment, list[str]]] = {}

    def server_metadata(self) -> dict[str, Any]:
        """`GET /v2`: the server's name, version and the protocol extensions it serves."""
        # Binary tensor inputs are read (Triton's binary-data extension); answers are JSON.
        return {"name": SERVER_NAME, "version": _package_version(), "extensions": []}

    def ready(self) -> bool:
        """Ready: the route table is known and every deployed model has a healthy replica."""
        table = self.gateway.table
        routes = table.routes()
        return bool(table.loaded and routes) and all(table.healthy_count(r) > 0 for r in routes)

    def route(self, name: str, version: str | None) -> ModelRoute | None:
        """The active route of `name` (and of that version, when one is given: the
        production or the canary version, the two a pinned request may go to)."""
        route = self.gateway.table.get(name)
        if route is None or not version or route.deployment.version == version:
            return route
        canary = self.gateway.table.variant(name, "canary")
        return canary if canary is not None and canary.deployment.version == version else None

    def model_ready(self, name: str, version: str | None) -> bool | None:
        """Whether the model (version) has a healthy replica; None when it is not deployed."""
        route = self.route(name, version)
        if route is None:
            return None
        return self.gateway.table.healthy_count(route) > 0

    def metadata(self, name: str, version: str | None) -> dict[str, Any] | None:
        """The model's V2 metadata from its signature; None when it is not deployed."""
        route = self.route(name, version)
        return None if route is None else model_metadata(route.deployment)

    def not_deployed(self, name: str, version: str | None) -> str:
        """The message for a model (version) that is not deployed."""
        if version:
            return f"Version '{version}' of model '{name}' is not deployed."
        return f"Model '{name}' is not deployed."

    async def infer(
        self,
        name: str,
        version: str | None,
        request: InferRequest,
        authorization: str | None,
        started: float | None = None,
    ) -> InferResult:
        """Score a V2 request with the model (version), as `/invocations` would."""
        routed: list[Deployment] = []

        def body_for(deployment: Deployment) -> bytes:
            routed.append(deployment)
            return invocation_body(request, deployment, self._signature_columns(deployment))

        response = await self.gateway.score_body(
            name,
            body_for,
            JSON_TYPE,
            authorization,
            time.perf_counter() if started is None else started,
            version or None,
        )
        headers = {k: v for k in KEPT_HEADERS if (v := response.headers.get(k)) is not None}
        body = bytes(response.body)
        if response.status_code != 200:
            return InferResult(response.status_code, headers, error=message_of(body))
        deployment = routed[0]
        try:
            outputs = outputs_from_answer(body, request.outputs)
        except TensorError as exc:
            return InferResult(400, headers, deployment, error=str(exc))
        except (ValueError, AttributeError):
            return InferResult(502, headers, deployment, error="The model's answer is not JSON.")
        return InferResult(
            200, headers, deployment, outputs, answer_json(request, deployment, outputs)
        )

    def _signature_columns(self, deployment: Deployment) -> list[str]:
        known = self._columns.get(deployment.model)
        if known is not None and known[0] is deployment:
            return known[1]
        columns = signature_columns(deployment)
        self._columns[deployment.model] = (deployment, columns)
        return columns


def _package_version() -> str:
    try:
        return importlib.metadata.version("flowline")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def error_json(message: str) -> bytes:
    """The protocol's error body, `{"error": message}`."""
    return json.dumps({"error": message}).encode()
