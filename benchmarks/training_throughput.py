"""Trials per minute for each family at default settings, on the demo data.

Each trial is a nested MLflow run written to a real tracking server (SQLite backend),
as in ``mlflow run``. Run: ``.venv/bin/python benchmarks/training_throughput.py``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from pipelines.train import TrainConfig, train  # noqa: E402


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


def main(argv: list[str] | None = None) -> None:
    """Measure both families against a fresh tracking server and write the results file."""
    harness.command_line(__doc__).parse_args(argv)
    with harness.tracking_server():
        results = [measure("sklearn", TrainConfig().max_evals), measure("keras", 10)]
    out = {
        "benchmark": "training_throughput",
        "data": "demo churn.csv, 3000 rows x 8 features",
        "machine": harness.machine(cores=False, python_label=False),
        "results": results,
    }
    harness.write_results(out, harness.RESULTS / "training_throughput.json")


if __name__ == "__main__":
    main()
