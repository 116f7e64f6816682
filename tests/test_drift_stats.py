"""Drift statistics checked against scipy/numpy, and the window verdicts they drive."""

from __future__ import annotations

import base64
import json

import numpy as np
import pandas as pd
import pytest
from datasketches import kll_floats_sketch
from scipy import stats
from scipy.spatial.distance import jensenshannon

from monitoring.drift import stats as ds
from monitoring.drift.evaluate import DriftConfig, evaluate_window, prepare_baseline
from monitoring.profile.baseline import build_profile, numeric_baseline


def _exact_sketch(values: np.ndarray) -> kll_floats_sketch:
    """A KLL sketch large enough to hold every value, so its CDF is exact."""
    sketch = kll_floats_sketch(max(8, values.size + 1))
    sketch.update(values.astype(np.float32))
    assert not sketch.is_estimation_mode()
    return sketch


def _f32(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float32).astype(np.float64)


# --- sketch CDF ------------------------------------------------------------------


def test_sketch_cdf_matches_kll_cdf_and_quantiles() -> None:
    rng = np.random.default_rng(1)
    sketch = kll_floats_sketch(200)
    sketch.update(rng.lognormal(size=20_000).astype(np.float32))
    cdf = ds.SketchCDF.from_sketch(sketch)
    # Retained items themselves are where inclusive and exclusive CDFs differ.
    points = np.unique(np.concatenate([cdf.items[::7], _f32(rng.lognormal(size=50))]))
    inclusive = sketch.get_cdf(points.tolist(), inclusive=True)[:-1]
    exclusive = sketch.get_cdf(points.tolist(), inclusive=False)[:-1]
    assert cdf.cdf(points) == pytest.approx(inclusive, abs=1e-12)
    assert cdf.cdf_left(points) == pytest.approx(exclusive, abs=1e-12)
    # Ranks off the exact cumulative weights: at those, float rounding decides the item.
    ranks = np.linspace(0.05, 0.95, 19) + 1e-7
    expected = sketch.get_quantiles(ranks.tolist(), inclusive=True)
    assert cdf.quantiles(ranks) == pytest.approx(expected, rel=1e-12)
    assert cdf.n == 20_000
    # Estimation mode: worth fewer values than it saw, but thousands of them.
    assert 5_000 < cdf.effective_size < 20_000


def test_effective_size_is_infinite_for_exact_sketch_and_combines_in_variance() -> None:
    sketch = _exact_sketch(np.arange(100.0))
    assert ds.sketch_effective_size(sketch) == float("inf")
    assert ds.effective_reference_size(100, float("inf")) == 100
    assert ds.effective_reference_size(100, 100) == pytest.approx(50)


# --- numeric tests against scipy --------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 0.15, 0.5])
def test_ks_rank_and_wasserstein_match_scipy_on_exact_sketch(shift: float) -> None:
    rng = np.random.default_rng(7)
    ref = _f32(rng.normal(size=400))
    live = _f32(rng.normal(loc=shift, scale=1.2, size=300))
    cdf = ds.SketchCDF.from_sketch(_exact_sketch(ref))
    cmp = ds.compare_to_sketch(cdf, np.sort(live))

    ks = stats.ks_2samp(live, ref, method="asymp")
    assert cmp.ks == pytest.approx(ks.statistic, abs=1e-12)
    en = live.size * ref.size / (live.size + ref.size)
    assert cmp.ks_p == pytest.approx(stats.kstwobign.sf(np.sqrt(en) * ks.statistic), rel=1e-9)
    # The limiting distribution errs a little towards fewer alarms, never more.
    assert ks.pvalue <= cmp.ks_p
    assert np.log(cmp.ks_p) == pytest.approx(np.log(ks.pvalue), rel=0.05)

    mw = stats.mannwhitneyu(live, ref, method="asymptotic", use_continuity=False)
    assert cmp.auc == pytest.approx(mw.statistic / (live.size * ref.size), abs=1e-12)
    assert cmp.rank_p == pytest.approx(mw.pvalue, rel=1e-9)

    assert cmp.wasserstein == pytest.approx(stats.wasserstein_distance(live, ref), rel=1e-9)


def test_ks_and_rank_handle_ties_like_scipy() -> None:
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 6, size=500).astype(np.float64)
    live = rng.integers(1, 7, size=400).astype(np.float64)
    cmp = ds.compare_to_sketch(ds.SketchCDF.from_sketch(_exact_sketch(ref)), np.sort(live))
    assert cmp.ks == pytest.approx(stats.ks_2samp(live, ref).statistic, abs=1e-12)
    mw = stats.mannwhitneyu(live, ref, method="asymptotic", use_continuity=False)
    assert cmp.auc == pytest.approx(mw.statistic / (live.size * ref.size), abs=1e-12)
    assert cmp.rank_p == pytest.approx(mw.pvalue, rel=1e-9)
    assert cmp.wasserstein == pytest.approx(stats.wasserstein_distance(live, ref), rel=1e-9)


def test_wasserstein_on_real_sketch_matches_weighted_scipy() -> None:
    rng = np.random.default_rng(11)
    sketch = kll_floats_sketch(200)
    sketch.update(rng.gamma(2.0, size=30_000).astype(np.float32))
    items, weights = zip(*sketch, strict=True)
    live = _f32(rng.gamma(2.2, size=2_000))
    cmp = ds.compare_to_sketch(ds.SketchCDF.from_sketch(sketch), np.sort(live))
    expected = stats.wasserstein_distance(live, np.array(items), v_weights=np.array(weights))
    assert cmp.wasserstein == pytest.approx(expected, rel=1e-9)
    assert cmp.n_ref_eff < 30_000  # the sketch costs power, not false alarms


def test_sketch_reference_is_less_certain_than_exact_data() -> None:
    rng = np.random.default_rng(5)
    ref = rng.normal(size=50_000)
    live = _f32(rng.normal(0.08, size=5_000))
    sketch = kll_floats_sketch(200)
    sketch.update(ref.astype(np.float32))
    approx = ds.compare_to_sketch(ds.SketchCDF.from_sketch(sketch), np.sort(live))
    exact = ds.compare_to_sketch(ds.SketchCDF.from_values(ref), np.sort(live))
    assert approx.n_ref_eff < exact.n_ref_eff == 50_000
    assert approx.ks == pytest.approx(exact.ks, abs=0.02)
    # The same distance counts as weaker evidence against a sketch than against data.
    assert approx.ks_p > ds.ks_pvalue(approx.ks, live.size, 50_000)


def test_psi_by_hand() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=1_000)
    live = np.sort(_f32(rng.normal(0.3, size=800)))
    cdf = ds.SketchCDF.from_sketch(_exact_sketch(ref))
    edges, expected = ds.quantile_bins(cdf, 10)
    ref32 = np.sort(_f32(ref))
    assert edges == pytest.approx(ref32[[99, 199, 299, 399, 499, 599, 699, 799, 899]])
    assert expected == pytest.approx(np.full(10, 0.1))
    actual = ds.bin_shares(live, edges)
    hand_actual = [
        np.mean((live > lo) & (live <= hi))
        for lo, hi in zip([-np.inf, *edges], [*edges, np.inf], strict=True)
    ]
    assert actual == pytest.approx(hand_actual)
    hand_psi = sum((a - 0.1) * np.log(a / 0.1) for a in hand_actual)
    assert ds.psi(expected, actual) == pytest.approx(hand_psi)
    assert ds.psi(expected, expected) == 0.0
    assert np.isfinite(ds.psi([0.5, 0.5, 0.0], [0.4, 0.4, 0.2]))


def test_quantile_bins_collapse_on_discrete_feature() -> None:
    cdf = ds.SketchCDF.from_values(np.array([0.0] * 700 + [1.0] * 300))
    edges, expected = ds.quantile_bins(cdf, 10)
    assert edges.tolist() == [0.0, 1.0]
    assert expected == pytest.approx([0.7, 0.3, 0.0])


# --- categorical and null-rate tests against scipy ----------------------------------


def test_chi2_matches_chi2_contingency_and_drops_empty_columns() -> None:
    ref = np.array([500.0, 300.0, 200.0, 0.0])
    live = np.array([40.0, 35.0, 25.0, 0.0])
    stat, p = ds.chi2_test(ref, live)
    res = stats.chi2_contingency(np.array([ref[:3], live[:3]]), lambda_="cressie-read")
    assert (stat, p) == pytest.approx((res.statistic, res.pvalue))
    assert ds.chi2_test(np.array([10.0, 0.0]), np.array([5.0, 0.0])) == (0.0, 1.0)


def test_js_distance_matches_scipy() -> None:
    p, q = np.array([30.0, 50.0, 20.0]), np.array([10.0, 10.0, 5.0])
    assert ds.js_distance(p, q) == pytest.approx(jensenshannon(p / p.sum(), q / q.sum()))
    assert ds.js_distance(p, p * 3) == pytest.approx(0.0, abs=1e-7)


def test_sparse_categories_pool_into_other_using_baseline_only() -> None:
    ref = np.array([6000.0, 3000.0, 900.0, 90.0, 10.0, 0.0])  # last: "other"
    live = np.array([50.0, 30.0, 10.0, 9.0, 1.0, 0.0])
    pooled_ref, pooled_live = ds.pool_sparse_categories(ref, live, min_expected=5.0)
    # expected live counts: 60, 30, 9, 0.9, 0.1, 0 -> the last three pool, and
    # the pooled bin (expected 1) is still too small, so it joins the 900 bin.
    assert pooled_ref.tolist() == [6000.0, 3000.0, 1000.0]
    assert pooled_live.tolist() == [50.0, 30.0, 20.0]
    assert pooled_ref.sum() == ref.sum() and pooled_live.sum() == live.sum()


def _doubled_fisher(table: list[list[int]]) -> float:
    less = stats.fisher_exact(table, alternative="less").pvalue
    greater = stats.fisher_exact(table, alternative="greater").pvalue
    return min(1.0, 2 * min(less, greater))


@pytest.mark.parametrize(
    "ref_nulls,live_nulls", [(120, 30), (120, 12), (120, 2), (0, 100), (3, 0), (500, 40)]
)
def test_null_rate_test_is_doubled_fisher_exact(ref_nulls: int, live_nulls: int) -> None:
    p = ds.null_rate_test(ref_nulls, 10_000, live_nulls, 1_000)
    table = [[ref_nulls, 10_000 - ref_nulls], [live_nulls, 1_000 - live_nulls]]
    assert p == pytest.approx(_doubled_fisher(table), rel=1e-9, abs=1e-300)
    # Same conclusion as scipy's own two-sided Fisher: within a factor of two of it.
    two_sided = stats.fisher_exact(table).pvalue
    assert two_sided / 2 <= p <= 2 * two_sided + 1e-300
    assert ds.null_rate_test(0, 10_000, 0, 1_000) is None  # cannot reject: not a test
    assert ds.null_rate_test(0, 10_000, 1, 1_000) == pytest.approx(
        _doubled_fisher([[0, 10_000], [1, 999]])
    )


@pytest.mark.parametrize("method", ["bh", "by", "bonferroni", "holm"])
def test_adjust_pvalues(method: str) -> None:
    p = np.array([0.01, 0.04, 0.03, 0.2, 0.001])
    adjusted = ds.adjust_pvalues(p, method)
    if method in ("bh", "by"):
        assert adjusted == pytest.approx(stats.false_discovery_control(p, method=method))
    elif method == "bonferroni":
        assert adjusted == pytest.approx(np.minimum(1, p * 5))
    else:
        # Holm by hand: sorted p * (m - i), running max, capped at 1.
        order = np.argsort(p)
        steps = np.maximum.accumulate(p[order] * (5 - np.arange(5)))
        assert adjusted[order] == pytest.approx(np.minimum(1, steps))
    with pytest.raises(ValueError):
        ds.adjust_pvalues(p, "nope")


# --- window verdicts ----------------------------------------------------------------


def _frame(
    rng: np.random.Generator, n: int, shift: float = 0.0, cat_p: float = 0.3
) -> pd.DataFrame:
    data = {f"x{i}": rng.normal(size=n) for i in range(6)}
    data["x0"] = data["x0"] + shift
    data["income"] = rng.lognormal(3.0, 0.5, size=n)
    data["count"] = rng.poisson(3.0, size=n).astype(np.int64)
    data["city"] = rng.choice(["a", "b", "c"], size=n, p=[cat_p, 0.5, 0.5 - cat_p])
    data["flag"] = rng.random(n) < 0.2
    return pd.DataFrame(data)


@pytest.fixture(scope="module")
def profile() -> dict:
    rng = np.random.default_rng(2024)
    train = _frame(rng, 20_000)
    return build_profile(train, predictions=train["x1"] + train["x2"])


def test_unchanged_windows_do_not_drift(profile: dict) -> None:
    rng = np.random.default_rng(99)
    alarms = 0
    for _ in range(20):
        w = _frame(rng, 1_000)
        alarms += evaluate_window(profile, w, w["x1"] + w["x2"]).drifted
    # KLL sketches compact with their own random bits, so the profile differs
    # between runs; at a false-alarm rate well under 1%, two alarms in 20
    # windows happen in fewer than 1 run in 50.
    assert alarms <= 1


def test_shifted_feature_is_flagged_and_only_it(profile: dict) -> None:
    w = _frame(np.random.default_rng(5), 1_000, shift=0.3)
    report = evaluate_window(profile, w)
    assert report.drifted
    assert report.drifted_features == ["x0"]
    assert report.reasons == ["distribution:x0"]
    dist = report.features["x0"].distribution
    assert dist is not None and dist.significant and dist.material
    assert dist.effect["wasserstein_norm"] == pytest.approx(0.3, abs=0.1)


def test_category_shift_is_flagged(profile: dict) -> None:
    w = _frame(np.random.default_rng(6), 1_000, cat_p=0.4)
    report = evaluate_window(profile, w)
    assert report.drifted_features == ["city"]
    assert report.features["city"].distribution.test == "chi2"


def test_prediction_drift_is_flagged(profile: dict) -> None:
    w = _frame(np.random.default_rng(8), 1_000)
    report = evaluate_window(profile, w, predictions=(w["x1"] + w["x2"]).to_numpy() + 0.5)
    assert report.drifted and report.reasons == ["distribution:__prediction__"]
    assert report.prediction is not None and report.prediction.drifted


def test_null_rise_is_flagged_and_nulls_are_counted(profile: dict) -> None:
    w = _frame(np.random.default_rng(9), 1_000).astype({"count": "float64"})
    w.loc[w.index[:100], "x3"] = np.nan
    w.loc[w.index[:100], "city"] = None
    report = evaluate_window(profile, w)
    assert sorted(report.reasons) == ["null_rate:city", "null_rate:x3"]
    x3 = report.features["x3"]
    assert (x3.nulls, x3.null_rate.baseline, x3.null_rate.live) == (100, 0.0, 0.1)
    assert not x3.distribution.drifted  # the 900 remaining values are unchanged


def test_schema_violations_are_counted_without_crashing(profile: dict) -> None:
    w = _frame(np.random.default_rng(10), 1_000).drop(columns=["x5"])
    w["x4"] = w["x4"].astype(object)
    w.loc[w.index[:7], "x4"] = "n/a"
    w.loc[w.index[7], "x4"] = np.inf
    w["surprise"] = 1
    report = evaluate_window(profile, w)
    assert report.schema.missing == ["x5"] and report.schema.extra == ["surprise"]
    assert report.schema.invalid_values == {"x4": 8}
    assert report.schema.violated and report.drifted
    x4 = report.features["x4"]
    assert (x4.invalid, x4.nulls) == (8, 0) and not x4.drifted
    assert "x5" not in report.features
    doubled = pd.concat([w, w[["x1"]]], axis=1)
    assert evaluate_window(profile, doubled).schema.extra == ["surprise", "x1"]
    tolerant = DriftConfig(max_invalid_share=0.01, extra_columns_violate=False)
    report = evaluate_window(profile, w.drop(columns=["surprise"]).assign(x5=0.0), config=tolerant)
    assert report.schema.invalid_values == {"x4": 8} and not report.schema.violated


def test_unseen_categories_are_reported(profile: dict) -> None:
    w = _frame(np.random.default_rng(12), 1_000)
    w.loc[w.index[:150], "city"] = "zurich"
    report = evaluate_window(profile, w)
    city = report.features["city"]
    assert city.unseen["unseen_rows"] == 150
    assert city.unseen["unseen_values"] == {"zurich": 150}
    assert city.drifted
    # Two stray rows are reported but are not a material change.
    w = _frame(np.random.default_rng(12), 1_000)
    w.loc[w.index[:2], "city"] = "zurich"
    city = evaluate_window(profile, w).features["city"]
    assert city.unseen["unseen_rows"] == 2 and not city.drifted


def test_values_outside_a_truncated_top_k_are_not_called_unseen() -> None:
    rng = np.random.default_rng(4)
    train = pd.DataFrame({"code": rng.integers(0, 80, size=8_000).astype(str)})
    profile = build_profile(train)
    assert profile["features"]["code"]["other"] > 0
    known_rare = [c for c in map(str, range(80)) if c not in profile["features"]["code"]["top"]]
    w = pd.DataFrame({"code": rng.choice(known_rare + ["new"], size=500)})
    unseen = evaluate_window(profile, w).features["code"].unseen
    assert unseen["unseen_rows"] == 0 and unseen["outside_top_rows"] == 500


def test_integer_categories_survive_float_conversion() -> None:
    train = pd.DataFrame({"grade": pd.Series([1, 2, 3] * 300, dtype=object)})
    w = pd.DataFrame({"grade": [1.0, 2.0, 3.0, np.nan] * 50})
    report = evaluate_window(build_profile(train), w)
    assert report.features["grade"].unseen["unseen_rows"] == 0
    assert report.features["grade"].nulls == 50


def test_report_is_plain_json(profile: dict) -> None:
    w = _frame(np.random.default_rng(13), 50).astype({"x1": object})
    w.loc[w.index[:3], "x1"] = "bad"
    w["x2"] = np.nan  # all null: nothing to test, still reported
    doc = evaluate_window(profile, w, predictions=np.zeros(50)).to_dict()
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text)["features"]["x2"]["distribution"] is None
    assert set(doc) >= {"drifted", "reasons", "features", "prediction", "schema", "correction"}


def test_small_window_skips_distribution_but_keeps_null_rate(profile: dict) -> None:
    w = _frame(np.random.default_rng(14), 10)
    report = evaluate_window(profile, w)
    assert all(f.distribution is None for f in report.features.values())
    # No nulls anywhere: no null-rate test either, so nothing spends alpha.
    assert report.correction["tests"] == 0 and not report.drifted
    w.loc[w.index[0], "x1"] = np.nan
    report = evaluate_window(profile, w)
    assert report.correction["tests"] == 1
    assert report.features["x1"].null_rate.p_value is not None


def test_large_window_does_not_flag_trivial_shift(profile: dict) -> None:
    # 50k rows make a 0.07-SD shift highly significant; the effect gate keeps it quiet.
    w = _frame(np.random.default_rng(15), 50_000, shift=0.07)
    report = evaluate_window(profile, w)
    dist = report.features["x0"].distribution
    assert dist.significant and not dist.material and not report.drifted


def test_prepared_baseline_is_cached_per_profile(profile: dict) -> None:
    prepared = prepare_baseline(profile)
    w = _frame(np.random.default_rng(16), 500)
    assert evaluate_window(prepared, w).to_dict() == evaluate_window(profile, w).to_dict()
    stats_ = profile["features"]["x1"]
    raw = base64.b64decode(stats_["kll"]["sketch"])
    assert prepared.columns["x1"].cdf.n == kll_floats_sketch.deserialize(raw).n
    assert numeric_baseline(profile, "x1").stats is stats_


def test_config_rejects_unknown_settings() -> None:
    with pytest.raises(ValueError):
        DriftConfig(correction="fdr")
    with pytest.raises(ValueError):
        DriftConfig(alpha=0.0)
