"""Helpers for tests that start real scoring processes on loopback.

Used by the gateway tests and meant to be reused by the controller tests: build
tiny sklearn models, start `mlflow models serve` replicas and the flowline
gateway as process groups, and always stop them again.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from common.processes import free_port
from tests.conftest import Service, spawn_service, start_service, subprocess_env, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Columns of sklearn's breast_cancer data used by the small test model.
FEW_COLUMNS = ["mean radius", "mean texture", "mean perimeter", "mean area", "mean smoothness"]


def serving_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: the venv's bin first on PATH (mlflow runs `uvicorn`)."""
    env = subprocess_env()
    # Keep children from writing tracking data next to the test process.
    env.setdefault("MLFLOW_TRACKING_URI", f"file://{tempfile.gettempdir()}/flowline-test-mlruns")
    if extra:
        env.update(extra)
    return env


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when GET url answers 200."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False


def spawn_scoring_server(model_dir: str | Path, log_dir: str | Path, workers: int = 1) -> Service:
    """Start `mlflow models serve --env-manager local` on a free port; do not wait for it."""
    port = free_port()
    log_path = Path(log_dir) / f"replica-{port}.log"
    cmd = [
        str(VENV_BIN / "mlflow"), "models", "serve", "-m", str(model_dir),
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", str(workers),
    ]  # fmt: skip
    return spawn_service(cmd, log_path, serving_env(), f"http://127.0.0.1:{port}")


def wait_ready(server: Service, timeout: float = 90.0) -> bool:
    """Wait until the server answers /ping (True) or its process exits (False)."""
    ping = f"{server.url}/ping"
    wait_for(lambda: not server.alive() or http_ok(ping), f"{server.url} to answer /ping", timeout)
    return server.alive()


def start_scoring_servers(
    model_dirs: list[str | Path], log_dir: str | Path, timeout: float = 120.0, workers: int = 1
) -> list[Service]:
    """Start several replicas in parallel (model loading dominates) and wait for all.

    A replica that lost its port to another process in the meantime is
    started again on a new port. On any failure every started one is stopped.
    """
    servers: list[Service] = []
    try:
        servers = [spawn_scoring_server(d, log_dir, workers) for d in model_dirs]
        for i, model_dir in enumerate(model_dirs):
            for _ in range(3):
                if wait_ready(servers[i], timeout):
                    break
                tail = servers[i].log_tail()
                servers[i].stop()
                if "address already in use" not in tail.lower():
                    raise RuntimeError(f"scoring server failed to start:\n{tail}")
                servers[i] = spawn_scoring_server(model_dir, log_dir, workers)
            else:
                raise RuntimeError(f"scoring server failed to start:\n{servers[i].log_tail()}")
    except BaseException:
        for server in servers:
            server.stop()
        raise
    return servers


def start_scoring_server(
    model_dir: str | Path, log_dir: str | Path, timeout: float = 120.0, workers: int = 1
) -> Service:
    """Start one replica and wait until it answers /ping."""
    return start_scoring_servers([model_dir], log_dir, timeout, workers)[0]


def start_gateway(
    log_dir: str | Path,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    port: int = 0,
    cwd: Path | None = None,
) -> Service:
    """Start `python -m serving.gateway` on port 0 and wait until it serves /ping.

    The gateway binds port 0 itself and writes the port it got to a file, so
    there is no window in which another process can take the port. `port`
    binds a given port instead (a restart on the port a killed gateway had).
    Unless `env` names a FLOWLINE_HOME, each gateway gets its own, so no test
    gateway restores the routes another one saved. `cwd`, a checkout of another commit,
    runs that commit's gateway (`python -m` imports from the working directory first).
    """
    log_dir = Path(log_dir)
    fd, name = tempfile.mkstemp(prefix="gateway-port-", dir=log_dir)
    os.close(fd)
    port_file = Path(name)
    cmd = [
        sys.executable, "-m", "serving.gateway",
        "--host", "127.0.0.1", "--port", str(port), "--port-file", str(port_file),
    ]  # fmt: skip
    log_path = log_dir / f"gateway-{port_file.name}.log"
    env = {"FLOWLINE_HOME": str(log_dir / f"home-{port_file.name}"), **(env or {})}
    where = {} if cwd is None else {"cwd": cwd}
    return start_service(cmd, log_path, serving_env(env), port_file, "/ping", timeout, **where)


@contextlib.contextmanager
def running(server: Service) -> Iterator[Service]:
    """Context manager that stops `server` on exit, also on failure."""
    try:
        yield server
    finally:
        server.stop()


# --- tiny models -----------------------------------------------------------------------------


def breast_cancer_frame(columns: list[str] | None = None):
    """Breast cancer features (optionally a subset of columns) and the target."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame = data.frame.drop(columns=["target"])
    if columns is not None:
        frame = frame[columns]
    return frame, data.target


def save_breast_cancer_model(path: str | Path, columns: list[str] | None = None) -> Path:
    """LogisticRegression on breast_cancer (given columns), saved with signature + example."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    features, target = breast_cancer_frame(columns)
    model = LogisticRegression(max_iter=5000).fit(features, target)
    signature = infer_signature(features, model.predict(features))
    mlflow.sklearn.save_model(model, str(path), signature=signature, input_example=features.head(2))
    return Path(path)


def categorical_frame():
    """A small frame with one string column and two float columns, plus a target."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(7)
    n = 200
    colour = rng.choice(["red", "green", "blue"], size=n)
    x = rng.normal(size=n)
    y = rng.normal(size=n)
    frame = pd.DataFrame({"colour": colour.astype(object), "x": x, "y": y})
    target = ((colour == "red") ^ (x + y > 0)).astype(int)
    return frame, pd.Series(target)


def save_categorical_model(path: str | Path) -> Path:
    """OneHotEncoder(handle_unknown='ignore') + LogisticRegression, with a string column."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder

    features, target = categorical_frame()
    pre = ColumnTransformer(
        [("cat", OneHotEncoder(handle_unknown="ignore"), ["colour"])], remainder="passthrough"
    )
    model = Pipeline([("pre", pre), ("clf", LogisticRegression())]).fit(features, target)
    signature = infer_signature(features, model.predict(features))
    mlflow.sklearn.save_model(model, str(path), signature=signature, input_example=features.head(2))
    return Path(path)


def model_metadata(model_dir: str | Path) -> dict[str, Any]:
    """Signature dict and serving input example of a saved model, as the gateway expects them."""
    from serving.model_metadata import read_model_metadata

    return read_model_metadata(model_dir)


def dumps(payload: Any) -> bytes:
    """JSON body bytes for a request."""
    return json.dumps(payload).encode()


class StubReplica:
    """A stub replica over real HTTP: GET answers 200, POST /invocations `respond(body)`.

    Runs a ThreadingHTTPServer on a free loopback port in a thread (one thread per
    request), so tests get a real replica without loading a model. Subclasses say how
    to answer a POST.
    """

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                self._answer(200, b"\n")

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                self._answer(*outer.respond(body))

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def respond(self, body: bytes) -> tuple[int, bytes]:
        """(status, JSON body) for one POST."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


class HeldScorer(StubReplica):
    """A stub replica whose POST /invocations answers only once released.

    Lets a test hold requests in flight deterministically (concurrency limits,
    draining). Held requests give up after `hold_timeout` so nothing can hang forever.
    """

    def __init__(self, hold_timeout: float = 30.0) -> None:
        import threading

        self.release = threading.Event()
        self.received = 0
        self.hold_timeout = hold_timeout
        self._lock = threading.Lock()
        super().__init__()

    def respond(self, body: bytes) -> tuple[int, bytes]:
        """Count the request, wait for the release, answer one prediction."""
        with self._lock:
            self.received += 1
        self.release.wait(self.hold_timeout)
        return 200, b'{"predictions": [0]}'

    def stop(self) -> None:
        """Release held requests and stop serving."""
        self.release.set()
        super().stop()


class RowScorer(StubReplica):
    """A stub replica that scores each row with `predict(row)`.

    Light enough for throughput tests (thousands of requests, no model loading) and
    row-aligned like the stock scorer, so the gateway batches requests to it: POST
    /invocations takes `dataframe_split` or `dataframe_records` JSON and answers
    {"predictions": [predict(row) for each row]}; with `fail`, every call gets 500 in
    MLflow's error shape.
    """

    def __init__(self, predict: Any = None, fail: bool = False) -> None:
        self.predict = predict or (lambda row: row[0])
        self.fail = fail
        super().__init__()

    def respond(self, body: bytes) -> tuple[int, bytes]:
        """Score the rows of a dataframe_split or dataframe_records body."""
        if self.fail:
            return 500, b'{"error_code": "BAD_REQUEST", "message": "this replica fails"}'
        payload = json.loads(body)
        if "dataframe_split" in payload:
            rows = payload["dataframe_split"]["data"]
        else:
            rows = [list(r.values()) for r in payload["dataframe_records"]]
        return 200, json.dumps({"predictions": [self.predict(row) for row in rows]}).encode()


def one_column_deployment(
    model: str, version: str, replicas: list[str], batching: bool = True
) -> dict[str, Any]:
    """A deployment (admin JSON) of one double column `x`, batched unless told not to."""
    inputs = [{"type": "double", "name": "x", "required": True}]
    return {
        "version": version,
        "replicas": replicas,
        "signature": {"inputs": json.dumps(inputs), "outputs": None, "params": None},
        "input_example": {"dataframe_split": {"columns": ["x"], "data": [[1.0]]}},
        "batching": {"enabled": batching},
    }
