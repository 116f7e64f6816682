"""Per-version OCI images that serve one model version with `mlflow models serve`.

An image is two layers on top of ``FLOWLINE_BASE_IMAGE``:

1. **the environment**, a virtualenv at ``/opt/flowline/env`` built from the version's
   ``requirements.txt`` and ``python_env.yaml``, as ``mlflow models build-docker`` does.
   It is tagged by the digest of the base image and the requirements, so every version
   with the same requirements shares it;
2. **the model**, the version's artifacts baked in at ``/opt/flowline/model``, tagged by
   the digest of their content: a second promotion of the same version reuses it.

The packages are resolved on the host into a wheelhouse under ``FLOWLINE_HOME`` with
the host's own pip settings (index, certificates, proxy, cache), then installed in a
build container that has no network at all. That is how an air-gapped site builds
too, and nothing in the build can reach a service on the host.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import docker
import mlflow
import requests
import yaml
from docker.errors import APIError, BuildError, DockerException, ImageNotFound

from common.settings import FlowlineBaseSettings

DEFAULT_BASE_IMAGE = "python:3.11-slim"


class ImageSettings(FlowlineBaseSettings):
    """FLOWLINE_BASE_IMAGE: the image environment layers start from (empty: the default)."""

    base_image: str = ""


# Bump when the recipe below changes, so images built by an older one are not reused.
RECIPE = "1"
ENV_ROOT = "/opt/flowline/env"
MODEL_ROOT = "/opt/flowline/model"
LABEL = "io.flowline"
# Replicas run as nobody: model code must not run as root, even in a container.
REPLICA_USER = "65534:65534"
BUILD_TIMEOUT_S = 1800


class ImageBuildError(RuntimeError):
    """An image could not be built; the message is the build's own last error line."""


@dataclass(frozen=True)
class BuiltImage:
    """A model version's image, and whether this call had to build it."""

    tag: str
    digest: str
    built: bool
    seconds: float


def base_image() -> str:
    """The image every environment layer starts from: ``$FLOWLINE_BASE_IMAGE``."""
    return ImageSettings.from_env().base_image or DEFAULT_BASE_IMAGE


def tree_digest(root: Path, salt: Iterable[str] = ()) -> str:
    """sha256 over every file's relative path and bytes under ``root``, plus ``salt``."""
    digest = hashlib.sha256()
    for item in salt:
        digest.update(item.encode() + b"\0")
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def slug(name: str) -> str:
    """``name`` as a Docker repository component: lowercase ``[a-z0-9._-]``."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")
    return cleaned[:60] or "model"


def model_image_tag(model: str, version: str, digest: str) -> str:
    """The tag of a version's image: its model, its version and its content digest."""
    return f"flowline-model/{slug(model)}:v{slug(version)}-{digest[:16]}"


def last_error_line(log: str) -> str:
    """The line of a build log that says what went wrong: the last one naming an error,
    else the last non-empty one."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if re.search(r"\berror\b", line, re.IGNORECASE):
            return line[:500]
    return lines[-1][:500] if lines else "the image build failed"


def requirements_of(model_dir: Path) -> tuple[list[str], list[str]]:
    """The version's requirement lines and its ``python_env.yaml`` build dependencies.

    ``mlflow`` is added at this platform's version when the model does not name it,
    because the image runs ``mlflow models serve``.
    """
    path = model_dir / "requirements.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    requirements = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not any(re.match(r"mlflow(\[.*\])?\s*([=<>!~]|$)", r) for r in requirements):
        requirements.append(f"mlflow=={mlflow.__version__}")
    build_deps: list[str] = []
    env_file = model_dir / "python_env.yaml"
    if env_file.exists():
        spec = yaml.safe_load(env_file.read_text()) or {}
        build_deps = [str(dep) for dep in spec.get("build_dependencies") or []]
    return requirements, build_deps


class ImageBuilder:
    """Builds and caches version images on one Docker daemon; safe across threads."""

    def __init__(self, client: docker.DockerClient, home: Path, base: str | None = None) -> None:
        self.client = client
        self.home = home
        self.base = base or base_image()
        self.root = home / "images"
        self.wheelhouse = self.root / "wheels"
        self.logs = self.root / "logs"
        for folder in (self.root, self.wheelhouse, self.logs):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    def _base_id(self) -> str:
        try:
            return self.client.images.get(self.base).id
        except ImageNotFound:
            raise ImageBuildError(
                f"base image {self.base!r} is not on the Docker daemon: pull it, or run "
                "`flowline image base` and set FLOWLINE_BASE_IMAGE=flowline-base:bookworm"
            ) from None

    def image_for(self, model: str, version: str, model_dir: Path) -> BuiltImage:
        """The image serving ``model_dir``: reused when its digest was built before."""
        started = time.monotonic()
        base_id = self._base_id()
        digest = tree_digest(model_dir, salt=(RECIPE, base_id))
        tag = model_image_tag(model, version, digest)
        with self._lock(tag):
            if self.exists(tag):
                return BuiltImage(tag, digest, False, time.monotonic() - started)
            log_path = self.logs / f"{slug(model)}-v{slug(version)}-{digest[:12]}.log"
            with log_path.open("w") as log:
                try:
                    env_tag = self._environment(model_dir, log)
                    self._model_layer(model, version, digest, model_dir, env_tag, tag, log)
                except ImageBuildError as exc:
                    log.write(f"\nflowline: build failed: {exc}\n")
                    raise
                log.write(f"\nflowline: built {tag} in {time.monotonic() - started:.1f} s\n")
        return BuiltImage(tag, digest, True, time.monotonic() - started)

    def exists(self, tag: str) -> bool:
        """Whether the daemon holds an image tagged ``tag``."""
        try:
            self.client.images.get(tag)
        except ImageNotFound:
            return False
        return True

    # -- the environment layer -----------------------------------------------------

    def environment_tag(self, model_dir: Path) -> str:
        """The tag of the environment layer ``model_dir``'s requirements need."""
        requirements, build_deps = requirements_of(model_dir)
        # Order does not change what pip installs, so it does not change the environment.
        salt = json.dumps([RECIPE, self._base_id(), sorted(requirements), sorted(build_deps)])
        return f"flowline-env:{hashlib.sha256(salt.encode()).hexdigest()[:16]}"

    def _environment(self, model_dir: Path, log: io.TextIOBase) -> str:
        requirements, build_deps = requirements_of(model_dir)
        env_tag = self.environment_tag(model_dir)
        with self._lock(env_tag):
            if self.exists(env_tag):
                log.write(f"flowline: environment {env_tag} is cached\n")
                return env_tag
            workdir = self.root / "work" / env_tag.split(":")[1]
            workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            (workdir / "requirements.txt").write_text("\n".join(requirements) + "\n")
            (workdir / "build-requirements.txt").write_text("\n".join(build_deps) + "\n")
            self._fill_wheelhouse(workdir, log)
            self._install_in_container(workdir, env_tag, log)
        return env_tag

    def _fill_wheelhouse(self, workdir: Path, log: io.TextIOBase) -> None:
        """Resolve every package on the host, with its pip settings, into the wheelhouse."""
        python = self._python_version()
        host = f"{sys.version_info.major}.{sys.version_info.minor}"
        cross = [] if python == host else ["--python-version", python, "--only-binary=:all:"]
        for name in ("build-requirements.txt", "requirements.txt"):
            if not (workdir / name).read_text().strip():
                continue
            pip = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check"]
            argv = [*pip, "-d", str(self.wheelhouse), "-r", str(workdir / name), *cross]
            log.write(f"$ {' '.join(argv)}\n")
            log.flush()
            done = subprocess.run(
                argv, stdout=log, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S, check=False
            )
            if done.returncode != 0:
                log.flush()
                raise ImageBuildError(last_error_line(_tail(Path(log.name))))

    def _python_version(self) -> str:
        """``X.Y`` of the base image's ``python3``, asked of the image itself."""
        out = self._run_in_base(
            ["python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], {}
        )
        return out.strip().splitlines()[-1]

    def _run_in_base(self, command: list[str], volumes: dict[str, dict[str, str]]) -> str:
        try:
            output = self.client.containers.run(
                self.base,
                command,
                network_mode="none",
                volumes=volumes,
                remove=True,
                labels={f"{LABEL}.role": "build"},
            )
        except DockerException as exc:
            raise ImageBuildError(last_error_line(str(exc))) from None
        return output.decode(errors="replace")

    def _install_in_container(self, workdir: Path, env_tag: str, log: io.TextIOBase) -> None:
        """Install the wheelhouse into a venv in a container with no network; commit it."""
        pip = f"{ENV_ROOT}/bin/pip install --no-index --find-links /wheels"
        build_deps = "/build/build-requirements.txt"
        script = "; ".join(
            [
                "set -e",
                f"python3 -m venv {ENV_ROOT}",
                f"if [ -s {build_deps} ]; then {pip} -r {build_deps}; fi",
                # pip writes the byte-code as it installs: replicas run as nobody and could
                # not write it, so every start would compile the whole environment again.
                f"{pip} -r /build/requirements.txt",
            ]
        )
        log.write(f"$ docker run --network none {self.base} sh -c '{script}'\n")
        log.flush()
        container = self.client.containers.create(
            self.base,
            ["sh", "-c", script],
            network_mode="none",
            volumes={
                str(self.wheelhouse): {"bind": "/wheels", "mode": "ro"},
                str(workdir): {"bind": "/build", "mode": "ro"},
            },
            environment={"PIP_DISABLE_PIP_VERSION_CHECK": "1"},
            labels={f"{LABEL}.role": "build"},
        )
        try:
            container.start()
            status = container.wait(timeout=BUILD_TIMEOUT_S)
            log.write(container.logs().decode(errors="replace"))
            log.flush()
            if status.get("StatusCode") != 0:
                raise ImageBuildError(last_error_line(_tail(Path(log.name))))
            repository, tag = env_tag.split(":")
            path = f"{ENV_ROOT}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
            container.commit(
                repository, tag, changes=[f"ENV PATH={path}", f"LABEL {LABEL}.role=environment"]
            )
        except (APIError, DockerException, requests.RequestException) as exc:
            # A wait past BUILD_TIMEOUT_S is a requests timeout, not a Docker error.
            raise ImageBuildError(last_error_line(str(exc)) or "the build timed out") from None
        finally:
            container.remove(force=True)

    # -- the model layer -------------------------------------------------------------

    def _model_layer(
        self,
        model: str,
        version: str,
        digest: str,
        model_dir: Path,
        env_tag: str,
        tag: str,
        log: io.TextIOBase,
    ) -> None:
        labels = {
            f"{LABEL}.role": "model",
            f"{LABEL}.model": model,
            f"{LABEL}.version": version,
            f"{LABEL}.digest": digest,
            f"{LABEL}.environment": env_tag,
        }
        dockerfile = "\n".join(
            [
                f"FROM {env_tag}",
                f"COPY model {MODEL_ROOT}",
                f"USER {REPLICA_USER}",
                "ENV HOME=/tmp PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1",
                f'ENTRYPOINT ["mlflow", "models", "serve", "-m", "{MODEL_ROOT}", '
                '"--env-manager", "local"]',
                'CMD ["-h", "127.0.0.1", "-p", "8080"]',
                "",
            ]
        )
        log.write(f"--- Dockerfile\n{dockerfile}---\n")
        context = _build_context(dockerfile, model_dir)
        try:
            _, stream = self.client.images.build(
                fileobj=context,
                custom_context=True,
                tag=tag,
                labels=labels,
                rm=True,
                forcerm=True,
                network_mode="none",
                pull=False,
            )
            for chunk in stream:
                log.write(str(chunk.get("stream", "")))
        except BuildError as exc:
            for chunk in exc.build_log:
                log.write(str(chunk.get("stream", chunk.get("error", ""))))
            raise ImageBuildError(last_error_line(str(exc))) from None
        except (APIError, DockerException) as exc:
            raise ImageBuildError(last_error_line(str(exc))) from None


def _build_context(dockerfile: str, model_dir: Path) -> io.BytesIO:
    """A tar of the Dockerfile and the model, world-readable and owned by root.

    The copy under FLOWLINE_HOME is 0600; the replica runs as nobody, so the modes are
    set here rather than with a ``chmod`` layer that would store every file twice.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size, info.mode = len(data), 0o644
        tar.addfile(info, io.BytesIO(data))

        def public(item: tarfile.TarInfo) -> tarfile.TarInfo:
            item.uid = item.gid = 0
            item.uname = item.gname = "root"
            item.mode = 0o755 if item.isdir() else 0o644
            return item

        tar.add(str(model_dir), arcname="model", filter=public)
    buffer.seek(0)
    return buffer


def _tail(path: Path, size: int = 16384) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - size))
        return handle.read().decode(errors="replace")
