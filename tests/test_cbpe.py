"""Confidence-based performance estimation (monitoring/profile/performance.py): the
calibration stored in the baseline, the CBPE estimates under covariate shift, the realized
metrics, and the section that training writes."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm
from sklearn.datasets import load_wine
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.model_selection import train_test_split

from monitoring.profile import baseline
from monitoring.profile.performance import (
    MAX_CURVE_POINTS,
    _expected_auc,
    calibrated_proba,
    estimate_performance,
    fit_calibration,
    performance_section,
    realized_classification,
    realized_regression,
)
from pipelines.train import performance_profile

# The synthetic world: P(y | x) is a fixed logistic function of three features (the concept
# never changes); twenty more features are pure noise.
WEIGHTS = np.array([1.5, -1.0, 0.5])
BIAS = 0.3
NOISE_FEATURES = 20
# Each window's informative features move this far (in standard deviations, at the last
# window), towards where the classes are easier to tell apart and the positive class rarer.
SHIFT_DIRECTION = -(WEIGHTS / np.linalg.norm(WEIGHTS) + np.array([0.0, 0.25, 0.5]))
MAX_SHIFT = 1.5
WINDOWS = 20
WINDOW_ROWS = 800
# Measured with these seeds: mean |error| of the calibrated estimate 0.012 (accuracy) and
# 0.024 (ROC AUC); the raw probabilities of the overfit model miss by 0.080 and 0.096.
ACCURACY_TOLERANCE = 0.03  # the bound
ROC_AUC_TOLERANCE = 0.04


def _draw(rng: np.random.Generator, rows: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    X = rng.normal(size=(rows, len(WEIGHTS) + NOISE_FEATURES))
    X[:, : len(WEIGHTS)] += shift * SHIFT_DIRECTION
    p = 1.0 / (1.0 + np.exp(-(X[:, : len(WEIGHTS)] @ WEIGHTS + BIAS)))
    return X, (rng.uniform(size=rows) < p).astype(int)


def _identity_calibration(classes: list) -> dict:
    """A 'calibration' that changes nothing: CBPE on the model's raw probabilities."""
    return {
        "method": "identity",
        "rows": 0,
        "classes": classes,
        "curves": [{"class": classes[1], "x": [0.0, 1.0], "y": [0.0, 1.0]}],
    }


@pytest.fixture(scope="module")
def shifted_windows() -> dict[str, list[float]]:
    """An overfit logistic regression (150 training rows, 23 features, almost no
    regularisation: overconfident probabilities), calibrated on 1000 held-out rows, then
    scored on 20 windows whose features shift progressively."""
    rng = np.random.default_rng(0)
    X_train, y_train = _draw(rng, 150, 0.0)
    X_test, y_test = _draw(rng, 1000, 0.0)
    model = LogisticRegression(C=1e6, max_iter=5000).fit(X_train, y_train)
    calibration = fit_calibration(model.classes_, model.predict_proba(X_test), y_test)
    raw = _identity_calibration([0, 1])
    out: dict[str, list[float]] = {k: [] for k in ("real", "est", "raw", "real_auc", "est_auc")}
    for window in range(WINDOWS):
        X, y = _draw(rng, WINDOW_ROWS, MAX_SHIFT * window / (WINDOWS - 1))
        proba = model.predict_proba(X)
        realized = realized_classification(y, model.predict(X), proba, model.classes_)
        estimate = estimate_performance(calibration, proba)
        out["real"].append(realized["accuracy"])
        out["est"].append(estimate["accuracy"])
        out["raw"].append(estimate_performance(raw, proba)["accuracy"])
        out["real_auc"].append(realized["roc_auc"])
        out["est_auc"].append(estimate["roc_auc"])
    return {k: np.asarray(v) for k, v in out.items()}


def test_cbpe_tracks_realized_accuracy_under_covariate_shift(shifted_windows) -> None:
    w = shifted_windows
    error = np.abs(w["est"] - w["real"]).mean()
    assert error <= ACCURACY_TOLERANCE, error
    # The shift matters: realized accuracy moves by far more than the tolerance, and the
    # estimate moves with it.
    assert w["real"].max() - w["real"].min() > 0.1
    assert np.corrcoef(w["real"], w["est"])[0, 1] > 0.8
    # Without calibration the overconfident model's own probabilities miss badly: the
    # calibration is what makes the estimate hold.
    raw_error = np.abs(w["raw"] - w["real"]).mean()
    assert raw_error > 2 * error and raw_error > ACCURACY_TOLERANCE, (raw_error, error)


def test_cbpe_tracks_realized_roc_auc_under_covariate_shift(shifted_windows) -> None:
    w = shifted_windows
    error = np.abs(w["est_auc"] - w["real_auc"]).mean()
    assert error <= ROC_AUC_TOLERANCE, error


def test_calibration_survives_json_and_matches_isotonic_regression() -> None:
    rng = np.random.default_rng(1)
    scores = rng.uniform(size=600)
    y = (rng.uniform(size=600) < scores**2).astype(int)
    proba = np.column_stack([1 - scores, scores])
    calibration = fit_calibration(np.array([0, 1]), proba, y)
    text = json.dumps(calibration, allow_nan=False)
    restored = json.loads(text)
    assert restored["classes"] == [0, 1] and type(restored["classes"][0]) is int
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(scores, y)
    probe = np.r_[-0.5, np.linspace(0, 1, 501), 1.5]  # outside [0, 1] too: clipped
    probe_proba = np.column_stack([1 - probe, probe])
    applied = calibrated_proba(restored, probe_proba)
    # Equal up to the 6 significant digits the curve is stored with.
    np.testing.assert_allclose(applied[:, 1], iso.predict(probe), atol=1e-4)
    np.testing.assert_allclose(applied.sum(axis=1), 1.0)


def test_long_curves_are_thinned_and_stay_close() -> None:
    rng = np.random.default_rng(2)
    scores = rng.uniform(size=400_000)
    hits = (rng.uniform(size=400_000) < scores).astype(int)
    y = np.where(hits, "b", "a")
    calibration = fit_calibration(["a", "b"], np.column_stack([1 - scores, scores]), y)
    curve = calibration["curves"][0]
    assert curve["class"] == "b" and len(curve["x"]) <= MAX_CURVE_POINTS
    assert len(json.dumps(calibration)) < 10_000
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(scores, hits)
    assert len(iso.X_thresholds_) > MAX_CURVE_POINTS  # the case really thins
    probe = np.linspace(0, 1, 2001)
    applied = calibrated_proba(calibration, np.column_stack([1 - probe, probe]))[:, 1]
    assert np.abs(applied - iso.predict(probe)).mean() < 0.01


def test_expected_auc_is_the_realized_auc_on_certain_labels_and_a_weighted_auc() -> None:
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, size=300) / 20  # many ties
    labels = (rng.uniform(size=300) < scores).astype(float)
    assert _expected_auc(scores, labels) == pytest.approx(skm.roc_auc_score(labels, scores))
    # Soft labels: each row is p of a positive and 1 - p of a negative.
    p = rng.uniform(size=300)
    weighted = skm.roc_auc_score(
        np.r_[np.ones(300), np.zeros(300)], np.r_[scores, scores], sample_weight=np.r_[p, 1 - p]
    )
    assert _expected_auc(scores, p) == pytest.approx(weighted)


def test_multiclass_calibration_and_estimate() -> None:
    X, y = load_wine(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.5, random_state=0, stratify=y
    )
    model = LogisticRegression(max_iter=5000).fit(X_train, y_train)
    proba = model.predict_proba(X_test)
    calibration = fit_calibration(model.classes_, proba, y_test)
    assert [c["class"] for c in calibration["curves"]] == [0, 1, 2]
    json.dumps(calibration, allow_nan=False)
    calibrated = calibrated_proba(calibration, proba)
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0)
    estimate = estimate_performance(calibration, proba)
    realized = realized_classification(y_test, model.predict(X_test), proba, model.classes_)
    # On the rows it was calibrated on, the estimate is close to what happened.
    assert abs(estimate["accuracy"] - realized["accuracy"]) < 0.05
    assert abs(estimate["roc_auc"] - realized["roc_auc"]) < 0.05
    assert realized["roc_auc"] == pytest.approx(
        skm.roc_auc_score(y_test, proba, multi_class="ovr", average="weighted")
    )


def test_a_row_the_curves_zero_out_keeps_its_own_probabilities() -> None:
    calibration = {
        "method": "isotonic",
        "rows": 3,
        "classes": ["x", "y", "z"],
        "curves": [{"class": c, "x": [0.0, 0.5, 1.0], "y": [0.0, 0.0, 1.0]} for c in "xyz"],
    }
    proba = np.array([[0.4, 0.3, 0.3], [0.8, 0.1, 0.1]])
    calibrated = calibrated_proba(calibration, proba)
    np.testing.assert_allclose(calibrated[0], proba[0])
    np.testing.assert_allclose(calibrated[1], [1.0, 0.0, 0.0])


def test_calibration_refuses_data_it_cannot_mean_anything_on() -> None:
    proba = np.array([[0.9, 0.1], [0.2, 0.8]])
    with pytest.raises(ValueError, match="absent"):
        fit_calibration([0, 1], proba, [0, 0])
    with pytest.raises(ValueError, match="not among"):
        fit_calibration([0, 1], proba, [0, 7])
    with pytest.raises(ValueError, match="shape"):
        fit_calibration([0, 1, 2], proba, [0, 1])
    with pytest.raises(ValueError, match="finite"):
        fit_calibration([0, 1], np.array([[np.nan, 0.5], [0.5, 0.5]]), [0, 1])


def test_estimate_leaves_out_what_is_undefined() -> None:
    calibration = _identity_calibration([0, 1])
    assert estimate_performance(calibration, np.empty((0, 2))) == {}
    one = estimate_performance(calibration, np.array([[0.3, 0.7]]))
    assert one == {"accuracy": pytest.approx(0.7)}


def test_realized_classification_equals_sklearn() -> None:
    rng = np.random.default_rng(4)
    classes = np.array(["no", "yes"])
    y = rng.choice(classes, 200)
    p = rng.uniform(size=200)
    proba = np.column_stack([1 - p, p])
    predicted = classes[(p > 0.5).astype(int)]
    got = realized_classification(list(y), list(predicted), proba, classes)
    assert got == {
        "accuracy": pytest.approx(skm.accuracy_score(y, predicted)),
        "f1": pytest.approx(skm.f1_score(y, predicted, average="weighted")),
        "roc_auc": pytest.approx(skm.roc_auc_score(y == "yes", p)),
    }
    assert "roc_auc" not in realized_classification(y, predicted, None, classes)


def test_realized_classification_takes_labels_as_feedback_holds_them() -> None:
    # Object arrays of numbers (JSON labels as the monitor collects them), which sklearn
    # calls "unknown" targets, and labels of another type than the predictions.
    y = np.array([0, 1, 1, 0, 1], dtype=object)
    predicted = np.array([0, 1, 0, 0, 1], dtype=object)
    proba = np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.9, 0.1], [0.2, 0.8]])
    got = realized_classification(y, predicted, proba, [0, 1])
    plain_y, plain_predicted = y.astype(int), predicted.astype(int)
    assert got == {
        "accuracy": pytest.approx(skm.accuracy_score(plain_y, plain_predicted)),
        "f1": pytest.approx(skm.f1_score(plain_y, plain_predicted, average="weighted")),
        "roc_auc": pytest.approx(skm.roc_auc_score(plain_y, proba[:, 1])),
    }
    mixed = realized_classification(np.array(["0", 1], dtype=object), [0, 1], None, [0, 1])
    assert mixed == {"accuracy": 0.5, "f1": 0.5}  # "0" is not 0: one of two right


def test_realized_classification_degenerate_inputs_do_not_raise() -> None:
    proba = np.array([[0.9, 0.1], [0.7, 0.3]])
    assert realized_classification([], [], np.empty((0, 2)), [0, 1]) == {}
    one_class = realized_classification([0, 0], [0, 1], proba, [0, 1])
    assert one_class == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    unknown_label = realized_classification([0, 5], [0, 0], proba, [0, 1])
    assert set(unknown_label) == {"accuracy", "f1"}
    # Multiclass with a class absent from the window: the present classes' weighted AUC.
    proba3 = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1], [0.1, 0.8, 0.1]])
    y3 = np.array([0, 1, 0, 1])
    got = realized_classification(y3, proba3.argmax(axis=1), proba3, [0, 1, 2])
    assert got["roc_auc"] == pytest.approx(1.0)


def test_realized_regression_equals_sklearn_and_guards_r2() -> None:
    rng = np.random.default_rng(5)
    y, predicted = rng.normal(size=50), rng.normal(size=50)
    assert realized_regression(y, predicted) == {
        "rmse": pytest.approx(np.sqrt(skm.mean_squared_error(y, predicted))),
        "mae": pytest.approx(skm.mean_absolute_error(y, predicted)),
        "r2": pytest.approx(skm.r2_score(y, predicted)),
    }
    assert realized_regression([], []) == {}
    assert set(realized_regression([1.0], [2.0])) == {"rmse", "mae"}


def test_section_keeps_class_labels_as_predict_returns_them() -> None:
    for classes, expected in (
        (np.array([0, 1], dtype=np.int64), [0, 1]),
        (np.array([False, True]), [False, True]),
        (np.array(["no", "yes"]), ["no", "yes"]),
    ):
        section = performance_section("classification", "roc_auc", {"roc_auc": 0.9}, 10, classes)
        restored = json.loads(json.dumps(section, allow_nan=False))
        assert restored["classes"] == expected
        assert [type(c) for c in restored["classes"]] == [type(c) for c in expected]
    section = performance_section("regression", "rmse", {"rmse": 1.5, "r2": float("nan")}, 7)
    assert section == {
        "task": "regression",
        "metric": "rmse",
        "test": {"rmse": 1.5},
        "test_rows": 7,
        "classes": None,
        "calibration": None,
    }
    with pytest.raises(ValueError):
        performance_section("ranking", "ndcg", {}, 0)


def test_training_builds_the_section_and_survives_a_failed_calibration() -> None:
    rng = np.random.default_rng(6)
    X = pd.DataFrame({"a": rng.normal(size=400), "b": rng.normal(size=400)})
    y = pd.Series(np.where(X["a"] + rng.normal(size=400) > 0, "yes", "no"))
    model = LogisticRegression().fit(X, y)
    reports: list[str] = []
    section = performance_profile(
        model, "classification", "roc_auc", {"roc_auc": 0.8}, X, y, reports.append
    )
    assert section["classes"] == ["no", "yes"] and not reports
    assert section["calibration"]["curves"][0]["class"] == "yes"
    # The section travels inside the profile, which stays strict JSON and loads.
    profile = baseline.build_profile(X, model.predict(X))
    profile["performance"] = section
    assert baseline.loads(baseline.dumps(profile))["performance"] == section

    only_no = y == "no"  # a test split without the positive class: no calibration
    section = performance_profile(
        model, "classification", "roc_auc", {}, X[only_no], y[only_no], reports.append
    )
    assert section["calibration"] is None and section["test_rows"] == int(only_no.sum())
    assert len(reports) == 1 and reports[0].startswith("warning: ")

    regressor = LinearRegression().fit(X, X["a"])
    section = performance_profile(regressor, "regression", "rmse", {"rmse": 0.1}, X, X["a"])
    assert section["classes"] is None and section["calibration"] is None
