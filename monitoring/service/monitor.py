"""The monitor: ingest captured rows, close windows, test them for drift, publish the results.

Three background threads, each safe to stop and restart at any point because
all progress lives in the store:

* detector: for every (model, version) stream, closes a window when
  ``window_rows`` rows wait or the oldest waiting row is ``window_seconds``
  old, evaluates it against the version's baseline (fetched once from the
  registry), and stores the window, the cursor and any drift state change in
  one transaction; hourly it applies the retention setting;
* publisher: logs stored windows to the version's MLflow monitoring run,
  oldest first, retrying while the tracking server is unreachable;
* alerter: delivers the webhook outbox;
* performance: joins label feedback with captured predictions and re-evaluates the
  realized performance of models whose labels changed (monitoring.service.performance).

Several monitors may share one PostgreSQL store: each job that must happen once is
claimed per model version (:mod:`monitoring.service.claims`), and what a monitor
shows (gauges, views) is read from the store, whichever monitor did the work.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from monitoring.drift.evaluate import DriftConfig, PreparedBaseline, evaluate_window
from monitoring.drift.report_html import render_report
from monitoring.service.alerts import AlertSender, alert_body
from monitoring.service.baselines import BaselineCache, BaselineUnavailable, fetch_from_registry
from monitoring.service.claims import Claims
from monitoring.service.feedback import FeedbackItem, check_labels, parse_feedback
from monitoring.service.feedback_store import FeedbackResult, FeedbackStore
from monitoring.service.ingest_checks import (
    MAX_RECORDS_PER_BATCH,
    IngestRefused,
    prepare_batch,
    refuse_invalid,
)
from monitoring.service.metrics import MonitorMetrics
from monitoring.service.mlflow_runs import MonitoringRuns
from monitoring.service.performance import (
    PerformanceSpec,
    PerformanceTracker,
    estimate_window,
    performance_alert_body,
)
from monitoring.service.proba_scorer import ProbaScorer
from monitoring.service.settings import MonitorSettings
from monitoring.service.store import (
    IngestResult,
    MonitorStore,
    NewWindow,
    PendingRecord,
    Stream,
    WindowAlreadyClosed,
    WindowSpan,
    WindowSummary,
)
from monitoring.service.stream_gate import StreamGate, registry_lookup
from monitoring.service.window_frame import VIOLATION_KINDS, build_window, plot_data

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_S = 3600.0
ESTIMATE_WINDOW_S = 86400.0  # windows closed this recently get a CBPE estimate
PERFORMANCE_S = 10.0  # how often changed labels are re-evaluated (gauges, MLflow, alerts)
PUBLISH_RETRY_S = 5.0


def _take_window(pending: list[PendingRecord], rows_per_window: int) -> tuple[int, int]:
    """How many of the pending records form the next window, and their rows.

    A window holds whole requests: it ends with the record that brings it to
    ``rows_per_window`` rows (a large request can make it longer), or takes
    every pending record when there are fewer rows than that.
    """
    rows = 0
    for i, record in enumerate(pending):
        rows += record.rows
        if rows >= rows_per_window:
            return i + 1, rows
    return len(pending), rows


class BadIngest(ValueError):
    """The ingest body is not a JSON object with a list of records."""


def parse_ingest(body: bytes) -> tuple[list[Any], list[Any]]:
    """Records and client drop reports from a POST /ingest body."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadIngest("body is not valid JSON") from None
    if isinstance(payload, list):
        return payload, []
    if not isinstance(payload, dict) or not isinstance(payload.get("records"), list):
        raise BadIngest('body must be {"records": [...]} or a list of records')
    client = payload.get("client")
    dropped = client.get("dropped") if isinstance(client, dict) else None
    return payload["records"], dropped if isinstance(dropped, list) else []


class Monitor:
    """Everything the monitor process does, usable in-process (tests) or behind the server."""

    def __init__(
        self,
        settings: MonitorSettings,
        store: MonitorStore | None = None,
        baselines: BaselineCache | None = None,
        runs: MonitoringRuns | None = None,
        config: DriftConfig | None = None,
        public_url: str = "",
    ) -> None:
        self.settings = settings
        self.config = config or DriftConfig()
        self.store = store or MonitorStore(settings.store_url)
        self.baselines = baselines or BaselineCache(
            lambda m, v: fetch_from_registry(m, v, settings.tracking_uri), self.config
        )
        if runs is None and settings.mlflow_enabled:
            runs = MonitoringRuns(settings.tracking_uri, settings.experiment)
        self.runs = runs
        self.metrics = MonitorMetrics()
        self.gate = StreamGate(settings.max_streams, registry_lookup(settings.tracking_uri))
        self.alerts = AlertSender(self.store, settings, self.metrics)
        self.public_url = (settings.public_url or public_url).rstrip("/")
        self.feedback = FeedbackStore(self.store)
        self.claims = Claims(self.store)
        self.performance = PerformanceTracker(
            self.store,
            self.feedback,
            self.performance_spec,
            settings.performance_margin,
            settings.performance_min_rows,
            claims=self.claims,
        )
        self.scorer = ProbaScorer(settings.tracking_uri) if settings.estimate_enabled else None
        self._stop = threading.Event()
        self._wake_performance = threading.Event()
        self._wake_detector = threading.Event()
        self._wake_publisher = threading.Event()
        self._wake_alerter = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_retention = 0.0
        # (model, version) -> windows whose gauges this monitor shows (its next_window).
        self._observed: dict[tuple[str, str], int] = {}
        self._restore_gauges()

    # --- ingest -----------------------------------------------------------------------

    def ingest(self, records: list[Any], dropped: list[Any] | None = None) -> IngestResult:
        """Store records (idempotent by record id) and update the counters.

        In-process and lenient: invalid records are counted as rejected, not
        refused (``POST /ingest`` goes through the stricter :meth:`ingest_body`).
        """
        started = time.perf_counter()
        result = self.store.ingest(records, dropped or [])
        self._count(result, started)
        return result

    def ingest_body(self, body: bytes) -> IngestResult:
        """POST /ingest: parse, check the whole batch, and store it, or store nothing.

        Raises BadIngest for a body that is not a batch, and IngestRefused when
        any record, the drop report or a new stream is refused
        (:mod:`monitoring.service.ingest_checks`, :mod:`monitoring.service.stream_gate`).
        """
        started = time.perf_counter()
        records, dropped = parse_ingest(body)
        if len(records) > MAX_RECORDS_PER_BATCH:
            raise IngestRefused(
                413, f"{len(records)} records in one batch; at most {MAX_RECORDS_PER_BATCH}"
            )
        batch = prepare_batch(records, dropped)
        known = self.store.known_streams()
        new = batch.new_streams(known)
        if new:
            # Another monitor sharing the store may have opened them: ask the store.
            known = self.store.known_streams(refresh=True)
            new = batch.new_streams(known)
        if new and not batch.invalid:
            batch.refuse_streams(self.gate.refusals(new, len(known)))
        refuse_invalid(batch)
        # Drop counts only for streams the monitor tracks: a report cannot open a stream.
        admitted = known | set(new)
        ignored = [key for key in batch.dropped if key not in admitted]
        ignored_count = sum(batch.dropped.pop(key) for key in ignored)
        result = self.store.ingest_prepared(batch)
        result.dropped_ignored = ignored_count
        self._count(result, started)
        return result

    def _count(self, result: IngestResult, started: float) -> None:
        m = self.metrics
        m.ingest_seconds.observe(time.perf_counter() - started)
        for (model, version), rows in result.rows_by_stream.items():
            m.touch(model, version)
            m.rows_captured.labels(model, version).inc(rows)
        for (model, version), n in result.duplicates_by_stream.items():
            m.duplicates.labels(model, version).inc(n)
        for (model, version), n in result.dropped_by_stream.items():
            m.rows_dropped.labels(model, version).inc(n)
        if result.rejected:
            m.rejected.inc(result.rejected)
        if result.new_records:
            self._wake_detector.set()

    # --- feedback and performance ---------------------------------------------------------

    def performance_spec(self, model: str, version: str) -> PerformanceSpec | None:
        """What training recorded of a version's performance (None: not known yet)."""
        try:
            profile = self.baselines.get(model, version).profile
        except BaselineUnavailable:
            return None
        return PerformanceSpec.from_profile(profile)

    def _label_spec(self, model: str) -> PerformanceSpec | None:
        # Labels name no version: their type is the newest monitored version's.
        versions = sorted(
            (s.version for s in self.store.streams() if s.model == model),
            key=lambda v: (len(v), v),
            reverse=True,
        )
        for version in versions:
            spec = self.performance_spec(model, version)
            if spec is not None:
                return spec
        return None

    def feedback_body(self, model: str, body: bytes, content_type: str | None) -> FeedbackResult:
        """POST /feedback/{model}: parse, type-check and store labels (idempotent).

        Raises BadFeedback (400) for a malformed body and WrongLabels (422) for labels
        of another type than the model's; unknown request ids are counted, and kept.
        """
        items: list[FeedbackItem] = parse_feedback(body, content_type)
        spec = self._label_spec(model)
        items = check_labels(items, spec.task if spec else None, spec.classes if spec else None)
        result = self.feedback.add(model, items)
        for outcome in ("new", "updated", "unchanged", "unknown"):
            count = getattr(result, outcome)
            if count:
                self.metrics.feedback_labels.labels(model, outcome).inc(count)
        # No wake-up of the performance thread: it re-reads every label of a changed
        # model, so it runs on its interval, not once per body of a label upload.
        return result

    def performance_view(self, model: str) -> dict[str, Any] | None:
        """GET /performance/{model}."""
        view = self.performance.view(model)
        if view is not None:
            view["feedback_url"] = f"{self.public_url}/feedback/{quote(model, safe='')}"
        return view

    def refresh_performance(self, now: float | None = None) -> int:
        """One pass of the performance thread: estimate the windows that closed without an
        estimate, then re-evaluate changed labels (see PerformanceTracker.refresh)."""
        self.estimate_pending(now)
        done = self.performance.refresh(now, self._observe_performance, self._performance_alerts)
        if done:
            self._wake_alerter.set()
        if self.scorer is not None:
            self.scorer.stop_idle()
        return done

    def estimate_pending(self, now: float | None = None, limit: int = 20) -> int:
        """CBPE for the recent windows of classifiers that closed without an estimate:
        their rows scored by the version itself, in the sandboxed worker. A window the
        version cannot score now is tried again at a later pass (the scorer backs off)."""
        if self.scorer is None:
            return 0
        now = time.time() if now is None else now
        done = 0
        for span in self.store.unestimated_windows(now - ESTIMATE_WINDOW_S, limit):
            spec = self.performance_spec(span.model, span.version)
            if spec is None or not spec.calibration or self._stop.is_set():
                continue
            with self.claims.hold("estimate", span.model, span.version) as held:
                # Claimed and checked again: another monitor may have estimated it since.
                if held and not self.store.has_estimate(span.id):
                    done += self._estimate(spec, span)
        return done

    def _estimate(self, spec: PerformanceSpec, span: WindowSpan) -> int:
        """Score one window's rows and store (and log) its CBPE estimate; 1 if done."""
        assert self.scorer is not None
        baseline = self.baselines.get(span.model, span.version)
        records = self.store.records(
            span.model, span.version, span.first_record_id, span.last_record_id
        )
        window = build_window(records, span.model, span.version, list(baseline.columns))
        estimate = estimate_window(
            spec, span.model, span.version, window.frame, [], self.scorer.proba
        )
        if estimate is None or not self.store.set_window_estimate(span.id, estimate):
            return 0
        self._observe_estimate(span.model, span.version, estimate)
        if self.runs is not None:
            try:
                self.runs.log_estimate(span.model, span.version, span.window_index, estimate)
            except Exception as exc:  # the tracking server may be down; the store has it
                logger.warning("could not log the estimate to MLflow: %s", exc)
        return 1

    def _observe_estimate(self, model: str, version: str, estimate: dict[str, Any] | None) -> None:
        for metric, value in (estimate or {}).items():
            if metric in ("accuracy", "roc_auc"):
                self.metrics.estimated.labels(model, version, metric).set(value)

    def _performance_alerts(
        self, event: str, model: str, decision: dict[str, Any]
    ) -> list[tuple[str, str]]:
        url = f"{self.public_url}/performance/{quote(model, safe='')}"
        body = performance_alert_body(self.settings.alert_format, event, model, decision, url)
        return [(hook, body) for hook in self.settings.alert_webhooks]

    def _observe_performance(self, model: str, version: dict[str, Any]) -> None:
        """Gauges of a version's realized performance, and its windows' MLflow metrics."""
        v = version["version"]
        m = self.metrics
        for metric, value in version["realized"].items():
            m.realized.labels(model, v, metric).set(value)
        m.labelled_rows.labels(model, v).set(version["labelled_rows"])
        m.performance_degraded.labels(model, v).set(1 if version["degraded"] else 0)
        if self.runs is None:
            return
        # What was logged lives in the store, not in this process: a monitor sharing it
        # (this runs under the model's performance claim) does not log a window again.
        logged = self.performance.logged_rows(model, v)
        steps = []
        for window in version["windows"]:
            index = window["window_index"]
            if index == "open" or logged.get(index) == window["labelled_rows"]:
                continue
            steps.append((index, window))
        if not steps:
            return
        try:
            self.runs.log_performance(model, v, steps)
        except Exception as exc:  # the tracking server may be down: next change retries
            logger.warning("could not log performance of %s/%s to MLflow: %s", model, v, exc)
            return
        self.performance.mark_logged(model, v, [(i, w["labelled_rows"]) for i, w in steps])

    # --- windows ------------------------------------------------------------------------

    def close_windows(self, now: float | None = None) -> list[WindowSummary]:
        """One detector pass: close and evaluate every window that is due.

        A stream with a window due is claimed first (:mod:`monitoring.service.claims`):
        when another monitor sharing the store holds it, that monitor closes the
        window and this one only mirrors the result into its gauges.
        """
        closed: list[WindowSummary] = []
        for stream in self.store.streams():
            self._sync_gauges(stream)
            due = self._due(stream.model, stream.version, stream.last_record_id, now)
            if due is None:
                continue
            with self.claims.hold("windows", stream.model, stream.version) as held:
                if held:
                    closed += self._close_due(stream.model, stream.version, now)
        if closed:
            self._wake_publisher.set()
            self._wake_alerter.set()
            self._wake_performance.set()  # their estimates
        return closed

    def _due(
        self, model: str, version: str, cursor: int, now: float | None
    ) -> tuple[PreparedBaseline, bool, float] | None:
        """When a window of the stream is due after ``cursor``: its baseline, whether
        it closes by rows (else by time) and the time it closes at."""
        rows_per_window = self.settings.window_rows
        at = time.time() if now is None else now
        # At most one window's worth of records (each holds at least one row).
        waiting = self.store.pending_summary(model, version, cursor, rows_per_window)
        self.metrics.pending_rows.labels(model, version).set(waiting.rows)
        if not waiting.records or waiting.oldest_ingested_at is None:
            return None
        by_rows = waiting.rows >= rows_per_window
        if not by_rows and at - waiting.oldest_ingested_at < self.settings.window_seconds:
            return None
        try:
            baseline = self.baselines.get(model, version, at)
        except BaselineUnavailable:
            self.metrics.baseline_missing.labels(model, version).set(1)
            return None
        self.metrics.baseline_missing.labels(model, version).set(0)
        return baseline, by_rows, at

    def _close_due(self, model: str, version: str, now: float | None) -> list[WindowSummary]:
        """Close the stream's due windows, oldest first; the caller holds its claim.

        The cursor is read again under the claim: the listing the caller saw may be
        older than a window another monitor closed since.
        """
        closed: list[WindowSummary] = []
        stream = self.store.stream(model, version)
        cursor = stream.last_record_id if stream else 0
        while not self._stop.is_set():
            due = self._due(model, version, cursor, now)
            if due is None:
                break
            baseline, by_rows, at = due
            # A window is due: only now read the ids it spans.
            pending = self.store.pending(model, version, cursor, self.settings.window_rows)
            if not pending:  # removed by retention since the summary
                break
            take, _ = _take_window(pending, self.settings.window_rows)
            try:
                summary = self._close(
                    model,
                    version,
                    pending[0].id,
                    pending[take - 1].id,
                    baseline,
                    at,
                    "rows" if by_rows else "time",
                )
            except WindowAlreadyClosed as exc:
                # Only when a claim expired under a slow holder: the store kept one copy.
                logger.info("window not stored twice: %s", exc)
                break
            closed.append(summary)
            cursor = summary.last_record_id
            if not by_rows:
                break
        return closed

    def _sync_gauges(self, stream: Stream) -> None:
        """Set the stream's window gauges from the store when a window was closed that
        this monitor has not observed (another monitor sharing the store closed it)."""
        key = (stream.model, stream.version)
        if stream.next_window == 0 or self._observed.get(key) == stream.next_window:
            return
        latest = self.store.windows(stream.model, stream.version, limit=1)
        found = self.store.window(latest[0].id) if latest else None
        if found is None:
            return
        summary, stored = found
        self._show_window(summary, stored)
        self._observe_estimate(summary.model, summary.version, stored.get("estimate"))

    def _close(
        self,
        model: str,
        version: str,
        first_id: int,
        last_id: int,
        baseline: PreparedBaseline,
        now: float,
        closed_by: str,
    ) -> WindowSummary:
        records = self.store.records(model, version, first_id, last_id)
        started = time.perf_counter()
        window = build_window(records, model, version, list(baseline.columns))
        report = evaluate_window(baseline, window.frame, window.predictions, self.config)
        drift = report.to_dict()
        # Only from probabilities the callers were answered: scoring the rows in the
        # sandboxed worker can take a model load's time, and must not hold drift back
        # (the performance thread does it: estimate_pending).
        estimate = estimate_window(
            PerformanceSpec.from_profile(baseline.profile),
            model,
            version,
            window.frame,
            window.answered or [],
            None,
        )
        self.metrics.evaluation_seconds.observe(time.perf_counter() - started)
        violations = {kind: int(window.violations.get(kind, 0)) for kind in VIOLATION_KINDS}
        violations["invalid_value"] = int(sum(drift["schema"]["invalid_values"].values()))
        stored = {
            "drift": drift,
            "plots": plot_data(baseline, window),
            "violations": violations,
            "error_examples": window.examples,
            "estimate": estimate,
        }
        times = [r.captured_at for r in records]
        new = NewWindow(
            model=model,
            version=version,
            first_record_id=first_id,
            last_record_id=last_id,
            rows=window.rows,
            started_at=min(times),
            ended_at=max(times),
            closed_at=now,
            closed_by=closed_by,
            drifted=report.drifted,
            drifted_features=list(report.drifted_features),
            reasons=list(report.reasons),
            schema_violations=sum(violations.values()),
            report=stored,
            estimate=estimate,
        )
        summary, event = self.store.record_window(new, self._alert_builder(new))
        m = self.metrics
        m.touch(model, version)
        for kind, n in violations.items():
            if n:
                m.schema_violations.labels(model, version, kind).inc(n)
        m.windows.labels(model, version, str(report.drifted).lower()).inc()
        m.observe_window(model, version, summary.window_index, window.rows, now, drift)
        self._observed[(model, version)] = summary.window_index + 1
        self._observe_estimate(model, version, estimate)
        if event:
            logger.warning(
                "%s: %s v%s at window %d (%s)",
                event,
                model,
                version,
                summary.window_index,
                ", ".join(report.reasons),
            )
        return summary

    def _alert_builder(self, new: NewWindow) -> Callable[[str, int, int], list[tuple[str, str]]]:
        def build(event: str, window_id: int, index: int) -> list[tuple[str, str]]:
            body = alert_body(
                self.settings.alert_format,
                event,
                new,
                window_id,
                index,
                self.report_url(new.model, window_id),
                self.drift_url(new.model),
            )
            return [(url, body) for url in self.settings.alert_webhooks]

        return build

    # --- links --------------------------------------------------------------------------

    def report_url(self, model: str, window_id: int) -> str:
        """Where the monitor serves a window's HTML report."""
        return f"{self.public_url}/reports/{quote(model, safe='')}/{window_id}"

    def drift_url(self, model: str) -> str:
        """Where the monitor serves a model's drift state (JSON)."""
        return f"{self.public_url}/drift/{quote(model, safe='')}"

    # --- outputs ------------------------------------------------------------------------

    def publish_pending(self) -> int:
        """Log stored windows to MLflow, oldest first; returns how many were logged."""
        if self.runs is None:
            return 0
        logged = 0
        while not self._stop.is_set():
            batch = self.store.unlogged_windows(limit=20)
            keys = list(dict.fromkeys((s.model, s.version) for s, _ in batch))
            before = logged
            for model, version in keys:
                # One monitor logs a stream's windows at a time; it re-reads them under
                # the claim, so none is logged twice by monitors sharing the store.
                with self.claims.hold("publish", model, version) as held:
                    if not held:
                        continue
                    for summary, stored in self.store.unlogged_windows(20, model, version):
                        if self._stop.is_set():
                            break
                        html = render_report(summary.__dict__, stored)
                        self.runs.log_window(summary, stored, html)
                        self.store.mark_logged(summary.id)
                        logged += 1
            if logged == before:  # nothing left, or every stream claimed by another monitor
                break
        return logged

    def apply_retention(self, now: float | None = None) -> dict[str, int]:
        """Delete data older than the retention setting (no-op when it is 0)."""
        days = self.settings.retention_days
        if days <= 0:
            return {}
        now = time.time() if now is None else now
        with self.claims.hold("retention") as held:
            if not held:  # another monitor is deleting the same rows right now
                return {}
            counts = self.store.apply_retention(now - days * 86400.0)
            counts["labels"] = self.feedback.apply_retention(now - days * 86400.0)
        if any(counts.values()):
            logger.info("retention (%g days) deleted %s", days, counts)
        return counts

    def report_html(self, model: str, window_id: int) -> str | None:
        """The HTML report of a window of ``model``, or None."""
        found = self.store.window(window_id)
        if found is None or found[0].model != model:
            return None
        summary, stored = found
        realized = self.performance.window_performance(model, summary.version, window_id)
        estimate = stored.get("estimate") or (realized or {}).get("estimated")
        return render_report(
            summary.__dict__, {**stored, "estimate": estimate, "performance": realized}
        )

    def window_json(self, model: str, window_id: int) -> dict[str, Any] | None:
        """A window's summary and full stored report, or None."""
        found = self.store.window(window_id)
        if found is None or found[0].model != model:
            return None
        summary, stored = found
        return {**self._window_view(summary), "report": stored}

    def _window_view(self, w: WindowSummary) -> dict[str, Any]:
        return {
            "window_id": w.id,
            "version": w.version,
            "window_index": w.window_index,
            "started_at": w.started_at,
            "ended_at": w.ended_at,
            "closed_at": w.closed_at,
            "closed_by": w.closed_by,
            "rows": w.rows,
            "drifted": w.drifted,
            "drifted_features": w.drifted_features,
            "reasons": w.reasons,
            "schema_violations": w.schema_violations,
            "report_url": self.report_url(w.model, w.id),
            "logged_to_mlflow": w.mlflow_logged,
        }

    def drift_view(
        self, model: str, limit: int = 100, version: str | None = None
    ) -> dict[str, Any] | None:
        """GET /drift/{model}: the state of each version and the window history (newest first)."""
        streams = [s for s in self.store.streams() if s.model == model]
        if version is not None:
            streams = [s for s in streams if s.version == version]
        if not streams:
            return None
        missing = self.baselines.missing()
        versions = []
        for s in sorted(streams, key=lambda s: (len(s.version), s.version)):
            state = self.store.drift_state(s.model, s.version)
            latest = self.store.windows(model, s.version, limit=1)
            versions.append(
                {
                    "version": s.version,
                    "drifted": bool(state and state["drifted"]),
                    "drifted_since": state["since"] if state and state["drifted"] else None,
                    "rows_captured": s.rows_total,
                    "duplicate_records": s.duplicates_total,
                    "rows_dropped": s.dropped_total,
                    "windows": s.next_window,
                    "latest_window": self._window_view(latest[0]) if latest else None,
                    "baseline_problem": missing.get((s.model, s.version)),
                }
            )
        history = self.store.windows(model, version, limit=limit)
        return {
            "model": model,
            "drifted": any(v["drifted"] for v in versions),
            "rows_captured": sum(v["rows_captured"] for v in versions),
            "versions": versions,
            "latest": self._window_view(history[0]) if history else None,
            "windows": [self._window_view(w) for w in history],
        }

    def models(self) -> list[dict[str, Any]]:
        """GET /drift: every monitored model with its versions' states."""
        out: dict[str, dict[str, Any]] = {}
        for s in self.store.streams():
            state = self.store.drift_state(s.model, s.version)
            entry = out.setdefault(s.model, {"model": s.model, "drifted": False, "versions": []})
            drifted = bool(state and state["drifted"])
            entry["drifted"] = entry["drifted"] or drifted
            entry["versions"].append(
                {
                    "version": s.version,
                    "drifted": drifted,
                    "rows_captured": s.rows_total,
                    "windows": s.next_window,
                }
            )
        for entry in out.values():
            entry["drift_url"] = self.drift_url(entry["model"])
        return sorted(out.values(), key=lambda e: e["model"])

    def _show_window(self, summary: WindowSummary, stored: dict[str, Any]) -> None:
        # The gauges of a stored window, whichever monitor closed it.
        self._observed[(summary.model, summary.version)] = summary.window_index + 1
        self.metrics.touch(summary.model, summary.version)
        self.metrics.observe_window(
            summary.model,
            summary.version,
            summary.window_index,
            summary.rows,
            summary.closed_at,
            stored.get("drift") or {},
        )

    def _restore_gauges(self) -> None:
        for summary, stored in self.store.latest_windows():
            self._show_window(summary, stored)

    # --- background threads ---------------------------------------------------------------

    def start(self) -> Monitor:
        """Start the detector, publisher and alerter threads."""
        if self._threads:
            return self
        self._stop.clear()
        loops: list[tuple[str, Callable[[], None], threading.Event, float]] = [
            ("detector", self._detect_once, self._wake_detector, self.settings.poll_interval_s),
            ("alerter", self._alert_once, self._wake_alerter, 1.0),
            ("performance", self.refresh_performance, self._wake_performance, PERFORMANCE_S),
        ]
        if self.runs is not None:
            loops.append(("publisher", self._publish_once, self._wake_publisher, 2.0))
        for name, step, wake, interval in loops:
            thread = threading.Thread(
                target=self._loop,
                args=(name, step, wake, interval),
                name=f"flowline-monitor-{name}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the threads (finishing the current step) and close HTTP clients."""
        self._stop.set()
        wakes = (self._wake_detector, self._wake_publisher, self._wake_alerter)
        for event in (*wakes, self._wake_performance):
            event.set()
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []
        self.alerts.close()
        if self.scorer is not None:
            self.scorer.close()

    def _loop(
        self, name: str, step: Callable[[], None], wake: threading.Event, interval: float
    ) -> None:
        delay = interval
        while not self._stop.is_set():
            wake.wait(delay)
            wake.clear()
            if self._stop.is_set():
                return
            try:
                step()
                delay = interval
            except Exception:
                # Keep the loop alive; the work is retried from the store's state.
                logger.exception("monitor %s step failed; retrying", name)
                delay = max(interval, PUBLISH_RETRY_S)

    def _detect_once(self) -> None:
        self.close_windows()
        now = time.time()
        if now - self._last_retention >= RETENTION_INTERVAL_S:
            self._last_retention = now
            self.apply_retention(now)

    def _publish_once(self) -> None:
        self.publish_pending()

    def _alert_once(self) -> None:
        self.alerts.deliver_due()
