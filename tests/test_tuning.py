"""Tuning behaviour on a local SQLite store: failed trials, and reproducibility by seed."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from hyperopt import hp

from pipelines.keras_family import KerasMLP, TrainingDiverged
from pipelines.train import TrainConfig, train
from pipelines.tune import search


@pytest.fixture()
def sqlite_uri(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


def test_failed_trial_is_recorded_and_search_goes_on(sqlite_uri: str) -> None:
    space = hp.choice(
        "estimator", [{"estimator": "good", "x": hp.uniform("x", 0, 1)}, {"estimator": "bad"}]
    )

    def evaluate(params: dict, data: object) -> float:
        if params["estimator"] == "bad":
            raise TrainingDiverged("training loss became NaN or infinite")
        return params["x"]

    with mlflow.start_run() as parent:
        result = search(space, evaluate, None, "r2", max_evals=12, seed=1, report=lambda _: None)
    statuses = [t.status for t in result.trials]
    assert len(result.trials) == 12
    assert "failed" in statuses and "ok" in statuses
    assert result.best_score == max(t.score for t in result.trials if t.score is not None)
    children = mlflow.search_runs(
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'", output_format="list"
    )
    failed = [c for c in children if c.info.status == "FAILED"]
    assert len(failed) == statuses.count("failed")
    assert all("TrainingDiverged" in c.data.tags["flowline.error"] for c in failed)


def test_all_trials_failing_is_a_clear_error(sqlite_uri: str) -> None:
    def evaluate(params: dict, data: object) -> float:
        raise ValueError("boom")

    with mlflow.start_run(), pytest.raises(RuntimeError, match="all 2 trials failed"):
        search(
            {"x": hp.uniform("x", 0, 1)},
            evaluate,
            None,
            "r2",
            max_evals=2,
            seed=1,
            report=lambda _: None,
        )


def test_diverging_network_raises() -> None:
    rng = np.random.default_rng(0)
    X = rng.uniform(size=(200, 4))
    with pytest.raises(TrainingDiverged):
        KerasMLP(task="regression", learning_rate=1e12, epochs=5).fit(X, X.sum(axis=1) * 100)


def test_same_seed_gives_the_same_search_and_model(sqlite_uri: str) -> None:
    config = TrainConfig(max_evals=4, seed=11, registered_model="repro")
    first = train(config, report=lambda _: None)
    second = train(config, report=lambda _: None)
    client = mlflow.MlflowClient()

    def trials(version) -> list[tuple]:
        parent = version.tags["flowline.parent_run_id"]
        runs = client.search_runs(
            [client.get_run(parent).info.experiment_id],
            f"tags.mlflow.parentRunId = '{parent}'",
            order_by=["tags.`flowline.trial` ASC"],
        )
        return [(r.data.params, r.data.metrics) for r in runs]

    assert trials(first) == trials(second)
    assert first.tags["flowline.metric_value"] == second.tags["flowline.metric_value"]
