"""CSV bodies for models whose signature declares ``any`` columns.

NB: MLflow 3.17.2's scoring server reads a CSV body with ``pd.read_csv(dtype=...)`` built
from ``Schema.pandas_types()``, which raises for any column that is not a plain DataType.
So stock ``mlflow models serve`` answers 400 to *every* CSV request for such a model,
flowline-trained models included (their columns are ``any``: see pipelines/train.py).

For those routes only, the gateway reads the CSV the way ``mlflow models predict -t csv``
does (``pd.read_csv`` without dtypes) and forwards the frame to the replica as Parquet,
which keeps every value exactly (JSON would round floats). Models with typed signatures
get their CSV forwarded untouched, so stock parity holds for them byte for byte.
"""

from __future__ import annotations

import io

import pandas as pd

from serving.gateway import errors

CSV_MIME = "text/csv"
PARQUET_MIME = "application/vnd.apache.parquet"


class CsvBodyError(ValueError):
    """The CSV body cannot be read; the message is the client-facing error."""


def is_csv_content_type(content_type: str | None) -> bool:
    """True for ``text/csv`` with or without parameters."""
    return content_type is not None and content_type.split(";")[0].strip() == CSV_MIME


def has_any_columns(input_columns: list[dict] | None) -> bool:
    """Whether a signature's input columns include an ``any`` column."""
    return bool(input_columns) and any(c.get("type") == "any" for c in input_columns or [])


def csv_as_parquet(body: bytes) -> bytes:
    """The CSV ``body`` read as ``pd.read_csv`` reads it, written as a Parquet body."""
    try:
        frame = pd.read_csv(io.BytesIO(body))
        out = io.BytesIO()
        frame.to_parquet(out, index=False)
    except Exception as exc:  # pandas and pyarrow raise many types; all mean "bad CSV"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CsvBodyError(
            "Failed to parse input as a Pandas DataFrame. Ensure that the input is a valid "
            f"CSV-formatted Pandas DataFrame produced using the `pandas.DataFrame.to_csv()` "
            f"method. Error: '{first}'"
        ) from None
    return out.getvalue()


def bad_csv_body(exc: CsvBodyError) -> bytes:
    """MLflow's error body for an unreadable CSV (the same code stock uses)."""
    return errors.error_body(errors.BAD_REQUEST, str(exc))
