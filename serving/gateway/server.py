"""Run the gateway under uvicorn."""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

import prometheus_client
from sqlalchemy.exc import SQLAlchemyError

from common.servers import listening_socket, run_on_socket, url_host, write_port_file
from common.tls import TlsSettings, grpc_server_credentials, scheme
from serving.coordination import GATEWAY, CoordinationStore, instance_id
from serving.deployment import Deployment
from serving.gateway.app import create_app
from serving.gateway.capture import OnScored
from serving.gateway.config import GatewayConfig
from serving.gateway.fast_path import ScoringFastPath
from serving.gateway.route_store import RouteStore
from serving.gateway.route_sync import RouteSync
from serving.gateway.routes import RouteTable

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
LISTEN_BACKLOG = 2048


def fast_runtime() -> dict[str, str]:
    """uvicorn's loop/http choices: uvloop and httptools when installed (several times faster)."""
    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }


def bounded_http(config: GatewayConfig, http: str) -> dict[str, Any]:
    """uvicorn settings that bound request heads in size and time (see protocol.py)."""
    if http == "httptools":
        from serving.gateway.protocol import bounded_protocol

        return {"http": bounded_protocol(config.max_header_bytes, config.header_timeout_s)}
    # h11 only bounds the size (it answers 400 and closes); httptools is a pinned dependency.
    return {"http": "h11", "h11_max_incomplete_event_size": config.max_header_bytes}


def coordination_store(url: str) -> CoordinationStore:
    """The shared database of published routes; a one-line ValueError when unusable."""
    try:
        return CoordinationStore(url)
    except SQLAlchemyError as exc:
        raise ValueError(
            f"the coordination database cannot be used: {str(exc).splitlines()[0][:200]}"
        ) from None


def load_deployments(path: str | Path) -> list[Deployment]:
    """Deployments from a JSON file holding a list of admin-API deployment objects."""
    data: Any = json.loads(Path(path).read_text())
    if isinstance(data, dict):
        data = data.get("deployments", [])
    return [Deployment.from_dict(item) for item in data]


def serve_gateway(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    config: GatewayConfig | None = None,
    table: RouteTable | None = None,
    on_scored: OnScored | None = None,
    deployments: list[Deployment] | None = None,
    port_file: str | Path | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the gateway until interrupted (SIGINT/SIGTERM stop it gracefully).

    port 0 binds a free port; its number is logged and, when `port_file` is
    given, written there once the socket is listening.
    """
    config = config or GatewayConfig.from_env()
    # Process-wide switch: the *_created series only double the scrape size here.
    prometheus_client.disable_created_metrics()
    table = table or RouteTable(config.default_model)
    if config.routes_file is not None:
        restored = RouteStore(config.routes_file).attach(table)
        # Nothing on disk and nothing given: the table is unknown until the controller
        # pushes, so the gateway answers 503 + Retry-After rather than 404.
        table.loaded = restored or bool(deployments)
    for deployment in deployments or []:
        table.set_active(deployment)
    tls = TlsSettings.from_env()  # FLOWLINE_TLS_*: HTTPS, and mutual TLS (docs/tls.md)
    # The gRPC port (when on) serves with the same certificate and client CA.
    app = create_app(config, table, on_scored, grpc_server_credentials(tls))

    sock = listening_socket(host, port, LISTEN_BACKLOG)
    bound = sock.getsockname()[1]
    runtime = fast_runtime()
    logger.warning(
        "flowline gateway on %s://%s:%d (%s)", scheme(tls), url_host(host), bound, runtime
    )
    if config.coordination_url:
        advertised = config.advertise_url or f"{scheme(tls)}://{url_host(host)}:{bound}"
        app.state.gateway.route_sync = RouteSync(
            table,
            coordination_store(config.coordination_url),
            instance_id(GATEWAY),
            advertised.rstrip("/"),
            config.route_sync_s,
        )
    if port_file is not None:
        write_port_file(port_file, bound)
    # Everything imported and built so far (pandas, numpy, the app: 100k+ objects) lives
    # as long as the process: frozen, the collector stops rescanning it in every full
    # collection, which requests in flight (batched ones, V2's tensors) otherwise trigger.
    gc.collect()
    gc.freeze()
    run_on_socket(
        ScoringFastPath(app, app.state.gateway),
        sock,
        tls,
        log_level=log_level,
        backlog=LISTEN_BACKLOG,
        timeout_keep_alive=30,
        **{**runtime, **bounded_http(config, runtime["http"])},
    )
