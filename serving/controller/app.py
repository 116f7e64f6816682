"""The controller process: webhook receiver, status API and the reconcile loop.

``python -m serving.controller`` runs it; `flowline up` starts it with everything else.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from common.registry import CANARY_ALIAS, PRODUCTION_ALIAS, SHADOW_ALIAS
from serving.controller.leadership import Leadership
from serving.controller.reconciler import Reconciler
from serving.controller.webhooks import ALIAS_EVENTS, WebhookRejected, WebhookVerifier

log = logging.getLogger("flowline.controller")
WEBHOOK_NAME = "flowline-controller"
WEBHOOK_PATH = "/webhooks/mlflow"
STALE_INTERVALS = 3


def ensure_webhook(client: MlflowClient, url: str, secret: str) -> str:
    """Register (or repair) the controller's alias webhook in the registry; return its id."""
    for hook in client.list_webhooks():
        if hook.name == WEBHOOK_NAME:
            client.update_webhook(
                hook.webhook_id, url=url, events=list(ALIAS_EVENTS), secret=secret, status="ACTIVE"
            )
            return hook.webhook_id
    hook = client.create_webhook(
        name=WEBHOOK_NAME,
        url=url,
        events=list(ALIAS_EVENTS),
        secret=secret,
        description="flowline: deploy on alias 'production'",
    )
    return hook.webhook_id


@dataclass
class LoopControl:
    """Wakes the reconcile loop early (a webhook arrived) and stops it."""

    wake: threading.Event
    stop: threading.Event


WATCHED_ALIASES = (PRODUCTION_ALIAS, CANARY_ALIAS, SHADOW_ALIAS)


def run_loop(
    reconciler: Reconciler,
    control: LoopControl,
    interval: float,
    leadership: Leadership | None = None,
) -> None:
    """Reconcile every ``interval`` seconds, or at once when woken; only while leading."""
    while not control.stop.is_set():
        try:
            if leadership is None or leadership.act():
                reconciler.reconcile()
        except Exception:  # a failing pass (registry down, say) must not end the loop
            log.exception("reconcile pass failed; retrying in %.0fs", interval)
        control.wake.wait(interval)
        control.wake.clear()


def build_app(
    reconciler: Reconciler,
    verifier: WebhookVerifier,
    interval: float,
    on_start: list | None = None,
    admin_token: str | None = None,
    leadership: Leadership | None = None,
) -> Starlette:
    """The controller's HTTP app; the reconcile loop lives as long as the app.

    With ``leadership`` (several controllers), only the elected one reconciles; the
    others answer /health and /status and wait to take over.
    """
    control = LoopControl(threading.Event(), threading.Event())
    if leadership is not None:
        leadership.wake = control.wake.set  # a new leader's first pass runs at once

    async def reconcile_now(request: Request) -> JSONResponse:
        # Internal: `flowline up` asks for a pass when it restarted the gateway.
        given = request.headers.get("authorization", "")
        expected = f"Bearer {admin_token}"
        if not admin_token or not hmac.compare_digest(given.encode(), expected.encode()):
            return JSONResponse({"error": "admin token required"}, status_code=401)
        control.wake.set()
        return JSONResponse({"reconcile": "scheduled"}, status_code=202)

    async def webhook(request: Request) -> JSONResponse:
        body = await request.body()
        try:
            verifier.verify({k.lower(): v for k, v in request.headers.items()}, body)
            event = json.loads(body)
        except WebhookRejected as exc:
            log.warning("rejected webhook delivery: %s", exc.reason)
            return JSONResponse({"error": exc.reason}, status_code=exc.status)
        except ValueError:
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        name = f"{event.get('entity')}.{event.get('action')}"
        data = event.get("data") or {}
        log.info("webhook %s %s", name, {k: data.get(k) for k in ("name", "alias", "version")})
        # A canary or shadow alias is desired state too; setting it again retries a
        # version that failed in that role, as for production.
        if name in ALIAS_EVENTS and data.get("alias") in WATCHED_ALIASES:
            if name.endswith(".created") and data.get("name") and data.get("version"):
                reconciler.retry(str(data["name"]), str(data["version"]))
            control.wake.set()
        return JSONResponse({"accepted": name})

    async def status(_: Request) -> JSONResponse:
        shown = reconciler.status()
        if leadership is not None:
            shown["leadership"] = leadership.describe()
        return JSONResponse(shown)

    started = time.time()

    async def health(_: Request) -> JSONResponse:
        # Unhealthy once no pass has succeeded for STALE_INTERVALS intervals (a registry
        # outage, a stuck loop): liveness alone would say ok while nothing converges.
        age = time.time() - (reconciler.fresh_since() or started)
        body = {"last_reconcile": reconciler.last_pass, "seconds_since_success": round(age, 1)}
        if leadership is not None and not leadership.active:
            # A follower is healthy while its election rounds run: it has nothing to pass.
            age = time.time() - (leadership.election.last_check or started)
            body = {"role": "follower", "seconds_since_election": round(age, 1)}
        if age > STALE_INTERVALS * interval:
            reason = f"no successful reconcile pass for {age:.0f}s"
            return JSONResponse({"status": "unhealthy", "reason": reason, **body}, 503)
        return JSONResponse({"status": "ok", **body})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        for hook in on_start or []:
            hook()
        if leadership is not None:
            leadership.election.start()
        thread = threading.Thread(
            target=run_loop,
            args=(reconciler, control, interval, leadership),
            name="reconcile",
            daemon=True,
        )
        thread.start()
        try:
            yield
        finally:
            control.stop.set()
            control.wake.set()
            thread.join(timeout=60)
            if leadership is None:
                reconciler.stop_all()
            else:
                leadership.step_down()

    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, webhook, methods=["POST"]),
            Route("/reconcile", reconcile_now, methods=["POST"]),
            Route("/status", status, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def register_webhook_safely(client: MlflowClient, url: str, secret: str) -> None:
    """Register the webhook, or explain why promotion will wait for the reconcile loop."""
    try:
        ensure_webhook(client, url, secret)
        log.info("registry webhook -> %s", url)
    except MlflowException as exc:
        log.warning(
            "could not register the registry webhook (%s); the reconcile loop still "
            "deploys promotions, within its interval",
            str(exc).splitlines()[0],
        )
