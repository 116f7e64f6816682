"""Drift of a live window against a baseline profile (see docs/drift.md).

Per feature (and for the model's predictions, when both sides have them):

* numeric: two-sample KS and Mann-Whitney of the live values against the
  baseline KLL sketch, with an effective reference size that accounts for the
  sketch's own error (see :mod:`monitoring.drift.stats`). The feature's p-value
  is ``min(1, 2 * min(p_ks, p_rank))`` (Bonferroni over the two); KS catches
  changes of shape, the rank test gives power against shifts of location.
  Effect sizes: Wasserstein distance / baseline std, and PSI on the baseline
  deciles;
* categorical: ``scipy.stats.chi2_contingency`` (Cressie-Read statistic) on
  baseline vs live counts over the baseline's top-k categories plus "other"
  (live values outside the top-k count as "other"; categories too rare for the
  approximation are pooled).
  Effect size: Jensen-Shannon distance over the same bins;
* null rate: Fisher's exact test (two-sided by doubling the smaller tail) of
  live nulls vs baseline nulls, with effect size the absolute change in null
  rate.

Dataset-level rule (exact):

1. all tests that ran in the window form one family: one distribution test per
   feature with at least ``min_count`` valid live values, one null-rate test per
   feature where the baseline or the window has a null (with no null on either
   side the test cannot reject, so it takes no share of alpha), the same for the
   prediction. Their p-values are adjusted with ``config.correction``
   (Benjamini-Hochberg by default, ``scipy.stats.false_discovery_control``);
2. a test is *significant* when its adjusted p-value is ``<= config.alpha``;
3. a distribution *drifts* when it is significant and material: Wasserstein/std
   ``>= wasserstein_min`` or PSI ``>= psi_min`` (numeric), JS distance
   ``>= js_min`` (categorical). A null rate drifts when it is significant and
   ``|live - baseline| >= null_rate_min_change``;
4. the window is *drifted* when at least ``min_drifted_features`` features (the
   prediction counts as one) have a drifting distribution, or any null rate
   drifts, or the schema is violated (missing columns, extra columns unless
   ``extra_columns_violate`` is off, or a column whose share of values that
   cannot be coerced to the baseline kind exceeds ``max_invalid_share``).

Under the global null the chance that BH rejects anything is at most ``alpha``
for independent tests, so ``alpha`` is also the budget for false alarms per
window; the effect-size gates only lower it further.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from monitoring.drift import stats as ds
from monitoring.drift.report import (
    DistributionResult,
    DriftConfig,
    FeatureReport,
    NullRateResult,
    SchemaReport,
    WindowReport,
)
from monitoring.profile.baseline import (
    CATEGORICAL,
    NUMERIC,
    NumericBaseline,
    feature_types,
    profiled_values,
)

__all__ = [
    "PREDICTION",
    "DistributionResult",
    "DriftConfig",
    "FeatureReport",
    "NullRateResult",
    "PreparedBaseline",
    "SchemaReport",
    "WindowReport",
    "evaluate_window",
    "prepare_baseline",
]

PREDICTION = "__prediction__"


# --- the baseline, prepared once -------------------------------------------------


@dataclass(frozen=True)
class NumericRef:
    """Deserialised numeric baseline of one column."""

    cdf: ds.SketchCDF
    psi_edges: np.ndarray
    psi_expected: np.ndarray
    std: float | None
    min: float | None
    max: float | None
    nulls: int
    rows: int


@dataclass(frozen=True)
class CategoricalRef:
    """Baseline counts of one categorical column: top-k then "other"."""

    index: dict[str, int]
    counts: np.ndarray
    nulls: int
    rows: int


@dataclass(frozen=True)
class PreparedBaseline:
    """A profile with its sketches deserialised, ready for many windows."""

    profile: dict[str, Any]
    columns: dict[str, NumericRef | CategoricalRef]
    prediction: NumericRef | CategoricalRef | None
    types: dict[str, str] = field(default_factory=dict)  # profile.feature_types


def _prepare_column(stats: dict[str, Any], config: DriftConfig) -> NumericRef | CategoricalRef:
    rows = int(stats["count"]) + int(stats["nulls"])
    if stats["kind"] == NUMERIC:
        cdf = ds.SketchCDF.from_sketch(NumericBaseline(stats).sketch)
        edges, expected = (
            ds.quantile_bins(cdf, config.psi_bins) if not cdf.empty else (np.empty(0),) * 2
        )
        return NumericRef(
            cdf, edges, expected, stats["std"], stats["min"], stats["max"], stats["nulls"], rows
        )
    top = stats["top"]
    counts = np.array([*top.values(), stats["other"]], dtype=np.float64)
    return CategoricalRef({k: i for i, k in enumerate(top)}, counts, int(stats["nulls"]), rows)


def prepare_baseline(
    profile: dict[str, Any], config: DriftConfig | None = None
) -> PreparedBaseline:
    """Deserialise a profile's sketches once; pass the result to :func:`evaluate_window`."""
    config = config or DriftConfig()
    columns = {name: _prepare_column(st, config) for name, st in profile["features"].items()}
    pred = profile.get("prediction")
    prediction = _prepare_column(pred, config) if pred else None
    return PreparedBaseline(profile, columns, prediction, feature_types(profile))


_CACHE: OrderedDict[tuple[int, int], PreparedBaseline] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 16


def _cached(profile: dict[str, Any], config: DriftConfig) -> PreparedBaseline:
    # Keyed by object identity; the cached entry holds the profile, so the id
    # cannot be reused while the entry lives. Mutating a profile after its first
    # evaluation is not supported (call prepare_baseline again).
    key = (id(profile), config.psi_bins)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit.profile is profile:
            _CACHE.move_to_end(key)
            return hit
    prepared = prepare_baseline(profile, config)
    with _CACHE_LOCK:
        _CACHE[key] = prepared
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return prepared


# --- one column ------------------------------------------------------------------


def _numeric_values(series: pd.Series) -> tuple[np.ndarray, int, int]:
    """Finite values, null count, and count of present values that are not numbers."""
    missing = series.isna().to_numpy()
    if pd.api.types.is_numeric_dtype(series):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values) & ~missing  # unparsable strings and +-inf
    return values[np.isfinite(values)], int(missing.sum()), int(bad.sum())


def category_strings(series: pd.Series) -> pd.Series:
    """A categorical column's present values as the category strings the baseline counts.

    Shared with the report's bar plots (monitoring.service.window_frame), so a
    plot's bins always match what the drift test compared.
    """
    present = series.dropna()
    if pd.api.types.is_float_dtype(present) and present.size and (present % 1 == 0).all():
        # Nulls turn integer category codes into floats on the way; "3.0" is category "3".
        present = present.astype(np.int64)
    return present.astype(str)


def _null_rate(
    ref: NumericRef | CategoricalRef, nulls: int, rows: int, config: DriftConfig
) -> NullRateResult:
    base = ref.nulls / ref.rows if ref.rows else 0.0
    live = nulls / rows if rows else 0.0
    p = ds.null_rate_test(ref.nulls, ref.rows, nulls, rows) if rows and ref.rows else None
    change = live - base
    return NullRateResult(base, live, change, p, abs(change) >= config.null_rate_min_change)


def _numeric_distribution(
    ref: NumericRef, values: np.ndarray, config: DriftConfig
) -> DistributionResult | None:
    if values.size < config.min_count or ref.cdf.empty:
        return None
    live = np.sort(ds.as_sketch_precision(values))
    cmp = ds.compare_to_sketch(ref.cdf, live)
    scale = ref.std if ref.std else 1.0  # constant training feature: raw distance
    effect = {
        "wasserstein_norm": cmp.wasserstein / scale,
        "psi": ds.psi(ref.psi_expected, ds.bin_shares(live, ref.psi_edges)),
    }
    material = (
        effect["wasserstein_norm"] >= config.wasserstein_min or effect["psi"] >= config.psi_min
    )
    outside = 0
    if ref.min is not None and ref.max is not None:
        outside = int(np.sum((live < ref.min) | (live > ref.max)))
    return DistributionResult(
        test="ks+rank",
        statistic=cmp.ks,
        p_value=min(1.0, 2.0 * min(cmp.ks_p, cmp.rank_p)),
        effect=effect,
        material=material,
        details={
            "ks_p": cmp.ks_p,
            "rank_auc": cmp.auc,
            "rank_p": cmp.rank_p,
            "wasserstein": cmp.wasserstein,
            "n_ref_effective": cmp.n_ref_eff,
            "live_mean": float(live.mean()),
            "live_std": float(live.std(ddof=1)) if live.size > 1 else None,
            "outside_training_range": outside / live.size,
        },
    )


def _categorical_distribution(
    ref: CategoricalRef, strings: pd.Series, config: DriftConfig
) -> tuple[DistributionResult | None, dict[str, Any]]:
    counts = strings.value_counts()
    live = np.zeros(ref.counts.size)
    outside: dict[str, int] = {}
    for value, count in counts.items():
        i = ref.index.get(value)
        if i is None:
            outside[value] = int(count)
        else:
            live[i] = count
    live[-1] = sum(outside.values())
    # With no "other" in training, a value outside the top-k was never seen at
    # all; otherwise it may be one of the "other" values, and we cannot tell.
    listed = dict(list(outside.items())[: config.max_listed_values])
    certain = ref.counts[-1] == 0
    unseen = {
        "unseen_rows": int(live[-1]) if certain else 0,
        "unseen_values": listed if certain else {},
        "outside_top_rows": 0 if certain else int(live[-1]),
        "outside_top_values": {} if certain else listed,
    }
    if live.sum() < config.min_count or ref.counts.sum() <= 0:
        return None, unseen
    pooled_ref, pooled_live = ds.pool_sparse_categories(ref.counts, live, config.min_expected)
    stat, p = ds.chi2_test(pooled_ref, pooled_live)
    js = ds.js_distance(pooled_ref, pooled_live)
    result = DistributionResult(
        test="chi2",
        statistic=stat,
        p_value=p,
        effect={"jensenshannon": js},
        material=js >= config.js_min,
        details={
            "bins": int(pooled_ref.size),
            "categories": int(ref.counts.size - 1),
            # JS distance expected from sampling alone: with many categories and
            # a small window it can exceed js_min, and significance decides.
            "js_noise_floor": ds.js_noise_floor(
                int(pooled_ref.size), float(pooled_ref.sum()), float(pooled_live.sum())
            ),
        },
    )
    return result, unseen


def _evaluate_column(
    name: str, ref: NumericRef | CategoricalRef, series: pd.Series, config: DriftConfig
) -> FeatureReport:
    rows = len(series)
    if isinstance(ref, NumericRef):
        values, nulls, invalid = _numeric_values(series)
        null_rate = _null_rate(ref, nulls, rows, config)
        dist = _numeric_distribution(ref, values, config)
        return FeatureReport(name, NUMERIC, rows, nulls, invalid, null_rate, dist)
    strings = category_strings(series)
    nulls = rows - len(strings)
    dist, unseen = _categorical_distribution(ref, strings, config)
    return FeatureReport(
        name, CATEGORICAL, rows, nulls, 0, _null_rate(ref, nulls, rows, config), dist, unseen
    )


# --- the window ------------------------------------------------------------------


def evaluate_window(
    baseline: dict[str, Any] | PreparedBaseline,
    window: pd.DataFrame,
    predictions: Any = None,
    config: DriftConfig | None = None,
) -> WindowReport:
    """Test a window of raw feature columns (and optional predictions) for drift."""
    config = config or DriftConfig()
    prepared = baseline if isinstance(baseline, PreparedBaseline) else _cached(baseline, config)

    missing = [c for c in prepared.columns if c not in window.columns]
    repeated = window.columns.duplicated()
    # Columns the model drops at training (IDs, constants) are expected, not extra.
    ignored = prepared.profile.get("ignored") or {}
    # A repeated column name is an extra column; the first one is evaluated.
    extra = [
        str(c)
        for c, dup in zip(window.columns, repeated, strict=True)
        if dup or (c not in prepared.columns and c not in ignored)
    ]
    window = window.loc[:, ~repeated]
    types = prepared.types
    features = {
        name: _evaluate_column(name, ref, profiled_values(window[name], types.get(name)), config)
        for name, ref in prepared.columns.items()
        if name in window.columns
    }
    prediction = None
    if predictions is not None and prepared.prediction is not None:
        series = pd.Series(np.asarray(predictions).ravel())
        prediction = _evaluate_column(PREDICTION, prepared.prediction, series, config)

    reports = [*features.values(), *([prediction] if prediction else [])]
    _adjust(reports, config)

    invalid = {r.name: r.invalid for r in features.values() if r.invalid}
    too_invalid = [n for n, k in invalid.items() if k > config.max_invalid_share * len(window)]
    violated = bool(missing or too_invalid or (extra and config.extra_columns_violate))
    schema = SchemaReport(missing, extra, invalid, violated)

    reasons: list[str] = []
    drifted_features = [r.name for r in reports if r.distribution and r.distribution.drifted]
    if len(drifted_features) >= config.min_drifted_features:
        reasons += [f"distribution:{n}" for n in drifted_features]
    reasons += [f"null_rate:{r.name}" for r in reports if r.null_rate.drifted]
    reasons += [f"schema:missing:{c}" for c in missing]
    if config.extra_columns_violate:
        reasons += [f"schema:extra:{c}" for c in extra]
    reasons += [f"schema:invalid:{c}" for c in too_invalid]

    return WindowReport(
        rows=len(window),
        drifted=bool(reasons),
        reasons=reasons,
        drifted_features=drifted_features,
        features=features,
        prediction=prediction,
        schema=schema,
        correction={
            "method": config.correction,
            "alpha": config.alpha,
            "tests": sum(
                (r.null_rate.p_value is not None) + (r.distribution is not None) for r in reports
            ),
        },
        config=config,
    )


def _adjust(reports: list[FeatureReport], config: DriftConfig) -> None:
    """Adjust all p-values of the window as one family and set the verdicts."""
    tests: list[DistributionResult | NullRateResult] = []
    for r in reports:
        if r.null_rate.p_value is not None:
            tests.append(r.null_rate)
        if r.distribution is not None:
            tests.append(r.distribution)
    adjusted = ds.adjust_pvalues(np.array([t.p_value for t in tests]), config.correction)
    for test, p_adj in zip(tests, adjusted, strict=True):
        test.p_adjusted = float(p_adj)
        test.significant = bool(p_adj <= config.alpha)
        test.drifted = test.significant and bool(test.material)
    for r in reports:
        r.drifted = r.null_rate.drifted or bool(r.distribution and r.distribution.drifted)
