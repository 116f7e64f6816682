"""POST /ingest is hardened: a bearer token, whole-batch checks with 422s that name the bad
records, bounded streams checked against the registry, and owner-only files. In-process
(the ASGI app) for the rules, a real monitor process for the token file, the file modes
and the capture client's handling of refusals."""

from __future__ import annotations

import asyncio
import json
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.processes import free_port
from monitoring.capture.client import CaptureClient, client_from_env
from monitoring.capture.token import TOKEN_FILE
from monitoring.service.monitor import Monitor
from monitoring.service.server import create_app
from monitoring.service.settings import MonitorSettings
from monitoring.service.store import MonitorStore
from monitoring.service.stream_gate import registry_lookup
from serving.gateway.capture import CapturedRequest
from tests.conftest import Service, wait_for
from tests.helpers_monitor import INGEST_TOKEN, start_monitor

TOKEN = "s3cret-token"
AUTH = {"authorization": f"Bearer {TOKEN}"}
BODY = json.dumps({"dataframe_split": {"columns": ["x"], "data": [[1], [2]]}})


def record(i: int, model: str = "churn", version: str = "1", **extra: Any) -> dict[str, Any]:
    """A valid capture record of a two-row request."""
    return {
        "id": f"r-{uuid.uuid4().hex[:8]}-{i}",
        "model": model,
        "version": version,
        "time": 1.8e9 + i,
        "content_type": "application/json",
        "body": BODY,
        "predictions": ["a", "b"],
        **extra,
    }


def batch(records: list[dict[str, Any]], dropped: list[Any] | None = None) -> dict[str, Any]:
    return {"client": {"id": "c", "dropped": dropped or []}, "records": records}


def make_monitor(tmp_path: Path, **settings: Any) -> Monitor:
    config = MonitorSettings(home=tmp_path, mlflow_enabled=False, **settings)
    return Monitor(config, public_url="http://mon")


def call(monitor: Monitor, *requests: tuple[str, str, dict[str, Any]], token: str | None = TOKEN):
    """Run requests (method, path, httpx kwargs) against the app; the answers."""

    async def scenario() -> list[httpx.Response]:
        app = create_app(monitor, manage_threads=False, ingest_token=token)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://mon") as api:
            return [await api.request(method, path, **kw) for method, path, kw in requests]

    return asyncio.run(scenario())


def post(monitor: Monitor, body: Any, headers: dict[str, str] | None = None, **kw: Any):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    [answer] = call(
        monitor, ("POST", "/ingest", {"content": content, "headers": headers or AUTH}), **kw
    )
    return answer


def stored_rows(monitor: Monitor) -> int:
    return sum(s.rows_total for s in monitor.store.streams())


# --- the credential -------------------------------------------------------------------------


def test_ingest_without_the_right_bearer_token_is_refused_and_stores_nothing(
    tmp_path: Path,
) -> None:
    monitor = make_monitor(tmp_path)
    body = batch([record(0)])
    for headers in (
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": TOKEN},
        {"authorization": f"Basic {TOKEN}"},
    ):
        answer = post(monitor, body, headers=headers or {"x": "y"})
        assert answer.status_code == 401, headers
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert "token" in answer.json()["error"]
    # A monitor app built without a token takes nothing, whatever is sent.
    assert post(monitor, body, token=None).status_code == 401
    assert post(monitor, body, token="").status_code == 401
    assert stored_rows(monitor) == 0
    assert post(monitor, body).status_code == 200
    assert stored_rows(monitor) == 2


# --- what a batch may say -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"rows": 10**12}, "rows must be an integer"),
        ({"rows": 2**70}, "rows must be an integer"),
        ({"rows": 5}, "says rows=5 but its request has 2 rows"),
        ({"rows": -1}, "rows must be an integer"),
        ({"model": "a\x00b"}, "record model must be printable"),
        ({"model": "\ud800x"}, "record model must be printable"),
        ({"model": "m" * 300}, "at most 255 characters"),
        ({"version": "1\x1b[31m"}, "record version must be printable"),
        ({"time": 1e300}, "record time must be Unix seconds"),
        ({"body": "caf\udce9"}, "lone surrogate"),
        ({"request_id": "x" * 200}, "request_id"),
    ],
)
def test_a_batch_with_one_invalid_record_is_refused_whole_naming_it(
    tmp_path: Path, change: dict[str, Any], expected: str
) -> None:
    monitor = make_monitor(tmp_path)
    records = [record(i) for i in range(5)]
    records[3] = {**records[3], **change}
    # ensure_ascii: a lone surrogate travels as a \ud800 escape, as an attacker would send it.
    answer = post(monitor, json.dumps(batch(records)).encode())
    assert answer.status_code == 422
    doc = answer.json()
    assert "nothing was stored" in doc["error"] and expected in doc["error"]
    assert [(p["index"], p["id"]) for p in doc["invalid"]] == [(3, records[3]["id"])]
    assert doc["truncated"] is False
    assert stored_rows(monitor) == 0 and monitor.store.streams() == []
    # The sender keeps the batch: without the named record it is taken.
    good = [r for i, r in enumerate(records) if i != 3]
    assert post(monitor, batch(good)).json()["rows"] == 8
    assert "\x00" not in call(monitor, ("GET", "/metrics", {}))[0].text


@pytest.mark.parametrize(
    "dropped",
    [
        [{"model": "churn", "version": "1", "records": -100}],
        [{"model": "churn", "version": "1", "records": 10**30}],
        [{"model": "churn", "version": "1", "records": "7"}],
        [{"model": "churn", "version": "1", "records": True}],
        [{"model": "a\x00", "version": "1", "records": 1}],
        ["junk"],
        [{"model": "churn", "version": "1", "records": 1}] * 1001,
    ],
)
def test_an_invalid_drop_report_is_refused_and_nothing_is_stored(
    tmp_path: Path, dropped: list[Any]
) -> None:
    monitor = make_monitor(tmp_path)
    answer = post(monitor, batch([record(0)], dropped))
    assert answer.status_code == 422
    assert answer.json()["field"] == "client" and "drop report" in answer.json()["error"]
    assert stored_rows(monitor) == 0


def test_drop_counts_are_bounded_and_cannot_open_a_stream(tmp_path: Path) -> None:
    monitor = make_monitor(tmp_path)
    ok = post(
        monitor,
        batch(
            [record(0)],
            [
                {"model": "churn", "version": "1", "records": 10**9},
                {"model": "forged", "version": "9", "records": 5},
            ],
        ),
    )
    assert ok.status_code == 200 and ok.json()["dropped_ignored"] == 5
    assert [(s.model, s.dropped_total) for s in monitor.store.streams()] == [("churn", 10**9)]
    assert "forged" not in call(monitor, ("GET", "/metrics", {}))[0].text


def test_bodies_that_are_not_a_batch_get_400_and_too_many_records_413(tmp_path: Path) -> None:
    monitor = make_monitor(tmp_path)
    for body in (b"nope", b'{"records": 3}', b"\xff\xfe", b'"x"'):
        answer = post(monitor, body)
        assert answer.status_code == 400 and answer.json()["error"]
    answer = post(monitor, batch([{"id": str(i)} for i in range(20_001)]))
    assert answer.status_code == 413 and "at most 20000" in answer.json()["error"]


def test_nul_in_a_body_is_kept_losslessly(tmp_path: Path) -> None:
    # PostgreSQL text cannot hold NUL: such a body is stored as base64 of its UTF-8.
    import base64

    monitor = make_monitor(tmp_path)
    body = "c\na\x00b\n"
    assert post(monitor, batch([record(0, body=body, content_type="text/csv")])).status_code == 200
    [pending] = monitor.store.pending("churn", "1", 0, 10)
    [stored] = monitor.store.records("churn", "1", pending.id, pending.id)
    assert stored.body_encoding == "base64"
    assert base64.b64decode(stored.body).decode() == body


# --- streams ---------------------------------------------------------------------------


def test_a_batch_of_999_new_model_versions_is_refused_not_a_500(tmp_path: Path) -> None:
    monitor = make_monitor(tmp_path)
    records = [record(i, model=f"m{i}") for i in range(999)]
    answer = post(monitor, batch(records))
    assert answer.status_code == 422
    assert "opens 999 new model versions; at most 32" in answer.json()["error"]
    assert "invalid" not in answer.json()  # no record is at fault: the sender splits the batch
    assert monitor.store.streams() == []
    assert post(monitor, batch(records[:32])).status_code == 200


def test_the_store_takes_1200_new_streams_in_one_batch(tmp_path: Path) -> None:
    # The stream lookup used to be one OR of every pair: too deep for SQLite at ~1000.
    store = MonitorStore(f"sqlite:///{tmp_path / 'monitor.db'}")
    try:
        result = store.ingest([record(i, model=f"m{i}") for i in range(1200)])
        assert result.new_records == 1200 and len(store.streams()) == 1200
    finally:
        store.close()
    reopened = MonitorStore(f"sqlite:///{tmp_path / 'monitor.db'}")
    try:
        assert len(reopened.known_streams()) == 1200
    finally:
        reopened.close()


def test_the_monitor_holds_at_most_max_streams(tmp_path: Path) -> None:
    monitor = make_monitor(tmp_path, max_streams=3)
    assert post(monitor, batch([record(i, model=f"m{i}") for i in range(3)])).status_code == 200
    answer = post(monitor, batch([record(7, model="m0"), record(8, model="m9")]))
    assert answer.status_code == 422
    [refused] = answer.json()["invalid"]
    assert refused["index"] == 1 and "already tracks 3 model versions" in refused["error"]
    assert post(monitor, batch([record(9, model="m1")])).status_code == 200  # known: fine
    assert len(monitor.store.streams()) == 3


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A real MLflow registry (SQLite store) holding churn v1 and v2."""
    from mlflow import MlflowClient

    home = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("churn")
    for _ in range(2):
        client.create_model_version("churn", source=str(home))
    return uri


def test_new_streams_must_exist_in_the_registry(tmp_path: Path, registry: str) -> None:
    monitor = make_monitor(tmp_path, tracking_uri=registry)
    records = [record(0), record(1, version="2"), record(2, version="3"), record(3, "fraud")]
    answer = post(monitor, batch(records))
    assert answer.status_code == 422
    assert [(p["index"], p["error"]) for p in answer.json()["invalid"]] == [
        (2, "model version churn/3 is not in the registry"),
        (3, "model version fraud/1 is not in the registry"),
    ]
    assert post(monitor, batch(records[:2])).json()["rows"] == 4


def test_an_unreachable_registry_does_not_stop_capture() -> None:
    lookup = registry_lookup(f"http://127.0.0.1:{free_port()}")
    assert lookup is not None
    started = time.monotonic()
    assert lookup("churn", "1") is None  # cannot tell: the stream is taken on, bounded by the cap
    assert time.monotonic() - started < 5
    assert registry_lookup("") is None


# --- read endpoints ----------------------------------------------------------------------


def test_out_of_range_window_ids_and_unstorable_names_are_404(tmp_path: Path) -> None:
    monitor = make_monitor(tmp_path)
    paths = [
        f"/reports/churn/{2**63}",
        f"/reports/churn/{2**70}",
        f"/drift/churn/windows/{2**64}",
        "/reports/churn/0",
        "/reports/a%00b/1",
        "/drift/a%00b",
        "/drift/churn?version=%00",
        f"/drift/{'m' * 300}",
    ]
    for path, answer in zip(paths, call(monitor, *[("GET", p, {}) for p in paths]), strict=True):
        assert answer.status_code == 404, (path, answer.status_code)


# --- a real monitor process: the token file, file modes, the capture client ----------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def monitor_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path]]:
    """A monitor started without FLOWLINE_INGEST_TOKEN: it makes its own token file."""
    workdir = tmp_path_factory.mktemp("hardened-monitor")
    home = workdir / "home"
    env = {
        "FLOWLINE_HOME": str(home),
        "FLOWLINE_INGEST_TOKEN": "",
        "MLFLOW_TRACKING_URI": "",
        "FLOWLINE_MONITOR_MLFLOW": "0",
        "FLOWLINE_WINDOW_SECONDS": "3600",
    }
    service = start_monitor(workdir, env)
    try:
        yield service, home
    finally:
        service.stop()


def scored(i: int) -> CapturedRequest:
    body = json.dumps({"dataframe_split": {"columns": ["x"], "data": [[i]]}}).encode()
    return CapturedRequest(body, "application/json", time.time())


def rows_at(url: str, model: str) -> int:
    answer = httpx.get(f"{url}/drift/{model}", timeout=10)
    return answer.json()["rows_captured"] if answer.status_code == 200 else 0


def test_the_monitor_makes_a_private_token_and_private_files(
    monitor_process: tuple[Service, Path],
) -> None:
    service, home = monitor_process
    token_file = home / TOKEN_FILE
    assert mode(home) == 0o700 and mode(token_file) == 0o600
    assert len(token_file.read_text().strip()) >= 32
    answer = httpx.post(f"{service.url}/ingest", json=batch([record(0)]), timeout=10)
    assert answer.status_code == 401
    token = {"authorization": f"Bearer {token_file.read_text().strip()}"}
    answer = httpx.post(f"{service.url}/ingest", json=batch([record(0)]), headers=token, timeout=10)
    assert answer.status_code == 200
    db_files = [p for p in home.iterdir() if p.name.startswith("monitor.db")]
    assert {p.name for p in db_files} >= {"monitor.db", "monitor.db-wal", "monitor.db-shm"}
    assert all(mode(p) == 0o600 for p in db_files), {p.name: oct(mode(p)) for p in db_files}


def test_the_capture_client_reads_the_token_from_the_home_and_keeps_private_spools(
    monitor_process: tuple[Service, Path],
) -> None:
    service, home = monitor_process
    model = f"m-{uuid.uuid4().hex[:6]}"
    client = client_from_env(
        {
            "FLOWLINE_MONITOR_URL": service.url,
            "FLOWLINE_HOME": str(home),
            "FLOWLINE_CAPTURE_FLUSH_S": "0.05",
        }
    )
    assert client is not None
    try:
        for i in range(20):
            client.submit(model, "1", scored(i), [0])
        assert client.flush(20)
    finally:
        client.close(timeout=2)
    assert rows_at(service.url, model) == 20
    spool = home / "capture-spool"
    assert mode(spool) == 0o700
    assert all(mode(p) == 0o600 for p in spool.iterdir())


def test_a_refused_token_keeps_records_spooled_until_it_is_right(
    monitor_process: tuple[Service, Path], tmp_path: Path
) -> None:
    service, home = monitor_process
    model = f"m-{uuid.uuid4().hex[:6]}"
    token = {"value": "wrong"}
    client = CaptureClient(
        service.url,
        tmp_path / "spool",
        flush_interval_s=0.05,
        max_backoff_s=0.2,
        token=lambda: token["value"],
    )
    client.start()
    try:
        for i in range(30):
            client.submit(model, "1", scored(i), [0])
        wait_for(lambda: client.stats()["delivery_failures"] >= 2, "refused deliveries")
        assert client.stats()["records_dropped"] == 0 and client.spool.dead_count() == 0
        assert client.stats()["spool_pending"] == 30 and rows_at(service.url, model) == 0
        token["value"] = (home / TOKEN_FILE).read_text().strip()
        assert client.flush(20)
    finally:
        client.close(timeout=2)
    assert rows_at(service.url, model) == 30


def test_the_client_sets_aside_exactly_the_records_the_monitor_names(
    monitor_process: tuple[Service, Path], tmp_path: Path
) -> None:
    service, home = monitor_process
    model = f"m-{uuid.uuid4().hex[:6]}"
    client = CaptureClient(
        service.url,
        tmp_path / "spool",
        flush_interval_s=0.05,
        batch_size=50,
        token=(home / TOKEN_FILE).read_text().strip(),
    )
    client.start()
    try:
        for i in range(40):
            # A model name the monitor cannot store (NUL), among good records.
            client.submit(f"bad\x00{model}" if i in (5, 17) else model, "1", scored(i), [0])
        assert client.flush(20)
        stats = client.stats()
    finally:
        client.close(timeout=2)
    assert rows_at(service.url, model) == 38
    assert stats["records_dropped"] == 2 and client.spool.dead_count() == 2
    assert stats["delivered"] == 38


def test_many_new_model_versions_are_split_and_none_is_lost(tmp_path: Path) -> None:
    workdir = tmp_path
    env = {
        "FLOWLINE_HOME": str(workdir / "home"),
        "MLFLOW_TRACKING_URI": "",
        "FLOWLINE_MONITOR_MLFLOW": "0",
        "FLOWLINE_MONITOR_MAX_STREAMS": "100",
        "FLOWLINE_WINDOW_SECONDS": "3600",
    }
    service = start_monitor(workdir, env, name="capped")
    client = CaptureClient(
        service.url, workdir / "spool", flush_interval_s=0.05, token=INGEST_TOKEN
    )
    client.start()
    try:
        for i in range(300):
            client.submit(f"m{i}", "1", scored(i), [0])
        assert client.flush(60)
        stats = client.stats()
        models = httpx.get(f"{service.url}/drift", timeout=10).json()["models"]
    finally:
        client.close(timeout=2)
        service.stop()
    assert len(models) == 100  # the cap
    assert stats["delivered"] == 100 and stats["records_dropped"] == 200
    assert client.spool.dead_count() == 200  # kept, not lost


def test_a_lone_surrogate_inside_the_data_cannot_wedge_its_window(tmp_path: Path) -> None:
    # JSON allows "\ud800" in a value, and a scorer may answer it; pandas, the stores and
    # HTML cannot encode it. It becomes U+FFFD when the window parses the body.
    import pandas as pd

    from monitoring.profile.baseline import build_profile
    from monitoring.service.baselines import BaselineCache
    from tests.helpers_monitor import CHURN, FEATURES

    train = pd.read_csv(CHURN).iloc[:600]
    profile = build_profile(train[FEATURES], train["churned"].to_numpy())
    config = MonitorSettings(home=tmp_path, mlflow_enabled=False, window_rows=50)
    monitor = Monitor(config, baselines=BaselineCache(lambda m, v: profile))
    rows = json.loads(train[FEATURES].iloc[:50].to_json(orient="records"))
    for row in rows:
        row["contract"] = "\ud800x"
    body = json.dumps({"dataframe_records": rows})  # the body's text holds \ud800 escapes
    answer = post(monitor, batch([record(0, body=body, predictions=["\udc01"] * 50)]))
    assert answer.json()["rows"] == 50
    [window] = monitor.close_windows()
    assert window.rows == 50 and "contract" in window.drifted_features
    pages = call(
        monitor,
        ("GET", f"/reports/churn/{window.id}", {}),
        ("GET", f"/drift/churn/windows/{window.id}", {}),
    )
    assert [p.status_code for p in pages] == [200, 200]
    assert "\ufffdx" in pages[1].text


def test_store_and_spool_files_left_readable_by_an_older_run_are_tightened(tmp_path: Path) -> None:
    from monitoring.capture.spool import SPOOL_FILE, Spool

    for name in ("monitor.db", "monitor.db-wal", SPOOL_FILE):
        (tmp_path / name).touch(mode=0o644)
        (tmp_path / name).chmod(0o644)
    MonitorStore(f"sqlite:///{tmp_path / 'monitor.db'}").close()
    Spool(tmp_path / SPOOL_FILE).close()
    modes = {p.name: mode(p) for p in tmp_path.iterdir()}
    assert set(modes.values()) == {0o600}, modes
    fresh = tmp_path / "new" / "deeper"
    MonitorStore(f"sqlite:///{fresh / 'monitor.db'}").close()
    assert mode(fresh) == 0o700 and mode(fresh / "monitor.db") == 0o600
