"""The stock scorer's wire format: what may be coalesced, and how to merge and split.

A request is merged with others only when doing so provably gives each caller
what the stock scorer would have given it alone:

* the deployment's signature names its input columns and every column has a
  scalar type (double, float, long, integer, boolean, string), so the stock
  parser casts each column by the signature, value by value;
* the body is JSON (`application/json`, optionally `charset=utf-8`) holding
  only `dataframe_split` (with `columns` and `data`, no `index`) or
  `dataframe_records`, plus optional `params`; every column is in the
  signature, rows are flat lists/objects of scalars with one column order;
* only requests with the same format, the same columns, the same params and
  the same per-column *value kinds* are merged. Pandas infers a column's dtype
  from the kinds of value present (all ints, ints and floats, strings and
  nulls ...), so equal kinds give the merged frame the same dtypes as each
  request alone. For double/float columns ints, floats and nulls count as one
  kind because the scorer casts them all to float first;
* the replica answers exactly `{"predictions": [...]}` with one entry per row.

Anything else is forwarded unchanged, and a merged call that fails is retried
request by request, so a bad request cannot change its batch-mates' answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

JSON_MIME = "application/json"
SPLIT = "dataframe_split"
RECORDS = "dataframe_records"
PARAMS = "params"

# "any" columns merge too: requests merge only when every column holds the same JSON
# value types, so the merged frame has the dtypes each request alone would have had.
_SCALAR_TYPES = {"double", "float", "long", "integer", "boolean", "string", "any"}
_FLOAT_TYPES = {"double", "float"}

# Kind bits of JSON scalars as json.loads returns them (exact types; bool is not int here).
_BOOL, _INT, _FLOAT, _STR, _NULL = 1, 2, 4, 8, 16
_KIND = {bool: _BOOL, int: _INT, float: _FLOAT, str: _STR, type(None): _NULL}
_FLOATISH = _INT | _FLOAT | _NULL
_KINDS_CACHE_SIZE = 4096


@dataclass(frozen=True)
class BatchSchema:
    """Which columns a deployment accepts for merging, and which are cast to float."""

    columns: frozenset[str]
    float_columns: frozenset[str]
    # (columns, row value types) -> kind masks; requests mostly repeat a few shapes.
    _kinds_cache: dict[Any, tuple[int, ...] | None] = field(
        default_factory=dict, compare=False, repr=False
    )

    @classmethod
    def from_signature_inputs(cls, inputs: list[dict[str, Any]] | None) -> BatchSchema | None:
        """The schema if the signature is named scalar columns, else None (no batching)."""
        if not inputs:
            return None
        names: set[str] = set()
        floats: set[str] = set()
        for spec in inputs:
            name, kind = spec.get("name"), spec.get("type")
            if not isinstance(name, str) or kind not in _SCALAR_TYPES or name in names:
                return None
            names.add(name)
            if kind in _FLOAT_TYPES:
                floats.add(name)
        return cls(frozenset(names), frozenset(floats))

    def kinds(
        self, columns: tuple[str, ...], row_types: frozenset[tuple[type, ...]]
    ) -> tuple[int, ...] | None:
        """Per-column kind masks for rows with these value types, or None if not mergeable."""
        key = (columns, row_types)
        try:
            return self._kinds_cache[key]
        except KeyError:
            pass
        masks = self._compute_kinds(columns, row_types)
        if len(self._kinds_cache) >= _KINDS_CACHE_SIZE:
            self._kinds_cache.clear()
        self._kinds_cache[key] = masks
        return masks

    def _compute_kinds(
        self, columns: tuple[str, ...], row_types: frozenset[tuple[type, ...]]
    ) -> tuple[int, ...] | None:
        if not columns or len(set(columns)) != len(columns):
            return None
        if not all(c in self.columns for c in columns):
            return None
        width = len(columns)
        floaty = [c in self.float_columns for c in columns]
        masks = [0] * width
        for types in row_types:
            if len(types) != width:
                return None
            for i, value_type in enumerate(types):
                kind = _KIND.get(value_type)
                if kind is None:
                    return None
                masks[i] |= _FLOAT if floaty[i] and kind & _FLOATISH else kind
        return tuple(masks)


@dataclass(slots=True)
class TabularRequest:
    """A parsed request that may be merged with others sharing its `key`."""

    key: tuple[Any, ...]
    fmt: str
    columns: tuple[str, ...]
    rows: list[Any]
    params: Any
    has_params: bool


def is_json_content_type(content_type: str | None) -> bool:
    """True when the stock scorer would parse the body as JSON (same rules as its parser)."""
    if content_type is None:
        return False
    if content_type == JSON_MIME:
        return True
    parts = [p.strip() for p in content_type.split(";")]
    if parts[0] != JSON_MIME:
        return False
    for pair in parts[1:]:
        key, _, value = pair.partition("=")
        if key != "charset" or value.lower() != "utf-8":
            return False
    return True


def parse_tabular(body: bytes, schema: BatchSchema, max_rows: int) -> TabularRequest | None:
    """Parse `body` as a mergeable request, or return None to forward it unchanged."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict):
        return None
    has_params = PARAMS in payload
    if len(payload) != 1 + has_params:
        return None
    params = payload.get(PARAMS)
    if SPLIT in payload:
        parsed = _split_rows(payload[SPLIT], schema, max_rows)
        fmt = SPLIT
    elif RECORDS in payload:
        parsed = _records_rows(payload[RECORDS], schema, max_rows)
        fmt = RECORDS
    else:
        return None
    if parsed is None:
        return None
    columns, rows, kinds = parsed
    try:
        params_key = json.dumps(params, sort_keys=True) if has_params else None
    except (TypeError, ValueError):
        return None
    return TabularRequest((fmt, columns, kinds, params_key), fmt, columns, rows, params, has_params)


def _split_rows(
    split: Any, schema: BatchSchema, max_rows: int
) -> tuple[tuple[str, ...], list[Any], tuple[int, ...]] | None:
    if type(split) is not dict or split.keys() != {"columns", "data"}:
        return None
    columns, data = split["columns"], split["data"]
    if type(columns) is not list or type(data) is not list or not data or len(data) > max_rows:
        return None
    if not all(type(c) is str for c in columns):
        return None
    row_types = set()
    for row in data:
        if type(row) is not list:
            return None
        row_types.add(tuple(map(type, row)))
    names = tuple(columns)
    masks = schema.kinds(names, frozenset(row_types))
    return None if masks is None else (names, data, masks)


def _records_rows(
    records: Any, schema: BatchSchema, max_rows: int
) -> tuple[tuple[str, ...], list[Any], tuple[int, ...]] | None:
    if type(records) is not list or not records or len(records) > max_rows:
        return None
    if type(records[0]) is not dict:
        return None
    names = tuple(records[0])
    row_types = set()
    for record in records:
        # The same keys in the same order, so the merged frame has the same columns.
        if type(record) is not dict or tuple(record) != names:
            return None
        row_types.add(tuple(map(type, record.values())))
    masks = schema.kinds(names, frozenset(row_types))
    return None if masks is None else (names, records, masks)


def merge_body(items: list[TabularRequest]) -> bytes:
    """One request body holding the rows of `items` (which share a key), in order."""
    first = items[0]
    rows = [row for item in items for row in item.rows]
    if first.fmt == SPLIT:
        payload: dict[str, Any] = {SPLIT: {"columns": list(first.columns), "data": rows}}
    else:
        payload = {RECORDS: rows}
    if first.has_params:
        payload[PARAMS] = first.params
    return json.dumps(payload).encode()


def split_predictions(body: bytes, sizes: list[int]) -> list[tuple[bytes, list[Any]]] | None:
    """Split a merged `{"predictions": [...]}` into one body per request, or None.

    None means the answer is not row-aligned (other keys, not a list, wrong
    length), so the caller must fall back to sending requests one by one.
    """
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(payload, dict) or len(payload) != 1:
        return None
    predictions = payload.get("predictions")
    if not isinstance(predictions, list) or len(predictions) != sum(sizes):
        return None
    parts = []
    start = 0
    for size in sizes:
        chunk = predictions[start : start + size]
        # json.dumps with default separators is exactly how the stock scorer writes it.
        parts.append((json.dumps({"predictions": chunk}).encode(), chunk))
        start += size
    return parts


def scrub_error_body(body: bytes) -> bytes:
    """Drop `stack_trace` from a stock error body (never leak tracebacks to clients)."""
    if b'"stack_trace"' not in body:
        return body
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body
    if not isinstance(payload, dict) or "stack_trace" not in payload:
        return body
    del payload["stack_trace"]
    return json.dumps(payload).encode()
