"""`flowline up`: tracking server, drift monitor, gateway and controller as one group."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from sqlalchemy.exc import SQLAlchemyError

from common.processes import (
    PRIVATE_UMASK,
    ManagedProcess,
    option_args,
    port_in_use,
    venv_first_path,
)
from common.secrets import persistent_secret
from common.tls import TlsSettings, client_tls, scheme
from flowline.auth import Auth
from flowline.config import PlatformSettings, Ports, make_private
from flowline.supervisor import healthy
from flowline.tracking import TrackingServer
from serving.coordination import CoordinationStore, default_coordination_url
from serving.gateway.config import ROUTES_FILE

START_TIMEOUT_SECONDS = 120.0
MAX_INSTANCES = 8
INSTANCE_PORT_STEP = 10
# The FLOWLINE_TLS_* variables each role gets from `Platform.tls` (docs/tls.md).
TLS_ENV = {
    "FLOWLINE_TLS_CERT": "tls_cert",
    "FLOWLINE_TLS_KEY": "tls_key",
    "FLOWLINE_TLS_CA": "tls_ca",
    "FLOWLINE_TLS_CLIENT_CA": "tls_client_ca",
}


@dataclass
class Platform:
    """Every role on one machine, started in dependency order and stopped in reverse."""

    home: Path
    ports: Ports = field(default_factory=Ports)
    host: str = "127.0.0.1"
    backend_store_uri: str = ""
    replicas: int = 1
    auth: bool = False
    backend: str = field(default_factory=lambda: PlatformSettings.from_env().backend)
    reconcile_interval: float = field(
        default_factory=lambda: PlatformSettings.from_env().reconcile_interval_s
    )
    # The gateway, monitor and controller serve HTTPS when it has a certificate (and
    # require client certificates with a client CA); the tracking server and the
    # replicas stay plain HTTP on loopback. Default: FLOWLINE_TLS_* (off when unset).
    tls: TlsSettings = field(default_factory=TlsSettings.from_env)
    # Instances per role (docs/scaling.md): gateways converge routes from the shared
    # coordination database, one controller leads, monitors share a PostgreSQL store.
    gateways: int = 1
    controllers: int = 1
    monitors: int = 1
    monitor_db: str = field(default_factory=lambda: os.environ.get("FLOWLINE_MONITOR_DB", ""))
    processes: list[tuple[str, ManagedProcess]] = field(default_factory=list)
    # Each role's command line and health URL, so a supervisor can start it again.
    _roles: dict[str, tuple[list[str], str]] = field(default_factory=dict, repr=False)
    # Each role instance's own variables (its route file, capture spool, ports).
    _role_env: dict[str, dict[str, str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for role in ("gateways", "controllers", "monitors"):
            if not 1 <= getattr(self, role) <= MAX_INSTANCES:
                raise ValueError(f"--{role} must be between 1 and {MAX_INSTANCES}")
        if self.monitors > 1 and not self.shared_monitor_db():
            raise ValueError(
                "more than one monitor needs one PostgreSQL store they share: set "
                "FLOWLINE_MONITOR_DB=postgresql://... (or run the tracking server on PostgreSQL)"
            )

    def shared_monitor_db(self) -> str:
        """The monitor store several monitors share: FLOWLINE_MONITOR_DB, else the
        tracking server's PostgreSQL; empty when neither is PostgreSQL."""
        for url in (self.monitor_db, self.backend_store_uri):
            if url.startswith(("postgresql", "postgres:")):
                return url
        return ""

    @property
    def coordination_url(self) -> str:
        """Where controllers elect a leader and publish routes for the gateways."""
        return default_coordination_url(self.home, self.backend_store_uri)

    @staticmethod
    def instance(role: str, index: int) -> str:
        """The name of instance ``index`` (0-based) of ``role``: gateway, gateway-2, ..."""
        return role if index == 0 else f"{role}-{index + 1}"

    @staticmethod
    def instance_port(base: int, index: int) -> int:
        """Instance ``index`` of a role listens ``10 * index`` above the role's port."""
        return base + INSTANCE_PORT_STEP * index

    def gateway_urls(self) -> list[str]:
        """Every gateway's base URL."""
        return [self.url(self.instance_port(self.ports.gateway, i)) for i in range(self.gateways)]

    def controller_urls(self) -> list[str]:
        """Every controller's base URL."""
        return [
            self.url(self.instance_port(self.ports.controller, i)) for i in range(self.controllers)
        ]

    def monitor_urls(self) -> list[str]:
        """Every monitor's base URL."""
        return [self.url(self.instance_port(self.ports.monitor, i)) for i in range(self.monitors)]

    @property
    def tracking(self) -> TrackingServer:
        """The tracking server's settings."""
        return TrackingServer(
            home=self.home,
            host=self.host,
            port=self.ports.tracking,
            backend_store_uri=self.backend_store_uri,
            auth=self.auth,
        )

    def url(self, port: int) -> str:
        """The base URL of the role on ``port``: https when TLS is on."""
        return f"{scheme(self.tls)}://{self.host}:{port}"

    def urls(self) -> dict[str, str]:
        """Every URL a user needs (extra instances of a role under their own names)."""
        shown = {
            "tracking server and UI": self.tracking.url,
            "gateway (POST /invocations)": self.url(self.ports.gateway),
            "controller (GET /status)": self.url(self.ports.controller),
            "drift monitor (GET /drift)": self.url(self.ports.monitor),
        }
        for role, urls in (
            ("gateway", self.gateway_urls()),
            ("controller", self.controller_urls()),
            ("drift monitor", self.monitor_urls()),
        ):
            for index, url in enumerate(urls[1:], start=2):
                shown[f"{role} {index}"] = url
        return {**shown, **self._grpc_url()}

    def _grpc_url(self) -> dict[str, str]:
        # The gateway reads FLOWLINE_GRPC_PORT itself (it inherits this environment).
        port = os.environ.get("FLOWLINE_GRPC_PORT", "").strip()
        if not port or port == "0":
            return {}
        return {"gateway gRPC (Open Inference Protocol)": f"{self.host}:{port}"}

    def _env(self) -> dict[str, str]:
        env = dict(
            os.environ,
            MLFLOW_TRACKING_URI=self.tracking.url,
            FLOWLINE_HOME=str(self.home),
            FLOWLINE_ADMIN_TOKEN=persistent_secret(self.home / "admin-token"),
            FLOWLINE_GATEWAY_URL=self.url(self.ports.gateway),
            FLOWLINE_MONITOR_URL=",".join(self.monitor_urls()),
            FLOWLINE_COORDINATION_URL=self.coordination_url,
            PATH=venv_first_path(os.environ.get("PATH", "")),
            PYTHONUNBUFFERED="1",
            **(dict(Auth(self.home).service_env(), FLOWLINE_AUTH="1") if self.auth else {}),
        )
        if self.monitors > 1:
            env["FLOWLINE_MONITOR_DB"] = self.shared_monitor_db()
        # Every role serves and calls the others exactly as this process checks them:
        # the platform's TLS settings, not whatever FLOWLINE_TLS_* it inherited.
        for name, attribute in TLS_ENV.items():
            value = getattr(self.tls, attribute)
            if value is None:
                env.pop(name, None)
            else:
                env[name] = str(value)
        return env

    def wait_healthy(self, process: ManagedProcess, url: str) -> None:
        """Wait until role ``process`` answers 200 at ``url``; raise if it dies or time runs out."""
        if not self.tls.enabled:
            process.wait_healthy(url, START_TIMEOUT_SECONDS)
            return
        # ManagedProcess.wait_healthy trusts the system store and has no client
        # certificate: an https role is checked here, as the roles reach each other.
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not healthy(url, self.tls, timeout=2.0):
            if not process.alive():
                raise RuntimeError(f"{process.argv[0]} exited: {process.tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy after {START_TIMEOUT_SECONDS:.0f}s")
            time.sleep(0.2)

    def _spawn(self, name: str, argv: list[str], health: str) -> None:
        self._roles[name] = (argv, health)
        process = self._launch(name)
        self.processes.append((name, process))
        self.wait_healthy(process, health)

    def _launch(self, name: str) -> ManagedProcess:
        """Start role ``name`` from its recorded command line, without waiting for it."""
        if name == "tracking":
            process = self.tracking.process(self.home / "logs" / "tracking.log")
        else:
            argv, _ = self._roles[name]
            env = {**self._env(), **self._role_env.get(name, {})}
            process = ManagedProcess(argv, env=env, log_path=self.home / "logs" / f"{name}.log")
        process.umask = PRIVATE_UMASK  # what the roles and their replicas create is private
        process.start()
        self._write_pidfile(name, process.pid)
        return process

    def _pidfile(self, name: str) -> Path:
        return self.home / "pids" / f"{name}.pid"

    def _write_pidfile(self, name: str, pid: int) -> None:
        # Pid files say which process is which role, for operators and crash tests.
        self._pidfile(name).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self._pidfile(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(f"{pid}\n")

    def health_url(self, name: str) -> str:
        """The URL that answers 200 once role ``name`` is ready."""
        if name == "tracking":
            return f"{self.tracking.url}/health"
        return self._roles[name][1]

    def respawn(self, name: str) -> ManagedProcess:
        """Replace role ``name``'s exited process with a new one; do not wait for it.

        What is left of the old process group (a dead server's orphaned workers still
        holding its port) is stopped first.
        """
        index = next(i for i, (role, _) in enumerate(self.processes) if role == name)
        self.processes[index][1].stop(grace=5.0)
        process = self._launch(name)
        # Same place in the list: stop() still runs in reverse dependency order.
        self.processes[index] = (name, process)
        return process

    def wake_controller(self) -> None:
        """Ask the controllers for a reconcile pass now (the leader's pushes reach a new
        gateway at once; it also syncs the published routes by itself)."""
        verify, cert = client_tls(self.tls)
        token = persistent_secret(self.home / "admin-token")
        for url in self.controller_urls():
            try:
                requests.post(
                    f"{url}/reconcile",
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=2,
                    verify=verify,
                    cert=cert,
                )
            except requests.RequestException:
                pass  # the periodic pass restores the routes within its interval anyway

    def busy_ports(self) -> list[int]:
        """Configured ports something else already listens on."""
        wanted = [
            self.ports.tracking,
            *(self.instance_port(self.ports.gateway, i) for i in range(self.gateways)),
            *(self.instance_port(self.ports.controller, i) for i in range(self.controllers)),
            *(self.instance_port(self.ports.monitor, i) for i in range(self.monitors)),
        ]
        return [port for port in wanted if port_in_use(port, self.host)]

    def start(self) -> None:
        """Start everything; on any failure stop what was started and re-raise."""
        make_private(self.home, set_umask=False)
        # A cold start: the routes a gateway saved point at replicas of the last run, which
        # are gone. The controller pushes the live ones; a gateway restarted alone (below,
        # by the supervisor) keeps its file and serves on at once.
        for index in range(self.gateways):
            self._routes_file(index).unlink(missing_ok=True)
        python = sys.executable
        try:
            self._forget_published_routes()
            tracking = self._launch("tracking")
            self.processes.append(("tracking", tracking))
            self._define_monitors(python)
            self._define_gateways(python)
            monitors = [self.instance("monitor", i) for i in range(self.monitors)]
            gateways = [self.instance("gateway", i) for i in range(self.gateways)]
            # Without auth the monitor and the gateway need nothing from the tracking server
            # to start, so they boot while it migrates its database (a third of the wait);
            # with auth they need the service user, which needs the server up.
            early = [] if self.auth else [*monitors, *gateways]
            for name in early:
                self.processes.append((name, self._launch(name)))
            tracking.wait_healthy(f"{self.tracking.url}/health", START_TIMEOUT_SECONDS)
            if self.auth:
                Auth(self.home).ensure_service_user(self.tracking.url)
            # The monitor before the gateway, so captures flow from the first request: the
            # controller pushes routes only once both answer.
            for name in (*monitors, *gateways):
                if name not in early:
                    self.processes.append((name, self._launch(name)))
                process = next(p for role, p in self.processes if role == name)
                self.wait_healthy(process, self._roles[name][1])
            for index in range(self.controllers):
                self.start_controller(self.instance("controller", index))
        except BaseException:
            self.stop()
            raise

    def _forget_published_routes(self) -> None:
        # Same as the route files: the last run's published routes name dead replicas.
        try:
            store = CoordinationStore(self.coordination_url)
            try:
                store.forget_routes()
            finally:
                store.close()
        except SQLAlchemyError as exc:
            first = str(exc).splitlines()[0][:200]
            raise RuntimeError(f"the coordination database cannot be used: {first}") from None

    def _routes_file(self, index: int) -> Path:
        # Each gateway saves its own table: gateway/routes.json, gateway-2/routes.json, ...
        return self.home / self.instance("gateway", index) / ROUTES_FILE.name

    def _define_monitors(self, python: str) -> None:
        for index in range(self.monitors):
            port = self.instance_port(self.ports.monitor, index)
            self._roles[self.instance("monitor", index)] = (
                [python, "-m", "monitoring", "--host", self.host, "--port", str(port)],
                f"{self.url(port)}/health",
            )

    def _define_gateways(self, python: str) -> None:
        for index in range(self.gateways):
            name = self.instance("gateway", index)
            port = self.instance_port(self.ports.gateway, index)
            self._roles[name] = (
                [python, "-m", "serving.gateway", "--host", self.host, "--port", str(port)],
                f"{self.url(port)}/ping",
            )
            # Capture keeps a spool per gateway: two processes never share one file.
            spool = "capture-spool" if index == 0 else f"capture-spool-{index + 1}"
            self._role_env[name] = {
                "FLOWLINE_ROUTES_FILE": str(self._routes_file(index)),
                "FLOWLINE_CAPTURE_SPOOL_DIR": str(self.home / spool),
            }

    def start_controller(self, name: str = "controller") -> None:
        """Start controller ``name`` (also after it died: the leader adopts the replicas)."""
        index = 0 if name == "controller" else int(name.rsplit("-", 1)[1]) - 1
        port = self.instance_port(self.ports.controller, index)
        options = {
            "--host": self.host,
            "--port": port,
            "--home": self.home,
            "--replicas": self.replicas,
            "--backend": self.backend,
            "--replica-port-from": self.ports.replicas_from,
            "--interval": self.reconcile_interval,
        }
        self._spawn(
            name,
            [sys.executable, "-m", "serving.controller", *option_args(options)],
            f"{self.url(port)}/health",
        )

    def stop(self) -> None:
        """Stop in reverse order: the controller first, so it can stop its replicas."""
        while self.processes:
            name, process = self.processes.pop()
            process.stop(grace=30.0)
            self._pidfile(name).unlink(missing_ok=True)
        if self.backend == "docker":
            # Containers are not our children: a controller killed before it could stop
            # them would leave them running, so sweep this home's labelled ones too.
            from serving.backends.base import BackendError
            from serving.backends.docker import docker_client, remove_containers

            try:
                remove_containers(docker_client(), self.home)
            except BackendError as exc:  # the daemon is gone, and its containers with it
                print(f"[flowline] could not sweep containers: {exc}", file=sys.stderr)

    def dead(self) -> list[str]:
        """Names of roles whose process has exited."""
        return [name for name, process in self.processes if not process.alive()]
