"""A window's drift report as one self-contained HTML page (inline CSS and SVG, no network).

Drifted features come first, then the rest by adjusted p-value. Each feature
gets a bar chart of baseline vs live shares (baseline quantile bins for numeric
features, categories for categorical ones) and the numbers of its tests.

The markup is the Jinja2 template ``templates/report.html`` (its macros in
``templates/report_parts.html``), autoescaped; this module orders the features,
lays out the charts and formats the numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape

from monitoring.drift.evaluate import PREDICTION

BASELINE_COLOUR = "#9aa5b1"
LIVE_COLOUR = "#2f6fde"
DRIFT_COLOUR = "#d64545"

CHART_WIDTH = 440
CHART_HEIGHT = 180
# Room for the share axis on the left and the slanted bin labels at the bottom.
CHART_LEFT = 64
CHART_BOTTOM = 52
LABEL_CHARS = 18


def _num(value: Any, digits: int = 3) -> str:
    """A statistic for a table cell: "–" for none or non-finite, short scientific when tiny."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) >= 1 else f"{value:.{digits}f}"
    return str(value)  # escaped by the template


def _when(ts: float | None) -> str:
    if ts is None:
        return "–"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _feature_label(name: str) -> str:
    """The prediction's internal column name is shown as "prediction"."""
    return "prediction" if name == PREDICTION else name


_TEMPLATES = Environment(
    loader=PackageLoader("monitoring.drift"),
    autoescape=select_autoescape(),
    # Block tags on lines of their own leave no blank lines in the page.
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
)
_TEMPLATES.filters.update(num=_num, when=_when, feature_label=_feature_label, fmt=format)
_TEMPLATES.globals.update(baseline_colour=BASELINE_COLOUR, live_colour=LIVE_COLOUR)


# --- chart layout -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    """One bar of a chart: a share of the baseline or of the live window in one bin."""

    x: float
    y: float
    width: float
    height: float
    colour: str
    series: str  # "baseline" or "live"
    share: float


@dataclass(frozen=True)
class ChartBin:
    """A bin's two bars and its (shortened) label, centred at ``label_x``."""

    label: str
    short_label: str
    label_x: float
    bars: tuple[Bar, Bar]


@dataclass(frozen=True)
class Chart:
    """The layout of one inline SVG bar chart; no bins means nothing to plot."""

    width: int
    height: int
    left: int = 0
    axis_y: int = 0  # the baseline of the bars
    label_y: int = 0
    gridlines: tuple[tuple[float, float], ...] = ()  # (y, share it marks)
    bins: tuple[ChartBin, ...] = ()


def chart_layout(
    plot: dict[str, Any], width: int = CHART_WIDTH, height: int = CHART_HEIGHT
) -> Chart:
    """Where the bars of a plot (baseline grey, live blue, share per bin) go."""
    labels = plot.get("bins") or []
    if not labels:
        return Chart(width, height)
    base, live = plot["baseline"], plot["live"]
    top = max([*base, *live, 1e-9])
    left, axis_y, chart_h = CHART_LEFT, height - CHART_BOTTOM, height - 62
    group = (width - left - 4) / len(labels)
    bar = max(1.0, group * 0.38)
    gridlines = tuple((axis_y - chart_h * frac, top * frac) for frac in (0.5, 1.0))
    bins = []
    for i, label in enumerate(labels):
        x0 = left + i * group + group * 0.1
        pairs = ((base[i], BASELINE_COLOUR, "baseline"), (live[i], LIVE_COLOUR, "live"))
        bars = []
        for j, (share, colour, series) in enumerate(pairs):
            h = chart_h * share / top
            bars.append(Bar(x0 + j * bar, axis_y - h, bar, h, colour, series, share))
        short = label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"
        bins.append(ChartBin(label, short, left + (i + 0.5) * group, (bars[0], bars[1])))
    return Chart(width, height, left, axis_y, axis_y + 10, gridlines, tuple(bins))


# --- the page ---------------------------------------------------------------------------


def _feature_order(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(f: dict[str, Any]) -> tuple[int, float]:
        dist = f.get("distribution") or {}
        p = dist.get("p_adjusted")
        nulls = (f.get("null_rate") or {}).get("p_adjusted")
        best = min(x for x in (p, nulls, 2.0) if x is not None)
        return (0 if f.get("drifted") else 1, best)

    return sorted(features, key=key)


def render_report(window: dict[str, Any], stored: dict[str, Any]) -> str:
    """The HTML page of one window.

    ``window`` holds the summary fields (model, version, window_index, rows,
    started_at, ended_at, closed_by, drifted, reasons, schema_violations);
    ``stored`` is the stored report document: {"drift": WindowReport.to_dict(),
    "plots": {...}, "violations": {...}, "estimate": CBPE or None}, and "performance":
    the window's realized metrics from labels (added by the monitor when it renders).
    """
    drift = stored.get("drift") or {}
    plots = stored.get("plots") or {}
    features = list((drift.get("features") or {}).values())
    if drift.get("prediction"):
        features.append(drift["prediction"])
    ordered = _feature_order(features)
    correction = drift.get("correction") or {}
    schema = drift.get("schema") or {}
    cards = []
    for f in ordered:
        plot = plots.get(f["name"])
        cards.append((f, chart_layout(plot) if plot else None))
    return _TEMPLATES.get_template("report.html").render(
        title=f"{window['model']} v{window['version']} — window {window['window_index']}",
        drifted=window["drifted"],
        rows=window["rows"],
        started_at=window.get("started_at"),
        ended_at=window.get("ended_at"),
        closed_by=window.get("closed_by"),
        reasons=window.get("reasons") or [],
        tests=correction.get("tests", 0),
        method=correction.get("method", "–"),
        alpha=correction.get("alpha"),
        features=ordered,
        missing_columns=schema.get("missing", []),
        extra_columns=schema.get("extra", []),
        violations={k: v for k, v in (stored.get("violations") or {}).items() if v},
        cards=cards,
        performance=_performance_rows(stored),
        labelled_rows=(stored.get("performance") or {}).get("labelled_rows", 0),
        estimate_source=(stored.get("estimate") or {}).get("probabilities"),
    )


def _performance_rows(stored: dict[str, Any]) -> list[tuple[str, Any, Any, Any]]:
    """(metric, estimated, realized, test) rows of the report's performance table."""
    estimated = stored.get("estimate") or {}
    performance = stored.get("performance") or {}
    realized = performance.get("realized") or {}
    test = performance.get("test") or {}
    names = ("accuracy", "f1", "roc_auc", "rmse", "mae", "r2")
    return [
        (m, estimated.get(m), realized.get(m), test.get(m))
        for m in names
        if m in estimated or m in realized
    ]
