"""An offline base image: a minimal Debian root made by debootstrap, imported into Docker.

Where no image registry can be reached, ``python:3.11-slim`` cannot be pulled; this
builds the same thing from the Debian mirror the host already uses for its packages.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import docker
from docker.errors import DockerException, ImageNotFound

DEFAULT_NAME = "flowline-base:bookworm"
DEFAULT_SUITE = "bookworm"
FALLBACK_MIRROR = "http://deb.debian.org/debian"
PACKAGES = "python3,python3-venv,ca-certificates"


class BaseImageError(RuntimeError):
    """The base image could not be made; the message says what to do."""


def host_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror this host installs from: the first ``URIs:`` or ``deb`` line
    naming a plain (not security) archive."""
    files = sorted(sources.glob("sources.list.d/*.sources")) + sorted(
        sources.glob("sources.list.d/*.list")
    )
    if (sources / "sources.list").exists():
        files.append(sources / "sources.list")
    for path in files:
        text = path.read_text(errors="replace")
        for uri in re.findall(r"^\s*(?:URIs:|deb)\s+(\S+)", text, re.MULTILINE):
            if "security" not in uri and uri.startswith(("http://", "https://", "file:")):
                return uri.rstrip("/")
    return FALLBACK_MIRROR


def ensure_base_image(
    name: str = DEFAULT_NAME, suite: str = DEFAULT_SUITE, mirror: str | None = None
) -> tuple[str, bool]:
    """Make ``name`` from debootstrap unless the daemon has it; (image id, built now)."""
    try:
        client = docker.from_env()
        return client.images.get(name).id, False
    except ImageNotFound:
        pass
    except DockerException as exc:
        raise BaseImageError(f"no Docker daemon answers ({exc}): start dockerd") from None
    if shutil.which("debootstrap") is None:
        raise BaseImageError("debootstrap is not installed: apt-get install debootstrap")
    with tempfile.TemporaryDirectory(prefix="flowline-base-") as tmp:
        root = Path(tmp) / "root"
        argv = ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", suite, str(root)]
        done = subprocess.run(
            [*argv, mirror or host_mirror()], capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            lines = (done.stdout + done.stderr).strip().splitlines() or ["no output"]
            raise BaseImageError(f"debootstrap failed: {lines[-1]}")
        shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        repository, _, tag = name.partition(":")
        assert tar.stdout is not None
        client.api.import_image_from_stream(tar.stdout, repository=repository, tag=tag or None)
        if tar.wait() != 0:
            raise BaseImageError("could not archive the debootstrap root")
    return client.images.get(name).id, True
