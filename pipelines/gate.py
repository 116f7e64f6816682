"""The champion/challenger gate: may a newly registered version replace production?

At registration, the new version (the challenger) and the version now in production
(the champion) score the same held-out rows: the challenger's own test split. The
challenger passes when its score on the training metric is no worse than the
champion's by more than a tolerance. The verdict and both scores are tagged on the
new version (common/registry.py GATE_*); the controller refuses to deploy a version
whose gate failed unless a person sets `flowline.gate.override=true`.

The champion is scored through MLflow's pyfunc interface, exactly as it serves, so a
champion from an older flowline works too. A champion that cannot score the rows (its
columns changed, it is not a flowline model) cannot be compared: the gate is
`skipped`, with the reason, and does not block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import mlflow.pyfunc
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from common import registry
from pipelines.metrics import GREATER_IS_BETTER, SCORERS

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict on one challenger."""

    verdict: str
    reason: str
    metric: str
    tolerance: float
    challenger: float
    champion: float | None = None
    champion_version: str | None = None

    def tags(self) -> dict[str, str]:
        """The version tags that record the verdict (all of them, so a re-run overwrites)."""
        return {
            registry.GATE_TAG: self.verdict,
            registry.GATE_REASON_TAG: self.reason,
            registry.GATE_METRIC_TAG: self.metric,
            registry.GATE_TOLERANCE_TAG: f"{self.tolerance:g}",
            registry.GATE_CHALLENGER_TAG: f"{self.challenger:.6g}",
            registry.GATE_CHAMPION_TAG: "" if self.champion is None else f"{self.champion:.6g}",
            registry.GATE_CHAMPION_VERSION_TAG: self.champion_version or "",
        }


class _ServedModel:
    """A pyfunc model with the predict/predict_proba/classes_ face the scorers use."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.classes_: np.ndarray | None = None

    def predict(self, features: Any) -> np.ndarray:
        return np.asarray(self.model.predict(features)).ravel()

    def predict_proba(self, features: Any) -> np.ndarray:
        # flowline's pyfunc answers one probability column per class, named by the class.
        frame = self.model.predict(features, params={"predict_method": "predict_proba"})
        self.classes_ = np.asarray(frame.columns)
        return frame.to_numpy(dtype=float)


def champion_version(client: MlflowClient, name: str) -> str | None:
    """The version of `name` now in production, or None (also when the model is new)."""
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        return None
    return registry.production_version(model)


def evaluate(
    client: MlflowClient,
    name: str,
    task: str,
    metric: str,
    challenger_score: float,
    features: Any,
    target: Any,
    tolerance: float,
) -> GateResult:
    """Compare the challenger's test score with the champion's on the same rows."""
    champion = champion_version(client, name)

    def result(verdict: str, reason: str, score: float | None = None) -> GateResult:
        return GateResult(verdict, reason, metric, tolerance, challenger_score, score, champion)

    if champion is None:
        return result(PASSED, "no champion: nothing in production yet")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{name}/{champion}")
        score = SCORERS[task](_ServedModel(model), features, target)[metric]
    except Exception as exc:  # any failure of the old model means "cannot compare"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        # MLflow's schema errors quote the rows ("... of data '<frame>'"): keep data out
        # of registry tags.
        first = first.split(" of data '")[0][:300]
        return result(SKIPPED, f"champion version {champion} cannot score the test split: {first}")
    if not math.isfinite(score):
        return result(SKIPPED, f"champion version {champion} scored {score}")
    better = GREATER_IS_BETTER[metric]
    margin = challenger_score - score if better else score - challenger_score
    passed = margin >= -tolerance
    relation = "within" if passed else "worse than"
    reason = (
        f"{metric} {challenger_score:.4g} vs champion version {champion} {score:.4g} on this "
        f"version's test split: {relation} the tolerance {tolerance:g}"
    )
    return result(PASSED if passed else FAILED, reason, score)
