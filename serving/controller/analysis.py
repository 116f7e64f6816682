"""Automatic canary analysis: compare the canary with production every interval, roll it
back when a check fails, and promote it after enough passing intervals (when asked).

Every ``interval_s`` the analyst takes, for the canary and for production, what the
interval added to the gateway's per-version counters (``GET /metrics``: answers by
status, the latency histogram) and what the monitor says (``GET /drift``: the canary's
own windows; ``GET /performance``: realized metrics from labels). The checks, with the
thresholds of the registered-model tag ``flowline.analysis`` (:class:`AnalysisConfig`):

* ``error_rate``: the canary's share of non-2xx answers exceeds production's by more
  than ``max_error_rate_increase`` (client mistakes fall on both alike);
* ``p99``: the canary's p99 latency is above ``max_p99_ratio`` times production's and
  at least ``min_p99_increase_s`` more;
* ``drift``: the monitor's latest verdict on the canary's own traffic is drift;
* ``agreement`` (shadow): the share of equal answers falls below ``min_agreement``;
* ``metric``: with labels, the canary's realized metric is worse than production's by
  more than ``max_metric_drop``.

An interval with fewer than ``min_requests`` canary answers is not judged. A failed
check removes the alias (``canary`` or ``shadow``), tags the version with the check and
its numbers, and posts ``canary_rolled_back`` to ``FLOWLINE_ALERT_WEBHOOKS``; the
controller's next pass then drains and stops its replicas. After ``promote_after``
passing intervals in a row (0, the default: never) the alias ``production`` moves to
the canary. The count of passing intervals is a version tag, so a restarted controller
resumes it; only the interval's starting counters live in memory (a restart starts a new
interval).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import requests
from prometheus_client.parser import text_string_to_metric_families

from common.registry import (
    ANALYSIS_CHECK_TAG,
    ANALYSIS_PASSED_TAG,
    ANALYSIS_REASON_TAG,
    ANALYSIS_VERDICT_TAG,
    PRODUCTION_ALIAS,
)

log = logging.getLogger("flowline.controller")

REQUESTS_METRIC = "flowline_gateway_requests"
LATENCY_METRIC = "flowline_gateway_request_duration_seconds"
ALERT_EVENT = "canary_rolled_back"


@dataclass(frozen=True)
class AnalysisConfig:
    """The thresholds of one model's analysis (the tag ``flowline.analysis``; docs/serving.md)."""

    interval_s: float = 60.0
    min_requests: int = 50
    max_error_rate_increase: float = 0.01
    max_p99_ratio: float = 2.0
    min_p99_increase_s: float = 0.05
    rollback_on_drift: bool = True
    min_agreement: float = 0.9
    max_metric_drop: float = 0.05
    min_labelled_rows: int = 50
    promote_after: int = 0

    def __post_init__(self) -> None:
        positive = ("interval_s", "max_p99_ratio")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if not isinstance(value, bool):
                    raise ValueError(f"analysis {f.name} must be true or false, not {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"analysis {f.name} must be a number, not {value!r}")
            if not math.isfinite(value) or value < 0 or (f.name in positive and value <= 0):
                raise ValueError(f"analysis {f.name} must be a finite number >= 0, not {value!r}")
        if self.min_agreement > 1:
            raise ValueError("analysis min_agreement is a share: from 0 to 1")

    @classmethod
    def from_tag(cls, text: str | None) -> AnalysisConfig:
        """The settings of a ``flowline.analysis`` tag (defaults without one); ValueError
        with the reason for a tag that is not a JSON object of known, valid settings."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
        except ValueError:
            raise ValueError(f"flowline.analysis is not JSON: {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise ValueError("flowline.analysis must be a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"flowline.analysis has unknown keys {sorted(unknown)}")
        values = dict(data)
        for name in ("min_requests", "min_labelled_rows", "promote_after"):
            if name in values and isinstance(values[name], float) and values[name].is_integer():
                values[name] = int(values[name])
        return cls(**values)


@dataclass(frozen=True)
class Traffic:
    """What the gateway answered for one version: answers, non-2xx ones, and the
    latency histogram's cumulative bucket counts ``((upper bound, count), ...)``."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: tuple[tuple[float, float], ...] = ()

    def since(self, before: Traffic | None) -> Traffic:
        """What was added after ``before`` (all of it without one, or after a reset)."""
        if before is None or self.requests < before.requests:
            return self
        old = dict(before.buckets)
        return Traffic(
            self.requests - before.requests,
            self.errors - before.errors,
            tuple((le, n - old.get(le, 0.0)) for le, n in self.buckets),
        )

    @property
    def error_rate(self) -> float:
        """Non-2xx answers per answer (0 with none)."""
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile, interpolated inside its histogram bucket as Prometheus'
        ``histogram_quantile`` does (the buckets are coarse: 25, 50, 100 ms)."""
        total = self.buckets[-1][1] if self.buckets else 0.0
        if total <= 0:
            return None
        rank = q * total
        lower, below = 0.0, 0.0
        for upper, count in self.buckets:
            if count >= rank:
                if math.isinf(upper):
                    return lower  # beyond the last finite bound: its lower edge
                inside = count - below
                return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = upper, count
        return lower


def scrape(text: str | list[str], model: str) -> dict[str, Traffic]:
    """Each version's traffic of ``model`` in the gateway's Prometheus text, or summed
    over the texts of several gateways (counters and histogram buckets add up)."""
    requests_: dict[str, float] = {}
    errors: dict[str, float] = {}
    buckets: dict[str, dict[float, float]] = {}
    for one in [text] if isinstance(text, str) else text:
        for family in text_string_to_metric_families(one):
            if family.name not in (REQUESTS_METRIC, LATENCY_METRIC):
                continue
            for sample in family.samples:
                labels = sample.labels
                if labels.get("model") != model:
                    continue
                version = labels.get("version", "")
                if sample.name == f"{REQUESTS_METRIC}_total":
                    requests_[version] = requests_.get(version, 0.0) + sample.value
                    if not labels.get("code", "").startswith("2"):
                        errors[version] = errors.get(version, 0.0) + sample.value
                elif sample.name == f"{LATENCY_METRIC}_bucket":
                    bound = float(labels["le"])
                    counts = buckets.setdefault(version, {})
                    counts[bound] = counts.get(bound, 0.0) + sample.value
    return {
        v: Traffic(requests_[v], errors.get(v, 0.0), tuple(sorted(buckets.get(v, {}).items())))
        for v in requests_
    }


@dataclass(frozen=True)
class Check:
    """One check of an interval: its name, whether it failed, and its numbers in words."""

    name: str
    failed: bool
    reason: str


def traffic_checks(config: AnalysisConfig, canary: Traffic, production: Traffic) -> list[Check]:
    """The error-rate and latency checks of one interval's traffic."""
    out = []
    increase = canary.error_rate - production.error_rate
    out.append(
        Check(
            "error_rate",
            increase > config.max_error_rate_increase,
            f"error rate {canary.error_rate:.2%} of {canary.requests:.0f} answers against "
            f"production's {production.error_rate:.2%} (at most +"
            f"{config.max_error_rate_increase:.2%})",
        )
    )
    mine, theirs = canary.quantile(0.99), production.quantile(0.99)
    if mine is not None and theirs is not None:
        slower = mine > theirs * config.max_p99_ratio and mine - theirs >= config.min_p99_increase_s
        out.append(
            Check(
                "p99",
                slower,
                f"p99 {mine * 1000:.0f} ms against production's {theirs * 1000:.0f} ms (at most "
                f"{config.max_p99_ratio:g}x)",
            )
        )
    return out


def drift_check(config: AnalysisConfig, drifted: bool | None, features: list[str]) -> list[Check]:
    """The drift check, when the monitor has a verdict on the canary's own traffic."""
    if drifted is None or not config.rollback_on_drift:
        return []
    what = ", ".join(features) or "its inputs"
    return [Check("drift", drifted, f"its own traffic drifted ({what})" if drifted else "no drift")]


def metric_check(
    config: AnalysisConfig, metric: str, canary: tuple[float, int] | None, production: float | None
) -> list[Check]:
    """The realized-metric check, once the canary has ``min_labelled_rows`` labels."""
    if canary is None or production is None or canary[1] < config.min_labelled_rows:
        return []
    value, rows = canary
    lower_is_better = metric in ("rmse", "mae", "log_loss")
    worse_by = (value - production) if lower_is_better else (production - value)
    return [
        Check(
            "metric",
            worse_by > config.max_metric_drop,
            f"realized {metric} {value:.4g} on {rows} labels against production's "
            f"{production:.4g} (at most {config.max_metric_drop:g} worse)",
        )
    ]


def agreement_check(config: AnalysisConfig, agreement: float | None, compared: int) -> list[Check]:
    """The shadow's agreement with production, once it compared ``min_requests`` answers."""
    if agreement is None or compared < config.min_requests:
        return []
    return [
        Check(
            "agreement",
            agreement < config.min_agreement,
            f"agreed with production on {agreement:.1%} of {compared} answers (at least "
            f"{config.min_agreement:.0%})",
        )
    ]


@dataclass
class _Interval:
    """Where the current interval of one (model, role, version) started."""

    started: float
    canary: Traffic | None
    production: Traffic | None
    shadow: dict[str, Any] = field(default_factory=dict)  # GET /models' shadow block


@dataclass
class Sources:
    """Where the analyst reads: the gateway's metrics and models, the monitor's views."""

    gateway_metrics: Callable[[], str | list[str]]
    gateway_models: Callable[[], list[dict[str, Any]]]
    monitor: Callable[[str], dict[str, Any] | None] | None = None  # GET path -> JSON
    post_alert: Callable[[str, dict[str, Any]], None] | None = None  # (url, body)
    webhooks: tuple[str, ...] = ()


@dataclass
class CanaryAnalyst:
    """Judges each model's canary and shadow every interval; rolls back, or promotes."""

    client: Any  # MlflowClient
    sources: Sources
    clock: Callable[[], float] = time.monotonic
    intervals: dict[tuple[str, str, str], _Interval] = field(default_factory=dict)

    def analyze(
        self,
        model: str,
        config: AnalysisConfig,
        production: str,
        canary: str | None,
        shadow: str | None,
    ) -> list[tuple[str, str, list[Check]]]:
        """One look at a model: ``(role, version, checks)`` of every interval judged now."""
        judged = []
        now = self.clock()
        for role, version in (("canary", canary), ("shadow", shadow)):
            key = (model, role, version or "")
            if version is None:
                self.intervals.pop(key, None)
                continue
            interval = self.intervals.get(key)
            if interval is not None and now - interval.started < config.interval_s:
                continue
            try:
                traffic = scrape(self.sources.gateway_metrics(), model)
            except Exception as exc:  # the gateway is away: this interval is not judged
                log.warning("canary analysis of %s: gateway metrics unreadable: %s", model, exc)
                continue
            mine, theirs = traffic.get(version), traffic.get(production)
            shadow_block = self._shadow_block(model) if role == "shadow" else {}
            self.intervals[key] = _Interval(now, mine, theirs, shadow_block or {})
            if interval is None:
                continue  # the first look only starts the interval
            checks = self._checks(model, config, role, version, production, interval, mine, theirs)
            if checks is None:
                continue
            judged.append((role, version, checks))
            self._act(model, config, role, version, checks)
        return judged

    def _shadow_block(self, model: str) -> dict[str, Any] | None:
        try:
            models = self.sources.gateway_models()
        except Exception:
            return None
        for entry in models:
            if entry.get("name") == model and isinstance(entry.get("shadow"), dict):
                return entry["shadow"]
        return None

    def _checks(
        self,
        model: str,
        config: AnalysisConfig,
        role: str,
        version: str,
        production: str,
        interval: _Interval,
        mine: Traffic | None,
        theirs: Traffic | None,
    ) -> list[Check] | None:
        if role == "shadow":
            now, before = self.intervals[(model, role, version)].shadow, interval.shadow
            compared = int(now.get("compared_rows", 0)) - int(before.get("compared_rows", 0))
            mirrored = int(now.get("mirrored", 0)) - int(before.get("mirrored", 0))
            errors = int(now.get("errors", 0)) - int(before.get("errors", 0))
            checks = agreement_check(config, now.get("agreement"), compared)
            if mirrored >= config.min_requests:
                base = (theirs or Traffic()).since(interval.production)
                checks += traffic_checks(config, Traffic(mirrored, errors), base)[:1]
            return checks or None
        added = (mine or Traffic()).since(interval.canary)
        if added.requests < config.min_requests:
            return None  # too little traffic to judge: the interval does not count
        base = (theirs or Traffic()).since(interval.production)
        checks = traffic_checks(config, added, base)
        checks += self._monitor_checks(model, config, version, production)
        return checks

    def _monitor_checks(
        self, model: str, config: AnalysisConfig, version: str, production: str
    ) -> list[Check]:
        if self.sources.monitor is None:
            return []
        checks: list[Check] = []
        drift = self.sources.monitor(f"/drift/{model}?version={version}&limit=1")
        if drift and drift.get("versions"):
            latest = drift["versions"][0].get("latest_window") or {}
            if latest:
                checks += drift_check(
                    config, bool(latest.get("drifted")), latest.get("drifted_features") or []
                )
        performance = self.sources.monitor(f"/performance/{model}")
        if performance:
            by_version = {v["version"]: v for v in performance.get("versions", [])}
            mine, theirs = by_version.get(version), by_version.get(production)
            metric = (mine or {}).get("metric")
            if mine and theirs and metric and metric in mine.get("realized", {}):
                checks += metric_check(
                    config,
                    metric,
                    (mine["realized"][metric], int(mine["labelled_rows"])),
                    (theirs.get("realized") or {}).get(metric),
                )
        return checks

    def _act(
        self, model: str, config: AnalysisConfig, role: str, version: str, checks: list[Check]
    ) -> None:
        failed = [c for c in checks if c.failed]
        if failed:
            self._roll_back(model, role, version, failed)
            return
        tags = self.client.get_model_version(model, version).tags or {}
        passed = _count(tags.get(ANALYSIS_PASSED_TAG)) + 1
        self.client.set_model_version_tag(model, version, ANALYSIS_PASSED_TAG, str(passed))
        self.client.set_model_version_tag(model, version, ANALYSIS_VERDICT_TAG, "passing")
        self.client.set_model_version_tag(
            model, version, ANALYSIS_REASON_TAG, "; ".join(c.reason for c in checks)
        )
        if role == "canary" and config.promote_after and passed >= config.promote_after:
            log.info(
                "%s/%s passed %d intervals: promoting it to production", model, version, passed
            )
            self.client.set_registered_model_alias(model, PRODUCTION_ALIAS, version)
            self.client.delete_registered_model_alias(model, "canary")
            self.client.set_model_version_tag(model, version, ANALYSIS_VERDICT_TAG, "promoted")

    def _roll_back(self, model: str, role: str, version: str, failed: list[Check]) -> None:
        check = failed[0]
        reason = "; ".join(c.reason for c in failed)[:500]
        log.warning("rolling back %s %s/%s: %s: %s", role, model, version, check.name, reason)
        # Tags first: whoever sees the alias gone must also see why.
        self.client.set_model_version_tag(model, version, ANALYSIS_CHECK_TAG, check.name)
        self.client.set_model_version_tag(model, version, ANALYSIS_REASON_TAG, reason)
        self.client.set_model_version_tag(model, version, ANALYSIS_VERDICT_TAG, "failed")
        self.client.set_model_version_tag(model, version, ANALYSIS_PASSED_TAG, "0")
        try:
            self.client.delete_registered_model_alias(model, role)
        except Exception as exc:  # already gone: the rollback stands
            log.info("alias %s of %s: %s", role, model, exc)
        self.intervals.pop((model, role, version), None)
        body = {
            "event": ALERT_EVENT,
            "model": model,
            "version": version,
            "role": role,
            "check": check.name,
            "reason": reason,
            "checks": [c.__dict__ for c in failed],
        }
        if self.sources.post_alert is not None:
            for url in self.sources.webhooks:
                try:
                    self.sources.post_alert(url, body)
                except Exception as exc:  # the rollback stands; the alert is logged
                    log.warning("canary alert to %s failed: %s", url, exc)


def _count(text: str | None) -> int:
    try:
        return max(0, int(text or 0))
    except ValueError:
        return 0


def http_sources(
    gateway: Any,
    monitor_url: str | None,
    webhooks: tuple[str, ...],
    tls: dict[str, Any] | None = None,
) -> Sources:
    """Sources that read the gateway through the controller's admin client and the monitor
    over HTTP(S), and post alerts as JSON."""
    tls = tls or {}

    def metrics() -> list[str]:
        return gateway.metrics_texts()

    def models() -> list[dict[str, Any]]:
        return gateway.models()

    def monitor(path: str) -> dict[str, Any] | None:
        try:
            answer = requests.get(f"{monitor_url}{path}", timeout=10, **tls)
        except requests.RequestException:
            return None
        return answer.json() if answer.status_code == 200 else None

    def post(url: str, body: dict[str, Any]) -> None:
        requests.post(url, json=body, timeout=10, **tls).raise_for_status()

    return Sources(metrics, models, monitor if monitor_url else None, post, webhooks)
