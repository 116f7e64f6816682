"""Ground-truth feedback: the body of ``POST /feedback/{model}``, parsed and checked.

A caller sends the labels of requests it was answered, days later if need be, as a
JSON list ``[{"request_id": "9f3a01bc-2a", "label": 1}, ...]`` or as a CSV file
with the columns ``request_id`` and ``label`` (``Content-Type: text/csv``).

A request id names one scored request (the gateway's ``X-Flowline-Request-Id``);
the rows of a request with several rows are ``<request id>:<row>``, counting from
0, and a bare id means row 0. :func:`parse_feedback` turns a body into
:class:`FeedbackItem` values or raises :class:`BadFeedback` (HTTP 400);
:func:`check_labels` makes the labels the model's own type or raises
:class:`WrongLabels` (HTTP 422).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.secrets import persistent_secret
from monitoring.capture.record import MAX_REQUEST_ID_CHARS, MAX_ROWS_PER_RECORD

# Labels change what is measured, so they need a credential of their own (not the
# capture clients' ingest token): the variable, else the home's 0600 secret.
TOKEN_ENV = "FLOWLINE_FEEDBACK_TOKEN"
TOKEN_FILE = "feedback-token"

MAX_FEEDBACK_ITEMS = 1_000_000
ROW_SEPARATOR = ":"
CSV_TYPES = ("text/csv", "application/csv")
# curl -d sends its default form type: the body is still the JSON the user typed.
JSON_TYPES = ("application/json", "", "application/x-www-form-urlencoded")
# How many offending items an error message names.
SHOWN = 3


def feedback_token(home: Path, environ: Mapping[str, str] | None = None) -> str:
    """The token ``POST /feedback`` accepts: FLOWLINE_FEEDBACK_TOKEN, or the secret in
    ``$FLOWLINE_HOME/feedback-token`` (created, mode 0600, on first use)."""
    configured = (os.environ if environ is None else environ).get(TOKEN_ENV, "").strip()
    return configured or persistent_secret(home / TOKEN_FILE)


class BadFeedback(ValueError):
    """A feedback body that is not a list of request ids and labels (HTTP 400)."""


class WrongLabels(ValueError):
    """Labels of the wrong type for the model (HTTP 422)."""


@dataclass(frozen=True, slots=True)
class FeedbackItem:
    """One label: the request it belongs to, the row in that request, and the label."""

    request_id: str
    row: int
    label: Any


def split_row_id(value: Any) -> tuple[str, int]:
    """``("9f3a01bc-2a", 3)`` from ``"9f3a01bc-2a:3"``; a bare id is row 0.

    Raises BadFeedback for anything else than a printable string of at most
    MAX_REQUEST_ID_CHARS characters with an optional non-negative row number.
    """
    if not isinstance(value, str) or not value or not value.isprintable():
        raise BadFeedback(f"request_id must be a non-empty string, got {value!r:.80}")
    request_id, sep, row_text = value.rpartition(ROW_SEPARATOR)
    if not sep:
        request_id, row = value, 0
    elif row_text.isdigit() and request_id and int(row_text) < MAX_ROWS_PER_RECORD:
        row = int(row_text)
    else:
        raise BadFeedback(
            f"request_id {value!r:.80} is neither '<id>' nor '<id>:<row>' with a row number"
        )
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise BadFeedback(f"request_id longer than {MAX_REQUEST_ID_CHARS} characters")
    return request_id, row


def parse_feedback(body: bytes, content_type: str | None) -> list[FeedbackItem]:
    """The labels of a ``POST /feedback`` body (JSON list or CSV); BadFeedback if malformed."""
    media = (content_type or "application/json").split(";", 1)[0].strip().lower()
    if media in CSV_TYPES:
        pairs = _csv_pairs(body)
    elif media in JSON_TYPES:
        pairs = _json_pairs(body)
    else:
        raise BadFeedback(f"unsupported Content-Type {media!r}: send application/json or text/csv")
    if not pairs:
        raise BadFeedback("no labels in the body")
    if len(pairs) > MAX_FEEDBACK_ITEMS:
        raise BadFeedback(f"{len(pairs)} labels in one body; at most {MAX_FEEDBACK_ITEMS}")
    items = []
    for position, (row_id, label) in enumerate(pairs):
        try:
            request_id, row = split_row_id(row_id)
        except BadFeedback as exc:
            raise BadFeedback(f"item {position}: {exc}") from None
        items.append(FeedbackItem(request_id, row, label))
    return items


def _json_pairs(body: bytes) -> list[tuple[Any, Any]]:
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadFeedback("body is not valid JSON") from None
    if not isinstance(payload, list):
        raise BadFeedback('body must be a JSON list like [{"request_id": "...", "label": 1}]')
    pairs = []
    for position, entry in enumerate(payload):
        if not isinstance(entry, dict) or "request_id" not in entry or "label" not in entry:
            raise BadFeedback(f"item {position} must be an object with 'request_id' and 'label'")
        label = entry["label"]
        if label is None or isinstance(label, (dict, list)):
            raise BadFeedback(f"item {position}: label must be a string, number or boolean")
        if isinstance(label, float) and not math.isfinite(label):
            raise BadFeedback(f"item {position}: label must be finite")
        pairs.append((entry["request_id"], label))
    return pairs


def _csv_pairs(body: bytes) -> list[tuple[Any, Any]]:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadFeedback("CSV body is not UTF-8") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    names = [h.strip().lower() for h in header or []]
    if "request_id" not in names or "label" not in names:
        raise BadFeedback("CSV needs a header row with the columns request_id and label")
    id_at, label_at = names.index("request_id"), names.index("label")
    pairs = []
    try:
        for line, fields in enumerate(reader, start=2):
            if not fields:
                continue
            if len(fields) != len(names):
                raise BadFeedback(f"CSV line {line} has {len(fields)} fields, not {len(names)}")
            label = fields[label_at].strip()
            if not label:
                raise BadFeedback(f"CSV line {line}: empty label")
            pairs.append((fields[id_at].strip(), label))
    except csv.Error as exc:
        raise BadFeedback(f"CSV is malformed: {exc}") from None
    return pairs


# --- the label's type: what the model predicts ------------------------------------------


def check_labels(
    items: list[FeedbackItem], task: str | None, classes: Sequence[Any] | None
) -> list[FeedbackItem]:
    """The items with labels of the model's type (CSV text parsed), or WrongLabels.

    ``task`` and ``classes`` come from the version's baseline (its ``performance``
    section): a regression label must be a finite number; a classification label is
    turned into the type of the classes (1, "1" and 1.0 are the class 1; "true" is
    True). A class never seen in training is still a label of the right type. With
    no task known (a baseline from before), labels are kept as they came.
    """
    if task is None:
        return items
    convert = _to_number if task == "regression" else _class_converter(classes or [])
    checked, wrong = [], []
    for item in items:
        value = convert(item.label)
        if value is None:
            wrong.append(item)
        else:
            checked.append(FeedbackItem(item.request_id, item.row, value))
    if wrong:
        kind = "a number" if task == "regression" else _class_kind(classes or [])
        shown = ", ".join(f"{w.label!r:.40}" for w in wrong[:SHOWN])
        raise WrongLabels(f"{len(wrong)} label(s) are not {kind}, as the model's are: {shown}")
    return checked


def _to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _class_kind(classes: Sequence[Any]) -> str:
    sample = classes[0] if classes else ""
    if isinstance(sample, bool):
        return "a boolean"
    if isinstance(sample, (int, float)):
        return "an integer class" if isinstance(sample, int) else "a number"
    return "a string"


def _class_converter(classes: Sequence[Any]) -> Any:
    sample = classes[0] if classes else None
    if isinstance(sample, bool):
        return _to_bool
    if isinstance(sample, int):
        return _to_int
    if isinstance(sample, float):
        return _to_number
    return _to_str


_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _to_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = _to_number(value)
    return int(number) if number is not None and number.is_integer() else None


def _to_str(value: Any) -> str | None:
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
