"""SQL databases of flowline's own state: URLs for SQLAlchemy and private SQLite files.

The tracking server's backend store, the monitor's store and the capture client's
spool all go through here, so PostgreSQL URLs reach the same driver and every
SQLite file is owner-only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text


def sqlalchemy_url(url: str) -> str:
    """``url`` with a bare ``postgresql://`` (or ``postgres://``) pointed at psycopg 3.

    psycopg 3 is the driver flowline installs; SQLAlchemy would otherwise look for
    psycopg2. Any other URL is returned unchanged.
    """
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def private_file(path: Path) -> None:
    """Make ``path`` (and its -wal/-shm companions, if any) owner-only: 0600, created so.

    Its folder is created 0700. SQLite creates its -wal and -shm files with the
    database file's mode, so a 0600 database keeps them 0600 too; ones left by
    an older run are tightened here.
    """
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.parent.chmod(0o700)  # mkdir's mode is filtered by the umask
    os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")):
        with contextlib.suppress(FileNotFoundError):
            name.chmod(0o600)


def sqlite_engine(path: Path, synchronous: str = "FULL") -> Engine:
    """An SQLite engine in WAL mode, safe to share between threads, on a 0600 file."""
    private_file(path)
    engine = create_engine(
        f"sqlite:///{path}", connect_args={"check_same_thread": False, "timeout": 30}
    )

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA synchronous={synchronous}")
        cursor.close()

    return engine


def advisory_key(name: str) -> int:
    """A stable signed 64-bit PostgreSQL advisory-lock key for the lock called ``name``."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


@contextlib.contextmanager
def schema_lock(engine: Engine, name: str) -> Iterator[None]:
    """Hold a PostgreSQL advisory lock named ``name`` while the block creates tables.

    Several processes starting at once (two monitors, controllers, gateway pods) would
    otherwise race in CREATE TABLE and one would fail on PostgreSQL's catalog unique
    index. On SQLite, which serializes writers itself, this does nothing.
    """
    if engine.dialect.name != "postgresql":
        yield
        return
    key = advisory_key(name)
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()
