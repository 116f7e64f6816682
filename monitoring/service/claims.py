"""Claims: which monitor does a periodic job for one model version right now.

Several monitor processes may share one PostgreSQL store and all ingest. The jobs
that must happen once (closing a stream's windows, logging them to MLflow, the
CBPE estimates, the performance alerts, retention) are *claimed* per key, usually
(job, model, version): a monitor that cannot take the claim skips that key for
this pass, because another monitor is doing it.

* PostgreSQL: ``pg_try_advisory_xact_lock(job, key)`` in a transaction held open
  on its own connection for as long as the job runs. Nothing to expire: the lock
  goes with the transaction, also when the process is killed (the server ends
  the session when its socket closes).
* SQLite: a lease row in ``flowline_mon_claims`` (holder, expires_at), taken in
  an IMMEDIATE transaction and deleted when the job ends. A holder killed with
  its lease is noticed at once (the holder names its pid, and an SQLite file is
  shared only on one host), else the lease expires after ``lease_s``. One
  monitor is the SQLite norm, and then the claim is always free after a
  restart; the lease keeps a second one on the same file correct.

A claim only saves duplicate work. Correctness does not rest on it: every write
a job makes re-reads what it changes in its own transaction (the window cursor,
an alert's claim, a window's estimate), so a claim that expired under a slow
holder costs duplicate work at most, never a duplicate window or alert.

:func:`stream_locks` are the blocking counterpart the ingest takes per stream, so
that on PostgreSQL a stream's record ids are committed in id order (see
``MonitorStore.ingest_prepared``).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

from sqlalchemy import Column, Double, Engine, MetaData, String, Table, delete, select, text
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from common.processes import pid_running

# How long an SQLite lease lasts without its holder: longer than any one job's pass
# (a window evaluation takes well under a second; an MLflow upload a few seconds).
DEFAULT_LEASE_S = 300.0

# The first key of every advisory lock flowline's monitor takes ("flm" + job number),
# so that its locks cannot collide with another tool's on the same database.
_NAMESPACE = 0x666C6D00
JOBS = ("ingest", "windows", "publish", "estimate", "performance", "retention")

_claims_metadata = MetaData()
claims_table = Table(
    "flowline_mon_claims",
    _claims_metadata,
    Column("job", String(32), primary_key=True),
    Column("model", String(255), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("holder", String(80), nullable=False),
    Column("expires_at", Double, nullable=False),
)


class WriteStore(Protocol):
    """What claims need of the monitor store (a Protocol: the store imports this module)."""

    engine: Engine
    is_sqlite: bool

    def write(self) -> contextlib.AbstractContextManager[Connection]:
        """A write transaction (IMMEDIATE on SQLite)."""
        ...


def lock_keys(job: str, model: str, version: str) -> tuple[int, int]:
    """The two int4 keys of an advisory lock: the job's namespace, then the stream's hash.

    Two streams whose hashes collide share a lock: one waits or skips a pass,
    nothing worse.
    """
    classid = _NAMESPACE + JOBS.index(job)
    digest = zlib.crc32(f"{model}\x00{version}".encode())
    objid = digest - (1 << 32) if digest >= (1 << 31) else digest  # PostgreSQL's int4
    return classid - (1 << 32) if classid >= (1 << 31) else classid, objid


def stream_locks(conn: Connection, keys: Iterable[tuple[str, str]]) -> None:
    """Take the ingest lock of each stream in ``keys`` for the rest of the transaction.

    Blocking, in sorted order (two ingests of the same streams cannot deadlock). A
    no-op on SQLite, where the IMMEDIATE transaction already excludes other writers.
    """
    if conn.dialect.name != "postgresql":
        return
    pairs = sorted({lock_keys("ingest", m, v) for m, v in keys})
    for classid, objid in pairs:
        conn.execute(text("SELECT pg_advisory_xact_lock(:a, :b)"), {"a": classid, "b": objid})


class Claims:
    """Try-claims of (job, model, version) keys for one monitor process."""

    def __init__(self, store: WriteStore, lease_s: float = DEFAULT_LEASE_S) -> None:
        self.store = store
        self.lease_s = lease_s
        self.process = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        if store.is_sqlite:
            _claims_metadata.create_all(store.engine)

    def holder(self) -> str:
        """Who holds a lease: this process and thread (two threads never share a claim)."""
        return f"{self.process}-{threading.get_ident()}"

    @contextlib.contextmanager
    def hold(self, job: str, model: str = "", version: str = "") -> Iterator[bool]:
        """Try to claim ``job`` for (model, version); yields whether this monitor has it.

        The claim lasts until the block ends; when it yields False, another monitor
        holds it and the caller skips the key for this pass.
        """
        if job not in JOBS:
            raise ValueError(f"unknown claim job {job!r}")
        if self.store.is_sqlite:
            with self._lease(job, model, version) as held:
                yield held
            return
        classid, objid = lock_keys(job, model, version)
        with self.store.engine.connect() as conn:
            got = conn.execute(
                text("SELECT pg_try_advisory_xact_lock(:a, :b)"), {"a": classid, "b": objid}
            ).scalar()
            try:
                yield bool(got)
            finally:
                conn.rollback()  # ends the transaction, which releases the lock

    @contextlib.contextmanager
    def _lease(self, job: str, model: str, version: str) -> Iterator[bool]:
        me = self.holder()
        now = time.time()
        c = claims_table.c
        key = (c.job == job) & (c.model == model) & (c.version == version)
        with self.store.write() as conn:
            current = conn.execute(select(c.holder, c.expires_at).where(key)).first()
            held = (
                current is None
                or current.holder == me
                or current.expires_at < now
                or not _process_alive(current.holder)
            )
            if held:
                values = {"holder": me, "expires_at": now + self.lease_s}
                statement = sqlite_insert(claims_table).values(
                    job=job, model=model, version=version, **values
                )
                conn.execute(
                    statement.on_conflict_do_update(
                        index_elements=["job", "model", "version"], set_=values
                    )
                )
        try:
            yield held
        finally:
            if held:
                with self.store.write() as conn:
                    conn.execute(delete(claims_table).where(key & (c.holder == me)))


def _process_alive(holder: str) -> bool:
    """Whether the process named by a lease holder ("<pid>-...") still runs on this host.

    A monitor killed while holding a lease would otherwise hold its restarted self
    back for a whole lease. Pid reuse can only make a dead holder look alive, and
    then the lease expires as usual.
    """
    try:
        pid = int(holder.split("-", 1)[0])
    except ValueError:
        return True
    return pid_running(pid)
