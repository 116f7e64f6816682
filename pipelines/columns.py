"""The column plan: what each raw column of a training table becomes inside the model.

Real tables hold integers, floats, dates, booleans, IDs, constants and text. The plan is
decided once, on the training frame as pandas reads it, and travels inside the logged
model (``InputCoercer``), so serving applies exactly the same rules as training:

======================  =====================================================  ==========
raw column              rule                                                   type
======================  =====================================================  ==========
bool dtype, or text     all present values are true/false/yes/no/t/f/y/n/1/0   boolean
whose values are all    (any case)
boolean words
datetime dtype, or      >= DATE_SHARE of present values parse as ISO-8601      datetime
ISO-8601 text           (``YYYY-MM-DD[ HH:MM:SS][+zone]``); fewer: categorical
                        with a warning
integer dtype, or       every present value is a whole number                  integer
floats that are whole
other numeric dtypes                                                           float
anything else                                                                  string
======================  =====================================================  ==========

Dropped, each with a warning and listed in the tag ``flowline.dropped_columns``:

* ``empty``: no value at all; ``constant``: a single distinct value (nulls aside);
* ``id_like``: text with more than ID_DISTINCT_SHARE distinct values among its present
  values (and more than ID_MIN_DISTINCT of them) — names, free text, keys — or an
  integer column whose values are all distinct and either form one consecutive run
  (a row number) or whose name says it is an identifier (``id``, ``*_id``, ``uuid``...).

At scoring time ``InputCoercer`` turns whatever a client sent into the typed frame the
preprocessing expects, and raises ``ColumnTypeError`` (a 400 from ``/invocations``) for a
value of the wrong type: text in a numeric column, a list anywhere. Datetimes become
their year, month, day of week and day of year; an unparseable date string is a missing
value, as it was in training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, TransformerMixin

from monitoring.profile import column_types

DATE_SHARE = 0.95
ID_DISTINCT_SHARE = 0.5
ID_MIN_DISTINCT = 20
DATE_PARTS = ("year", "month", "day_of_week", "day_of_year")
MISSING = "__missing__"
_ISO_DATE = re.compile(
    r"^\s*\d{4}-\d{2}-\d{2}([ T]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?\s*$"
)
_ID_NAME = re.compile(r"(^|[_\s-])(id|uuid|guid|key)$|^(id|uuid|guid)([_\s-]|$)", re.IGNORECASE)


class ColumnTypeError(ValueError):
    """A scoring value does not fit its column's type."""


@dataclass(frozen=True)
class ColumnPlan:
    """Kept columns with their types, in training order, and dropped columns with reasons."""

    types: dict[str, str]
    dropped: dict[str, str] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    # Kept in the plan, not read from DATE_PARTS, because the fitted preprocessing of a
    # logged model names these columns: a later flowline must produce the same ones.
    date_parts: tuple[str, ...] = DATE_PARTS

    @property
    def numeric(self) -> list[str]:
        """Model-input columns (after coercion) that the preprocessing treats as numbers."""
        out: list[str] = []
        for name, type_ in self.types.items():
            if type_ == column_types.DATETIME:
                out += [f"{name}__{part}" for part in self.date_parts]
            elif type_ in (column_types.INTEGER, column_types.FLOAT):
                out.append(name)
        return out

    @property
    def categorical(self) -> list[str]:
        """Model-input columns (after coercion) that the preprocessing one-hot encodes."""
        return [
            n for n, t in self.types.items() if t in (column_types.BOOLEAN, column_types.STRING)
        ]


def _is_whole(values: pd.Series) -> bool:
    numbers = values.to_numpy(dtype=np.float64)
    return bool(np.all(np.isfinite(numbers)) and np.all(numbers == np.round(numbers)))


def _looks_boolean(series: pd.Series, present: pd.Series) -> bool:
    if pd.api.types.is_bool_dtype(series):
        return True
    if pd.api.types.is_numeric_dtype(series) or present.empty:
        return False
    words = present.astype(str).str.strip().str.lower()
    return bool(words.isin(list(column_types.BOOLEAN_WORDS)).all() and words.nunique() == 2)


def _date_share(present: pd.Series) -> float:
    text = present.astype(str)
    shaped = text.str.match(_ISO_DATE)
    if not shaped.any():
        return 0.0
    _, invalid = column_types.datetime_values(text.where(shaped, None))
    return float((shaped & ~invalid).mean())


def _is_id_like(name: str, present: pd.Series, type_: str) -> bool:
    distinct = present.nunique()
    if type_ == column_types.STRING:
        share = distinct / len(present) if len(present) else 0.0
        return distinct > ID_MIN_DISTINCT and share > ID_DISTINCT_SHARE
    if type_ == column_types.INTEGER and distinct == len(present) and distinct > ID_MIN_DISTINCT:
        values = present.to_numpy(dtype=np.float64)
        consecutive = values.max() - values.min() + 1 == distinct
        return bool(consecutive or _ID_NAME.search(name))
    return False


def _column_type(name: str, series: pd.Series, present: pd.Series, warn: list[str]) -> str:
    if _looks_boolean(series, present):
        return column_types.BOOLEAN
    if pd.api.types.is_datetime64_any_dtype(series):
        return column_types.DATETIME
    if pd.api.types.is_numeric_dtype(series):
        return column_types.INTEGER if _is_whole(present) else column_types.FLOAT
    share = _date_share(present)
    if share >= DATE_SHARE:
        return column_types.DATETIME
    if share > 0.5:
        warn.append(
            f"column '{name}' looks like dates but {1 - share:.0%} of its values do not parse "
            "as ISO-8601; treated as categorical"
        )
    return column_types.STRING


def plan_columns(features: pd.DataFrame) -> ColumnPlan:
    """Decide each column's type, or why it is dropped (see the module docstring)."""
    types: dict[str, str] = {}
    dropped: dict[str, str] = {}
    warnings: list[str] = []
    for raw_name, series in features.items():
        name = str(raw_name)
        present = series.dropna()
        if present.empty:
            dropped[name] = "empty"
            continue
        if present.astype(str).nunique() == 1:
            dropped[name] = "constant"
            continue
        type_ = _column_type(name, series, present, warnings)
        if _is_id_like(name, present, type_):
            dropped[name] = "id_like"
            continue
        types[name] = type_
    for name, reason in dropped.items():
        warnings.append(f"column '{name}' dropped ({reason.replace('_', '-')})")
    return ColumnPlan(types, dropped, tuple(warnings))


# NB: these run on every scoring call, on a handful of rows: numpy object arrays, not a
# chain of pandas Series operations (each of which costs 100-200 µs on this machine).
def _numbers(name: str, series: pd.Series) -> np.ndarray:
    if pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series):
        return series.to_numpy(dtype=np.float64, na_value=np.nan)
    values = series.to_numpy(dtype=object)
    missing = pd.isna(values)
    numbers = pd.to_numeric(np.where(missing, None, values), errors="coerce")
    numbers = np.asarray(numbers, dtype=np.float64)
    bad = ~missing & np.isnan(numbers)
    if bad.any():
        raise ColumnTypeError(
            f"Incompatible input types for column {name}: expected a number, got {values[bad][0]!r}"
        )
    return numbers


def _category(name: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | dict | tuple | set):
        raise ColumnTypeError(
            f"Incompatible input types for column {name}: expected a scalar, got {value!r}"
        )
    # Whole floats are the same category as ints: nulls turn int codes into floats.
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _text(name: str, series: pd.Series) -> np.ndarray:
    if isinstance(series.dtype, pd.StringDtype):
        return series.to_numpy(dtype=object, na_value=MISSING)
    values = series.to_numpy(dtype=object)
    missing = pd.isna(values)
    return np.array(
        [MISSING if gone else _category(name, v) for v, gone in zip(values, missing, strict=True)],
        dtype=object,
    )


def _booleans(name: str, series: pd.Series) -> np.ndarray:
    mapped, invalid = column_types.boolean_strings(series)
    if invalid.any():
        raise ColumnTypeError(
            f"Incompatible input types for column {name}: expected a boolean "
            f"(true/false, yes/no, 1/0), got {series[invalid].iloc[0]!r}"
        )
    return mapped.where(mapped.notna(), MISSING).to_numpy(dtype=object)


def _date_parts(name: str, series: pd.Series, parts: tuple[str, ...]) -> dict[str, np.ndarray]:
    if pd.api.types.is_numeric_dtype(series) and series.notna().any():
        raise ColumnTypeError(
            f"Incompatible input types for column {name}: expected an ISO-8601 date, "
            f"got {series.dropna().iloc[0]!r}"
        )
    parsed, _ = column_types.datetime_values(series)
    return {
        f"{name}__{part}": getattr(parsed.dt, part).to_numpy(dtype=np.float64, na_value=np.nan)
        for part in parts
    }


def coerce(frame: pd.DataFrame, plan: ColumnPlan) -> pd.DataFrame:
    """The typed model-input frame for raw rows ``frame`` (extra columns are ignored).

    Raises ``ColumnTypeError`` naming the column when a value does not fit its type, and
    ``KeyError`` semantics are left to MLflow's signature check (it names missing columns).
    """
    return pd.DataFrame(coerce_columns(frame, plan), index=frame.index)


def coerce_columns(frame: pd.DataFrame, plan: ColumnPlan) -> dict[str, np.ndarray]:
    """:func:`coerce`'s columns as arrays: float64 for numbers, object (str) otherwise.

    The compiled scoring path feeds these straight to onnxruntime, without the DataFrame.
    """
    out: dict[str, np.ndarray] = {}
    for name, type_ in plan.types.items():
        series = frame[name]
        if type_ == column_types.DATETIME:
            out.update(_date_parts(name, series, plan.date_parts))
        elif type_ == column_types.BOOLEAN:
            out[name] = _booleans(name, series)
        elif type_ == column_types.STRING:
            out[name] = _text(name, series)
        else:
            out[name] = _numbers(name, series)
    return out


class InputCoercer(BaseEstimator, TransformerMixin):
    """The first pipeline step: raw client columns in, typed model-input columns out."""

    def __init__(self, plan: ColumnPlan) -> None:
        self.plan = plan

    def fit(self, X: pd.DataFrame, y: Any = None) -> InputCoercer:
        """Nothing to learn: the plan was decided on the training frame."""
        return self

    def transform(self, X: pd.DataFrame) -> pd.DataFrame:
        """Coerce raw rows; see :func:`coerce`."""
        return coerce(X, self.plan)
