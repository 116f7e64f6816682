"""``python -m serving.controller``: run the deployment controller (settings from FLOWLINE_*)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import uvicorn
from mlflow import MlflowClient

from common.processes import PRIVATE_UMASK
from common.secrets import persistent_secret
from serving.backends.base import BackendError
from serving.backends.factory import BACKENDS, create_backend
from serving.backends.ports import PortPool
from serving.backends.router import BACKEND_MODEL_TAG, BackendRouter
from serving.controller.app import (
    WEBHOOK_PATH,
    build_app,
    env_float,
    register_webhook_safely,
)
from serving.controller.gateway_client import GatewayClient
from serving.controller.reconciler import Reconciler
from serving.controller.webhooks import WebhookVerifier


def main() -> None:
    """Parse options, wire the backend, gateway client and loop, and serve."""
    parser = argparse.ArgumentParser(description="flowline deployment controller")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("FLOWLINE_CONTROLLER_PORT", 8081))
    )
    parser.add_argument(
        "--gateway-url", default=os.environ.get("FLOWLINE_GATEWAY_URL", "http://127.0.0.1:8080")
    )
    parser.add_argument("--home", default=os.environ.get("FLOWLINE_HOME", ".flowline"))
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("FLOWLINE_REPLICAS", 1)))
    parser.add_argument(
        "--replica-port-from",
        type=int,
        default=int(os.environ.get("FLOWLINE_REPLICA_PORT_FROM", 9000)),
    )
    parser.add_argument("--env-manager", default=os.environ.get("FLOWLINE_ENV_MANAGER", "local"))
    parser.add_argument(
        "--backend", choices=BACKENDS, default=os.environ.get("FLOWLINE_BACKEND", "local")
    )
    parser.add_argument(
        "--interval", type=float, default=env_float("FLOWLINE_RECONCILE_INTERVAL_S", 5.0)
    )
    args = parser.parse_args()
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    if not loopback and os.environ.get("FLOWLINE_AUTH") != "1":
        # Its webhook and reconcile endpoints change what is served: loopback unless the
        # registry it follows has auth (flowline up --auth sets FLOWLINE_AUTH=1).
        parser.exit(2, f"flowline: error: the controller binds {args.host} only with auth\n")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # The loop retries every interval: MLflow's own retries (minutes, by default) would
    # hold a pass, and the controller's health, hostage to a tracking-server outage.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # A log file is no terminal: progress bars of every download would fill it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.umask(PRIVATE_UMASK)  # pid files, logs and the replay guard: 0600, also run alone
    home = Path(args.home).resolve()
    tracking_uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri, tracking_uri)
    ports = PortPool("127.0.0.1", args.replica_port_from)
    try:
        backend = BackendRouter(
            args.backend,
            lambda kind: create_backend(kind, tracking_uri, home, ports, args.env_manager),
            lambda model: client.get_registered_model(model).tags.get(BACKEND_MODEL_TAG),
        )
    except BackendError as exc:
        parser.exit(2, f"flowline: error: {exc}\n")
    admin_token = os.environ.get("FLOWLINE_ADMIN_TOKEN") or persistent_secret(home / "admin-token")
    reconciler = Reconciler(
        client, backend, GatewayClient(args.gateway_url, admin_token), replicas=args.replicas
    )
    secret = persistent_secret(home / "webhook-secret")
    url = f"http://{args.host}:{args.port}{WEBHOOK_PATH}"
    app = build_app(
        reconciler,
        WebhookVerifier(secret, seen_path=home / "webhook-deliveries.db"),
        args.interval,
        on_start=[
            lambda: reconciler.adopt(backend.adopt_running()),
            lambda: register_webhook_safely(client, url, secret),
        ],
        admin_token=admin_token,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
