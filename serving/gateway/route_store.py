"""The route table on disk, so a restarted gateway routes at once instead of answering 404.

Every change the controller makes through the admin API is written to one JSON
file (by default $FLOWLINE_HOME/gateway/routes.json): mode 0600 in a 0700
folder, written to a temporary file, flushed and renamed over the old one, so a
crash (kill -9 included) leaves either the old table or the new one, never half
of one. At start the gateway restores it; the controller's next reconcile pass
then corrects whatever changed while the gateway was down.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from serving.gateway.routes import RouteSnapshot, RouteTable

logger = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700


class RouteStore:
    """Reads and atomically writes the route file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        # One writer at a time, and each writes the table as it is when it holds the
        # lock, so the last write on disk is never an older table than memory.
        self._lock = threading.Lock()

    def load(self) -> RouteSnapshot | None:
        """The saved table, or None when there is none or it cannot be used (logged)."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            logger.error("cannot read the route file %s: %s", self.path, exc)
            return None
        try:
            return RouteSnapshot.from_dict(json.loads(text))
        except (ValueError, TypeError) as exc:
            # Better to wait for the controller's push than to route from a damaged file.
            logger.error("ignoring the route file %s: %s", self.path, exc)
            return None

    def save(self, table: RouteTable) -> None:
        """Write `table`'s current snapshot; errors are logged (serving goes on)."""
        with self._lock:
            data = json.dumps(table.snapshot().to_dict(), indent=1).encode()
            try:
                write_private(self.path, data)
            except OSError as exc:
                logger.error("cannot save the route table to %s: %s", self.path, exc)

    def attach(self, table: RouteTable) -> bool:
        """Restore the saved table into `table` and save every later change.

        Returns True when a table was restored.
        """
        # A table given routes in code keeps them: the file only fills an empty table.
        snapshot = self.load() if not table.routes() else None
        if snapshot is not None:
            table.restore(snapshot)
            logger.warning("restored %d route(s) from %s", len(snapshot.deployments), self.path)
        table.on_change = self.save
        return snapshot is not None


def write_private(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: 0600 file in a 0700 folder, fsynced."""
    path.parent.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path.parent, DIR_MODE)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename must reach the disk too, or a power cut could bring the old file back.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
