"""Hyperparameter search with hyperopt TPE, one nested MLflow run per trial."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
from hyperopt import STATUS_FAIL, STATUS_OK, Trials, fmin, tpe
from hyperopt.exceptions import AllTrialsFailed
from mlflow.entities import RunStatus

from pipelines.metrics import GREATER_IS_BETTER


@dataclass
class TrialRecord:
    """One trial's outcome, as written to the parent run's trials summary."""

    number: int
    run_id: str
    status: str
    params: dict[str, Any]
    score: float | None
    seconds: float
    error: str = ""


@dataclass
class SearchResult:
    """The best configuration found and every trial's record."""

    best_params: dict[str, Any]
    best_score: float
    trials: list[TrialRecord] = field(default_factory=list)


def _loggable(params: dict[str, Any]) -> dict[str, str]:
    return {k: "None" if v is None else str(v) for k, v in params.items()}


def search(
    space: Any,
    evaluate: Callable[[dict[str, Any]], float],
    metric: str,
    max_evals: int,
    seed: int,
    report: Callable[[str], None] = print,
) -> SearchResult:
    """Minimise the loss of ``evaluate`` over ``space`` under the active parent run.

    ``evaluate`` returns the validation metric for one configuration; any exception it
    raises (a diverging network, say) marks that trial's run FAILED and the search goes on.
    """
    sign = -1.0 if GREATER_IS_BETTER[metric] else 1.0
    records: list[TrialRecord] = []

    def objective(params: dict[str, Any]) -> dict[str, Any]:
        number = len(records) + 1
        started = time.perf_counter()
        with mlflow.start_run(nested=True, run_name=f"trial-{number:03d}") as run:
            mlflow.log_params(_loggable(params))
            mlflow.set_tag("flowline.trial", str(number))
            try:
                score = float(evaluate(params))
                if not math.isfinite(score):
                    raise ValueError(f"validation {metric} is not finite")
            except Exception as exc:  # a failed trial must not end the search
                error = f"{type(exc).__name__}: {exc}"[:500]
                mlflow.set_tag("flowline.error", error)
                mlflow.end_run(status=RunStatus.to_string(RunStatus.FAILED))
                seconds = time.perf_counter() - started
                records.append(
                    TrialRecord(number, run.info.run_id, "failed", params, None, seconds, error)
                )
                report(f"trial {number}/{max_evals} failed: {error}")
                return {"status": STATUS_FAIL, "loss": None}
            mlflow.log_metric(f"val_{metric}", score)
        seconds = time.perf_counter() - started
        records.append(TrialRecord(number, run.info.run_id, "ok", params, score, seconds))
        done = [r.score for r in records if r.score is not None]
        best = max(done) if sign < 0 else min(done)
        report(
            f"trial {number}/{max_evals} {params.get('estimator', '')}: "
            f"val_{metric}={score:.4f} best={best:.4f} ({seconds:.1f}s)"
        )
        return {"status": STATUS_OK, "loss": sign * score}

    try:
        fmin(
            objective,
            space,
            algo=tpe.suggest,
            max_evals=max_evals,
            trials=Trials(),
            rstate=np.random.default_rng(seed),
            show_progressbar=False,
        )
    except AllTrialsFailed:
        pass  # reported below with the last trial's error

    ok = [r for r in records if r.score is not None]
    if not ok:
        raise RuntimeError(f"all {len(records)} trials failed; last error: {records[-1].error}")
    best = min(ok, key=lambda r: sign * r.score)
    return SearchResult(best_params=best.params, best_score=best.score, trials=records)
