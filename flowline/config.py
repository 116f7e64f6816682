"""Where flowline keeps its state and which ports it uses; all overridable by environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def home() -> Path:
    """flowline's home folder: $FLOWLINE_HOME, else ./.flowline in the working directory."""
    return Path(os.environ.get("FLOWLINE_HOME", ".flowline")).expanduser().resolve()


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


@dataclass(frozen=True)
class Ports:
    """The platform's ports (DESIGN.md's defaults), each overridable by FLOWLINE_*_PORT."""

    tracking: int = _env_int("FLOWLINE_TRACKING_PORT", 5000)
    gateway: int = _env_int("FLOWLINE_GATEWAY_PORT", 8080)
    controller: int = _env_int("FLOWLINE_CONTROLLER_PORT", 8081)
    monitor: int = _env_int("FLOWLINE_MONITOR_PORT", 8082)
    replicas_from: int = _env_int("FLOWLINE_REPLICA_PORT_FROM", 9000)
