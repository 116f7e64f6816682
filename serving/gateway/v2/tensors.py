"""Tensors of the Open Inference Protocol (V2): datatypes, shapes and their raw byte form.

A V2 tensor is a name, a datatype ("FP64", "INT64", "BYTES", ...), a shape and
its elements in row-major order: as a JSON array (REST), as typed `contents`
(gRPC), or as raw little-endian bytes (gRPC `raw_input_contents`, and Triton's
binary-data extension over REST). This module turns each form into a flat list
of Python values and back; it knows nothing of HTTP, gRPC or MLflow.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from serving.gateway.errors import ClientError

# The protocol's datatypes and their little-endian numpy forms (BYTES is separate).
NUMPY_TYPES: dict[str, str] = {
    "BOOL": "?",
    "UINT8": "<u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "<i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
BYTES = "BYTES"
DATATYPES = (*NUMPY_TYPES, BYTES)
_KNOWN = frozenset(DATATYPES)


class TensorError(ClientError):
    """A tensor that cannot be read as sent: the client's mistake, answered with 400."""


def check_datatype(name: str, datatype: Any) -> str:
    """`datatype` when the protocol defines it (BF16 and unknown names are refused)."""
    if not isinstance(datatype, str) or datatype not in _KNOWN:
        raise TensorError(
            f"input '{name}': unsupported datatype {datatype!r}; use one of {', '.join(DATATYPES)}"
        )
    return str(datatype)


def check_shape(name: str, shape: Any) -> list[int]:
    """`shape` as a list of non-negative ints, else TensorError."""
    # `type(d) is int` also refuses bools; this runs once per input on the hot path.
    if type(shape) is list and all(type(d) is int and d >= 0 for d in shape):
        return shape
    if not isinstance(shape, list | tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TensorError(f"input '{name}': 'shape' must be a list of non-negative integers")
    return [int(d) for d in shape]


def element_count(shape: Sequence[int]) -> int:
    """How many elements a tensor of `shape` holds."""
    return math.prod(shape)


def flatten(name: str, data: Any) -> list[Any]:
    """JSON tensor data, nested row-major or already flat, as one flat list."""
    if not isinstance(data, list):
        raise TensorError(f"input '{name}': 'data' must be a JSON array")
    if not any(type(item) is list for item in data):
        return data  # already flat: the common case
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def from_raw(name: str, datatype: str, raw: bytes, count: int) -> list[Any]:
    """The `count` elements that `raw` holds in the protocol's raw (little-endian) form."""
    if datatype == BYTES:
        return _bytes_from_raw(name, raw, count)
    dtype = np.dtype(NUMPY_TYPES[datatype])
    if len(raw) != count * dtype.itemsize:
        raise TensorError(
            f"input '{name}': {len(raw)} raw bytes do not hold {count} {datatype} elements"
        )
    return np.frombuffer(raw, dtype=dtype).tolist()


def _bytes_from_raw(name: str, raw: bytes, count: int) -> list[Any]:
    # Each element: a 4-byte little-endian length, then that many bytes.
    values: list[Any] = []
    offset = 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise TensorError(f"input '{name}': truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            raise TensorError(f"input '{name}': truncated BYTES element")
        values.append(_text(name, raw[offset : offset + size]))
        offset += size
    if len(values) != count:
        raise TensorError(f"input '{name}': {len(values)} BYTES elements for a shape of {count}")
    return values


def _text(name: str, value: bytes) -> str:
    # BYTES elements are strings for an MLflow model's columns.
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise TensorError(f"input '{name}': a BYTES element is not UTF-8 text") from None


def to_raw(datatype: str, values: Sequence[Any]) -> bytes:
    """`values` in the protocol's raw form for `datatype` (what gRPC clients decode)."""
    if datatype == BYTES:
        parts = []
        for value in values:
            encoded = str(value).encode("utf-8") if not isinstance(value, bytes) else value
            parts.append(struct.pack("<I", len(encoded)) + encoded)
        return b"".join(parts)
    return np.asarray(values, dtype=NUMPY_TYPES[datatype]).tobytes()


def datatype_of(values: Sequence[Any]) -> str:
    """The narrowest protocol datatype that holds every value (predictions are scalars)."""
    kinds = {type(v) for v in values if v is not None}
    if not kinds:
        return "FP64"
    if kinds == {bool}:
        return "BOOL"
    if kinds == {int}:
        return "INT64"
    if kinds <= {int, float}:
        return "FP64"
    return BYTES


def normalise(datatype: str, values: list[Any]) -> list[Any]:
    """Elements as the JSON a model's /invocations takes: NaN as null, BYTES as text.

    Other values pass as sent: the model's schema checks them exactly as it checks
    an /invocations body (a JSON client may send "yes" in a BOOL input, say).
    """
    if datatype.startswith("FP"):
        # JSON has no NaN; MLflow reads null in a float column as a missing value.
        # (v != v only for NaN; copy the list only when there is one.)
        if any(v != v for v in values):
            return [None if v != v else v for v in values]
        return values
    if datatype == BYTES and any(type(v) is bytes for v in values):
        return [v.decode("utf-8") if isinstance(v, bytes) else v for v in values]
    return values
