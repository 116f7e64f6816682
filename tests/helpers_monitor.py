"""Helpers for the monitoring tests: a monitor process, a gateway with the capture hook,
a loopback webhook receiver, a fake ingest endpoint, and churn traffic.

Run as a module it is the gateway wrapper the tests start as a subprocess:

    python -m tests.helpers_monitor gateway --deployments deployments.json --port-file f

which serves `serving.gateway` with `monitoring.capture.client.capture_hook_from_env()`
as its `on_scored` hook (FLOWLINE_MONITOR_URL, FLOWLINE_CAPTURE_SPOOL_DIR ...).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Service, start_service
from tests.conftest import subprocess_env as child_env

REPO = Path(__file__).resolve().parents[1]
CHURN = REPO / "projects" / "data" / "churn.csv"
# The ingest token the test monitors and capture gateways share (FLOWLINE_INGEST_TOKEN),
# unless a test passes its own: their homes differ, so the home's token file would not.
INGEST_TOKEN = "test-ingest-token"
AUTH = {"authorization": f"Bearer {INGEST_TOKEN}"}
FEATURES = [
    "tenure_months", "monthly_charges", "total_charges", "support_calls", "senior",
    "contract", "internet_service", "payment_method",
]  # fmt: skip


def start_monitor(
    workdir: Path, env: dict[str, str], port: int = 0, timeout: float = 60.0, name: str = "monitor"
) -> Service:
    """`python -m monitoring` on ``port`` (0: a free one), healthy."""
    port_file = workdir / f"{name}.port"
    argv = [sys.executable, "-m", "monitoring", "--host", "127.0.0.1", "--port", str(port),
            "--port-file", str(port_file), "--log-level", "info"]  # fmt: skip
    env = {"FLOWLINE_INGEST_TOKEN": INGEST_TOKEN, **env}
    return start_service(
        argv, workdir / f"{name}.log", child_env(**env), port_file, "/health", timeout
    )


def start_capture_gateway(
    workdir: Path, deployments: list[dict[str, Any]], env: dict[str, str], timeout: float = 60.0
) -> Service:
    """The gateway (this module's `gateway` command) with the capture hook, on a free port."""
    path = workdir / "deployments.json"
    path.write_text(json.dumps(deployments))
    port_file = workdir / "gateway.port"
    argv = [sys.executable, "-m", "tests.helpers_monitor", "gateway", "--deployments", str(path),
            "--port-file", str(port_file)]  # fmt: skip
    env = {"FLOWLINE_INGEST_TOKEN": INGEST_TOKEN, **env}
    return start_service(
        argv, workdir / "gateway.log", child_env(**env), port_file, "/ping", timeout
    )


# --- a webhook receiver and a fake ingest endpoint ------------------------------------------


@dataclass
class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1:0 that records POST bodies.

    ``respond(path, body) -> status`` decides each answer (default 200).
    """

    respond: Callable[[str, bytes], int] | None = None
    received: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                status = outer.respond(self.path, body) if outer.respond else 200
                if 200 <= status < 300:
                    with lock:
                        outer.received.append((self.path, body))
                payload = b"{}"
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def bodies(self) -> list[Any]:
        """Received bodies, decoded as JSON."""
        return [json.loads(body) for _, body in list(self.received)]

    def stop(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


# --- traffic ------------------------------------------------------------------------------


def churn_features() -> Any:
    """The demo churn data's feature columns (the model's inputs)."""
    import pandas as pd

    return pd.read_csv(CHURN)[FEATURES]


def shifted(frame: Any) -> Any:
    """The issue's shift: tenure +20 months, every contract month-to-month."""
    out = frame.copy()
    out["tenure_months"] = out["tenure_months"] + 20
    out["contract"] = "month-to-month"
    return out


def split_body(frame: Any) -> bytes:
    """A dataframe_split request body for these rows (nulls as JSON null)."""
    data = json.loads(frame.to_json(orient="values"))
    return json.dumps({"dataframe_split": {"columns": list(frame.columns), "data": data}}).encode()


def send_rows(
    url: str, frame: Any, rows_per_request: int = 20, client: httpx.Client | None = None
) -> int:
    """POST the frame in chunks; returns the rows answered with 200 (raises on other answers)."""
    own = client is None
    client = client or httpx.Client(timeout=30)
    sent = 0
    try:
        for start in range(0, len(frame), rows_per_request):
            chunk = frame.iloc[start : start + rows_per_request]
            answer = client.post(
                url, content=split_body(chunk), headers={"content-type": "application/json"}
            )
            if answer.status_code != 200:
                raise AssertionError(f"scoring failed: {answer.status_code} {answer.text[:300]}")
            sent += len(chunk)
    finally:
        if own:
            client.close()
    return sent


def capture_records(
    frame: Any, predictions: list[Any], per: int = 1, model: str = "churn"
) -> tuple[list[dict[str, Any]], list[str]]:
    """Capture records of ``per``-row dataframe_split requests (version 1, each with a
    request id), and each row's id for feedback (``<request id>:<row>`` past one row)."""
    out, row_ids = [], []
    for start in range(0, len(frame), per):
        chunk = frame.iloc[start : start + per]
        request_id = f"feedc0de-{start:x}"
        body = {
            "dataframe_split": {
                "columns": list(chunk.columns),
                "data": json.loads(chunk.to_json(orient="values")),
            }
        }
        out.append({
            "id": uuid.uuid4().hex, "model": model, "version": "1", "time": 1.8e9 + start,
            "body": json.dumps(body), "content_type": "application/json",
            "predictions": list(predictions[start : start + per]), "request_id": request_id,
        })  # fmt: skip
        row_ids += [request_id if per == 1 else f"{request_id}:{i}" for i in range(len(chunk))]
    return out, row_ids


# --- the gateway wrapper ------------------------------------------------------------------


def _gateway_main(argv: list[str]) -> None:
    import logging

    from monitoring.capture.client import capture_hook_from_env
    from serving.gateway.server import load_deployments, serve_gateway

    parser = argparse.ArgumentParser(prog="python -m tests.helpers_monitor gateway")
    parser.add_argument("--deployments", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level="WARNING", format="%(asctime)s %(name)s %(message)s")
    serve_gateway(
        "127.0.0.1",
        args.port,
        deployments=load_deployments(args.deployments),
        on_scored=capture_hook_from_env(),
        port_file=args.port_file,
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "gateway":
        _gateway_main(sys.argv[2:])
    else:
        raise SystemExit("usage: python -m tests.helpers_monitor gateway --deployments F ...")
