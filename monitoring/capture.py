"""Capture: the record contract between the gateway and the monitor, and the gateway's client.

The gateway calls its `on_scored(model, version, request, predictions)` hook for
every successful scoring. :class:`CaptureClient` is that hook: it appends the
request to a bounded in-memory queue (O(1), no parsing, no I/O) and a background
thread batches records and POSTs them to the monitor's ``/ingest``. When the
monitor is down or slow, or the queue is full, records go to a durable SQLite
spool (:mod:`monitoring.capture_spool`) and are redelivered later, oldest first.
Nothing is dropped: ``stats()["records_dropped"]`` stays 0 unless the monitor
refuses a single record as malformed, and then the record is kept in the spool's
dead-letter table.

The client does not parse request bodies: a record carries the raw body and its
content type, and the monitor turns it into rows with :meth:`CaptureRecord.rows`,
exactly like the stock scorer reads it. That keeps the gateway's CPU free for
scoring, and a body the monitor cannot read becomes a counted schema violation
there rather than an error in the gateway.

Wire format of ``POST /ingest``::

    {"client": {"id": "...", "dropped": [{"model": m, "version": v, "records": n}]},
     "records": [<CaptureRecord.to_dict()>, ...]}
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import io
import json
import logging
import math
import os
import random
import re
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from monitoring.capture_spool import SPOOL_FILE, Spool, SpooledRecord
from monitoring.ingest_token import TOKEN_ENV, client_token

logger = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_BATCH_SIZE = 500
# A kill -9 of the gateway loses what waits in memory: records queued since the last
# flush (at most one interval, or one POST when that took longer) and a batch being
# sent. Issue 9 bounds that at 50 ms of traffic; measured with 50 ms it reached 50 ms
# (the POST adds to the interval), so 25 ms. The cost, 40 small POSTs a second instead
# of 5, is measured in benchmarks/results/monitoring_capture_kill.md.
DEFAULT_FLUSH_INTERVAL_S = 0.025
DEFAULT_TIMEOUT_S = 5.0
DEFAULT_MAX_BACKOFF_S = 5.0
JSON_TYPES = ("application/json", "")  # the stock scorer treats a missing type as JSON
CSV_TYPE = "text/csv"
PARQUET_TYPE = "application/vnd.apache.parquet"
SCORING_KEYS = ("dataframe_split", "dataframe_records", "instances", "inputs")


_quote = json.encoder.encode_basestring_ascii  # a JSON string literal, in C
_dumps = json.JSONEncoder(separators=(",", ":")).encode


class MalformedRecord(ValueError):
    """A capture record (or its body) that cannot be turned into input rows."""


# Bounds of a record's fields: the store's column sizes, and far above any real request.
MAX_ID_CHARS = 64
MAX_MODEL_CHARS = 255
MAX_VERSION_CHARS = 64
MAX_REQUEST_ID_CHARS = 128
MAX_NAME_CHARS = 255
MAX_ROWS_PER_RECORD = 10_000_000
MAX_TIME = 1e10  # Unix seconds (year 2286)


def check_name(value: Any, what: str, limit: int) -> str:
    """``value`` if it is a non-empty printable string of at most ``limit`` characters.

    Printable excludes NUL and other control characters and lone surrogates:
    PostgreSQL cannot store NUL in text, neither database can store a lone
    surrogate, and they would reach /metrics labels and report pages.
    """
    if not isinstance(value, str) or not value or len(value) > limit:
        raise MalformedRecord(f"{what} must be a non-empty string of at most {limit} characters")
    if not value.isprintable():
        raise MalformedRecord(f"{what} must be printable (no control character, no lone surrogate)")
    return value


# Names already found valid: a batch repeats the same few model versions and content
# types, and ingest checks every record's (a few microseconds each, at 500 a batch).
_VALID: dict[tuple[str, str], bool] = {}
_VALID_TYPES: set[str] = set()


def check_stream(data: dict[str, Any], what: str) -> tuple[str, str]:
    """The checked ``model`` and ``version`` of a record or drop report (an int version
    becomes its string, as registry versions are numbers)."""
    model, version = data.get("model"), data.get("version")
    if type(model) is str and type(version) is str and (model, version) in _VALID:
        return model, version
    if isinstance(version, int) and not isinstance(version, bool):
        version = str(version)
    model = check_name(model, f"{what} model", MAX_MODEL_CHARS)
    version = check_name(version, f"{what} version", MAX_VERSION_CHARS)
    if len(_VALID) > 4096:
        _VALID.clear()
    _VALID[(model, version)] = True
    return model, version


def check_content_type(value: Any) -> str:
    """A checked content type (``check_name``, 255 characters), remembered once valid."""
    if type(value) is str and value in _VALID_TYPES:
        return value
    value = check_name(value, "record content_type", MAX_NAME_CHARS)
    if len(_VALID_TYPES) > 256:
        _VALID_TYPES.clear()
    _VALID_TYPES.add(value)
    return value


def _check_encodable(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedRecord(f"{what} is not valid Unicode (a lone surrogate)") from None


# --- the record contract ----------------------------------------------------------------


@dataclass(slots=True)  # not frozen: ingest builds one per record, and frozen init is slow
class CaptureRecord:
    """One scored request: who scored it, when, with which inputs and predictions.

    Either ``inputs`` (rows as ``{column: value}``) or ``body`` (the raw request
    body, with ``content_type``; base64 when ``body_encoding`` is "base64") is
    set. ``rows()`` gives the rows either way. ``predictions`` is the decoded
    ``predictions`` value of the answer, normally one entry per row.
    ``rows_hint`` (JSON ``rows``) is what a sender says the record holds: ingest
    refuses the record when it is not the count of the body's rows, so a claim can
    never inflate what is measured. The capture client leaves it out.
    """

    id: str
    model: str
    version: str
    time: float
    inputs: list[dict[str, Any]] | None = None
    predictions: Any = None
    request_id: str | None = None
    body: str | None = None
    content_type: str | None = None
    body_encoding: str | None = None
    rows_hint: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``None`` fields left out)."""
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "time": self.time,
        }
        for key in ("inputs", "predictions", "request_id", "body", "content_type"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.body_encoding:
            out["body_encoding"] = self.body_encoding
        if self.rows_hint:
            out["rows"] = self.rows_hint
        return out

    @classmethod
    def from_dict(cls, data: Any) -> CaptureRecord:
        """Validate the envelope of a record; the inputs are checked later by ``rows()``.

        Every text field the store keeps as text is bounded and printable (no NUL,
        no lone surrogate, which the databases cannot store), and ``rows``, when
        given, is a plain positive integer: MalformedRecord otherwise.
        """
        if not isinstance(data, dict):
            raise MalformedRecord("a record must be a JSON object")
        rid = data.get("id")
        if type(rid) is not str or not 0 < len(rid) <= MAX_ID_CHARS or not rid.isprintable():
            rid = check_name(rid, "record id", MAX_ID_CHARS)  # raises the clear message
        model, version = check_stream(data, "record")
        when = data.get("time")
        if not (type(when) is float and 0.0 <= when < MAX_TIME) and (  # the sender's usual float
            not isinstance(when, int | float)
            or isinstance(when, bool)
            or not math.isfinite(when)
            or not 0 <= when < MAX_TIME
        ):
            raise MalformedRecord(f"record time must be Unix seconds in [0, {MAX_TIME:.0e})")
        request_id = data.get("request_id")
        if isinstance(request_id, int) and not isinstance(request_id, bool):
            request_id = str(request_id)
        if request_id is not None:
            request_id = check_name(request_id, "record request_id", MAX_REQUEST_ID_CHARS)
        content_type = data.get("content_type")
        if content_type is not None:
            content_type = check_content_type(content_type)
        body = data.get("body")
        if body is not None:
            if not isinstance(body, str):
                raise MalformedRecord("record body must be a string")
            if not body.isascii():
                _check_encodable(body, "record body")
        encoding = data.get("body_encoding")
        if encoding not in (None, "", "base64"):
            raise MalformedRecord("record body_encoding must be 'base64' or absent")
        hint = data.get("rows")
        if hint is not None and (type(hint) is not int or not 1 <= hint <= MAX_ROWS_PER_RECORD):
            raise MalformedRecord(f"record rows must be an integer in [1, {MAX_ROWS_PER_RECORD}]")
        return cls(
            id=rid,
            model=model,
            version=version,
            time=float(when),
            inputs=data.get("inputs"),
            predictions=data.get("predictions"),
            request_id=request_id,
            body=body,
            content_type=content_type,
            body_encoding=encoding or None,
            rows_hint=hint,
        )

    def rows(self) -> list[dict[str, Any]]:
        """The input rows, parsed like the stock scorer parses the request body.

        Positional rows (lists without column names) get the keys "0", "1", ...;
        the monitor maps them onto the baseline's column order. Raises
        :class:`MalformedRecord` when there are no readable rows.
        """
        if self.inputs is not None:
            return _as_rows(self.inputs, "inputs")
        if self.body is None:
            raise MalformedRecord("record has neither inputs nor body")
        raw: str | bytes = self.body
        if self.body_encoding == "base64":
            try:
                raw = base64.b64decode(self.body, validate=True)
            except ValueError:
                raise MalformedRecord("body is not valid base64") from None
        return rows_from_body(raw, self.content_type)

    def row_count(self) -> int:
        """How many rows ``rows()`` gives, counted from the inputs or the body without
        building them (MalformedRecord if none are readable).

        The sender's ``rows`` is never trusted for the count: ingest checks it
        against this (see :mod:`monitoring.ingest_checks`).
        """
        if self.inputs is not None:
            count = _count_rows(self.inputs, "inputs")
        elif self.body is None:
            raise MalformedRecord("record has neither inputs nor body")
        elif self.body_encoding == "base64":
            count = len(self.rows())
        else:
            count = count_rows_in_body(self.body, self.content_type)
        if count == 0:
            raise MalformedRecord("request has no rows")
        return count

    def prediction_list(self, rows: int) -> list[Any] | None:
        """Predictions aligned with ``rows`` input rows, or None when they do not line up."""
        preds = self.predictions
        if isinstance(preds, list) and len(preds) == rows:
            return preds
        if isinstance(preds, dict) and rows:
            # Multi-output answers such as {"col": [...]} are not one value per row.
            return None
        if rows == 1 and preds is not None and not isinstance(preds, list):
            return [preds]
        return None


def rows_from_body(body: str | bytes, content_type: str | None) -> list[dict[str, Any]]:
    """Input rows of a scoring request body (JSON, CSV or Parquet), like the stock scorer."""
    mime = _mime(content_type)
    if mime == CSV_TYPE:
        import pandas as pd

        text = body.decode("utf-8") if isinstance(body, bytes) else body
        try:
            frame = pd.read_csv(io.StringIO(text))
        except Exception as exc:  # pandas raises many types for bad CSV
            raise MalformedRecord(f"unreadable CSV body: {exc}") from None
        return _frame_rows(frame)
    if mime == PARQUET_TYPE:
        import pandas as pd

        data = body if isinstance(body, bytes) else body.encode("latin-1")
        try:
            frame = pd.read_parquet(io.BytesIO(data))
        except Exception as exc:
            raise MalformedRecord(f"unreadable Parquet body: {exc}") from None
        return _frame_rows(frame)
    key, value = _json_scoring_value(body)
    if key == "dataframe_split":
        names, data = _split_parts(value)
        if names is None:
            return _as_rows(data, key)
        return [dict(zip(names, row, strict=True)) for row in data]
    return _as_rows(value, key)


def count_rows_in_body(body: str | bytes, content_type: str | None) -> int:
    """How many rows ``rows_from_body`` would give, checked as strictly, without building them."""
    mime = _mime(content_type)
    if mime in (CSV_TYPE, PARQUET_TYPE):
        return len(rows_from_body(body, content_type))
    key, value = _json_scoring_value(body)
    if key == "dataframe_split":
        return _count_split(value)
    return _count_rows(value, key)


_MIMES: dict[str | None, str] = {}


def _mime(content_type: str | None) -> str:
    """The bare, lower-case media type of a Content-Type, remembered (ingest asks per record)."""
    mime = _MIMES.get(content_type)
    if mime is not None:
        return mime
    mime = (content_type or "").split(";")[0].strip().lower()
    if len(_MIMES) > 256:
        _MIMES.clear()
    _MIMES[content_type] = mime
    return mime


def _count_split(value: Any) -> int:
    """``len(_split_parts(value)[1])`` with the same checks, without copying the rows."""
    data = value.get("data") if isinstance(value, dict) else None
    if not isinstance(data, list):
        raise MalformedRecord("dataframe_split needs a 'data' list")
    columns = value.get("columns")
    if columns is None:
        return len(data)
    if not isinstance(columns, list):
        raise MalformedRecord("dataframe_split 'columns' must be a list")
    width = len(columns)
    for row in data:
        if (len(row) if isinstance(row, list) else 1) != width:
            raise MalformedRecord("dataframe_split row length differs from 'columns'")
    return len(data)


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape
_RAW_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def loads_text(text: str | bytes) -> Any:
    """``json.loads``, with lone surrogates (``"\\ud800"``) replaced by U+FFFD.

    JSON allows them, but no text store, pandas/Arrow or HTML page can encode
    them: one in a category value would make its window fail on every pass.
    Only texts with such an escape pay for the walk.
    """
    value = _loads(text)
    found = _RAW_SURROGATE if isinstance(text, bytes | bytearray) else _SURROGATE
    return _scrub(value) if found.search(text) else value


_scan_once = json.scanner.make_scanner(json.JSONDecoder())
_JSON_SPACE = " \t\n\r"


def _loads(text: str | bytes) -> Any:
    """``json.loads``, with the same answers and errors, calling the C scanner directly.

    Ingest decodes one small body per record (500 a batch): ``json.loads`` spends
    about 2 of its 5 us there in its Python wrapper (type checks, two regex
    whitespace matches), which this skips for the usual case of a ``str`` that
    starts with a value. Anything else goes through ``json.loads`` itself.
    """
    if type(text) is not str or not text or text[0] in _JSON_SPACE:
        return json.loads(text)
    try:
        value, end = _scan_once(text, 0)
    except StopIteration:
        return json.loads(text)  # raises the JSONDecodeError it would have raised
    if end != len(text) and text[end:].strip(_JSON_SPACE):
        return json.loads(text)
    return value


def _scrub(value: Any) -> Any:
    if isinstance(value, str):
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(value, list):
        return [_scrub(v) for v in value]
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    return value


def _json_scoring_value(body: str | bytes) -> tuple[str, Any]:
    """The one scoring key of a JSON body and its value."""
    try:
        payload = loads_text(body)
    except (ValueError, UnicodeDecodeError):
        raise MalformedRecord("body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise MalformedRecord("JSON body must be an object")
    if len(payload) == 1:  # the usual body: only the scoring key, no params
        (key,) = payload
        if key in SCORING_KEYS:
            return key, payload[key]
    keys = [k for k in SCORING_KEYS if k in payload]
    if len(keys) != 1:
        raise MalformedRecord(f"JSON body must have exactly one of {', '.join(SCORING_KEYS)}")
    return keys[0], payload[keys[0]]


def _split_parts(value: Any) -> tuple[list[str] | None, list[list[Any]]]:
    """Column names (None when absent) and row lists of a dataframe_split value."""
    if not isinstance(value, dict) or not isinstance(value.get("data"), list):
        raise MalformedRecord("dataframe_split needs a 'data' list")
    data = [r if isinstance(r, list) else [r] for r in value["data"]]
    columns = value.get("columns")
    if columns is None:
        return None, data
    if not isinstance(columns, list):
        raise MalformedRecord("dataframe_split 'columns' must be a list")
    width = len(columns)
    if any(len(row) != width for row in data):
        raise MalformedRecord("dataframe_split row length differs from 'columns'")
    return [str(c) for c in columns], data


def _count_rows(value: Any, where: str) -> int:
    """Row count of records, positional lists, or a dict of columns (as ``_as_rows``)."""
    if isinstance(value, dict):
        columns = list(value.values())
        if columns and all(isinstance(v, list) for v in columns):
            lengths = {len(v) for v in columns}
            if len(lengths) != 1:
                raise MalformedRecord(f"{where}: columns of different lengths")
            return lengths.pop()
        return 1
    if not isinstance(value, list):
        raise MalformedRecord(f"{where} must be a list or an object")
    return len(value)


def _as_rows(value: Any, where: str) -> list[dict[str, Any]]:
    """Rows from records, positional lists, or a dict of columns."""
    _count_rows(value, where)  # the same checks as counting
    if isinstance(value, dict):
        columns = list(value.items())
        if columns and all(isinstance(v, list) for _, v in columns):
            names = [str(k) for k, _ in columns]
            columns_values = (v for _, v in columns)
            return [
                dict(zip(names, vals, strict=True)) for vals in zip(*columns_values, strict=True)
            ]
        return [{str(k): v for k, v in value.items()}]
    rows: list[dict[str, Any]] = []
    for item in value:
        if isinstance(item, dict):
            rows.append({str(k): v for k, v in item.items()})
        elif isinstance(item, list):
            rows.append({str(i): v for i, v in enumerate(item)})
        else:
            rows.append({"0": item})
    return rows


def _frame_rows(frame: Any) -> list[dict[str, Any]]:
    # to_json turns NaN into null and numpy scalars into plain JSON numbers.
    return json.loads(frame.to_json(orient="records"))


# --- sampling and switches --------------------------------------------------------------


@dataclass(frozen=True)
class SamplingPolicy:
    """Which share of each model's requests to capture (0 = off)."""

    default: float = 1.0
    per_model: Mapping[str, float] = field(default_factory=dict)
    disabled: frozenset[str] = frozenset()

    def rate(self, model: str) -> float:
        """The capture probability for ``model``."""
        if model in self.disabled or "*" in self.disabled:
            return 0.0
        return self.per_model.get(model, self.default)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SamplingPolicy:
        """FLOWLINE_CAPTURE_SAMPLE ("0.5" or "0.5,churn=0.1") and FLOWLINE_CAPTURE_DISABLED."""
        env = os.environ if environ is None else environ
        default = 1.0
        per_model: dict[str, float] = {}
        for part in env.get("FLOWLINE_CAPTURE_SAMPLE", "").split(","):
            part = part.strip()
            if not part:
                continue
            name, sep, value = part.rpartition("=")
            rate = float(value)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"FLOWLINE_CAPTURE_SAMPLE rates must be in [0, 1]: {part!r}")
            if sep and name.strip() not in ("", "*"):
                per_model[name.strip()] = rate
            else:
                default = rate
        disabled = frozenset(
            m.strip() for m in env.get("FLOWLINE_CAPTURE_DISABLED", "").split(",") if m.strip()
        )
        return cls(default, per_model, disabled)


# --- the client -------------------------------------------------------------------------


def record_id(client_id: str, seq: int) -> str:
    """A capture record's id: the client's random prefix, then its clock-based ordering key.

    One client's ids sort in the order it made them, so the store's unique index
    on record ids grows at one end per client instead of at random pages.
    """
    return f"{client_id}-{seq:x}"


class _Seq:
    """Monotonic ordering keys that keep increasing across restarts (clock-based)."""

    def __init__(self) -> None:
        self._last = 0

    def next(self) -> int:
        self._last = max(time.time_ns(), self._last + 1)
        return self._last


@dataclass
class _Stats:
    submitted: int = 0
    sampled_out: int = 0
    delivered: int = 0
    spooled: int = 0
    redelivered: int = 0
    delivery_failures: int = 0
    records_dropped: int = 0


class CaptureClient:
    """The gateway's `on_scored` hook: queue in memory, deliver in batches, spool on trouble."""

    def __init__(
        self,
        monitor_url: str,
        spool_dir: str | Path,
        *,
        sampling: SamplingPolicy | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_size: int = DEFAULT_BATCH_SIZE,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        token: str | Callable[[], str | None] | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError("queue_size and batch_size must be >= 1")
        self.ingest_url = monitor_url.rstrip("/") + "/ingest"
        self.sampling = sampling or SamplingPolicy()
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_backoff_s = max_backoff_s
        self.client_id = uuid.uuid4().hex[:16]  # record ids: '<client_id>-<seq hex>'
        self.spool = Spool(Path(spool_dir) / SPOOL_FILE)
        self._spooled = self.spool.count()  # what a previous run left: redelivered first
        self._queue: deque[tuple[str, str, Any, Any]] = deque()
        self._pop_lock = threading.Lock()  # FIFO pops (sender vs. overflow spill)
        self._stats_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._seq = _Seq()
        self._stats = _Stats()
        self._dropped: Counter[tuple[str, str]] = Counter()
        self._failures = 0
        self._retry_at = 0.0
        self._http = httpx.Client(timeout=timeout_s)
        # The ingest token, or where to read it again after a refusal (a monitor
        # that created its token after this client started, or a new token).
        self._token_source = token if callable(token) else (lambda: token)
        self._token = self._token_source()
        self._auth_refused = False
        self._dead_now: set[str] = set()  # ids dead-lettered while posting the current batch
        self._thread: threading.Thread | None = None
        self._closed = False

    # --- the hot path ---------------------------------------------------------------------

    def submit(self, model: str, version: str, request: Any, predictions: Any) -> None:
        """Queue one scored request; never blocks on the network, never raises."""
        try:
            rate = self.sampling.rate(model)
            if rate < 1.0 and (rate <= 0.0 or random.random() >= rate):
                self._stats.sampled_out += 1
                return
            self._queue.append((model, version, request, predictions))
            self._stats.submitted += 1
            size = len(self._queue)
            if size >= self.queue_size:
                self._spill_queue()  # amortised: one call in queue_size pays a batch write
            elif size >= self.batch_size:
                self._wake.set()
        except Exception:
            logger.exception("capture failed for %s/%s", model, version)
            self._count_dropped(model, version, 1)

    __call__ = submit

    async def on_scored(self, model: str, version: str, request: Any, predictions: Any) -> None:
        """Async form of :meth:`submit` for the gateway: runs on its event loop, no thread hop.

        Only a call that finds the queue full (monitor down and spilling) moves
        to a worker thread, because it writes the queue to disk.
        """
        if len(self._queue) + 1 >= self.queue_size:
            await asyncio.to_thread(self.submit, model, version, request, predictions)
        else:
            self.submit(model, version, request, predictions)

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> CaptureClient:
        """Start the delivery thread (it first redelivers what a previous run spooled)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flowline-capture", daemon=True)
            self._thread.start()
            if self._spooled:
                self._wake.set()
        return self

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until the queue and the spool are empty (delivered); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._queue and not self._spooled and self._idle.is_set():
                return True
            self._wake.set()
            time.sleep(0.02)
        return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop delivering; try one last delivery, spool whatever is left (kept for next start)."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._spill_queue()
        deadline = time.monotonic() + timeout
        try:
            while self._spooled and time.monotonic() < deadline and self._retry_at == 0.0:
                if not self._deliver_spool():
                    break
        except Exception:
            logger.exception("capture: final delivery failed; records stay spooled")
        self._http.close()
        self.spool.close()

    def stats(self) -> dict[str, int]:
        """Counters: submitted, sampled_out, delivered, spooled, redelivered, ... (records)."""
        out = dict(self._stats.__dict__)
        out["queued"] = len(self._queue)
        out["spool_pending"] = self._spooled
        return out

    # --- the delivery thread -------------------------------------------------------------

    def _run(self) -> None:
        next_flush = time.monotonic()
        while not self._stop.is_set():
            # Flushes are paced from the start of the previous one, not from its end: a
            # record then waits in memory at most one interval, however long a POST took.
            self._wake.wait(max(0.0, next_flush - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                break
            next_flush = time.monotonic() + self.flush_interval_s
            self._idle.clear()
            try:
                self._pump()
            except Exception:
                # The thread must outlive any surprise; records stay queued or spooled.
                logger.exception("capture delivery loop error")
                self._backoff()
            self._idle.set()

    def _pump(self) -> None:
        first = True
        while not self._stop.is_set():
            if time.monotonic() < self._retry_at:
                # The monitor is failing: keep memory small and records durable meanwhile.
                self._spill_queue()
                return
            if self._spooled:
                if not self._deliver_spool():
                    continue  # the backoff branch above spills the queue
                first = False
                continue
            # Spool empty: deliver from memory. After the first batch, go on only
            # while full batches wait, so steady traffic is not sent in tiny posts.
            if not first and len(self._queue) < self.batch_size:
                return
            batch = self._pop(self.batch_size)
            if not batch:
                return
            first = False
            self._dead_now.clear()
            if self._post(batch) == "retry":
                # What was set aside as refused stays in the dead letter, not queued again.
                kept = [r for r in batch if r.id not in self._dead_now]
                self.spool.put(kept)
                self._add_spooled(len(kept))

    def _deliver_spool(self) -> bool:
        batch = self.spool.peek(self.batch_size)
        if not batch:
            self._spooled = 0
            return True
        outcome = self._post(batch)
        if outcome == "retry":
            return False
        self.spool.delete(batch)
        with self._stats_lock:
            self._spooled = max(0, self._spooled - len(batch))
            if outcome == "ok":
                self._stats.redelivered += len(batch)
        return True

    def _pop(self, limit: int) -> list[SpooledRecord]:
        with self._pop_lock:
            items = []
            while self._queue and len(items) < limit:
                items.append(self._queue.popleft())
            # Keys are taken under the lock, so they follow queue order.
            keyed = [(self._seq.next(), item) for item in items]
        out = []
        for i, (seq, item) in enumerate(keyed, 1):
            out.append(self._encode(seq, item))
            if i % 32 == 0:
                # Let the gateway's event loop take the GIL now and then: a long
                # encoding run would otherwise delay answers by a switch interval (5 ms).
                time.sleep(0)
        return out

    def _spill_queue(self) -> None:
        while self._queue:
            batch = self._pop(self.batch_size * 4)
            if not batch:
                return
            self.spool.put(batch)
            self._add_spooled(len(batch))

    def _add_spooled(self, n: int) -> None:
        with self._stats_lock:
            self._spooled += n
            self._stats.spooled += n

    def _encode(self, seq: int, item: tuple[str, str, Any, Any]) -> SpooledRecord:
        # Assembled by hand (C string escaping, one small dumps for the predictions):
        # this runs in the gateway's process for every request, so it is kept to a
        # few microseconds. The id is the client's random prefix plus the ordering key.
        model, version, request, predictions = item
        rid = record_id(self.client_id, seq)
        body: bytes = request.body
        try:
            text, encoding = body.decode("utf-8"), ""
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(body).decode("ascii"), ',"body_encoding":"base64"'
        received = getattr(request, "received_at", None) or time.time()
        content_type = getattr(request, "content_type", None)
        request_id = getattr(request, "request_id", None)
        extra = encoding
        if request_id is not None:
            extra += f',"request_id":{_quote(str(request_id))}'
        try:
            preds = _dumps(predictions)
        except (TypeError, ValueError):
            preds = json.dumps(predictions, default=str)
        payload = (
            f'{{"id":"{rid}","model":{_quote(model)},"version":{_quote(str(version))},'
            f'"time":{float(received)!r},"content_type":'
            f"{_quote(content_type) if content_type is not None else 'null'},"
            f'"predictions":{preds}{extra},"body":{_quote(text)}}}'
        )
        return SpooledRecord(seq, rid, payload.encode())

    def _post(self, batch: list[SpooledRecord]) -> str:
        """Deliver one batch: "ok", "retry" (monitor unavailable) or "dropped" (refused)."""
        dropped = self._take_dropped_report()
        head = json.dumps({"id": self.client_id, "dropped": dropped}, separators=(",", ":"))
        body = b'{"client":' + head.encode() + b',"records":[' + b",".join(
            r.payload for r in batch
        ) + b"]}"  # fmt: skip
        headers = {"content-type": "application/json"}
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        answer: httpx.Response | None = None
        try:
            answer = self._http.post(self.ingest_url, content=body, headers=headers)
            status = answer.status_code
        except httpx.HTTPError as exc:
            status, reason = 0, type(exc).__name__
        else:
            reason = f"HTTP {status}"
        if 200 <= status < 300:
            if self._failures:
                logger.warning("capture: monitor at %s reachable again", self.ingest_url)
            self._failures = 0
            self._retry_at = 0.0
            self._auth_refused = False
            with self._stats_lock:
                self._stats.delivered += len(batch)
            return "ok"
        self._restore_dropped_report(dropped)
        if status in (401, 403):
            # A credential problem, not a bad record: keep everything spooled, read
            # the token again and retry with backoff until the monitor takes it.
            if not self._auth_refused:
                logger.error(
                    "capture: monitor at %s refused the ingest token (HTTP %d); records stay "
                    "spooled until FLOWLINE_INGEST_TOKEN or $FLOWLINE_HOME/ingest-token match",
                    self.ingest_url,
                    status,
                )
            self._auth_refused = True
            self._token = self._token_source()
            with self._stats_lock:
                self._stats.delivery_failures += 1
            self._backoff()
            return "retry"
        if status in (400, 413, 422):
            refusal = _refusal(answer)
            if refusal.get("field") == "client" and dropped:
                # The drop report itself was refused: it is only counters, so it is
                # discarded (logged) rather than holding back the records.
                logger.error(
                    "capture: monitor refused the drop report %s: %s", dropped, refusal.get("error")
                )
                self._take_dropped_report()
                return self._post(batch)
            invalid = _invalid_indexes(refusal, len(batch))
            if invalid:
                # The monitor named the bad records: set exactly those aside, send the rest.
                for i in sorted(invalid):
                    self._dead_letter(batch[i], f"{reason}: {invalid[i]}")
                rest = [r for i, r in enumerate(batch) if i not in invalid]
                return self._post(rest) if rest else "dropped"
            # Refused as malformed or too large: split to isolate the bad record.
            if len(batch) > 1:
                mid = len(batch) // 2
                first, second = self._post(batch[:mid]), self._post(batch[mid:])
                return "retry" if "retry" in (first, second) else "ok"
            self._dead_letter(batch[0], reason)
            return "dropped"
        with self._stats_lock:
            self._stats.delivery_failures += 1
        # One warning per outage; the retries in between only at debug level.
        log = logger.warning if self._failures == 0 else logger.debug
        log("capture: monitor at %s unavailable (%s); spooling to disk", self.ingest_url, reason)
        self._backoff()
        return "retry"

    def _dead_letter(self, record: SpooledRecord, reason: str) -> None:
        """Keep a record the monitor refused in the spool's dead-letter table, and count it."""
        logger.error("capture: monitor refused record %s (%s); kept in dead letter", record.id,
                     reason)  # fmt: skip
        self.spool.dead_letter([record], reason, time.time())
        self._dead_now.add(record.id)
        try:
            meta = json.loads(record.payload)
            self._count_dropped(str(meta.get("model")), str(meta.get("version")), 1)
        except ValueError:
            self._count_dropped("?", "?", 1)
        # A spooled record was removed by dead_letter; the caller's delete is a no-op.

    def _backoff(self) -> None:
        self._failures += 1
        delay = min(self.max_backoff_s, 0.1 * 2 ** min(self._failures, 10))
        self._retry_at = time.monotonic() + delay * (0.5 + random.random() / 2)

    def _count_dropped(self, model: str, version: str, n: int) -> None:
        with self._stats_lock:
            self._stats.records_dropped += n
            self._dropped[(model, version)] += n

    def _take_dropped_report(self) -> list[dict[str, Any]]:
        with self._stats_lock:
            report = [
                {"model": m, "version": v, "records": n} for (m, v), n in self._dropped.items()
            ]
            self._dropped.clear()
        return report

    def _restore_dropped_report(self, report: list[dict[str, Any]]) -> None:
        with self._stats_lock:
            for item in report:
                self._dropped[(item["model"], item["version"])] += item["records"]


def _refusal(answer: httpx.Response | None) -> dict[str, Any]:
    """The JSON body of a 4xx answer from the monitor, or {}."""
    if answer is None:
        return {}
    try:
        doc = answer.json()
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _invalid_indexes(refusal: dict[str, Any], size: int) -> dict[int, str]:
    """Batch positions the monitor refused, with reasons; {} when it did not name them all."""
    items = refusal.get("invalid")
    if not isinstance(items, list) or not items or refusal.get("truncated"):
        return {}
    out: dict[int, str] = {}
    for item in items:
        index = item.get("index") if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < size:
            return {}  # not an answer about this batch: fall back to splitting it
        out[index] = str(item.get("error"))[:500]
    return out


# --- wiring into the gateway ------------------------------------------------------------


def client_from_env(environ: Mapping[str, str] | None = None) -> CaptureClient | None:
    """A started :class:`CaptureClient` configured from FLOWLINE_* variables, or None.

    None when FLOWLINE_MONITOR_URL is unset or capture is disabled for every
    model (FLOWLINE_CAPTURE_DISABLED=*). See docs/monitoring.md for the variables.
    """
    env = os.environ if environ is None else environ
    url = env.get("FLOWLINE_MONITOR_URL", "").strip()
    if not url:
        return None
    sampling = SamplingPolicy.from_env(env)
    if "*" in sampling.disabled:
        return None
    home = Path(env.get("FLOWLINE_HOME", ".flowline")).expanduser()
    spool_dir = Path(env.get("FLOWLINE_CAPTURE_SPOOL_DIR") or home / "capture-spool")
    if not env.get("FLOWLINE_CAPTURE_SPOOL_DIR") and spool_dir.is_dir():
        spool_dir.chmod(0o700)  # flowline's own folder, maybe left looser by an older run
    token_env = {TOKEN_ENV: env.get(TOKEN_ENV, "")}
    client = CaptureClient(
        url,
        spool_dir.expanduser().resolve(),
        sampling=sampling,
        queue_size=int(env.get("FLOWLINE_CAPTURE_QUEUE", DEFAULT_QUEUE_SIZE)),
        batch_size=int(env.get("FLOWLINE_CAPTURE_BATCH", DEFAULT_BATCH_SIZE)),
        flush_interval_s=float(env.get("FLOWLINE_CAPTURE_FLUSH_S", DEFAULT_FLUSH_INTERVAL_S)),
        timeout_s=float(env.get("FLOWLINE_CAPTURE_TIMEOUT_S", DEFAULT_TIMEOUT_S)),
        token=lambda: client_token(home, token_env),
    )
    return client.start()


def capture_hook_from_env(environ: Mapping[str, str] | None = None) -> Any:
    """The gateway's ``on_scored`` hook (an async function), or None when capture is off.

    Use it as ``serve_gateway(..., on_scored=capture_hook_from_env())``. The
    client is closed at interpreter exit, which spools whatever is still queued
    so that the next start redelivers it.
    """
    client = client_from_env(environ)
    if client is None:
        return None
    atexit.register(client.close)
    return client.on_scored
