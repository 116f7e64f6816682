"""`mlflow run` against a real tracking server (SQLite and PostgreSQL), both families."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.types.schema import AnyType
from sklearn.datasets import load_diabetes

from monitoring.profile import baseline as profile
from pipelines.data import DEMO_DATA, fingerprint
from tests.conftest import mlflow_run

pytestmark = pytest.mark.slow


def _parent_run(client: MlflowClient, name: str, version: str):
    mv = client.get_model_version(name, version)
    return client.get_run(mv.tags["flowline.parent_run_id"])


def _children(client: MlflowClient, parent) -> list:
    return client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )


def _assert_registered(client: MlflowClient, name: str, family: str, metric: str, data: Path):
    versions = client.search_model_versions(f"name='{name}'")
    assert len(versions) == 1
    mv = versions[0]
    tags = mv.tags
    assert tags["flowline.family"] == family
    assert tags["flowline.metric"] == metric
    float(tags["flowline.metric_value"])
    assert tags["flowline.data_fingerprint"] == fingerprint(data)
    assert int(tags["flowline.training_rows"]) > 0
    return mv


def _assert_search_runs(client: MlflowClient, parent, metric: str, max_evals: int) -> None:
    children = _children(client, parent)
    assert len(children) == max_evals
    finished = [c for c in children if c.info.status == "FINISHED"]
    assert finished, "no trial finished"
    for child in finished:
        assert f"val_{metric}" in child.data.metrics
        assert "estimator" in child.data.params
    for child in children:
        if child.info.status == "FAILED":
            assert child.data.tags["flowline.error"]
    assert f"best_val_{metric}" in parent.data.metrics
    best = parent.data.metrics[f"best_val_{metric}"]
    scores = [c.data.metrics[f"val_{metric}"] for c in finished]
    assert best in scores
    assert any(k.startswith("best.") for k in parent.data.params)
    assert parent.data.metrics["trials_total"] == max_evals
    trials_csv = client.download_artifacts(parent.info.run_id, "trials.csv")
    assert len(pd.read_csv(trials_csv)) == max_evals


def _assert_model_files(uri: str, features: pd.DataFrame) -> dict:
    local = Path(mlflow.artifacts.download_artifacts(uri))
    model = mlflow.models.Model.load(local)
    columns = model.signature.inputs.input_names()
    assert columns == list(features.columns)
    # Every column is `Any` to MLflow (it refuses int64 for double, NaN for long); the
    # exact type, which the model itself checks, is in the model's metadata.
    assert all(c.type == AnyType() for c in model.signature.inputs.inputs)
    types = model.metadata[profile.INPUT_TYPES_METADATA]
    for name, column in features.items():
        if pd.api.types.is_integer_dtype(column):
            assert types[name] == "integer", name
        elif pd.api.types.is_numeric_dtype(column):
            assert types[name] in ("integer", "float"), name
        else:
            assert types[name] == "string", name
    example = json.loads((local / "serving_input_example.json").read_text())
    assert example["dataframe_split"]["columns"] == columns
    assert len(example["dataframe_split"]["data"]) == 5
    return profile.loads((local / "artifacts" / profile.FILE_NAME).read_text())


def _assert_baseline(baseline: dict, features: pd.DataFrame, training_rows: int) -> None:
    assert baseline["rows"] == training_rows
    assert set(baseline["features"]) == set(features.columns)
    for name, column in features.items():
        stats = baseline["features"][name]
        expected_kind = "numeric" if pd.api.types.is_numeric_dtype(column) else "categorical"
        assert stats["kind"] == expected_kind
        # The training split is a random 80%: its null rate is close to the file's.
        assert abs(stats["null_rate"] - column.isna().mean()) < 0.02
        if expected_kind == "numeric":
            assert stats["min"] >= column.min() and stats["max"] <= column.max()
    assert baseline["prediction"] is not None


def test_sklearn_project_tunes_logs_and_registers(tracking_server) -> None:
    name = f"churn-{Path(tracking_server.backend_uri()).name[:12]}"
    result = mlflow_run(tracking_server.url, max_evals=3, registered_model=name, seed=7)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[flowline] trial 3/3" in result.stdout
    client = MlflowClient(tracking_server.url)
    mlflow.set_tracking_uri(tracking_server.url)
    mv = _assert_registered(client, name, "sklearn", "roc_auc", DEMO_DATA)
    parent = _parent_run(client, name, mv.version)
    _assert_search_runs(client, parent, "roc_auc", 3)
    assert {"test_accuracy", "test_roc_auc", "test_f1", "test_log_loss"} <= set(parent.data.metrics)

    raw = pd.read_csv(DEMO_DATA).drop(columns=["churned"])
    baseline = _assert_model_files(f"models:/{name}/{mv.version}", raw)
    _assert_baseline(baseline, raw, int(mv.tags["flowline.training_rows"]))
    assert set(baseline["prediction"]["top"]) <= {"yes", "no"}
    performance = baseline["performance"]
    assert performance["task"] == "classification" and performance["metric"] == "roc_auc"
    assert performance["test"]["roc_auc"] == pytest.approx(parent.data.metrics["test_roc_auc"])
    assert performance["classes"] == ["no", "yes"]
    assert performance["calibration"]["curves"][0]["class"] == "yes"

    model = mlflow.pyfunc.load_model(f"models:/{name}/{mv.version}")
    rows = (
        raw.head(4)
        .astype({c: "float64" for c in raw.select_dtypes("number")})
        .astype({c: object for c in raw.select_dtypes(exclude="number")})
    )
    rows.loc[0, "tenure_months"] = np.nan
    rows.loc[1, "contract"] = "a-contract-never-seen"
    rows.loc[2, "payment_method"] = None
    labels = model.predict(rows)
    assert set(labels) <= {"yes", "no"} and len(labels) == 4
    proba = model.predict(rows, params={"predict_method": "predict_proba"})
    assert list(proba.columns) == ["no", "yes"]
    assert np.allclose(proba.sum(axis=1), 1.0)
    _assert_runtime(model, mv.tags, rows)


def _assert_runtime(model, tags: dict[str, str], rows: pd.DataFrame) -> None:
    """The runtime tag says how the loaded model scores, and the two paths agree."""
    inner = model.unwrap_python_model()
    assert tags["flowline.runtime.reason"]
    if tags["flowline.runtime"] == "onnx":
        assert type(inner.scorer).__name__ == "CompiledScorer"
        expected = np.asarray(inner.pipeline.predict(rows))
        got = np.asarray(model.predict(rows))
        if expected.dtype.kind == "f":
            np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
        else:
            assert list(got) == list(expected)
    else:
        assert tags["flowline.runtime"] == "python" and inner.scorer is None


@pytest.fixture(scope="module")
def diabetes_parquet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A regression table with a text column and holes, as Parquet."""
    frame = load_diabetes(as_frame=True).frame
    rng = np.random.default_rng(0)
    frame["region"] = rng.choice(["north", "south", "east"], len(frame))
    frame.loc[rng.uniform(size=len(frame)) < 0.05, "bmi"] = np.nan
    path = tmp_path_factory.mktemp("data") / "diabetes.parquet"
    frame.to_parquet(path)
    return path


def test_keras_project_on_parquet_regression(tracking_server, diabetes_parquet: Path) -> None:
    name = f"diabetes-keras-{Path(tracking_server.backend_uri()).name[:12]}"
    result = mlflow_run(
        tracking_server.url,
        data=diabetes_parquet,
        target="target",
        family="keras",
        max_evals=2,
        epochs=4,
        registered_model=name,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(tracking_server.url)
    mlflow.set_tracking_uri(tracking_server.url)
    mv = _assert_registered(client, name, "keras", "rmse", diabetes_parquet)
    assert mv.tags["flowline.task"] == "regression"
    parent = _parent_run(client, name, mv.version)
    _assert_search_runs(client, parent, "rmse", 2)
    for child in _children(client, parent):
        assert {"hidden_layers", "units", "dropout", "learning_rate", "batch_size"} <= set(
            child.data.params
        )
    raw = pd.read_parquet(diabetes_parquet).drop(columns=["target"])
    baseline = _assert_model_files(f"models:/{name}/{mv.version}", raw)
    _assert_baseline(baseline, raw, int(mv.tags["flowline.training_rows"]))
    assert baseline["performance"]["task"] == "regression"
    assert baseline["performance"]["classes"] is None
    assert baseline["performance"]["calibration"] is None

    model = mlflow.pyfunc.load_model(f"models:/{name}/{mv.version}")
    rows = raw.head(3).astype({"region": object})
    rows.loc[0, "bmi"] = np.nan
    rows.loc[1, "region"] = "atlantis"
    predictions = np.asarray(model.predict(rows), dtype=float)
    assert predictions.shape == (3,) and np.all(np.isfinite(predictions))
    # The Dense stack converts (pipelines/onnx_keras.py) and matches Keras on the checks.
    assert mv.tags["flowline.runtime"] == "onnx", mv.tags["flowline.runtime.reason"]
    _assert_runtime(model, mv.tags, rows)
