"""The monitor's store on SQLite and PostgreSQL: idempotent ingest, window cursor,
drift state and alert outbox across reopening, retention."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitoring.service.store import MonitorStore, NewWindow, WindowAlreadyClosed

NOW = 1_800_000_000.0  # every test's data is recent relative to the retention test's cutoff


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("postgres_database")
    return f"sqlite:///{tmp_path / 'monitor.db'}"


@pytest.fixture
def store(store_url: str) -> Iterator[MonitorStore]:
    opened = MonitorStore(store_url)
    try:
        yield opened
    finally:
        opened.close()


def model_name() -> str:
    # The PostgreSQL database is shared by the session: each test uses its own model.
    return f"m-{uuid.uuid4().hex[:8]}"


def record(model: str, i: int, rows: int = 2, version: str = "1", when: float = NOW) -> dict:
    body = {"dataframe_split": {"columns": ["x", "c"], "data": [[i, "a"]] * rows}}
    return {
        "id": f"{model}-{i}",
        "model": model,
        "version": version,
        "time": when + i,
        "body": json.dumps(body),
        "content_type": "application/json",
        "predictions": ["yes"] * rows,
    }


def window(model: str, first: int, last: int, drifted: bool, version: str = "1") -> NewWindow:
    return NewWindow(
        model=model, version=version, first_record_id=first, last_record_id=last,
        rows=last - first + 1, started_at=NOW, ended_at=NOW + 1, closed_at=NOW + 2,
        closed_by="rows", drifted=drifted, drifted_features=["x"] if drifted else [],
        reasons=["distribution:x"] if drifted else [], schema_violations=0,
        report={"drift": {"drifted": drifted}},
    )  # fmt: skip


def test_ingest_is_idempotent_by_record_id(store: MonitorStore) -> None:
    m = model_name()
    batch = [record(m, i) for i in range(50)]
    first = store.ingest(batch)
    assert (first.new_records, first.rows, first.duplicates) == (50, 100, 0)
    again = store.ingest(batch[:20] + [record(m, i) for i in range(50, 60)] + [batch[0]])
    assert (again.new_records, again.rows, again.duplicates) == (10, 20, 21)
    assert store.row_count(m) == 120
    stream = store.stream(m, "1")
    assert stream is not None and stream.rows_total == 120 and stream.duplicates_total == 21
    pending = store.pending(m, "1", 0, 1000)
    assert len(pending) == 60 and all(p.rows == 2 for p in pending)
    records = store.records(m, "1", pending[0].id, pending[-1].id)
    rows = [r.capture_record(m, "1").rows()[0]["x"] for r in records]
    assert rows == list(range(60))  # ingest order, also across the two batches
    assert json.loads(records[0].predictions) == ["yes", "yes"]


def test_unreadable_records_are_kept_as_error_rows_and_bad_envelopes_rejected(
    store: MonitorStore,
) -> None:
    m = model_name()
    bad_body = {**record(m, 1), "body": "{not json"}
    no_id = {**record(m, 2), "id": None}
    result = store.ingest([record(m, 0), bad_body, no_id, "junk"])
    assert (result.new_records, result.malformed_records, result.rejected) == (2, 1, 2)
    pending = store.pending(m, "1", 0, 10)
    assert [p.rows for p in pending] == [2, 1]  # an unreadable record counts as one row
    records = store.records(m, "1", pending[0].id, pending[-1].id)
    assert records[0].error is None and "JSON" in records[1].error


def test_bodies_are_stored_byte_for_byte(store: MonitorStore) -> None:
    # Tabs, newlines, backslashes, quotes and non-ASCII text must survive the bulk
    # insert (a COPY on PostgreSQL) unchanged, and a missing field stays NULL.
    m = model_name()
    text = 'x\tc\n1\t"caf\u00e9 \\N \\ \u2603"\r\n'
    raw = {**record(m, 0), "body": text, "content_type": "text/csv", "predictions": None}
    assert store.ingest([raw]).new_records == 1
    [pending] = store.pending(m, "1", 0, 10)
    [stored] = store.records(m, "1", pending.id, pending.id)
    assert (stored.body, stored.content_type, stored.predictions) == (text, "text/csv", None)


def test_client_drop_reports_are_counted_per_stream(store: MonitorStore) -> None:
    m = model_name()
    store.ingest([record(m, 0)], dropped=[{"model": m, "version": "1", "records": 3}])
    stream = store.stream(m, "1")
    assert stream is not None and stream.dropped_total == 3


def test_windows_move_the_cursor_and_state_changes_are_recorded_once(store_url: str) -> None:
    m = model_name()
    store = MonitorStore(store_url)
    store.ingest([record(m, i, rows=1) for i in range(10)])
    ids = [r.id for r in store.pending(m, "1", 0, 100)]
    calls: list[tuple[str, int]] = []

    def hooks(event: str, window_id: int, index: int) -> list[tuple[str, str]]:
        calls.append((event, index))
        return [("http://a/hook", f"{event}-{index}"), ("http://b/hook", f"{event}-{index}")]

    first, event = store.record_window(window(m, ids[0], ids[4], drifted=True), hooks)
    assert (first.window_index, event) == (0, "drift_started")
    assert store.pending(m, "1", store.stream(m, "1").last_record_id, 100)[0].id == ids[5]
    store.close()

    reopened = MonitorStore(store_url)  # a monitor restart
    try:
        second, event = reopened.record_window(window(m, ids[5], ids[7], drifted=True), hooks)
        assert (second.window_index, event) == (1, None)  # still drifted: no new alert
        third, event = reopened.record_window(window(m, ids[8], ids[9], drifted=False), hooks)
        assert (third.window_index, event) == (2, "drift_ended")
        assert calls == [("drift_started", 0), ("drift_ended", 2)]
        assert reopened.drift_state(m, "1")["drifted"] is False
        history = reopened.windows(m)
        assert [w.window_index for w in history] == [2, 1, 0]
        assert history[-1].drifted_features == ["x"]
        summary, stored = reopened.window(first.id)
        assert summary.rows == 5 and stored == {"drift": {"drifted": True}}
        outbox = reopened.alert_log(m)
        assert sorted((a["event"], a["url"]) for a in outbox) == [
            ("drift_ended", "http://a/hook"), ("drift_ended", "http://b/hook"),
            ("drift_started", "http://a/hook"), ("drift_started", "http://b/hook"),
        ]  # fmt: skip
        assert [w.id for w, _ in reopened.unlogged_windows() if w.model == m] == [
            first.id, second.id, third.id,
        ]  # fmt: skip
        reopened.mark_logged(first.id)
        assert first.id not in [w.id for w, _ in reopened.unlogged_windows()]
    finally:
        reopened.close()


def test_alert_outbox_delivers_in_order_per_url_with_retries(store: MonitorStore) -> None:
    m = model_name()
    store.ingest([record(m, i, rows=1) for i in range(3)])
    ids = [r.id for r in store.pending(m, "1", 0, 10)]
    url = f"http://hook/{m}"

    def hooks(event: str, window_id: int, index: int) -> list[tuple[str, str]]:
        return [(url, event)]

    store.record_window(window(m, ids[0], ids[0], drifted=True), hooks)
    store.record_window(window(m, ids[1], ids[1], drifted=False), hooks)

    def due(at: float) -> list[Any]:
        return [a for a in store.due_alerts(at) if a.url == url]

    [started] = due(NOW + 10)
    assert started.event == "drift_started"  # the later "drift_ended" waits behind it
    store.alert_failed(started.id, "HTTP 500", retry_at=NOW + 100, now=NOW + 10)
    assert due(NOW + 50) == []
    [retry] = due(NOW + 100)
    assert retry.id == started.id and retry.attempts == 1
    store.alert_delivered(started.id, NOW + 100)
    [ended] = due(NOW + 100)
    assert ended.event == "drift_ended"
    store.alert_failed(ended.id, "refused", retry_at=None, now=NOW + 101)  # gave up
    assert due(NOW + 1e6) == []
    log = {a["event"]: a for a in store.alert_log(m)}
    assert log["drift_started"]["delivered_at"] == NOW + 100
    assert log["drift_ended"]["failed_at"] == NOW + 101
    assert log["drift_ended"]["last_error"] == "refused"


def test_retention_deletes_old_rows_windows_and_settled_alerts(store: MonitorStore) -> None:
    m = model_name()
    old = 1000.0  # older than every other test's data
    store.ingest([record(m, i, rows=1, when=old) for i in range(5)])
    store.ingest([record(m, i, rows=1) for i in range(5, 8)])
    ids = [r.id for r in store.pending(m, "1", 0, 10)]
    old_window = window(m, ids[0], ids[4], drifted=True)
    old_window = NewWindow(**{**old_window.__dict__, "closed_at": old + 10})
    store.record_window(old_window, lambda e, w, i: [("http://x", e)])
    [alert] = [a for a in store.due_alerts(NOW) if a.model == m]
    store.alert_delivered(alert.id, old + 11)
    store.record_window(window(m, ids[5], ids[7], drifted=False))

    counts = store.apply_retention(older_than=old + 100)
    assert counts["records"] >= 5 and counts["windows"] >= 1 and counts["alerts"] >= 1
    assert store.row_count(m) == 3
    assert [w.window_index for w in store.windows(m)] == [1]
    assert store.alert_log(m) == []


def test_batch_ingest_is_fast_enough_for_a_smoke_check(store: MonitorStore) -> None:
    # The benchmark measures throughput properly; this only guards against a
    # per-row round trip sneaking in (that would be ~100x slower).
    m = model_name()
    batch = [record(m, i, rows=10) for i in range(500)]
    started = time.perf_counter()
    result = store.ingest(batch)
    elapsed = time.perf_counter() - started
    assert result.rows == 5000
    assert elapsed < 10.0, f"5000 rows took {elapsed:.1f}s"


def test_request_ids_and_cached_answers_are_stored(store: MonitorStore) -> None:
    m = model_name()
    raw = [
        {**record(m, 0), "request_id": "3f9c2a1b-1a"},
        {**record(m, 1), "request_id": "3f9c2a1b-1b", "cached": True},
    ]
    assert store.ingest(raw).new_records == 2
    first, last = store.pending(m, "1", 0, 10)
    stored = store.records(m, "1", first.id, last.id)
    assert [(r.request_id, r.cached) for r in stored] == [
        ("3f9c2a1b-1a", False),
        ("3f9c2a1b-1b", True),
    ]
    assert stored[1].capture_record(m, "1").cached is True
    assert store.ingest([{**record(m, 2), "cached": "yes"}]).rejected == 1


def test_a_store_made_before_the_cached_column_gets_it(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    MonitorStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:  # the table as an older flowline created it
        db.execute("ALTER TABLE flowline_mon_captured_records DROP COLUMN cached")
    m = model_name()
    reopened = MonitorStore(f"sqlite:///{path}")
    try:
        assert reopened.ingest([{**record(m, 0), "cached": True}]).new_records == 1
        [pending] = reopened.pending(m, "1", 0, 10)
        [stored] = reopened.records(m, "1", pending.id, pending.id)
        assert stored.cached is True
    finally:
        reopened.close()


def test_a_store_made_before_the_claims_gets_their_columns_and_index(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    MonitorStore(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as db:  # the tables as an older flowline created them
        db.execute("DROP INDEX flowline_mon_uq_window_first_record")
        db.execute("ALTER TABLE flowline_mon_alerts DROP COLUMN claimed_until")
        db.execute("ALTER TABLE flowline_mon_alerts DROP COLUMN claimed_by")
    m = model_name()
    reopened = MonitorStore(f"sqlite:///{path}")
    try:
        reopened.ingest([record(m, i, rows=1) for i in range(2)])
        first = reopened.pending(m, "1", 0, 10)[0].id
        reopened.record_window(window(m, first, first, drifted=True), lambda e, w, i: [("u", e)])
        [claimed] = reopened.claim_due_alerts(NOW + 10, "me", 60.0)
        assert claimed.event == "drift_started"
        assert reopened.claim_due_alerts(NOW + 10, "other", 60.0) == []
        with sqlite3.connect(path) as db:
            names = {row[1] for row in db.execute("PRAGMA index_list(flowline_mon_windows)")}
        assert "flowline_mon_uq_window_first_record" in names
        with pytest.raises(WindowAlreadyClosed):  # the cursor is past it
            reopened.record_window(window(m, first, first, drifted=False))
    finally:
        reopened.close()
