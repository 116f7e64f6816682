"""Feedback ingest throughput: labels per second into the monitor's store, over HTTP.

A real `python -m monitoring` process on SQLite (the default store) first ingests
``--rows`` captured single-row requests, each with a request id, through
`POST /ingest` (the anchor, measured in the same run), then takes their labels
through `POST /feedback/{model}`: as JSON and as CSV bodies of 10,000 labels, each
label joined at once with its captured prediction; then the same labels again (an
idempotent redelivery: every one unchanged); and labels whose requests were never
captured (counted unknown, stored). Every count is checked at the end.

    .venv/bin/python benchmarks/monitoring/feedback_ingest.py [--rows 100000]

Writes benchmarks/results/feedback_ingest.json and .md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.monitoring.ingest_throughput import make_batches  # noqa: E402
from tests.helpers_monitor import AUTH, start_monitor  # noqa: E402

TARGET = 20_000
CAPTURE_BATCH = 500
FEEDBACK_BATCH = 10_000
TOKEN = "bench-feedback-token"
OUTPUT = harness.RESULTS / "feedback_ingest.json"


def feedback_bodies(request_ids: list[str], kind: str) -> list[tuple[bytes, str]]:
    """Feedback bodies of FEEDBACK_BATCH labels each, as JSON or CSV."""
    out = []
    for start in range(0, len(request_ids), FEEDBACK_BATCH):
        chunk = request_ids[start : start + FEEDBACK_BATCH]
        labels = ["yes" if (start + i) % 4 == 0 else "no" for i in range(len(chunk))]
        if kind == "json":
            items = [{"request_id": r, "label": y} for r, y in zip(chunk, labels, strict=True)]
            out.append((json.dumps(items).encode(), "application/json"))
        else:
            lines = "".join(f"{r},{y}\n" for r, y in zip(chunk, labels, strict=True))
            out.append((f"request_id,label\n{lines}".encode(), "text/csv"))
    return out


def post_each(
    client: httpx.Client, url: str, bodies: list[tuple[bytes, str]], auth: dict[str, str]
) -> tuple[float, dict[str, int]]:
    """POST the bodies one after another; wall seconds and the summed answers."""
    totals: dict[str, int] = {}
    started = time.perf_counter()
    for body, content_type in bodies:
        answer = client.post(url, content=body, headers={**auth, "content-type": content_type})
        if answer.status_code != 200:
            raise RuntimeError(f"HTTP {answer.status_code}: {answer.text[:300]}")
        for key, value in answer.json().items():
            totals[key] = totals.get(key, 0) + value
    return time.perf_counter() - started, totals


def run(rows: int) -> dict[str, Any]:
    """Measure the anchor and the feedback cases on one monitor process."""
    with tempfile.TemporaryDirectory(prefix="flowline-bench-feedback-") as tmp:
        home = Path(tmp)
        env = harness.store_only_monitor_env(
            home / "home", FLOWLINE_FEEDBACK_TOKEN=TOKEN, FLOWLINE_MONITOR_ESTIMATE="0"
        )
        monitor = start_monitor(home, env, name="monitor-feedback")
        cases = []
        try:
            with httpx.Client(timeout=120) as client:
                model = f"bench-{uuid.uuid4().hex[:6]}"
                ids = [f"{uuid.uuid4().hex[:8]}-{i:x}" for i in range(rows)]
                feedback_url = f"{monitor.url}/feedback/{model}"
                auth = {"authorization": f"Bearer {TOKEN}"}
                # Warm-up: the first label of a model asks the (absent) registry for its
                # type, which imports MLflow once per process.
                warm = [(b, "application/json") for b in make_batches(1, 1, model, ["w-0"])]
                post_each(client, f"{monitor.url}/ingest", warm, AUTH)
                post_each(client, feedback_url, feedback_bodies(["w-0"], "json"), auth)
                capture = make_batches(rows, 1, model, ids)
                seconds, totals = post_each(
                    client,
                    f"{monitor.url}/ingest",
                    [(b, "application/json") for b in capture],
                    AUTH,
                )
                assert totals["rows"] == rows, totals
                cases.append(_case("capture ingest (anchor)", rows, seconds))
                half = rows // 2
                for name, kind, chunk, expect in (
                    ("labels, JSON, joined", "json", ids[:half], "matched"),
                    ("labels, CSV, joined", "csv", ids[half:], "matched"),
                    ("same labels again (idempotent)", "json", ids[:half], "unchanged"),
                    ("labels of unknown ids", "json", [f"x{i}" for i in range(half)], "unknown"),
                ):
                    bodies = feedback_bodies(chunk, kind)
                    cpu_before = harness.cpu_seconds(monitor.pid)
                    seconds, totals = post_each(client, feedback_url, bodies, auth)
                    cpu = harness.cpu_seconds(monitor.pid) - cpu_before
                    assert totals[expect] == len(chunk), (name, totals)
                    cases.append(
                        {
                            **_case(name, len(chunk), seconds),
                            "rows_per_cpu_s": round(len(chunk) / cpu),
                        }
                    )
                counts = client.get(f"{monitor.url}/performance/{model}").json()["labels"]
                assert counts == {"matched": rows + 1, "unknown": half}, counts
        finally:
            monitor.stop()
    anchor = cases[0]["rows_per_s"]
    for case in cases:
        case["ratio_to_anchor"] = round(case["rows_per_s"] / anchor, 2)
    slowest = min(c["rows_per_s"] for c in cases[1:])
    return {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": harness.machine_info(load_average=harness.load_average()),
        "rows": rows,
        "feedback_batch": FEEDBACK_BATCH,
        "cases": cases,
        "target_rows_per_s": TARGET,
        "slowest_feedback_rows_per_s": slowest,
        "met": slowest >= TARGET,
    }


def _case(name: str, rows: int, seconds: float) -> dict[str, Any]:
    return {
        "case": name,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds),
    }


def render(doc: dict[str, Any]) -> str:
    """The Markdown of a run."""
    lines = [
        "# Feedback ingest throughput",
        "",
        f"Generated {doc['generated']} by `benchmarks/monitoring/feedback_ingest.py` on "
        f"{doc['machine']['cpus']} CPUs (shared; load average {doc['machine']['load_average']}). "
        f"One real monitor process on SQLite; {doc['rows']:,} captured single-row requests, "
        f"then their labels in bodies of {doc['feedback_batch']:,}, one body at a time. Each "
        "label is looked up by its request id, joined with that row's captured prediction "
        "and stored in one transaction per body; the anchor is the capture ingest "
        "(`POST /ingest`, batches of 500) into the same store, in the same run.",
        "",
        "| case | labels | seconds | rows/s | rows per CPU-second of the monitor "
        "| ratio to anchor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in doc["cases"]:
        cpu = f"{c['rows_per_cpu_s']:,}" if "rows_per_cpu_s" in c else "–"
        lines.append(
            f"| {c['case']} | {c['rows']:,} | {c['seconds']} | {c['rows_per_s']:,} | {cpu} "
            f"| {c['ratio_to_anchor']} |"
        )
    verdict = "**met**" if doc["met"] else "**missed**"
    lines += [
        "",
        f"Target: >= {doc['target_rows_per_s']:,} labels/s on SQLite. Slowest feedback case: "
        f"{doc['slowest_feedback_rows_per_s']:,} rows/s: {verdict}.",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    """Run, write the results and print the Markdown."""
    options = harness.command_line(__doc__)
    options.add_argument("--rows", type=int, default=100_000)
    harness.add_markdown_only(options)
    args = options.parse_args()
    if args.markdown_only:
        harness.rewrite_markdown(OUTPUT, render)
        return 0
    harness.write_results(run(args.rows), OUTPUT, render)
    return 0


if __name__ == "__main__":
    sys.exit(main())
