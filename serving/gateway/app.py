"""The gateway's Starlette application: routes, lifespan and error handlers, nothing more.

The logic lives in `Gateway` (serving/gateway/core.py) and the handlers in the
endpoint classes (serving/gateway/endpoints.py, serving/gateway/admin.py);
this module only maps paths to them. `Gateway` is re-exported for callers that
import it from here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from common.servers import url_host
from serving.gateway import errors
from serving.gateway.admin import AdminEndpoints
from serving.gateway.capture import OnScored
from serving.gateway.config import GatewayConfig
from serving.gateway.core import Gateway
from serving.gateway.endpoints import ScoringEndpoints
from serving.gateway.openapi import swagger_ui_dir
from serving.gateway.routes import RouteTable
from serving.gateway.v2.grpc_server import grpc_serving
from serving.gateway.v2.rest import V2Endpoints

__all__ = ["Gateway", "create_app"]

logger = logging.getLogger(__name__)


def create_app(
    config: GatewayConfig | None = None,
    table: RouteTable | None = None,
    on_scored: OnScored | None = None,
    grpc_credentials: grpc.ServerCredentials | None = None,
) -> Starlette:
    """Build the gateway app; `app.state.gateway` exposes its `Gateway` (and route table).

    With `config.grpc_port` set, the app's lifespan also serves the V2 gRPC service,
    over TLS when `grpc_credentials` are given (`common.tls.grpc_server_credentials`).
    """
    gateway = Gateway(config, table, on_scored)
    scoring = ScoringEndpoints(gateway)
    admin = AdminEndpoints(gateway)
    routes = [
        Route("/invocations", scoring.invocations, methods=["POST"]),
        Route("/models/{name}/invocations", scoring.model_invocations, methods=["POST"]),
        Route("/models", scoring.models, methods=["GET"]),
        Route("/ping", scoring.ping, methods=["GET"]),
        Route("/health", scoring.health, methods=["GET"]),
        Route("/metrics", scoring.metrics, methods=["GET"]),
        Route("/openapi.json", scoring.openapi, methods=["GET"]),
        Route("/docs", scoring.docs, methods=["GET"]),
        # Swagger UI's files, public (no model data in them): the /docs page loads them.
        Mount("/docs/assets", StaticFiles(directory=swagger_ui_dir()), name="docs-assets"),
        Route("/admin/deployments", admin.list_deployments, methods=["GET"]),
        Route("/admin/deployments/{model}", admin.put_deployment, methods=["PUT"]),
        Route("/admin/deployments/{model}", admin.get_deployment, methods=["GET"]),
        Route("/admin/deployments/{model}", admin.delete_deployment, methods=["DELETE"]),
        Route("/admin/deployments/{model}/{role}", admin.put_variant, methods=["PUT"]),
        Route("/admin/deployments/{model}/{role}", admin.delete_variant, methods=["DELETE"]),
        Route("/admin/inflight", admin.inflight, methods=["GET"]),
        Route("/admin/replicas/health", admin.replica_health, methods=["POST"]),
    ]
    routes += V2Endpoints(gateway).routes()
    app = Starlette(
        routes=routes,
        lifespan=lambda _app: _lifespan(gateway, grpc_credentials),
        exception_handlers={HTTPException: http_error, Exception: internal_error},
    )
    app.state.gateway = gateway
    return app


@contextlib.asynccontextmanager
async def _lifespan(
    gateway: Gateway, grpc_credentials: grpc.ServerCredentials | None
) -> AsyncIterator[None]:
    """The gateway's background work, and the V2 gRPC service when a port is set."""
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(gateway.running())
        config = gateway.config
        if config.grpc_port is not None:
            address = f"{url_host(config.grpc_host)}:{config.grpc_port}"
            await stack.enter_async_context(grpc_serving(gateway, address, grpc_credentials))
        yield


async def internal_error(request: Request, exc: Exception) -> Response:
    """Any unhandled exception: log the traceback; the client only gets MLflow's error shape."""
    logger.exception("unhandled error on %s", request.url.path, exc_info=exc)
    return errors.error_response(500, errors.INTERNAL_ERROR, "Internal gateway error.")


async def http_error(request: Request, exc: Exception) -> Response:
    """Unknown paths (404) and wrong methods (405), in MLflow's error shape."""
    assert isinstance(exc, HTTPException)
    code = errors.ENDPOINT_NOT_FOUND if exc.status_code == 404 else errors.BAD_REQUEST
    return errors.error_response(exc.status_code, code, exc.detail, headers=exc.headers)
