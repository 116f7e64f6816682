"""The baseline profile's ``performance`` section: what a version scored on its test split,
and how to estimate its accuracy and ROC AUC on live traffic without labels.

Training (pipelines/train.py) writes the section; the monitor reads it. It holds the
version's test metrics (the anchor that realized performance from label feedback is
compared with) and, for classifiers, a probability calibration fitted on the held-out
test split. Confidence-based performance estimation (CBPE, as NannyML calls it) then
estimates performance on unlabeled rows: if the calibrated probability of the class the
model predicts is 0.8, the prediction is right with probability 0.8, so the mean of
those probabilities is the expected accuracy. The estimate follows covariate shift (rows
moving to regions where the model is less sure) but not concept shift (P(y | x) itself
changing), which only labels reveal.

Section format (``profile["performance"]``, optional; see docs/baseline-format.md)::

    {
      "task": "classification", "metric": "roc_auc",
      "test": {"accuracy": 0.91, "roc_auc": 0.95, ...}, "test_rows": 480,
      "classes": ["no", "yes"],          # as predict() returns them; null for regression
      "calibration": {                   # null for regression, or when it could not be fitted
        "method": "isotonic", "rows": 480, "classes": ["no", "yes"],
        "curves": [{"class": "yes", "x": [...], "y": [...]}]
      }
    }

A binary calibration has one curve, on the positive class (``classes[1]``); a multiclass
one has a one-vs-rest curve per class, and calibrated rows are renormalised to sum to 1.
A curve maps the model's probability ``x`` to a calibrated one by linear interpolation
(``np.interp``), clipped at both ends, exactly how scikit-learn's
``IsotonicRegression(out_of_bounds="clip")`` predicts; no pickles travel in the JSON.

Pure numpy/scikit-learn: no MLflow, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm
from sklearn.isotonic import IsotonicRegression

TASKS = ("classification", "regression")
CALIBRATION_METHOD = "isotonic"
# A fitted isotonic curve has one point per step of the fit, up to about as many as test
# rows; 200 points keep the section a few KiB while the thinned curve stays within a
# fraction of a percent of the full one.
MAX_CURVE_POINTS = 200
SIGNIFICANT_DIGITS = 6


def _json_scalar(value: Any) -> Any:
    """A class label as JSON carries it: numpy scalars become their Python equivalent, so
    an int64 class stays an int, a bool_ a bool and a str_ a str."""
    return value.item() if isinstance(value, np.generic) else value


def _rounded(values: np.ndarray) -> list[float]:
    # Rounding to significant digits is monotone, so a non-decreasing curve stays one.
    return [float(f"{v:.{SIGNIFICANT_DIGITS}g}") for v in values]


def _thinned(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_CURVE_POINTS points of the curve, always keeping both ends."""
    if len(x) <= MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_CURVE_POINTS).round().astype(int))
    return x[keep], y[keep]


def _fit_curve(scores: np.ndarray, hits: np.ndarray) -> dict[str, list[float]]:
    """An isotonic map from the model's probability of one class to the observed rate."""
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
    iso.fit(scores, hits)
    x, y = _thinned(np.asarray(iso.X_thresholds_, float), np.asarray(iso.y_thresholds_, float))
    return {"x": _rounded(x), "y": _rounded(np.clip(y, 0.0, 1.0))}


def _check_proba(proba: np.ndarray, n_classes: int) -> np.ndarray:
    proba = np.asarray(proba, dtype=float)
    if proba.ndim != 2 or proba.shape[1] != n_classes:
        raise ValueError(f"expected probabilities of shape (rows, {n_classes}), got {proba.shape}")
    if not np.all(np.isfinite(proba)):
        raise ValueError("probabilities must be finite")
    return proba


def performance_section(
    task: str,
    metric: str,
    test_scores: dict[str, float],
    test_rows: int,
    classes: list | None = None,
    calibration: dict | None = None,
) -> dict[str, Any]:
    """The profile's ``performance`` section, JSON-able as the profile must be.

    ``test_scores`` are the version's metrics on its test split (``test_rows`` rows);
    non-finite scores are left out, since the profile is strict JSON. ``classes`` are the
    classifier's classes in its ``predict_proba`` column order, kept as the model's
    ``predict()`` returns them (numpy scalars become plain ints, bools or strings).
    ``calibration`` comes from :func:`fit_calibration`, or None when there is none.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return {
        "task": task,
        "metric": metric,
        "test": {str(k): float(v) for k, v in test_scores.items() if math.isfinite(float(v))},
        "test_rows": int(test_rows),
        "classes": None if classes is None else [_json_scalar(c) for c in classes],
        "calibration": calibration,
    }


def fit_calibration(classes: Sequence[Any], proba: np.ndarray, y_true: Any) -> dict[str, Any]:
    """Fit isotonic calibration curves of a classifier's probabilities on labeled rows.

    Fit on the held-out test split: the training split's probabilities are overconfident
    (the model has seen those rows), and calibration is only as honest as its rows are
    unseen. ``classes`` are the columns of ``proba`` in order (the model's ``classes_``).

    Raises ValueError when the curves cannot mean anything: fewer than two classes, a
    label outside ``classes``, or a class absent from ``y_true`` (its curve would be
    flat zero). Training catches it and stores no calibration.
    """
    labels = [_json_scalar(c) for c in classes]
    if len(labels) < 2:
        raise ValueError("calibration needs at least two classes")
    proba = _check_proba(proba, len(labels))
    y = np.asarray(y_true, dtype=object)
    if len(y) != len(proba):
        raise ValueError(f"{len(y)} labels for {len(proba)} rows of probabilities")
    hits = np.stack([y == c for c in labels], axis=1)
    if not np.all(hits.any(axis=1)):
        raise ValueError("a label is not among the model's classes")
    missing = [c for c, present in zip(labels, hits.any(axis=0), strict=True) if not present]
    if missing:
        raise ValueError(f"class(es) {missing} absent from the calibration rows")
    # Binary: one curve on the positive class; the negative class is its complement.
    fitted = [1] if len(labels) == 2 else range(len(labels))
    curves = [
        {"class": labels[j], **_fit_curve(proba[:, j], hits[:, j].astype(float))} for j in fitted
    ]
    return {
        "method": CALIBRATION_METHOD,
        "rows": len(proba),
        "classes": labels,
        "curves": curves,
    }


def calibrated_proba(calibration: dict[str, Any], proba: np.ndarray) -> np.ndarray:
    """The model's probabilities mapped through the calibration curves.

    Rows sum to 1: binary rows by construction, multiclass rows renormalised. A multiclass
    row that the curves map to all zeros keeps its uncalibrated probabilities, rather than
    dividing by zero.
    """
    n_classes = len(calibration["classes"])
    proba = _check_proba(proba, n_classes)
    curves = calibration["curves"]
    if n_classes == 2:
        positive = np.interp(proba[:, 1], curves[0]["x"], curves[0]["y"])
        return np.column_stack([1.0 - positive, positive])
    mapped = np.column_stack([np.interp(proba[:, j], c["x"], c["y"]) for j, c in enumerate(curves)])
    totals = mapped.sum(axis=1, keepdims=True)
    degenerate = totals[:, 0] <= 0.0
    mapped[degenerate] = proba[degenerate]
    totals[degenerate] = proba[degenerate].sum(axis=1, keepdims=True)
    return mapped / totals


def _expected_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The area under the expected ROC curve (NannyML's CBPE for ROC AUC).

    Each row counts as ``positive`` of a positive and ``1 - positive`` of a negative. At
    each threshold on ``scores`` (rows scored at or above it are called positive) the
    expected true positives are the sum of ``positive`` above it and the expected false
    positives the sum of ``1 - positive``; the curve's trapezoid area is the estimate.
    With 0/1 ``positive`` it is exactly the realized ROC AUC, ties included.
    """
    total_pos = positive.sum()
    total_neg = len(positive) - total_pos
    if len(scores) < 2 or total_pos <= 0.0 or total_neg <= 0.0:
        return None
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    # One threshold per distinct score: tied rows move the curve together (a diagonal
    # segment), as sklearn's roc_curve does.
    ends = np.r_[np.flatnonzero(np.diff(scores) != 0.0), len(scores) - 1]
    tp = np.r_[0.0, np.cumsum(positive)[ends]]
    fp = np.r_[0.0, np.cumsum(1.0 - positive)[ends]]
    return float(np.trapezoid(tp / total_pos, fp / total_neg))


def _weighted_ovr(aucs: list[float | None], weights: np.ndarray) -> float | None:
    """One-vs-rest AUCs averaged with class-prevalence weights (sklearn's ``ovr`` with
    ``average="weighted"``); classes without a defined AUC are left out."""
    pairs = [(a, w) for a, w in zip(aucs, weights, strict=True) if a is not None and w > 0]
    if not pairs:
        return None
    total = sum(w for _, w in pairs)
    return float(sum(a * w for a, w in pairs) / total)


def estimate_performance(calibration: dict[str, Any], proba: np.ndarray) -> dict[str, float]:
    """CBPE: the expected accuracy and ROC AUC of unlabeled rows from their probabilities.

    ``proba`` is the model's own (uncalibrated) ``predict_proba`` output; the predicted
    class is its argmax, which is what the model answers. Expected accuracy is the mean
    calibrated probability of the predicted class. Expected ROC AUC is the area under
    the expected ROC curve (binary: on the positive class) or, for multiclass, the
    one-vs-rest expected AUCs weighted by expected class prevalence, mirroring the
    realized weighted one-vs-rest AUC of pipelines/metrics.py. Metrics that are undefined
    (no rows; ``roc_auc`` with one row or one expected class) are left out.
    """
    calibrated = calibrated_proba(calibration, proba)
    proba = np.asarray(proba, dtype=float)
    if len(proba) == 0:
        return {}
    predicted = proba.argmax(axis=1)
    estimate = {"accuracy": float(calibrated[np.arange(len(proba)), predicted].mean())}
    if proba.shape[1] == 2:
        auc = _expected_auc(proba[:, 1], calibrated[:, 1])
    else:
        aucs = [_expected_auc(proba[:, j], calibrated[:, j]) for j in range(proba.shape[1])]
        auc = _weighted_ovr(aucs, calibrated.sum(axis=0))
    if auc is not None:
        estimate["roc_auc"] = auc
    return estimate


def _roc_auc(y: np.ndarray, proba: np.ndarray, labels: list[Any]) -> float | None:
    """The realized ROC AUC as pipelines/metrics.py defines it, or None when undefined.

    Multiclass is computed one class at a time, so that a class absent from a feedback
    window drops out (its weight is zero) instead of making sklearn raise; when every
    class is present this equals ``roc_auc_score(multi_class="ovr", average="weighted")``.
    """
    hits = np.stack([y == c for c in labels], axis=1)
    if not np.all(hits.any(axis=1)):
        return None  # a label the model cannot predict: no ROC AUC is defined
    present = hits.any(axis=0) & ~hits.all(axis=0)
    if len(labels) == 2:
        return float(skm.roc_auc_score(hits[:, 1], proba[:, 1])) if present[1] else None
    aucs = [
        float(skm.roc_auc_score(hits[:, j], proba[:, j])) if present[j] else None
        for j in range(len(labels))
    ]
    return _weighted_ovr(aucs, hits.sum(axis=0))


def realized_classification(
    y_true: Any, y_pred: Any, proba: np.ndarray | None, classes: Sequence[Any]
) -> dict[str, float]:
    """Realized accuracy, weighted F1 and (given ``proba``) ROC AUC of labeled rows.

    The same definitions as the version's test metrics (pipelines/metrics.py), so the two
    compare. Degenerate inputs leave a metric out instead of raising: no rows gives {},
    and ROC AUC needs probabilities, rows of both classes (binary) or of at least one
    class and its complement (multiclass), and no label outside ``classes``.
    """
    y = np.asarray(y_true, dtype=object)
    predicted = np.asarray(y_pred, dtype=object)
    if len(y) != len(predicted):
        raise ValueError(f"{len(y)} labels for {len(predicted)} predictions")
    if len(y) == 0:
        return {}
    # sklearn refuses object arrays of numbers ("unknown" targets) and mixed label types,
    # which label feedback can hold; both metrics only ask whether two labels are equal,
    # so they are computed on integer codes of the labels, with the same result.
    codes: dict[Any, int] = {}
    y_codes = np.array([codes.setdefault(v, len(codes)) for v in y])
    predicted_codes = np.array([codes.setdefault(v, len(codes)) for v in predicted])
    scores = {
        "accuracy": float(skm.accuracy_score(y_codes, predicted_codes)),
        "f1": float(skm.f1_score(y_codes, predicted_codes, average="weighted", zero_division=0)),
    }
    if proba is not None:
        labels = [_json_scalar(c) for c in classes]
        # Compared as objects, element by element: a label of another type than the
        # classes (a string "1" against class 1) matches none rather than erroring.
        auc = _roc_auc(y, _check_proba(proba, len(labels)), labels)
        if auc is not None:
            scores["roc_auc"] = auc
    return scores


def realized_regression(y_true: Any, y_pred: Any) -> dict[str, float]:
    """Realized RMSE, MAE and R² of labeled rows, as pipelines/metrics.py defines them.

    No rows gives {}; R² needs at least two rows (sklearn returns NaN for one).
    """
    y = np.asarray(y_true, dtype=float)
    predicted = np.asarray(y_pred, dtype=float)
    if len(y) != len(predicted):
        raise ValueError(f"{len(y)} labels for {len(predicted)} predictions")
    if len(y) == 0:
        return {}
    scores = {
        "rmse": float(np.sqrt(skm.mean_squared_error(y, predicted))),
        "mae": float(skm.mean_absolute_error(y, predicted)),
    }
    if len(y) >= 2:
        scores["r2"] = float(skm.r2_score(y, predicted))
    return scores
