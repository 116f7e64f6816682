"""The monitor's durable state: captured rows, closed windows, alert state and alert outbox.

SQLAlchemy Core over SQLite (default, a file under FLOWLINE_HOME) or PostgreSQL
(psycopg 3). Every table is prefixed ``flowline_mon_`` so the monitor can share a
database with other tools.

* ``captured_records``: one row per captured request, in ingest order (``id``),
  holding the raw request body (or inputs), the predictions and the number of
  input rows it carries. ``record_id`` is unique: ingesting a record twice (a
  client redelivering after a lost acknowledgement) stores it once. Bodies are
  parsed into feature rows only when their window is evaluated, which keeps
  ingest at a few microseconds per row.
* ``streams``: one per (model, version) seen, with the window cursor (the last
  captured record already in a window) and counters. The cursor moves in the same
  transaction that stores a window, so a restart neither skips nor repeats rows.
* ``windows``: each closed window: its row range, time range, verdict, summary
  columns and the full drift report (JSON).
* ``alert_state`` and ``alerts``: the drift state per stream and an outbox of
  webhook deliveries. A state change and its outbox entries are written with
  the window that caused them, so a restart never alerts twice for one change.
  A delivery is claimed (``claimed_until``) before it is posted, so two monitors
  never post the same alert at once, and a killed one's claim expires.

Several monitors may share one PostgreSQL store (docs/monitoring.md, "Several
monitors"): ingest takes a per-stream lock so that a stream's ids commit in id
order (the cursor never passes a row still to commit), and every window is
stored by a transaction that locks its stream's row and re-checks the cursor, with
a unique (model, version, first_record_id) index as the last line of defence.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Double,
    Engine,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    create_engine,
    delete,
    false,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from common.db import schema_lock, sqlalchemy_url, sqlite_engine
from monitoring.capture.record import CaptureRecord, loads_text
from monitoring.service.claims import stream_locks
from monitoring.service.ingest_checks import PreparedBatch, PreparedRecord, prepare_batch

logger = logging.getLogger(__name__)

PREFIX = "flowline_mon_"
# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL wants BIGINT.
RowId = BigInteger().with_variant(Integer(), "sqlite")

metadata = MetaData()

captured_records = Table(
    f"{PREFIX}captured_records",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("model", String(255), nullable=False),
    Column("version", String(64), nullable=False),
    Column("record_id", String(64), nullable=False),
    Column("request_id", String(128)),
    Column("captured_at", Double, nullable=False),
    Column("ingested_at", Double, nullable=False),
    Column("rows", Integer, nullable=False),  # input rows; 1 for an unreadable record
    Column("content_type", String(255)),
    Column("body", Text),  # the raw request body (base64 when body_encoding says so)
    Column("body_encoding", String(16)),
    Column("inputs", Text),  # JSON rows, for records sent with inputs instead of a body
    Column("predictions", Text),  # JSON
    Column("error", Text),  # why the record cannot be read (a schema violation)
    # Answered from the gateway's response cache (still real traffic, so still in drift).
    Column("cached", Boolean, nullable=False, server_default=false()),
    UniqueConstraint("record_id", name=f"{PREFIX}uq_record_id"),
    Index(f"{PREFIX}ix_records_stream", "model", "version", "id"),
    Index(f"{PREFIX}ix_records_captured_at", "captured_at"),
)

streams = Table(
    f"{PREFIX}streams",
    metadata,
    Column("model", String(255), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("first_seen", Double, nullable=False),
    Column("last_record_id", BigInteger, nullable=False, default=0),
    Column("next_window", Integer, nullable=False, default=0),
    Column("rows_total", BigInteger, nullable=False, default=0),
    Column("duplicates_total", BigInteger, nullable=False, default=0),
    Column("dropped_total", BigInteger, nullable=False, default=0),
)

windows = Table(
    f"{PREFIX}windows",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("model", String(255), nullable=False),
    Column("version", String(64), nullable=False),
    Column("window_index", Integer, nullable=False),
    Column("first_record_id", BigInteger, nullable=False),
    Column("last_record_id", BigInteger, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("started_at", Double),  # earliest captured_at in the window
    Column("ended_at", Double),  # latest captured_at in the window
    Column("closed_at", Double, nullable=False),
    Column("closed_by", String(8), nullable=False),  # "rows" or "time"
    Column("drifted", Boolean, nullable=False),
    Column("drifted_features", Text, nullable=False),  # JSON list
    Column("reasons", Text, nullable=False),  # JSON list
    Column("schema_violations", Integer, nullable=False),
    Column("report", Text, nullable=False),  # JSON: drift report, plots, violations
    # JSON: the performance estimated without labels (CBPE, classifiers), or NULL.
    Column("estimate", Text),
    Column("mlflow_logged", Boolean, nullable=False, default=False),
    UniqueConstraint("model", "version", "window_index", name=f"{PREFIX}uq_window_index"),
    Index(f"{PREFIX}ix_windows_closed_at", "closed_at"),
)
# No two windows of a stream start at the same record: the last line of defence if two
# monitors ever raced past the cursor check. An index, not a table constraint, so that
# a store created before it gets it too (_add_new_indexes).
window_starts = Index(
    f"{PREFIX}uq_window_first_record",
    windows.c.model,
    windows.c.version,
    windows.c.first_record_id,
    unique=True,
)

alert_state = Table(
    f"{PREFIX}alert_state",
    metadata,
    Column("model", String(255), primary_key=True),
    Column("version", String(64), primary_key=True),
    Column("drifted", Boolean, nullable=False),
    Column("since", Double, nullable=False),
    Column("window_id", BigInteger),
)

alerts = Table(
    f"{PREFIX}alerts",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("model", String(255), nullable=False),
    Column("version", String(64), nullable=False),
    Column("event", String(32), nullable=False),
    Column("window_id", BigInteger, nullable=False),
    Column("url", Text, nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", Double, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Double, nullable=False),
    Column("delivered_at", Double),
    Column("failed_at", Double),
    Column("last_error", Text),
    # A monitor posting this delivery, until when: no other monitor posts it meanwhile.
    Column("claimed_until", Double),
    Column("claimed_by", String(80)),
    Index(f"{PREFIX}ix_alerts_pending", "delivered_at", "failed_at", "next_attempt_at"),
)


def database_url(url: str) -> str:
    """Check the store URL's scheme and point bare PostgreSQL URIs at psycopg 3
    (SQLAlchemy would look for psycopg2); ValueError for any other database."""
    url = sqlalchemy_url(url)
    if not url.startswith(("sqlite:///", "postgresql+psycopg://")):
        scheme = url.split(":", 1)[0] if ":" in url else url
        raise ValueError(
            f"the monitor store must be sqlite:///<path> or postgresql://..., not {scheme!r}"
        )
    return url


def default_url(home: Path) -> str:
    """The SQLite file under the flowline home."""
    return f"sqlite:///{home / 'monitor.db'}"


# --- value objects ----------------------------------------------------------------------


@dataclass(frozen=True)
class Stream:
    """One (model, version) seen by the monitor, with its window cursor."""

    model: str
    version: str
    first_seen: float
    last_record_id: int
    next_window: int
    rows_total: int
    duplicates_total: int
    dropped_total: int


@dataclass(frozen=True)
class StoredRecord:
    """One stored capture record."""

    id: int
    captured_at: float
    ingested_at: float
    rows: int
    content_type: str | None
    body: str | None
    body_encoding: str | None
    inputs: str | None
    predictions: str | None
    error: str | None
    request_id: str | None = None
    cached: bool = False

    def capture_record(self, model: str, version: str) -> CaptureRecord:
        """The record in its contract form, to parse its rows."""
        return CaptureRecord(
            id=str(self.id),
            model=model,
            version=version,
            time=self.captured_at,
            inputs=loads_text(self.inputs) if self.inputs is not None else None,
            predictions=loads_text(self.predictions) if self.predictions is not None else None,
            body=self.body,
            content_type=self.content_type,
            body_encoding=self.body_encoding,
            request_id=self.request_id,
            cached=bool(self.cached),
        )


@dataclass(frozen=True)
class PendingRecord:
    """What the detector needs to decide whether a window is due."""

    id: int
    rows: int
    ingested_at: float


@dataclass(frozen=True)
class PendingSummary:
    """The head of a stream's records after its cursor, in aggregate (one cheap query)."""

    records: int
    rows: int
    oldest_ingested_at: float | None


@dataclass
class IngestResult:
    """What one ingest call stored."""

    records: int = 0
    new_records: int = 0
    duplicates: int = 0
    rows: int = 0
    malformed_records: int = 0  # unreadable bodies (stored, counted as violations later)
    rejected: int = 0  # envelopes without a usable id/model/version (nothing to store)
    dropped_ignored: int = 0  # drop counts for streams the monitor does not track
    rows_by_stream: Counter[tuple[str, str]] = field(default_factory=Counter)
    dropped_by_stream: Counter[tuple[str, str]] = field(default_factory=Counter)
    malformed_by_stream: Counter[tuple[str, str]] = field(default_factory=Counter)
    duplicates_by_stream: Counter[tuple[str, str]] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, int]:
        """The JSON answer of POST /ingest."""
        return {
            "records": self.records,
            "new_records": self.new_records,
            "duplicates": self.duplicates,
            "rows": self.rows,
            "malformed_records": self.malformed_records,
            "rejected": self.rejected,
            "dropped_ignored": self.dropped_ignored,
        }


@dataclass(frozen=True)
class WindowFields:
    """What a closed window holds, both before it is stored and after (column names)."""

    model: str
    version: str
    first_record_id: int
    last_record_id: int
    rows: int
    started_at: float | None
    ended_at: float | None
    closed_at: float
    closed_by: str
    drifted: bool
    drifted_features: list[str]
    reasons: list[str]
    schema_violations: int


@dataclass(frozen=True)
class NewWindow(WindowFields):
    """A window the monitor evaluated, ready to be stored."""

    report: dict[str, Any]
    estimate: dict[str, Any] | None = None


@dataclass(frozen=True)
class WindowSummary(WindowFields):
    """A stored window without its report."""

    id: int
    window_index: int
    mlflow_logged: bool


@dataclass(frozen=True)
class WindowSpan:
    """Which captured records a window holds, and what was estimated for it."""

    id: int
    window_index: int
    first_record_id: int
    last_record_id: int
    rows: int
    started_at: float | None
    ended_at: float | None
    estimate: dict[str, Any] | None
    model: str = ""  # set by unestimated_windows
    version: str = ""


@dataclass(frozen=True)
class AlertDelivery:
    """One pending webhook delivery."""

    id: int
    model: str
    version: str
    event: str
    window_id: int
    url: str
    body: str
    attempts: int


class WindowAlreadyClosed(RuntimeError):
    """The window starts at or before its stream's cursor: another monitor stored it."""


# Builds (url, body) pairs for a state change: (event, window id, window index) -> deliveries.
AlertBuilder = Callable[[str, int, int], list[tuple[str, str]]]

_STORED_RECORD_COLUMNS = [captured_records.c[f.name] for f in fields(StoredRecord)]
_SUMMARY_COLUMNS = [windows.c[f.name] for f in fields(WindowSummary)]
# The outbox as the API shows it: without the webhook body and the retry schedule.
_ALERT_LOG_COLUMNS = [
    c for c in alerts.c if c.name not in ("body", "next_attempt_at", "claimed_until", "claimed_by")
]
_WINDOW_FIELDS = [f.name for f in fields(WindowFields)]
# Stored as JSON text; every other window field is stored as it is.
_JSON_LIST_COLUMNS = ("drifted_features", "reasons")


def _summary(row: Any) -> WindowSummary:
    m = row._mapping
    values = {f.name: m[f.name] for f in fields(WindowSummary)}
    for name in _JSON_LIST_COLUMNS:
        values[name] = json.loads(values[name])
    # SQLite answers booleans as 0/1.
    values["drifted"] = bool(values["drifted"])
    values["mlflow_logged"] = bool(values["mlflow_logged"])
    return WindowSummary(**values)


# --- the store --------------------------------------------------------------------------


class MonitorStore:
    """All reads and writes of the monitor's tables."""

    def __init__(self, url: str) -> None:
        url = database_url(url)
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            # NORMAL in WAL mode survives a process crash; only power loss can lose
            # the last commits, and the capture clients redeliver unacknowledged ones.
            path = Path(url.split("sqlite:///", 1)[1])
            self.engine: Engine = sqlite_engine(path, synchronous="NORMAL")
        else:
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=5)
        with schema_lock(self.engine, "flowline-monitor-schema"):
            metadata.create_all(self.engine)
            _add_new_columns(self.engine)
            _add_new_indexes(self.engine)
        # One writer at a time in this process: SQLite needs it, and it makes the
        # duplicate check of ingest race-free (the unique key is the final guard).
        self._write_lock = threading.Lock()
        with self.engine.connect() as conn:
            # Every stream, so that admitting new ones (and the cap) needs no query.
            self._known: set[tuple[str, str]] = {
                (m, v) for m, v in conn.execute(select(streams.c.model, streams.c.version))
            }
        self._insert_sql: tuple[str, list[str] | None] | None = None

    def close(self) -> None:
        """Release connections."""
        self.engine.dispose()

    def known_streams(self, refresh: bool = False) -> set[tuple[str, str]]:
        """The (model, version) pairs stored so far (a copy).

        ``refresh`` reads them from the store again: another monitor sharing it may
        have registered streams this one has not seen.
        """
        if refresh:
            with self.engine.connect() as conn:
                self._known.update(
                    (m, v) for m, v in conn.execute(select(streams.c.model, streams.c.version))
                )
        return set(self._known)

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: one at a time in this process, committed at the end.

        On SQLite it is BEGIN IMMEDIATE: the write lock is taken before the first
        read, so a read-check-write (the window cursor, an alert claim) cannot be
        overtaken by another process's commit between its read and its write.
        """
        with self._write_lock, self.engine.connect() as conn:
            if self.is_sqlite:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    # --- ingest ---------------------------------------------------------------------------

    def ingest(
        self,
        records: Sequence[Any],
        dropped: Iterable[dict[str, Any]] = (),
        now: float | None = None,
    ) -> IngestResult:
        """Store captured records (raw JSON objects), skipping ones already stored.

        A record whose inputs cannot be read is stored as one row with ``error``
        set (counted as a schema violation later); an invalid record (see
        :mod:`monitoring.service.ingest_checks`) is only counted as rejected, and invalid
        drop report entries are skipped. ``POST /ingest`` is stricter: it refuses
        such a batch whole (:meth:`Monitor.ingest_body`).
        """
        batch = prepare_batch(records, dropped)
        result = self.ingest_prepared(batch, now)
        result.rejected = len(batch.invalid)
        return result

    def ingest_prepared(self, batch: PreparedBatch, now: float | None = None) -> IngestResult:
        """Store the valid records and drop counts of a checked batch."""
        now = time.time() if now is None else now
        result = IngestResult(records=batch.size)
        for key, n in batch.duplicates.items():
            result.duplicates += n
            result.duplicates_by_stream[key] += n
        parsed = {prepared.record.id: prepared for prepared in batch.records}
        dropped_by_stream = batch.dropped
        result.dropped_by_stream = dropped_by_stream
        rows = [_record_row(prepared, now) for prepared in parsed.values()]
        with self.write() as conn:
            # Another monitor may ingest the same streams now: one at a time per stream,
            # so a stream's ids commit in id order and the window cursor never moves
            # past an id still to commit (PostgreSQL allocates ids before commit).
            stream_locks(conn, {(r["model"], r["version"]) for r in rows} | set(dropped_by_stream))
            inserted = self._insert_new_records(conn, rows) if rows else set()
            for prepared, row in zip(parsed.values(), rows, strict=True):
                record = prepared.record
                key = (record.model, record.version)
                if inserted is not None and record.id not in inserted:
                    result.duplicates += 1
                    result.duplicates_by_stream[key] += 1
                    continue
                result.new_records += 1
                if row["error"] is not None:
                    result.malformed_records += 1
                    result.malformed_by_stream[key] += 1
                result.rows += row["rows"]
                result.rows_by_stream[key] += row["rows"]
            touched = (
                set(result.rows_by_stream)
                | set(result.duplicates_by_stream)
                | set(dropped_by_stream)
            )
            registered = self._register_streams(conn, touched, now)
            for model, version in touched:
                conn.execute(
                    update(streams)
                    .where(and_(streams.c.model == model, streams.c.version == version))
                    .values(
                        rows_total=streams.c.rows_total + result.rows_by_stream[(model, version)],
                        duplicates_total=streams.c.duplicates_total
                        + result.duplicates_by_stream[(model, version)],
                        dropped_total=streams.c.dropped_total + dropped_by_stream[(model, version)],
                    )
                )
        self._known.update(registered)  # only once committed
        return result

    def _insert_new_records(self, conn: Connection, rows: list[dict[str, Any]]) -> set[str] | None:
        """Insert the rows whose record id is not stored yet; the ids inserted, or None for all.

        The unique key on record_id does the duplicate check (ON CONFLICT DO
        NOTHING) inside the insert itself. A separate SELECT of 500 ids cost
        about as much as the insert on SQLite, and on PostgreSQL its cached
        generic plan could turn into a sequential scan (0.7 s per batch).
        Redelivered records are rare, so only then are the new ids looked up:
        they are the rows of these streams with ids above the highest id before the
        insert. Only this transaction writes these streams meanwhile (the stream
        locks, and ``_write_lock`` in this process); another monitor's rows of other
        streams may also lie above, so the stream is compared too.
        """
        before = conn.execute(select(func.max(captured_records.c.id))).scalar() or 0
        if self._insert_sql is None:
            self._insert_sql = _compiled_insert(conn)
        sql, positions = self._insert_sql
        # A plain DB-API executemany: SQLAlchemy's per-row parameter processing would
        # cost as much as the insert itself. Values are plain str/float/int.
        if positions is not None:
            params: list[Any] = list(map(itemgetter(*positions), rows))  # C, not a genexpr per row
        else:
            params = rows
        stored = conn.exec_driver_sql(sql, params).rowcount
        if stored == len(rows):
            return None
        c = captured_records.c
        mine = {(r["record_id"], r["model"], r["version"]) for r in rows}
        above = conn.execute(select(c.record_id, c.model, c.version).where(c.id > before))
        return {rid for rid, model, version in above if (rid, model, version) in mine}

    def _register_streams(
        self, conn: Connection, keys: Iterable[tuple[str, str]], now: float
    ) -> list[tuple[str, str]]:
        """Insert the streams not stored yet; the keys not known before."""
        new = [k for k in keys if k not in self._known]
        if not new:
            return []
        have: set[tuple[str, str]] = set()
        # In chunks: one OR of ~1000 pairs is too deep an expression for SQLite.
        for start in range(0, len(new), 100):
            chunk = new[start : start + 100]
            query = select(streams.c.model, streams.c.version).where(
                or_(*(and_(streams.c.model == m, streams.c.version == v) for m, v in chunk))
            )
            have.update((m, v) for m, v in conn.execute(query))
        missing = [
            {"model": m, "version": v, "first_seen": now} for m, v in new if (m, v) not in have
        ]
        if missing:
            # Under the stream locks no other monitor inserts these meanwhile.
            conn.execute(insert(streams), missing)
        return new

    # --- streams and pending rows --------------------------------------------------------

    def streams(self) -> list[Stream]:
        """Every (model, version) with its cursor and counters."""
        with self.engine.connect() as conn:
            return [Stream(**row._mapping) for row in conn.execute(select(streams))]

    def stream(self, model: str, version: str) -> Stream | None:
        """One stream, or None."""
        query = select(streams).where(and_(streams.c.model == model, streams.c.version == version))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return Stream(**row._mapping) if row else None

    def pending_summary(
        self, model: str, version: str, after_id: int, limit: int
    ) -> PendingSummary:
        """Records and rows among the first ``limit`` records after the cursor, and the
        oldest one's ingest time.

        The detector asks this after every ingest; aggregating in the database
        over a bounded range keeps that pass cheap however many records wait.
        """
        c = captured_records.c
        head = (
            select(c.rows, c.ingested_at)
            .where(and_(c.model == model, c.version == version, c.id > after_id))
            .order_by(c.id)
            .limit(limit)
            .subquery()
        )
        query = select(
            func.count(), func.coalesce(func.sum(head.c.rows), 0), func.min(head.c.ingested_at)
        )
        with self.engine.connect() as conn:
            records, rows, oldest = conn.execute(query).one()
        return PendingSummary(int(records), int(rows), oldest)

    def pending(self, model: str, version: str, after_id: int, limit: int) -> list[PendingRecord]:
        """Ids, row counts and ingest times of the records after the cursor, oldest first."""
        c = captured_records.c
        query = (
            select(c.id, c.rows, c.ingested_at)
            .where(and_(c.model == model, c.version == version, c.id > after_id))
            .order_by(c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [PendingRecord(*row) for row in conn.execute(query)]

    def records(self, model: str, version: str, first_id: int, last_id: int) -> list[StoredRecord]:
        """A stream's records with ids in [first_id, last_id], oldest first."""
        c = captured_records.c
        query = (
            select(*_STORED_RECORD_COLUMNS)
            .where(and_(c.model == model, c.version == version, c.id.between(first_id, last_id)))
            .order_by(c.id)
        )
        with self.engine.connect() as conn:
            return [StoredRecord(*row) for row in conn.execute(query)]

    def row_count(self, model: str, version: str | None = None) -> int:
        """Captured rows stored for a model (or one version), after retention."""
        c = captured_records.c
        cond = c.model == model if version is None else and_(c.model == model, c.version == version)
        query = select(func.coalesce(func.sum(c.rows), 0)).where(cond)
        with self.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())

    # --- windows and alert state ------------------------------------------------------

    def record_window(
        self, new: NewWindow, alerts_for: AlertBuilder | None = None
    ) -> tuple[WindowSummary, str | None]:
        """Store a window, move the stream's cursor past it, and update the drift state.

        Returns the stored window and the state change it caused ("drift_started",
        "drift_ended" or None). Outbox rows for the change are written in the same
        transaction, from ``alerts_for(event, window_id, window_index)``. Raises
        WindowAlreadyClosed, storing nothing, when the window does not start after
        the stream's cursor (another monitor closed it first).
        """
        with self.write() as conn:
            # The stream's row, locked until commit: two monitors storing a window of
            # one stream take turns here, and the second sees the first's cursor.
            stream = conn.execute(
                select(streams.c.next_window, streams.c.last_record_id)
                .where(and_(streams.c.model == new.model, streams.c.version == new.version))
                .with_for_update()
            ).one()
            if new.first_record_id <= stream.last_record_id:
                raise WindowAlreadyClosed(
                    f"{new.model}/{new.version}: a window starting at record "
                    f"{new.first_record_id} is already stored (cursor {stream.last_record_id})"
                )
            index = int(stream.next_window)
            window = {name: getattr(new, name) for name in _WINDOW_FIELDS}
            row = {
                **window,
                **{name: json.dumps(window[name]) for name in _JSON_LIST_COLUMNS},
                "window_index": index,
                "report": json.dumps(new.report, separators=(",", ":"), allow_nan=False),
                "estimate": None if new.estimate is None else json.dumps(new.estimate),
                "mlflow_logged": False,
            }
            window_id = int(conn.execute(insert(windows).values(**row)).inserted_primary_key[0])
            conn.execute(
                update(streams)
                .where(and_(streams.c.model == new.model, streams.c.version == new.version))
                .values(
                    next_window=index + 1,
                    last_record_id=max(new.last_record_id, stream.last_record_id),
                )
            )
            event = self._update_state(conn, new, window_id)
            if event is not None and alerts_for is not None:
                deliveries = alerts_for(event, window_id, index)
                if deliveries:
                    conn.execute(
                        insert(alerts),
                        [
                            {
                                "model": new.model,
                                "version": new.version,
                                "event": event,
                                "window_id": window_id,
                                "url": url,
                                "body": body,
                                "created_at": new.closed_at,
                                "attempts": 0,
                                "next_attempt_at": new.closed_at,
                            }
                            for url, body in deliveries
                        ],
                    )
        summary = WindowSummary(**window, id=window_id, window_index=index, mlflow_logged=False)
        return summary, event

    def _update_state(self, conn: Connection, new: NewWindow, window_id: int) -> str | None:
        key = and_(alert_state.c.model == new.model, alert_state.c.version == new.version)
        row = conn.execute(select(alert_state.c.drifted).where(key)).first()
        was = bool(row.drifted) if row else False
        if row is None:
            conn.execute(
                insert(alert_state).values(
                    model=new.model,
                    version=new.version,
                    drifted=new.drifted,
                    since=new.closed_at,
                    window_id=window_id,
                )
            )
        elif was != new.drifted:
            conn.execute(
                update(alert_state)
                .where(key)
                .values(drifted=new.drifted, since=new.closed_at, window_id=window_id)
            )
        if was == new.drifted:
            return None
        return "drift_started" if new.drifted else "drift_ended"

    def drift_state(self, model: str, version: str) -> dict[str, Any] | None:
        """The persisted drift state of a stream: {drifted, since, window_id}."""
        key = and_(alert_state.c.model == model, alert_state.c.version == version)
        with self.engine.connect() as conn:
            row = conn.execute(select(alert_state).where(key)).first()
        if row is None:
            return None
        return {"drifted": bool(row.drifted), "since": row.since, "window_id": row.window_id}

    def windows(
        self, model: str, version: str | None = None, limit: int = 100, before_id: int | None = None
    ) -> list[WindowSummary]:
        """Windows of a model (or one version), newest first."""
        c = windows.c
        cond = [c.model == model]
        if version is not None:
            cond.append(c.version == version)
        if before_id is not None:
            cond.append(c.id < before_id)
        query = select(*_SUMMARY_COLUMNS).where(and_(*cond)).order_by(c.id.desc()).limit(limit)
        with self.engine.connect() as conn:
            return [_summary(row) for row in conn.execute(query)]

    def window_spans(self, model: str, version: str) -> list[WindowSpan]:
        """Every stored window of a stream with its record range and estimate, oldest first."""
        c = windows.c
        query = (
            select(
                c.id,
                c.window_index,
                c.first_record_id,
                c.last_record_id,
                c.rows,
                c.started_at,
                c.ended_at,
                c.estimate,
            )
            .where(and_(c.model == model, c.version == version))
            .order_by(c.first_record_id)
        )
        with self.engine.connect() as conn:
            return [
                WindowSpan(*row[:-1], json.loads(row[-1]) if row[-1] else None)
                for row in conn.execute(query)
            ]

    def unestimated_windows(self, since: float, limit: int) -> list[WindowSpan]:
        """Windows closed after ``since`` that have no estimate yet, oldest first (with
        ``model`` and ``version`` filled in)."""
        c = windows.c
        query = (
            select(
                c.id,
                c.window_index,
                c.first_record_id,
                c.last_record_id,
                c.rows,
                c.started_at,
                c.ended_at,
                c.model,
                c.version,
            )
            .where(and_(c.estimate.is_(None), c.closed_at >= since))
            .order_by(c.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                WindowSpan(*row[:7], None, model=row[7], version=row[8])
                for row in conn.execute(query)
            ]

    def has_estimate(self, window_id: int) -> bool:
        """Whether a window has its estimate (another monitor may have just stored it)."""
        query = select(windows.c.estimate.is_not(None)).where(windows.c.id == window_id)
        with self.engine.connect() as conn:
            return bool(conn.execute(query).scalar())

    def set_window_estimate(self, window_id: int, estimate: dict[str, Any]) -> bool:
        """Store the CBPE estimate of a window that closed without one; False (nothing
        changed) when the window has one already."""
        with self.write() as conn:
            return bool(
                conn.execute(
                    update(windows)
                    .where(and_(windows.c.id == window_id, windows.c.estimate.is_(None)))
                    .values(estimate=json.dumps(estimate))
                ).rowcount
            )

    def window(self, window_id: int) -> tuple[WindowSummary, dict[str, Any]] | None:
        """One window with its full report."""
        with self.engine.connect() as conn:
            row = conn.execute(select(windows).where(windows.c.id == window_id)).first()
        if row is None:
            return None
        return _summary(row), json.loads(row.report)

    def latest_windows(self) -> list[tuple[WindowSummary, dict[str, Any]]]:
        """The newest window of every stream, with its report (to restore gauges at start)."""
        newest = (
            select(func.max(windows.c.id).label("id"))
            .group_by(windows.c.model, windows.c.version)
            .subquery()
        )
        query = select(windows).where(windows.c.id.in_(select(newest.c.id)))
        with self.engine.connect() as conn:
            return [(_summary(row), json.loads(row.report)) for row in conn.execute(query)]

    def unlogged_windows(
        self, limit: int = 20, model: str | None = None, version: str | None = None
    ) -> list[tuple[WindowSummary, dict[str, Any]]]:
        """Windows not yet logged to MLflow (of every stream, or of one), oldest first."""
        cond = [windows.c.mlflow_logged.is_(False)]
        if model is not None:
            cond += [windows.c.model == model, windows.c.version == version]
        query = select(windows).where(and_(*cond)).order_by(windows.c.id).limit(limit)
        with self.engine.connect() as conn:
            return [(_summary(row), json.loads(row.report)) for row in conn.execute(query)]

    def mark_logged(self, window_id: int) -> None:
        """Remember that a window's metrics and report are in MLflow."""
        with self.write() as conn:
            conn.execute(
                update(windows).where(windows.c.id == window_id).values(mlflow_logged=True)
            )

    # --- alert outbox ---------------------------------------------------------------------

    def _due_query(self, now: float, limit: int) -> Any:
        c = alerts.c
        open_ = and_(c.delivered_at.is_(None), c.failed_at.is_(None))
        oldest = select(func.min(c.id)).where(open_).group_by(c.url).scalar_subquery()
        # A claimed oldest entry holds its URL back too: order per URL is kept.
        unclaimed = or_(c.claimed_until.is_(None), c.claimed_until <= now)
        return (
            select(c.id, c.model, c.version, c.event, c.window_id, c.url, c.body, c.attempts)
            .where(and_(c.id.in_(oldest), c.next_attempt_at <= now, unclaimed))
            .order_by(c.id)
            .limit(limit)
        )

    def due_alerts(self, now: float, limit: int = 50) -> list[AlertDelivery]:
        """The oldest undelivered alert per URL, if its next attempt is due and no
        monitor has it claimed (read only: :meth:`claim_due_alerts` is what senders use).

        Only the oldest per URL, so a receiver never sees "drift ended" before
        the "drift started" that is still being retried.
        """
        with self.engine.connect() as conn:
            return [AlertDelivery(*row) for row in conn.execute(self._due_query(now, limit))]

    def claim_due_alerts(
        self, now: float, holder: str, lease_s: float, limit: int = 10
    ) -> list[AlertDelivery]:
        """The due alerts (as :meth:`due_alerts`), claimed for ``holder`` until
        ``now + lease_s``: no other monitor gets them before this one settles them
        (:meth:`alert_delivered`, :meth:`alert_failed`) or the claim expires.

        On PostgreSQL the candidates are locked FOR UPDATE SKIP LOCKED, so a monitor
        claiming at the same moment passes over them instead of waiting; on SQLite
        the IMMEDIATE transaction excludes it. The claim is committed before any
        POST: a monitor killed while posting leaves a claim that simply expires.
        """
        query = self._due_query(now, limit)
        if not self.is_sqlite:
            query = query.with_for_update(skip_locked=True, of=alerts)
        with self.write() as conn:
            due = [AlertDelivery(*row) for row in conn.execute(query)]
            if due:
                conn.execute(
                    update(alerts)
                    .where(alerts.c.id.in_([a.id for a in due]))
                    .values(claimed_until=now + lease_s, claimed_by=holder[:80])
                )
        return due

    def alert_delivered(self, alert_id: int, now: float) -> None:
        """Mark one delivery done (and its claim released)."""
        self._update_alert(
            alert_id,
            delivered_at=now,
            attempts=alerts.c.attempts + 1,
            claimed_until=None,
            claimed_by=None,
        )

    def alert_failed(self, alert_id: int, error: str, retry_at: float | None, now: float) -> None:
        """Record a failed attempt: retry at ``retry_at``, or give up when it is None."""
        values: dict[str, Any] = {
            "attempts": alerts.c.attempts + 1,
            "last_error": error[:2000],
            "claimed_until": None,
            "claimed_by": None,
        }
        if retry_at is None:
            values["failed_at"] = now
        else:
            values["next_attempt_at"] = retry_at
        self._update_alert(alert_id, **values)

    def _update_alert(self, alert_id: int, **values: Any) -> None:
        with self.write() as conn:
            conn.execute(update(alerts).where(alerts.c.id == alert_id).values(**values))

    def alert_log(self, model: str | None = None) -> list[dict[str, Any]]:
        """Every outbox entry (newest first), for the API and tests."""
        c = alerts.c
        query = select(*_ALERT_LOG_COLUMNS).order_by(c.id.desc())
        if model is not None:
            query = query.where(c.model == model)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query)]

    # --- retention ------------------------------------------------------------------------

    def apply_retention(self, older_than: float) -> dict[str, int]:
        """Delete captured rows, windows and settled alerts from before ``older_than``."""
        counts = {}
        with self.write() as conn:
            counts["records"] = conn.execute(
                delete(captured_records).where(captured_records.c.captured_at < older_than)
            ).rowcount
            counts["windows"] = conn.execute(
                delete(windows).where(windows.c.closed_at < older_than)
            ).rowcount
            settled = or_(alerts.c.delivered_at.is_not(None), alerts.c.failed_at.is_not(None))
            counts["alerts"] = conn.execute(
                delete(alerts).where(and_(alerts.c.created_at < older_than, settled))
            ).rowcount
        return counts


# Columns added after the first release, as (table, column, DDL type and default): a store
# created before them gets them at start (create_all only creates missing tables).
_NEW_COLUMNS = (
    (captured_records, "cached", "BOOLEAN NOT NULL DEFAULT FALSE"),
    (windows, "estimate", "TEXT"),
    (alerts, "claimed_until", "DOUBLE PRECISION"),
    (alerts, "claimed_by", "VARCHAR(80)"),
)


def _add_new_columns(engine: Engine) -> None:
    """ALTER TABLE ... ADD COLUMN for each of `_NEW_COLUMNS` an existing table lacks."""
    inspector = inspect(engine)
    for table, column, ddl in _NEW_COLUMNS:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        if column not in present:
            with engine.begin() as conn:
                conn.exec_driver_sql(f"ALTER TABLE {table.name} ADD COLUMN {column} {ddl}")


def _add_new_indexes(engine: Engine) -> None:
    """Create the unique window-start index on a store made before it (create_all adds
    no index to an existing table).

    A store that already holds two windows starting at one record (written by
    monitors racing before the claims existed) cannot take it: the monitor still
    starts, with a warning, and the cursor check keeps new windows single.
    """
    try:
        window_starts.create(engine, checkfirst=True)
    except IntegrityError as exc:
        logger.warning("monitor store: duplicate windows, unique index not added: %s", exc)


def _compiled_insert(conn: Connection) -> tuple[str, list[str] | None]:
    """The record INSERT for this dialect, skipping stored record ids, and its parameter order."""
    name = conn.dialect.name
    if name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    elif name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    else:  # pragma: no cover - the store supports SQLite and PostgreSQL
        raise ValueError(f"unsupported monitor store dialect: {name}")
    statement = dialect_insert(captured_records).on_conflict_do_nothing(
        index_elements=["record_id"]
    )
    compiled = statement.compile(dialect=conn.dialect, column_keys=list(_RECORD_COLUMNS))
    positions = compiled.positiontup
    return str(compiled), list(positions) if positions else None


# What an ingest inserts: every column but the row id (the keys of _record_row).
_RECORD_COLUMNS = tuple(c.name for c in captured_records.c if c.name != "id")
# One encoder for every record: json.dumps with options builds a new encoder per call,
# and so does JSONEncoder.encode (its C encoder): 2 us of the ~40 us a record costs.
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=str)
_C_ENCODER = (
    json.encoder.c_make_encoder(  # (markers, default, encoder, indent, ":", ",", sort, skip, nan)
        None, str, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True
    )
    if json.encoder.c_make_encoder is not None
    else None
)


def _encode(value: Any) -> str:
    """``_ENCODER.encode(value)``. No cycle check: values come from decoded JSON."""
    if _C_ENCODER is None:
        return _ENCODER.encode(value)
    if isinstance(value, str):
        return json.encoder.encode_basestring_ascii(value)
    return "".join(_C_ENCODER(value, 0))


def _record_row(prepared: PreparedRecord, now: float) -> dict[str, Any]:
    """The stored form of a checked record (its rows counted, not built)."""
    record = prepared.record
    body, body_encoding = record.body, record.body_encoding
    if body is not None and body_encoding is None and "\x00" in body:
        # PostgreSQL text cannot hold NUL: such a body is kept, losslessly, as base64.
        body, body_encoding = base64.b64encode(body.encode()).decode("ascii"), "base64"
    encode = _encode
    return {
        "model": record.model,
        "version": record.version,
        "record_id": record.id,
        "request_id": record.request_id,
        "captured_at": record.time,
        "ingested_at": now,
        "rows": prepared.rows,
        "content_type": record.content_type,
        "body": body,
        "body_encoding": body_encoding,
        "inputs": encode(record.inputs) if record.inputs is not None else None,
        "predictions": encode(record.predictions) if record.predictions is not None else None,
        "error": prepared.error,
        "cached": record.cached,
    }
