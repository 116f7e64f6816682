"""`flowline up`: tracking server, drift monitor, gateway and controller as one group."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

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
from serving.gateway.config import ROUTES_FILE

START_TIMEOUT_SECONDS = 120.0
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
    processes: list[tuple[str, ManagedProcess]] = field(default_factory=list)
    # Each role's command line and health URL, so a supervisor can start it again.
    _roles: dict[str, tuple[list[str], str]] = field(default_factory=dict, repr=False)

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
        """Every URL a user needs."""
        return {
            "tracking server and UI": self.tracking.url,
            "gateway (POST /invocations)": self.url(self.ports.gateway),
            "controller (GET /status)": self.url(self.ports.controller),
            "drift monitor (GET /drift)": self.url(self.ports.monitor),
            **self._grpc_url(),
        }

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
            FLOWLINE_MONITOR_URL=self.url(self.ports.monitor),
            PATH=venv_first_path(os.environ.get("PATH", "")),
            PYTHONUNBUFFERED="1",
            **(dict(Auth(self.home).service_env(), FLOWLINE_AUTH="1") if self.auth else {}),
        )
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
            process = ManagedProcess(
                argv, env=self._env(), log_path=self.home / "logs" / f"{name}.log"
            )
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
        """Ask the controller for a reconcile pass now (it pushes routes to a new gateway)."""
        verify, cert = client_tls(self.tls)
        try:
            requests.post(
                f"{self.url(self.ports.controller)}/reconcile",
                headers={"Authorization": f"Bearer {self._env()['FLOWLINE_ADMIN_TOKEN']}"},
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
            self.ports.gateway,
            self.ports.controller,
            self.ports.monitor,
        ]
        return [port for port in wanted if port_in_use(port, self.host)]

    def start(self) -> None:
        """Start everything; on any failure stop what was started and re-raise."""
        make_private(self.home, set_umask=False)
        # A cold start: the routes a gateway saved point at replicas of the last run, which
        # are gone. The controller pushes the live ones; a gateway restarted alone (below,
        # by the supervisor) keeps its file and serves on at once.
        (self.home / ROUTES_FILE).unlink(missing_ok=True)
        python = sys.executable
        try:
            tracking = self._launch("tracking")
            self.processes.append(("tracking", tracking))
            gateway = self.url(self.ports.gateway)
            self._roles["monitor"] = (
                [
                    python,
                    "-m",
                    "monitoring",
                    "--host",
                    self.host,
                    "--port",
                    str(self.ports.monitor),
                ],
                f"{self.url(self.ports.monitor)}/health",
            )
            self._roles["gateway"] = (
                [
                    python,
                    "-m",
                    "serving.gateway",
                    "--host",
                    self.host,
                    "--port",
                    str(self.ports.gateway),
                ],
                f"{gateway}/ping",
            )
            # Without auth the monitor and the gateway need nothing from the tracking server
            # to start, so they boot while it migrates its database (a third of the wait);
            # with auth they need the service user, which needs the server up.
            early = [] if self.auth else ["monitor", "gateway"]
            for name in early:
                self.processes.append((name, self._launch(name)))
            tracking.wait_healthy(f"{self.tracking.url}/health", START_TIMEOUT_SECONDS)
            if self.auth:
                Auth(self.home).ensure_service_user(self.tracking.url)
            # The monitor before the gateway, so captures flow from the first request: the
            # controller pushes routes only once both answer.
            for name in ("monitor", "gateway"):
                if name not in early:
                    self.processes.append((name, self._launch(name)))
                process = next(p for role, p in self.processes if role == name)
                self.wait_healthy(process, self._roles[name][1])
            self.start_controller()
        except BaseException:
            self.stop()
            raise

    def start_controller(self) -> None:
        """Start the controller (also after it died: it adopts the replicas it left)."""
        options = {
            "--host": self.host,
            "--port": self.ports.controller,
            "--home": self.home,
            "--replicas": self.replicas,
            "--backend": self.backend,
            "--replica-port-from": self.ports.replicas_from,
            "--interval": self.reconcile_interval,
        }
        self._spawn(
            "controller",
            [sys.executable, "-m", "serving.controller", *option_args(options)],
            f"{self.url(self.ports.controller)}/health",
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
