"""Choose the backend by name: ``local`` (the embedded default), ``docker`` or
``kubernetes``."""

from __future__ import annotations

from pathlib import Path

from serving.backends.base import Backend
from serving.backends.local import LocalProcessBackend
from serving.backends.ports import PortPool

BACKENDS = ("local", "docker", "kubernetes")


def create_backend(
    kind: str, tracking_uri: str, home: Path, ports: PortPool, env_manager: str = "local"
) -> Backend:
    """The backend named ``kind``, on the shared ``ports``; the docker one checks its daemon
    now, and the kubernetes one its configuration (FLOWLINE_K8S_*, docs/kubernetes.md), so
    a missing one is one clear error instead of a failure per rollout."""
    if kind == "local":
        return LocalProcessBackend(tracking_uri, home, ports=ports, env_manager=env_manager)
    if kind == "docker":
        # Imported here: the docker SDK is needed only by those who choose containers.
        from serving.backends.docker import DockerBackend

        return DockerBackend(tracking_uri, home, ports=ports)
    if kind == "kubernetes":
        # Imported here: the kubernetes client (a large package) loads only when chosen.
        from serving.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(tracking_uri, home)
    raise ValueError(f"unknown backend {kind!r}: choose one of {', '.join(BACKENDS)}")
