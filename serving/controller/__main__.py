"""``python -m serving.controller``: run the deployment controller (settings from FLOWLINE_*)."""

from __future__ import annotations

import argparse
import logging
import os
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BeforeValidator, Field
from sqlalchemy.exc import SQLAlchemyError

from common.processes import PRIVATE_UMASK
from common.secrets import persistent_secret
from common.servers import listening_socket, run_on_socket, url_host
from common.settings import (
    DEFAULT_HOME,
    CommaList,
    EnvFloat,
    EnvInt,
    FlowlineBaseSettings,
    OptionalStr,
    Port,
)
from common.tls import TlsSettings, client_tls, scheme
from serving.backends.base import BackendError
from serving.backends.factory import BACKENDS, create_backend
from serving.backends.ports import PortPool
from serving.backends.router import BACKEND_MODEL_TAG, BackendRouter
from serving.controller.analysis import CanaryAnalyst, http_sources
from serving.controller.app import WEBHOOK_PATH, build_app, register_webhook_safely
from serving.controller.gateway_client import GatewayClient
from serving.controller.gateway_fleet import GatewayFleet
from serving.controller.leader import Election, Elector, sql_elector
from serving.controller.leadership import Leadership
from serving.controller.reconciler import Reconciler
from serving.controller.webhooks import WebhookVerifier
from serving.coordination import CONTROLLER, CoordinationStore, instance_id

LISTEN_BACKLOG = 2048  # uvicorn's own default, what the controller had when uvicorn bound


def _exactly_one(value: Any) -> Any:
    # Auth counts as on only for "1", as `flowline up --auth` sets it; "true" is off.
    return value == "1" if isinstance(value, str) else value


class ControllerSettings(FlowlineBaseSettings):
    """The controller's variables; its command-line options, where given, override them.

    FLOWLINE_HOME is taken as given (made absolute, '~' not expanded), as --home is.
    """

    controller_port: Port = 8081
    gateway_url: str = "http://127.0.0.1:8080"
    home: str = DEFAULT_HOME
    replicas: EnvInt = 1
    replica_port_from: Port = 9000
    env_manager: str = "local"
    backend: str = "local"
    reconcile_interval_s: EnvFloat = 5.0
    auth: Annotated[bool, BeforeValidator(_exactly_one)] = False
    admin_token: OptionalStr = None
    tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    # The canary analysis reads the monitor's drift and performance views and posts its
    # rollbacks where the monitor posts its alerts.
    monitor_url: str = ""
    alert_webhooks: CommaList = ()
    # Several controllers: the shared database (serving/coordination.py) and how they
    # elect one: "auto" (the database's lock when it is set, else none), "kubernetes"
    # (a coordination.k8s.io Lease) or "none" (this one always acts).
    coordination_url: OptionalStr = None
    leader_election: str = "auto"
    advertise_url: OptionalStr = None


def _parser(env: ControllerSettings) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m serving.controller", description="flowline deployment controller"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=env.controller_port)
    parser.add_argument("--gateway-url", default=env.gateway_url)
    parser.add_argument("--home", default=env.home)
    parser.add_argument("--replicas", type=int, default=env.replicas)
    parser.add_argument("--replica-port-from", type=int, default=env.replica_port_from)
    parser.add_argument("--env-manager", default=env.env_manager)
    parser.add_argument("--backend", choices=BACKENDS, default=env.backend)
    parser.add_argument("--interval", type=float, default=env.reconcile_interval_s)
    return parser


def _fail(message: str) -> NoReturn:
    """One line on stderr and exit status 2, as the gateway and the monitor stop."""
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"flowline: error: {first_line}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    """Parse options, wire the backend, gateway client and loop, and serve.

    Anything that stops it before serving (a bad setting, no MLFLOW_TRACKING_URI, an
    unknown backend, a home it cannot write, a taken port) is one line on stderr and
    exit status 2, not a traceback.
    """
    try:
        env = ControllerSettings.from_env()
        tls = TlsSettings.from_env()  # its own server and its calls to the gateway
    except ValueError as exc:
        _fail(f"the controller cannot start: {exc}")
    args = _parser(env).parse_args(argv)
    loopback = args.host in ("127.0.0.1", "localhost", "::1") or args.host.startswith("127.")
    if not loopback and not env.auth:
        # Its webhook and reconcile endpoints change what is served: loopback unless the
        # registry it follows has auth (flowline up --auth sets FLOWLINE_AUTH=1).
        _fail(f"the controller binds {args.host} only with auth")
    if env.tracking_uri is None:
        _fail("the controller cannot start: MLFLOW_TRACKING_URI is not set (the registry)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    # The loop retries every interval: MLflow's own retries (minutes, by default) would
    # hold a pass, and the controller's health, hostage to a tracking-server outage.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    # A log file is no terminal: progress bars of every download would fill it.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.umask(PRIVATE_UMASK)  # pid files, logs and the replay guard: 0600, also run alone
    try:
        # Bound before anything starts: with the port taken, no replica is adopted (and
        # then stopped again on the way out) and no webhook is pointed at this process.
        sock = listening_socket(args.host, args.port, LISTEN_BACKLOG)
        app = _build(args, env, env.tracking_uri, tls, sock.getsockname()[1])
    except BackendError as exc:
        _fail(str(exc))
    except (
        OSError,
        OverflowError,
        ValueError,
        MlflowException,
        sqlite3.Error,
        SQLAlchemyError,
    ) as exc:
        _fail(f"the controller cannot start: {exc}")
    run_on_socket(app, sock, tls, log_level="warning")


def _build(
    args: argparse.Namespace,
    env: ControllerSettings,
    tracking_uri: str,
    tls: TlsSettings,
    port: int,
) -> Any:
    """The controller's app: backend, reconciler, gateway client and webhook verifier."""
    home = Path(args.home).resolve()
    client = MlflowClient(tracking_uri, tracking_uri)
    ports = PortPool("127.0.0.1", args.replica_port_from)
    backend = BackendRouter(
        args.backend,
        lambda kind: create_backend(kind, tracking_uri, home, ports, args.env_manager),
        lambda model: client.get_registered_model(model).tags.get(BACKEND_MODEL_TAG),
    )
    admin_token = env.admin_token or persistent_secret(home / "admin-token")
    verify, cert = client_tls(tls)
    store = CoordinationStore(env.coordination_url) if env.coordination_url else None
    fleet = None
    gateway: GatewayClient | GatewayFleet
    if store is None:
        gateway = GatewayClient(args.gateway_url, admin_token, verify=verify, cert=cert)
    else:
        gateway = fleet = GatewayFleet(
            store, lambda url: GatewayClient(url, admin_token, verify=verify, cert=cert)
        )
    sources = http_sources(
        gateway,
        # FLOWLINE_MONITOR_URL may list several monitors (they share one store): any
        # of them answers the same drift and performance views.
        next((u.strip().rstrip("/") for u in env.monitor_url.split(",") if u.strip()), None),
        tuple(env.alert_webhooks),
        {"verify": verify, "cert": cert},
    )
    analyst = CanaryAnalyst(client, sources)
    reconciler = Reconciler(client, backend, gateway, replicas=args.replicas, analyst=analyst)
    secret = persistent_secret(home / "webhook-secret")
    # Under TLS the registry is told the https URL. MLflow's webhook sender verifies
    # it against its own (certifi) store and presents no client certificate, so with
    # a private CA or mutual TLS deliveries fail and the reconcile loop deploys
    # promotions within its interval instead (docs/tls.md).
    base = env.advertise_url or f"{scheme(tls)}://{url_host(args.host)}:{port}"
    url = f"{base.rstrip('/')}{WEBHOOK_PATH}"
    verifier = WebhookVerifier(secret, seen_path=home / "webhook-deliveries.db")
    elector = make_elector(env.leader_election, store, args.interval)
    if elector is None:
        return build_app(
            reconciler,
            verifier,
            args.interval,
            on_start=[
                lambda: reconciler.adopt(backend.adopt_running()),
                lambda: register_webhook_safely(client, url, secret),
            ],
            admin_token=admin_token,
        )
    # A quarter interval between rounds: a dead leader's lock is taken well within 2.
    election = Election(elector, poll_s=max(0.2, min(1.0, args.interval / 4)))
    leadership = Leadership(
        election,
        reconciler,
        backend,
        store=store,
        fleet=fleet,
        url=base,
        on_elected=[lambda: register_webhook_safely(client, url, secret)],
    )
    return build_app(
        reconciler, verifier, args.interval, admin_token=admin_token, leadership=leadership
    )


def make_elector(kind: str, store: CoordinationStore | None, interval: float) -> Elector | None:
    """The elector ``FLOWLINE_LEADER_ELECTION`` names; None for a lone controller."""
    if kind == "none" or (kind == "auto" and store is None):
        return None
    identity = instance_id(CONTROLLER)
    if kind == "kubernetes":
        from serving.controller.leader_k8s import KubernetesLeaseElector

        return KubernetesLeaseElector.in_cluster(identity, ttl_s=interval)
    if kind not in ("auto", "sql"):
        raise ValueError(f"FLOWLINE_LEADER_ELECTION must be auto, sql, kubernetes or none: {kind}")
    if store is None:
        raise ValueError("FLOWLINE_LEADER_ELECTION=sql needs FLOWLINE_COORDINATION_URL")
    return sql_elector(store, identity, interval)


if __name__ == "__main__":
    main()
