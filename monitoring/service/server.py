"""The monitor's HTTP API (Starlette) and how to serve it (uvicorn).

POST /ingest                      captured records from the gateway's capture client
                                  (bearer token: monitoring.capture.token; checks:
                                  monitoring.service.ingest_checks, monitoring.service.stream_gate)
GET  /drift                       every monitored model and its versions' states
GET  /drift/{model}               latest state per version and the window history
GET  /drift/{model}/windows/{id}  one window's full report (JSON)
GET  /reports/{model}/{id}        one window's report (self-contained HTML)
GET  /metrics                     Prometheus metrics
GET  /health                      200 while the store answers
"""

from __future__ import annotations

import contextlib
import html
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from common.servers import listening_socket, run_on_socket, url_host, write_port_file
from monitoring.capture.record import MAX_MODEL_CHARS
from monitoring.capture.token import bearer_matches, monitor_token
from monitoring.service.ingest_checks import IngestRefused
from monitoring.service.monitor import BadIngest, Monitor
from monitoring.service.settings import DEFAULT_HOST, DEFAULT_PORT, MonitorSettings

LISTEN_BACKLOG = 512

logger = logging.getLogger(__name__)

MAX_INGEST_BYTES = 64 * 1024 * 1024


MAX_ROW_ID = 2**63 - 1  # the stores' BIGINT: larger ids cannot exist (and overflow SQLite)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _known_name(name: str) -> bool:
    """Whether a model name from a URL could be stored at all (ingest checks it so)."""
    return 0 < len(name) <= MAX_MODEL_CHARS and name.isprintable()


def create_app(
    monitor: Monitor, manage_threads: bool = True, ingest_token: str | None = None
) -> Starlette:
    """The monitor's Starlette app; its lifespan starts and stops the monitor's threads.

    ``POST /ingest`` needs ``Authorization: Bearer <ingest_token>``; with no
    token it accepts nothing (serve_monitor always passes one).
    """

    # Ingest batches run one at a time: the store writes under one lock anyway, and
    # concurrent batches only add GIL contention (measured: 4 senders ingested 30%
    # fewer rows per CPU-second than 1). Reads keep the shared thread pool.
    ingest_limiter = anyio.CapacityLimiter(1)

    async def ingest(request: Request) -> Response:
        # Checked before the body is read: an unauthenticated sender costs no parsing.
        if not bearer_matches(request.headers.get("authorization"), ingest_token or ""):
            answer = _error(401, "ingest needs the monitor's token: Authorization: Bearer <token>")
            answer.headers["www-authenticate"] = 'Bearer realm="flowline-monitor"'
            return answer
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_INGEST_BYTES:
            return _error(413, f"ingest body larger than {MAX_INGEST_BYTES} bytes")
        # The body is read inside the limit too: senders that wait are held back by
        # TCP flow control instead of by the event loop buffering their batches.
        async with ingest_limiter:
            body = await request.body()
            try:
                result = await anyio.to_thread.run_sync(monitor.ingest_body, body)
            except BadIngest as exc:
                return _error(400, str(exc))
            except IngestRefused as exc:
                return JSONResponse(exc.to_dict(), status_code=exc.status)
        return JSONResponse(result.to_dict())

    async def drift_models(request: Request) -> Response:
        return JSONResponse({"models": await run_in_threadpool(monitor.models)})

    async def drift_model(request: Request) -> Response:
        model = request.path_params["model"]
        try:
            limit = max(1, min(1000, int(request.query_params.get("limit", 100))))
        except ValueError:
            return _error(400, "limit must be an integer")
        version = request.query_params.get("version")
        if not _known_name(model) or (version is not None and not _known_name(version)):
            return _error(404, f"no captured traffic for model {model!r}")
        view = await run_in_threadpool(monitor.drift_view, model, limit, version)
        if view is None:
            return _error(404, f"no captured traffic for model {model!r}")
        return JSONResponse(view)

    async def window_json(request: Request) -> Response:
        model, window_id = request.path_params["model"], request.path_params["window_id"]
        ok = _known_name(model) and 0 < window_id <= MAX_ROW_ID
        doc = await run_in_threadpool(monitor.window_json, model, window_id) if ok else None
        if doc is None:
            return _error(404, f"no window {window_id} for model {model!r}")
        return JSONResponse(doc)

    async def report(request: Request) -> Response:
        model, window_id = request.path_params["model"], request.path_params["window_id"]
        ok = _known_name(model) and 0 < window_id <= MAX_ROW_ID
        page = await run_in_threadpool(monitor.report_html, model, window_id) if ok else None
        if page is None:
            shown = html.escape(model if _known_name(model) else repr(model))
            return HTMLResponse(f"<p>No window {window_id} for model {shown}.</p>", status_code=404)
        return HTMLResponse(page)

    async def index(request: Request) -> Response:
        models = await run_in_threadpool(monitor.models)
        items = "".join(
            f'<li><a href="{html.escape(m["drift_url"])}">{html.escape(m["model"])}</a>: '
            f"{'<b>drift</b>' if m['drifted'] else 'no drift'} "
            f"({', '.join('v' + html.escape(v['version']) for v in m['versions'])})</li>"
            for m in models
        )
        return HTMLResponse(
            "<!DOCTYPE html><html><head><meta charset=utf-8><title>flowline monitor</title>"
            f"</head><body><h1>flowline monitor</h1><ul>{items or '<li>no traffic yet</li>'}"
            "</ul><p><a href=/metrics>metrics</a></p></body></html>"
        )

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(monitor.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _store_ok() -> bool:
        with monitor.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True

    async def health(request: Request) -> Response:
        try:
            await run_in_threadpool(_store_ok)
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "store": type(exc).__name__}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_threads:
            monitor.start()
        try:
            yield
        finally:
            if manage_threads:
                await run_in_threadpool(monitor.stop)

    routes = [
        Route("/", index, methods=["GET"]),
        Route("/ingest", ingest, methods=["POST"]),
        Route("/drift", drift_models, methods=["GET"]),
        Route("/drift/{model}", drift_model, methods=["GET"]),
        Route("/drift/{model}/windows/{window_id:int}", window_json, methods=["GET"]),
        Route("/reports/{model}/{window_id:int}", report, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.monitor = monitor
    return app


def serve_monitor(
    settings: MonitorSettings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    port_file: str | Path | None = None,
    log_level: str = "warning",
) -> None:
    """Serve the monitor until SIGINT/SIGTERM; port 0 binds a free port (written to port_file)."""
    # Process-wide: the *_created series only double the scrape size.
    prometheus_client.disable_created_metrics()
    sock = listening_socket(host, port, LISTEN_BACKLOG)
    bound = sock.getsockname()[1]
    monitor = Monitor(settings, public_url=f"http://{url_host(host)}:{bound}")
    app = create_app(monitor, ingest_token=monitor_token(settings.home))
    store_url = monitor.store.engine.url.render_as_string(hide_password=True)
    logger.warning("flowline monitor on http://%s:%d (store %s)", url_host(host), bound, store_url)
    if port_file is not None:
        write_port_file(port_file, bound)
    try:
        run_on_socket(app, sock, log_level=log_level, timeout_keep_alive=30)
    finally:
        monitor.store.close()
