"""The capture record: the contract between the gateway's capture client and the monitor.

A record carries one scored request as it came: the raw body and its content type,
the model and version that scored it, the predictions and the time. The client does
not parse bodies; the monitor turns them into rows with :meth:`CaptureRecord.rows`,
exactly like the stock scorer reads them. This module is pure (no threads, no HTTP)
so that the monitor's store can import it without the client's machinery.

Wire format of ``POST /ingest``::

    {"client": {"id": "...", "dropped": [{"model": m, "version": v, "records": n}]},
     "records": [<CaptureRecord.to_dict()>, ...]}
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from dataclasses import dataclass
from typing import Any

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
    # Answered from the gateway's response cache: the rows are real traffic all the same.
    cached: bool = False

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
        if self.cached:
            out["cached"] = True
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
        cached = data.get("cached", False)
        if type(cached) is not bool:
            raise MalformedRecord("record cached must be true or false")
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
            cached=cached,
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
        against this (see :mod:`monitoring.service.ingest_checks`).
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


def encode_record(
    record_id: str,
    model: str,
    version: Any,
    received: float,
    content_type: str | None,
    request_id: Any,
    predictions: Any,
    body: bytes,
    cached: bool = False,
) -> bytes:
    """One scored request as the JSON text of :meth:`CaptureRecord.to_dict`.

    Assembled by hand (C string escaping, one small dumps for the predictions): the
    capture client runs this in the gateway's process for every request, so it is
    kept to a few microseconds. A body that is not UTF-8 travels as base64.
    """
    try:
        text, extra = body.decode("utf-8"), ""
    except UnicodeDecodeError:
        text, extra = base64.b64encode(body).decode("ascii"), ',"body_encoding":"base64"'
    if request_id is not None:
        extra += f',"request_id":{_quote(str(request_id))}'
    if cached:
        extra += ',"cached":true'
    try:
        preds = _dumps(predictions)
    except (TypeError, ValueError):
        preds = json.dumps(predictions, default=str)
    payload = (
        f'{{"id":"{record_id}","model":{_quote(model)},"version":{_quote(str(version))},'
        f'"time":{float(received)!r},"content_type":'
        f"{_quote(content_type) if content_type is not None else 'null'},"
        f'"predictions":{preds}{extra},"body":{_quote(text)}}}'
    )
    return payload.encode()


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
