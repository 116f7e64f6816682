"""The baseline profile: training-data statistics that travel with a model version.

This module is the one contract between training (pipelines/ writes a profile) and
the drift monitor (monitoring/ reads it). The format is plain JSON so that any tool
can read it without flowline; sketches are Apache DataSketches binaries in base64.

Format ``flowline.baseline`` version 1 (see docs/baseline-format.md)::

    {
      "format": "flowline.baseline", "version": 1,
      "created_at": "2026-11-21T15:00:00+00:00",
      "rows": 1000,
      "schema": [{"name": "age", "dtype": "float64", "kind": "numeric", "type": "integer"}, ...],
      "features": {"age": <numeric stats>, "city": <categorical stats>},
      "ignored": {"customer_id": "id_like"},
      "prediction": <numeric or categorical stats of the model's training predictions>,
      "performance": <optional: test metrics and calibration, monitoring/profile/performance.py>
    }

Each feature's ``type`` says how raw values map into the profiled space, the same way in
training and in the monitor (:func:`profiled_values`): ``integer`` and ``float`` are
numbers; ``boolean`` values are the strings "true"/"false"; ``datetime`` values are days
since 1970-01-01 (kind numeric); ``string`` values are text. A profile without ``type``
(written before it existed) reads as integer/float or string by kind. ``ignored`` lists the
columns the model does not use, with the reason, so that the monitor does not count them
as extra columns. ``performance`` is optional: :func:`loads` accepts profiles without it
(all written before it existed).

numeric stats: kind, count (non-null), nulls, null_rate, mean, std, min, max,
  kll {k, n, sketch (base64 of a kll_floats_sketch)}
categorical stats: kind, count, nulls, null_rate, cardinality,
  top {value: count} (at most TOP_K values), other (count of the remaining values)
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd
from datasketches import kll_floats_sketch

from common.registry import INPUT_TYPES_METADATA  # noqa: F401 - re-exported
from monitoring.profile.column_types import (  # noqa: F401 - re-exported: the baseline's vocabulary
    BOOLEAN,
    BOOLEAN_WORDS,
    CATEGORICAL,
    DATETIME,
    FLOAT,
    INTEGER,
    KIND_OF_TYPE,
    NUMERIC,
    STRING,
    TYPES,
    boolean_strings,
    datetime_values,
    profiled_values,
)

FORMAT = "flowline.baseline"
VERSION = 1
FILE_NAME = "baseline.json"
KLL_K = 200
TOP_K = 50


class ProfileError(ValueError):
    """The profile document is malformed or of an unsupported version."""


def feature_kind(series: pd.Series) -> str:
    """Classify a column as numeric or categorical; booleans count as categorical."""
    if pd.api.types.is_bool_dtype(series) or not pd.api.types.is_numeric_dtype(series):
        return CATEGORICAL
    return NUMERIC


def _numeric_stats(series: pd.Series) -> dict[str, Any]:
    values = pd.to_numeric(series, errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
    present = values[~np.isnan(values)]
    sketch = kll_floats_sketch(KLL_K)
    if present.size:
        sketch.update(present.astype("float32"))
    nulls = int(values.size - present.size)
    return {
        "kind": NUMERIC,
        "count": int(present.size),
        "nulls": nulls,
        "null_rate": nulls / values.size if values.size else 0.0,
        "mean": float(present.mean()) if present.size else None,
        "std": float(present.std(ddof=1)) if present.size > 1 else None,
        "min": float(present.min()) if present.size else None,
        "max": float(present.max()) if present.size else None,
        "kll": {
            "k": KLL_K,
            "n": int(sketch.n),
            "sketch": base64.b64encode(sketch.serialize()).decode("ascii"),
        },
    }


def _categorical_stats(series: pd.Series) -> dict[str, Any]:
    nulls = int(series.isna().sum())
    counts = series.dropna().astype(str).value_counts()
    top = counts.iloc[:TOP_K]
    return {
        "kind": CATEGORICAL,
        "count": int(counts.sum()),
        "nulls": nulls,
        "null_rate": nulls / len(series) if len(series) else 0.0,
        "cardinality": int(counts.size),
        "top": {str(k): int(v) for k, v in top.items()},
        "other": int(counts.iloc[TOP_K:].sum()),
    }


def column_stats(series: pd.Series) -> dict[str, Any]:
    """Statistics of one column, numeric or categorical by its dtype."""
    if feature_kind(series) == NUMERIC:
        return _numeric_stats(series)
    return _categorical_stats(series)


def _default_type(series: pd.Series) -> str:
    if feature_kind(series) == CATEGORICAL:
        return STRING
    return INTEGER if pd.api.types.is_integer_dtype(series) else FLOAT


def build_profile(
    features: pd.DataFrame,
    predictions: Any = None,
    types: dict[str, str] | None = None,
    ignored: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Build the baseline profile of the raw training features and, optionally,
    of the model's predictions on them.

    ``types`` gives each column's type (see TYPES); a column without one is typed by its
    dtype. ``ignored`` names columns the model does not use, with the reason; they are
    not profiled.
    """
    types = types or {}
    ignored = ignored or {}
    kept = [name for name in features.columns if str(name) not in ignored]
    schema, stats = [], {}
    for name in kept:
        column = features[name]
        type_ = types.get(str(name)) or _default_type(column)
        values = profiled_values(column, type_)
        kind = KIND_OF_TYPE[type_]
        schema.append({"name": str(name), "dtype": str(column.dtype), "kind": kind, "type": type_})
        stats[str(name)] = _numeric_stats(values) if kind == NUMERIC else _categorical_stats(values)
    profile: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": len(features),
        "schema": schema,
        "features": stats,
        "ignored": {str(k): str(v) for k, v in ignored.items()},
        "prediction": None,
    }
    if predictions is not None:
        profile["prediction"] = column_stats(pd.Series(np.asarray(predictions).ravel()))
    return profile


def feature_types(profile: dict[str, Any]) -> dict[str, str]:
    """Each profiled feature's type; profiles written before types existed read by kind."""
    types = {}
    for entry in profile.get("schema", []):
        default = FLOAT if entry.get("kind") == NUMERIC else STRING
        types[entry["name"]] = entry.get("type", default)
    return types


def dumps(profile: dict[str, Any]) -> str:
    """Serialise a profile to compact JSON."""
    return json.dumps(profile, separators=(",", ":"), allow_nan=False)


def loads(text: str | bytes) -> dict[str, Any]:
    """Parse and validate a profile document."""
    try:
        profile = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"baseline profile is not valid JSON: {exc}") from None
    if not isinstance(profile, dict) or profile.get("format") != FORMAT:
        raise ProfileError("not a flowline baseline profile (missing format marker)")
    if profile.get("version") != VERSION:
        raise ProfileError(
            f"baseline profile version {profile.get('version')} is not supported "
            f"(this flowline reads version {VERSION})"
        )
    return profile


@dataclass(frozen=True)
class NumericBaseline:
    """Read-side view of one numeric feature's statistics."""

    stats: dict[str, Any]

    @property
    def sketch(self) -> kll_floats_sketch:
        """The KLL quantile sketch of the non-null training values."""
        return kll_floats_sketch.deserialize(base64.b64decode(self.stats["kll"]["sketch"]))

    def quantiles(self, ranks: list[float]) -> list[float]:
        """Approximate training quantiles at the given normalised ranks."""
        return list(self.sketch.get_quantiles(ranks))

    def cdf(self, points: list[float]) -> list[float]:
        """Approximate training CDF at the given (sorted, unique) split points."""
        return list(self.sketch.get_cdf(points))


def numeric_baseline(profile: dict[str, Any], feature: str) -> NumericBaseline:
    """The numeric view of ``feature`` in ``profile``."""
    stats = profile["features"][feature]
    if stats["kind"] != NUMERIC:
        raise ProfileError(f"feature {feature!r} is {stats['kind']}, not numeric")
    return NumericBaseline(stats)
