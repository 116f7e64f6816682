"""Where flowline keeps its state and which ports it uses; all overridable by environment."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from common.processes import PRIVATE_UMASK


def home() -> Path:
    """flowline's home folder: $FLOWLINE_HOME, else ./.flowline in the working directory."""
    return Path(os.environ.get("FLOWLINE_HOME", ".flowline")).expanduser().resolve()


def make_private(path: Path, set_umask: bool = True) -> Path:
    """Take group and other access off ``path`` and everything already in it (a home
    made before), and set the private umask for this process and its children."""
    if set_umask:
        os.umask(PRIVATE_UMASK)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    for folder, dirs, files in os.walk(path):
        for entry in [folder, *(os.path.join(folder, f) for f in files)]:
            mode = os.lstat(entry).st_mode
            if stat.S_ISLNK(mode) or not mode & 0o077:
                continue
            os.chmod(entry, stat.S_IMODE(mode) & 0o700)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(folder, d))]
    return path


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
