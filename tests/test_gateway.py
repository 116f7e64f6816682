"""The gateway against real `mlflow models serve` replicas on loopback.

Parity: every request format and error case gives, through the gateway, the
status, content type and body the stock scorer gives (stack traces removed).
Then batching under concurrency, limits, auth, the admin API, a blue/green
switch under load and a replica killed with SIGKILL.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.deployment import BatchingSettings
from serving.gateway import GatewayConfig, RouteTable, create_app
from serving.model_metadata import deployment_from_model_dir
from tests.conftest import Service, wait_for
from tests.helpers_serving import (
    FEW_COLUMNS,
    HeldScorer,
    breast_cancer_frame,
    save_breast_cancer_model,
    save_categorical_model,
    start_gateway,
    start_scoring_servers,
)

ADMIN = "admin-secret"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
JSON = "application/json"
ROW = [17.99, 10.38, 122.8, 1001.0, 0.1184]
ROW2 = [13.54, 14.36, 87.46, 566.3, 0.09779]
ROW_ITEMS = list(zip(FEW_COLUMNS, ROW, strict=True))


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gateway-logs")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gateway-models")
    return {
        "bc": save_breast_cancer_model(root / "bc", FEW_COLUMNS),
        "cat": save_categorical_model(root / "cat"),
    }


@pytest.fixture(scope="session")
def replicas(model_dirs: dict[str, Path], logs: Path) -> Iterator[dict[str, Service]]:
    """Four replicas started together: two of bc, one to kill, one of the categorical model."""
    names = ["bc1", "bc2", "victim", "cat"]
    dirs = [model_dirs["bc"], model_dirs["bc"], model_dirs["bc"], model_dirs["cat"]]
    servers = start_scoring_servers(dirs, logs)
    try:
        yield dict(zip(names, servers, strict=True))
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def gateway(logs: Path) -> Iterator[Service]:
    env = {
        "FLOWLINE_ADMIN_TOKEN": ADMIN,
        "FLOWLINE_DEFAULT_MODEL": "bc",
        "FLOWLINE_HEALTH_INTERVAL_S": "0.2",
    }
    server = start_gateway(logs, env=env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def strict_gateway(logs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """API keys (inline and from a file), a 2000-byte body limit and 2 requests in flight."""
    keys_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys_file.write_text("# one key per line\nkey-from-file\n")
    env = {
        "FLOWLINE_ADMIN_TOKEN": ADMIN,
        "FLOWLINE_API_KEYS": "key-one, key-two",
        "FLOWLINE_API_KEYS_FILE": str(keys_file),
        "FLOWLINE_MAX_BODY_BYTES": "2000",
        "FLOWLINE_MAX_INFLIGHT": "2",
    }
    server = start_gateway(logs, env=env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def held_scorer() -> Iterator[HeldScorer]:
    scorer = HeldScorer()
    try:
        yield scorer
    finally:
        scorer.stop()


def deploy(
    gateway: Service,
    model: str,
    version: str,
    replicas: list[str],
    model_dir: Path | None,
    batching: BatchingSettings | None = None,
) -> httpx.Response:
    """PUT a deployment through the admin API."""
    if model_dir is not None:
        body = deployment_from_model_dir(model, version, replicas, model_dir, batching).to_dict()
    else:
        body = {"version": version, "replicas": replicas}
    answer = httpx.put(
        f"{gateway.url}/admin/deployments/{model}",
        json=body,
        headers=ADMIN_HEADERS,
        timeout=30,
    )
    return answer


@pytest.fixture
def bc_on_bc1(
    gateway: Service, replicas: dict[str, Service], model_dirs: dict[str, Path]
) -> Service:
    """bc version 1 served by replica bc1 (the stock server parity compares against)."""
    deploy(gateway, "bc", "1", [replicas["bc1"].url], model_dirs["bc"]).raise_for_status()
    return replicas["bc1"]


def post(url: str, body: bytes, content_type: str | None, **headers: str) -> httpx.Response:
    if content_type is not None:
        headers["content-type"] = content_type
    return httpx.post(url, content=body, headers=headers, timeout=30)


def assert_same_answer(stock: httpx.Response, ours: httpx.Response) -> None:
    """Same status, content type and body; the stock body's stack trace is not relayed."""
    assert ours.status_code == stock.status_code, ours.text
    assert ours.headers.get("content-type") == stock.headers.get("content-type")
    assert "Traceback" not in ours.text
    if stock.headers.get("content-type") == JSON:
        expected = stock.json()
        if isinstance(expected, dict):
            expected.pop("stack_trace", None)
        assert ours.json() == expected
    else:
        assert ours.content == stock.content


def metric_values(gateway: Service) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return values


def metric(values: dict, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in values.items() if n == name and wanted <= ls)


def frame_bytes(fmt: str, rows: list[list[float]], columns: list[str] = FEW_COLUMNS) -> bytes:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=columns)
    if fmt == "csv":
        return frame.to_csv(index=False).encode()
    buffer = io.BytesIO()
    frame.to_parquet(buffer)
    return buffer.getvalue()


def split(rows: list[list[Any]], columns: list[str] = FEW_COLUMNS, **extra: Any) -> bytes:
    return json.dumps({"dataframe_split": {"columns": columns, "data": rows}, **extra}).encode()


def records(rows: list[list[Any]], columns: list[str] = FEW_COLUMNS) -> bytes:
    return json.dumps(
        {"dataframe_records": [dict(zip(columns, r, strict=True)) for r in rows]}
    ).encode()


# --- parity ------------------------------------------------------------------------------------

PARITY_CASES: dict[str, tuple[bytes | str, str | None]] = {
    "split": (split([ROW, ROW2]), JSON),
    "split_ints": (split([[17, 10, 122, 1001, 0]]), JSON),
    "split_with_index": (json.dumps({"dataframe_split": {"columns": FEW_COLUMNS,
                                                         "data": [ROW], "index": [7]}}), JSON),
    "records": (records([ROW, ROW2]), JSON),
    "instances": (json.dumps({"instances": [dict(zip(FEW_COLUMNS, ROW, strict=True))]}), JSON),
    "inputs": (json.dumps({"inputs": {c: [v] for c, v in ROW_ITEMS}}), JSON),
    "params": (split([ROW], params={"threshold": 0.3}), JSON),
    "charset_utf8": (split([ROW]), "application/json; charset=utf-8"),
    "null_value": (split([ROW[:4] + [None]]), JSON),
    "string_value": (split([ROW[:4] + ["abc"]]), JSON),
    "infinity": (split([ROW[:4] + [math.inf]]), JSON),
    "missing_column": (split([ROW[:4]], FEW_COLUMNS[:4]), JSON),
    "extra_column": (split([ROW + [1.0]], FEW_COLUMNS + ["extra"]), JSON),
    "no_rows": (split([]), JSON),
    "invalid_json": (b"{not json", JSON),
    "not_utf8": (b'{"dataframe_split": "\xff"}', JSON),
    "json_list": (b"[1, 2]", JSON),
    "two_formats": (json.dumps({"dataframe_split": {}, "instances": []}), JSON),
    "no_format": (json.dumps({"foo": 1}), JSON),
    "empty_body": (b"", JSON),
    "csv": (frame_bytes("csv", [ROW, ROW2]), "text/csv"),
    "csv_wrong_columns": (b"a,b\n1,2\n", "text/csv"),
    "parquet": (frame_bytes("parquet", [ROW, ROW2]), "application/vnd.apache.parquet"),
    "parquet_garbage": (b"garbage", "application/vnd.apache.parquet"),
    "text_plain": (b"x", "text/plain"),
    "charset_latin1": (split([ROW]), "application/json; charset=latin-1"),
    "unknown_content_param": (split([ROW]), "application/json; foo=bar"),
}  # fmt: skip
# Not parity on purpose: without Content-Type stock answers 500, the gateway 415
# (tests/test_gateway_hardening.py).


@pytest.mark.parametrize("case", sorted(PARITY_CASES))
def test_parity_with_stock_scorer(case: str, gateway: Service, bc_on_bc1: Service) -> None:
    body, content_type = PARITY_CASES[case]
    data = body.encode() if isinstance(body, str) else body
    stock = post(f"{bc_on_bc1.url}/invocations", data, content_type)
    for path in ("/invocations", "/models/bc/invocations"):
        ours = post(f"{gateway.url}{path}", data, content_type)
        assert_same_answer(stock, ours)
        assert ours.headers["x-flowline-model-version"] == "bc/1"


CATEGORICAL_CASES = {
    "known_and_unknown_colour": [
        {"colour": "red", "x": 1.0, "y": 2.0},
        {"colour": "purple", "x": -1.0, "y": 0.5},
    ],
    "null_colour": [{"colour": None, "x": 1.0, "y": 2.0}],
    "number_as_colour": [{"colour": 5, "x": 1.0, "y": 2.0}],
    "missing_x": [{"colour": "red", "y": 2.0}],
}


@pytest.mark.parametrize("case", sorted(CATEGORICAL_CASES))
def test_parity_with_a_string_column(
    case: str,
    gateway: Service,
    replicas: dict[str, Service],
    model_dirs: dict[str, Path],
) -> None:
    deploy(gateway, "cat", "4", [replicas["cat"].url], model_dirs["cat"]).raise_for_status()
    body = json.dumps({"dataframe_records": CATEGORICAL_CASES[case]}).encode()
    stock = post(f"{replicas['cat'].url}/invocations", body, JSON)
    ours = post(f"{gateway.url}/models/cat/invocations", body, JSON)
    assert_same_answer(stock, ours)
    assert ours.headers["x-flowline-model-version"] == "cat/4"


# --- batching ----------------------------------------------------------------------------------


async def fire(url: str, bodies: list[bytes], headers: dict[str, str] | None = None):
    """Send all bodies at once on separate connections; return the responses in order."""
    limits = httpx.Limits(max_connections=len(bodies))
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        return await asyncio.gather(*(
            client.post(url, content=b, headers={"content-type": JSON, **(headers or {})})
            for b in bodies
        ))  # fmt: skip


def distinct_requests(count: int) -> list[bytes]:
    """`count` bodies with different rows (1 to 3 each), split and records mixed."""
    features, _ = breast_cancer_frame(FEW_COLUMNS)
    rows = features.values.tolist()
    bodies = []
    for i in range(count):
        chunk = rows[i * 3 : i * 3 + 1 + i % 3]
        bodies.append(split(chunk) if i % 2 == 0 else records(chunk))
    return bodies


def test_concurrent_requests_are_batched_and_get_their_own_rows(
    gateway: Service, bc_on_bc1: Service
) -> None:
    bodies = distinct_requests(32)
    expected = [post(f"{bc_on_bc1.url}/invocations", b, JSON).json() for b in bodies]
    assert {p for e in expected for p in e["predictions"]} == {0, 1}  # alignment is visible
    before = metric_values(gateway)
    answers = asyncio.run(fire(f"{gateway.url}/invocations", bodies))
    after = metric_values(gateway)
    for answer, want in zip(answers, expected, strict=True):
        assert answer.status_code == 200
        assert answer.json() == want
        assert answer.headers["x-flowline-model-version"] == "bc/1"
    labels = {"model": "bc", "version": "1"}
    calls = metric(after, "flowline_gateway_backend_calls_total", **labels) - metric(
        before, "flowline_gateway_backend_calls_total", **labels
    )
    merged = metric(after, "flowline_gateway_batch_requests_count", **labels) - metric(
        before, "flowline_gateway_batch_requests_count", **labels
    )
    assert calls < len(bodies)
    assert merged >= 1
    assert any(int(a.headers.get("x-flowline-batch-size", "1")) > 1 for a in answers)


def test_a_bad_request_does_not_fail_its_batch_mates(gateway: Service, bc_on_bc1: Service) -> None:
    bodies = distinct_requests(24)
    # Same columns and value kinds as the good ones, so they are merged with them,
    # and the merged call fails: infinity is rejected by the model.
    bad = split([ROW[:4] + [math.inf]])
    for position in (3, 9, 15, 21):
        bodies.insert(position, bad)
    bodies.insert(12, split([ROW[:4]], FEW_COLUMNS[:4]))  # missing column: never merged
    expected = [post(f"{bc_on_bc1.url}/invocations", b, JSON) for b in bodies]
    before = metric_values(gateway)
    answers = asyncio.run(fire(f"{gateway.url}/invocations", bodies))
    after = metric_values(gateway)
    for answer, want in zip(answers, expected, strict=True):
        assert_same_answer(want, answer)
    assert sum(a.status_code == 200 for a in answers) == 24
    fallbacks = metric(
        after, "flowline_gateway_backend_calls_total", model="bc", kind="fallback"
    ) - metric(before, "flowline_gateway_backend_calls_total", model="bc", kind="fallback")
    assert fallbacks >= 1


# --- security and limits -----------------------------------------------------------------------


def test_api_keys_are_required_for_scoring_and_models(
    strict_gateway: Service,
    replicas: dict[str, Service],
    model_dirs: dict[str, Path],
) -> None:
    deploy(strict_gateway, "bc", "1", [replicas["bc1"].url], model_dirs["bc"]).raise_for_status()
    url = f"{strict_gateway.url}/invocations"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
        answer = post(url, split([ROW]), JSON, **headers)
        assert answer.status_code == 401
        assert answer.json()["error_code"] == "UNAUTHENTICATED"
        assert answer.headers["www-authenticate"] == "Bearer"
    for key in ("key-one", "key-two", "key-from-file"):
        answer = post(url, split([ROW]), JSON, Authorization=f"Bearer {key}")
        assert answer.status_code == 200, answer.text
    assert httpx.get(f"{strict_gateway.url}/models").status_code == 401
    listed = httpx.get(f"{strict_gateway.url}/models", headers={"Authorization": "Bearer key-two"})
    assert listed.status_code == 200
    assert httpx.get(f"{strict_gateway.url}/ping").status_code == 200
    assert httpx.get(f"{strict_gateway.url}/health").status_code == 200


def test_body_limit_answers_413(strict_gateway: Service) -> None:
    auth = {"Authorization": "Bearer key-one"}
    big = split([ROW] * 100)
    assert len(big) > 2000
    answer = post(f"{strict_gateway.url}/invocations", big, JSON, **auth)
    assert answer.status_code == 413
    assert answer.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    streamed = httpx.post(
        f"{strict_gateway.url}/invocations",
        content=chunks(),
        headers={"content-type": JSON, **auth},
    )
    assert streamed.status_code == 413


def test_concurrency_limit_answers_503_instead_of_queueing(
    strict_gateway: Service, held_scorer: HeldScorer
) -> None:
    deploy(strict_gateway, "held", "1", [held_scorer.url], None).raise_for_status()
    url = f"{strict_gateway.url}/models/held/invocations"
    auth = {"Authorization": "Bearer key-one"}
    results: list[int] = []

    def call() -> None:
        results.append(post(url, split([ROW]), JSON, **auth).status_code)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: held_scorer.received == 2, "two requests held", 20)
        refused = post(url, split([ROW]), JSON, **auth)
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    finally:
        held_scorer.release.set()
        for thread in threads:
            thread.join(timeout=30)
    assert results == [200, 200]


# --- admin API, models, docs, metrics ---------------------------------------------------------


def test_admin_api_contract(
    gateway: Service, replicas: dict[str, Service], model_dirs: dict[str, Path]
) -> None:
    base = f"{gateway.url}/admin"
    assert httpx.get(f"{base}/deployments").status_code == 401
    assert (
        httpx.get(f"{base}/deployments", headers={"Authorization": "Bearer no"}).status_code == 401
    )
    bad = httpx.put(f"{base}/deployments/tmp", content=b"{", headers=ADMIN_HEADERS)
    assert bad.status_code == 400 and bad.json()["error_code"] == "INVALID_PARAMETER_VALUE"
    missing = httpx.put(f"{base}/deployments/tmp", json={"version": "1"}, headers=ADMIN_HEADERS)
    assert missing.status_code == 400

    assert httpx.get(f"{base}/deployments/tmp", headers=ADMIN_HEADERS).status_code == 404

    bc2 = replicas["bc2"].url
    created = deploy(gateway, "tmp", "7", [bc2], model_dirs["bc"])
    assert created.status_code == 200, created.text
    assert created.json()["deployment"]["version"] == "7"
    assert created.json()["previous"] is None
    listed = httpx.get(f"{base}/deployments", headers=ADMIN_HEADERS).json()
    tmp = next(d for d in listed["deployments"] if d["model"] == "tmp")
    assert set(tmp) >= {"model", "version", "replicas", "input_example", "signature",
                        "batching", "since"}  # fmt: skip
    assert post(f"{gateway.url}/models/tmp/invocations", split([ROW]), JSON).status_code == 200
    inflight = httpx.get(f"{base}/inflight", params={"replica": bc2}, headers=ADMIN_HEADERS)
    assert inflight.json() == {"replica": bc2, "inflight": 0, "generation": 0}

    marked = httpx.post(f"{base}/replicas/health", json={"url": bc2, "healthy": False},
                        headers=ADMIN_HEADERS)  # fmt: skip
    assert marked.json() == {"url": bc2, "healthy": False}
    models = httpx.get(f"{gateway.url}/models").json()["models"]
    assert next(m for m in models if m["name"] == "tmp")["state"] == "unavailable"
    httpx.post(f"{base}/replicas/health", json={"url": bc2, "healthy": True},
               headers=ADMIN_HEADERS).raise_for_status()  # fmt: skip

    assert httpx.delete(f"{base}/deployments/tmp", headers=ADMIN_HEADERS).status_code == 200
    assert httpx.delete(f"{base}/deployments/tmp", headers=ADMIN_HEADERS).status_code == 404
    gone = post(f"{gateway.url}/models/tmp/invocations", split([ROW]), JSON)
    assert gone.status_code == 404 and gone.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"


def test_models_openapi_and_docs(gateway: Service, bc_on_bc1: Service) -> None:
    models = httpx.get(f"{gateway.url}/models").json()["models"]
    bc = next(m for m in models if m["name"] == "bc")
    assert bc["version"] == "1" and bc["state"] == "ready" and bc["default"] is True
    assert bc["replicas"][0]["url"] == bc_on_bc1.url
    assert {"since", "last_error", "batching"} <= set(bc)

    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    op = spec["paths"]["/models/bc/invocations"]["post"]
    records_schema = op["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]
    props = records_schema["properties"]["dataframe_records"]["items"]["properties"]
    assert list(props) == FEW_COLUMNS
    assert all(p == {"type": "number", "format": "double"} for p in props.values())
    assert "dataframe_split" in op["requestBody"]["content"]["application/json"]["example"]

    docs = httpx.get(f"{gateway.url}/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert all(c in docs.text for c in FEW_COLUMNS)
    # Swagger UI now, its scripts served by the gateway itself: nothing from a CDN.
    assert '<script src="docs/assets/swagger-ui-bundle.js">' in docs.text
    assert 'url: "openapi.json"' in docs.text
    assert "https://" not in docs.text and "http://" not in docs.text.replace("http://HOST", "")
    bundle = httpx.get(f"{gateway.url}/docs/assets/swagger-ui-bundle.js")
    assert bundle.status_code == 200 and "SwaggerUIBundle" in bundle.text


def test_metrics_count_requests_errors_and_latency(gateway: Service, bc_on_bc1: Service) -> None:
    labels = {"model": "bc", "version": "1"}
    before = metric_values(gateway)
    assert post(f"{gateway.url}/invocations", split([ROW]), JSON).status_code == 200
    assert post(f"{gateway.url}/invocations", b"{", JSON).status_code == 400
    after = metric_values(gateway)

    def delta(name: str, **more: str) -> float:
        return metric(after, name, **labels, **more) - metric(before, name, **labels, **more)

    assert delta("flowline_gateway_requests_total", code="200") == 1
    assert delta("flowline_gateway_requests_total", code="400") == 1
    assert delta("flowline_gateway_errors_total", source="replica") == 1
    assert delta("flowline_gateway_request_duration_seconds_count") == 2
    assert metric(after, "flowline_gateway_replica_up", replica=bc_on_bc1.url) == 1


def test_invocations_keeps_the_first_model_when_several_are_deployed(
    logs: Path, replicas: dict[str, Service], model_dirs: dict[str, Path]
) -> None:
    gateway = start_gateway(logs, env={"FLOWLINE_ADMIN_TOKEN": ADMIN})
    try:
        deploy(gateway, "a", "1", [replicas["bc1"].url], model_dirs["bc"]).raise_for_status()
        assert post(f"{gateway.url}/invocations", split([ROW]), JSON).status_code == 200
        deploy(gateway, "b", "1", [replicas["bc2"].url], model_dirs["bc"]).raise_for_status()
        answer = post(f"{gateway.url}/invocations", split([ROW]), JSON)
        assert answer.status_code == 200
        assert answer.headers["x-flowline-model-version"] == "a/1"
        assert post(f"{gateway.url}/models/b/invocations", split([ROW]), JSON).status_code == 200
        assert post(f"{gateway.url}/models/c/invocations", split([ROW]), JSON).status_code == 404
    finally:
        gateway.stop()


# --- capture hook ------------------------------------------------------------------------------


def test_capture_hook_runs_off_the_hot_path(bc_on_bc1: Service, model_dirs) -> None:
    """The hook only proceeds once the client has its answer: awaiting it would deadlock."""

    async def scenario() -> None:
        answered = asyncio.Event()
        captured: list[tuple[Any, ...]] = []

        async def on_scored(model: str, version: str, request: Any, predictions: Any) -> None:
            await answered.wait()
            captured.append((model, version, request, predictions))

        table = RouteTable()
        table.set_active(deployment_from_model_dir("bc", "1", [bc_on_bc1.url], model_dirs["bc"]))
        app = create_app(GatewayConfig(), table, on_scored=on_scored)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answer = await asyncio.wait_for(
                client.post("/invocations", content=split([ROW, ROW2]),
                            headers={"content-type": JSON}),
                timeout=30,
            )  # fmt: skip
            assert answer.status_code == 200
            answered.set()
            deadline = time.monotonic() + 10
            while not captured and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        await app.state.gateway.replicas.aclose()
        assert len(captured) == 1
        model, version, request, predictions = captured[0]
        assert (model, version) == ("bc", "1")
        assert predictions == answer.json()["predictions"]
        frame = await asyncio.to_thread(request.to_frame)
        assert list(frame.columns) == FEW_COLUMNS and len(frame) == 2

    asyncio.run(scenario())


# --- blue/green and failures -------------------------------------------------------------------


class Load:
    """Threads posting single-row requests until stopped (bounded in count and time)."""

    def __init__(self, url: str, threads: int = 4, limit: int = 5000, seconds: float = 60) -> None:
        self.url = url
        self.results: list[tuple[float, int, str]] = []  # (start time, status, version)
        self._stop = threading.Event()
        self._limit = limit
        self._deadline = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]

    def _run(self, seed: int) -> None:
        features, _ = breast_cancer_frame(FEW_COLUMNS)
        rows = features.values.tolist()
        with httpx.Client(timeout=30) as client:
            i = seed
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                with self._lock:
                    if len(self.results) >= self._limit:
                        return
                started = time.monotonic()
                try:
                    answer = client.post(self.url, content=split([rows[i % len(rows)]]),
                                         headers={"content-type": JSON})  # fmt: skip
                    outcome = (started, answer.status_code,
                               answer.headers.get("x-flowline-model-version", ""))  # fmt: skip
                except httpx.HTTPError as exc:
                    outcome = (started, 0, repr(exc))
                with self._lock:
                    self.results.append(outcome)
                i += 4

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def count(self) -> int:
        with self._lock:
            return len(self.results)

    def wait_for_more(self, n: int, timeout: float = 30) -> None:
        target = self.count() + n
        wait_for(lambda: self.count() >= target, f"{n} more answers", timeout)


def test_switch_under_load_loses_no_request(
    gateway: Service, replicas: dict[str, Service], model_dirs: dict[str, Path]
) -> None:
    bc1, bc2 = replicas["bc1"].url, replicas["bc2"].url
    deploy(gateway, "bc", "1", [bc1], model_dirs["bc"]).raise_for_status()
    with Load(f"{gateway.url}/invocations") as load:
        load.wait_for_more(40)
        switched = deploy(gateway, "bc", "2", [bc2], model_dirs["bc"])
        switched_at = time.monotonic()
        assert switched.status_code == 200 and switched.json()["previous"]["version"] == "1"

        def drained() -> bool:
            answer = httpx.get(f"{gateway.url}/admin/inflight", params={"replica": bc1},
                               headers=ADMIN_HEADERS)  # fmt: skip
            return answer.json()["inflight"] == 0

        wait_for(drained, "the old replica to drain", 20)
        load.wait_for_more(40)
    statuses = [status for _, status, _ in load.results]
    assert statuses.count(200) == len(statuses), {s for s in statuses if s != 200}
    versions = [v for _, _, v in load.results]
    assert versions[0] == "bc/1" and versions[-1] == "bc/2"
    # Everything that started after the switch was answered by the new version.
    assert {v for started, _, v in load.results if started > switched_at} == {"bc/2"}


def test_sigkilled_replica_is_routed_around(
    gateway: Service, replicas: dict[str, Service], model_dirs: dict[str, Path]
) -> None:
    victim = replicas["victim"]
    deploy(
        gateway, "bc", "3", [victim.url, replicas["bc2"].url], model_dirs["bc"]
    ).raise_for_status()
    with Load(f"{gateway.url}/invocations") as load:
        load.wait_for_more(40)
        victim.kill()
        killed_at = load.count()
        load.wait_for_more(80)
    statuses = [status for _, status, _ in load.results]
    assert statuses.count(200) == len(statuses), load.results[killed_at - 5 : killed_at + 20]
    models = httpx.get(f"{gateway.url}/models").json()["models"]
    bc = next(m for m in models if m["name"] == "bc")
    states = {r["url"]: r["healthy"] for r in bc["replicas"]}
    assert states == {victim.url: False, replicas["bc2"].url: True}
    assert bc["state"] == "degraded"
