"""Hyperparameter search with hyperopt TPE, one nested MLflow run per trial."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import mlflow
import numpy as np
from hyperopt import STATUS_FAIL, STATUS_OK, Trials, fmin, tpe
from hyperopt.exceptions import AllTrialsFailed
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from common import registry
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


# MLflow's client settings that a trial on a Spark executor needs to log to the same server
# with the same credentials; on a cluster the executor has none of the driver's environment.
MLFLOW_CLIENT_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)


@dataclass(frozen=True)
class TrialContext:
    """What one trial needs wherever it runs (the driver, or a Spark executor)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    metric: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SparkSettings:
    """Run trials on Spark: ``master`` as spark-submit takes it, ``parallelism`` trials at once."""

    master: str
    parallelism: int = 2


def run_trial(
    params: dict[str, Any],
    evaluate: Callable[[dict[str, Any], Any], float],
    data: Any,
    context: TrialContext,
) -> dict[str, Any]:
    """One trial as a child run of the parent; hyperopt's result with the trial's record.

    Runs on the driver, or on a Spark executor with no active run: the child is attached to
    the parent by id. Any exception ``evaluate`` raises marks the child FAILED; the result
    then has status fail, so the search goes on.
    """
    os.environ.update(context.env)
    mlflow.set_tracking_uri(context.tracking_uri)
    started = time.perf_counter()
    with mlflow.start_run(
        experiment_id=context.experiment_id,
        parent_run_id=context.parent_run_id,
        nested=True,
        run_name="trial",
    ) as run:
        mlflow.log_params(_loggable(params))
        try:
            score = float(evaluate(params, data))
            if not math.isfinite(score):
                raise ValueError(f"validation {context.metric} is not finite")
        except Exception as exc:  # a failed trial must not end the search
            error = f"{type(exc).__name__}: {exc}"[:500]
            mlflow.set_tag(registry.ERROR_TAG, error)
            mlflow.end_run(status=RunStatus.to_string(RunStatus.FAILED))
            return {
                "status": STATUS_FAIL,
                "run_id": run.info.run_id,
                "seconds": time.perf_counter() - started,
                "error": error,
            }
        mlflow.log_metric(f"val_{context.metric}", score)
    sign = -1.0 if GREATER_IS_BETTER[context.metric] else 1.0
    return {
        "status": STATUS_OK,
        "loss": sign * score,
        "score": score,
        "run_id": run.info.run_id,
        "seconds": time.perf_counter() - started,
    }


class _Progress:
    """Turns finished trials into records, names their runs and reports them, in tid order.

    Called by fmin after every poll (``early_stop_fn``), on the driver, in both modes.
    """

    def __init__(self, metric: str, max_evals: int, report: Callable[[str], None]) -> None:
        self.metric = metric
        self.max_evals = max_evals
        self.report = report
        self.records: dict[int, TrialRecord] = {}
        self.client = MlflowClient()
        self.sign = -1.0 if GREATER_IS_BETTER[metric] else 1.0

    def __call__(self, trials: Trials, *args: Any) -> tuple[bool, tuple[Any, ...]]:
        for trial in trials.trials:
            result = trial.get("result") or {}
            if trial["tid"] in self.records or "run_id" not in result:
                continue
            self._record(trial["tid"] + 1, trial, result)
        return False, args

    def _record(self, number: int, trial: dict[str, Any], result: dict[str, Any]) -> None:
        # The configuration comes back in the result: the objective saw it as evaluated.
        params = result.get("flowline_params", {})
        ok = result["status"] == STATUS_OK
        record = TrialRecord(
            number,
            result["run_id"],
            "ok" if ok else "failed",
            params,
            result.get("score") if ok else None,
            float(result.get("seconds", 0.0)),
            result.get("error", ""),
        )
        self.records[trial["tid"]] = record
        # The number is known only here (executors do not know their trial id).
        self.client.set_tag(record.run_id, "mlflow.runName", f"trial-{number:03d}")
        self.client.set_tag(record.run_id, registry.TRIAL_TAG, str(number))
        if not ok:
            self.report(f"trial {number}/{self.max_evals} failed: {record.error}")
            return
        done = [r.score for r in self.records.values() if r.score is not None]
        best = max(done) if self.sign < 0 else min(done)
        self.report(
            f"trial {number}/{self.max_evals} {params.get('estimator', '')}: "
            f"val_{self.metric}={record.score:.4f} best={best:.4f} ({record.seconds:.1f}s)"
        )


def search(
    space: Any,
    evaluate: Callable[[dict[str, Any], Any], float],
    data: Any,
    metric: str,
    max_evals: int,
    seed: int,
    report: Callable[[str], None] = print,
    spark: SparkSettings | None = None,
) -> SearchResult:
    """Minimise the loss of ``evaluate(params, data)`` over ``space`` under the active run.

    ``evaluate`` returns the validation metric for one configuration; any exception it
    raises (a diverging network, say) marks that trial's run FAILED and the search goes on.
    With ``spark``, trials run ``parallelism`` at a time on Spark executors (SparkTrials);
    ``data`` is broadcast once instead of being pickled into every trial.
    """
    parent = mlflow.active_run()
    context = TrialContext(
        mlflow.get_tracking_uri(),
        parent.info.experiment_id,
        parent.info.run_id,
        metric,
        {k: os.environ[k] for k in MLFLOW_CLIENT_ENV if k in os.environ},
    )
    if spark is None:
        trials: Trials = Trials()
        shipped: Any = _Local(data)
    else:
        trials, shipped, context = _spark_trials(spark, data, context)

    def objective(params: dict[str, Any]) -> dict[str, Any]:
        result = run_trial(params, evaluate, shipped.value, context)
        result["flowline_params"] = params
        return result

    progress = _Progress(metric, max_evals, report)
    try:
        fmin(
            objective,
            space,
            algo=tpe.suggest,
            max_evals=max_evals,
            trials=trials,
            rstate=np.random.default_rng(seed),
            show_progressbar=False,
            early_stop_fn=progress,
        )
    except AllTrialsFailed:
        pass  # reported below with the last trial's error
    progress(trials)  # results may land after the last poll
    records = [progress.records[tid] for tid in sorted(progress.records)]
    ok = [r for r in records if r.score is not None]
    if not ok:
        last = records[-1].error if records else "no trial ran"
        raise RuntimeError(f"all {len(records)} trials failed; last error: {last}")
    best = min(ok, key=lambda r: progress.sign * r.score)
    return SearchResult(best_params=best.params, best_score=best.score, trials=records)


@dataclass(frozen=True)
class _Local:
    """The data as is, with the same ``.value`` as a Spark broadcast."""

    value: Any


def _spark_trials(
    spark: SparkSettings, data: Any, context: TrialContext
) -> tuple[Trials, Any, TrialContext]:
    from hyperopt import SparkTrials

    from pipelines.spark import spark_session

    session = spark_session(spark.master, "flowline-tuning")
    task_cpus = session.sparkContext.getConf().get("spark.task.cpus", "1")
    # One trial's TensorFlow uses the cores Spark gives its task, so N parallel trials do
    # not oversubscribe an executor (TensorFlow reads these before it starts).
    env = {**context.env, "TF_NUM_INTRAOP_THREADS": task_cpus, "TF_NUM_INTEROP_THREADS": "1"}
    trials = SparkTrials(parallelism=spark.parallelism, spark_session=session)
    return trials, session.sparkContext.broadcast(data), replace(context, env=env)
