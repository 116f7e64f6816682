"""The backend protocol the controller drives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class Replica:
    """One running scoring server for one model version."""

    model: str
    version: str
    url: str
    handle: Any = field(default=None, repr=False, compare=False)


class BackendError(RuntimeError):
    """A replica could not be started or did not become healthy."""


class Backend(Protocol):
    """Starts, checks and stops `mlflow models serve` replicas."""

    def start_replica(self, model: str, version: str, model_uri: str) -> Replica:
        """Start one replica and return once it answers ``/ping``; raise BackendError."""
        ...

    def is_alive(self, replica: Replica) -> bool:
        """True while the replica's process or container runs."""
        ...

    def stop_replica(self, replica: Replica) -> None:
        """Stop the replica and free its resources; idempotent."""
        ...

    def stop_all(self) -> None:
        """Stop every replica this backend started."""
        ...

    def adopt_running(self) -> list[Replica]:
        """Replicas a controller that died left running, taken over without a restart."""
        ...
