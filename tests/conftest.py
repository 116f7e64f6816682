"""Shared fixtures and helpers: real tracking servers on SQLite and PostgreSQL, project
runs, child services started on port 0, and deadline polls."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from common.processes import ManagedProcess, free_port, venv_first_path
from flowline.tracking import TrackingServer

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
POSTGRES_ADMIN = os.environ.get(
    "FLOWLINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: this venv first on PATH, quiet Python."""
    env = dict(os.environ, PATH=venv_first_path(os.environ.get("PATH", "")))
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
    env.update(PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2", **extra)
    return env


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Poll until ``predicate()`` is truthy and return its value; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Service:
    """A child process group started by a test (or a benchmark) and the URL it serves."""

    process: ManagedProcess
    url: str

    @property
    def port(self) -> int:
        """The port the service listens on."""
        return int(self.url.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        """The child's pid, which is also its process-group id."""
        return self.process.pid

    def alive(self) -> bool:
        """True while the child has not exited."""
        return self.process.alive()

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the child's combined stdout/stderr."""
        try:
            return self.process.log_path.read_text(errors="replace")[-chars:]
        except (AttributeError, OSError):
            return ""

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the whole process group, SIGKILL after ``grace`` seconds (idempotent)."""
        self.process.stop(grace=grace)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash), then reap it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.stop(grace=5.0)


def spawn_service(
    argv: list[str], log: Path, env: dict[str, str], url: str, cwd: Path = REPO
) -> Service:
    """Start ``argv`` in its own process group (output to ``log``) without waiting for it."""
    return Service(ManagedProcess(argv, env=env, log_path=log, cwd=cwd).start(), url)


def _read_port(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def start_service(
    argv: list[str],
    log: Path,
    env: dict[str, str],
    port_file: Path,
    health: str,
    timeout: float,
    cwd: Path = REPO,
) -> Service:
    """Start a server that binds port 0 and writes its port to ``port_file``; wait for
    ``health`` to answer 200. No other process can take the port in between. ``cwd``
    (a checkout of another commit, for a before/after benchmark) is where it runs."""
    port_file.unlink(missing_ok=True)
    service = spawn_service(argv, log, env, "", cwd)
    try:
        port = wait_for(
            lambda: _read_port(port_file) or (not service.alive() and -1),
            f"{' '.join(argv[1:3])} to bind",
            timeout,
        )
        if port == -1:
            raise RuntimeError(f"{' '.join(argv[1:3])} exited: {service.log_tail()}")
        service.url = f"http://127.0.0.1:{port}"
        service.process.wait_healthy(service.url + health, timeout)
    except BaseException:
        service.stop()
        raise
    return service


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database; mandatory (never skipped) when CI=true."""
    try:
        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI but unreachable at {POSTGRES_ADMIN}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_ADMIN}")
    name = f"flowline_test_{uuid.uuid4().hex[:10]}"
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            base = POSTGRES_ADMIN.rsplit("/", 1)[0]
            yield f"{base}/{name}"
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def tracking_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrackingServer]:
    """A real `mlflow server` process on a free port, backed by SQLite or PostgreSQL."""
    backend = request.getfixturevalue("postgres_database") if request.param == "postgres" else ""
    home = tmp_path_factory.mktemp(f"home-{request.param}")
    server = TrackingServer(home=home, port=free_port(), backend_store_uri=backend, workers=1)
    process = server.start()
    try:
        yield server
    finally:
        process.stop()


@pytest.fixture(scope="module")
def sqlite_tracking(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrackingServer]:
    """A real `mlflow server` on SQLite, one per test module that asks for it."""
    server = TrackingServer(home=tmp_path_factory.mktemp("home"), port=free_port(), workers=1)
    process = server.start()
    try:
        yield server
    finally:
        process.stop()


def mlflow_run(
    tracking_uri: str,
    timeout: float = 600,
    entry: str = "main",
    env: dict[str, str] | None = None,
    **params: object,
) -> subprocess.CompletedProcess:
    """`mlflow run <repo> -e <entry> --env-manager local -P k=v ...` as a real subprocess."""
    argv = [str(BIN / "mlflow"), "run", str(REPO), "-e", entry, "--env-manager", "local"]
    for key, value in params.items():
        argv += ["-P", f"{key}={value}"]
    return subprocess.run(
        argv,
        env=subprocess_env(MLFLOW_TRACKING_URI=tracking_uri, **(env or {})),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- one real replica per module, shared by the gateway modules that need just one ---------


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log folder for the module's servers."""
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The breast-cancer model on a few columns, saved once per module."""
    from tests.helpers_serving import FEW_COLUMNS, save_breast_cancer_model

    return save_breast_cancer_model(tmp_path_factory.mktemp("models") / "bc", FEW_COLUMNS)


@pytest.fixture(scope="module")
def replica(model_dir: Path, logs: Path) -> Iterator[Service]:
    """One real `mlflow models serve` replica of `model_dir`; stopped after the module."""
    from tests.helpers_serving import start_scoring_server

    server = start_scoring_server(model_dir, logs)
    try:
        yield server
    finally:
        server.stop()
