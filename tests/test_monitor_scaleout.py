"""Several monitors on one PostgreSQL store: every captured row stored once, every window
closed once, every alert posted once.

Store level: two MonitorStore instances (and two Monitors) in threads, racing ingest,
window closes and alert claims on the same database. Process level: two real
`python -m monitoring` processes on one PostgreSQL database, ingest from concurrent
senders to both (the same batch to both, retries), a real loopback webhook receiver,
one monitor killed halfway and a capture client failing over to the other.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from monitoring.service.claims import Claims
from monitoring.service.monitor import Monitor
from monitoring.service.settings import MonitorSettings
from monitoring.service.store import MonitorStore, NewWindow, WindowAlreadyClosed
from tests.conftest import wait_for
from tests.helpers_monitor import (
    AUTH,
    CHURN,
    FEATURES,
    INGEST_TOKEN,
    LoopbackServer,
    churn_features,
    shifted,
    split_body,
    start_monitor,
)

pytestmark = pytest.mark.postgres
NOW = 1_800_000_000.0


def model_name() -> str:
    # The PostgreSQL database is shared by the session: each test uses its own model.
    return f"scale-{uuid.uuid4().hex[:8]}"


def churn_records(model: str, frames: list[Any], per: int, tag: str) -> list[dict[str, Any]]:
    """Capture records of ``per``-row requests of each frame, in order."""
    out = []
    for frame in frames:
        for start in range(0, len(frame), per):
            chunk = frame.iloc[start : start + per]
            out.append({
                "id": f"{tag}-{len(out)}", "model": model, "version": "1",
                "time": NOW + len(out), "content_type": "application/json",
                "body": split_body(chunk).decode(), "predictions": ["yes"] * len(chunk),
            })  # fmt: skip
    return out


def run_together(workers: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables at the same moment in threads; their results (raises their error)."""
    barrier = threading.Barrier(len(workers))

    def start(work: Callable[[], Any]) -> Any:
        barrier.wait(timeout=30)
        return work()

    with ThreadPoolExecutor(len(workers)) as pool:
        return [f.result(timeout=120) for f in [pool.submit(start, w) for w in workers]]


@pytest.fixture
def two_stores(postgres_database: str) -> Iterator[tuple[MonitorStore, MonitorStore]]:
    first, second = MonitorStore(postgres_database), MonitorStore(postgres_database)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def pg_rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of a query straight on the PostgreSQL database (not through the store)."""
    with psycopg.connect(url) as conn:
        return conn.execute(sql, params).fetchall()


def assert_windows_once(url: str, model: str) -> list[tuple[Any, ...]]:
    """Every window of the stream stored once, contiguous, together holding every record."""
    windows = pg_rows(
        url,
        "SELECT window_index, first_record_id, last_record_id, rows, drifted, id "
        "FROM flowline_mon_windows WHERE model = %s ORDER BY window_index",
        model,
    )
    records = [
        r[0]
        for r in pg_rows(
            url, "SELECT id FROM flowline_mon_captured_records WHERE model = %s ORDER BY id", model
        )
    ]
    assert [w[0] for w in windows] == list(range(len(windows)))
    assert len({w[1] for w in windows}) == len(windows)
    # Window k+1 starts at the first record after window k: no gap, no overlap.
    position = {rid: i for i, rid in enumerate(records)}
    spans = [(position[w[1]], position[w[2]]) for w in windows]
    assert spans[0][0] == 0
    for (_, last), (first, _) in zip(spans, spans[1:], strict=False):
        assert first == last + 1
    return windows


# --- store level ------------------------------------------------------------------------


def test_two_stores_ingesting_the_same_batches_store_each_record_once(
    two_stores: tuple[MonitorStore, MonitorStore], postgres_database: str
) -> None:
    m = model_name()
    data = churn_features().iloc[:600]
    records = churn_records(m, [data], per=2, tag=m)  # 300 records
    batches = [records[i : i + 30] for i in range(0, len(records), 30)]

    def sender(store: MonitorStore, order: list[list[dict[str, Any]]]) -> tuple[int, int]:
        new = dup = 0
        for batch in order:
            result = store.ingest(batch)
            new, dup = new + result.new_records, dup + result.duplicates
        return new, dup

    # Both stores send every batch (in opposite orders), and the first one sends some twice.
    first, second = two_stores
    results = run_together([
        lambda: sender(first, batches + batches[:3]),
        lambda: sender(second, list(reversed(batches))),
    ])  # fmt: skip
    assert sum(r[0] for r in results) == len(records)
    assert sum(r[1] for r in results) == len(records) + 3 * 30
    counts = pg_rows(
        postgres_database,
        "SELECT count(*), count(DISTINCT record_id), sum(rows) "
        "FROM flowline_mon_captured_records WHERE model = %s",
        m,
    )
    assert counts == [(len(records), len(records), 600)]
    stream = first.stream(m, "1")
    assert stream is not None and stream.rows_total == 600
    assert stream.duplicates_total == len(records) + 3 * 30


def test_two_stores_racing_to_store_windows_store_each_once(
    two_stores: tuple[MonitorStore, MonitorStore], postgres_database: str
) -> None:
    m = model_name()
    first, second = two_stores
    first.ingest(churn_records(m, [churn_features().iloc[:400]], per=4, tag=m))  # 100 records
    events: list[str] = []

    def closer(store: MonitorStore) -> int:
        # No claim on purpose: the stream row lock and the cursor check alone decide.
        stored = 0
        while True:
            cursor = store.stream(m, "1").last_record_id
            pending = store.pending(m, "1", cursor, 10)
            if not pending:
                return stored
            new = NewWindow(
                model=m, version="1", first_record_id=pending[0].id,
                last_record_id=pending[-1].id, rows=4 * len(pending), started_at=NOW,
                ended_at=NOW, closed_at=NOW, closed_by="rows", drifted=stored % 2 == 0,
                drifted_features=[], reasons=[], schema_violations=0, report={},
            )  # fmt: skip
            try:
                _, event = store.record_window(
                    new, lambda e, w, i: events.append(e) or [("http://hook", e)]
                )
                stored += 1
            except WindowAlreadyClosed:
                continue

    results = run_together([lambda: closer(first), lambda: closer(second)])
    windows = assert_windows_once(postgres_database, m)
    assert len(windows) == 10 and sum(results) == 10
    assert sum(w[3] for w in windows) == 400
    alerts = pg_rows(
        postgres_database, "SELECT window_id FROM flowline_mon_alerts WHERE model = %s", m
    )
    assert len(alerts) == len(events) and len({a[0] for a in alerts}) == len(alerts)


def test_two_monitors_racing_close_windows_close_each_window_once(
    postgres_database: str, tmp_path: Path
) -> None:
    import pandas as pd

    from monitoring.profile.baseline import build_profile
    from monitoring.service.baselines import BaselineCache

    m = model_name()
    full = pd.read_csv(CHURN)
    profile = build_profile(full[FEATURES])
    calm = churn_features().sample(300, random_state=5)
    frames = [calm.iloc[:150], shifted(calm.iloc[150:300]), calm.iloc[:150]]
    monitors = []
    for name in ("a", "b"):
        settings = MonitorSettings(
            home=tmp_path / name,
            db_url=postgres_database,
            mlflow_enabled=False,
            estimate_enabled=False,
            window_rows=50,
            alert_webhooks=("http://127.0.0.1:9/hook",),
        )
        store = MonitorStore(postgres_database)
        baselines = BaselineCache(lambda _m, _v: profile)
        monitors.append(Monitor(settings, store=store, baselines=baselines))
    try:
        monitors[0].ingest(churn_records(m, frames, per=10, tag=m))  # 45 records, 9 windows

        def closer(monitor: Monitor) -> int:
            closed = 0
            while monitor.store.stream(m, "1").next_window < 9:
                closed += len([w for w in monitor.close_windows() if w.model == m])
            return closed

        results = run_together([lambda: closer(monitors[0]), lambda: closer(monitors[1])])
        windows = assert_windows_once(postgres_database, m)
        assert len(windows) == 9 and sum(results) == 9
        drifted = [bool(w[4]) for w in windows]
        assert drifted[3:6] == [True] * 3 and not any(drifted[:3]), drifted
        changes = sum(a != b for a, b in zip([False, *drifted], drifted, strict=False))
        alerts = pg_rows(
            postgres_database,
            "SELECT event, window_id FROM flowline_mon_alerts WHERE model = %s ORDER BY id",
            m,
        )
        assert len(alerts) == changes and len(set(alerts)) == changes
        assert alerts[0][0] == "drift_started"
        # The gauges of the monitor that did not close a window mirror the store.
        for monitor in monitors:
            monitor.close_windows()
            gauge = monitor.metrics.window_index.labels(m, "1")._value.get()
            assert gauge == 8
    finally:
        for monitor in monitors:
            monitor.store.close()


def test_each_alert_is_claimed_by_one_monitor_and_retried_after_a_kill(
    two_stores: tuple[MonitorStore, MonitorStore],
) -> None:
    m = model_name()
    first, second = two_stores
    first.ingest(churn_records(m, [churn_features().iloc[:40]], per=1, tag=m))
    ids = [r.id for r in first.pending(m, "1", 0, 100)]
    urls = [f"http://hook-{i}/{m}" for i in range(20)]
    for i, rid in enumerate(ids[:2]):
        new = NewWindow(
            model=m, version="1", first_record_id=rid, last_record_id=rid, rows=1,
            started_at=NOW, ended_at=NOW, closed_at=NOW, closed_by="rows", drifted=i == 0,
            drifted_features=[], reasons=[], schema_violations=0, report={},
        )  # fmt: skip
        first.record_window(new, lambda e, w, i: [(url, e) for url in urls])

    def claim(store: MonitorStore, holder: str) -> list[int]:
        got = []
        for _ in range(5):
            got += [a.id for a in store.claim_due_alerts(NOW + 1, holder, 60.0, 3) if a.model == m]
        return got

    a, b = run_together([lambda: claim(first, "a"), lambda: claim(second, "b")])
    assert not set(a) & set(b)  # never both
    assert len(a) + len(b) == len(urls)  # the oldest entry per URL, each claimed once
    # "a" is killed before settling: its claims hold until they expire, then "b" retries.
    assert [x for x in second.claim_due_alerts(NOW + 30, "b", 60.0, 50) if x.id in a] == []
    retried = [x.id for x in second.claim_due_alerts(NOW + 62, "b", 60.0, 50) if x.id in a]
    assert sorted(retried) == sorted(a)
    for alert_id in [*retried, *b]:
        second.alert_delivered(alert_id, NOW + 63)
    # Then the "drift_ended" entries, behind the delivered "drift_started" of each URL.
    later = [x for x in first.claim_due_alerts(NOW + 64, "a", 60.0, 50) if x.model == m]
    assert sorted(x.url for x in later) == sorted(urls)
    assert {x.event for x in later} == {"drift_ended"}


def test_a_claim_has_one_holder_until_released_or_expired(
    postgres_database: str, tmp_path: Path
) -> None:
    for url in (postgres_database, f"sqlite:///{tmp_path / 'monitor.db'}"):
        stores = [MonitorStore(url), MonitorStore(url)]
        try:
            one, two = Claims(stores[0]), Claims(stores[1])
            m = model_name()
            with one.hold("windows", m, "1") as held:
                assert held
                with two.hold("windows", m, "1") as other:
                    assert not other
                with two.hold("windows", m, "2") as other:
                    assert other  # another stream is free
            with two.hold("windows", m, "1") as held:
                assert held  # released
            if url.startswith("sqlite"):
                # A holder killed with its lease: the lease runs out and another takes it.
                stale = Claims(stores[0], lease_s=-1.0)
                with stale.hold("publish", m, "1") as held, two.hold("publish", m, "1") as other:
                    assert held and other
                # A holder killed with a long lease: its restarted self need not wait.
                dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                      capture_output=True, text=True, check=True)  # fmt: skip
                killed = Claims(stores[0])
                killed.process = f"{dead.stdout.strip()}-killed"
                with killed.hold("retention") as held:
                    assert held
                    with two.hold("retention") as other:
                        assert other
        finally:
            for store in stores:
                store.close()


# --- two monitor processes ----------------------------------------------------------------


def registry_with_baseline(workdir: Path, model: str) -> tuple[str, str]:
    """A real MLflow registry (SQLite) holding ``model`` v1 with a baseline of the churn
    data, and a monitoring experiment whose artifacts stay under ``workdir``."""
    import os

    import pandas as pd
    from mlflow import MlflowClient

    from monitoring.profile.baseline import FILE_NAME, build_profile, dumps

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    source = workdir / "model"
    (source / "artifacts").mkdir(parents=True)
    (source / "artifacts" / FILE_NAME).write_text(
        dumps(build_profile(pd.read_csv(CHURN)[FEATURES]))
    )
    client = MlflowClient(uri)
    client.create_registered_model(model)
    client.create_model_version(model, source=str(source))
    experiment = f"monitoring-{uuid.uuid4().hex[:6]}"
    client.create_experiment(experiment, artifact_location=(workdir / "runs").as_uri())
    assert os.environ.get("MLFLOW_TRACKING_URI") != uri
    return uri, experiment


def test_two_monitor_processes_store_close_and_alert_each_thing_once(
    postgres_database: str, tmp_path: Path
) -> None:
    from mlflow import MlflowClient

    from monitoring.capture.client import CaptureClient
    from monitoring.service.mlflow_runs import MODEL_TAG
    from serving.gateway.capture import CapturedRequest

    model = model_name()
    uri, experiment = registry_with_baseline(tmp_path, model)
    window = 100
    data = churn_features().sample(6 * window, random_state=31)
    calm, drift, after = data.iloc[:200], shifted(data.iloc[200:400]), data.iloc[400:]
    records = churn_records(model, [calm, drift], per=10, tag=uuid.uuid4().hex[:8])
    with contextlib.ExitStack() as cleanup:
        receiver = LoopbackServer()
        cleanup.callback(receiver.stop)
        env = {
            "FLOWLINE_MONITOR_DB": postgres_database,
            "MLFLOW_TRACKING_URI": uri,
            "FLOWLINE_MONITOR_EXPERIMENT": experiment,
            "FLOWLINE_MONITOR_ESTIMATE": "0",
            "FLOWLINE_WINDOW_ROWS": str(window),
            "FLOWLINE_WINDOW_SECONDS": "600",
            "FLOWLINE_ALERT_WEBHOOKS": f"{receiver.url}/hook",
            "FLOWLINE_ALERT_BACKOFF_S": "0.2",
            "FLOWLINE_MONITOR_POLL_S": "0.1",
        }
        monitors = []
        for name in ("mon-a", "mon-b"):
            home = {"FLOWLINE_HOME": str(tmp_path / name)}
            monitor = start_monitor(tmp_path, {**env, **home}, name=name)
            cleanup.callback(monitor.stop)
            monitors.append(monitor)
        a, b = monitors

        # Concurrent senders (sender_of), the same batch to both monitors, and retries.
        batches = [records[i : i + 2] for i in range(0, len(records), 2)]
        http = httpx.Client(timeout=30, headers=AUTH)
        cleanup.callback(http.close)

        def post(url: str, batch: list[dict[str, Any]]) -> None:
            answer = http.post(f"{url}/ingest", json={"records": batch})
            assert answer.status_code == 200, answer.text

        # The calm half first, then the shifted half, so windows hold one kind each.
        half = len(batches) // 2
        for phase in (batches[:half], batches[half:]):
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(sender_of(phase, post, a.url, b.url), range(4)))

        def stream() -> dict[str, Any] | None:
            answer = httpx.get(f"{b.url}/drift/{model}", timeout=10)
            return answer.json() if answer.status_code == 200 else None

        wait_for(lambda: (stream() or {}).get("latest", {}) or None, "a first window")
        wait_for(lambda: len(stream()["windows"]) == 4, "four windows", 60)
        wait_for(lambda: len(receiver.received) >= 1, "the drift_started alert", 30)

        # Monitor a dies (SIGKILL: its claims go with its sessions); a capture client with
        # both URLs fails over to b, and b closes the rest and alerts the end of the drift.
        a.kill()
        client = CaptureClient(
            f"{a.url},{b.url}", tmp_path / "spool", flush_interval_s=0.05, token=INGEST_TOKEN
        )
        client.start()
        cleanup.callback(client.close, 2)
        for start in range(0, len(after), 10):
            chunk = after.iloc[start : start + 10]
            client.submit(model, "1", CapturedRequest(split_body(chunk), "application/json"),
                          ["yes"] * len(chunk))  # fmt: skip
        assert client.flush(60)
        assert client.stats()["records_dropped"] == 0
        wait_for(lambda: len(stream()["windows"]) == 6, "six windows", 60)
        wait_for(lambda: len(receiver.received) >= 2, "the drift_ended alert", 60)

        total = len(records) + len(after) // 10
        counts = pg_rows(
            postgres_database,
            "SELECT count(*), count(DISTINCT record_id), sum(rows) "
            "FROM flowline_mon_captured_records WHERE model = %s",
            model,
        )
        assert counts == [(total, total, 6 * window)]
        windows = assert_windows_once(postgres_database, model)
        assert [bool(w[4]) for w in windows] == [False, False, True, True, False, False]
        assert all(w[3] == window for w in windows)

        # One POST per alert: the outbox holds one entry per state change, each delivered
        # once, and the receiver got each body once (a second POST would be a repeat).
        outbox = pg_rows(
            postgres_database,
            "SELECT event, body, attempts, delivered_at IS NOT NULL "
            "FROM flowline_mon_alerts WHERE model = %s ORDER BY id",
            model,
        )
        assert [(e, n, done) for e, _, n, done in outbox] == [
            ("drift_started", 1, True), ("drift_ended", 1, True),
        ]  # fmt: skip
        received = [body for _, body in receiver.received]
        assert sorted(received) == sorted(o[1].encode() for o in outbox)
        assert [json.loads(r)["event"] for r in received] == ["drift_started", "drift_ended"]

        # MLflow: one monitoring run, one logged step per window.
        mlflow = MlflowClient(uri)
        exp = mlflow.get_experiment_by_name(experiment)
        assert exp is not None

        # (The session's database also holds other tests' windows: only this model's run.)
        def runs() -> list[Any]:
            return mlflow.search_runs(
                [exp.experiment_id], filter_string=f"tags.`{MODEL_TAG}` = '{model}'"
            )

        def steps() -> list[int]:
            return [
                m.step
                for run in runs()
                for m in mlflow.get_metric_history(run.info.run_id, "window.rows")
            ]

        wait_for(lambda: len(steps()) >= 6, "six windows in MLflow", 60)
        assert len(runs()) == 1 and sorted(steps()) == list(range(6))

        # Monitor b's gauges show the windows monitor a closed too.
        metrics = httpx.get(f"{b.url}/metrics", timeout=10).text
        assert f'flowline_monitor_window_index{{model="{model}",version="1"}} 5.0' in metrics
        assert f'flowline_monitor_dataset_drift{{model="{model}",version="1"}} 0.0' in metrics


def sender_of(
    batches: list[list[dict[str, Any]]],
    post: Callable[[str, list[dict[str, Any]]], None],
    first: str,
    second: str,
) -> Callable[[int], None]:
    """Sender ``part`` of four: each batch to one monitor, or to both at the same moment
    (every third), and some posted again to the other one (a retry after a lost answer)."""

    def sender(part: int) -> None:
        for i, batch in enumerate(batches):
            if i % 4 != part:
                continue
            if i % 3 == 0:
                run_together([
                    lambda batch=batch: post(first, batch),
                    lambda batch=batch: post(second, batch),
                ])  # fmt: skip
            else:
                post((first, second)[i % 2], batch)
            if i % 5 == 0:
                post((second, first)[i % 2], batch)

    return sender
