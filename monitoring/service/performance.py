"""Performance over time: realized from label feedback, estimated without labels (CBPE).

*Realized*: labels (``POST /feedback/{model}``, :mod:`monitoring.service.feedback_store`)
are joined with the predictions captured for the same rows. Per version and per
window (the drift windows: a label belongs to the window that holds its request;
labels of requests not in a closed window yet form the ``open`` window) the tracker
computes accuracy, F1 and ROC AUC (ROC AUC when the caller had asked for
probabilities) or RMSE, MAE and R², with the definitions of the version's own test
metrics (:mod:`monitoring.profile.performance`).

*Estimated*: when a window of a classifier closes, its rows are scored for class
probabilities (:mod:`monitoring.service.proba_scorer`) and CBPE turns those, through the
calibration fitted on the version's test split at training time, into the expected
accuracy and ROC AUC. It is stored with the window, so it is there before any label.

A version is *degraded* when the realized value of its compared metric in its latest
window with at least ``performance_min_rows`` labels is worse than its test value by
more than ``performance_margin``; the change fires a webhook, once, through the
alert outbox.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    Boolean,
    Column,
    Double,
    Integer,
    String,
    Table,
    and_,
    delete,
    insert,
    select,
    update,
)

from monitoring.profile.performance import (
    estimate_performance,
    realized_classification,
    realized_regression,
)
from monitoring.service.claims import Claims
from monitoring.service.feedback_store import FeedbackStore, LabelledPrediction
from monitoring.service.store import PREFIX, MonitorStore, WindowSpan, alerts, metadata

logger = logging.getLogger(__name__)

# Metrics that labels alone give (no probabilities needed): the others fall back to these.
LABEL_METRICS = {"classification": ("accuracy", "f1"), "regression": ("rmse", "mae", "r2")}
LOWER_IS_BETTER = {"rmse", "mae", "log_loss"}
EVENTS = ("performance_degraded", "performance_recovered")
OPEN = "open"

performance_state = Table(
    f"{PREFIX}performance_state",
    metadata,
    Column("model", String(255), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("degraded", Boolean, nullable=False),
    Column("since", Double, nullable=False),
    Column("metric", String(64), nullable=False),
    Column("realized", Double),
)

# The labelled rows each window's realized metrics were last logged to MLflow with: kept
# in the store, so that of several monitors sharing it only one logs each change.
performance_logged = Table(
    f"{PREFIX}performance_logged",
    metadata,
    Column("model", String(255), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("window_index", Integer, primary_key=True),
    Column("labelled_rows", Integer, nullable=False),
)


@dataclass(frozen=True)
class PerformanceSpec:
    """What training recorded about a version's performance (the baseline's section)."""

    task: str
    metric: str
    test: dict[str, float]
    classes: list[Any] | None
    calibration: dict[str, Any] | None

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> PerformanceSpec | None:
        """The spec of a baseline profile, or None for a profile written before it existed."""
        section = profile.get("performance")
        if not isinstance(section, dict) or section.get("task") not in LABEL_METRICS:
            return None
        return cls(
            task=section["task"],
            metric=str(section.get("metric") or ""),
            test={k: float(v) for k, v in (section.get("test") or {}).items()},
            classes=section.get("classes"),
            calibration=section.get("calibration"),
        )

    @property
    def compared_metric(self) -> str:
        """The metric the alert compares: the version's own when labels give it, else the
        first one they give (accuracy, say, for a model tuned on ROC AUC)."""
        if self.metric in LABEL_METRICS[self.task]:
            return self.metric
        return LABEL_METRICS[self.task][0]

    def worse_by(self, realized: dict[str, float]) -> float | None:
        """How much worse than its test value the compared metric is (negative: better)."""
        metric = self.compared_metric
        if metric not in realized or metric not in self.test:
            return None
        gap = self.test[metric] - realized[metric]
        return -gap if metric in LOWER_IS_BETTER else gap


def split_prediction(value: Any, classes: Sequence[Any] | None) -> tuple[Any, list[float] | None]:
    """(the predicted label, the class probabilities or None) of one captured prediction.

    A classifier answers a label, or, asked with ``predict_method=predict_proba``, one
    probability per class (``{"0": 0.2, "1": 0.8}``): its label is the likeliest class.
    """
    if isinstance(value, dict) and classes:
        try:
            proba = [float(value[str(c)]) for c in classes]
        except (KeyError, TypeError, ValueError):
            return None, None
        return classes[int(np.argmax(proba))], proba
    if isinstance(value, list) and len(value) == 1:
        return value[0], None
    return value, None


def window_proba(predictions: Sequence[Any], classes: Sequence[Any]) -> np.ndarray | None:
    """The probabilities the callers were answered, when every row has them, else None."""
    rows = [split_prediction(p, classes)[1] for p in predictions]
    if not rows or any(r is None for r in rows):
        return None
    return np.asarray(rows, dtype=float)


ProbaSource = Callable[[str, str, pd.DataFrame, list[Any]], "np.ndarray | None"]


def estimate_window(
    spec: PerformanceSpec | None,
    model: str,
    version: str,
    frame: pd.DataFrame,
    predictions: Sequence[Any],
    score: ProbaSource | None,
) -> dict[str, Any] | None:
    """The CBPE estimate of a closing window of a classifier, or None.

    Probabilities come from the captured answers when callers asked for them, else
    from ``score`` (the version itself, in a sandboxed worker).
    """
    if spec is None or spec.task != "classification" or not spec.calibration or not spec.classes:
        return None
    proba = window_proba(predictions, spec.classes)
    source = "captured"
    if proba is None and score is not None and len(frame):
        proba, source = score(model, version, frame, list(spec.classes)), "scored"
    if proba is None or len(proba) == 0:
        return None
    try:
        estimate = estimate_performance(spec.calibration, proba)
    except (ValueError, KeyError, IndexError) as exc:
        logger.warning("no CBPE estimate for %s/%s: %s", model, version, exc)
        return None
    return {"method": "cbpe", "rows": int(len(proba)), "probabilities": source, **estimate}


def realized(spec: PerformanceSpec | None, pairs: Sequence[LabelledPrediction]) -> dict[str, float]:
    """The realized metrics of labelled predictions (the task from the spec, else guessed)."""
    if not pairs:
        return {}
    classes = spec.classes if spec else None
    task = spec.task if spec else _guess_task(pairs)
    if task == "regression":
        good = [p for p in pairs if _finite(p.prediction) and _finite(p.label)]
        return realized_regression([p.label for p in good], [float(p.prediction) for p in good])
    split = [split_prediction(p.prediction, classes) for p in pairs]
    labels = [p.label for p in pairs]
    predicted = [s[0] for s in split]
    with_proba = classes and all(s[1] is not None for s in split)
    proba = np.asarray([s[1] for s in split]) if with_proba else None
    return realized_classification(
        np.asarray(labels, dtype=object), np.asarray(predicted, dtype=object), proba, classes or []
    )


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def _guess_task(pairs: Sequence[LabelledPrediction]) -> str:
    # A baseline from before the performance section: floats that are not all whole
    # numbers are a regression's values.
    values = [p.prediction for p in pairs[:100]]
    numeric = all(_finite(v) for v in values)
    whole = numeric and all(float(v).is_integer() for v in values)
    return "regression" if numeric and not whole else "classification"


@dataclass
class WindowPerformance:
    """One window's labelled rows, realized metrics and estimate."""

    window: WindowSpan | None  # None: the open window
    pairs: list[LabelledPrediction]

    def to_dict(self, spec: PerformanceSpec | None) -> dict[str, Any]:
        """The JSON of ``GET /performance/{model}``."""
        w = self.window
        return {
            "window_id": w.id if w else None,
            "window_index": w.window_index if w else OPEN,
            "started_at": w.started_at if w else None,
            "ended_at": w.ended_at if w else None,
            "rows": w.rows if w else None,
            "labelled_rows": len(self.pairs),
            "realized": realized(spec, self.pairs),
            "estimated": w.estimate if w else None,
        }


def by_window(spans: list[WindowSpan], pairs: list[LabelledPrediction]) -> list[WindowPerformance]:
    """Each window with the labels of its requests, oldest first; the open one last."""
    starts = [s.first_record_id for s in spans]
    groups: dict[int, list[LabelledPrediction]] = {}
    for pair in pairs:
        at = bisect.bisect_right(starts, pair.record_pk) - 1
        inside = at >= 0 and pair.record_pk <= spans[at].last_record_id
        groups.setdefault(at if inside else -1, []).append(pair)
    out = [WindowPerformance(span, groups.get(i, [])) for i, span in enumerate(spans)]
    if -1 in groups:
        out.append(WindowPerformance(None, groups[-1]))
    return out


class PerformanceTracker:
    """Realized and estimated performance per version and window: views, gauges, MLflow
    metrics and the degraded/recovered alerts."""

    def __init__(
        self,
        store: MonitorStore,
        feedback: FeedbackStore,
        spec_of: Callable[[str, str], PerformanceSpec | None],
        margin: float,
        min_rows: int,
        claims: Claims | None = None,
    ) -> None:
        self.store = store
        self.feedback = feedback
        self.spec_of = spec_of
        self.margin = margin
        self.min_rows = min_rows
        self.claims = claims or Claims(store)
        performance_state.create(store.engine, checkfirst=True)
        performance_logged.create(store.engine, checkfirst=True)
        self._seen: dict[str, float] = {}  # model -> last label change handled
        self._lock = threading.Lock()

    def view(self, model: str) -> dict[str, Any] | None:
        """``GET /performance/{model}``: per version, overall and per window; None if the
        model has neither labels nor captured traffic."""
        pairs = self.feedback.labelled(model)
        counts = self.feedback.counts(model)
        stream_versions = {s.version for s in self.store.streams() if s.model == model}
        versions = sorted(stream_versions | {p.version for p in pairs}, key=_version_key)
        if not versions and not counts["unknown"]:
            return None
        by_version: dict[str, list[LabelledPrediction]] = {}
        for pair in pairs:
            by_version.setdefault(pair.version, []).append(pair)
        return {
            "model": model,
            "margin": self.margin,
            "min_rows": self.min_rows,
            "labels": counts,
            "versions": [self._version_view(model, v, by_version.get(v, [])) for v in versions],
        }

    def _version_view(
        self, model: str, version: str, pairs: list[LabelledPrediction]
    ) -> dict[str, Any]:
        spec = self.spec_of(model, version)
        windows = by_window(self.store.window_spans(model, version), pairs)
        overall = realized(spec, pairs)
        decision = self._decision(spec, windows)
        return {
            "version": version,
            "task": spec.task if spec else None,
            "metric": spec.compared_metric if spec else None,
            "test": spec.test if spec else None,
            "labelled_rows": len(pairs),
            "realized": overall,
            "estimated": _latest_estimate(windows),
            "degraded": decision["degraded"] if decision else False,
            "decided_by": decision,
            "windows": [w.to_dict(spec) for w in windows],
        }

    def window_performance(self, model: str, version: str, window_id: int) -> dict[str, Any] | None:
        """One window's labelled rows, realized metrics and estimate (for its report)."""
        spans = self.store.window_spans(model, version)
        span = next((s for s in spans if s.id == window_id), None)
        if span is None:
            return None
        pairs = [
            p
            for p in self.feedback.labelled(model)
            if p.version == version and span.first_record_id <= p.record_pk <= span.last_record_id
        ]
        spec = self.spec_of(model, version)
        out = WindowPerformance(span, pairs).to_dict(spec)
        out["test"] = spec.test if spec else None
        return out

    def _decision(
        self, spec: PerformanceSpec | None, windows: list[WindowPerformance]
    ) -> dict[str, Any] | None:
        """The latest window with enough labels, and whether it is worse than the test."""
        if spec is None:
            return None
        for w in reversed(windows):
            if len(w.pairs) < self.min_rows:
                continue
            values = realized(spec, w.pairs)
            gap = spec.worse_by(values)
            if gap is None:
                continue
            metric = spec.compared_metric
            return {
                "window_index": w.window.window_index if w.window else OPEN,
                "window_id": w.window.id if w.window else None,
                "labelled_rows": len(w.pairs),
                "metric": metric,
                "realized": values[metric],
                "test": spec.test[metric],
                "worse_by": gap,
                "degraded": gap > self.margin,
            }
        return None

    # --- the loop step ---------------------------------------------------------------------

    def refresh(
        self,
        now: float | None = None,
        on_version: Callable[[str, dict[str, Any]], None] | None = None,
        alert_bodies: Callable[[str, str, dict[str, Any]], list[tuple[str, str]]] | None = None,
    ) -> int:
        """Join newly captured labels, then re-evaluate every model whose labels changed:
        ``on_version(model, version_view)`` (gauges, MLflow), and the alert outbox on a
        change of the degraded state. Returns how many models were re-evaluated."""
        now = time.time() if now is None else now
        self.feedback.match(now)
        done = 0
        with self._lock:
            for model in self.feedback.models():
                changed = self.feedback.last_change(model)
                if self._seen.get(model) == changed:
                    continue
                # Under the model's claim, the view is read after any other monitor's
                # settled state, so a stale view never overturns a fresher one; when
                # another monitor holds it, this one comes back at its next pass.
                with self.claims.hold("performance", model) as held:
                    if not held:
                        continue
                    view = self.view(model)
                    for version in (view or {}).get("versions", []):
                        if on_version is not None:
                            on_version(model, version)
                        self._settle(model, version, now, alert_bodies)
                self._seen[model] = changed
                done += 1
        return done

    def logged_rows(self, model: str, version: str) -> dict[int, int]:
        """Window index -> the labelled rows its realized metrics were logged with."""
        p = performance_logged.c
        query = select(p.window_index, p.labelled_rows).where(
            and_(p.model == model, p.version == version)
        )
        with self.store.engine.connect() as conn:
            return {int(i): int(n) for i, n in conn.execute(query)}

    def mark_logged(self, model: str, version: str, steps: list[tuple[int, int]]) -> None:
        """Remember that these (window index, labelled rows) are in MLflow."""
        p = performance_logged.c
        with self.store.write() as conn:
            indexes = [i for i, _ in steps]
            conn.execute(
                delete(performance_logged).where(
                    and_(p.model == model, p.version == version, p.window_index.in_(indexes))
                )
            )
            conn.execute(
                insert(performance_logged),
                [
                    {"model": model, "version": version, "window_index": i, "labelled_rows": n}
                    for i, n in steps
                ],
            )

    def _settle(
        self,
        model: str,
        version: dict[str, Any],
        now: float,
        alert_bodies: Callable[[str, str, dict[str, Any]], list[tuple[str, str]]] | None,
    ) -> None:
        """Store the version's degraded state; on a change, queue its alert in the same
        transaction, so a restart neither repeats nor loses it."""
        decision = version["decided_by"]
        if decision is None:
            return
        s = performance_state.c
        key = and_(s.model == model, s.version == version["version"])
        with self.store.write() as conn:
            before = conn.execute(select(s.degraded).where(key)).scalar()
            degraded = bool(decision["degraded"])
            values = {
                "degraded": degraded,
                "metric": decision["metric"],
                "realized": decision["realized"],
            }
            if before is None:
                conn.execute(
                    insert(performance_state).values(
                        model=model, version=version["version"], since=now, **values
                    )
                )
            elif bool(before) != degraded:
                conn.execute(update(performance_state).where(key).values(since=now, **values))
            else:
                conn.execute(update(performance_state).where(key).values(**values))
            changed = degraded if before is None else bool(before) != degraded
            if not changed or alert_bodies is None:
                return
            event = EVENTS[0] if degraded else EVENTS[1]
            deliveries = alert_bodies(event, model, {**decision, "version": version["version"]})
            if deliveries:
                conn.execute(
                    insert(alerts),
                    [
                        {
                            "model": model,
                            "version": version["version"],
                            "event": event,
                            "window_id": decision["window_id"] or 0,
                            "url": url,
                            "body": body,
                            "created_at": now,
                            "attempts": 0,
                            "next_attempt_at": now,
                        }
                        for url, body in deliveries
                    ],
                )
            logger.warning(
                "%s: %s v%s %s %.4g (test %.4g)",
                event,
                model,
                version["version"],
                decision["metric"],
                decision["realized"],
                decision["test"],
            )


def _latest_estimate(windows: list[WindowPerformance]) -> dict[str, Any] | None:
    for w in reversed(windows):
        if w.window is not None and w.window.estimate:
            return {"window_index": w.window.window_index, **w.window.estimate}
    return None


def _version_key(version: str) -> tuple[int, str]:
    return (len(version), version)


def performance_alert_body(
    fmt: str, event: str, model: str, decision: dict[str, Any], url: str
) -> str:
    """The webhook body of a performance state change (flowline JSON or Slack text)."""
    version = decision["version"]
    if fmt == "slack":
        mark = ":warning:" if event == EVENTS[0] else ":white_check_mark:"
        what = "degraded" if event == EVENTS[0] else "recovered"
        text = (
            f"{mark} Performance {what} on *{model}* v{version}: {decision['metric']} "
            f"{decision['realized']:.4g} on {decision['labelled_rows']} labelled rows "
            f"(test {decision['test']:.4g}). {url}"
        )
        return json.dumps({"text": text})
    return json.dumps({"event": event, "model": model, **decision, "performance_url": url})
