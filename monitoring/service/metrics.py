"""The monitor's Prometheus metrics, labelled by model and version."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from monitoring.drift.evaluate import PREDICTION

STREAM = ("model", "version")


def feature_score(feature: dict[str, Any]) -> float | None:
    """One number per feature for dashboards: its distribution test's main effect size.

    Wasserstein distance / baseline std for numeric features, Jensen-Shannon
    distance for categorical ones; None when the distribution was not tested.
    """
    dist = feature.get("distribution")
    if not dist:
        return None
    effect = dist.get("effect") or {}
    for key in ("wasserstein_norm", "jensenshannon"):
        if effect.get(key) is not None:
            return float(effect[key])
    return None


class MonitorMetrics:
    """Counters and gauges of one monitor process (a private registry, not the global one)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry

        # Most series are per stream: these keep each definition to its name and help text.
        def counter(name: str, doc: str, labels: Sequence[str] = STREAM) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: Sequence[str] = STREAM) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        self.rows_captured = counter(
            "flowline_monitor_rows_captured", "Captured rows stored (new, not duplicates)."
        )
        self.rows_dropped = counter(
            "flowline_monitor_rows_dropped",
            "Captured requests lost before storage, as reported by capture clients (0 by design).",
        )
        self.duplicates = counter(
            "flowline_monitor_duplicate_records",
            "Redelivered records that were already stored (ignored).",
        )
        self.schema_violations = counter(
            "flowline_monitor_schema_violations",
            "Rows or values that do not fit the baseline schema, by kind.",
            (*STREAM, "kind"),
        )
        self.rejected = counter(
            "flowline_monitor_rejected_records",
            "Records without a usable id, model or version (cannot be attributed).",
            (),
        )
        self.windows = counter(
            "flowline_monitor_windows", "Closed windows, by verdict.", (*STREAM, "drifted")
        )
        self.window_rows = gauge("flowline_monitor_window_rows", "Rows in the latest window.")
        self.window_index = gauge("flowline_monitor_window_index", "Index of the latest window.")
        self.window_closed = gauge(
            "flowline_monitor_window_closed_timestamp_seconds", "When the latest window closed."
        )
        self.dataset_drift = gauge(
            "flowline_monitor_dataset_drift", "1 when the latest window drifted (any rule), else 0."
        )
        self.drifted_features = gauge(
            "flowline_monitor_drifted_features",
            "Features (prediction included) whose distribution drifted in the latest window.",
        )
        self.feature_score = gauge(
            "flowline_monitor_feature_drift_score",
            "Effect size of the latest window per feature (Wasserstein/std or JS distance).",
            (*STREAM, "feature"),
        )
        self.feature_p = gauge(
            "flowline_monitor_feature_p_value",
            "Adjusted p-value of the feature's distribution test in the latest window.",
            (*STREAM, "feature"),
        )
        self.feature_drifted = gauge(
            "flowline_monitor_feature_drifted",
            "1 when the feature drifted (distribution or null rate) in the latest window.",
            (*STREAM, "feature"),
        )
        self.pending_rows = gauge(
            "flowline_monitor_pending_rows", "Captured rows waiting for the next window."
        )
        self.baseline_missing = gauge(
            "flowline_monitor_baseline_missing",
            "1 while the version's baseline cannot be fetched (its rows wait).",
        )
        self.evaluation_seconds = Histogram(
            "flowline_monitor_window_evaluation_seconds",
            "Time to evaluate one window.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.ingest_seconds = Histogram(
            "flowline_monitor_ingest_seconds",
            "Time to store one ingest batch.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.alerts = counter(
            "flowline_monitor_alert_deliveries", "Webhook deliveries by outcome.", ("outcome",)
        )
        self.feedback_labels = counter(
            "flowline_monitor_feedback_labels",
            "Labels received by POST /feedback: new, updated, unchanged (a redelivery) or "
            "unknown (no captured request with that id yet).",
            ("model", "outcome"),
        )
        self.labelled_rows = gauge(
            "flowline_monitor_labelled_rows", "Captured rows with a label (joined feedback)."
        )
        self.realized = gauge(
            "flowline_monitor_realized_performance",
            "The version's realized metric over every labelled row (accuracy, f1, roc_auc, "
            "rmse, mae, r2).",
            (*STREAM, "metric"),
        )
        self.estimated = gauge(
            "flowline_monitor_estimated_performance",
            "CBPE estimate of the latest window, without labels (accuracy, roc_auc).",
            (*STREAM, "metric"),
        )
        self.performance_degraded = gauge(
            "flowline_monitor_performance_degraded",
            "1 when the realized metric is worse than the test metric by more than the margin.",
        )

    def touch(self, model: str, version: str) -> None:
        """Make a stream's counters visible at 0 (so rows_dropped shows an explicit 0)."""
        self.rows_captured.labels(model, version)
        self.rows_dropped.labels(model, version)
        for kind in ("malformed_row", "missing_value", "extra_value", "invalid_value"):
            self.schema_violations.labels(model, version, kind)

    def observe_window(
        self,
        model: str,
        version: str,
        index: int,
        rows: int,
        closed_at: float,
        drift: dict[str, Any],
    ) -> None:
        """Set the gauges from a window's drift report."""
        self.window_rows.labels(model, version).set(rows)
        self.window_index.labels(model, version).set(index)
        self.window_closed.labels(model, version).set(closed_at)
        self.dataset_drift.labels(model, version).set(1 if drift.get("drifted") else 0)
        self.drifted_features.labels(model, version).set(len(drift.get("drifted_features") or []))
        features = list((drift.get("features") or {}).values())
        if drift.get("prediction"):
            features.append(drift["prediction"])
        for f in features:
            name = "prediction" if f["name"] == PREDICTION else f["name"]
            score = feature_score(f)
            if score is not None:
                self.feature_score.labels(model, version, name).set(score)
            p = (f.get("distribution") or {}).get("p_adjusted")
            if p is not None:
                self.feature_p.labels(model, version, name).set(p)
            self.feature_drifted.labels(model, version, name).set(1 if f.get("drifted") else 0)
