"""Drift alerts: webhook bodies for state changes, and their delivery with retries.

A state change ("drift_started" / "drift_ended") is written to the store's
outbox in the same transaction as the window that caused it, one entry per
webhook URL, so it is delivered once per change even across restarts. The
sender posts the oldest pending entry of each URL, retries failures with
exponential backoff, and gives up (logged, kept in the outbox with the error)
after ``alert_max_attempts``.

Several monitors may share the store: a sender first claims the entries it is
about to post (``claimed_until``, a lease of CLAIM_S), so no two monitors post the
same alert; a monitor killed mid-delivery leaves a claim that expires, and
another one retries. A kill between the POST and its bookkeeping is the one case
that posts twice, so each POST names its outbox entry in ``X-Flowline-Alert-Id``
for receivers that want to drop a repeat.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx

from monitoring.service.metrics import MonitorMetrics
from monitoring.service.settings import MonitorSettings
from monitoring.service.store import AlertDelivery, MonitorStore, NewWindow

logger = logging.getLogger(__name__)

EVENTS = ("drift_started", "drift_ended")
TIMEOUT_S = 10.0
# Entries claimed per pass, and for how long: every one may take a whole timeout.
CLAIM_BATCH = 10
CLAIM_S = CLAIM_BATCH * TIMEOUT_S + 30.0


def alert_body(
    fmt: str,
    event: str,
    window: NewWindow,
    window_id: int,
    window_index: int,
    report_url: str,
    drift_url: str,
) -> str:
    """The webhook body: flowline JSON, or Slack-compatible ``{"text": ...}``."""
    if fmt == "slack":
        if event == "drift_started":
            what = ", ".join(window.drifted_features) or ", ".join(window.reasons) or "schema"
            text = (
                f":warning: Drift started on *{window.model}* v{window.version} "
                f"(window {window_index}, {window.rows} rows): {what}. Report: {report_url}"
            )
        else:
            text = (
                f":white_check_mark: Drift ended on *{window.model}* v{window.version} "
                f"(window {window_index} is clean). Report: {report_url}"
            )
        return json.dumps({"text": text})
    doc: dict[str, Any] = {
        "event": event,
        "model": window.model,
        "version": window.version,
        "window_id": window_id,
        "window_index": window_index,
        "time": datetime.fromtimestamp(window.closed_at, UTC).isoformat(timespec="seconds"),
        "rows": window.rows,
        "started_at": window.started_at,
        "ended_at": window.ended_at,
        "drifted": window.drifted,
        "drifted_features": window.drifted_features,
        "reasons": window.reasons,
        "report_url": report_url,
        "drift_url": drift_url,
    }
    return json.dumps(doc)


class AlertSender:
    """Posts due outbox entries; one pass per call to :meth:`deliver_due`."""

    def __init__(
        self, store: MonitorStore, settings: MonitorSettings, metrics: MonitorMetrics
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self._http = httpx.Client(timeout=TIMEOUT_S)
        # Who claims deliveries: unique per sender, so another monitor's claims are not ours.
        self.holder = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def close(self) -> None:
        """Close the HTTP client."""
        self._http.close()

    def backoff(self, attempts: int) -> float:
        """Seconds before the next try after ``attempts`` failed ones."""
        s = self.settings
        return min(s.alert_max_backoff_s, s.alert_backoff_s * 2 ** max(0, attempts - 1))

    def deliver_due(self, now: float | None = None) -> int:
        """Claim the due deliveries and try each once; returns how many succeeded."""
        now = time.time() if now is None else now
        delivered = 0
        for alert in self.store.claim_due_alerts(now, self.holder, CLAIM_S, CLAIM_BATCH):
            headers = {"content-type": "application/json", "x-flowline-alert-id": str(alert.id)}
            try:
                answer = self._http.post(alert.url, content=alert.body, headers=headers)
                error = None if 200 <= answer.status_code < 300 else f"HTTP {answer.status_code}"
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"
            done = time.time()
            if error is None:
                self.store.alert_delivered(alert.id, done)
                self.metrics.alerts.labels("delivered").inc()
                delivered += 1
                logger.info("alert %s delivered to %s", _subject(alert), alert.url)
                continue
            attempts = alert.attempts + 1
            if attempts >= self.settings.alert_max_attempts:
                self.store.alert_failed(alert.id, error, None, done)
                self.metrics.alerts.labels("failed").inc()
                logger.error(
                    "alert %s to %s failed %d times, giving up: %s",
                    _subject(alert),
                    alert.url,
                    attempts,
                    error,
                )
            else:
                retry = done + self.backoff(attempts)
                self.store.alert_failed(alert.id, error, retry, done)
                self.metrics.alerts.labels("retried").inc()
                logger.warning(
                    "alert %s to %s failed (%s); retry %d in %.1fs",
                    _subject(alert),
                    alert.url,
                    error,
                    attempts,
                    retry - done,
                )
        return delivered


def _subject(alert: AlertDelivery) -> str:
    """How the log names a delivery: its event and stream ("drift_started churn/3")."""
    return f"{alert.event} {alert.model}/{alert.version}"
