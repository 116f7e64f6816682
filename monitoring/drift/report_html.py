"""A window's drift report as one self-contained HTML page (inline CSS and SVG, no network).

Drifted features come first, then the rest by adjusted p-value. Each feature
gets a bar chart of baseline vs live shares (baseline quantile bins for numeric
features, categories for categorical ones) and the numbers of its tests.
"""

from __future__ import annotations

import html
import math
from datetime import UTC, datetime
from typing import Any

from monitoring.drift.evaluate import PREDICTION

BASELINE_COLOUR = "#9aa5b1"
LIVE_COLOUR = "#2f6fde"
DRIFT_COLOUR = "#d64545"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1f2933}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
.meta{color:#52606d;font-size:13px} .verdict{display:inline-block;padding:3px 10px;
border-radius:12px;color:#fff;font-weight:600;font-size:13px}
.drift{background:#d64545} .ok{background:#2f9e44}
table{border-collapse:collapse;font-size:13px;margin:6px 0} td,th{padding:4px 10px;
border-bottom:1px solid #e4e7eb;text-align:left} th{background:#f5f7fa}
.cards{display:flex;flex-wrap:wrap;gap:16px} .card{border:1px solid #e4e7eb;border-radius:8px;
padding:12px;width:460px;overflow-x:auto} .card table{width:100%;font-size:12px}
.card td,.card th{padding:3px 5px} .card.drifted{border-color:#d64545;box-shadow:0 0 0 1px #d64545}
.card h3{font-size:15px;margin:0 0 6px} .num{font-variant-numeric:tabular-nums}
.legend span{display:inline-block;width:10px;height:10px;margin:0 4px 0 10px}
code{background:#f5f7fa;padding:1px 4px;border-radius:3px}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
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
    return _e(value)


def _when(ts: float | None) -> str:
    if ts is None:
        return "–"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def bar_chart(plot: dict[str, Any], width: int = 440, height: int = 180) -> str:
    """Inline SVG: baseline (grey) and live (blue) share per bin."""
    bins = plot.get("bins") or []
    if not bins:
        return '<p class="meta">No baseline values to plot.</p>'
    base, live = plot["baseline"], plot["live"]
    top = max([*base, *live, 1e-9])
    left, bottom, chart_h = 64, 52, height - 62
    group = (width - left - 4) / len(bins)
    bar = max(1.0, group * 0.38)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="baseline vs live shares">',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width}" y2="{height - bottom}" '
        'stroke="#9aa5b1"/>',
    ]
    for frac in (0.5, 1.0):
        y = height - bottom - chart_h * frac
        parts.append(
            f'<text x="{left - 4}" y="{y + 3:.1f}" font-size="9" text-anchor="end" '
            f'fill="#52606d">{top * frac:.0%}</text>'
            f'<line x1="{left}" y1="{y:.1f}" x2="{width}" y2="{y:.1f}" stroke="#eef0f3"/>'
        )
    for i, label in enumerate(bins):
        x0 = left + i * group + group * 0.1
        for j, (share, colour, name) in enumerate(
            ((base[i], BASELINE_COLOUR, "baseline"), (live[i], LIVE_COLOUR, "live"))
        ):
            h = chart_h * share / top
            x = x0 + j * bar
            parts.append(
                f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bar:.1f}" '
                f'height="{h:.1f}" fill="{colour}"><title>{_e(label)}: {name} '
                f"{share:.1%}</title></rect>"
            )
        short = label if len(label) <= 18 else label[:17] + "…"
        lx = left + (i + 0.5) * group
        ly = height - bottom + 10
        parts.append(
            f'<text x="{lx:.1f}" y="{ly}" font-size="9" fill="#323f4b" text-anchor="end" '
            f'transform="rotate(-35 {lx:.1f} {ly})">{_e(short)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _feature_order(features: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def key(f: dict[str, Any]) -> tuple[int, float]:
        dist = f.get("distribution") or {}
        p = dist.get("p_adjusted")
        nulls = (f.get("null_rate") or {}).get("p_adjusted")
        best = min(x for x in (p, nulls, 2.0) if x is not None)
        return (0 if f.get("drifted") else 1, best)

    return sorted(features, key=key)


def _tests_table(feature: dict[str, Any]) -> str:
    rows = []
    dist = feature.get("distribution")
    if dist:
        effect = ", ".join(f"{_e(k)} {_num(v)}" for k, v in (dist.get("effect") or {}).items())
        rows.append(
            f"<tr><td>distribution ({_e(dist['test'])})</td><td class=num>{_num(dist['statistic'])}"
            f"</td><td class=num>{_num(dist['p_value'])}</td><td class=num>"
            f"{_num(dist.get('p_adjusted'))}</td><td>{effect}</td><td>"
            f"{'<b>drift</b>' if dist.get('drifted') else 'no'}</td></tr>"
        )
    else:
        rows.append('<tr><td>distribution</td><td colspan=5 class="meta">too few values</td></tr>')
    nr = feature.get("null_rate") or {}
    rows.append(
        f"<tr><td>null rate</td><td class=num>{_num(nr.get('baseline'))} → "
        f"{_num(nr.get('live'))}</td><td class=num>{_num(nr.get('p_value'))}</td><td class=num>"
        f"{_num(nr.get('p_adjusted'))}</td><td>change {_num(nr.get('change'))}</td><td>"
        f"{'<b>drift</b>' if nr.get('drifted') else 'no'}</td></tr>"
    )
    return (
        "<table><tr><th>test</th><th>statistic</th><th>p</th><th>p adj.</th><th>effect</th>"
        f"<th>verdict</th></tr>{''.join(rows)}</table>"
    )


def _card(feature: dict[str, Any], plot: dict[str, Any] | None) -> str:
    name = feature["name"]
    title = "prediction" if name == PREDICTION else name
    cls = "card drifted" if feature.get("drifted") else "card"
    facts = (
        f"{_e(feature['kind'])}; {feature['rows']} rows, {feature['nulls']} null, "
        f"{feature['invalid']} invalid"
    )
    unseen = feature.get("unseen") or {}
    extra = ""
    if unseen.get("unseen_rows"):
        values = ", ".join(_e(k) for k in list(unseen.get("unseen_values", {}))[:8])
        extra = f"<p class=meta>{unseen['unseen_rows']} rows of unseen categories: {values}</p>"
    chart = bar_chart(plot) if plot else ""
    return (
        f'<div class="{cls}"><h3>{_e(title)}{" — drift" if feature.get("drifted") else ""}</h3>'
        f"<p class=meta>{facts}</p>{chart}{extra}{_tests_table(feature)}</div>"
    )


def render_report(window: dict[str, Any], stored: dict[str, Any]) -> str:
    """The HTML page of one window.

    ``window`` holds the summary fields (model, version, window_index, rows,
    started_at, ended_at, closed_by, drifted, reasons, schema_violations);
    ``stored`` is the stored report document: {"drift": WindowReport.to_dict(),
    "plots": {...}, "violations": {...}}.
    """
    drift = stored.get("drift") or {}
    plots = stored.get("plots") or {}
    features = list((drift.get("features") or {}).values())
    if drift.get("prediction"):
        features.append(drift["prediction"])
    ordered = _feature_order(features)
    verdict = (
        '<span class="verdict drift">drift</span>'
        if window["drifted"]
        else '<span class="verdict ok">no drift</span>'
    )
    title = f"{window['model']} v{window['version']} — window {window['window_index']}"
    reasons = ", ".join(f"<code>{_e(r)}</code>" for r in window.get("reasons") or []) or "none"
    summary_rows = "".join(
        f"<tr><td>{'prediction' if f['name'] == PREDICTION else _e(f['name'])}</td>"
        f"<td>{_e(f['kind'])}</td><td>{'<b>yes</b>' if f.get('drifted') else 'no'}</td>"
        f"<td class=num>{_num((f.get('distribution') or {}).get('p_adjusted'))}</td>"
        f"<td>{_effect_text(f)}</td></tr>"
        for f in ordered
    )
    violations = stored.get("violations") or {}
    schema = drift.get("schema") or {}
    schema_html = (
        f"<p>missing columns: {_e(', '.join(schema.get('missing', [])) or 'none')}; extra columns: "
        f"{_e(', '.join(schema.get('extra', [])) or 'none')}; violations: "
        f"{_e(', '.join(f'{k} {v}' for k, v in violations.items() if v) or 'none')}</p>"
    )
    correction = drift.get("correction") or {}
    cards = "".join(_card(f, plots.get(f["name"])) for f in ordered)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>
<style>{CSS}</style></head><body>
<h1>{_e(title)} {verdict}</h1>
<p class="meta">{window["rows"]} rows captured {_when(window.get("started_at"))} –
{_when(window.get("ended_at"))}; closed by {_e(window.get("closed_by"))}.
Tests: {correction.get("tests", 0)}, corrected with {_e(correction.get("method", "–"))} at
alpha {_num(correction.get("alpha"))}.</p>
<p>Reasons: {reasons}</p>
<h2>Features</h2>
<table><tr><th>feature</th><th>kind</th><th>drift</th><th>p adj.</th><th>effect</th></tr>
{summary_rows}</table>
<h2>Schema</h2>{schema_html}
<h2>Distributions</h2>
<p class="legend meta"><span style="background:{BASELINE_COLOUR}"></span>baseline (training)
<span style="background:{LIVE_COLOUR}"></span>live window</p>
<div class="cards">{cards}</div>
<p class="meta">Numeric bars are the baseline's decile bins; a feature drifts only when its
adjusted p-value is significant and its effect size passes the threshold (see docs/drift.md).</p>
</body></html>
"""


def _effect_text(feature: dict[str, Any]) -> str:
    dist = feature.get("distribution") or {}
    effect = dist.get("effect") or {}
    return ", ".join(f"{_e(k)} {_num(v)}" for k, v in effect.items()) or "–"
