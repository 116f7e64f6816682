"""Loading and validating the user's training table."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines.columns import ColumnPlan, plan_columns
from pipelines.errors import UserError

DEMO_DATA = Path(__file__).resolve().parent.parent / "projects" / "data" / "churn.csv"
DEMO_TARGET = "churned"
SUPPORTED_SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
TASKS = ("auto", "classification", "regression")
# An integer target with at most this many distinct values is taken as class labels.
MAX_AUTO_CLASSES = 20
# Below this share of rows for the rarest class, the default metric is average precision.
IMBALANCED_SHARE = 0.1


@dataclass(frozen=True)
class TrainingData:
    """Raw features (as pandas read them) and target, ready for splitting.

    ``plan`` says what each feature becomes inside the model; ``null_target_rows`` counts
    the rows left out because their target was missing; ``minority_share`` is the rarest
    class's share of rows (1.0 for regression).
    """

    features: pd.DataFrame
    target: pd.Series
    task: str
    fingerprint: str
    source: Path
    plan: ColumnPlan
    null_target_rows: int = 0
    minority_share: float = 1.0

    @property
    def imbalanced(self) -> bool:
        """Whether the rarest class has under IMBALANCED_SHARE of the rows."""
        return self.minority_share < IMBALANCED_SHARE


def resolve_source(data: str, target: str) -> tuple[Path, str]:
    """Map the ``demo`` shortcut (or an empty value) to the bundled data set."""
    if data in ("", "demo"):
        return DEMO_DATA, target or DEMO_TARGET
    if not target:
        raise UserError("no target column given: pass -P target=<column name>")
    return Path(data).expanduser(), target


def read_table(path: Path) -> pd.DataFrame:
    """Read a CSV or Parquet file, turning every failure into a one-line UserError."""
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UserError(
            f"unsupported data format '{path.suffix or path.name}': use a .csv or .parquet file"
        )
    try:
        frame = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        raise UserError(f"data file is empty: {path}") from None
    except Exception as exc:  # parser errors come in many types; all mean "unreadable file"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"cannot read {kind} file {path}: {reason}") from None
    return frame


def fingerprint(path: Path) -> str:
    """SHA-256 of the data file's bytes, shortened: identifies the exact training data."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def infer_task(target: pd.Series) -> str:
    """Classification for non-numeric or few-valued integer targets, else regression."""
    if pd.api.types.is_bool_dtype(target) or not pd.api.types.is_numeric_dtype(target):
        return "classification"
    values = target.dropna()
    is_integral = bool((values == values.round()).all())
    if is_integral and values.nunique() <= MAX_AUTO_CLASSES:
        return "classification"
    return "regression"


def load_training_data(data: str, target: str, task: str) -> TrainingData:
    """Read, validate and split the table into raw features and target."""
    if task not in TASKS:
        raise UserError(f"unknown task '{task}': use one of {', '.join(TASKS)}")
    path, target = resolve_source(data, target)
    frame = read_table(path)
    if frame.empty or len(frame.columns) == 0:
        raise UserError(f"data file has no rows: {path}")
    if target not in frame.columns:
        columns = ", ".join(map(str, frame.columns[:20]))
        raise UserError(
            f"target column '{target}' not found in {path.name}; columns are: {columns}"
        )
    if len(frame.columns) < 2:
        raise UserError(f"{path.name} has only the target column; add feature columns")
    frame.columns = [str(c) for c in frame.columns]
    null_target = int(frame[target].isna().sum())
    frame = frame[frame[target].notna()]
    if frame.empty:
        raise UserError(f"target column '{target}' has no values")
    y = frame[target]
    resolved = infer_task(y) if task == "auto" else task
    if resolved == "regression" and not pd.api.types.is_numeric_dtype(y):
        raise UserError(
            f"target '{target}' is not numeric, so task=regression cannot use it; "
            "use task=classification"
        )
    minority = 1.0
    if resolved == "classification":
        counts = y.astype(str).value_counts()
        if len(counts) < 2:
            raise UserError(
                f"target '{target}' has a single class ('{counts.index[0]}'); "
                "classification needs at least two"
            )
        if counts.min() < 2:
            raise UserError(f"every class of target '{target}' needs at least two rows")
        minority = float(counts.min() / counts.sum())
        y = y.astype(str) if not pd.api.types.is_numeric_dtype(y) else y
    features = frame.drop(columns=[target]).reset_index(drop=True)
    plan = plan_columns(features)
    if not plan.types:
        reasons = ", ".join(f"{c} ({r})" for c, r in plan.dropped.items())
        raise UserError(f"no usable feature column in {path.name}: all were dropped: {reasons}")
    return TrainingData(
        features,
        y.reset_index(drop=True),
        resolved,
        fingerprint(path),
        path,
        plan,
        null_target,
        minority,
    )
