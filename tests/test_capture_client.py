"""The capture client: batching, spill to the durable spool, in-order redelivery, idempotence,
sampling, and the record contract (body parsing)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.processes import free_port
from monitoring.capture.client import (
    CaptureClient,
    SamplingPolicy,
    capture_hook_from_env,
    client_from_env,
)
from monitoring.capture.record import CaptureRecord, MalformedRecord, rows_from_body
from monitoring.service.store import MonitorStore
from serving.deployment import CacheSettings, Deployment
from serving.gateway import RouteTable, create_app
from serving.gateway.capture import CapturedRequest
from tests.conftest import wait_for
from tests.helpers_monitor import LoopbackServer
from tests.helpers_serving import HeldScorer


def request(i: int, rows: int = 1) -> CapturedRequest:
    """A scoring request whose received_at encodes its submission order."""
    body = {"dataframe_split": {"columns": ["x", "c"], "data": [[i, f"c{i}"]] * rows}}
    return CapturedRequest(json.dumps(body).encode(), "application/json", 1_000_000.0 + i)


class FakeMonitor:
    """A loopback /ingest that can be down, slow, or lose acknowledgements."""

    def __init__(self, store: MonitorStore | None = None) -> None:
        self.mode = "ok"  # "ok", "down" (503), "slow" (sleep, then ok), "lose_ack" (store, 500)
        self.delay = 0.0
        self.store = store
        self.posts = 0
        self.records: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.server = LoopbackServer(self._respond)
        self.url = self.server.url

    def _respond(self, path: str, body: bytes) -> int:
        assert path == "/ingest"
        with self._lock:
            self.posts += 1
            mode = self.mode
        if mode == "down":
            return 503
        if mode == "slow":
            time.sleep(self.delay)
        payload = json.loads(body)
        if self.store is not None:
            self.store.ingest(payload["records"], payload["client"]["dropped"])
        with self._lock:
            self.records.extend(payload["records"])
        if mode == "lose_ack":
            with self._lock:
                self.mode = "ok"  # lose exactly one acknowledgement
            return 500
        return 200

    def times(self) -> list[float]:
        with self._lock:
            return [r["time"] for r in self.records]

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture
def monitor() -> Any:
    fake = FakeMonitor()
    try:
        yield fake
    finally:
        fake.stop()


def make_client(url: str, spool: Path, **kwargs: Any) -> CaptureClient:
    kwargs.setdefault("flush_interval_s", 0.05)
    kwargs.setdefault("max_backoff_s", 0.3)
    kwargs.setdefault("timeout_s", 2.0)
    return CaptureClient(url, spool, **kwargs).start()


def test_records_are_batched_and_delivered_in_order(monitor: FakeMonitor, tmp_path: Path) -> None:
    client = make_client(monitor.url, tmp_path, batch_size=100)
    try:
        for i in range(1000):
            client.submit("m", "1", request(i), [0.5])
        assert client.flush(20)
    finally:
        client.close()
    times = monitor.times()
    assert times == sorted(times) and len(times) == 1000
    assert len({r["id"] for r in monitor.records}) == 1000
    assert monitor.posts < 200  # batched, not one post per record
    record = CaptureRecord.from_dict(monitor.records[0])
    assert (record.model, record.version, record.predictions) == ("m", "1", [0.5])
    assert record.rows() == [{"x": 0, "c": "c0"}]
    stats = client.stats()
    assert stats["delivered"] == 1000 and stats["records_dropped"] == 0


def test_monitor_down_spills_to_disk_and_redelivers_in_order(
    monitor: FakeMonitor, tmp_path: Path
) -> None:
    monitor.mode = "down"
    client = make_client(monitor.url, tmp_path, batch_size=50)
    try:
        for i in range(300):
            client.submit("m", "1", request(i), ["yes"])
        wait_for(lambda: client.stats()["spool_pending"] == 300, "all records spooled", 20)
        assert client.spool.count() == 300  # on disk, not only counted
        assert not monitor.records
        monitor.mode = "ok"
        for i in range(300, 350):  # traffic goes on while the backlog drains
            client.submit("m", "1", request(i), ["yes"])
        assert client.flush(30)
    finally:
        client.close()
    times = monitor.times()
    assert len(times) == 350 and times == sorted(times)
    stats = client.stats()
    assert stats["records_dropped"] == 0 and stats["redelivered"] >= 300
    assert stats["delivery_failures"] >= 1


def test_full_queue_spills_without_blocking_the_caller(
    monitor: FakeMonitor, tmp_path: Path
) -> None:
    monitor.mode, monitor.delay = "slow", 1.0
    client = make_client(monitor.url, tmp_path, queue_size=50, batch_size=20, timeout_s=5.0)
    try:
        worst = 0.0
        for i in range(400):
            started = time.perf_counter()
            client.submit("m", "1", request(i), [1])
            worst = max(worst, time.perf_counter() - started)
        # The sender is stuck in a 1 s post; the caller only ever pays a local spool write.
        assert worst < 0.5, worst
        assert client.stats()["spooled"] > 0
        monitor.mode = "ok"
        assert client.flush(30)
    finally:
        client.close()
    assert sorted(monitor.times()) == [1_000_000.0 + i for i in range(400)]
    assert client.stats()["records_dropped"] == 0


def test_close_spools_the_queue_and_the_next_client_redelivers_it(tmp_path: Path) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    first = make_client(dead_url, tmp_path, flush_interval_s=60.0)  # never flushes by itself
    for i in range(120):
        first.submit("m", "7", request(i), [i])
    first.close(timeout=1.0)
    assert first.stats()["spool_pending"] == 120

    monitor = FakeMonitor()
    second = make_client(monitor.url, tmp_path)
    try:
        assert second.flush(20)
        times = monitor.times()
        assert times == [1_000_000.0 + i for i in range(120)]
        assert second.spool.count() == 0
    finally:
        second.close()
        monitor.stop()


def test_a_lost_acknowledgement_is_redelivered_and_stored_once(tmp_path: Path) -> None:
    store = MonitorStore(f"sqlite:///{tmp_path / 'monitor.db'}")
    monitor = FakeMonitor(store)
    monitor.mode = "lose_ack"  # the first batch is stored, but the client sees HTTP 500
    client = make_client(monitor.url, tmp_path / "spool", batch_size=40)
    try:
        for i in range(100):
            client.submit("m", "1", request(i, rows=3), ["a", "b", "c"])
        assert client.flush(20)
    finally:
        client.close()
        monitor.stop()
    stream = store.stream("m", "1")
    assert stream is not None
    assert stream.rows_total == 300 == store.row_count("m", "1")
    assert stream.duplicates_total > 0  # the redelivered batch was recognised
    store.close()


def test_a_record_the_monitor_refuses_is_isolated_and_dead_lettered(tmp_path: Path) -> None:
    def refuse_poison(path: str, body: bytes) -> int:
        records = json.loads(body)["records"]
        return 400 if any(r["model"] == "poison" for r in records) else 200

    server = LoopbackServer(refuse_poison)
    client = make_client(server.url, tmp_path, batch_size=16)
    try:
        for i in range(30):
            model = "poison" if i == 11 else "m"
            client.submit(model, "1", request(i), [0])
        assert client.flush(20)
        stats = client.stats()
    finally:
        client.close()
        server.stop()
    delivered = [r for body in server.bodies() for r in body["records"]]
    assert len(delivered) == 29
    assert stats["records_dropped"] == 1
    assert client.spool.dead_count() == 1


def test_sampling_and_per_model_switches(monitor: FakeMonitor, tmp_path: Path) -> None:
    policy = SamplingPolicy.from_env(
        {"FLOWLINE_CAPTURE_SAMPLE": "0.5,full=1.0,none=0", "FLOWLINE_CAPTURE_DISABLED": "off"}
    )
    assert policy.rate("other") == 0.5 and policy.rate("full") == 1.0
    assert policy.rate("none") == 0.0 and policy.rate("off") == 0.0
    client = make_client(monitor.url, tmp_path, sampling=policy)
    try:
        for i in range(400):
            for model in ("other", "full", "none", "off"):
                client.submit(model, "1", request(i), [0])
        assert client.flush(20)
    finally:
        client.close()
    counts = {m: sum(r["model"] == m for r in monitor.records) for m in ("other", "full", "none")}
    assert counts["full"] == 400 and counts["none"] == 0
    assert 140 <= counts["other"] <= 260  # Binomial(400, 0.5): 6+ SD margin
    assert not any(r["model"] == "off" for r in monitor.records)
    assert client.stats()["sampled_out"] == 1200 - counts["other"]


def test_hook_from_env_is_off_without_a_monitor_url(tmp_path: Path) -> None:
    assert capture_hook_from_env({}) is None
    assert (
        capture_hook_from_env(
            {"FLOWLINE_MONITOR_URL": "http://x", "FLOWLINE_CAPTURE_DISABLED": "*"}
        )
        is None
    )
    client = client_from_env(
        {"FLOWLINE_MONITOR_URL": "http://127.0.0.1:1", "FLOWLINE_CAPTURE_SPOOL_DIR": str(tmp_path)}
    )
    assert client is not None
    try:
        assert client.ingest_url == "http://127.0.0.1:1/ingest"
        assert client.spool.path.parent == tmp_path.resolve()
    finally:
        client.close(timeout=0.5)


def test_the_gateway_calls_the_async_hook_with_the_raw_request(
    monitor: FakeMonitor, tmp_path: Path
) -> None:
    scorer = HeldScorer()
    scorer.release.set()
    client = make_client(monitor.url, tmp_path)
    table = RouteTable()
    # With the response cache on: the second, identical request is answered from it.
    deployment = Deployment(model="m", version="3", replicas=(scorer.url,), cache=CacheSettings())
    table.set_active(deployment)
    app = create_app(table=table, on_scored=client.on_scored)
    body = {"dataframe_records": [{"x": 1.5, "c": "a"}]}

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as gateway:
            answers = [await gateway.post("/models/m/invocations", json=body) for _ in range(2)]
            await app.state.gateway.capture.drain()
        await app.state.gateway.replicas.aclose()
        return answers

    try:
        answers = asyncio.run(scenario())
        assert [a.status_code for a in answers] == [200, 200]
        assert client.flush(10)
    finally:
        client.close()
        scorer.stop()
    records = [CaptureRecord.from_dict(r) for r in monitor.records]
    assert len(records) == 2
    for record in records:
        assert (record.model, record.version) == ("m", "3")
        assert record.rows() == [{"x": 1.5, "c": "a"}]
        assert record.predictions == [0]
    # Each answer names its request id, and capture stores the row under it.
    ids = [a.headers["x-flowline-request-id"] for a in answers]
    assert len(set(ids)) == 2 and all(ids)
    assert sorted(r.request_id or "" for r in records) == sorted(ids)
    by_id = {r.request_id: r for r in records}
    assert [a.headers["x-flowline-cache"] for a in answers] == ["miss", "hit"]
    assert (by_id[ids[0]].cached, by_id[ids[1]].cached) == (False, True)


def test_async_hook_on_a_full_queue_spills_and_keeps_every_record(tmp_path: Path) -> None:
    dead_url = f"http://127.0.0.1:{free_port()}"
    client = make_client(dead_url, tmp_path, queue_size=10, flush_interval_s=60.0)

    async def scenario() -> None:
        for i in range(200):
            await client.on_scored("m", "1", request(i), [0])

    try:
        asyncio.run(scenario())
        stats = client.stats()
        assert stats["spool_pending"] + stats["queued"] == 200
        assert stats["spool_pending"] >= 190 and stats["records_dropped"] == 0
    finally:
        client.close(timeout=0.5)


# --- the record contract ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"dataframe_split": {"columns": ["a", "b"], "data": [[1, "x"], [2, None]]}},
         [{"a": 1, "b": "x"}, {"a": 2, "b": None}]),
        ({"dataframe_records": [{"a": 1}, {"b": 2}]}, [{"a": 1}, {"b": 2}]),
        ({"instances": [[1, 2], [3, 4]]}, [{"0": 1, "1": 2}, {"0": 3, "1": 4}]),
        ({"inputs": {"a": [1, 2], "b": ["x", "y"]}}, [{"a": 1, "b": "x"}, {"a": 2, "b": "y"}]),
        ({"inputs": {"a": 1, "b": "x"}}, [{"a": 1, "b": "x"}]),
        ({"dataframe_split": {"data": [[5, 6]]}}, [{"0": 5, "1": 6}]),
    ],
)  # fmt: skip
def test_json_bodies_become_rows(body: dict[str, Any], expected: list[dict[str, Any]]) -> None:
    assert rows_from_body(json.dumps(body), "application/json") == expected


def test_csv_bodies_become_rows() -> None:
    rows = rows_from_body(b"a,b\n1,x\n2,\n", "text/csv; charset=utf-8")
    assert rows == [{"a": 1, "b": "x"}, {"a": 2, "b": None}]


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        '{"dataframe_split": {"columns": ["a"], "data": [[1, 2]]}}',
        '{"instances": [1], "inputs": [2]}',
        '{"something": 1}',
        '{"inputs": {"a": [1, 2], "b": [1]}}',
    ],
)
def test_unreadable_bodies_raise_malformed_record(body: str) -> None:
    with pytest.raises(MalformedRecord):
        rows_from_body(body, "application/json")


def test_record_envelope_is_validated() -> None:
    good = {"id": "r1", "model": "m", "version": 2, "time": 1.0, "inputs": [{"a": 1}]}
    record = CaptureRecord.from_dict(good)
    assert record.version == "2" and record.rows() == [{"a": 1}]
    assert CaptureRecord.from_dict(record.to_dict()) == record
    broken_records = (
        {**good, "id": ""},
        {**good, "model": None},
        {**good, "time": "x"},
        [1],
        {**good, "model": "a\x00b"},
        {**good, "model": "\ud800"},
        {**good, "model": "m" * 256},
        {**good, "version": "1\n"},
        {**good, "time": -1.0},
        {**good, "time": 1e30},
        {**good, "request_id": "r" * 129},
        {**good, "content_type": "a\x00"},
        {**good, "body": 3},
        {**good, "body": "x\udc00"},
        {**good, "body_encoding": "gzip"},
    )
    for broken in broken_records:
        with pytest.raises(MalformedRecord):
            CaptureRecord.from_dict(broken)
    assert record.prediction_list(1) is None
    assert CaptureRecord.from_dict({**good, "predictions": ["y"]}).prediction_list(1) == ["y"]


def test_binary_bodies_travel_as_base64(monitor: FakeMonitor, tmp_path: Path) -> None:
    import io

    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame({"a": [1.0, 2.0]}).to_parquet(buffer)
    client = make_client(monitor.url, tmp_path)
    try:
        client.submit(
            "m", "1", CapturedRequest(buffer.getvalue(), "application/vnd.apache.parquet"), [0, 1]
        )
        assert client.flush(10)
    finally:
        client.close()
    record = CaptureRecord.from_dict(monitor.records[0])
    assert record.body_encoding == "base64"
    assert record.rows() == [{"a": 1.0}, {"a": 2.0}]


def test_a_senders_row_count_is_checked_never_trusted() -> None:
    from monitoring.service.ingest_checks import prepare_record

    envelope = {"id": "r1", "model": "m", "version": "1", "time": 1.0}
    body = json.dumps({"inputs": [[1], [2]]})
    assert prepare_record({**envelope, "body": body, "rows": 2}).rows == 2
    with pytest.raises(MalformedRecord, match="rows=3 but its request has 2"):
        prepare_record({**envelope, "body": body, "rows": 3})
    # An unreadable body cannot confirm a claim: it is one unreadable row, whatever it says.
    unreadable = prepare_record({**envelope, "body": "not json", "rows": 10**6})
    assert (unreadable.rows, unreadable.error) == (1, "body is not valid JSON")
    for bad in (0, -1, True, "2", 2**70, 2.0):
        with pytest.raises(MalformedRecord, match="rows must be an integer"):
            CaptureRecord.from_dict({**envelope, "body": body, "rows": bad})


def test_a_list_of_monitors_fails_over_and_loses_nothing(tmp_path: Path) -> None:
    # Two monitors sharing one store, behind a URL nobody listens on: each batch goes to
    # the first that answers; a 5xx or a lost answer moves it on; all down spools it.
    store = MonitorStore(f"sqlite:///{tmp_path / 'monitor.db'}")
    first, second = FakeMonitor(store), FakeMonitor(store)
    urls = f"http://127.0.0.1:{free_port()}, {first.url}/,{second.url}"
    client = make_client(urls, tmp_path / "spool", batch_size=20)
    try:
        assert client.ingest_urls[1] == f"{first.url}/ingest"

        def send(start: int, count: int) -> None:
            for i in range(start, start + count):
                client.submit("m", "1", request(i), ["yes"])
            assert client.flush(20)

        send(0, 40)
        assert len(first.records) == 40 and not second.records
        assert client.ingest_url == f"{first.url}/ingest"
        first.mode = "down"
        send(40, 40)
        assert len(second.records) == 40 and client.ingest_url == f"{second.url}/ingest"
        second.mode = "lose_ack"  # stored, then 500: the batch goes to the first again
        first.mode = "ok"
        send(80, 20)
        first.mode = second.mode = "down"
        for i in range(100, 140):
            client.submit("m", "1", request(i), ["yes"])
        wait_for(lambda: client.stats()["spool_pending"] == 40, "spooled while all are down")
        second.mode = "ok"
        assert client.flush(30)
    finally:
        client.close()
        first.stop()
        second.stop()
    try:
        assert store.row_count("m") == 140  # each record once, the redelivered one too
        stream = store.stream("m", "1")
        assert stream is not None and stream.duplicates_total >= 1
        assert client.stats()["records_dropped"] == 0
    finally:
        store.close()
