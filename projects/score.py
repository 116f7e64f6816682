"""Entry point of the MLproject's ``score`` step: ``python -m projects.score --model ...``.

Inside ``mlflow run . -e score`` the active run records what was scored: the model URI
and its resolved name and version, the input, the row count, the speed and, with
capture, the sample rate of the rows sent to the drift monitor.
"""

from __future__ import annotations

import argparse
import os
import sys

from pipelines.batch_score import CHUNK_ROWS, ScoreConfig
from pipelines.errors import UserError


def _flag(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse_args(argv: list[str] | None = None) -> ScoreConfig:
    """Parse command-line parameters into a ScoreConfig."""
    parser = argparse.ArgumentParser(description="Score a table with a registered model.")
    parser.add_argument("--model", required=True, help="models:/name@alias, models:/name/3 ...")
    parser.add_argument("--input", required=True, help="CSV or Parquet file, or a folder")
    parser.add_argument("--output", required=True, help="Parquet file (a folder with Spark)")
    parser.add_argument("--spark", default="", help="Spark master, e.g. local[*]; empty: pandas")
    parser.add_argument("--predict-method", default="predict", help="predict or predict_proba")
    parser.add_argument("--key", default="", help="keep only this input column beside outputs")
    parser.add_argument("--overwrite", type=_flag, default=False)
    parser.add_argument("--capture", type=_flag, default=False, help="send rows to the monitor")
    parser.add_argument("--capture-sample", type=float, default=0.1)
    parser.add_argument("--chunk-rows", type=lambda t: int(float(t)), default=CHUNK_ROWS)
    args = parser.parse_args(argv)
    return ScoreConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    """Score; user errors become one line on stderr and exit status 2."""
    config = parse_args(argv)
    import mlflow

    from pipelines.batch_score import score

    try:
        summary = score(config, report=lambda line: print(f"[flowline] {line}", flush=True))
    except UserError as exc:
        print(f"flowline: error: {exc}", file=sys.stderr, flush=True)
        return 2
    if not os.environ.get("MLFLOW_RUN_ID"):
        return 0  # run directly (flowline score), not by `mlflow run`: nothing to record
    # `mlflow run` created the run; start_run picks it up from MLFLOW_RUN_ID.
    with mlflow.start_run():
        mlflow.log_params(
            {"resolved_model": summary.model, "resolved_version": summary.version}
            | ({"capture_sample_rate": config.capture_sample} if config.capture else {})
        )
        mlflow.log_metrics(
            {
                "rows_scored": summary.rows,
                "seconds": summary.seconds,
                "rows_per_second": summary.rows / max(summary.seconds, 1e-9),
                "rows_captured": summary.captured_rows,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
