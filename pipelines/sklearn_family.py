"""The scikit-learn family: a conditional hyperopt space over several estimators."""

from __future__ import annotations

from typing import Any

from hyperopt import hp
from hyperopt.pyll import scope
from sklearn.ensemble import (
    HistGradientBoostingClassifier,
    HistGradientBoostingRegressor,
    RandomForestClassifier,
    RandomForestRegressor,
)
from sklearn.linear_model import LogisticRegression, Ridge


def _forest(prefix: str) -> dict[str, Any]:
    return {
        "n_estimators": scope.int(hp.quniform(f"{prefix}.n_estimators", 50, 300, 25)),
        "max_depth": hp.choice(f"{prefix}.max_depth", [None, 4, 8, 16]),
        "min_samples_leaf": scope.int(hp.quniform(f"{prefix}.min_samples_leaf", 1, 10, 1)),
        "max_features": hp.choice(f"{prefix}.max_features", ["sqrt", 0.5, 1.0]),
    }


def _boosting(prefix: str) -> dict[str, Any]:
    return {
        "learning_rate": hp.loguniform(f"{prefix}.learning_rate", -4.6, -1.2),
        "max_iter": scope.int(hp.quniform(f"{prefix}.max_iter", 50, 300, 25)),
        "max_leaf_nodes": scope.int(hp.quniform(f"{prefix}.max_leaf_nodes", 8, 64, 4)),
        "l2_regularization": hp.loguniform(f"{prefix}.l2_regularization", -9.2, 0.0),
    }


def search_space(task: str) -> Any:
    """hp.choice over estimator kinds, each with its own hyperparameters."""
    if task == "classification":
        kinds = [
            {"estimator": "logistic_regression", "C": hp.loguniform("lr.C", -6.9, 4.6)},
            {"estimator": "random_forest", **_forest("rf")},
            {"estimator": "gradient_boosting", **_boosting("gb")},
        ]
    else:
        kinds = [
            {"estimator": "ridge", "alpha": hp.loguniform("ridge.alpha", -6.9, 4.6)},
            {"estimator": "random_forest", **_forest("rf")},
            {"estimator": "gradient_boosting", **_boosting("gb")},
        ]
    return hp.choice("estimator", kinds)


def build_estimator(params: dict[str, Any], task: str, seed: int) -> Any:
    """An unfitted estimator for one point of the search space."""
    kind = params["estimator"]
    args = {k: v for k, v in params.items() if k != "estimator"}
    classify = task == "classification"
    if kind == "logistic_regression":
        return LogisticRegression(C=args["C"], max_iter=2000)
    if kind == "ridge":
        return Ridge(alpha=args["alpha"])
    if kind == "random_forest":
        cls = RandomForestClassifier if classify else RandomForestRegressor
        return cls(random_state=seed, n_jobs=1, **args)
    if kind == "gradient_boosting":
        cls = HistGradientBoostingClassifier if classify else HistGradientBoostingRegressor
        return cls(random_state=seed, early_stopping=False, **args)
    raise ValueError(f"unknown estimator kind {kind!r}")
