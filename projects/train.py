"""Entry point of the MLproject's ``main`` step: ``python -m projects.train --data ...``."""

from __future__ import annotations

import argparse
import sys

from pipelines.errors import UserError
from pipelines.train import TrainConfig


def _whole_number(text: str) -> int:
    # MLproject "float" parameters may arrive as "20.0".
    value = float(text)
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
    return int(value)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Parse command-line parameters into a TrainConfig."""
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(description="Tune, train and register a model.")
    parser.add_argument("--data", default=defaults.data, help="CSV or Parquet file, or 'demo'")
    parser.add_argument("--target", default=defaults.target, help="target column")
    parser.add_argument("--task", default=defaults.task, help="auto, classification, regression")
    parser.add_argument("--family", default=defaults.family, help="sklearn or keras")
    parser.add_argument("--max-evals", type=_whole_number, default=defaults.max_evals)
    parser.add_argument("--metric", default=defaults.metric, help="metric to optimise")
    parser.add_argument("--registered-model", default=defaults.registered_model)
    parser.add_argument("--test-size", type=float, default=defaults.test_size)
    parser.add_argument("--seed", type=_whole_number, default=defaults.seed)
    parser.add_argument(
        "--epochs", type=_whole_number, default=defaults.epochs, help="keras max epochs"
    )
    parser.add_argument(
        "--spark", default=defaults.spark, help="Spark master for parallel trials, e.g. local[*]"
    )
    parser.add_argument("--parallelism", type=_whole_number, default=defaults.parallelism)
    parser.add_argument(
        "--gate-tolerance",
        type=float,
        default=defaults.gate_tolerance,
        help="how much worse than production the new version may score and pass the gate",
    )
    args = parser.parse_args(argv)
    return TrainConfig(**{k: v for k, v in vars(args).items()})


def main(argv: list[str] | None = None) -> int:
    """Run training; user errors become one line on stderr and exit status 2."""
    config = parse_args(argv)
    from pipelines.train import train  # imported late so --help stays fast

    try:
        train(config, report=lambda line: print(f"[flowline] {line}", flush=True))
    except UserError as exc:
        print(f"flowline: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
