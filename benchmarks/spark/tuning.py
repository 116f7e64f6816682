"""Trials per minute: sequential tuning against SparkTrials(parallelism=2) on local[2].

Both run in the same invocation, interleaved per family, against one real tracking server
(SQLite), on the demo data at default settings. The Spark figure includes starting the
local Spark session, as a user's run does. Run:
``.venv/bin/python benchmarks/spark/tuning.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness  # noqa: E402
from pipelines.train import TrainConfig, train  # noqa: E402

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


def main(argv: list[str] | None = None) -> None:
    """Measure both modes for both families and write the results file."""
    harness.command_line(__doc__).parse_args(argv)
    results = []
    with harness.tracking_server():
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
                        round(b["trials_per_minute"] / a["trials_per_minute"], 2) for a, b in rounds
                    ],
                }
            )
    out = {
        "benchmark": "spark_tuning",
        "data": "demo churn.csv, 3000 rows x 8 features, default search space",
        "machine": harness.machine(python_label=False),
        "results": results,
        "note": (
            "speedup = Spark trials/min / sequential trials/min, same run. On N cores a trial "
            "takes about the same time, so the speed-up grows with parallelism until the driver "
            "(TPE suggestion, MLflow logging, one Spark job per trial) is the bottleneck: "
            "speedup(N) ~ N * seq_trial / (spark_trial + driver overhead)."
        ),
    }
    harness.write_results(out, harness.RESULTS / "spark_tuning.json")


if __name__ == "__main__":
    main()
