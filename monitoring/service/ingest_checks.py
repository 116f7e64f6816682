"""What ``POST /ingest`` accepts: each record's envelope, its row count, and the drop reports.

A batch is checked whole before anything is stored. The monitor refuses a batch
that has any invalid record (422, nothing stored) and names every invalid
record by position, id and reason; the capture client moves exactly those to
its spool's dead-letter table and sends the rest again. So a good record is
never lost with a bad one, and a bad one is kept where an operator can look.

Checked here:

* the envelope (:meth:`CaptureRecord.from_dict`): printable, bounded names and
  ids, a sane time, a known body encoding, and ``rows`` a plain positive integer;
* the row count: always counted from the record's inputs or body (the same
  count its window will parse); a ``rows`` that says otherwise is refused. A
  body the monitor cannot read is stored as one unreadable row (a schema
  violation in its window), as before;
* drop reports: ``records`` an integer in [0, 10^9], names as for records, at
  most :data:`MAX_DROP_ENTRIES` entries.

Which (model, version) streams may be created is decided by
:mod:`monitoring.service.stream_gate`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from monitoring.capture.record import CaptureRecord, MalformedRecord, check_stream

MAX_RECORDS_PER_BATCH = 20_000  # the capture client sends 500
MAX_DROPPED_PER_ENTRY = 10**9
MAX_DROP_ENTRIES = 1000
MAX_PROBLEMS_LISTED = 1000

StreamKey = tuple[str, str]


class IngestRefused(ValueError):
    """A batch the monitor does not store: an HTTP status and a JSON answer for the client.

    ``invalid`` names refused records ({"index", "id", "error"}); ``field`` is
    "client" when the drop report is what was refused.
    """

    def __init__(
        self,
        status: int,
        message: str,
        invalid: Sequence[dict[str, Any]] = (),
        field: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.invalid = list(invalid)
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        """The JSON answer."""
        out: dict[str, Any] = {"error": str(self)}
        if self.invalid:
            out["invalid"] = self.invalid[:MAX_PROBLEMS_LISTED]
            out["truncated"] = len(self.invalid) > MAX_PROBLEMS_LISTED
        if self.field:
            out["field"] = self.field
        return out


@dataclass(slots=True)
class PreparedRecord:
    """A valid record with its counted rows (``error`` set when its body is unreadable)."""

    record: CaptureRecord
    rows: int
    error: str | None


@dataclass
class PreparedBatch:
    """A batch split into valid records, in-batch duplicates, problems and drop counts."""

    records: list[PreparedRecord] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # each record's index in the batch
    size: int = 0
    duplicates: Counter[StreamKey] = field(default_factory=Counter)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    dropped: Counter[StreamKey] = field(default_factory=Counter)
    dropped_problems: list[str] = field(default_factory=list)

    def new_streams(self, known: set[StreamKey]) -> list[StreamKey]:
        """Streams of valid records that ``known`` lacks, in first-seen order."""
        seen: dict[StreamKey, None] = {}
        for prepared in self.records:
            key = (prepared.record.model, prepared.record.version)
            if key not in known:
                seen.setdefault(key, None)
        return list(seen)

    def refuse_streams(self, refused: dict[StreamKey, str]) -> None:
        """Mark the records of refused streams invalid, with the stream's reason."""
        for index, prepared in zip(self.positions, self.records, strict=True):
            reason = refused.get((prepared.record.model, prepared.record.version))
            if reason is not None:
                self.invalid.append({"index": index, "id": prepared.record.id, "error": reason})


def prepare_record(raw: Any) -> PreparedRecord:
    """Check one record and count its rows; MalformedRecord when it is invalid."""
    record = CaptureRecord.from_dict(raw)
    try:
        rows = record.row_count()
    except MalformedRecord as exc:
        # Stored as one unreadable row: its window counts it as a schema violation.
        return PreparedRecord(record, 1, str(exc).replace("\x00", "\\x00")[:2000])
    hint = record.rows_hint
    if hint is not None and hint != rows:
        raise MalformedRecord(f"record says rows={hint} but its request has {rows} rows")
    return PreparedRecord(record, rows, None)


def prepare_batch(records: Sequence[Any], dropped: Iterable[Any] = ()) -> PreparedBatch:
    """Check every record and drop report of a batch; never raises for their content."""
    batch = PreparedBatch(size=len(records))
    ids: set[str] = set()
    for index, raw in enumerate(records):
        try:
            prepared = prepare_record(raw)
        except MalformedRecord as exc:
            rid = raw.get("id") if isinstance(raw, dict) else None
            shown = rid if isinstance(rid, str) and rid.isprintable() else None
            batch.invalid.append({"index": index, "id": shown and shown[:64], "error": str(exc)})
            continue
        record = prepared.record
        if record.id in ids:  # the same record twice in one batch: stored once
            batch.duplicates[(record.model, record.version)] += 1
            continue
        ids.add(record.id)
        batch.records.append(prepared)
        batch.positions.append(index)
    entries = list(dropped)
    if len(entries) > MAX_DROP_ENTRIES:
        batch.dropped_problems.append(f"at most {MAX_DROP_ENTRIES} drop report entries")
        return batch
    for item in entries:
        try:
            key, count = _drop_entry(item)
        except MalformedRecord as exc:
            batch.dropped_problems.append(str(exc))
            continue
        batch.dropped[key] += count
    return batch


def _drop_entry(item: Any) -> tuple[StreamKey, int]:
    if not isinstance(item, dict):
        raise MalformedRecord("a drop report entry must be a JSON object")
    key = check_stream(item, "drop report")
    count = item.get("records")
    if type(count) is not int or not 0 <= count <= MAX_DROPPED_PER_ENTRY:
        raise MalformedRecord(
            f"drop report records must be an integer in [0, {MAX_DROPPED_PER_ENTRY}]"
        )
    return key, count


def refuse_invalid(batch: PreparedBatch) -> None:
    """Raise IngestRefused (422) when any record or the drop report of a batch is invalid."""
    if batch.invalid:
        batch.invalid.sort(key=lambda item: item["index"])
        first = batch.invalid[0]
        raise IngestRefused(
            422,
            f"{len(batch.invalid)} of {batch.size} records are invalid, nothing was stored "
            f"(record {first['index']}: {first['error']})",
            batch.invalid,
        )
    if batch.dropped_problems:
        raise IngestRefused(
            422,
            f"invalid drop report, nothing was stored: {batch.dropped_problems[0]}",
            field="client",
        )
