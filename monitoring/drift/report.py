"""The drift decision's settings and its report (see docs/drift.md).

Kept apart from the statistics so that the monitor service, alerting and the
JSON API can use the types without importing scipy-heavy code paths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

CORRECTIONS = ("bh", "by", "holm", "bonferroni")


@dataclass(frozen=True)
class DriftConfig:
    """Every threshold of the drift decision, in one place."""

    # Family-wise level for the whole window: half the 1% false-alarm target,
    # leaving room for asymptotic p-values, whose far tails are only roughly right.
    alpha: float = 0.005
    correction: str = "bh"  # "bh", "by", "holm" or "bonferroni"
    wasserstein_min: float = 0.1  # Wasserstein distance / baseline std
    psi_min: float = 0.1  # PSI on the baseline deciles
    psi_bins: int = 10
    js_min: float = 0.05  # Jensen-Shannon distance, natural log
    null_rate_min_change: float = 0.01  # absolute change in the share of nulls
    min_count: int = 30  # fewer valid live values: the distribution is not tested
    min_expected: float = 10.0  # chi-square pooling threshold on expected live counts
    min_drifted_features: int = 1
    max_invalid_share: float = 0.0  # uncoercible values tolerated per column
    extra_columns_violate: bool = True
    max_listed_values: int = 20  # unseen categories listed per feature

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        if self.correction not in CORRECTIONS:
            raise ValueError(f"correction must be one of {CORRECTIONS}, got {self.correction!r}")


@dataclass
class DistributionResult:
    """Distribution test of one feature."""

    test: str  # "ks+rank" or "chi2"
    statistic: float  # KS D or chi-square
    p_value: float
    effect: dict[str, float]
    material: bool  # the effect size passes its threshold
    p_adjusted: float | None = None
    significant: bool = False
    drifted: bool = False
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class NullRateResult:
    """Change of one feature's share of nulls."""

    baseline: float
    live: float
    change: float
    p_value: float | None  # None: no nulls on either side, nothing to test
    material: bool
    p_adjusted: float | None = None
    significant: bool = False
    drifted: bool = False


@dataclass
class FeatureReport:
    """Everything measured on one feature (or the prediction) in a window."""

    name: str
    kind: str
    rows: int
    nulls: int
    invalid: int  # present values that cannot be coerced to the baseline kind
    null_rate: NullRateResult
    distribution: DistributionResult | None  # None: too few valid values to test
    unseen: dict[str, Any] | None = None  # categorical only
    drifted: bool = False


@dataclass
class SchemaReport:
    """Columns and values that break the baseline's schema."""

    missing: list[str]
    extra: list[str]
    invalid_values: dict[str, int]
    violated: bool


@dataclass
class WindowReport:
    """Drift verdict of one live window against a baseline."""

    rows: int
    drifted: bool
    reasons: list[str]
    drifted_features: list[str]
    features: dict[str, FeatureReport]
    prediction: FeatureReport | None
    schema: SchemaReport
    correction: dict[str, Any]
    config: DriftConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (no numpy types, no NaN or infinity)."""
        return _jsonable(asdict(self))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
