"""The Open Inference Protocol's REST endpoints (/v2/...), on the gateway's Starlette app.

Health endpoints are public, like /ping and /health; metadata and inference need
an API key when keys are configured, like /models and /invocations. Errors use
the protocol's `{"error": message}` body with the status `/invocations` would
have answered.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from serving.gateway.core import Gateway, message_of
from serving.gateway.errors import BAD_REQUEST, JSON_TYPE
from serving.gateway.v2.codec import parse_rest_request
from serving.gateway.v2.service import InferenceService, error_json
from serving.gateway.v2.tensors import TensorError

# Triton's binary-data extension: the JSON header's length; raw tensors follow it.
HEADER_LENGTH = "inference-header-content-length"


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(payload), status_code=status, media_type=JSON_TYPE, headers=headers)


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(error_json(message), status_code=status, media_type=JSON_TYPE, headers=headers)


class V2Endpoints:
    """Handlers of the V2 REST paths; `routes()` lists them for the app."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.service = InferenceService(gateway)

    def routes(self) -> list[Route]:
        """The V2 REST routes, with and without a version in the path."""
        model = "/v2/models/{name}"
        version = model + "/versions/{version}"
        return [
            Route("/v2", self.server_metadata, methods=["GET"]),
            Route("/v2/health/live", self.live, methods=["GET"]),
            Route("/v2/health/ready", self.ready, methods=["GET"]),
            Route(model, self.model_metadata, methods=["GET"]),
            Route(version, self.model_metadata, methods=["GET"]),
            Route(model + "/ready", self.model_ready, methods=["GET"]),
            Route(version + "/ready", self.model_ready, methods=["GET"]),
            Route(model + "/infer", self.infer, methods=["POST"]),
            Route(version + "/infer", self.infer, methods=["POST"]),
        ]

    async def server_metadata(self, request: Request) -> Response:
        """GET /v2: the server's name, version and extensions."""
        return _json(self.service.server_metadata())

    async def live(self, request: Request) -> Response:
        """GET /v2/health/live: 200 while the gateway answers."""
        return _json({"live": True})

    async def ready(self, request: Request) -> Response:
        """GET /v2/health/ready: 200 when every deployed model can be scored, else 503."""
        ready = self.service.ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def model_ready(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{v}]/ready: 200 ready, 503 not, 404 unknown."""
        name, version = _model_of(request)
        ready = self.service.model_ready(name, version)
        if ready is None:
            return _error(self.service.not_deployed(name, version), 404)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def model_metadata(self, request: Request) -> Response:
        """GET /v2/models/{name}[/versions/{v}]: inputs and outputs from the signature."""
        if not self.gateway.authorized(request):
            return _unauthorized(self.gateway)
        name, version = _model_of(request)
        metadata = self.service.metadata(name, version)
        if metadata is None:
            return _error(self.service.not_deployed(name, version), 404)
        return _json(metadata)

    async def infer(self, request: Request) -> Response:
        """POST /v2/models/{name}[/versions/{v}]/infer: score the inputs."""
        started = time.perf_counter()
        gateway = self.gateway

        def refused(response: Response) -> Response:
            # A refusal before the scoring path: it gets a request id all the same.
            return gateway.with_request_id(_as_v2_error(response), gateway.next_request_id())

        if not gateway.authorized(request):
            return refused(gateway.unauthorized())
        body = await gateway.read_body(request)
        if isinstance(body, Response):
            return refused(body)
        name, version = _model_of(request)
        try:
            parsed = parse_rest_request(body, request.headers.get(HEADER_LENGTH))
        except TensorError as exc:
            # Counted in flowline_gateway_rejected_total like every refusal.
            return refused(gateway.reject("bad_request", 400, BAD_REQUEST, str(exc)))
        authorization = request.headers.get("authorization")
        result = await self.service.infer(name, version, parsed, authorization, started)
        if result.error is not None:
            return _error(result.error, result.status, result.headers)
        return _json(result.answer, headers=result.headers)


def _model_of(request: Request) -> tuple[str, str | None]:
    params = request.path_params
    return params["name"], params.get("version")


def _unauthorized(gateway: Gateway) -> Response:
    return _as_v2_error(gateway.unauthorized())


def _as_v2_error(response: Response) -> Response:
    """A gateway refusal (MLflow's error shape) in the protocol's error shape."""
    headers = {k: v for k, v in response.headers.items() if k.lower() not in _BODY_HEADERS}
    return _error(message_of(bytes(response.body)), response.status_code, headers)


_BODY_HEADERS = ("content-length", "content-type")
