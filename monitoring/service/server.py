"""The monitor's HTTP API (Starlette) and how to serve it (uvicorn).

POST /ingest                      captured records from the gateway's capture client
                                  (bearer token: monitoring.capture.token; checks:
                                  monitoring.service.ingest_checks, monitoring.service.stream_gate)
POST /feedback/{model}            ground-truth labels, JSON or CSV (bearer token:
                                  monitoring.service.feedback.feedback_token)
GET  /performance/{model}         realized and estimated performance per version and window
GET  /drift                       every monitored model and its versions' states
GET  /drift/{model}               latest state per version and the window history
GET  /drift/{model}/windows/{id}  one window's full report (JSON)
GET  /reports/{model}/{id}        one window's report (self-contained HTML)
GET  /metrics                     Prometheus metrics
GET  /health                      200 while the store answers
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import prometheus_client
from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import Lifespan

from common.servers import listening_socket, run_on_socket, url_host, write_port_file
from common.tls import TlsSettings, scheme
from monitoring.capture.record import MAX_MODEL_CHARS
from monitoring.capture.token import bearer_matches, monitor_token
from monitoring.service.feedback import BadFeedback, WrongLabels, feedback_token
from monitoring.service.ingest_checks import IngestRefused
from monitoring.service.monitor import BadIngest, Monitor
from monitoring.service.settings import DEFAULT_HOST, DEFAULT_PORT, MonitorSettings

LISTEN_BACKLOG = 512

logger = logging.getLogger(__name__)

MAX_INGEST_BYTES = 64 * 1024 * 1024


MAX_ROW_ID = 2**63 - 1  # the stores' BIGINT: larger ids cannot exist (and overflow SQLite)


# Only the index page and the missing-report page; the reports come rendered from the drift
# package (monitoring.drift.report_html).
_TEMPLATES = Environment(loader=PackageLoader("monitoring.service"), autoescape=select_autoescape())


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _known_name(name: str) -> bool:
    """Whether a model name from a URL could be stored at all (ingest checks it so)."""
    return 0 < len(name) <= MAX_MODEL_CHARS and name.isprintable()


class MonitorEndpoints:
    """The monitor's HTTP handlers: one async method per route, each callable alone.

    ``POST /ingest`` needs ``Authorization: Bearer <ingest_token>``; with no
    token it accepts nothing (serve_monitor always passes one). The store work
    runs in worker threads, off the event loop.
    """

    def __init__(
        self, monitor: Monitor, ingest_token: str | None = None, feedback_token: str | None = None
    ) -> None:
        self.monitor = monitor
        self._ingest_token = ingest_token or ""
        self._feedback_token = feedback_token or ""
        # Ingest batches run one at a time: the store writes under one lock anyway, and
        # concurrent batches only add GIL contention (measured: 4 senders ingested 30%
        # fewer rows per CPU-second than 1). Reads keep the shared thread pool.
        self._ingest_limiter = anyio.CapacityLimiter(1)

    async def index(self, request: Request) -> Response:
        """GET /: a small HTML page listing the monitored models."""
        models = await run_in_threadpool(self.monitor.models)
        return HTMLResponse(_TEMPLATES.get_template("index.html").render(models=models))

    async def ingest(self, request: Request) -> Response:
        """POST /ingest: store a batch of capture records whole, or refuse it whole."""
        # Checked before the body is read: an unauthenticated sender costs no parsing.
        if not bearer_matches(request.headers.get("authorization"), self._ingest_token):
            answer = _error(401, "ingest needs the monitor's token: Authorization: Bearer <token>")
            answer.headers["www-authenticate"] = 'Bearer realm="flowline-monitor"'
            return answer
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_INGEST_BYTES:
            return _error(413, f"ingest body larger than {MAX_INGEST_BYTES} bytes")
        # The body is read inside the limit too: senders that wait are held back by
        # TCP flow control instead of by the event loop buffering their batches.
        async with self._ingest_limiter:
            body = await request.body()
            try:
                result = await anyio.to_thread.run_sync(self.monitor.ingest_body, body)
            except BadIngest as exc:
                return _error(400, str(exc))
            except IngestRefused as exc:
                return JSONResponse(exc.to_dict(), status_code=exc.status)
        return JSONResponse(result.to_dict())

    async def feedback(self, request: Request) -> Response:
        """POST /feedback/{model}: store labels of captured requests (idempotent)."""
        if not bearer_matches(request.headers.get("authorization"), self._feedback_token):
            answer = _error(
                401, "feedback needs the monitor's feedback token: Authorization: Bearer <token>"
            )
            answer.headers["www-authenticate"] = 'Bearer realm="flowline-monitor"'
            return answer
        model = request.path_params["model"]
        if not _known_name(model):
            return _error(400, "the model name must be 1 to 255 printable characters")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_INGEST_BYTES:
            return _error(413, f"feedback body larger than {MAX_INGEST_BYTES} bytes")
        body = await request.body()
        content_type = request.headers.get("content-type")
        async with self._ingest_limiter:
            try:
                result = await anyio.to_thread.run_sync(
                    self.monitor.feedback_body, model, body, content_type
                )
            except BadFeedback as exc:
                return _error(400, str(exc))
            except WrongLabels as exc:
                return _error(422, str(exc))
        return JSONResponse(result.to_dict())

    async def performance(self, request: Request) -> Response:
        """GET /performance/{model}: realized and estimated performance per version."""
        model = request.path_params["model"]
        view = (
            await run_in_threadpool(self.monitor.performance_view, model)
            if _known_name(model)
            else None
        )
        if view is None:
            return _error(404, f"no labels and no captured traffic for model {model!r}")
        return JSONResponse(view)

    async def drift_models(self, request: Request) -> Response:
        """GET /drift: every monitored model and its versions' states."""
        return JSONResponse({"models": await run_in_threadpool(self.monitor.models)})

    async def drift_model(self, request: Request) -> Response:
        """GET /drift/{model}: the state per version and the window history (?limit, ?version)."""
        model = request.path_params["model"]
        try:
            limit = max(1, min(1000, int(request.query_params.get("limit", 100))))
        except ValueError:
            return _error(400, "limit must be an integer")
        version = request.query_params.get("version")
        if not _known_name(model) or (version is not None and not _known_name(version)):
            return _error(404, f"no captured traffic for model {model!r}")
        view = await run_in_threadpool(self.monitor.drift_view, model, limit, version)
        if view is None:
            return _error(404, f"no captured traffic for model {model!r}")
        return JSONResponse(view)

    async def window_json(self, request: Request) -> Response:
        """GET /drift/{model}/windows/{window_id}: one window's full report (JSON)."""
        model, window_id = request.path_params["model"], request.path_params["window_id"]
        ok = _known_name(model) and 0 < window_id <= MAX_ROW_ID
        doc = await run_in_threadpool(self.monitor.window_json, model, window_id) if ok else None
        if doc is None:
            return _error(404, f"no window {window_id} for model {model!r}")
        return JSONResponse(doc)

    async def report(self, request: Request) -> Response:
        """GET /reports/{model}/{window_id}: one window's self-contained HTML report."""
        model, window_id = request.path_params["model"], request.path_params["window_id"]
        ok = _known_name(model) and 0 < window_id <= MAX_ROW_ID
        page = await run_in_threadpool(self.monitor.report_html, model, window_id) if ok else None
        if page is None:
            missing = _TEMPLATES.get_template("missing_report.html").render(
                window_id=window_id, model=model if _known_name(model) else repr(model)
            )
            return HTMLResponse(missing, status_code=404)
        return HTMLResponse(page)

    async def metrics(self, request: Request) -> Response:
        """GET /metrics: the monitor's Prometheus metrics."""
        registry = self.monitor.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def health(self, request: Request) -> Response:
        """GET /health: 200 while the store answers a query, else 503 naming the error."""
        try:
            await run_in_threadpool(self._store_ok)
        except Exception as exc:
            return JSONResponse(
                {"status": "unavailable", "store": type(exc).__name__}, status_code=503
            )
        return JSONResponse({"status": "ok"})

    def _store_ok(self) -> bool:
        with self.monitor.store.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True


def _lifespan(monitor: Monitor, manage_threads: bool) -> Lifespan[Starlette]:
    """Start the monitor's threads with the app and stop them (off the loop) after it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if manage_threads:
            monitor.start()
        try:
            yield
        finally:
            if manage_threads:
                await run_in_threadpool(monitor.stop)

    return lifespan


def create_app(
    monitor: Monitor,
    manage_threads: bool = True,
    ingest_token: str | None = None,
    feedback_token: str | None = None,
) -> Starlette:
    """The monitor's Starlette app (routes: the module docstring; handlers: MonitorEndpoints).

    Its lifespan starts and stops the monitor's threads unless ``manage_threads``
    is False; ``ingest_token`` is the bearer token POST /ingest requires, and
    ``feedback_token`` the one POST /feedback requires (without one, neither accepts).
    """
    api = MonitorEndpoints(monitor, ingest_token, feedback_token)
    routes = [
        Route("/", api.index, methods=["GET"]),
        Route("/ingest", api.ingest, methods=["POST"]),
        Route("/feedback/{model}", api.feedback, methods=["POST"]),
        Route("/performance/{model}", api.performance, methods=["GET"]),
        Route("/drift", api.drift_models, methods=["GET"]),
        Route("/drift/{model}", api.drift_model, methods=["GET"]),
        Route("/drift/{model}/windows/{window_id:int}", api.window_json, methods=["GET"]),
        Route("/reports/{model}/{window_id:int}", api.report, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=_lifespan(monitor, manage_threads))
    app.state.monitor = monitor
    return app


def serve_monitor(
    settings: MonitorSettings,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    port_file: str | Path | None = None,
    log_level: str = "warning",
    tls: TlsSettings | None = None,
) -> None:
    """Serve the monitor until SIGINT/SIGTERM; port 0 binds a free port (written to port_file).

    ``tls`` (default: FLOWLINE_TLS_* from the environment) with a certificate serves
    HTTPS only, with a client CA mutual TLS (docs/tls.md); a bad setting is a
    SettingsError before the socket is bound.
    """
    tls = tls if tls is not None else TlsSettings.from_env()
    # Process-wide: the *_created series only double the scrape size.
    prometheus_client.disable_created_metrics()
    sock = listening_socket(host, port, LISTEN_BACKLOG)
    bound = sock.getsockname()[1]
    base_url = f"{scheme(tls)}://{url_host(host)}:{bound}"
    monitor = Monitor(settings, public_url=base_url)
    app = create_app(
        monitor,
        ingest_token=monitor_token(settings.home),
        feedback_token=feedback_token(settings.home),
    )
    store_url = monitor.store.engine.url.render_as_string(hide_password=True)
    logger.warning("flowline monitor on %s (store %s)", base_url, store_url)
    if port_file is not None:
        write_port_file(port_file, bound)
    try:
        run_on_socket(app, sock, tls, log_level=log_level, timeout_keep_alive=30)
    finally:
        monitor.store.close()
