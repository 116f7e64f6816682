"""One MLflow monitoring run per deployed model version, with per-window metrics and reports.

The run lives in the experiment ``flowline-monitoring`` (FLOWLINE_MONITOR_EXPERIMENT),
is named ``monitor-{model}-v{version}`` and tagged ``flowline.monitor.model`` /
``flowline.monitor.version``; after a restart it is found again by those tags,
never created twice (two monitors creating it at once both keep the oldest). Each
window logs its metrics with ``step = window index``,
so MLflow's charts show drift over time, and its HTML report as
``reports/window-0007.html``.
"""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Any

from common import registry
from monitoring.drift.evaluate import PREDICTION
from monitoring.service.metrics import feature_score
from monitoring.service.store import WindowSummary

MODEL_TAG = registry.MONITOR_MODEL_TAG
VERSION_TAG = registry.MONITOR_VERSION_TAG
_UNSAFE = re.compile(r"[^\w.\- /]")


def metric_key(*parts: str) -> str:
    """An MLflow metric key from parts (characters MLflow refuses become "_")."""
    return ".".join(_UNSAFE.sub("_", p) for p in parts)


def report_artifact(window_index: int) -> str:
    """The artifact path of a window's HTML report."""
    return f"reports/window-{window_index:04d}.html"


def window_metrics(summary: WindowSummary, drift: dict[str, Any]) -> dict[str, float]:
    """The metrics logged for one window."""
    metrics: dict[str, float] = {
        "drift.dataset_drifted": 1.0 if summary.drifted else 0.0,
        "drift.drifted_features": float(len(summary.drifted_features)),
        "window.rows": float(summary.rows),
        "window.schema_violations": float(summary.schema_violations),
        "drift.tests": float((drift.get("correction") or {}).get("tests", 0)),
    }
    features = list((drift.get("features") or {}).values())
    if drift.get("prediction"):
        features.append(drift["prediction"])
    for f in features:
        name = "prediction" if f["name"] == PREDICTION else str(f["name"])
        metrics[metric_key("drift", name, "drifted")] = 1.0 if f.get("drifted") else 0.0
        dist = f.get("distribution") or {}
        if dist.get("p_value") is not None:
            metrics[metric_key("drift", name, "p_value")] = float(dist["p_value"])
        if dist.get("p_adjusted") is not None:
            metrics[metric_key("drift", name, "p_adjusted")] = float(dist["p_adjusted"])
        score = feature_score(f)
        if score is not None:
            metrics[metric_key("drift", name, "effect")] = score
        for key, value in (dist.get("effect") or {}).items():
            if value is not None:
                metrics[metric_key("drift", name, key)] = float(value)
        live_nulls = (f.get("null_rate") or {}).get("live")
        if live_nulls is not None:
            metrics[metric_key("drift", name, "null_rate")] = float(live_nulls)
    return metrics


class MonitoringRuns:
    """Finds or creates the monitoring run of each model version and logs windows to it."""

    def __init__(self, tracking_uri: str = "", experiment: str = "flowline-monitoring") -> None:
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri or None)
        self.experiment = experiment
        self._experiment_id: str | None = None
        self._runs: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def experiment_id(self) -> str:
        """The monitoring experiment's id (created on first use)."""
        if self._experiment_id is None:
            from mlflow.exceptions import MlflowException

            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(self.experiment)
                except MlflowException:  # created meanwhile by another process
                    found = self.client.get_experiment_by_name(self.experiment)
                    assert found is not None
                    self._experiment_id = found.experiment_id
            else:
                self._experiment_id = found.experiment_id
        return self._experiment_id

    def find_run(self, model: str, version: str) -> str | None:
        """The existing monitoring run of a version, found by its tags."""

        def quoted(s: str) -> str:
            return s.replace("\\", "\\\\").replace("'", "\\'")

        runs = self.client.search_runs(
            [self.experiment_id()],
            filter_string=(
                f"tags.`{MODEL_TAG}` = '{quoted(model)}' and "
                f"tags.`{VERSION_TAG}` = '{quoted(version)}'"
            ),
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def run_id(self, model: str, version: str) -> str:
        """The monitoring run of a version, created when there is none yet."""
        key = (model, version)
        with self._lock:
            if key in self._runs:
                return self._runs[key]
            run_id = self.find_run(model, version)
            if run_id is None:
                run = self.client.create_run(
                    self.experiment_id(),
                    run_name=f"monitor-{model}-v{version}",
                    tags={
                        MODEL_TAG: model,
                        VERSION_TAG: version,
                        registry.MONITOR_KIND_TAG: "drift",
                        "mlflow.note.content": (
                            f"Drift monitoring of {model} version {version}: one step per "
                            "window; HTML reports under reports/."
                        ),
                    },
                )
                run_id = run.info.run_id
                # Another monitor sharing the store may have created one at the same
                # time: every monitor keeps the oldest, and a later twin is deleted.
                oldest = self.find_run(model, version)
                if oldest is not None and oldest != run_id:
                    self.client.delete_run(run_id)
                    run_id = oldest
            self._runs[key] = run_id
            return run_id

    def log_window(self, summary: WindowSummary, stored: dict[str, Any], html: str) -> str:
        """Log a window's metrics (step = window index) and its report; returns the run id."""
        from mlflow.entities import Metric

        run_id = self.run_id(summary.model, summary.version)
        timestamp = int(summary.closed_at * 1000)
        values = window_metrics(summary, stored.get("drift") or {})
        values.update(_performance_metrics("estimated", stored.get("estimate")))
        metrics = [
            Metric(key, value, timestamp, summary.window_index) for key, value in values.items()
        ]
        for start in range(0, len(metrics), 1000):  # MLflow's per-call limit
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])
        self.client.log_text(run_id, html, report_artifact(summary.window_index))
        self.client.log_text(
            run_id,
            json.dumps(stored, indent=1),
            report_artifact(summary.window_index).replace(".html", ".json"),
        )
        return run_id

    def log_performance(
        self, model: str, version: str, windows: list[tuple[int, dict[str, Any]]]
    ) -> None:
        """Log windows' realized metrics (``performance.realized.<metric>``, step = window
        index) and their labelled rows; a window logged again as labels arrive gets its
        newest values at the same step."""
        from mlflow.entities import Metric

        run_id = self.run_id(model, version)
        now = int(time.time() * 1000)
        metrics = []
        for index, window in windows:
            values = _performance_metrics("realized", window.get("realized"))
            values["performance.labelled_rows"] = float(window["labelled_rows"])
            metrics.extend(Metric(k, v, now, index) for k, v in values.items())
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(run_id, metrics=metrics[start : start + 1000])

    def log_estimate(
        self, model: str, version: str, window_index: int, estimate: dict[str, Any]
    ) -> None:
        """Log a window's CBPE estimate made after the window was logged (step = index)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, v, now, window_index)
            for k, v in _performance_metrics("estimated", estimate).items()
        ]
        if metrics:
            self.client.log_batch(self.run_id(model, version), metrics=metrics)


def _performance_metrics(kind: str, values: dict[str, Any] | None) -> dict[str, float]:
    """``{"performance.<kind>.<metric>": value}`` for the numeric metrics of ``values``."""
    out = {}
    for name, value in (values or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and name != "rows":
            out[metric_key("performance", kind, name)] = float(value)
    return out
