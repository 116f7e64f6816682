"""The container backend: each replica is one container of its version's own image.

Containers use the host's network and bind 127.0.0.1 only, so a replica is reached
exactly as a local process replica is, and the gateway and controller do not change.
They run as nobody, with every capability dropped and the CPU and memory limits of the
registered model's ``flowline.resources`` tag. Labels tie each container to its model,
version, port and flowline home: a restarted controller adopts them by those labels,
and stopping flowline removes every one of them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import docker
import requests
from docker.errors import APIError, DockerException, NotFound
from docker.models.containers import Container
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.utils.models import get_model_name_and_version

from common.registry import RESOURCES_MODEL_TAG
from common.settings import EnvFloat, FlowlineBaseSettings
from serving.backends.artifacts import download_version
from serving.backends.base import BackendError, Replica
from serving.backends.ports import PORT_ATTEMPTS, PortPool, PortTaken
from serving.images.builder import LABEL, BuiltImage, ImageBuilder, ImageBuildError, slug

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_SECONDS = 180.0
STOP_GRACE_SECONDS = 10
DEFAULT_CPUS = 1.0
DEFAULT_MEMORY = "2g"


class ReplicaResourceSettings(FlowlineBaseSettings):
    """A container replica's limits when its model has no ``flowline.resources`` tag."""

    replica_cpus: EnvFloat = DEFAULT_CPUS
    replica_memory: str = DEFAULT_MEMORY


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


@dataclass(frozen=True)
class Resources:
    """A replica container's limits: CPUs (fractions allowed) and memory in bytes."""

    cpus: float
    memory_bytes: int

    @classmethod
    def parse(cls, tag: str | None, default_cpus: float, default_memory: str) -> Resources:
        """Read ``{"cpus": 1, "memory": "1g"}``; a missing key takes the default.

        A bad tag is the user's mistake, reported in one line on the version's tags,
        never a container started without limits.
        """
        try:
            spec = json.loads(tag) if tag else {}
            if not isinstance(spec, dict) or set(spec) - {"cpus", "memory"}:
                raise ValueError("expected an object with the keys cpus and memory")
            cpus = float(spec.get("cpus", default_cpus))
            memory = _memory_bytes(str(spec.get("memory", default_memory)))
        except (TypeError, ValueError) as exc:
            raise BackendError(f"tag {RESOURCES_MODEL_TAG}={tag!r} is invalid: {exc}") from None
        if not 0.01 <= cpus <= (os.cpu_count() or 1):
            raise BackendError(
                f"tag {RESOURCES_MODEL_TAG}: cpus must be between 0.01 and {os.cpu_count()}"
            )
        if memory < 64 * 1024**2:
            raise BackendError(f"tag {RESOURCES_MODEL_TAG}: memory must be at least 64m")
        return cls(cpus, memory)


def _memory_bytes(text: str) -> int:
    match = _MEMORY.match(text)
    if match is None:
        raise ValueError(f"memory {text!r} is not a size such as 512m or 2g")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def docker_client() -> docker.DockerClient:
    """A client for the daemon of ``$DOCKER_HOST`` (or the local socket), checked live."""
    try:
        client = docker.from_env()
        client.ping()
    except DockerException as exc:
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise BackendError(f"no Docker daemon answers ({first}): start dockerd") from None
    return client


class DockerBackend:
    """Runs replicas as containers of per-version images on consecutive loopback ports."""

    def __init__(
        self,
        tracking_uri: str,
        state_dir: Path,
        host: str = "127.0.0.1",
        port_from: int = 9000,
        ports: PortPool | None = None,
        workers: int = 1,
        startup_timeout: float = STARTUP_TIMEOUT_SECONDS,
        client: docker.DockerClient | None = None,
        builder: ImageBuilder | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.state_dir = state_dir
        self.host = host
        self.workers = workers
        self.startup_timeout = startup_timeout
        self.client = client or docker_client()
        self.builder = builder or ImageBuilder(self.client, state_dir)
        # Shared when several backends run side by side, so they never pick the same port.
        self.ports = ports or PortPool(host, port_from)
        defaults = ReplicaResourceSettings.from_env()
        self.default_cpus = defaults.replica_cpus
        self.default_memory = defaults.replica_memory
        self._lock = threading.Lock()
        self._live: dict[str, Replica] = {}
        self._images: dict[tuple[str, str], str] = {}
        self._image_lock = threading.Lock()
        (state_dir / "logs").mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- images ------------------------------------------------------------------------

    def image(self, model: str, version: str, model_uri: str) -> str:
        """The version's image tag, built on first use; raise BackendError with the
        build's own error line when it cannot be built."""
        key = (model, version)
        with self._image_lock:
            if key in self._images and not self.builder.exists(self._images[key]):
                del self._images[key]  # removed from the daemon since: build it again
            if key not in self._images:
                built = build_version_image(
                    self.builder, model, version, model_uri, self.tracking_uri
                )
                self._images[key] = built.tag
            return self._images[key]

    def _resources(self, model: str) -> Resources:
        try:
            tags = (
                MlflowClient(self.tracking_uri, self.tracking_uri).get_registered_model(model).tags
            )
        except MlflowException as exc:
            raise BackendError(f"could not read {model}'s tags: {exc.message}") from None
        return Resources.parse(
            tags.get(RESOURCES_MODEL_TAG), self.default_cpus, self.default_memory
        )

    # -- replicas ----------------------------------------------------------------------

    def start_replica(self, model: str, version: str, model_uri: str) -> Replica:
        """Build or reuse the version's image, run one container and wait for ``/ping``."""
        tag = self.image(model, version, model_uri)
        resources = self._resources(model)
        for attempt in range(PORT_ATTEMPTS):
            try:
                return self._run(model, version, tag, resources)
            except PortTaken:
                if attempt == PORT_ATTEMPTS - 1:
                    raise BackendError(
                        f"replica of {model}/{version}: no port could be bound"
                    ) from None
        raise AssertionError("unreachable")

    def _labels(self, model: str, version: str, port: int) -> dict[str, str]:
        return {
            f"{LABEL}.role": "replica",
            f"{LABEL}.home": str(self.state_dir),
            f"{LABEL}.model": model,
            f"{LABEL}.version": version,
            f"{LABEL}.port": str(port),
        }

    def _run(self, model: str, version: str, tag: str, resources: Resources) -> Replica:
        port = self.ports.take()
        name = f"flowline-{slug(model)}-v{slug(version)}-{port}"
        self._remove_named(name)
        try:
            container = self.client.containers.run(
                tag,
                ["-h", self.host, "-p", str(port), "-w", str(self.workers)],
                name=name,
                detach=True,
                network_mode="host",
                # tini as pid 1: `mlflow models serve` forks its server, and a plain pid 1
                # ignores SIGTERM, so every stop would wait for the kill timeout.
                init=True,
                labels=self._labels(model, version, port),
                nano_cpus=int(resources.cpus * 1e9),
                mem_limit=resources.memory_bytes,
                memswap_limit=resources.memory_bytes,  # no swap: the limit is the limit
                cap_drop=["ALL"],
                security_opt=["no-new-privileges"],
                pids_limit=512,
                environment={"PYTHONUNBUFFERED": "1"},
            )
        except (APIError, DockerException) as exc:
            self.ports.release(port)
            raise BackendError(f"replica of {model}/{version}: docker run failed: {exc}") from None
        replica = Replica(model, version, f"http://{self.host}:{port}", container)
        try:
            self._wait_healthy(replica)
        except PortTaken:
            self._discard(replica)
            self.ports.hold(port)  # someone else holds it: never offer it again
            raise
        except BackendError:
            self._discard(replica)
            raise
        with self._lock:
            self._live[replica.url] = replica
        return replica

    def _wait_healthy(self, replica: Replica) -> None:
        container: Container = replica.handle
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if _pings(replica.url):
                return
            try:
                container.reload()
            except NotFound:
                raise BackendError(
                    f"replica of {replica.model}/{replica.version} vanished"
                ) from None
            if container.status in ("exited", "dead"):
                tail = _logs(container, 40)
                if "address already in use" in tail.lower():
                    raise PortTaken()
                code = container.attrs.get("State", {}).get("ExitCode")
                oom = container.attrs.get("State", {}).get("OOMKilled")
                why = "killed for memory (raise flowline.resources)" if oom else _last_line(tail)
                raise BackendError(
                    f"replica of {replica.model}/{replica.version} exited ({code}): {why}"
                )
            time.sleep(0.25)
        raise BackendError(
            f"replica of {replica.model}/{replica.version} did not answer /ping within "
            f"{self.startup_timeout:.0f} s"
        )

    def is_alive(self, replica: Replica) -> bool:
        """True while the replica's container is running."""
        try:
            replica.handle.reload()
        except (NotFound, APIError, DockerException):
            return False
        return replica.handle.status == "running"

    def _discard(self, replica: Replica) -> None:
        """Remove the container, keeping its last output in the replica's log file."""
        container: Container = replica.handle
        port = replica.url.rsplit(":", 1)[1]
        log_path = self.state_dir / "logs" / f"replica-{replica.model}-{replica.version}-{port}.log"
        try:
            log_path.write_text(_logs(container, 500))
            container.stop(timeout=STOP_GRACE_SECONDS)
            container.remove(force=True)
        except NotFound:
            pass
        except (APIError, DockerException) as exc:
            log.warning("could not remove container %s: %s", container.name, exc)

    def stop_replica(self, replica: Replica) -> None:
        """Stop and remove the replica's container and release its port; idempotent."""
        self._discard(replica)
        with self._lock:
            self._live.pop(replica.url, None)
        self.ports.release(int(replica.url.rsplit(":", 1)[1]))

    def stop_all(self) -> None:
        """Stop every replica of this flowline home, including ones it did not start."""
        with self._lock:
            replicas = list(self._live.values())
        for replica in replicas:
            self.stop_replica(replica)
        remove_containers(self.client, self.state_dir)

    def _remove_named(self, name: str) -> None:
        # A container of that name is a leftover of a crash: its port is ours again.
        try:
            self.client.containers.get(name).remove(force=True)
        except NotFound:
            pass

    def adopt_running(self) -> list[Replica]:
        """Running replica containers of this home, left by a controller that died.

        They are taken over rather than restarted, so the gateway keeps serving across
        the restart; a labelled container that is not running or does not answer
        ``/ping`` is removed.
        """
        adopted = []
        for container in self._ours(all_states=True):
            labels = container.labels
            port = int(labels[f"{LABEL}.port"])
            replica = Replica(
                labels[f"{LABEL}.model"],
                labels[f"{LABEL}.version"],
                f"http://{self.host}:{port}",
                container,
            )
            if container.status != "running" or not _pings(replica.url):
                self._discard(replica)
                continue
            self.ports.hold(port)
            with self._lock:
                self._live[replica.url] = replica
            if container.image.tags:
                self._images[(replica.model, replica.version)] = container.image.tags[0]
            adopted.append(replica)
        return adopted

    def _ours(self, all_states: bool) -> list[Container]:
        return containers_of(self.client, self.state_dir, all_states)


def build_version_image(
    builder: ImageBuilder, model: str, version: str, model_uri: str, tracking_uri: str
) -> BuiltImage:
    """Download the version and build (or reuse) its image; BackendError on failure, with
    the build's own last error line."""
    staging = builder.home / "models" / quote(model, safe="") / quote(version, safe="")
    try:
        download_version(model_uri, staging, tracking_uri)
        built = builder.image_for(model, version, staging)
    except ImageBuildError as exc:
        raise BackendError(f"image build failed: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # the image holds the model now
    if built.built:
        log.info("built %s for %s/%s in %.0f s", built.tag, model, version, built.seconds)
    return built


def build_image(model_uri: str, tracking_uri: str, home: Path) -> BuiltImage:
    """``flowline image build``: the image of ``models:/NAME/VERSION`` or ``@ALIAS``."""
    client = MlflowClient(tracking_uri, tracking_uri)
    try:
        model, version = get_model_name_and_version(client, model_uri)
    except (MlflowException, ValueError) as exc:
        message = exc.message if isinstance(exc, MlflowException) else str(exc)
        raise BackendError(message.splitlines()[0]) from None
    builder = ImageBuilder(docker_client(), home)
    return build_version_image(builder, model, str(version), model_uri, tracking_uri)


def containers_of(
    client: docker.DockerClient, home: Path, all_states: bool = True
) -> list[Container]:
    """The replica containers that carry ``home``'s label."""
    filters: dict[str, Any] = {"label": [f"{LABEL}.role=replica", f"{LABEL}.home={home}"]}
    return client.containers.list(all=all_states, filters=filters)


def remove_containers(client: docker.DockerClient, home: Path) -> int:
    """Stop and remove every replica container of ``home``; how many there were."""
    found = containers_of(client, home)
    for container in found:
        try:
            container.stop(timeout=STOP_GRACE_SECONDS)
            container.remove(force=True)
        except NotFound:
            pass
    return len(found)


def _pings(url: str) -> bool:
    try:
        return requests.get(f"{url}/ping", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _logs(container: Container, lines: int) -> str:
    try:
        return container.logs(tail=lines).decode(errors="replace")
    except (NotFound, APIError):
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"
