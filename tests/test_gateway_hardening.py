"""The gateway under hostile and unlucky conditions, with real processes on loopback.

Slow senders (slowloris: 256 connections that send a request head and a few body
bytes) get 408 and never starve normal clients; slow and oversized request heads
are refused; a gateway killed with SIGKILL restarts with its routes (never a 404
for a served model) and its sticky default model; a gateway that knows no routes
yet answers 503 + Retry-After; a body without Content-Type gets 415; and a
bounded schemathesis run against the gateway's own OpenAPI document finds no 5xx.
"""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serving.deployment import Deployment
from serving.gateway import GatewayConfig, RouteTable
from serving.gateway.route_store import RouteStore
from serving.model_metadata import deployment_from_model_dir
from tests.conftest import BIN, Service, wait_for
from tests.helpers_serving import (
    FEW_COLUMNS,
    start_gateway,
)

ADMIN = "admin-secret"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
JSON = "application/json"
ROW = [17.99, 10.38, 122.8, 1001.0, 0.1184]
BODY = json.dumps({"dataframe_split": {"columns": FEW_COLUMNS, "data": [ROW]}}).encode()


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def gateway_env(home: Path, **extra: str) -> dict[str, str]:
    return {"FLOWLINE_ADMIN_TOKEN": ADMIN, "FLOWLINE_HOME": str(home), **extra}


@pytest.fixture
def gateway(logs: Path, home: Path) -> Iterator[Service]:
    """A gateway with short read deadlines, 32 scoring slots and its own FLOWLINE_HOME."""
    env = gateway_env(
        home,
        FLOWLINE_BODY_TIMEOUT_S="4",
        FLOWLINE_HEADER_TIMEOUT_S="4",
        FLOWLINE_MAX_INFLIGHT="32",
        FLOWLINE_MAX_HEADER_BYTES="16384",
    )
    server = start_gateway(logs, env=env)
    try:
        yield server
    finally:
        server.stop()


def deploy(gateway: Service, model: str, version: str, replica: Service, model_dir: Path) -> None:
    """PUT a deployment through the admin API, as the controller does."""
    body = deployment_from_model_dir(model, version, [replica.url], model_dir).to_dict()
    answer = httpx.put(
        f"{gateway.url}/admin/deployments/{model}", json=body, headers=ADMIN_HEADERS, timeout=30
    )
    assert answer.status_code == 200, answer.text


def score(url: str, path: str = "/invocations") -> httpx.Response:
    return httpx.post(f"{url}{path}", content=BODY, headers={"content-type": JSON}, timeout=30)


def rejected(gateway: Service, reason: str) -> float:
    """flowline_gateway_rejected_total{reason=...} as the gateway reports it now."""
    for line in httpx.get(f"{gateway.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f'flowline_gateway_rejected_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- raw-socket clients ------------------------------------------------------------------------


def open_raw(port: int, data: bytes) -> socket.socket:
    """A loopback connection that has sent `data` and then goes quiet."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(data)
    return sock


def read_answers(
    socks: list[socket.socket],
    timeout: float,
    first_byte_at: dict[socket.socket, float] | None = None,
) -> dict[socket.socket, bytes]:
    """Read every socket until the server closes it or `timeout` passes (bounded);
    `first_byte_at` gets when each socket's answer began."""
    received = {s: b"" for s in socks}
    open_socks = set(socks)
    deadline = time.monotonic() + timeout
    while open_socks and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_socks), [], [], 0.2)
        for sock in ready:
            try:
                chunk = sock.recv(65536)
            except OSError:  # reset by the server after its answer: closed
                chunk = b""
            if chunk:
                if first_byte_at is not None:
                    first_byte_at.setdefault(sock, time.monotonic())
                received[sock] += chunk
            else:
                open_socks.discard(sock)
    # Still open at the deadline: mark it so the assertion names the problem.
    for sock in open_socks:
        received[sock] += b"<still open>"
    return received


def slow_body_head(port: int) -> bytes:
    return (
        b"POST /invocations HTTP/1.1\r\nHost: 127.0.0.1:" + str(port).encode() + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        b'{"datafram'
    )


# --- item 5: bounded reads -----------------------------------------------------------------------


def test_slow_bodies_get_408_and_do_not_starve_other_clients(
    gateway: Service, replica: Service, model_dir: Path
) -> None:
    deploy(gateway, "bc", "1", replica, model_dir)
    slow_count, body_timeout = 256, 4.0
    opened_at = time.monotonic()
    slow = [open_raw(gateway.port, slow_body_head(gateway.port)) for _ in range(slow_count)]
    all_open_at = time.monotonic()
    try:
        # 256 slow readers against 32 scoring slots: a normal client keeps being served.
        statuses: list[int] = []
        with httpx.Client(timeout=10) as client:
            while len(statuses) < 300 and time.monotonic() - opened_at < body_timeout - 1.5:
                try:
                    answer = client.post(
                        f"{gateway.url}/invocations", content=BODY, headers={"content-type": JSON}
                    )
                    statuses.append(answer.status_code)
                except httpx.HTTPError:
                    statuses.append(0)
        normal_done = time.monotonic()
        # The slow ones were all still being waited on while the normal client ran.
        assert normal_done - opened_at < body_timeout
        ready, _, _ = select.select(slow, [], [], 0)
        assert ready == []
        assert len(statuses) >= 30, statuses
        assert statuses.count(200) / len(statuses) >= 0.99, statuses

        first_byte_at: dict[socket.socket, float] = {}
        answers = read_answers(slow, timeout=body_timeout + 10, first_byte_at=first_byte_at)
    finally:
        for sock in slow:
            sock.close()
    for raw in answers.values():
        assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
        assert b"connection: close" in raw.lower()
        body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
        assert body["error_code"] == "DEADLINE_EXCEEDED"
    # Refused at the deadline: not before it (each one's clock starts once its head is
    # in, after `opened_at`) and not much after it.
    assert min(first_byte_at.values()) - opened_at >= body_timeout - 0.05
    assert max(first_byte_at.values()) - all_open_at <= body_timeout + 3
    print(
        f"normal client: {statuses.count(200)}/{len(statuses)} ok; 408 after "
        f"{min(first_byte_at.values()) - opened_at:.2f}-"
        f"{max(first_byte_at.values()) - opened_at:.2f} s"
    )
    assert rejected(gateway, "body_timeout") == slow_count
    assert score(gateway.url).status_code == 200


def test_slow_and_oversized_request_heads_are_refused(gateway: Service) -> None:
    port = gateway.port
    opened_at = time.monotonic()
    # A head that never ends, and a connection that sends nothing at all.
    slow_heads = [open_raw(port, b"POST /invocations HTTP/1.1\r\nHost: x\r\n") for _ in range(16)]
    silent = [open_raw(port, b"") for _ in range(16)]
    big_value = b"a" * 20000  # over the 16384-byte limit set on this gateway
    big = [
        open_raw(port, b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + big_value + b"\r\n\r\n"),
        # The same head trickling in: refused before it is complete.
        open_raw(port, b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Big: " + big_value),
    ]
    try:
        big_answers = read_answers(big, timeout=5)
        for raw in big_answers.values():
            assert raw.startswith(b"HTTP/1.1 431 "), raw[:200]
            assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["error_code"] == (
                "REQUEST_LIMIT_EXCEEDED"
            )
        assert httpx.get(f"{gateway.url}/ping", timeout=5).status_code == 200
        answers = read_answers(slow_heads + silent, timeout=15)
        answered_at = time.monotonic()
    finally:
        for sock in slow_heads + silent + big:
            sock.close()
    for raw in answers.values():
        assert raw.startswith(b"HTTP/1.1 408 "), raw[:200]
    assert answered_at - opened_at >= 4.0
    # A normal head of a few KiB is fine.
    assert httpx.get(f"{gateway.url}/ping", headers={"X-Pad": "p" * 4000}).status_code == 200


# --- item 6: a restarted gateway knows its routes -------------------------------------------------


class Poller:
    """Scores in a loop (bounded in count and time), recording each status; 0 = no answer."""

    def __init__(self, url: str, limit: int = 20000, seconds: float = 60) -> None:
        self.url = url
        self.statuses: list[int] = []
        self.times: list[float] = []
        self._stop = threading.Event()
        self._limit = limit
        self._deadline = time.monotonic() + seconds
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while (
            not self._stop.is_set()
            and len(self.statuses) < self._limit
            and time.monotonic() < self._deadline
        ):
            try:
                # A fresh connection each time: the killed gateway's ones are gone.
                status = score(self.url, "/models/bc/invocations").status_code
            except httpx.HTTPError:
                status = 0
                time.sleep(0.01)
            self.times.append(time.monotonic())
            self.statuses.append(status)

    def answered(self) -> list[int]:
        return [s for s in self.statuses if s != 0]

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_a_killed_gateway_restarts_with_its_routes_and_default(
    logs: Path, home: Path, replica: Service, model_dir: Path
) -> None:
    env = gateway_env(home)
    gateway = start_gateway(logs, env=env)
    try:
        deploy(gateway, "bc", "1", replica, model_dir)
        deploy(gateway, "other", "4", replica, model_dir)
        assert score(gateway.url).headers["x-flowline-model-version"] == "bc/1"
        routes_file = home / "gateway" / "routes.json"
        assert stat.S_IMODE(routes_file.stat().st_mode) == 0o600
        assert stat.S_IMODE(routes_file.parent.stat().st_mode) == 0o700
        saved = json.loads(routes_file.read_text())
        assert saved["default_model"] == "bc"
        assert [d["model"] for d in saved["deployments"]] == ["bc", "other"]
        port = gateway.port
        with Poller(gateway.url) as poller:
            wait_for(lambda: poller.answered().count(200) >= 20, "answers before the kill", 30)
            gateway.kill()
            killed_at, kill_time = len(poller.statuses), time.monotonic()
            gateway = start_gateway(logs, env=env, port=port)
            wait_for(
                lambda: poller.statuses[killed_at:].count(200) >= 50, "answers after restart", 30
            )
        after = poller.statuses[killed_at:]
        # Down (no answer) for a while, then 200 from the first answer on: never 404 or 503.
        assert 0 in after, "the kill did not interrupt the gateway"
        assert set(poller.answered()) == {200}, sorted(set(poller.statuses))
        back = next(t for t, st in zip(poller.times[killed_at:], after, strict=True) if st == 200)
        print(f"kill -9 to the first 200 of the restarted gateway: {back - kill_time:.2f} s")
        answer = score(gateway.url)
        assert answer.status_code == 200
        assert answer.headers["x-flowline-model-version"] == "bc/1"
        listed = httpx.get(f"{gateway.url}/admin/deployments", headers=ADMIN_HEADERS).json()
        assert [d["model"] for d in listed["deployments"]] == ["bc", "other"]
    finally:
        gateway.stop()


def test_a_gateway_without_routes_answers_503_until_the_controller_pushes(
    logs: Path, home: Path, replica: Service, model_dir: Path
) -> None:
    gateway = start_gateway(logs, env=gateway_env(home))
    try:
        for path in ("/invocations", "/models/bc/invocations"):
            answer = score(gateway.url, path)
            assert answer.status_code == 503, answer.text
            assert answer.headers["retry-after"] == "1"
            assert answer.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
        deploy(gateway, "bc", "1", replica, model_dir)
        assert score(gateway.url, "/models/bc/invocations").status_code == 200
        # Now the table is known: a model that is not there is a plain 404.
        unknown = score(gateway.url, "/models/nope/invocations")
        assert unknown.status_code == 404
        assert unknown.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
    finally:
        gateway.stop()


# --- item 11: sticky default model -------------------------------------------------------------


def test_invocations_keeps_answering_the_first_model_when_more_are_promoted(
    gateway: Service, replica: Service, model_dir: Path
) -> None:
    deploy(gateway, "first", "1", replica, model_dir)
    assert score(gateway.url).headers["x-flowline-model-version"] == "first/1"
    deploy(gateway, "second", "1", replica, model_dir)
    deploy(gateway, "third", "2", replica, model_dir)
    for _ in range(5):
        answer = score(gateway.url)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-flowline-model-version"] == "first/1"
    # A new version of the default model is still the default.
    deploy(gateway, "first", "2", replica, model_dir)
    assert score(gateway.url).headers["x-flowline-model-version"] == "first/2"
    assert score(gateway.url, "/models/second/invocations").status_code == 200
    models = httpx.get(f"{gateway.url}/models").json()["models"]
    assert {m["name"]: m["default"] for m in models} == {
        "first": True,
        "second": False,
        "third": False,
    }
    # Undeployed: the next model in deployment order takes over.
    httpx.delete(f"{gateway.url}/admin/deployments/first", headers=ADMIN_HEADERS)
    assert score(gateway.url).headers["x-flowline-model-version"] == "second/1"


def test_route_table_default_is_configured_or_first_deployed() -> None:
    table = RouteTable()
    for model in ("b", "a", "c"):
        table.set_active(Deployment(model, "1", ("http://x:1",)))
    route, _ = table.resolve_default()
    assert route is not None and route.deployment.model == "b"
    table.set_active(Deployment("b", "2", ("http://x:2",)))
    table.remove("a")
    assert table.snapshot().default_model == "b"
    assert [d.model for d in table.snapshot().deployments] == ["b", "c"]
    configured = RouteTable("c")
    configured.restore(table.snapshot())
    route, _ = configured.resolve_default()
    assert route is not None and route.deployment.model == "c"
    table.remove("b")
    route, _ = table.resolve_default()
    assert route is not None and route.deployment.model == "c"
    table.remove("c")
    assert table.resolve_default() == (None, "No model is deployed.")


def test_route_store_round_trip_permissions_and_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "home" / "gateway" / "routes.json"
    store = RouteStore(path)
    table = RouteTable()
    assert store.attach(table) is False
    table.set_active(Deployment("second", "3", ("http://x:1",)))
    table.set_active(Deployment("first", "1", ("http://x:2",)))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not [p for p in path.parent.iterdir() if p.name != "routes.json"]  # no temp file
    restored = RouteTable()
    assert RouteStore(path).attach(restored) is True
    assert restored.snapshot() == table.snapshot()
    assert restored.snapshot().default_model == "second"
    path.write_text('{"deployments": [{"version": "1"}]}')
    assert RouteStore(path).load() is None  # ignored (logged), the controller pushes


def test_bad_read_limits_stop_the_gateway_in_one_line(tmp_path: Path) -> None:
    for name, value in (
        ("FLOWLINE_BODY_TIMEOUT_S", "0"),
        ("FLOWLINE_HEADER_TIMEOUT_S", "nan"),
        ("FLOWLINE_MAX_HEADER_BYTES", "-1"),
    ):
        with pytest.raises(ValueError):
            GatewayConfig.from_env({name: value})
    config = GatewayConfig.from_env({"FLOWLINE_HOME": str(tmp_path)})
    assert config.routes_file == tmp_path.resolve() / "gateway" / "routes.json"
    assert (config.body_timeout_s, config.header_timeout_s) == (10.0, 10.0)


# --- item 12: the spec and the answers agree ---------------------------------------------------


def test_no_content_type_gets_415_and_the_spec_asks_for_rows(
    gateway: Service, replica: Service, model_dir: Path
) -> None:
    deploy(gateway, "bc", "1", replica, model_dir)
    # The deliberate difference from stock, which fails on a missing Content-Type.
    assert httpx.post(f"{replica.url}/invocations", content=BODY, timeout=30).status_code == 500
    for path in ("/invocations", "/models/bc/invocations"):
        answer = httpx.post(f"{gateway.url}{path}", content=BODY, timeout=30)
        assert answer.status_code == 415
        assert answer.headers["content-type"] == JSON
        assert answer.json()["error_code"] == "BAD_REQUEST"
        assert set(answer.json()) == {"error_code", "message"}
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    op = spec["paths"]["/invocations"]["post"]
    split = op["requestBody"]["content"]["application/json"]["schema"]["oneOf"][0]
    assert split["properties"]["dataframe_split"]["properties"]["data"]["minItems"] == 1
    assert "application/json" in op["responses"]["415"]["content"]
    # The data: [] the spec no longer admits is indeed refused.
    empty = json.dumps({"dataframe_split": {"columns": FEW_COLUMNS, "data": []}}).encode()
    refused = httpx.post(
        f"{gateway.url}/invocations", content=empty, headers={"content-type": JSON}
    )
    assert refused.status_code == 400


def test_schemathesis_finds_no_server_errors(
    gateway: Service, replica: Service, model_dir: Path, tmp_path: Path
) -> None:
    deploy(gateway, "bc", "1", replica, model_dir)
    har = tmp_path / "run.har"
    result = subprocess.run(
        [
            str(BIN / "schemathesis"),
            "run",
            f"{gateway.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "60",
            "--seed",
            "9",
            "--max-time",
            "40",
            "--request-timeout",
            "20",
            "--workers",
            "1",
            "--report",
            "har",
            "--report-har-path",
            str(har),
        ],
        env={**os.environ, "NO_COLOR": "1"},
        cwd=tmp_path,  # schemathesis keeps a .schemathesis folder in its working directory
        capture_output=True,
        text=True,
        timeout=90,
    )
    entries = json.loads(har.read_text())["log"]["entries"]
    server_errors = [
        (e["request"]["method"], e["request"]["url"], e["response"]["status"])
        for e in entries
        if e["response"]["status"] >= 500
    ]
    assert server_errors == [], server_errors
    assert result.returncode == 0, result.stdout[-3000:]
    scored = [e for e in entries if e["request"]["url"].endswith("/invocations")]
    assert len(scored) >= 100  # the run really exercised scoring
    assert any(e["response"]["status"] == 200 for e in scored)
    print(f"schemathesis: {len(entries)} requests, {len(scored)} scoring, 0 answered 5xx")


def put_route(gateway: Service, model: str, urls: list[str], model_dir: Path, **extra: object):
    """PUT a deployment on the given replica URLs (real or not) through the admin API."""
    body = deployment_from_model_dir(model, "1", urls, model_dir).to_dict() | extra
    answer = httpx.put(
        f"{gateway.url}/admin/deployments/{model}", json=body, headers=ADMIN_HEADERS, timeout=30
    )
    assert answer.status_code == 200, answer.text


def timed_scores(url: str, path: str, count: int) -> list[tuple[httpx.Response, float]]:
    """``count`` scoring calls on one keep-alive connection, each with its latency (s)."""
    out = []
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            started = time.perf_counter()
            answer = client.post(f"{url}{path}", content=BODY, headers={"content-type": JSON})
            out.append((answer, time.perf_counter() - started))
    return out


def test_a_model_without_a_healthy_replica_fails_fast_until_one_is_back(
    gateway: Service, replica: Service, model_dir: Path
) -> None:
    from common.processes import free_port

    # Nothing listens on the route's replica: the first call finds it refused and marks it
    # down; from then on the circuit is open and every call is answered at once.
    put_route(gateway, "gone", [f"http://127.0.0.1:{free_port()}"], model_dir)
    answers = timed_scores(gateway.url, "/models/gone/invocations", 30)
    for answer, _ in answers:
        assert answer.status_code == 503, answer.text
        assert answer.headers["retry-after"] == "1"
        assert answer.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    latencies = sorted(seconds for _, seconds in answers[1:])
    assert latencies[-1] < 0.05, latencies  # within 50 ms, never a timeout

    # The controller holds a real replica down: open; it marks it up: closed again.
    put_route(gateway, "bc", [replica.url], model_dir)
    assert score(gateway.url, "/models/bc/invocations").status_code == 200
    health = f"{gateway.url}/admin/replicas/health"
    down = {"url": replica.url, "healthy": False}
    httpx.post(health, json=down, headers=ADMIN_HEADERS).raise_for_status()
    held = timed_scores(gateway.url, "/models/bc/invocations", 10)
    assert [a.status_code for a, _ in held] == [503] * 10
    assert max(seconds for _, seconds in held) < 0.05
    up = {"url": replica.url, "healthy": True}
    httpx.post(health, json=up, headers=ADMIN_HEADERS).raise_for_status()
    assert score(gateway.url, "/models/bc/invocations").status_code == 200

    # A down-mark left on a URL is cleared by the next deployment the controller puts
    # there (it smoke-tested it first), so a reused port never stays offline.
    httpx.post(health, json=down, headers=ADMIN_HEADERS).raise_for_status()
    put_route(gateway, "bc", [replica.url], model_dir, version="2")
    again = score(gateway.url, "/models/bc/invocations")
    assert again.status_code == 200 and again.headers["x-flowline-model-version"] == "bc/2"


class SilentReplica:
    """A loopback server that accepts connections and reads requests but never answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()
        self._thread.join(timeout=10)


def test_a_slow_replica_is_cut_at_its_models_timeout_with_a_504(
    gateway: Service, model_dir: Path
) -> None:
    silent = SilentReplica()
    try:
        put_route(gateway, "slow", [silent.url], model_dir, timeout_s=0.5)
        listed = httpx.get(f"{gateway.url}/admin/deployments/slow", headers=ADMIN_HEADERS)
        assert listed.json()["timeout_s"] == 0.5
        ((answer, seconds),) = timed_scores(gateway.url, "/models/slow/invocations", 1)
        assert answer.status_code == 504, answer.text
        assert answer.json()["error_code"] == "DEADLINE_EXCEEDED"
        assert "did not answer within 0.5 s" in answer.json()["message"]
        assert 0.45 <= seconds < 3, seconds  # the model's 0.5 s, not the gateway's 70 s
        bad = httpx.put(
            f"{gateway.url}/admin/deployments/slow",
            json={"version": "1", "replicas": [silent.url], "timeout_s": "soon"},
            headers=ADMIN_HEADERS,
        )
        assert bad.status_code == 400 and "timeout_s" in bad.json()["message"]
    finally:
        silent.close()
