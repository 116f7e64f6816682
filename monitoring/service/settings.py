"""The monitor's settings, read from FLOWLINE_* variables (see docs/monitoring.md)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from monitoring.service.store import default_url
from monitoring.service.stream_gate import DEFAULT_MAX_STREAMS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8082
DEFAULT_WINDOW_ROWS = 1000
DEFAULT_WINDOW_SECONDS = 300.0
DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_EXPERIMENT = "flowline-monitoring"
ALERT_FORMATS = ("json", "slack")


@dataclass(frozen=True)
class MonitorSettings:
    """Everything the monitor process needs.

    home: FLOWLINE_HOME (the SQLite store lives there by default).
    db_url: FLOWLINE_MONITOR_DB; SQLite under home when empty.
    tracking_uri: MLFLOW_TRACKING_URI (registry for baselines, runs for metrics);
        empty keeps MLflow's own default.
    window_rows / window_seconds: a window closes at this many rows, or when its
        oldest row has waited this long (whichever comes first).
    retention_days: captured rows, windows and settled alerts older than this
        are deleted (0 keeps everything).
    alert_webhooks / alert_format: where drift state changes are POSTed, as
        flowline JSON or a Slack-compatible {"text": ...} body.
    public_url: base URL used in report links (defaults to http://host:port).
    max_streams: FLOWLINE_MONITOR_MAX_STREAMS, the most (model, version) streams
        the monitor takes on (see monitoring.service.stream_gate).
    experiment: MLflow experiment holding the monitoring runs.
    """

    home: Path = field(default_factory=lambda: Path(".flowline").resolve())
    db_url: str = ""
    tracking_uri: str = ""
    window_rows: int = DEFAULT_WINDOW_ROWS
    window_seconds: float = DEFAULT_WINDOW_SECONDS
    retention_days: float = DEFAULT_RETENTION_DAYS
    alert_webhooks: tuple[str, ...] = ()
    alert_format: str = "json"
    alert_max_attempts: int = 8
    alert_backoff_s: float = 1.0
    alert_max_backoff_s: float = 300.0
    public_url: str = ""
    experiment: str = DEFAULT_EXPERIMENT
    poll_interval_s: float = 0.5
    mlflow_enabled: bool = True
    max_streams: int = DEFAULT_MAX_STREAMS

    def __post_init__(self) -> None:
        if self.window_rows < 1:
            raise ValueError("FLOWLINE_WINDOW_ROWS must be >= 1")
        if self.window_seconds <= 0:
            raise ValueError("FLOWLINE_WINDOW_SECONDS must be > 0")
        if self.alert_format not in ALERT_FORMATS:
            raise ValueError(f"FLOWLINE_ALERT_FORMAT must be one of {ALERT_FORMATS}")
        if self.max_streams < 1:
            raise ValueError("FLOWLINE_MONITOR_MAX_STREAMS must be >= 1")

    @property
    def store_url(self) -> str:
        """The SQLAlchemy URL of the monitor's store."""
        return self.db_url or default_url(self.home)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MonitorSettings:
        """Read the FLOWLINE_* and MLFLOW_TRACKING_URI variables."""
        env = os.environ if environ is None else environ
        hooks = tuple(
            u.strip() for u in env.get("FLOWLINE_ALERT_WEBHOOKS", "").split(",") if u.strip()
        )
        return cls(
            home=Path(env.get("FLOWLINE_HOME", ".flowline")).expanduser().resolve(),
            db_url=env.get("FLOWLINE_MONITOR_DB", ""),
            tracking_uri=env.get("MLFLOW_TRACKING_URI", ""),
            window_rows=int(env.get("FLOWLINE_WINDOW_ROWS", DEFAULT_WINDOW_ROWS)),
            window_seconds=float(env.get("FLOWLINE_WINDOW_SECONDS", DEFAULT_WINDOW_SECONDS)),
            retention_days=float(
                env.get("FLOWLINE_MONITOR_RETENTION_DAYS", DEFAULT_RETENTION_DAYS)
            ),
            alert_webhooks=hooks,
            alert_format=env.get("FLOWLINE_ALERT_FORMAT", "json").strip().lower() or "json",
            alert_max_attempts=int(env.get("FLOWLINE_ALERT_MAX_ATTEMPTS", 8)),
            alert_backoff_s=float(env.get("FLOWLINE_ALERT_BACKOFF_S", 1.0)),
            public_url=env.get("FLOWLINE_MONITOR_PUBLIC_URL", "").rstrip("/"),
            experiment=env.get("FLOWLINE_MONITOR_EXPERIMENT", DEFAULT_EXPERIMENT),
            poll_interval_s=float(env.get("FLOWLINE_MONITOR_POLL_S", 0.5)),
            mlflow_enabled=env.get("FLOWLINE_MONITOR_MLFLOW", "1") not in ("0", "false", "no"),
            max_streams=int(env.get("FLOWLINE_MONITOR_MAX_STREAMS", DEFAULT_MAX_STREAMS)),
        )
