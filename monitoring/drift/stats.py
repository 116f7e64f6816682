"""Statistics for drift detection against a baseline profile (pure functions, no I/O).

The baseline keeps numeric features as KLL sketches, not raw values, so the
numeric tests here compare a live sample with a *weighted step CDF* built from
the sketch's retained items. Everything else delegates to scipy.

Null distribution of the numeric tests
--------------------------------------
The baseline is itself a sample of ``n_ref`` training values, summarised by a
sketch that adds its own rank error. Treating the sketch CDF as the exact
population CDF (a one-sample test) would ignore both and raise false alarms on
large windows, so the tests are two-sample tests with an *effective* reference
size ``m``:

* a KLL sketch in estimation mode has a maximum rank error ``eps``
  (``normalized_rank_error``, an empirical 99th percentile). A uniform sample of
  ``s`` values has a 99th-percentile maximum CDF error of
  ``kstwobign.isf(0.01) / sqrt(s)``, so the sketch carries about
  ``s = (kstwobign.isf(0.01) / eps) ** 2`` values' worth of information
  (about 15 000 for k=200);
* sampling and sketch errors add in variance: ``1/m = 1/n_ref + 1/s``
  (``m = n_ref`` when the sketch is exact).

KS uses the limiting Kolmogorov distribution at ``sqrt(n*m/(n+m)) * D``
(slightly conservative against ``scipy.stats.ks_2samp``). The rank test is the Mann-Whitney
normal approximation with ``m`` reference values and a tie correction from the
pooled sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from datasketches import kll_floats_sketch
from scipy.spatial.distance import jensenshannon
from scipy.special import kolmogorov, ndtr
from scipy.stats import (
    chi2_contingency,
    false_discovery_control,
    hypergeom,
    kstwobign,
)

# Confidence level that the KLL library's rank-error bound refers to.
_SKETCH_ERROR_CONFIDENCE = 0.99
_KS_CRITICAL_99 = float(kstwobign.isf(1.0 - _SKETCH_ERROR_CONFIDENCE))


def sketch_effective_size(sketch: kll_floats_sketch) -> float:
    """How many exact values a KLL sketch is worth for CDF comparisons (inf if exact)."""
    if sketch.is_empty() or not sketch.is_estimation_mode():
        return float("inf")
    eps = sketch.normalized_rank_error(False)
    return (_KS_CRITICAL_99 / eps) ** 2


def effective_reference_size(n_ref: int, sketch_size: float) -> float:
    """Reference size with sampling and sketch error combined: ``1/m = 1/n + 1/s``."""
    if n_ref <= 0:
        return 0.0
    if not np.isfinite(sketch_size):
        return float(n_ref)
    return 1.0 / (1.0 / n_ref + 1.0 / sketch_size)


def as_sketch_precision(values: np.ndarray) -> np.ndarray:
    """Round live values to float32 as the training sketch did, so ties stay ties."""
    f32 = np.finfo(np.float32).max  # beyond it float32 has only infinity
    values = np.clip(np.asarray(values, dtype=np.float64), -f32, f32)
    return values.astype(np.float32).astype(np.float64)


@dataclass(frozen=True)
class SketchCDF:
    """A KLL sketch as a weighted step CDF over its retained items.

    ``items`` are sorted and unique; ``cum[i]`` is the fraction of the
    summarised values that are ``<= items[i]`` (the sketch's inclusive CDF).
    """

    items: np.ndarray
    cum: np.ndarray
    n: int
    effective_size: float

    @classmethod
    def from_sketch(cls, sketch: kll_floats_sketch) -> SketchCDF:
        """Extract items and weights once; the sketch is not needed afterwards."""
        pairs = list(sketch)
        raw = np.fromiter((p[0] for p in pairs), dtype=np.float64, count=len(pairs))
        weights = np.fromiter((p[1] for p in pairs), dtype=np.float64, count=len(pairs))
        # The same value may be retained at several levels; merge so CDF steps are unique.
        items, inverse = np.unique(raw, return_inverse=True)
        merged = np.bincount(inverse, weights=weights, minlength=items.size)
        total = merged.sum()
        cum = np.cumsum(merged) / total if total > 0 else merged
        return cls(items, cum, int(sketch.n), sketch_effective_size(sketch))

    @classmethod
    def from_values(cls, values: np.ndarray) -> SketchCDF:
        """An exact CDF of raw values (rounded like a sketch), for tests and small baselines."""
        items, counts = np.unique(as_sketch_precision(values), return_counts=True)
        return cls(items, np.cumsum(counts) / counts.sum(), int(counts.sum()), float("inf"))

    @property
    def empty(self) -> bool:
        """True when the sketch summarised no values."""
        return self.items.size == 0

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """Fraction of reference values ``<= x``."""
        return np.concatenate(([0.0], self.cum))[np.searchsorted(self.items, x, side="right")]

    def cdf_left(self, x: np.ndarray) -> np.ndarray:
        """Fraction of reference values ``< x``."""
        return np.concatenate(([0.0], self.cum))[np.searchsorted(self.items, x, side="left")]

    def quantiles(self, ranks: np.ndarray) -> np.ndarray:
        """Smallest item whose inclusive CDF reaches each rank (KLL's inclusive quantile)."""
        idx = np.searchsorted(self.cum, np.asarray(ranks, dtype=np.float64), side="left")
        return self.items[np.minimum(idx, self.items.size - 1)]


@dataclass(frozen=True)
class NumericComparison:
    """Raw two-sample statistics of a live sample against a sketch CDF."""

    ks: float  # sup |F_live - F_ref|
    ks_p: float
    auc: float  # P(live > ref) + P(live == ref) / 2; 0.5 when unchanged
    rank_p: float
    wasserstein: float  # integral |F_live - F_ref| dx, in the feature's units
    n_ref_eff: float


def ks_pvalue(d: float, n: int, m: float) -> float:
    """Two-sided two-sample KS p-value from the limiting Kolmogorov distribution.

    ``P(K > sqrt(n m / (n + m)) D)``. At finite sizes it is slightly larger than
    the exact value (``kstwo``, which ``ks_2samp(method="asymp")`` uses), so it
    errs towards fewer alarms, and it costs microseconds instead of a millisecond.
    """
    en = n * m / (n + m) if np.isfinite(m) else float(n)
    return float(kolmogorov(np.sqrt(en) * d))


def rank_pvalue(auc: float, n: int, m: float, tie_factor: float = 1.0) -> float:
    """Two-sided Mann-Whitney normal-approximation p-value for ``auc = U / (n m)``."""
    if not np.isfinite(m):
        # Exact reference: the variance reduces to the one-sample (probability integral) case.
        var = tie_factor / (12.0 * n)
    else:
        var = tie_factor * (n + m + 1.0) / (12.0 * n * m)
    if var <= 0:
        return 1.0
    return float(2.0 * ndtr(-abs(auc - 0.5) / np.sqrt(var)))


def compare_to_sketch(ref: SketchCDF, live_sorted: np.ndarray) -> NumericComparison:
    """KS, Mann-Whitney and Wasserstein of sorted live values against a sketch CDF.

    Both CDFs are right-continuous steps that only jump at reference items or live
    values, so evaluating them at those points gives the exact supremum and the
    exact integral. Each side is evaluated at its own points with a cheap lookup
    into the other side, instead of searching a merged grid.
    """
    n = live_sorted.size
    first = np.concatenate(([True], live_sorted[1:] != live_sorted[:-1]))
    values = live_sorted[first]
    counts = np.diff(np.append(np.flatnonzero(first), n))
    f_live_at_values = np.cumsum(counts) / n
    ref_at_values = ref.cdf(values)
    diff_at_values = f_live_at_values - ref_at_values
    diff_at_items = np.searchsorted(live_sorted, ref.items, side="right") / n - ref.cum
    ks = float(max(np.abs(diff_at_values).max(), np.abs(diff_at_items).max(initial=0.0)))

    points = np.concatenate((values, ref.items))
    diffs = np.concatenate((diff_at_values, diff_at_items))
    order = np.argsort(points, kind="stable")
    # A value present on both sides appears twice with the same difference; the
    # zero-width step between the copies adds nothing.
    wasserstein = float(np.sum(np.abs(diffs[order][:-1]) * np.diff(points[order])))

    ref_left = ref.cdf_left(values)
    auc = float(np.dot(counts, 0.5 * (ref_left + ref_at_values)) / n)

    m = effective_reference_size(ref.n, ref.effective_size)
    tie_factor = _tie_factor(ref, values, counts, ref_at_values - ref_left, m)
    return NumericComparison(
        ks=ks,
        ks_p=ks_pvalue(ks, n, m),
        auc=auc,
        rank_p=rank_pvalue(auc, n, m, tie_factor),
        wasserstein=wasserstein,
        n_ref_eff=m,
    )


def _tie_factor(
    ref: SketchCDF, values: np.ndarray, counts: np.ndarray, ref_mass: np.ndarray, m: float
) -> float:
    """Mann-Whitney tie correction ``1 - sum(T^3 - T) / (N^3 - N)``, pooled over both sides.

    ``T`` is the pooled count of each distinct value: live count plus ``m`` times
    the reference mass there. Pooling matters: estimating ties from the live
    window alone understates the variance when the window itself is unusual,
    which makes the test too eager on small windows of discrete features.
    """
    item_mass = np.diff(np.concatenate(([0.0], ref.cum)))
    idx = np.minimum(np.searchsorted(values, ref.items), values.size - 1)
    ref_only = item_mass[values[idx] != ref.items]
    pooled = np.concatenate((counts + m * ref_mass, m * ref_only))
    total = float(counts.sum()) + m
    return float(1.0 - np.sum(pooled**3 - pooled) / (total**3 - total))


def quantile_bins(ref: SketchCDF, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Inner bin edges at the reference quantiles and the reference share of each bin.

    Bins are ``(-inf, e1], (e1, e2], ..., (ek, inf)``. Edges are de-duplicated, so
    discrete features get fewer, uneven bins; shares come from the sketch CDF.
    """
    ranks = np.arange(1, bins) / bins
    edges = np.unique(ref.quantiles(ranks))
    return edges, np.diff(np.concatenate(([0.0], ref.cdf(edges), [1.0])))


def bin_shares(live_sorted: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Share of sorted live values in each bin defined by :func:`quantile_bins`."""
    below = np.searchsorted(live_sorted, edges, side="right")
    return np.diff(np.concatenate(([0], below, [live_sorted.size]))) / live_sorted.size


def psi(expected: np.ndarray, actual: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index; shares are floored at ``eps`` so empty bins stay finite."""
    e = np.clip(np.asarray(expected, dtype=np.float64), eps, None)
    a = np.clip(np.asarray(actual, dtype=np.float64), eps, None)
    return float(np.sum((a - e) * np.log(a / e)))


def pool_sparse_categories(
    ref_counts: np.ndarray, live_counts: np.ndarray, min_expected: float
) -> tuple[np.ndarray, np.ndarray]:
    """Merge categories too rare for the chi-square approximation.

    The last column is the "other" bucket. A category whose expected live count
    under the baseline (``n_live * ref share``) is below ``min_expected`` joins
    "other"; if "other" is still too small it joins the smallest kept category.
    Pooling depends only on the baseline and the window size, never on the live
    counts, so it cannot bias the test. Without it, a handful of rows in a
    category the baseline barely saw gives p-values off by orders of magnitude.
    """
    ref = np.asarray(ref_counts, dtype=np.float64)
    live = np.asarray(live_counts, dtype=np.float64)
    n_live, n_ref = live.sum(), ref.sum()
    if n_ref <= 0:
        return ref, live
    expected = n_live * ref / n_ref
    keep = expected[:-1] >= min_expected
    pooled_ref = np.append(ref[:-1][keep], ref[:-1][~keep].sum() + ref[-1])
    pooled_live = np.append(live[:-1][keep], live[:-1][~keep].sum() + live[-1])
    if pooled_ref.size > 1 and n_live * pooled_ref[-1] / n_ref < min_expected:
        smallest = int(np.argmin(pooled_ref[:-1]))
        pooled_ref[smallest] += pooled_ref[-1]
        pooled_live[smallest] += pooled_live[-1]
        pooled_ref, pooled_live = pooled_ref[:-1], pooled_live[:-1]
    return pooled_ref, pooled_live


def chi2_test(ref_counts: np.ndarray, live_counts: np.ndarray) -> tuple[float, float]:
    """Contingency test of baseline vs live counts; ``(statistic, p)``.

    Both rows are samples, so scipy's ``chi2_contingency`` (not a goodness-of-fit
    test against fixed baseline proportions) gives the right null distribution.
    It uses the Cressie-Read power-divergence statistic (lambda 2/3), whose
    chi-square tail stays close to nominal at the small corrected levels used
    here; Pearson's X^2 runs up to about twice too many rejections there when
    expected counts are in the tens.
    """
    table = np.vstack([ref_counts, live_counts])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return 0.0, 1.0
    res = chi2_contingency(table, lambda_="cressie-read")
    return float(res.statistic), float(res.pvalue)


def js_noise_floor(bins: int, n_ref: float, n_live: float) -> float:
    """Typical JS distance between two samples of one distribution over ``bins`` bins.

    ``JSD ~ chi2 / 8`` per unit of ``1/n_ref + 1/n_live`` for small differences,
    and ``E[chi2] = bins - 1``; useful to read a JS distance from a small window.
    """
    if bins < 2 or n_ref <= 0 or n_live <= 0:
        return 0.0
    return float(np.sqrt((bins - 1) * (1.0 / n_ref + 1.0 / n_live) / 8.0))


def js_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon distance (natural log, as scipy's default) of two count vectors."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    if p.sum() <= 0 or q.sum() <= 0:
        return 0.0
    return float(jensenshannon(p, q))


def null_rate_test(ref_nulls: int, ref_rows: int, live_nulls: int, live_rows: int) -> float | None:
    """Fisher's exact test that live and baseline null rates are equal (two-sided).

    Two-sided by doubling the smaller one-sided p-value (the one-sided tails are
    ``fisher_exact(alternative="less"/"greater")``); ``fisher_exact``'s own
    two-sided p sums the table probabilities and takes milliseconds at baseline
    sizes. None when neither side has a null (or both are all nulls): given those
    margins the test cannot reject, so it should not take a share of the family's
    alpha (Tarone's argument for discrete tests).
    """
    nulls = ref_nulls + live_nulls
    rows = ref_rows + live_rows
    if nulls == 0 or nulls == rows:
        return None
    # Live nulls given all margins are hypergeometric under "same null rate".
    at_most = hypergeom.cdf(live_nulls, rows, nulls, live_rows)
    at_least = hypergeom.sf(live_nulls - 1, rows, nulls, live_rows)
    return float(min(1.0, 2.0 * min(at_most, at_least)))


def adjust_pvalues(p_values: np.ndarray, method: str) -> np.ndarray:
    """Multiple-testing adjustment: ``bh``/``by`` (scipy) or ``bonferroni``/``holm``."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return p
    if method in ("bh", "by"):
        return false_discovery_control(p, method=method)
    m = p.size
    if method == "bonferroni":
        return np.minimum(1.0, p * m)
    if method == "holm":
        order = np.argsort(p)
        stepped = np.maximum.accumulate(np.minimum(1.0, p[order] * (m - np.arange(m))))
        out = np.empty_like(p)
        out[order] = stepped
        return out
    raise ValueError(f"unknown multiple-testing method {method!r}")
