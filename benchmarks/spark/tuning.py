"""Trials per minute: sequential tuning against SparkTrials(parallelism=2) on local[2].

Both run in the same invocation, interleaved per family, against one real tracking server
(SQLite), on the demo data at default settings. The Spark figure includes starting the
local Spark session, as a user's run does. Run:
``.venv/bin/python benchmarks/spark/tuning.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

import mlflow

from common.processes import free_port
from flowline.tracking import TrackingServer
from pipelines.train import TrainConfig, train

RESULTS = Path(__file__).resolve().parent.parent / "results"
TRIALS = {"sklearn": 24, "keras": 8}
ROUNDS = 2


def _median(runs: list[dict]) -> dict:
    """The run with the median trials per minute (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r["trials_per_minute"])
    return ordered[(len(ordered) - 1) // 2]


def measure(family: str, spark: str) -> dict:
    """One tuning job; trials per minute of search time (from the job's start line)."""
    stamps: list[float] = []
    seconds: list[float] = []

    def report(line: str) -> None:
        if line.startswith("training "):
            stamps.append(time.perf_counter())
        elif line.startswith("trial ") and "failed" not in line:
            stamps.append(time.perf_counter())
            seconds.append(float(line.rsplit("(", 1)[1].rstrip("s)")))

    config = TrainConfig(
        family=family,
        max_evals=TRIALS[family],
        registered_model=f"bench-{family}-{'spark' if spark else 'seq'}",
        spark=spark,
        parallelism=2,
    )
    train(config, report=report)
    search = stamps[-1] - stamps[0]
    return {
        "family": family,
        "mode": f"SparkTrials(parallelism=2) on {spark}" if spark else "sequential Trials",
        "trials": TRIALS[family],
        "search_seconds": round(search, 1),
        "trials_per_minute": round(60 * TRIALS[family] / search, 1),
        "mean_trial_seconds": round(sum(seconds) / len(seconds), 2),
    }


def main() -> None:
    """Measure both modes for both families and write the results file."""
    results = []
    with tempfile.TemporaryDirectory() as home:
        server = TrackingServer(home=Path(home), port=free_port(), workers=1)
        process = server.start()
        try:
            mlflow.set_tracking_uri(server.url)
            for family in TRIALS:
                # Interleaved rounds, medians: the machine's speed drifts from minute to minute.
                rounds = [(measure(family, ""), measure(family, "local[2]")) for _ in range(ROUNDS)]
                seq = _median([r[0] for r in rounds])
                par = _median([r[1] for r in rounds])
                speedup = par["trials_per_minute"] / seq["trials_per_minute"]
                results.append(
                    {
                        "family": family,
                        "sequential": seq,
                        "spark": par,
                        "speedup": round(speedup, 2),
                        "speedup_per_round": [
                            round(b["trials_per_minute"] / a["trials_per_minute"], 2)
                            for a, b in rounds
                        ],
                    }
                )
        finally:
            process.stop()
    out = {
        "benchmark": "spark_tuning",
        "data": "demo churn.csv, 3000 rows x 8 features, default search space",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "results": results,
        "note": (
            "speedup = Spark trials/min / sequential trials/min, same run. On N cores a trial "
            "takes about the same time, so the speed-up grows with parallelism until the driver "
            "(TPE suggestion, MLflow logging, one Spark job per trial) is the bottleneck: "
            "speedup(N) ~ N * seq_trial / (spark_trial + driver overhead)."
        ),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "spark_tuning.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
