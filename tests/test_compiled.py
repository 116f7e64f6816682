"""The compiled (ONNX) scoring path against the plain pipeline it was converted from.

Random tables with float, integer (with nulls), boolean, date and categorical columns;
scored on fresh rows, on rows with nulls everywhere and on categories never seen in
training. A version whose estimator skl2onnx cannot convert keeps the Python pipeline,
and says why.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.ensemble import RandomForestRegressor
from sklearn.linear_model import LogisticRegression, Ridge

from pipelines import onnx_export
from pipelines.columns import plan_columns
from pipelines.compiled import ATOL, RTOL, CompiledScorer
from pipelines.preprocess import with_preprocessing
from pipelines.pyfunc_model import TabularModel


def random_table(n: int, seed: int) -> pd.DataFrame:
    """Mixed column kinds with nulls, like a public table read by pandas."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "amount": np.where(rng.random(n) < 0.1, np.nan, rng.gamma(2.0, 50.0, n)),
            "count": pd.array(
                np.where(rng.random(n) < 0.15, None, rng.integers(0, 30, n)), dtype="Int64"
            ),
            "grade": rng.integers(1, 6, n),
            "opened": pd.date_range("2021-01-01", periods=n, freq="13h").strftime("%Y-%m-%d"),
            "active": rng.choice([True, False], n),
            "region": rng.choice(["north", "south", "east", "west", None], n),
            "plan": rng.choice(["basic", "plus", "pro"], n, p=[0.7, 0.25, 0.05]),
        }
    )


def _target(frame: pd.DataFrame, seed: int, classify: bool) -> pd.Series:
    rng = np.random.default_rng(seed + 1)
    score = frame["amount"].fillna(100) / 50 + frame["grade"] + rng.normal(0, 1, len(frame))
    score = score + (frame["region"] == "north") * 2
    if classify:
        return pd.Series(np.where(score > score.median() + 1, "churn", "stay"), name="y")
    return pd.Series(score, name="y")


def _fresh_rows(frame: pd.DataFrame, seed: int) -> pd.DataFrame:
    rows = random_table(300, seed + 100).astype({"active": object})
    rows.loc[::7, "region"] = "atlantis"  # unseen in training
    rows.loc[::11, "plan"] = "enterprise"
    rows.loc[::5, ["amount", "count", "opened", "active"]] = None
    return rows


def _fit(estimator: object, classify: bool, seed: int) -> tuple[object, object, pd.DataFrame]:
    frame = random_table(600, seed)
    plan = plan_columns(frame)
    pipeline = with_preprocessing(plan, estimator).fit(frame, _target(frame, seed, classify))
    return pipeline, plan, frame


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_logistic_regression_compiles_and_matches_on_fresh_null_and_unseen_rows(seed: int):
    pipeline, plan, frame = _fit(LogisticRegression(max_iter=2000), True, seed)
    compilation = onnx_export.compile_pipeline(
        pipeline, plan, "classification", [frame, onnx_export.stress_rows(frame, plan)]
    )
    assert compilation.runtime == "onnx", compilation.reason
    scorer = CompiledScorer(compilation.model, plan, "classification", pipeline.classes_)
    rows = _fresh_rows(frame, seed)
    assert (scorer.predict(rows) == pipeline.predict(rows)).all()
    assert scorer.predict(rows).dtype == pipeline.predict(rows).dtype
    np.testing.assert_allclose(
        scorer.predict_proba(rows), pipeline.predict_proba(rows), rtol=RTOL, atol=ATOL
    )


@pytest.mark.parametrize("estimator", [Ridge(alpha=1.0), RandomForestRegressor(30, random_state=0)])
def test_regressors_compile_and_match(estimator: object) -> None:
    pipeline, plan, frame = _fit(estimator, False, 3)
    compilation = onnx_export.compile_pipeline(
        pipeline, plan, "regression", [frame, onnx_export.stress_rows(frame, plan)]
    )
    assert compilation.runtime == "onnx", compilation.reason
    scorer = CompiledScorer(compilation.model, plan, "regression")
    rows = _fresh_rows(frame, 3)
    np.testing.assert_allclose(scorer.predict(rows), pipeline.predict(rows), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_keras_network_compiles_and_matches(task: str) -> None:
    from pipelines.keras_family import KerasMLP

    classify = task == "classification"
    network = KerasMLP(task=task, hidden_layers=2, units=16, dropout=0.2, epochs=3)
    pipeline, plan, frame = _fit(network, classify, 8)
    compilation = onnx_export.compile_pipeline(
        pipeline, plan, task, [frame, onnx_export.stress_rows(frame, plan)]
    )
    assert compilation.runtime == "onnx", compilation.reason
    rows = _fresh_rows(frame, 8)
    scorer = CompiledScorer(compilation.model, plan, task, getattr(pipeline, "classes_", None))
    if classify:
        assert (scorer.predict(rows) == pipeline.predict(rows)).all()
        got, expected = scorer.predict_proba(rows), pipeline.predict_proba(rows)
    else:
        got, expected = scorer.predict(rows), pipeline.predict(rows)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


def test_the_stress_rows_hold_nulls_and_unseen_categories() -> None:
    frame = random_table(50, 4)
    plan = plan_columns(frame)
    rows = onnx_export.stress_rows(frame, plan)
    assert rows.isna().all(axis=1).any()
    assert (rows["region"] == onnx_export.UNSEEN_CATEGORY).any()
    assert set(rows.columns) == set(plan.types)


class MajorityVote(ClassifierMixin, BaseEstimator):
    """An estimator skl2onnx has no converter for."""

    def fit(self, X: object, y: object) -> MajorityVote:
        values, counts = np.unique(np.asarray(y), return_counts=True)
        self.classes_ = values
        self.majority_ = values[np.argmax(counts)]
        return self

    def predict(self, X: object) -> np.ndarray:
        return np.full(len(X), self.majority_)

    def predict_proba(self, X: object) -> np.ndarray:
        return np.tile((self.classes_ == self.majority_).astype(float), (len(X), 1))


def test_an_unsupported_estimator_falls_back_to_python_with_the_reason() -> None:
    pipeline, plan, frame = _fit(MajorityVote(), True, 5)
    compilation = onnx_export.compile_pipeline(pipeline, plan, "classification", [frame])
    assert compilation.runtime == "python" and compilation.model is None
    assert compilation.reason.startswith("conversion failed")
    assert "MajorityVote" in compilation.reason


def test_a_graph_that_disagrees_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, plan, frame = _fit(LogisticRegression(max_iter=2000), True, 6)
    monkeypatch.setattr(
        CompiledScorer, "predict", lambda self, rows: pipeline.classes_[0:1].repeat(len(rows))
    )
    compilation = onnx_export.compile_pipeline(pipeline, plan, "classification", [frame])
    assert compilation.runtime == "python"
    assert "labels differ" in compilation.reason


class _Context:
    def __init__(self, artifacts: dict[str, str]) -> None:
        self.artifacts = artifacts


def test_the_pyfunc_scores_with_the_graph_and_falls_back_when_it_cannot_load(tmp_path) -> None:
    pipeline, plan, frame = _fit(LogisticRegression(max_iter=2000), True, 7)
    compilation = onnx_export.compile_pipeline(pipeline, plan, "classification", [frame])
    graph = tmp_path / "model.onnx"
    graph.write_bytes(compilation.model)
    model = TabularModel(pipeline, "classification")
    model.load_context(_Context({"compiled": str(graph)}))
    assert isinstance(model.scorer, CompiledScorer)
    rows = _fresh_rows(frame, 7)
    assert (model.predict(None, rows) == pipeline.predict(rows)).all()
    proba = model.predict(None, rows, {"predict_method": "predict_proba"})
    assert list(proba.columns) == [str(c) for c in pipeline.classes_]

    graph.write_bytes(b"not an onnx graph")
    model.load_context(_Context({"compiled": str(graph)}))
    assert model.scorer is None
    assert (model.predict(None, rows) == pipeline.predict(rows)).all()


def test_column_names_that_onnx_renames_are_fed_by_position() -> None:
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer(as_frame=True)
    frame, target = data.data, data.target  # "mean radius", "worst concave points", ...
    plan = plan_columns(frame)
    pipeline = with_preprocessing(plan, LogisticRegression(max_iter=5000)).fit(frame, target)
    compilation = onnx_export.compile_pipeline(pipeline, plan, "classification", [frame])
    assert compilation.runtime == "onnx", compilation.reason
