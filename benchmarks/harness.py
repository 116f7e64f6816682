"""What the benchmark scripts share: paths, the command line and the results writer, the
machine line, repeated timings, process CPU and memory readings (Linux /proc), the wrk
driver, and the processes several benchmarks start.

The scripts run as files (``.venv/bin/python benchmarks/<dir>/<name>.py``), so each first
puts the repository root on ``sys.path`` (which also makes ``tests`` importable) and then
imports this module as ``benchmarks.harness``. It is not called ``common``: a script in
benchmarks/ itself has that folder first on ``sys.path``, where a ``common`` module would
hide the repository's ``common`` package.

Runs under flowline's venv only; ``monitoring/evidently_worker.py`` (Evidently's own venv)
does not use it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from flowline.tracking import TrackingServer
    from tests.conftest import Service

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


# --- command line and results -----------------------------------------------------------


def command_line(doc: str) -> argparse.ArgumentParser:
    """A script's command line, described by the first line of its docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0])


def add_markdown_only(options: argparse.ArgumentParser) -> None:
    """The ``--markdown-only`` switch of the scripts that can re-render a saved run."""
    options.add_argument(
        "--markdown-only", action="store_true", help="rewrite the .md from the saved .json"
    )


def rewrite_markdown(output: Path | str, render: Callable[[dict[str, Any]], str]) -> None:
    """Render the .md beside ``output`` again from the saved JSON."""
    output = Path(output)
    output.with_suffix(".md").write_text(render(json.loads(output.read_text())))


def write_results(
    doc: dict[str, Any],
    output: Path | str,
    render: Callable[[dict[str, Any]], str] | None = None,
    *,
    echo: bool = True,
) -> None:
    """Write ``doc`` to ``output`` as JSON (indent 2, final newline) and, given ``render``,
    its Markdown beside it (same name, .md); print the Markdown, or the JSON without one.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(doc, indent=2) + "\n")
    if render is None:
        text = json.dumps(doc, indent=2)
    else:
        text = render(doc)
        output.with_suffix(".md").write_text(text)
    if echo:
        print(text)


def machine(*, cores: bool = True, python_label: bool = True) -> str:
    """The machine line of a results file, ``x86_64, 2 cores, Python 3.11.9``; each script
    keeps the form its committed results have (without the cores, without "Python ").
    """
    parts = [platform.machine()]
    if cores:
        parts.append(f"{os.cpu_count()} cores")
    parts.append(("Python " if python_label else "") + platform.python_version())
    return ", ".join(parts)


def machine_info(**extra: Any) -> dict[str, Any]:
    """The machine as a results object: CPUs, Python version, then ``extra``."""
    return {"cpus": os.cpu_count(), "python": platform.python_version(), **extra}


def load_average() -> float:
    """The 1-minute load average, rounded (recorded before a run: the machine is shared)."""
    return round(os.getloadavg()[0], 2)


def repeat_timed(call: Callable[[], object], repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``call``."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - started)
    return seconds


# --- processes (Linux /proc) ------------------------------------------------------------


def _stat_fields(stat: Path) -> list[str] | None:
    """The fields of a /proc/<pid>/stat file after the command name, or None if gone."""
    try:
        return stat.read_text().rpartition(")")[2].split()
    except OSError:
        return None


def _cpu(fields: list[str]) -> float:
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _group(pgid: int) -> Iterator[tuple[Path, list[str]]]:
    """Every live process of a process group: its /proc folder and stat fields."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields and int(fields[2]) == pgid:
            yield stat.parent, fields


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, or None where it cannot be read."""
    fields = _stat_fields(Path(f"/proc/{pid}/stat"))
    return None if fields is None else _cpu(fields)


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in a process group."""
    return sum(_cpu(fields) for _, fields in _group(pgid))


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process and all its live descendants (a server
    whose workers start their own sessions, as BentoML's do, is not one process group)."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat_fields(stat)
        if fields:
            stats[int(stat.parent.name)] = fields
    children: dict[int, list[int]] = {}
    for child, fields in stats.items():
        children.setdefault(int(fields[1]), []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        if current in stats:
            total += _cpu(stats[current])
        todo += children.get(current, [])
    return total


def group_rss_bytes(pgid: int) -> int:
    """Resident memory of every live process in a process group, in bytes."""
    total = 0
    for folder, _ in _group(pgid):
        try:
            status = (folder / "status").read_text()
        except OSError:
            continue
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        total += int(match.group(1)) * 1024 if match else 0
    return total


def wait_quiet(pgids: list[int], timeout: float = 30.0, interval: float = 0.25) -> float:
    """Wait until the processes are idle (< 5% of a core each over `interval`); returns seconds.

    A wrk run that stops leaves up to one request per connection queued in the
    replica; at 64 connections the stock replica needs most of a second to work
    through them. Without this wait, that backlog lands in the next run's tail.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        before = [group_cpu_seconds(pgid) for pgid in pgids]
        time.sleep(interval)  # the sampling window of the CPU reading, not a wait for an event
        after = [group_cpu_seconds(pgid) for pgid in pgids]
        if all(b - a < 0.05 * interval for a, b in zip(before, after, strict=True)):
            return time.monotonic() - start
    raise RuntimeError(f"process groups {pgids} still busy after {timeout:.0f} s")


# --- wrk --------------------------------------------------------------------------------

# wrk reports latency percentiles and status counts through this script as one JSON line.
LUA = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("WRK_BODY")
local non2xx = 0
local versions = {}
response = function(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end
done = function(summary, latency, requests)
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, '
    .. '"max_us": %d, "errors_connect": %d, "errors_read": %d, "errors_write": %d, '
    .. '"errors_timeout": %d, "errors_status": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.timeout, summary.errors.status))
end
"""


def add_wrk_options(options: argparse.ArgumentParser, *, warmup: bool = True) -> None:
    """``--duration`` and ``--rounds`` of the wrk benchmarks (and ``--warmup``)."""
    options.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    options.add_argument("--rounds", type=int, default=3, help="interleaved runs per setting")
    if warmup:
        options.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per target")


def run_or_render(args: argparse.Namespace, render: Callable[[dict[str, Any]], str]) -> int | None:
    """The exit code when a wrk benchmark's command line asks for no run: 0 after
    ``--markdown-only`` rewrote the .md of ``args.output``, 2 when wrk is missing;
    None to go on and run it."""
    if args.markdown_only:
        rewrite_markdown(args.output, render)
        return 0
    return 2 if wrk_missing() else None


def wrk_missing() -> bool:
    """True, with a hint on stderr, when wrk is not on PATH."""
    if shutil.which("wrk") is not None:
        return False
    print("wrk not found: apt-get install -y wrk", file=sys.stderr)
    return True


def single_row_body(features: pd.DataFrame) -> str:
    """A JSON dataframe_split request body holding the first row of ``features``."""
    row = features.iloc[0].tolist()
    return json.dumps({"dataframe_split": {"columns": list(features.columns), "data": [row]}})


def run_wrk(url: str, body: str, connections: int, duration: int, script: Path) -> dict[str, Any]:
    """One wrk run; returns rps, latency percentiles (ms) and error counts."""
    cmd = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s",
        "-s", str(script), url,
    ]  # fmt: skip
    env = {**os.environ, "WRK_BODY": body}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration + 60)
    line = next((x for x in out.stdout.splitlines() if x.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")
    raw = json.loads(line[len("WRKJSON ") :])
    errors = sum(v for k, v in raw.items() if k.startswith("errors_"))
    return {
        "connections": connections,
        "requests": raw["requests"],
        "rps": round(raw["requests"] / (raw["duration_us"] / 1e6), 1),
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "max_ms": raw["max_us"] / 1000,
        "errors": errors,
    }


def run_wrk_cpu(
    url: str, body: str, connections: int, duration: int, script: Path, pid: int | None
) -> dict[str, Any]:
    """:func:`run_wrk`, plus ``cpu_us_per_request`` of process ``pid`` when given and readable:
    the load-independent overhead of that process per request.
    """
    cpu_before = None if pid is None else cpu_seconds(pid)
    result = run_wrk(url, body, connections, duration, script)
    cpu_after = None if pid is None else cpu_seconds(pid)
    if cpu_before is not None and cpu_after is not None:
        result["cpu_us_per_request"] = round(
            (cpu_after - cpu_before) / max(result["requests"], 1) * 1e6, 1
        )
    return result


def median_run(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-metric median over rounds (the machine is shared, so single runs are noisy)."""
    out: dict[str, Any] = {"connections": rounds[0]["connections"], "rounds": len(rounds)}
    for key in ("rps", "p50_ms", "p90_ms", "p99_ms", "max_ms"):
        out[key] = round(statistics.median(r[key] for r in rounds), 3)
    if all(r.get("cpu_us_per_request") is not None for r in rounds):
        out["cpu_us_per_request"] = round(
            statistics.median(r["cpu_us_per_request"] for r in rounds), 1
        )
    out["requests"] = sum(r["requests"] for r in rounds)
    out["errors"] = sum(r["errors"] for r in rounds)
    return out


# --- processes the benchmarks start -----------------------------------------------------


def put_deployment(gateway_url: str, token: str, model: str, body: dict[str, Any]) -> None:
    """PUT a deployment on a gateway's admin API, as the controller does after its smoke
    test; raises on a refusal."""
    import httpx

    answer = httpx.put(
        f"{gateway_url}/admin/deployments/{model}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    answer.raise_for_status()


def store_only_monitor_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment of a monitor that only stores captures: no MLflow registry to ask."""
    return {
        "FLOWLINE_HOME": str(home),
        "FLOWLINE_MONITOR_MLFLOW": "0",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:9",  # no registry: rows only stored
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        **extra,
    }


def start_replica_and_monitor(tmp: Path, services: list[Service]) -> tuple[Path, Service, Service]:
    """The breast_cancer model saved under ``tmp``, one `mlflow models serve` replica of it
    and a store-only monitor; each process is appended to ``services`` once started (the
    caller stops them in reverse order, also on failure).
    """
    from tests.helpers_monitor import start_monitor
    from tests.helpers_serving import save_breast_cancer_model, start_scoring_servers

    model_dir = save_breast_cancer_model(tmp / "model")
    [replica] = start_scoring_servers([model_dir], tmp)
    services.append(replica)
    monitor = start_monitor(tmp, store_only_monitor_env(tmp / "monitor-home"))
    services.append(monitor)
    return model_dir, replica, monitor


@contextmanager
def tracking_server() -> Iterator[TrackingServer]:
    """A real MLflow tracking server (SQLite, one worker) in a temporary home, set as the
    tracking URI while the block runs.
    """
    import mlflow

    from common.processes import free_port
    from flowline.tracking import TrackingServer

    with tempfile.TemporaryDirectory() as home:
        server = TrackingServer(home=Path(home), port=free_port(), workers=1)
        process = server.start()
        try:
            mlflow.set_tracking_uri(server.url)
            yield server
        finally:
            process.stop()
