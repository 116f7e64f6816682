"""What capture adds to POST /invocations: the gateway with and without the capture hook.

Same run, same replica (`mlflow models serve`, LogisticRegression on breast_cancer,
30 float columns, as in benchmarks/serving), two gateways in front of it:

* capture off: `serving.gateway` with no hook;
* capture on: the same gateway with `monitoring.capture.client.capture_hook_from_env()`,
  delivering to a real monitor process (`python -m monitoring`, SQLite store).

Load: wrk at 64 and 1 connections, single-row JSON, interleaved rounds (off, on, off,
on, ...) so that the shared machine's background load hits both alike, each run started
once every process is idle again (no leftover queue or ingest backlog); medians over
rounds. Also: gateway CPU per request (load independent), the hook call's own cost
in-process, and a check that every answered request reached the monitor (no drops).

    apt-get install -y wrk      # if missing
    .venv/bin/python benchmarks/monitoring/capture_overhead.py [--duration 10] [--rounds 3]

Writes benchmarks/results/monitoring_capture.json and .md.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402

from benchmarks import harness  # noqa: E402
from monitoring.capture.client import CaptureClient  # noqa: E402
from serving.gateway.capture import CapturedRequest  # noqa: E402
from serving.model_metadata import deployment_from_model_dir  # noqa: E402
from tests.conftest import Service, wait_for  # noqa: E402
from tests.helpers_monitor import start_capture_gateway  # noqa: E402
from tests.helpers_serving import breast_cancer_frame  # noqa: E402

MODEL = "breast_cancer"
TARGET_P99_MS = 1.0


def hook_cost_us(calls: int = 200_000) -> dict[str, float]:
    """In-process cost of one `on_scored` call (queue append), in microseconds."""
    import asyncio

    with tempfile.TemporaryDirectory() as tmp:
        # A client that never flushes during the measurement: only the enqueue is timed.
        client = CaptureClient(
            "http://127.0.0.1:9", tmp, queue_size=calls + 1, flush_interval_s=3600
        )
        request = CapturedRequest(b'{"dataframe_split": {"columns": ["a"], "data": [[1]]}}',
                                  "application/json")  # fmt: skip

        async def run() -> float:
            started = time.perf_counter()
            for _ in range(calls):
                await client.on_scored(MODEL, "1", request, [0])
            return time.perf_counter() - started

        seconds = asyncio.run(run())
        client._queue.clear()  # nothing to deliver: the monitor URL is a dead port
        client.close(timeout=0.1)
    return {"calls": calls, "us_per_call": seconds / calls * 1e6}


def gateway_metric(gateway: Service, name: str) -> float:
    """Sum of a gateway counter's samples."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == name:
            total += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return total


def summarise(doc: dict[str, Any]) -> str:
    """Markdown tables of the results."""
    r = doc["runs"]
    lines = [
        "# Capture overhead on POST /invocations",
        "",
        f"{doc['when']} on {doc['machine']} (shared; load average before the run "
        f"{doc['load_before']}). One `mlflow models serve` replica (LogisticRegression, "
        "breast_cancer, 30 float columns), two gateways in front of it (capture off / on; "
        "capture delivers to a real monitor process), single-row JSON, wrk -t1, "
        f"{doc['rounds']} interleaved rounds of {doc['duration_s']} s per setting, each "
        "started once the replica, the monitor and both gateways are idle; medians over rounds.",
        "",
        "| capture | clients | rps | p50 ms | p90 ms | p99 ms | gateway CPU us/request | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ("off_c64", "on_c64", "off_c1", "on_c1"):
        run = r[key]
        lines.append(
            f"| {key.split('_')[0]} | {run['connections']} | {run['rps']} | {run['p50_ms']:.2f} | "
            f"{run['p90_ms']:.2f} | {run['p99_ms']:.2f} | {run.get('cpu_us_per_request', '-')} "
            f"| {run['errors']} |"
        )
    d = doc["deltas"]
    lines += [
        "",
        "| measure | value |",
        "|---|---:|",
        f"| p99 added at 64 clients (median on - median off) | {d['p99_c64_added_ms']:+.2f} ms |",
        f"| p99 added at 64 clients, per round pair | "
        f"{', '.join(f'{x:+.1f}' for x in d['p99_c64_added_per_round_ms'])} ms |",
        f"| round-to-round spread of p99 with capture off (noise) | "
        f"{d['p99_c64_off_spread_ms']:.1f} ms |",
        f"| p50 added at 1 client | {d['p50_c1_added_ms']:+.3f} ms |",
        f"| gateway CPU added per request (64 clients) | {d['cpu_us_added_c64']:+.1f} us |",
        f"| `on_scored` call in-process (the hot-path part) | "
        f"{doc['hook']['us_per_call']:.2f} us |",
        "",
        f"Target: p99 added at 64 clients <= {TARGET_P99_MS} ms: "
        f"**{'met' if d['p99_c64_added_ms'] <= TARGET_P99_MS else 'not met'}** by the medians; "
        "read it against the noise line: on 2 shared cores the p99 of a 64-client run moves "
        "by more than the capture cost between identical rounds.",
        "",
        f"Delivery: {doc['delivery']['answered_with_capture']} requests answered by the "
        f"capturing gateway (wrk's counts, warm-up included), "
        f"{doc['delivery']['rows_at_monitor']} rows at the monitor, "
        f"{doc['delivery']['gateway_capture_dropped']} dropped by the gateway's dispatcher, "
        f"{doc['delivery']['monitor_rows_dropped']} reported dropped by the capture client.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    parser = harness.command_line(__doc__)
    harness.add_wrk_options(parser)
    parser.add_argument("--output", default=str(harness.RESULTS / "monitoring_capture.json"))
    args = parser.parse_args(argv)
    if harness.wrk_missing():
        return 2
    features, _ = breast_cancer_frame()
    body = harness.single_row_body(features)
    load_before = harness.load_average()
    hook = hook_cost_us()
    rounds: dict[str, list[dict[str, Any]]] = {}
    answered_on = 0
    with tempfile.TemporaryDirectory(prefix="flowline-capture-bench-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "post.lua"
        script.write_text(harness.LUA)
        services: list[Any] = []
        try:
            model_dir, replica, monitor = harness.start_replica_and_monitor(tmp, services)
            deployment = deployment_from_model_dir(MODEL, "1", [replica.url], model_dir).to_dict()
            gateways: dict[str, Service] = {}
            for name, env in (
                ("off", {"FLOWLINE_MONITOR_URL": ""}),
                ("on", {"FLOWLINE_MONITOR_URL": monitor.url,
                        "FLOWLINE_CAPTURE_SPOOL_DIR": str(tmp / "spool")}),
            ):  # fmt: skip
                workdir = tmp / f"gateway-{name}"
                workdir.mkdir()
                gateways[name] = start_capture_gateway(workdir, [deployment], env)
                services.append(gateways[name])
            urls = {name: f"{g.url}/invocations" for name, g in gateways.items()}
            for connections in (64, 1):
                for name, url in urls.items():
                    warm = harness.run_wrk(url, body, connections, args.warmup, script)
                    if name == "on":
                        answered_on += warm["requests"]
                for i in range(args.rounds):
                    for name, url in urls.items():
                        # Leftovers of the previous run (the replica's queue, the
                        # monitor's ingest backlog) must not land in this one.
                        quiet_s = harness.wait_quiet([s.pid for s in services])
                        pid = gateways[name].pid
                        result = harness.run_wrk_cpu(
                            url, body, connections, args.duration, script, pid
                        )
                        result["quiet_wait_s"] = round(quiet_s, 2)
                        if name == "on":
                            answered_on += result["requests"]
                        rounds.setdefault(f"{name}_c{connections}", []).append(result)
                        print(f"round {i + 1} capture {name} c={connections}: {result}", flush=True)
            rows_at_monitor = wait_for(
                lambda: (httpx.get(f"{monitor.url}/drift/{MODEL}", timeout=10).json()
                         ["versions"][0]["rows_captured"]) >= answered_on
                and httpx.get(f"{monitor.url}/drift/{MODEL}", timeout=10).json(),
                "every captured request at the monitor", timeout=120,
            )["versions"][0]  # fmt: skip
            dropped_at_gateway = gateway_metric(gateways["on"], "flowline_gateway_capture_dropped")
        finally:
            for service in reversed(services):
                service.stop()
    runs = {key: harness.median_run(value) for key, value in rounds.items()}
    off64 = [r["p99_ms"] for r in rounds["off_c64"]]
    on64 = [r["p99_ms"] for r in rounds["on_c64"]]
    deltas = {
        "p99_c64_added_ms": runs["on_c64"]["p99_ms"] - runs["off_c64"]["p99_ms"],
        "p99_c64_added_per_round_ms": [b - a for a, b in zip(off64, on64, strict=True)],
        "p99_c64_off_spread_ms": max(off64) - min(off64),
        "p50_c1_added_ms": runs["on_c1"]["p50_ms"] - runs["off_c1"]["p50_ms"],
        "cpu_us_added_c64": (runs["on_c64"].get("cpu_us_per_request") or 0)
        - (runs["off_c64"].get("cpu_us_per_request") or 0),
    }
    doc = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": harness.machine(),
        "load_before": load_before,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "runs": runs,
        "raw_rounds": rounds,
        "deltas": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in deltas.items()},
        "hook": hook,
        "delivery": {
            "answered_with_capture": answered_on,
            "rows_at_monitor": rows_at_monitor["rows_captured"],
            "monitor_rows_dropped": rows_at_monitor["rows_dropped"],
            "gateway_capture_dropped": dropped_at_gateway,
        },
        "target_p99_added_ms": TARGET_P99_MS,
    }
    harness.write_results(doc, args.output, summarise)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
