"""Monitor ingest throughput: captured rows per second into the store.

Two ways in, both with the records pre-encoded (encoding is the capture client's cost):

* HTTP: `POST /ingest` to a real `python -m monitoring` process, batches of 500
  records (the capture client's default), 1 and 4 concurrent senders;
* in-process: `MonitorStore.ingest` alone, without HTTP.

Each on SQLite (the default store) and, when reachable, PostgreSQL. Records hold
one row (single-row scoring, the worst case per row) or ten rows. The counts are
checked at the end: every row sent is stored exactly once.

    .venv/bin/python benchmarks/monitoring/ingest_throughput.py [--rows 100000]

Writes benchmarks/results/monitoring_ingest.json and .md.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402

from benchmarks import harness  # noqa: E402
from monitoring.capture.client import record_id  # noqa: E402
from monitoring.service.store import MonitorStore  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.helpers_monitor import AUTH, churn_features, start_monitor  # noqa: E402

BATCH = 500
TARGET = 20_000
POSTGRES_ADMIN = os.environ.get(
    "FLOWLINE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def make_batches(
    rows: int, rows_per_record: int, model: str, request_ids: list[str] | None = None
) -> list[bytes]:
    """Ingest bodies of BATCH records each, like the capture client sends them; with
    ``request_ids``, record ``i`` carries ``request_ids[i]`` as the gateway's would."""
    frame = churn_features()
    data = json.loads(frame.to_json(orient="values"))
    columns = list(frame.columns)
    records = []
    client_id = uuid.uuid4().hex[:16]  # ids as the capture client makes them
    first_seq = time.time_ns()
    for i in range(rows // rows_per_record):
        start = (i * rows_per_record) % (len(data) - rows_per_record)
        body = {
            "dataframe_split": {"columns": columns, "data": data[start : start + rows_per_record]}
        }
        records.append(
            json.dumps(
                {
                    "id": record_id(client_id, first_seq + i),
                    "model": model,
                    "version": "1",
                    "time": time.time(),
                    "content_type": "application/json",
                    "body": json.dumps(body),
                    "predictions": ["no"] * rows_per_record,
                    **({"request_id": request_ids[i]} if request_ids else {}),
                }
            )  # fmt: skip
        )
    head = json.dumps({"id": "bench", "dropped": []})
    return [
        f'{{"client":{head},"records":[{",".join(records[i : i + BATCH])}]}}'.encode()
        for i in range(0, len(records), BATCH)
    ]


def post_all(url: str, bodies: list[bytes], senders: int) -> float:
    """POST every body with ``senders`` concurrent clients; wall seconds."""
    todo = list(enumerate(bodies))
    lock = threading.Lock()
    failures: list[str] = []

    def sender() -> None:
        with httpx.Client(timeout=60) as client:
            while True:
                with lock:
                    if not todo:
                        return
                    _, body = todo.pop()
                answer = client.post(
                    url, content=body, headers={"content-type": "application/json", **AUTH}
                )
                if answer.status_code != 200:
                    failures.append(f"HTTP {answer.status_code}: {answer.text[:200]}")

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(failures[0])
    return elapsed


def http_run(store_url: str, label: str, rows: int, tmp: Path) -> list[dict[str, Any]]:
    """Ingest through a real monitor process."""
    # No registry: windows wait for a baseline, so this measures ingest (plus the
    # detector's cheap polling), not drift evaluation.
    env = harness.store_only_monitor_env(tmp / f"home-{label}", FLOWLINE_MONITOR_DB=store_url)
    monitor = start_monitor(tmp, env, name=f"monitor-{label}")
    results = []
    try:
        for rows_per_record in (1, 10):
            for senders in (1, 4):
                model = f"bench-{rows_per_record}-{senders}-{uuid.uuid4().hex[:6]}"
                bodies = make_batches(rows, rows_per_record, model)
                post_all(f"{monitor.url}/ingest", bodies[:2], 1)  # warm-up, also stored
                # The first detector pass imports MLflow to ask for the baseline (seconds
                # of CPU, once per process): let it finish before timing.
                wait_for(
                    lambda: (
                        "flowline_monitor_baseline_missing{"
                        in httpx.get(f"{monitor.url}/metrics", timeout=10).text
                    ),
                    "the detector's first pass",
                )
                warm_rows = min(len(bodies), 2) * BATCH * rows_per_record
                cpu_before = harness.cpu_seconds(monitor.pid)
                seconds = post_all(f"{monitor.url}/ingest", bodies[2:], senders)
                cpu_after = harness.cpu_seconds(monitor.pid)
                cpu = 0.0 if cpu_before is None or cpu_after is None else cpu_after - cpu_before
                sent = (len(bodies) - 2) * BATCH * rows_per_record
                # Redeliver everything once more: idempotent, nothing double counted.
                post_all(f"{monitor.url}/ingest", bodies[:4], 1)
                stored = httpx.get(f"{monitor.url}/drift/{model}", timeout=30).json()
                captured = stored["versions"][0]["rows_captured"]
                results.append({
                    "path": "http", "store": label, "rows_per_record": rows_per_record,
                    "senders": senders, "rows": sent, "seconds": round(seconds, 3),
                    "rows_per_s": round(sent / seconds),
                    "rows_per_cpu_s": round(sent / cpu) if cpu > 0 else None,
                    "stored_rows": captured,
                    "exactly_once": captured == sent + warm_rows,
                })  # fmt: skip
                print(results[-1], flush=True)
    finally:
        monitor.stop()
    return results


def direct_run(store_url: str, label: str, rows: int) -> list[dict[str, Any]]:
    """MonitorStore.ingest without HTTP (JSON decoding of the batch included)."""
    store = MonitorStore(store_url)
    results = []
    try:
        for rows_per_record in (1, 10):
            model = f"direct-{rows_per_record}-{uuid.uuid4().hex[:6]}"
            bodies = make_batches(rows, rows_per_record, model)
            started, cpu_started = time.perf_counter(), time.process_time()
            for body in bodies:
                store.ingest(json.loads(body)["records"])
            seconds = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            sent = len(bodies) * BATCH * rows_per_record
            results.append({
                "path": "in-process", "store": label, "rows_per_record": rows_per_record,
                "senders": 1, "rows": sent, "seconds": round(seconds, 3),
                "rows_per_s": round(sent / seconds), "rows_per_cpu_s": round(sent / cpu),
                "stored_rows": store.row_count(model),
                "exactly_once": store.row_count(model) == sent,
            })  # fmt: skip
            print(results[-1], flush=True)
    finally:
        store.close()
    return results


def postgres_database() -> tuple[str, Any] | None:
    """A fresh PostgreSQL database and a function that drops it, or None."""
    try:
        import psycopg

        admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)
    except Exception as exc:
        print(f"PostgreSQL unreachable ({type(exc).__name__}); SQLite only", flush=True)
        return None
    name = f"flowline_bench_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return f"{POSTGRES_ADMIN.rsplit('/', 1)[0]}/{name}", drop


def markdown(doc: dict[str, Any]) -> str:
    """Readable results."""
    lines = [
        "# Monitor ingest throughput",
        "",
        f"Generated {doc['generated_at']} by `benchmarks/monitoring/ingest_throughput.py` on "
        f"{doc['machine']['cpus']} CPUs (shared; load average {doc['machine']['load_before']}). "
        f"Batches of {BATCH} pre-encoded capture records (raw dataframe_split bodies of the "
        "churn data, 8 columns; record ids made as the capture client makes them); the monitor "
        "decodes each batch, validates every record and counts its body's rows (bodies are "
        "parsed into feature rows later, when their window is evaluated), and inserts one row "
        "per request in one transaction per batch, skipping record ids it already has "
        "(ON CONFLICT DO NOTHING). HTTP batches are ingested one at a time, each with the "
        "bearer token checked and the whole batch validated (every record's envelope, its "
        "rows counted from its body, new model versions admitted) before anything is stored.",
        "",
        "| path | store | rows/record | senders | rows | rows/s (wall) | rows per CPU-second "
        "of the ingesting process | exactly once |",
        "|---|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['path']} | {r['store']} | {r['rows_per_record']} | {r['senders']} | "
            f"{r['rows']} | {r['rows_per_s']:,} | {r['rows_per_cpu_s'] or 0:,} | "
            f"{'yes' if r['exactly_once'] else '**no**'} |"
        )
    http_sqlite = [r for r in doc["results"] if r["path"] == "http" and r["store"] == "sqlite"]
    worst = min(r["rows_per_s"] for r in http_sqlite)
    lines += [
        "",
        f"Target: >= {TARGET:,} rows/s. Slowest HTTP case on SQLite (the default store): "
        f"{worst:,} rows/s: **{'met' if worst >= TARGET else 'not met'}**.",
        "",
    ]
    baseline = doc.get("baseline")
    if baseline:
        lines += [
            f"Same session, run just before with the code of {baseline['label']} (single-row "
            "records, rows/s wall; rows per CPU-second in brackets):",
            "",
            "| path | store | senders | before | after |",
            "|---|---|---:|---:|---:|",
        ]
        now = {_case(r): r for r in doc["results"]}
        for r in baseline["results"]:
            if r["rows_per_record"] == 1 and _case(r) in now:
                n = now[_case(r)]
                lines.append(
                    f"| {r['path']} | {r['store']} | {r['senders']} | {r['rows_per_s']:,} "
                    f"({r['rows_per_cpu_s'] or 0:,}) | {n['rows_per_s']:,} "
                    f"({n['rows_per_cpu_s'] or 0:,}) |"
                )
        lines.append("")
    lines += [
        "'exactly once': after the timed run the first batches were posted again (a client "
        "redelivering after a lost acknowledgement) and the stored row count still equals the "
        "rows sent.",
        "",
        "Reading the numbers: the cost is per request (record), so rows/s grows with rows per "
        "request. The senders run in the benchmark process on the same 2 cores, which is why "
        "4 senders are not faster than 1; each case adds to the same store, so later cases "
        "write into larger tables and indexes. Wall-clock rows/s on PostgreSQL depends on its "
        "commit (fsync) latency, shared here with other work: compare the CPU column, which "
        "does not.",
        "",
    ]
    return "\n".join(lines)


def _case(result: dict[str, Any]) -> tuple[Any, ...]:
    return result["path"], result["store"], result["rows_per_record"], result["senders"]


def main(argv: list[str] | None = None) -> int:
    """Run every setting and write the results."""
    parser = harness.command_line(__doc__)
    parser.add_argument("--rows", type=int, default=100_000, help="rows per setting")
    parser.add_argument("--output", default=str(harness.RESULTS / "monitoring_ingest.json"))
    harness.add_markdown_only(parser)
    parser.add_argument(
        "--baseline",
        metavar="JSON[=LABEL]",
        help="results of this script run on older code just before, shown side by side",
    )
    args = parser.parse_args(argv)
    if args.markdown_only:
        harness.rewrite_markdown(args.output, markdown)
        return 0
    load = harness.load_average()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flowline-ingest-") as tmp_name:
        tmp = Path(tmp_name)
        sqlite_url = f"sqlite:///{tmp / 'direct.db'}"
        results += direct_run(sqlite_url, "sqlite", args.rows)
        results += http_run(f"sqlite:///{tmp / 'http.db'}", "sqlite", args.rows, tmp)
        pg = postgres_database()
        if pg is not None:
            url, drop = pg
            try:
                results += direct_run(url, "postgresql", args.rows)
                results += http_run(url, "postgresql", args.rows, tmp)
            finally:
                drop()
    doc = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": harness.machine_info(load_before=load),
        "batch_records": BATCH,
        "target_rows_per_s": TARGET,
        "results": results,
    }
    if args.baseline:
        path, _, label = args.baseline.partition("=")
        doc["baseline"] = {
            "label": label or path,
            "results": json.loads(Path(path).read_text())["results"],
        }
    harness.write_results(doc, args.output, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
