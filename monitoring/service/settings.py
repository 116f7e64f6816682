"""The monitor's settings, read from FLOWLINE_* variables (see docs/monitoring.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from common.settings import (
    CommaList,
    EnvFloat,
    EnvInt,
    FlowlineBaseSettings,
    HomeSettings,
    Port,
    dataclass_values,
)
from monitoring.service.store import default_url
from monitoring.service.stream_gate import DEFAULT_MAX_STREAMS

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8082
DEFAULT_WINDOW_ROWS = 1000
DEFAULT_WINDOW_SECONDS = 300.0
DEFAULT_RETENTION_DAYS = 30.0
DEFAULT_EXPERIMENT = "flowline-monitoring"
DEFAULT_PERFORMANCE_MARGIN = 0.05
DEFAULT_PERFORMANCE_MIN_ROWS = 50
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
    public_url: base URL used in report links (defaults to http://host:port, https
        under TLS: docs/tls.md).
    max_streams: FLOWLINE_MONITOR_MAX_STREAMS, the most (model, version) streams
        the monitor takes on (see monitoring.service.stream_gate).
    experiment: MLflow experiment holding the monitoring runs.
    performance_margin: how much worse than its test value (in the metric's units) a
        version's realized metric may be before it is degraded and alerted.
    performance_min_rows: labelled rows a window needs before its realized metric counts.
    estimate_enabled: FLOWLINE_MONITOR_ESTIMATE; off: no probability scoring, no CBPE.
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
    performance_margin: float = DEFAULT_PERFORMANCE_MARGIN
    performance_min_rows: int = DEFAULT_PERFORMANCE_MIN_ROWS
    estimate_enabled: bool = True

    def __post_init__(self) -> None:
        if self.window_rows < 1:
            raise ValueError("FLOWLINE_WINDOW_ROWS must be >= 1")
        if self.window_seconds <= 0:
            raise ValueError("FLOWLINE_WINDOW_SECONDS must be > 0")
        if self.alert_format not in ALERT_FORMATS:
            raise ValueError(f"FLOWLINE_ALERT_FORMAT must be one of {ALERT_FORMATS}")
        if self.max_streams < 1:
            raise ValueError("FLOWLINE_MONITOR_MAX_STREAMS must be >= 1")
        if not 0 <= self.performance_margin < float("inf"):
            raise ValueError("FLOWLINE_PERFORMANCE_MARGIN must be a finite number >= 0")
        if self.performance_min_rows < 1:
            raise ValueError("FLOWLINE_PERFORMANCE_MIN_ROWS must be >= 1")

    @property
    def store_url(self) -> str:
        """The SQLAlchemy URL of the monitor's store."""
        return self.db_url or default_url(self.home)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MonitorSettings:
        """Read the FLOWLINE_* and MLFLOW_TRACKING_URI variables; a bad one: one-line ValueError."""
        return cls(**dataclass_values(MonitorEnvSettings.from_env(environ), cls))


def _alert_format(value: Any) -> Any:
    # Case and spaces do not matter; empty is the default. The accepted formats are
    # checked by MonitorSettings, for settings given in code too.
    return (value.strip().lower() or "json") if isinstance(value, str) else value


def _switch(value: Any) -> Any:
    # Anything but these exact spellings is on, as the variable was always read.
    return value not in ("0", "false", "no") if isinstance(value, str) else value


def _base_url(value: Any) -> Any:
    return value.rstrip("/") if isinstance(value, str) else value


class MonitorEnvSettings(HomeSettings):
    """The monitor's variables, typed (`MonitorSettings.from_env` reads them; docs/monitoring.md).

    Range checks that also apply to settings given in code (window sizes, the alert
    format, the stream limit) stay in `MonitorSettings`.
    """

    db_url: str = Field("", validation_alias="FLOWLINE_MONITOR_DB")
    tracking_uri: str = Field("", validation_alias="MLFLOW_TRACKING_URI")
    window_rows: EnvInt = DEFAULT_WINDOW_ROWS
    window_seconds: EnvFloat = DEFAULT_WINDOW_SECONDS
    retention_days: EnvFloat = Field(
        DEFAULT_RETENTION_DAYS, validation_alias="FLOWLINE_MONITOR_RETENTION_DAYS"
    )
    alert_webhooks: CommaList = ()
    alert_format: Annotated[str, BeforeValidator(_alert_format)] = "json"
    alert_max_attempts: EnvInt = 8
    alert_backoff_s: EnvFloat = 1.0
    public_url: Annotated[str, BeforeValidator(_base_url)] = Field(
        "", validation_alias="FLOWLINE_MONITOR_PUBLIC_URL"
    )
    experiment: str = Field(DEFAULT_EXPERIMENT, validation_alias="FLOWLINE_MONITOR_EXPERIMENT")
    poll_interval_s: EnvFloat = Field(0.5, validation_alias="FLOWLINE_MONITOR_POLL_S")
    mlflow_enabled: Annotated[bool, BeforeValidator(_switch)] = Field(
        True, validation_alias="FLOWLINE_MONITOR_MLFLOW"
    )
    max_streams: EnvInt = Field(
        DEFAULT_MAX_STREAMS, validation_alias="FLOWLINE_MONITOR_MAX_STREAMS"
    )
    performance_margin: EnvFloat = DEFAULT_PERFORMANCE_MARGIN
    performance_min_rows: EnvInt = DEFAULT_PERFORMANCE_MIN_ROWS
    estimate_enabled: Annotated[bool, BeforeValidator(_switch)] = Field(
        True, validation_alias="FLOWLINE_MONITOR_ESTIMATE"
    )


class MonitorPortSettings(FlowlineBaseSettings):
    """FLOWLINE_MONITOR_PORT, the port `python -m monitoring` binds without --port."""

    monitor_port: Port = DEFAULT_PORT


def port_from_env(environ: Mapping[str, str] | None = None) -> int:
    """The monitor's port from FLOWLINE_MONITOR_PORT (default 8082); a bad one: ValueError."""
    return MonitorPortSettings.from_env(environ).monitor_port
