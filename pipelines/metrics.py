"""Evaluation metrics per task, and which way is better."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sklearn import metrics as skm

from pipelines.errors import UserError

DEFAULT_METRIC = {"classification": "roc_auc", "regression": "rmse"}
# With a rare class, ROC AUC looks good while the rare class is found poorly; average
# precision (the area under the precision-recall curve) weighs exactly that.
IMBALANCED_DEFAULT_METRIC = "average_precision"
GREATER_IS_BETTER = {
    "accuracy": True,
    "average_precision": True,
    "f1": True,
    "roc_auc": True,
    "log_loss": False,
    "rmse": False,
    "mae": False,
    "r2": True,
}
TASK_METRICS = {
    "classification": ("accuracy", "f1", "roc_auc", "average_precision", "log_loss"),
    "regression": ("rmse", "mae", "r2"),
}


def resolve_metric(metric: str, task: str, imbalanced: bool = False) -> str:
    """The metric to optimise: the task's default when empty, validated otherwise.

    The classification default is ``roc_auc``, or ``average_precision`` when the classes
    are imbalanced (see ``pipelines.data.IMBALANCED_SHARE``).
    """
    default = IMBALANCED_DEFAULT_METRIC if task == "classification" and imbalanced else None
    chosen = metric or default or DEFAULT_METRIC[task]
    if chosen not in TASK_METRICS[task]:
        allowed = ", ".join(TASK_METRICS[task])
        raise UserError(f"metric '{chosen}' does not fit task={task}; use one of {allowed}")
    return chosen


def _roc_auc(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    if len(classes) == 2:
        return float(skm.roc_auc_score(y_true == classes[1], proba[:, 1]))
    return float(
        skm.roc_auc_score(y_true, proba, multi_class="ovr", average="weighted", labels=classes)
    )


def _average_precision(y_true: np.ndarray, proba: np.ndarray, classes: np.ndarray) -> float:
    if len(classes) == 2:
        return float(skm.average_precision_score(y_true == classes[1], proba[:, 1]))
    onehot = np.stack([y_true == c for c in classes], axis=1)
    return float(skm.average_precision_score(onehot, proba, average="macro"))


def classification_scores(model: object, X: object, y: np.ndarray) -> dict[str, float]:
    """All classification metrics of a fitted classifier on (X, y)."""
    predicted = model.predict(X)
    proba = model.predict_proba(X)
    classes = np.asarray(model.classes_)
    y = np.asarray(y)
    return {
        "accuracy": float(skm.accuracy_score(y, predicted)),
        "f1": float(skm.f1_score(y, predicted, average="weighted")),
        "roc_auc": _roc_auc(y, proba, classes),
        "average_precision": _average_precision(y, proba, classes),
        "log_loss": float(skm.log_loss(y, proba, labels=classes)),
    }


def regression_scores(model: object, X: object, y: np.ndarray) -> dict[str, float]:
    """All regression metrics of a fitted regressor on (X, y)."""
    predicted = np.asarray(model.predict(X), dtype=float)
    if not np.all(np.isfinite(predicted)):
        raise ValueError("model produced non-finite predictions")
    return {
        "rmse": float(np.sqrt(skm.mean_squared_error(y, predicted))),
        "mae": float(skm.mean_absolute_error(y, predicted)),
        "r2": float(skm.r2_score(y, predicted)),
    }


SCORERS: dict[str, Callable[[object, object, np.ndarray], dict[str, float]]] = {
    "classification": classification_scores,
    "regression": regression_scores,
}
