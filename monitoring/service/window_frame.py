"""Turn stored capture rows into the DataFrame a drift test reads, counting what does not fit.

Captured inputs are raw request rows. The window's frame has the baseline's
columns (in the baseline's order) plus any extra ones the requests carried:

* a record whose body could not be read is a ``malformed_row`` violation and
  is left out (the rest of the window is still evaluated);
* a baseline column absent from a row is a ``missing_value`` violation and
  becomes NaN; absent from every row, the drift report lists it as missing;
* a key the baseline does not know is an ``extra_value`` violation (per cell)
  and stays in the frame, where the drift report lists it as an extra column;
* values that do not fit a numeric column are counted by the drift test itself
  (``invalid_value``, from the report's ``schema.invalid_values``).

Positional rows (keys "0", "1", ... from requests without column names) are
mapped onto the baseline's columns when their length matches, and are
``malformed_row`` violations when it does not.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from monitoring.capture.record import MalformedRecord
from monitoring.drift import stats as ds
from monitoring.drift.evaluate import (
    PREDICTION,
    CategoricalRef,
    NumericRef,
    PreparedBaseline,
    category_strings,
)
from monitoring.service.store import StoredRecord

MAX_CATEGORY_BARS = 12
VIOLATION_KINDS = ("malformed_row", "missing_value", "extra_value", "invalid_value")


@dataclass
class WindowInput:
    """A window's feature frame, its predictions, and the schema violations found on the way."""

    frame: pd.DataFrame
    predictions: list[Any] | None
    rows: int  # captured rows in the window, readable or not
    violations: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # a few error messages, for the report
    # What the callers were answered, one per frame row (labels or class probabilities),
    # or None when some row's answer is missing.
    answered: list[Any] | None = None


def build_window(
    records: list[StoredRecord], model: str, version: str, columns: list[str]
) -> WindowInput:
    """Parse stored records into a frame with the baseline's columns first."""
    violations: Counter[str] = Counter()
    examples: list[str] = []
    rows_out: list[dict[str, Any]] = []
    predictions: list[Any] = []
    all_scalar = True
    known = set(columns)

    def malformed(count: int, why: str) -> None:
        violations["malformed_row"] += count
        if len(examples) < 5:
            examples.append(why)

    for stored in records:
        if stored.error is not None:
            malformed(1, stored.error)
            continue
        record = stored.capture_record(model, version)
        try:
            rows = record.rows()
        except MalformedRecord as exc:  # stored before a stricter check: still counted
            malformed(max(1, stored.rows), str(exc))
            continue
        aligned = record.prediction_list(len(rows))
        for i, data in enumerate(rows):
            if data and not known.intersection(data) and _is_positional(data):
                if len(data) != len(columns):
                    malformed(1, f"row of {len(data)} unnamed values, expected {len(columns)}")
                    continue
                data = dict(zip(columns, data.values(), strict=True))
            violations["missing_value"] += sum(1 for c in columns if c not in data)
            violations["extra_value"] += sum(1 for k in data if k not in known)
            rows_out.append(data)
            if aligned is not None:
                value = aligned[i]
                if isinstance(value, dict | list):
                    all_scalar = False  # e.g. probabilities: not comparable with the baseline
                predictions.append(value)
    frame = pd.DataFrame.from_records(rows_out) if rows_out else pd.DataFrame(index=range(0))
    ordered = [c for c in columns if c in frame.columns]
    ordered += [c for c in frame.columns if c not in known]
    frame = frame.loc[:, ordered]
    usable = predictions if predictions and all_scalar else None
    rows_total = sum(r.rows for r in records)
    answered = predictions if predictions and len(predictions) == len(frame) else None
    return WindowInput(frame, usable, rows_total, violations, examples, answered)


def _is_positional(row: dict[str, Any]) -> bool:
    return all(key == str(i) for i, key in enumerate(row))


# --- data for the report's plots --------------------------------------------------------


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.3g}" if abs(x) < 1e5 else f"{x:.2e}"


def _numeric_plot(ref: NumericRef, series: pd.Series) -> dict[str, Any]:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    live = np.sort(ds.as_sketch_precision(values[np.isfinite(values)]))
    edges = ref.psi_edges
    if ref.cdf.empty:
        return {"kind": "numeric", "bins": [], "baseline": [], "live": [], "live_count": 0}
    if edges.size == 0:
        labels = ["all values"]
    else:
        labels = [f"≤ {_fmt(edges[0])}"]
        labels += [f"{_fmt(a)} – {_fmt(b)}" for a, b in zip(edges[:-1], edges[1:], strict=True)]
        labels.append(f"> {_fmt(edges[-1])}")
    shares = ds.bin_shares(live, edges) if live.size else np.zeros(len(labels))
    return {
        "kind": "numeric",
        "bins": labels,
        "baseline": [float(x) for x in ref.psi_expected],
        "live": [float(x) for x in shares],
        "live_count": int(live.size),
    }


def _categorical_plot(ref: CategoricalRef, series: pd.Series) -> dict[str, Any]:
    names = list(ref.index)
    base = ref.counts[:-1]
    order = sorted(range(len(names)), key=lambda i: -base[i])[:MAX_CATEGORY_BARS]
    shown = [names[i] for i in order]
    base_total = float(ref.counts.sum()) or 1.0
    baseline = [float(base[i]) / base_total for i in order]
    counts = category_strings(series).value_counts()
    live_total = float(counts.sum())
    live = [float(counts.get(name, 0)) / live_total if live_total else 0.0 for name in shown]
    bins = list(shown)
    other_base = 1.0 - sum(baseline)
    other_live = 1.0 - sum(live) if live_total else 0.0
    if other_base > 1e-9 or other_live > 1e-9:
        bins.append("(other)")
        baseline.append(max(0.0, other_base))
        live.append(max(0.0, other_live))
    return {
        "kind": "categorical",
        "bins": bins,
        "baseline": baseline,
        "live": live,
        "live_count": int(live_total),
    }


def _plot(ref: NumericRef | CategoricalRef, series: pd.Series) -> dict[str, Any]:
    if isinstance(ref, NumericRef):
        return _numeric_plot(ref, series)
    return _categorical_plot(ref, series)


def plot_data(baseline: PreparedBaseline, window: WindowInput) -> dict[str, dict[str, Any]]:
    """Baseline vs live shares per feature (quantile bins or categories), for the report."""
    plots = {
        name: _plot(ref, window.frame[name])
        for name, ref in baseline.columns.items()
        if name in window.frame.columns
    }
    if baseline.prediction is not None and window.predictions is not None:
        plots[PREDICTION] = _plot(baseline.prediction, pd.Series(window.predictions))
    return plots
