"""The column types a model's inputs have, and how raw values map into each of them.

Training (pipelines/columns.py) decides a type per column, the model's own input coercer
applies it at scoring time, and the drift monitor profiles live values with it, so the
three agree by construction. This module ships inside every logged model (its ``code/``
folder), so it imports nothing but numpy and pandas: a replica in a container has only
the model's own requirements.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

NUMERIC = "numeric"
CATEGORICAL = "categorical"
INTEGER, FLOAT, BOOLEAN, DATETIME, STRING = "integer", "float", "boolean", "datetime", "string"
TYPES = (INTEGER, FLOAT, BOOLEAN, DATETIME, STRING)
KIND_OF_TYPE = {
    INTEGER: NUMERIC,
    FLOAT: NUMERIC,
    DATETIME: NUMERIC,
    BOOLEAN: CATEGORICAL,
    STRING: CATEGORICAL,
}
# Words a boolean column may hold, any case; 1/0 and real booleans count too.
BOOLEAN_WORDS = {word: True for word in ("true", "t", "yes", "y", "1")} | {
    word: False for word in ("false", "f", "no", "n", "0")
}
_EPOCH = pd.Timestamp("1970-01-01")
_DAY = pd.Timedelta(days=1)


def boolean_strings(series: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Map a boolean-like column to "true"/"false" (nulls stay null).

    Returns the mapped column and a mask of present values that are not booleans.
    """
    present = series.notna()

    def word(value: Any) -> Any:
        if isinstance(value, bool | np.bool_):
            return bool(value)
        if isinstance(value, int | float | np.integer | np.floating):
            return {1: True, 0: False}.get(value)
        return BOOLEAN_WORDS.get(str(value).strip().lower())

    mapped = (
        series.where(present, None).astype(object).map(lambda v: None if v is None else word(v))
    )
    invalid = present & mapped.isna()
    text = mapped.map(lambda v: None if v is None else ("true" if v else "false"))
    return text.astype(object), invalid


def datetime_values(series: pd.Series) -> tuple[pd.Series, pd.Series]:
    """Parse ISO-8601 strings or datetimes into naive UTC timestamps (nulls stay NaT).

    Returns the parsed column and a mask of present values that are not dates.
    Time-zone aware values are converted to UTC; naive ones are taken as UTC.
    """
    present = series.notna()
    if pd.api.types.is_datetime64_any_dtype(series):
        parsed = series
    else:
        text = series.where(present, None).astype(object)
        numbers = text.map(lambda v: isinstance(v, int | float | np.integer | np.floating))
        parsed = pd.to_datetime(
            text.where(~numbers, None), format="ISO8601", errors="coerce", utc=True
        )
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    parsed = parsed.astype("datetime64[ns]")
    return parsed, present & parsed.isna()


def profiled_values(series: pd.Series, type_: str | None) -> pd.Series:
    """Raw column values as the baseline profiles them (see the module docstring).

    Values that do not fit ``type_`` become NaN for numeric types (the drift test counts
    them as invalid) and stay as they are for categorical ones.
    """
    if type_ == DATETIME:
        parsed, _ = datetime_values(series)
        return (parsed - _EPOCH) / _DAY
    if type_ == BOOLEAN:
        mapped, invalid = boolean_strings(series)
        return mapped.where(~invalid, series.astype(object))
    return series
