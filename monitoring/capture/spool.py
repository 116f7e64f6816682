"""The capture client's durable buffer: an SQLite file of encoded records, kept in order.

Records land here when the monitor is down or slow, when the in-memory queue is
full, and at shutdown; the client redelivers them oldest first. A record leaves
the spool only after the monitor acknowledged it, so a crash between the two
causes a redelivery (the monitor's ingest is idempotent), never a loss.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    delete,
    func,
    insert,
    select,
    tuple_,
)

from common.db import sqlite_engine

SPOOL_FILE = "capture-spool.sqlite"

_metadata = MetaData()
# seq orders records (a monotonic clock-based counter from the client); the record
# id is part of the key so two gateways sharing a spool file never collide.
_pending = Table(
    "pending",
    _metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("id", String(64), primary_key=True),
    Column("payload", LargeBinary, nullable=False),
)
_dead = Table(
    "dead_letter",
    _metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("id", String(64), primary_key=True),
    Column("payload", LargeBinary, nullable=False),
    Column("reason", Text),
    Column("at", Double),
)


class SpooledRecord(NamedTuple):
    """One encoded capture record with its ordering key."""

    seq: int
    id: str
    payload: bytes


class Spool:
    """Append, peek in order, delete acknowledged: a FIFO of encoded records on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._engine = sqlite_engine(path)
        _metadata.create_all(self._engine)
        # SQLite allows one writer; a lock keeps writers from meeting SQLITE_BUSY.
        self._lock = threading.Lock()

    def put(self, records: Sequence[SpooledRecord]) -> None:
        """Store records durably (one transaction, fsynced on commit)."""
        if not records:
            return
        rows = [{"seq": r.seq, "id": r.id, "payload": r.payload} for r in records]
        with self._lock, self._engine.begin() as conn:
            conn.execute(insert(_pending).prefix_with("OR IGNORE"), rows)

    def peek(self, limit: int) -> list[SpooledRecord]:
        """The oldest ``limit`` records, without removing them."""
        query = select(_pending.c.seq, _pending.c.id, _pending.c.payload)
        query = query.order_by(_pending.c.seq, _pending.c.id).limit(limit)
        with self._engine.connect() as conn:
            return [SpooledRecord(*row) for row in conn.execute(query)]

    def delete(self, records: Sequence[SpooledRecord]) -> None:
        """Forget records the monitor acknowledged."""
        keys = [(r.seq, r.id) for r in records]
        with self._lock, self._engine.begin() as conn:
            for start in range(0, len(keys), 400):
                chunk = keys[start : start + 400]
                conn.execute(
                    delete(_pending).where(tuple_(_pending.c.seq, _pending.c.id).in_(chunk))
                )

    def dead_letter(self, records: Sequence[SpooledRecord], reason: str, at: float) -> None:
        """Move records the monitor refused as malformed out of the queue, kept for inspection."""
        rows = [
            {"seq": r.seq, "id": r.id, "payload": r.payload, "reason": reason, "at": at}
            for r in records
        ]
        with self._lock, self._engine.begin() as conn:
            conn.execute(insert(_dead).prefix_with("OR IGNORE"), rows)
            keys = [(r.seq, r.id) for r in records]
            conn.execute(delete(_pending).where(tuple_(_pending.c.seq, _pending.c.id).in_(keys)))

    def count(self) -> int:
        """Records waiting for delivery."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_pending)).scalar_one())

    def dead_count(self) -> int:
        """Records set aside as undeliverable."""
        with self._engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(_dead)).scalar_one())

    def close(self) -> None:
        """Release the database file."""
        self._engine.dispose()
