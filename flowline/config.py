"""Where flowline keeps its state and which ports it uses; all overridable by environment."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.processes import PRIVATE_UMASK
from common.settings import EnvFloat, EnvInt, FlowlineBaseSettings, HomeSettings, Port


def home() -> Path:
    """flowline's home folder: $FLOWLINE_HOME, else ./.flowline in the working directory."""
    return HomeSettings.from_env().home


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


class PortSettings(FlowlineBaseSettings):
    """The FLOWLINE_*_PORT variables (DESIGN.md's defaults)."""

    tracking_port: Port = 5000
    gateway_port: Port = 8080
    controller_port: Port = 8081
    monitor_port: Port = 8082
    replica_port_from: Port = 9000


def _from_env(name: str) -> Callable[[], int]:
    # Read when a Ports is made, not when this module is imported: a variable set after
    # import counts, and a bad one fails the call that needs it (SettingsError, one line).
    return lambda: getattr(PortSettings.from_env(), name)


@dataclass(frozen=True)
class Ports:
    """The platform's ports; those not given come from FLOWLINE_*_PORT (`PortSettings`)."""

    tracking: int = field(default_factory=_from_env("tracking_port"))
    gateway: int = field(default_factory=_from_env("gateway_port"))
    controller: int = field(default_factory=_from_env("controller_port"))
    monitor: int = field(default_factory=_from_env("monitor_port"))
    replicas_from: int = field(default_factory=_from_env("replica_port_from"))


class PlatformSettings(FlowlineBaseSettings):
    """The FLOWLINE_* defaults of `flowline up` and its subcommands (each also a flag)."""

    backend_store_uri: str = ""
    artifacts_destination: str = ""
    auth: str = ""  # exactly "1" turns basic auth on, as documented
    replicas: EnvInt = 1
    backend: str = "local"
    reconcile_interval_s: EnvFloat = 5.0
    # Rows per drift window; the demo sends one window of each kind.
    window_rows: EnvInt = 1000
    api_keys: str = ""
    api_keys_file: str = ""

    @property
    def auth_on(self) -> bool:
        """Whether FLOWLINE_AUTH asks for basic auth."""
        return self.auth == "1"

    @property
    def has_api_keys(self) -> bool:
        """Whether the gateway will get API keys from the environment."""
        return bool(self.api_keys or self.api_keys_file)
