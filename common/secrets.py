"""Secrets kept in files under the flowline home: created once, owner-only, stable.

The admin token, the webhook secret, the ingest token, the webhook encryption key and
the basic-auth passwords all live here, so that a restarted platform finds the same
credentials and nothing has to be passed between its processes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path


def _random_token() -> str:
    return secrets.token_urlsafe(32)


def created_secret(path: Path, make: Callable[[], str] = _random_token) -> tuple[str, bool]:
    """The secret in ``path``, created 0600 from ``make()`` when absent; and whether it was.

    Created with O_EXCL at mode 0600: never readable by others even for an instant,
    and when two processes race, one writes and both read the same value.
    """
    created = False
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):  # another process made it first
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(make())
            created = True
    return path.read_text().strip(), created


def persistent_secret(path: Path, make: Callable[[], str] = _random_token) -> str:
    """A secret kept in ``path``: stable across restarts, created on first use."""
    return created_secret(path, make)[0]
