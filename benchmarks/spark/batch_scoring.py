"""Batch scoring of 1M rows: pandas chunks and spark_udf on local[2] against the floor.

The floor is one ``pyfunc.predict`` call on the whole frame, in memory. The other two are
the real ``python -m projects.score`` command (the ``score`` entry point): pandas chunks
of 50k rows, and ``mlflow.pyfunc.spark_udf`` on a local[2] Spark, reading the same four
Parquet files and writing Parquet. Each runs in its own process group, whose peak
resident memory (every process of the group, the JVM and Python workers included) is
sampled every 0.1 s. Run: ``.venv/bin/python benchmarks/spark/batch_scoring.py``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness  # noqa: E402

ROWS = 1_000_000
FLOOR = """
import sys, time, glob, mlflow, pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/bench-batch/1")
frame = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(sys.argv[2] + "/*.parquet"))])
started = time.perf_counter()
model.predict(frame)
print(f"predict {time.perf_counter() - started:.3f}")
"""


def run_measured(argv: list[str], env: dict[str, str]) -> tuple[str, float, int]:
    """Run ``argv`` in its own process group: output, wall seconds, peak group RSS."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        env=env,
        cwd=harness.REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.1):
            peak = max(peak, harness.group_rss_bytes(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, _ = proc.communicate(timeout=1800)
    finally:
        done.set()
        sampler.join()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{out[-3000:]}")
    return out, time.perf_counter() - started, peak


def _rows(tmp: Path) -> Path:
    rng = np.random.default_rng(0)
    base = pd.read_csv(harness.REPO / "projects" / "data" / "churn.csv").drop(columns=["churned"])
    frame = base.sample(ROWS, replace=True, random_state=0).reset_index(drop=True)
    frame["monthly_charges"] = (frame["monthly_charges"] + rng.normal(0, 1, ROWS)).round(2)
    folder = tmp / "input"
    folder.mkdir()
    for i, part in enumerate(np.array_split(np.arange(ROWS), 4)):
        frame.iloc[part].to_parquet(folder / f"part-{i}.parquet", index=False)
    return folder


def _train(uri: str) -> None:
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    code = (
        "from pipelines.train import TrainConfig, train;"
        "train(TrainConfig(max_evals=1, registered_model='bench-batch'), report=lambda _: None)"
    )
    subprocess.run([sys.executable, "-c", code], env=env, cwd=harness.REPO, check=True)


def main(argv: list[str] | None = None) -> None:
    """Measure the three engines on the same 1M rows and write the results file."""
    harness.command_line(__doc__).parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        _train(uri)
        folder = _rows(tmp)
        env = dict(os.environ, MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1")
        out, wall, peak = run_measured([sys.executable, "-c", FLOOR, uri, str(folder)], env)
        floor_s = float(re.search(r"predict ([\d.]+)", out).group(1))
        results = {
            "floor": {
                "seconds": floor_s,
                "rows_per_s": round(ROWS / floor_s),
                "peak_rss_mib": round(peak / 2**20),
            }
        }
        quarter = folder / "part-0.parquet"  # 250k rows: memory must not grow with rows
        engines = (
            ("pandas_chunks", folder, []),
            ("pandas_chunks_250k_rows", quarter, []),
            ("spark_udf_local2", folder, ["--spark", "local[2]"]),
        )
        for engine, source, extra in engines:
            rows = ROWS // 4 if source == quarter else ROWS
            argv = [sys.executable, "-m", "projects.score", "--model", "models:/bench-batch/1"]
            argv += ["--input", str(source), "--output", str(tmp / f"out-{engine}"), *extra]
            out, wall, peak = run_measured(argv, env)
            seconds = float(re.search(r"in ([\d.]+)s", out).group(1))
            results[engine] = {
                "rows": rows,
                "seconds": seconds,
                "rows_per_s": round(rows / seconds),
                "vs_floor": round(seconds * ROWS / rows / floor_s, 2),
                "process_wall_seconds": round(wall, 1),
                "peak_rss_mib": round(peak / 2**20),
            }
    report = {
        "benchmark": "batch_scoring",
        "rows": ROWS,
        "data": "demo churn columns (int, float with nulls, text), 4 Parquet files",
        "machine": harness.machine(python_label=False),
        "results": results,
        "note": (
            "floor: one in-memory pyfunc.predict on the whole frame (reading excluded); the "
            "engines' seconds include reading the Parquet input and writing the output "
            "(and, for Spark, starting the session); vs_floor = seconds / floor seconds."
        ),
    }
    harness.write_results(report, harness.RESULTS / "batch_scoring.json")


if __name__ == "__main__":
    main()
