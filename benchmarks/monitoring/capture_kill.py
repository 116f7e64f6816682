"""Captures lost when the gateway is killed (kill -9) under constant load, and what the
flush interval that bounds the loss costs in scoring latency.

Real processes: one `mlflow models serve` replica (LogisticRegression, breast_cancer,
30 float columns), a real monitor (`python -m monitoring`, SQLite store) and the
gateway with the capture hook (`tests.helpers_monitor gateway`). Each trial:

1. start a gateway serving a model name of its own (so every trial counts its own rows);
2. drive paced single-row load (a fixed request rate, several keep-alive clients) and
   record every answer's latency;
3. SIGKILL the gateway's process group mid-load;
4. start a gateway again on the same spool (as `flowline up` does), so whatever was
   spooled is redelivered, and wait until the monitor's count stops changing;
5. lost = requests answered 200 - records the monitor stored; lost ms = lost / the
   request rate measured over the load.

Two settings, interleaved trial by trial: the old flush interval (0.2 s, the anchor)
and the current default (monitoring.capture.client.DEFAULT_FLUSH_INTERVAL_S).

    .venv/bin/python benchmarks/monitoring/capture_kill.py [--trials 4] [--rate 200]

Writes benchmarks/results/monitoring_capture_kill.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import httpx  # noqa: E402

from benchmarks import harness  # noqa: E402
from monitoring.capture.client import DEFAULT_FLUSH_INTERVAL_S  # noqa: E402
from serving.model_metadata import deployment_from_model_dir  # noqa: E402
from tests.conftest import Service, wait_for  # noqa: E402
from tests.helpers_monitor import split_body, start_capture_gateway  # noqa: E402
from tests.helpers_serving import breast_cancer_frame  # noqa: E402

OLD_FLUSH_S = 0.2  # the default before issue 9, item 7
TARGET_MS = 50.0


class PacedLoad:
    """Open-loop load: ``rate`` requests per second over ``clients`` keep-alive connections.

    Each client sends on its own fixed schedule (no catching up in bursts after a
    slow answer), so the rate is the same whatever the latency, and the rows lost
    convert to milliseconds of traffic.
    """

    def __init__(self, url: str, body: bytes, rate: float, clients: int) -> None:
        self.url, self.body, self.rate, self.clients = url, body, rate, clients
        self.ok_times: list[float] = []
        self.latencies_ms: list[float] = []
        self.failures = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, index: int) -> None:
        interval = self.clients / self.rate
        due = time.monotonic() + interval * index / self.clients
        headers = {"content-type": "application/json"}
        client = httpx.Client(timeout=10)
        try:
            while not self._stop.is_set():
                delay = due - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                    continue
                due += interval
                sent = time.monotonic()
                try:
                    status = client.post(self.url, content=self.body, headers=headers).status_code
                except httpx.HTTPError:
                    status = 0
                    client.close()  # a dead gateway's connection must not be reused
                    client = httpx.Client(timeout=10)
                done = time.monotonic()
                with self._lock:
                    if status == 200:
                        self.ok_times.append(done)
                        self.latencies_ms.append((done - sent) * 1000)
                    else:
                        self.failures += 1
        finally:
            client.close()

    def start(self) -> PacedLoad:
        """Start every client."""
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop every client and wait for them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def ok(self) -> int:
        """Requests answered 200 so far."""
        with self._lock:
            return len(self.ok_times)


def stored_records(monitor: Service, model: str) -> int:
    """Records the monitor stored for ``model`` (its /drift view), 0 before the first."""
    answer = httpx.get(f"{monitor.url}/drift/{model}", timeout=10)
    if answer.status_code == 404:
        return 0
    return sum(v["rows_captured"] for v in answer.json()["versions"])


def settled_count(monitor: Service, model: str, quiet_s: float = 2.0) -> int:
    """The stored count once it has not changed for ``quiet_s`` (every client flushed)."""
    seen = [(-1, time.monotonic())]

    def settled() -> bool:
        count = stored_records(monitor, model)
        if count != seen[-1][0]:
            seen.append((count, time.monotonic()))
        return time.monotonic() - seen[-1][1] >= quiet_s

    wait_for(settled, f"captures of {model} to settle", 120)
    return seen[-1][0]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def trial(
    tmp: Path,
    name: str,
    flush_s: float | None,
    replica: Service,
    model_dir: Path,
    monitor: Service,
    body: bytes,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One gateway kill under load; the rows lost and the latencies before the kill."""
    workdir = tmp / name
    workdir.mkdir()
    env = {
        "FLOWLINE_MONITOR_URL": monitor.url,
        "FLOWLINE_CAPTURE_SPOOL_DIR": str(workdir),
        # Its own home: the gateway restores its saved routes from there at start.
        "FLOWLINE_HOME": str(workdir / "home"),
    }
    if flush_s is not None:
        env["FLOWLINE_CAPTURE_FLUSH_S"] = str(flush_s)
    deployment = deployment_from_model_dir(name, "1", [replica.url], model_dir).to_dict()
    gateway = start_capture_gateway(workdir, [deployment], env)
    load: PacedLoad | None = None
    try:
        url = f"{gateway.url}/invocations"
        load = PacedLoad(url, body, args.rate, args.clients).start()
        wait_for(lambda: load.ok() >= args.rate, "the load to flow")
        started = time.monotonic()
        load_from = load.ok()
        time.sleep(args.seconds)  # constant load for a fixed time before the kill, by design
        killed_at = time.monotonic()
        gateway.kill()
        load.stop()
        # Every 200 counts, also one read just after the kill: its bytes had arrived.
        answered = list(load.ok_times)
        rate = sum(1 for t in answered[load_from:] if t <= killed_at) / (killed_at - started)
        latencies = load.latencies_ms[load_from:]
    finally:
        if load is not None:
            load.stop()
        gateway.stop()
    # The next gateway on the same spool redelivers what the killed one had spooled.
    again = start_capture_gateway(workdir, [deployment], env)
    try:
        stored = settled_count(monitor, name)
    finally:
        again.stop()
    lost = len(answered) - stored
    return {
        "flush_s": flush_s if flush_s is not None else DEFAULT_FLUSH_INTERVAL_S,
        "answered_200": len(answered),
        "stored": stored,
        "lost_rows": lost,
        "rate_rps": round(rate, 1),
        "lost_ms": round(max(lost, 0) / rate * 1000, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "latencies_ms": [round(x, 3) for x in latencies],
        "failed_after_kill": load.failures if load is not None else None,
    }


def summary(trials: list[dict[str, Any]], flush_s: float) -> dict[str, Any]:
    """Loss and latency over one setting's trials (p99 pooled over every request)."""
    runs = [t for t in trials if t["flush_s"] == flush_s]
    pooled = [x for t in runs for x in t["latencies_ms"]]
    return {
        "flush_s": flush_s,
        "trials": len(runs),
        "lost_rows": [t["lost_rows"] for t in runs],
        "lost_ms": [t["lost_ms"] for t in runs],
        "lost_ms_max": max(t["lost_ms"] for t in runs),
        "lost_ms_mean": round(statistics.mean(t["lost_ms"] for t in runs), 1),
        "rate_rps_mean": round(statistics.mean(t["rate_rps"] for t in runs), 1),
        "requests_timed": len(pooled),
        "p50_ms": round(percentile(pooled, 50), 2),
        "p99_ms": round(percentile(pooled, 99), 2),
        "p99_ms_per_trial": [t["p99_ms"] for t in runs],
    }


def markdown(doc: dict[str, Any]) -> str:
    """Readable results."""
    old, new = doc["settings"]["old"], doc["settings"]["new"]
    lines = [
        "# Captures lost on kill -9 of the gateway",
        "",
        f"{doc['when']} on {doc['machine']} (shared; load average before the run "
        f"{doc['load_before']}). `benchmarks/monitoring/capture_kill.py`: one `mlflow models "
        "serve` replica (breast_cancer, 30 float columns), a real monitor (SQLite), the gateway "
        f"with the capture hook; paced single-row load at {doc['rate_rps']} requests/s over "
        f"{doc['clients']} keep-alive clients for {doc['seconds']} s, then SIGKILL of the "
        "gateway's process group. A gateway started again on the same spool redelivers what "
        "was spooled; lost = requests answered 200 - records stored; ms = lost / measured rate. "
        f"{doc['trials']} trials per setting, interleaved (old, new, old, new, ...).",
        "",
        "| flush interval | trials | lost rows per trial | lost ms per trial | worst ms | "
        "mean ms | p50 ms | p99 ms (pooled) | p99 ms per trial |",
        "|---|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for label, s in (("0.2 s (old default)", old), (f"{new['flush_s']} s (default)", new)):
        lines.append(
            f"| {label} | {s['trials']} | {', '.join(map(str, s['lost_rows']))} | "
            f"{', '.join(map(str, s['lost_ms']))} | {s['lost_ms_max']} | {s['lost_ms_mean']} | "
            f"{s['p50_ms']} | {s['p99_ms']} | {', '.join(map(str, s['p99_ms_per_trial']))} |"
        )
    met = new["lost_ms_max"] <= TARGET_MS
    lines += [
        "",
        f"Target: <= {TARGET_MS:.0f} ms of traffic lost on kill -9: worst trial "
        f"{new['lost_ms_max']} ms with the default: **{'met' if met else 'not met'}**.",
        "",
        f"p99 cost of the shorter interval: {new['p99_ms'] - old['p99_ms']:+.2f} ms pooled "
        f"({old['p99_ms']} -> {new['p99_ms']} ms; p50 {old['p50_ms']} -> {new['p50_ms']} ms). "
        "Read it against the trial-to-trial spread of each setting's p99 on this shared "
        "machine (the per-trial column).",
        "",
        "Why the loss is bounded: the gateway's hook only appends to an in-memory queue, and "
        "the delivery thread posts it every flush interval, paced from the start of the "
        "previous flush, so a record waits in memory at most one interval, plus the batch in "
        "flight. A kill -9 loses exactly that; everything spooled (monitor down or slow) is "
        "on disk and redelivered by the next gateway.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the trials and write the results."""
    parser = harness.command_line(__doc__)
    parser.add_argument("--trials", type=int, default=4, help="kills per setting")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0, help="load before each kill")
    parser.add_argument("--output", default=str(harness.RESULTS / "monitoring_capture_kill.json"))
    args = parser.parse_args(argv)
    features, _ = breast_cancer_frame()
    body = split_body(features.head(1))
    load_before = harness.load_average()
    trials: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flowline-capture-kill-") as tmp_name:
        tmp = Path(tmp_name)
        services: list[Service] = []
        try:
            model_dir, replica, monitor = harness.start_replica_and_monitor(tmp, services)
            for i in range(args.trials):
                for label, flush_s in (("old", OLD_FLUSH_S), ("new", None)):
                    result = trial(
                        tmp, f"kill-{label}-{i}", flush_s, replica, model_dir, monitor, body, args
                    )
                    shown = {k: v for k, v in result.items() if k != "latencies_ms"}
                    print(f"trial {i + 1} {label}: {shown}", flush=True)
                    trials.append(result)
        finally:
            for service in reversed(services):
                service.stop()
    doc = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": harness.machine(),
        "load_before": load_before,
        "rate_rps": args.rate,
        "clients": args.clients,
        "seconds": args.seconds,
        "trials": args.trials,
        "target_lost_ms": TARGET_MS,
        "settings": {
            "old": summary(trials, OLD_FLUSH_S),
            "new": summary(trials, DEFAULT_FLUSH_INTERVAL_S),
        },
        "raw_trials": [{k: v for k, v in t.items() if k != "latencies_ms"} for t in trials],
    }
    harness.write_results(doc, args.output, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
