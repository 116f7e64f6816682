"""The training job: validate, tune, refit, profile, log and register one model version."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import requests
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature, infer_signature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import AnyType
from sklearn.model_selection import train_test_split

from common import registry
from monitoring.profile import baseline, column_types, performance
from pipelines import gate, keras_family, onnx_export, sklearn_family
from pipelines.columns import ColumnPlan
from pipelines.data import DEMO_DATA, TrainingData, load_training_data
from pipelines.errors import UserError
from pipelines.metrics import SCORERS, TASK_METRICS, resolve_metric
from pipelines.preprocess import with_preprocessing
from pipelines.pyfunc_model import COMPILED_ARTIFACT, TabularModel
from pipelines.spark import check_java, check_master
from pipelines.tune import SearchResult, SparkSettings, search

FAMILIES = ("sklearn", "keras")
VALIDATION_FRACTION = 0.25
INPUT_EXAMPLE_ROWS = 5


@dataclass(frozen=True)
class TrainConfig:
    """The MLproject's parameters, with their defaults."""

    data: str = "demo"
    target: str = ""
    task: str = "auto"
    family: str = "sklearn"
    max_evals: int = 20
    metric: str = ""
    registered_model: str = ""
    test_size: float = 0.2
    seed: int = 42
    epochs: int = keras_family.DEFAULT_EPOCHS
    spark: str = ""  # empty: trials one after another; else a Spark master (SparkTrials)
    parallelism: int = 2
    # How much worse than the production version (on the metric, on this version's test
    # split) the new version may score and still pass the gate (pipelines/gate.py).
    gate_tolerance: float = 0.005


def validate_config(config: TrainConfig) -> None:
    """Reject parameter values that cannot work, before any data is read."""
    if config.family not in FAMILIES:
        raise UserError(f"unknown family '{config.family}': use one of {', '.join(FAMILIES)}")
    if config.max_evals < 1:
        raise UserError(f"max_evals must be at least 1 (got {config.max_evals})")
    if not 0.0 < config.test_size < 1.0:
        raise UserError(f"test_size must be between 0 and 1 (got {config.test_size})")
    if config.epochs < 1:
        raise UserError(f"epochs must be at least 1 (got {config.epochs})")
    if config.parallelism < 1:
        raise UserError(f"parallelism must be at least 1 (got {config.parallelism})")
    if not math.isfinite(config.gate_tolerance):
        raise UserError(f"gate_tolerance must be a finite number (got {config.gate_tolerance})")
    if config.spark:
        check_master(config.spark)
        check_java()


def check_tracking_server(uri: str) -> None:
    """Fail fast, in one line, when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(uri.rstrip("/") + "/health", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        reason = type(exc).__name__
        raise UserError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); "
            "start one with `flowline server` or set MLFLOW_TRACKING_URI"
        ) from None


def default_model_name(config: TrainConfig, data: TrainingData) -> str:
    """``registered_model`` if given, else a name derived from the data file."""
    if config.registered_model:
        return config.registered_model
    if data.source == DEMO_DATA:
        return registry.DEMO_MODEL
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in data.source.stem)


def _estimator_factory(config: TrainConfig, task: str) -> tuple[Any, Callable[[dict], Any]]:
    if config.family == "keras":
        return keras_family.search_space(task), lambda p: keras_family.build_estimator(
            p, task, config.seed, config.epochs
        )
    return sklearn_family.search_space(task), lambda p: sklearn_family.build_estimator(
        p, task, config.seed
    )


def _split(data: TrainingData, size: float, seed: int) -> list[Any]:
    stratify = data.target if data.task == "classification" else None
    try:
        return train_test_split(
            data.features, data.target, test_size=size, random_state=seed, stratify=stratify
        )
    except ValueError as exc:
        raise UserError(f"cannot split the data for training: {exc}") from None


def _signature(plan: ColumnPlan, predictions: Any) -> ModelSignature:
    # Every input column is declared ``Any``: MLflow 3.17's enforcement refuses int64 for
    # `double` and NaN for `long`, so no declared type accepts what pandas reads from a real
    # file through every path. The model checks each value itself (pipelines/columns.py)
    # and the exact types travel in the model's metadata (flowline.input_types).
    inputs = Schema([ColSpec(AnyType(), name) for name in plan.types])
    outputs = infer_signature(pd.DataFrame({"x": [0]}), predictions).outputs
    params = ParamSchema([ParamSpec("predict_method", "string", "predict")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def _dropped_tag(plan: ColumnPlan) -> str:
    # JSON, so a column name with a comma stays one name: {"customer_id": "id_like"}.
    return json.dumps(plan.dropped, sort_keys=True)


def _input_example(features: pd.DataFrame, plan: ColumnPlan) -> pd.DataFrame:
    # Real rows, nulls included, of the columns the model reads: the controller's smoke test
    # scores exactly this, so it must look like what clients send.
    return features.loc[:, list(plan.types)].head(INPUT_EXAMPLE_ROWS)


def _requirements(family: str, compiled: bool) -> list[str]:
    packages = ["mlflow", "scikit-learn", "pandas", "numpy", "cloudpickle"]
    if family == "keras":
        packages += ["tensorflow-cpu", "keras"]
    if compiled:
        packages.append("onnxruntime")
    return [f"{name}=={version(name)}" for name in packages]


def _log_search(result: SearchResult, metric: str) -> None:
    mlflow.log_params(
        {f"best.{k}": "None" if v is None else str(v) for k, v in result.best_params.items()}
    )
    mlflow.log_metric(f"best_val_{metric}", result.best_score)
    failed = sum(r.status == "failed" for r in result.trials)
    mlflow.log_metrics({"trials_total": len(result.trials), "trials_failed": failed})
    rows = [
        {**{k: v for k, v in asdict(r).items() if k != "params"}, **r.params} for r in result.trials
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "trials.csv")
        pd.DataFrame(rows).to_csv(path, index=False)
        mlflow.log_artifact(str(path))


def _log_project_params(config: TrainConfig) -> None:
    # `mlflow run` has already logged the parameters it was given; log only the rest.
    existing = mlflow.get_run(mlflow.active_run().info.run_id).data.params
    mlflow.log_params({k: str(v) for k, v in asdict(config).items() if k not in existing})


def preflight(config: TrainConfig) -> TrainingData:
    """Every check on the user's input, without touching MLflow."""
    validate_config(config)
    data = load_training_data(config.data, config.target, config.task)
    resolve_metric(config.metric, data.task, data.imbalanced)
    return data


def model_code_paths(staging: Path) -> list[str]:
    """The code a logged model carries: ``pipelines/`` and, of ``monitoring/``, only the
    column-type contract its input coercer imports.

    A replica in a container has the model's requirements and this code, nothing of
    flowline's own install, so everything the pickled pipeline imports must be here.
    The rest of ``monitoring/`` stays out: it needs packages the model does not.
    """
    package = staging / "monitoring"
    profile = package / "profile"
    profile.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text('"""What a logged model needs of monitoring/."""\n')
    (profile / "__init__.py").write_text('"""The column-type contract, alone."""\n')
    shutil.copy2(column_types.__file__, profile / "column_types.py")
    return [str(Path(__file__).resolve().parent), str(package)]


def performance_profile(
    pipeline: Any,
    task: str,
    metric: str,
    test_scores: dict[str, float],
    X_test: pd.DataFrame,
    y_test: pd.Series,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The baseline's ``performance`` section: the test metrics and, for a classifier, its
    probabilities calibrated on the test split (what the monitor's CBPE estimate uses).

    Calibration is an extra for the monitor, so it never fails the training job: on odd
    data (a class missing from the test split, a model without ``predict_proba``) the
    section is written without it and the job reports a warning.
    """
    if task != "classification":
        return performance.performance_section(task, metric, test_scores, len(X_test))
    classes = getattr(pipeline, "classes_", None)
    calibration = None
    try:
        proba = pipeline.predict_proba(X_test)
        calibration = performance.fit_calibration(classes, proba, y_test)
    except Exception as exc:  # whatever the model or data throw: the job goes on
        report(f"warning: no probability calibration for performance estimation: {exc}")
    return performance.performance_section(
        task,
        metric,
        test_scores,
        len(X_test),
        None if classes is None else list(classes),
        calibration,
    )


def train(config: TrainConfig, report: Callable[[str], None] = print) -> ModelVersion:
    """Run the whole job and return the registered model version.

    Every check that can fail on the user's input runs before the first MLflow write,
    so bad input never leaves a half-registered version behind.
    """
    data = preflight(config)
    metric = resolve_metric(config.metric, data.task, data.imbalanced)
    check_tracking_server(mlflow.get_tracking_uri())
    name = default_model_name(config, data)
    X_train, X_test, y_train, y_test = _split(data, config.test_size, config.seed)
    X_fit, X_val, y_fit, y_val = _split(
        replace(data, features=X_train, target=y_train), VALIDATION_FRACTION, config.seed
    )
    plan = data.plan
    space, make_estimator = _estimator_factory(config, data.task)
    scorer = SCORERS[data.task]

    def evaluate(params: dict[str, Any], fit_data: tuple[Any, ...]) -> float:
        # fit_data arrives as an argument (a Spark broadcast on executors), not a closure.
        x_fit, y_fit_, x_val, y_val_ = fit_data
        pipeline = with_preprocessing(plan, make_estimator(params)).fit(x_fit, y_fit_)
        return scorer(pipeline, x_val, y_val_)[metric]

    spark = SparkSettings(config.spark, config.parallelism) if config.spark else None

    for warning in plan.warnings:
        report(f"warning: {warning}")
    if data.null_target_rows:
        report(
            f"left out {data.null_target_rows} row(s) whose target '{data.target.name}' is empty"
        )
    balance = (
        f", rarest class {data.minority_share:.1%} of rows" if data.task == "classification" else ""
    )
    report(
        f"training {config.family} {data.task} on {data.source.name}: {len(data.features)} rows, "
        f"{len(plan.types)} features, target '{data.target.name}', metric {metric}, "
        f"{config.max_evals} trials{balance}"
        + (f", on Spark {config.spark} ({config.parallelism} at a time)" if spark else "")
    )
    with mlflow.start_run(run_name=f"tune-{config.family}") as parent:
        _log_project_params(config)
        mlflow.set_tags(
            {
                registry.TASK_TAG: data.task,
                registry.FAMILY_TAG: config.family,
                registry.METRIC_TAG: metric,
                registry.DATA_FINGERPRINT_TAG: data.fingerprint,
                registry.DROPPED_COLUMNS_TAG: _dropped_tag(plan),
            }
        )
        mlflow.log_metrics(
            {
                "rows_null_target_dropped": data.null_target_rows,
                "minority_share": data.minority_share,
            }
        )
        try:
            result = search(
                space,
                evaluate,
                (X_fit, y_fit, X_val, y_val),
                metric,
                config.max_evals,
                config.seed,
                report,
                spark,
            )
        except RuntimeError as exc:
            raise UserError(str(exc)) from None
        _log_search(result, metric)

        pipeline = with_preprocessing(plan, make_estimator(result.best_params))
        pipeline.fit(X_train, y_train)
        test_scores = scorer(pipeline, X_test, y_test)
        mlflow.log_metrics({f"test_{k}": v for k, v in test_scores.items()})
        train_predictions = pipeline.predict(X_train)
        compilation = onnx_export.compile_pipeline(
            pipeline, plan, data.task, [X_test, onnx_export.stress_rows(X_test, plan)]
        )
        report(f"scoring runtime: {compilation.runtime} ({compilation.reason})")
        mlflow.set_tags(
            {
                registry.RUNTIME_TAG: compilation.runtime,
                registry.RUNTIME_REASON_TAG: compilation.reason[:5000],
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            profile_path = os.path.join(tmp, baseline.FILE_NAME)
            profile = baseline.build_profile(X_train, train_predictions, plan.types, plan.dropped)
            profile["performance"] = performance_profile(
                pipeline, data.task, metric, test_scores, X_test, y_test, report
            )
            Path(profile_path).write_text(baseline.dumps(profile))
            artifacts = {"baseline": profile_path}
            if compilation.model is not None:
                artifacts[COMPILED_ARTIFACT] = os.path.join(tmp, "model.onnx")
                Path(artifacts[COMPILED_ARTIFACT]).write_bytes(compilation.model)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=TabularModel(pipeline, data.task),
                artifacts=artifacts,
                signature=_signature(plan, train_predictions),
                input_example=_input_example(X_train, plan),
                metadata={registry.INPUT_TYPES_METADATA: plan.types},
                pip_requirements=_requirements(config.family, compilation.compiled),
                code_paths=model_code_paths(Path(tmp)),
            )
        verdict = gate.evaluate(
            mlflow.MlflowClient(),
            name,
            data.task,
            metric,
            test_scores[metric],
            X_test,
            y_test,
            config.gate_tolerance,
        )
        report(f"champion/challenger gate: {verdict.verdict} ({verdict.reason})")
        version_ = mlflow.register_model(
            info.model_uri,
            name,
            tags={
                **verdict.tags(),
                registry.FAMILY_TAG: config.family,
                registry.TASK_TAG: data.task,
                registry.METRIC_TAG: metric,
                registry.METRIC_VALUE_TAG: f"{test_scores[metric]:.6g}",
                registry.DATA_FINGERPRINT_TAG: data.fingerprint,
                registry.TRAINING_ROWS_TAG: str(len(X_train)),
                registry.PARENT_RUN_TAG: parent.info.run_id,
                registry.BASELINE_TAG: f"artifacts/{baseline.FILE_NAME}",
                registry.DROPPED_COLUMNS_TAG: _dropped_tag(plan),
                registry.RUNTIME_TAG: compilation.runtime,
                registry.RUNTIME_REASON_TAG: compilation.reason[:5000],
            },
        )
        mlflow.set_tag(registry.REGISTERED_VERSION_TAG, f"{name}/{version_.version}")
    scores = ", ".join(f"{k}={test_scores[k]:.4f}" for k in TASK_METRICS[data.task])
    report(f"registered {name} version {version_.version} (test {scores})")
    return version_
