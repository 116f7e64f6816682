"""Child processes in their own process groups, with health polling and clean stops.

Every server flowline starts (tracking server, scoring replicas) goes through here so
that a stop always reaches the whole group, including workers the child forked.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import requests

STOP_GRACE_SECONDS = 10.0
# Files flowline (and every child it starts) creates: 0600 files in 0700 folders. The
# home holds captured request bodies, the registry database and secrets.
PRIVATE_UMASK = 0o077


def venv_bin() -> str:
    """The bin folder of the Python running flowline (its venv's ``mlflow``, ``uvicorn``)."""
    return os.path.dirname(sys.executable)


def venv_first_path(path: str | None = None) -> str:
    """A PATH with this venv's bin first, before ``path`` (default: this process's PATH).

    ``mlflow models serve --env-manager local`` and ``mlflow run`` start ``uvicorn`` and
    ``python`` from PATH: they must be this install's, not whatever the shell found.
    """
    rest = os.environ.get("PATH", os.defpath) if path is None else path
    return venv_bin() + os.pathsep + rest


# What model code inherits (a replica, the monitor's probability scorer): enough to run
# `mlflow models serve` and nothing else. Model code runs there, so no platform secret
# (admin token, tracking credentials, webhook secrets, API keys) may be in its
# environment: an allowlist, not a denylist.
REPLICA_ENV_NAMES = ("HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "USER", "LOGNAME")
# Building an environment (virtualenv, uv, conda) also needs the package index settings.
ENV_BUILDER_NAMES = tuple(
    """PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CERT UV_INDEX_URL SSL_CERT_FILE REQUESTS_CA_BUNDLE
    HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy
    MLFLOW_ENV_ROOT MLFLOW_CONDA_HOME CONDA_EXE PYENV_ROOT""".split()
)


def replica_environment(
    tracking_uri: str, env_manager: str = "local", source: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a replica: PATH with this venv's bin first, locale, HOME, and
    the tracking URI it loads ``models:/`` from; never a flowline or MLflow secret."""
    source = os.environ if source is None else source
    names = REPLICA_ENV_NAMES + (ENV_BUILDER_NAMES if env_manager != "local" else ())
    env = {k: source[k] for k in names if k in source}
    env.update({k: v for k, v in source.items() if k.startswith("LC_")})
    # `mlflow models serve --env-manager local` runs `uvicorn` from PATH: use this venv's.
    env["PATH"] = venv_first_path(source.get("PATH", os.defpath))
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PYTHONUNBUFFERED"] = "1"
    return env


def option_args(options: Mapping[str, object]) -> list[str]:
    """Command-line options as argv words: ``{"--port": 80}`` gives ``["--port", "80"]``."""
    return [word for name, value in options.items() for word in (name, str(value))]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """True when something already listens on ``host:port``."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def port_bindable(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could bind ``host:port`` now.

    Stricter than ``port_in_use``: a port held by an outgoing connection or a
    half-started server refuses a bind although nothing answers on it.
    """
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port_block(count: int, host: str = "127.0.0.1", start: int = 20000) -> int:
    """The first port of ``count`` consecutive bindable ports below the ephemeral range.

    Servers that take consecutive ports (scoring replicas) must not start inside the
    kernel's ephemeral range, where outgoing connections grab ports at random.
    """
    port = start
    while port + count < 32768:
        if all(port_bindable(p, host) for p in range(port, port + count)):
            return port
        port += count
    raise RuntimeError(f"no block of {count} free ports between {start} and 32768")


@dataclass
class ManagedProcess:
    """A child process started in a new session, so it and its children stop together."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    log_path: Path | None = None
    cwd: Path | None = None
    # For the child only (PRIVATE_UMASK for flowline's roles); None inherits ours.
    umask: int | None = None
    popen: subprocess.Popen | None = field(default=None, init=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)

    def start(self) -> ManagedProcess:
        """Start the process; its output goes to ``log_path`` (or is discarded)."""
        if self.log_path is not None:
            self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Logs can hold request data and paths: readable by the owner only.
            fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._log = os.fdopen(fd, "ab")
        self.popen = subprocess.Popen(
            list(self.argv),
            env=dict(self.env) if self.env is not None else None,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._log or subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            umask=-1 if self.umask is None else self.umask,
        )
        return self

    @property
    def pid(self) -> int:
        """The child's process id (also its process-group id)."""
        assert self.popen is not None, "process not started"
        return self.popen.pid

    def alive(self) -> bool:
        """True while the child has not exited."""
        return self.popen is not None and self.popen.poll() is None

    def wait_healthy(self, url: str, timeout: float) -> None:
        """Poll ``url`` until it answers 200; raise if the child dies or time runs out."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.argv[0]} exited with {self.popen.returncode}: {self.tail()}"
                )
            try:
                response = requests.get(url, timeout=2)
                if response.status_code == 200:
                    return
                last = f"HTTP {response.status_code}"
            except requests.RequestException as exc:
                last = type(exc).__name__
            time.sleep(0.2)
        raise TimeoutError(f"{url} not healthy after {timeout:.0f}s ({last}): {self.tail()}")

    def tail(self, lines: int = 5) -> str:
        """The last lines of the child's log, for error messages."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM the whole group, then SIGKILL what is left after ``grace`` seconds."""
        if self.popen is None:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.popen.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Workers forked by the child share its group; make sure none outlive it.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None


def pid_running(pid: int) -> bool:
    """True while process ``pid`` exists on this host and is not a zombie (killed, not
    yet reaped). Read from /proc, so another user's process counts as running too."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
