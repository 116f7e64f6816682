"""The default backend: each replica is a local `mlflow models serve` process group."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from urllib.parse import quote

import requests

from common.processes import (
    ManagedProcess,
    option_args,
    pid_running,
    replica_environment,
    venv_bin,
)
from serving.backends.artifacts import download_version
from serving.backends.base import BackendError, Replica
from serving.backends.ports import PORT_ATTEMPTS, PortPool, PortTaken

STARTUP_TIMEOUT_SECONDS = 120.0


class LocalProcessBackend:
    """Runs replicas as child processes on consecutive free loopback ports."""

    def __init__(
        self,
        tracking_uri: str,
        state_dir: Path,
        host: str = "127.0.0.1",
        port_from: int = 9000,
        ports: PortPool | None = None,
        env_manager: str = "local",
        workers: int = 1,
        startup_timeout: float = STARTUP_TIMEOUT_SECONDS,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.state_dir = state_dir
        self.host = host
        self.port_from = port_from
        self.env_manager = env_manager
        self.workers = workers
        self.startup_timeout = startup_timeout
        # Shared when several backends run side by side, so they never pick the same port.
        self.ports = ports or PortPool(host, port_from)
        self._lock = threading.Lock()
        self._live: dict[str, Replica] = {}
        self._starting: dict[tuple[str, str], int] = {}
        self._download_lock = threading.Lock()
        (state_dir / "replicas").mkdir(parents=True, exist_ok=True)

    def _pidfile(self, port: int) -> Path:
        return self.state_dir / "replicas" / f"{port}.json"

    def start_replica(self, model: str, version: str, model_uri: str) -> Replica:
        """Start ``mlflow models serve`` for ``model_uri`` and wait for ``/ping``.

        A port can be taken by someone else between our check and the replica's own
        bind; that one failure is retried on the next free port.
        """
        key = (model, version)
        with self._lock:
            self._starting[key] = self._starting.get(key, 0) + 1
        try:
            local = self._local_copy(model, version, model_uri)
            for attempt in range(PORT_ATTEMPTS):
                try:
                    return self._start_on_free_port(model, version, local)
                except PortTaken:
                    if attempt == PORT_ATTEMPTS - 1:
                        raise BackendError(
                            f"replica of {model}/{version}: no port could be bound"
                        ) from None
            raise AssertionError("unreachable")
        finally:
            with self._lock:
                self._starting[key] -= 1
            self._prune(model, version)

    def _model_dir(self, model: str, version: str) -> Path:
        return self.state_dir / "models" / quote(model, safe="") / quote(version, safe="")

    def _local_copy(self, model: str, version: str, model_uri: str) -> str:
        """The version's files, downloaded once by the controller (which holds the
        registry credentials) so that replicas need none."""
        with self._download_lock:
            target = self._model_dir(model, version)
            return str(download_version(model_uri, target, self.tracking_uri))

    def _prune(self, model: str, version: str) -> None:
        # A version no replica serves or is starting needs no local copy.
        with self._lock:
            if self._starting.get((model, version)) or any(
                (r.model, r.version) == (model, version) for r in self._live.values()
            ):
                return
        shutil.rmtree(self._model_dir(model, version), ignore_errors=True)

    def _start_on_free_port(self, model: str, version: str, model_uri: str) -> Replica:
        port = self.ports.take()
        options = {
            "-m": model_uri,
            "--env-manager": self.env_manager,
            "-h": self.host,
            "-p": port,
            "-w": self.workers,
        }
        argv = [os.path.join(venv_bin(), "mlflow"), "models", "serve", *option_args(options)]
        env = replica_environment(self.tracking_uri, self.env_manager)
        log = self.state_dir / "logs" / f"replica-{model}-{version}-{port}.log"
        process = ManagedProcess(argv, env=env, log_path=log).start()
        self._pidfile(port).write_text(
            json.dumps({"pid": process.pid, "model": model, "version": version})
        )
        replica = Replica(model, version, f"http://{self.host}:{port}", process)
        try:
            process.wait_healthy(f"{replica.url}/ping", self.startup_timeout)
        except (RuntimeError, TimeoutError) as exc:
            lost_port = "address already in use" in process.tail(40)
            self.stop_replica(replica)
            if lost_port:
                self.ports.hold(port)  # someone else holds it: never offer it again
                raise PortTaken() from None
            raise BackendError(f"replica of {model}/{version} failed to start: {exc}") from None
        with self._lock:
            self._live[replica.url] = replica
        return replica

    def is_alive(self, replica: Replica) -> bool:
        """True while the replica's process has not exited."""
        return replica.handle is not None and replica.handle.alive()

    def stop_replica(self, replica: Replica) -> None:
        """Stop the replica's whole process group and release its port."""
        if replica.handle is not None:
            replica.handle.stop()
        port = int(replica.url.rsplit(":", 1)[1])
        self._pidfile(port).unlink(missing_ok=True)
        with self._lock:
            self._live.pop(replica.url, None)
        self.ports.release(port)
        self._prune(replica.model, replica.version)

    def stop_all(self) -> None:
        """Stop every replica started by this backend."""
        with self._lock:
            replicas = list(self._live.values())
        for replica in replicas:
            self.stop_replica(replica)

    def adopt_running(self) -> list[Replica]:
        """Replicas left running by a controller that died without stopping them.

        A restarted controller takes them over instead of restarting them, so the
        gateway keeps serving across the restart. Each pid file is checked against the
        process's command line (a recycled pid is never touched) and against ``/ping``.
        """
        adopted = []
        for pidfile in (self.state_dir / "replicas").glob("*.json"):
            port = int(pidfile.stem)
            try:
                record = json.loads(pidfile.read_text())
                pid = int(record["pid"])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
            except (OSError, ValueError, KeyError):
                pidfile.unlink(missing_ok=True)
                continue
            if b"models serve" not in cmdline:
                pidfile.unlink(missing_ok=True)
                continue
            replica = Replica(
                record["model"],
                record["version"],
                f"http://{self.host}:{port}",
                AdoptedProcess(pid),
            )
            if not _pings(replica.url):
                self.stop_replica(replica)
                continue
            self.ports.hold(port)
            with self._lock:
                self._live[replica.url] = replica
            adopted.append(replica)
        return adopted


def _pings(url: str) -> bool:
    try:
        return requests.get(f"{url}/ping", timeout=5).status_code == 200
    except requests.RequestException:
        return False


class AdoptedProcess:
    """A replica process found running from an earlier controller, known only by its pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def alive(self) -> bool:
        """True while the process exists and is not a zombie."""
        return pid_running(self.pid)

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it outlives ``grace`` seconds."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace
            while self.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.alive():
                return
