"""Trials per minute for each family at default settings, on the demo data.

Each trial is a nested MLflow run written to a real tracking server (SQLite backend),
as in ``mlflow run``. Run: ``.venv/bin/python benchmarks/training_throughput.py``.
"""

from __future__ import annotations

import json
import platform
import tempfile
import time
from pathlib import Path

import mlflow

from common.processes import free_port
from flowline.tracking import TrackingServer
from pipelines.train import TrainConfig, train

RESULTS = Path(__file__).parent / "results"


def measure(family: str, max_evals: int) -> dict:
    """Run the default job for ``family`` and count trials per minute of search time."""
    stamps: list[float] = []

    def report(line: str) -> None:
        if line.startswith("trial "):
            stamps.append(time.perf_counter())

    config = TrainConfig(family=family, max_evals=max_evals, registered_model=f"bench-{family}")
    started = time.perf_counter()
    train(config, report=report)
    total = time.perf_counter() - started
    search_seconds = stamps[-1] - started
    return {
        "family": family,
        "max_evals": max_evals,
        "trials_per_minute": round(60 * len(stamps) / search_seconds, 1),
        "job_seconds": round(total, 1),
    }


def main() -> None:
    """Measure both families against a fresh tracking server and write the results file."""
    with tempfile.TemporaryDirectory() as home:
        server = TrackingServer(home=Path(home), port=free_port(), workers=1)
        process = server.start()
        try:
            mlflow.set_tracking_uri(server.url)
            results = [measure("sklearn", TrainConfig().max_evals), measure("keras", 10)]
        finally:
            process.stop()
    out = {
        "benchmark": "training_throughput",
        "data": "demo churn.csv, 3000 rows x 8 features",
        "machine": f"{platform.machine()}, {platform.python_version()}",
        "results": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training_throughput.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
