"""The image a Kubernetes replica runs: the docker backend's version image, pushed.

The image is built exactly as the docker backend builds it (`build_version_image`,
tag ``flowline-model/<model>:v<version>-<digest>``, see serving/images/builder.py), then
tagged ``<registry>/flowline-model/<model>:v<version>-<digest>`` and pushed with the
Docker SDK's ``images.push`` to ``FLOWLINE_K8S_REGISTRY``. With no registry set, the
local tag is the reference and nothing is pushed: the images are loaded into the
cluster by hand (``kind load docker-image``, ``k3s ctr images import``). Pushing uses
the Docker daemon's own credentials (``docker login`` on that daemon).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import docker
from docker.errors import APIError, DockerException, ImageNotFound

from serving.backends.base import BackendError
from serving.backends.docker import build_version_image, docker_client
from serving.images.builder import BuiltImage, ImageBuilder

log = logging.getLogger(__name__)


class ImageSource(Protocol):
    """Where a replica's image reference comes from."""

    def reference(self, model: str, version: str, model_uri: str) -> str:
        """The image reference the cluster pulls for ``model``/``version``."""
        ...


Build = Callable[[str, str, str], BuiltImage]


def remote_reference(registry: str, local_tag: str) -> str:
    """``local_tag`` under ``registry`` (a host with an optional path, no trailing /)."""
    return f"{registry.rstrip('/')}/{local_tag}" if registry else local_tag


class RegistryPublisher:
    """Builds each version's image once, pushes it once, and remembers the reference.

    The Docker client is made on first use: adopting, checking and stopping replicas
    need no daemon, only starting a new version does.
    """

    def __init__(
        self,
        tracking_uri: str,
        home: Path,
        registry: str,
        client: docker.DockerClient | None = None,
        build: Build | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.home = home
        self.registry = registry.rstrip("/")
        self._client = client
        self._build = build
        self._references: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def _docker(self) -> docker.DockerClient:
        if self._client is None:
            self._client = docker_client()
        return self._client

    def _built(self, model: str, version: str, model_uri: str) -> BuiltImage:
        if self._build is not None:
            return self._build(model, version, model_uri)
        builder = ImageBuilder(self._docker(), self.home)
        return build_version_image(builder, model, version, model_uri, self.tracking_uri)

    def reference(self, model: str, version: str, model_uri: str) -> str:
        """Build (or reuse) and push the version's image; BackendError with the daemon's
        own reason when either fails."""
        key = (model, version)
        # One lock for all versions: replicas of one version start in parallel and must
        # not build or push twice; builds of different versions share one daemon anyway.
        with self._lock:
            if key not in self._references:
                built = self._built(model, version, model_uri)
                self._references[key] = self._push(built.tag)
            return self._references[key]

    def _push(self, local_tag: str) -> str:
        """Tag ``local_tag`` under the registry and push it; the remote reference."""
        remote = remote_reference(self.registry, local_tag)
        if not self.registry:
            return remote
        repository, _, tag = remote.rpartition(":")
        try:
            self._docker().images.get(local_tag).tag(repository, tag)
            stream = self._docker().images.push(repository, tag=tag, stream=True, decode=True)
            for chunk in stream:
                # The daemon reports a failed push in the stream, not as an HTTP error.
                error = _error_of(chunk)
                if error:
                    raise BackendError(f"image push of {remote} failed: {error}")
        except ImageNotFound:
            raise BackendError(f"image {local_tag} vanished before its push") from None
        except (APIError, DockerException) as exc:
            first = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            raise BackendError(f"image push of {remote} failed: {first}") from None
        log.info("pushed %s", remote)
        return remote


def _error_of(chunk: Any) -> str | None:
    if not isinstance(chunk, dict):
        return None
    detail = chunk.get("errorDetail")
    message = chunk.get("error") or (detail.get("message") if isinstance(detail, dict) else None)
    return " ".join(str(message).split())[:300] if message else None
