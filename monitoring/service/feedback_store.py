"""Stored labels: ``flowline_mon_feedback``, one row per labelled prediction.

A label is keyed by (model, request id, row), so sending it again changes nothing
and sending a different one corrects it (the last one counts). When its request
was captured, the label is joined at once with the version and the prediction of
that row, copied beside it, so that performance needs no body parsing. A label
whose request the monitor has not stored (yet: capture is asynchronous; or ever:
a wrong id) is kept unmatched and counted as unknown; :meth:`FeedbackStore.match`
joins it when its capture arrives. Nothing a caller sends is lost.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Double,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.engine import Connection

from monitoring.capture.record import loads_text
from monitoring.service.feedback import FeedbackItem
from monitoring.service.store import PREFIX, MonitorStore, RowId, captured_records, metadata

# Ids looked up per query: below SQLite's 32766 bound parameters.
CHUNK = 5000
# How long an unmatched label is looked for in new captures (capture is seconds late at
# most; a week covers a monitor that was down).
MATCH_WINDOW_S = 7 * 86400.0

feedback = Table(
    f"{PREFIX}feedback",
    metadata,
    Column("id", RowId, primary_key=True, autoincrement=True),
    Column("model", String(255), nullable=False),
    Column("request_id", String(128), nullable=False),
    Column("row_index", Integer, nullable=False),
    Column("label", Text, nullable=False),  # JSON scalar
    Column("received_at", Double, nullable=False),  # first time this label's key came
    Column("updated_at", Double, nullable=False),  # last time its label or its join changed
    # Joined from the capture (NULL while unmatched):
    Column("version", String(64)),
    Column("record_pk", BigInteger),  # captured_records.id: the window it falls in
    Column("prediction", Text),  # JSON: what the model answered for that row
    UniqueConstraint("model", "request_id", "row_index", name=f"{PREFIX}uq_feedback_key"),
    Index(f"{PREFIX}ix_feedback_stream", "model", "version", "record_pk"),
)
# Finds a request's capture by its id. Created on old stores too (create_all does not
# add indexes to a table that exists).
records_by_request = Index(
    f"{PREFIX}ix_records_request", captured_records.c.model, captured_records.c.request_id
)


@dataclass
class FeedbackResult:
    """What one ``POST /feedback`` did, as its answer says."""

    received: int = 0  # labels in the body (after duplicates inside it)
    new: int = 0  # keys never labelled before
    updated: int = 0  # keys whose label changed
    unchanged: int = 0  # the same label again (idempotent redelivery)
    matched: int = 0  # of the labels stored now, those joined with their prediction
    unknown: int = 0  # labels whose request id is not (yet) captured

    def to_dict(self) -> dict[str, int]:
        """The JSON answer."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class LabelledPrediction:
    """A label joined with its prediction."""

    version: str
    record_pk: int
    label: Any
    prediction: Any
    updated_at: float


class FeedbackStore:
    """Reads and writes of the feedback table, on the monitor store's database."""

    def __init__(self, store: MonitorStore) -> None:
        self.store = store
        self.engine = store.engine
        feedback.create(self.engine, checkfirst=True)
        records_by_request.create(self.engine, checkfirst=True)

    def add(
        self, model: str, items: Sequence[FeedbackItem], now: float | None = None
    ) -> FeedbackResult:
        """Store labels for ``model`` idempotently (the last label of a key wins)."""
        now = time.time() if now is None else now
        latest: dict[tuple[str, int], Any] = {}
        for item in items:
            latest[(item.request_id, item.row)] = item.label
        result = FeedbackResult(received=len(latest))
        request_ids = sorted({rid for rid, _ in latest})
        with self.store.write() as conn:
            stored = self._stored_labels(conn, model, request_ids)
            captures = _captures(conn, model, request_ids)
            inserts, updates = [], []
            for (rid, row), label in latest.items():
                encoded = json.dumps(label)
                joined = _prediction_of(captures.get(rid), row)
                if joined is None:
                    result.unknown += 1
                else:
                    result.matched += 1
                version, record_pk, prediction = joined or (None, None, None)
                before = stored.get((rid, row))
                if before is None:
                    result.new += 1
                    inserts.append(
                        {
                            "model": model,
                            "request_id": rid,
                            "row_index": row,
                            "label": encoded,
                            "received_at": now,
                            "updated_at": now,
                            "version": version,
                            "record_pk": record_pk,
                            "prediction": prediction,
                        }
                    )
                elif before != encoded:
                    result.updated += 1
                    updates.append(
                        {
                            "k_rid": rid,
                            "k_row": row,
                            "label": encoded,
                            "updated_at": now,
                            "version": version,
                            "record_pk": record_pk,
                            "prediction": prediction,
                        }
                    )
                else:
                    result.unchanged += 1
            if inserts:
                _insert_many(conn, inserts)
            if updates:
                f = feedback.c
                conn.execute(
                    update(feedback)
                    .where(
                        and_(
                            f.model == model,
                            f.request_id == bindparam("k_rid"),
                            f.row_index == bindparam("k_row"),
                        )
                    )
                    .values(
                        label=bindparam("label"),
                        updated_at=bindparam("updated_at"),
                        version=bindparam("version"),
                        record_pk=bindparam("record_pk"),
                        prediction=bindparam("prediction"),
                    ),
                    updates,
                )
        return result

    def _stored_labels(
        self, conn: Connection, model: str, request_ids: list[str]
    ) -> dict[tuple[str, int], str]:
        found: dict[tuple[str, int], str] = {}
        columns = "request_id, row_index, label"
        for rid, row, label in _rows_for_ids(conn, feedback.name, columns, model, request_ids):
            found[(rid, row)] = label
        return found

    def match(self, now: float | None = None, limit: int = 50_000) -> int:
        """Join unmatched labels whose capture has arrived since; returns how many.

        Only labels received in the last MATCH_WINDOW_S are tried, oldest first, so
        a wrong id costs a lookup per pass for a bounded time, not for ever.
        """
        now = time.time() if now is None else now
        f = feedback.c
        query = (
            select(f.id, f.model, f.request_id, f.row_index)
            .where(and_(f.version.is_(None), f.received_at >= now - MATCH_WINDOW_S))
            .order_by(f.id)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            waiting = conn.execute(query).all()
        if not waiting:
            return 0
        by_model: dict[str, list[Any]] = {}
        for row in waiting:
            by_model.setdefault(row.model, []).append(row)
        joined = []
        with self.engine.connect() as conn:
            for model, rows in by_model.items():
                captures = _captures(conn, model, sorted({r.request_id for r in rows}))
                for r in rows:
                    found = _prediction_of(captures.get(r.request_id), r.row_index)
                    if found is not None:
                        version, record_pk, prediction = found
                        joined.append(
                            {
                                "k_id": r.id,
                                "version": version,
                                "record_pk": record_pk,
                                "prediction": prediction,
                                "updated_at": now,
                            }
                        )
        if joined:
            with self.store.write() as conn:
                conn.execute(
                    update(feedback)
                    .where(feedback.c.id == bindparam("k_id"))
                    .values(
                        version=bindparam("version"),
                        record_pk=bindparam("record_pk"),
                        prediction=bindparam("prediction"),
                        updated_at=bindparam("updated_at"),
                    ),
                    joined,
                )
        return len(joined)

    def labelled(self, model: str) -> list[LabelledPrediction]:
        """Every matched label of ``model`` with its prediction, by version and capture."""
        f = feedback.c
        query = (
            select(f.version, f.record_pk, f.label, f.prediction, f.updated_at)
            .where(and_(f.model == model, f.version.is_not(None)))
            .order_by(f.version, f.record_pk)
        )
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        if not rows:
            return []
        # One JSON document per column instead of two parses per label: 3x faster, and
        # this runs over every label of a model each time its labels change.
        labels = json.loads("[" + ",".join(r[2] for r in rows) + "]")
        predictions = json.loads("[" + ",".join(r[3] or "null" for r in rows) + "]")
        return [
            LabelledPrediction(r[0], r[1], label, prediction, r[4])
            for r, label, prediction in zip(rows, labels, predictions, strict=True)
        ]

    def counts(self, model: str) -> dict[str, int]:
        """Labels stored for ``model``: matched with a prediction, and still unknown."""
        f = feedback.c
        query = (
            select(f.version.is_(None), func.count())
            .where(f.model == model)
            .group_by(f.version.is_(None))
        )
        with self.engine.connect() as conn:
            rows = dict(conn.execute(query).all())
        return {"matched": int(rows.get(False, 0)), "unknown": int(rows.get(True, 0))}

    def models(self) -> list[str]:
        """Models with any label."""
        with self.engine.connect() as conn:
            return [m for (m,) in conn.execute(select(feedback.c.model).distinct())]

    def last_change(self, model: str) -> float:
        """When a label of ``model`` last changed or was matched (0 if none)."""
        f = feedback.c
        query = select(func.max(f.updated_at)).where(f.model == model)
        with self.engine.connect() as conn:
            return float(conn.execute(query).scalar() or 0.0)

    def apply_retention(self, older_than: float) -> int:
        """Delete labels last changed before ``older_than``; returns how many."""
        with self.store.write() as conn:
            return conn.execute(delete(feedback).where(feedback.c.updated_at < older_than)).rowcount


def _chunks(values: Sequence[str]) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), CHUNK):
        yield values[start : start + CHUNK]


Capture = tuple[str, int, int, str | None]  # version, record pk, rows, predictions JSON


def _captures(conn: Connection, model: str, request_ids: Sequence[str]) -> dict[str, Capture]:
    """The stored capture of each request id (the first one, should a record repeat it)."""
    found: dict[str, Capture] = {}
    columns = "request_id, version, id, rows, predictions"
    rows = _rows_for_ids(conn, captured_records.name, columns, model, request_ids)
    for rid, version, pk, count, predictions in sorted(rows, key=lambda r: r[2]):
        found.setdefault(rid, (version, pk, count, predictions))
    return found


def _placeholder(conn: Connection) -> str:
    return "?" if conn.dialect.paramstyle == "qmark" else "%s"


def _rows_for_ids(
    conn: Connection, table: str, columns: str, model: str, request_ids: Sequence[str]
) -> list[Any]:
    """``columns`` of the rows of ``table`` for ``model`` whose request id is one of these.

    Plain DB-API statements: SQLAlchemy's expanding IN parameters cost more than the
    indexed lookups themselves (0.3 s per 10,000 ids); the table and column names are
    this module's constants, the values are bound parameters.
    """
    mark = _placeholder(conn)
    out: list[Any] = []
    for chunk in _chunks(request_ids):
        marks = ",".join([mark] * len(chunk))
        sql = f"SELECT {columns} FROM {table} WHERE model = {mark} AND request_id IN ({marks})"
        out.extend(conn.exec_driver_sql(sql, (model, *chunk)).fetchall())
    return out


_INSERT_COLUMNS = (
    "model", "request_id", "row_index", "label", "received_at", "updated_at", "version",
    "record_pk", "prediction",
)  # fmt: skip


def _insert_many(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """One DB-API executemany of new labels (SQLAlchemy's per-row parameter handling
    would cost as much as the insert)."""
    mark = _placeholder(conn)
    sql = (
        f"INSERT INTO {feedback.name} ({', '.join(_INSERT_COLUMNS)}) "
        f"VALUES ({', '.join([mark] * len(_INSERT_COLUMNS))})"
    )
    conn.exec_driver_sql(sql, [tuple(r[c] for c in _INSERT_COLUMNS) for r in rows])


def _prediction_of(capture: Capture | None, row: int) -> tuple[str, int, str] | None:
    """(version, record pk, the row's prediction as JSON), or None when it is not there."""
    if capture is None:
        return None
    version, pk, rows, predictions = capture
    if predictions is None or row >= rows:
        return None
    decoded = loads_text(predictions)
    if isinstance(decoded, dict) and "predictions" in decoded:
        decoded = decoded["predictions"]
    if isinstance(decoded, list):
        if row >= len(decoded):
            return None
        value = decoded[row]
    elif row == 0:
        value = decoded
    else:
        return None
    return version, pk, json.dumps(value)
