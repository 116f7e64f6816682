"""Batch scoring: a registered version scores a CSV or Parquet file (or a folder of them).

Without Spark, the input is read in chunks and scored with ``pyfunc.predict`` in this
process, so memory stays flat whatever the input's size; with a Spark master, the same
version scores through ``mlflow.pyfunc.spark_udf``. Either way:

* the output is Parquet: the input's own columns (or only ``key``) and the predictions
  (``prediction``, or ``proba_<class>`` per class with ``predict_method=predict_proba``);
* the output names the model: Parquet metadata ``flowline.model``, ``flowline.version``
  and ``flowline.model_uri`` (pandas path, one file), or a ``_flowline_model.json`` beside
  the part files (Spark path, a folder; readers skip files starting with ``_``);
* nothing is left at ``output`` unless scoring finished: results go to a temporary path
  beside it first, then are moved in place;
* ``capture`` sends a sample of the scored rows (``capture_sample``, recorded on the run)
  to the drift monitor as capture records, so a batch-scored version is monitored like
  a served one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.exceptions import MlflowException

from common import registry
from pipelines.data import SUPPORTED_SUFFIXES
from pipelines.errors import UserError
from pipelines.pyfunc_model import PREDICT_METHODS

CHUNK_ROWS = 50_000
# A capture record holds at most this many rows (records are bounded by the monitor).
CAPTURE_ROWS_PER_RECORD = 200
METADATA_FILE = "_flowline_model.json"


@dataclass(frozen=True)
class ScoreConfig:
    """The ``score`` entry point's parameters."""

    model: str
    input: str
    output: str
    spark: str = ""
    predict_method: str = "predict"
    key: str = ""
    overwrite: bool = False
    capture: bool = False
    capture_sample: float = 0.1
    chunk_rows: int = CHUNK_ROWS


@dataclass(frozen=True)
class ScoreSummary:
    """What was scored."""

    model: str
    version: str
    rows: int
    seconds: float
    captured_rows: int
    output: Path


def _input_files(path: Path) -> list[Path]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and not p.name.startswith(("_", "."))
            and p.suffix.lower() in SUPPORTED_SUFFIXES
        )
    else:
        raise UserError(f"input not found: {path}")
    if not files:
        raise UserError(f"no .csv or .parquet file in {path}")
    kinds = {SUPPORTED_SUFFIXES.get(f.suffix.lower()) for f in files}
    if None in kinds:
        raise UserError(f"unsupported input format '{path.suffix}': use .csv or .parquet files")
    if len(kinds) > 1:
        raise UserError(f"{path} mixes CSV and Parquet files; score one format at a time")
    return files


def validate(config: ScoreConfig) -> list[Path]:
    """Every check on the parameters and paths, before the model is loaded."""
    if config.predict_method not in PREDICT_METHODS:
        raise UserError(
            f"predict_method must be one of {', '.join(PREDICT_METHODS)} "
            f"(got '{config.predict_method}')"
        )
    if not 0.0 < config.capture_sample <= 1.0:
        raise UserError(f"capture_sample must be in (0, 1] (got {config.capture_sample})")
    if config.chunk_rows < 1:
        raise UserError(f"chunk_rows must be at least 1 (got {config.chunk_rows})")
    if not config.output:
        raise UserError("no output given: pass -P output=<path>")
    files = _input_files(Path(config.input).expanduser())
    output = Path(config.output).expanduser()
    if output.exists() and not config.overwrite:
        raise UserError(f"output {output} already exists; pass -P overwrite=true to replace it")
    if output.resolve() in {f.resolve() for f in files}:
        raise UserError("output must not be one of the input files")
    return files


def _resolve_model(uri: str) -> tuple[str, str]:
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if not uri.startswith("models:/"):
        return "", ""
    try:
        name, version = get_model_name_and_version(mlflow.MlflowClient(), uri)
    except MlflowException as exc:
        raise UserError(f"cannot resolve {uri}: {exc.message.splitlines()[0]}") from None
    return name, str(version)


def _load(uri: str) -> Any:
    try:
        return mlflow.pyfunc.load_model(uri)
    except MlflowException as exc:
        raise UserError(f"cannot load model {uri}: {exc.message.splitlines()[0]}") from None
    except OSError as exc:
        raise UserError(f"cannot load model {uri}: {exc}") from None


def _chunks(files: list[Path], rows: int) -> Iterator[pd.DataFrame]:
    for path in files:
        try:
            if SUPPORTED_SUFFIXES[path.suffix.lower()] == "csv":
                yield from pd.read_csv(path, chunksize=rows)
            else:
                for batch in pq.ParquetFile(path).iter_batches(batch_size=rows):
                    yield batch.to_pandas()
        except (pd.errors.ParserError, pa.ArrowInvalid, UnicodeDecodeError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise UserError(f"cannot read {path}: {first}") from None


def _check_columns(columns: list[str], model: Any, key: str) -> None:
    schema = model.metadata.get_input_schema()
    wanted = schema.required_input_names() if schema is not None else []
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise UserError(
            f"the input lacks the model's column(s) {', '.join(missing)}; "
            f"it has {', '.join(columns[:20])}"
        )
    if key and key not in columns:
        raise UserError(f"key column '{key}' not in the input; it has {', '.join(columns[:20])}")


def _prediction_frame(predictions: Any, method: str) -> pd.DataFrame:
    if method == "predict_proba":
        frame = pd.DataFrame(predictions)
        return frame.rename(columns={c: f"proba_{c}" for c in frame.columns})
    return pd.DataFrame({"prediction": np.asarray(predictions).ravel()})


def _score_chunk(model: Any, chunk: pd.DataFrame, method: str) -> pd.DataFrame:
    try:
        return _prediction_frame(model.predict(chunk, params={"predict_method": method}), method)
    except MlflowException as exc:
        raise UserError(f"the model refused the input: {exc.message.splitlines()[0]}") from None


def _temporary(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial-{uuid.uuid4().hex[:8]}")


def _move_into_place(tmp: Path, output: Path) -> None:
    if output.is_dir():
        shutil.rmtree(output)
    elif output.exists():
        output.unlink()
    os.replace(tmp, output)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class _Capture:
    """Sends a sample of scored rows to the drift monitor as capture records."""

    client: Any
    model: str
    version: str
    sample: float
    rng: np.random.Generator
    rows: int = 0

    def send(self, chunk: pd.DataFrame, predictions: pd.DataFrame) -> None:
        keep = self.rng.random(len(chunk)) < self.sample
        if not keep.any():
            return
        rows, preds = chunk.loc[keep], predictions.loc[keep]
        values = preds["prediction"].tolist() if "prediction" in preds else preds.to_dict("records")
        for start in range(0, len(rows), CAPTURE_ROWS_PER_RECORD):
            part = rows.iloc[start : start + CAPTURE_ROWS_PER_RECORD]
            split = json.loads(part.to_json(orient="split", index=False, date_format="iso"))
            body = json.dumps({"dataframe_split": split}).encode()
            self.client.submit(
                self.model,
                self.version,
                _CapturedRows(body, "application/json", time.time()),
                _plain(values[start : start + CAPTURE_ROWS_PER_RECORD]),
            )
        self.rows += int(keep.sum())


@dataclass(frozen=True)
class _CapturedRows:
    """What the capture client reads from a scored request."""

    body: bytes
    content_type: str
    received_at: float


def _plain(values: list[Any]) -> list[Any]:
    return json.loads(
        json.dumps(values, default=lambda v: v.item() if hasattr(v, "item") else str(v))
    )


def _capture_client(name: str, version: str) -> Any:
    from monitoring.capture.client import client_from_env

    if not name:
        raise UserError("capture=true needs a registered model: use a models:/ URI")
    env = dict(os.environ)
    env.setdefault("FLOWLINE_MONITOR_URL", "http://127.0.0.1:8082")
    client = client_from_env(env)
    if client is None:
        raise UserError("capture is disabled for every model (FLOWLINE_CAPTURE_DISABLED=*)")
    return client


def _score_with_pandas(
    config: ScoreConfig, files: list[Path], model: Any, name: str, version: str, tmp: Path
) -> tuple[int, int]:
    writer: pq.ParquetWriter | None = None
    capture = None
    if config.capture:
        capture = _Capture(
            _capture_client(name, version),
            name,
            version,
            config.capture_sample,
            np.random.default_rng(0),
        )
    rows = 0
    metadata = {
        registry.BATCH_MODEL_TAG: name,
        registry.BATCH_VERSION_TAG: version,
        registry.BATCH_MODEL_URI_TAG: config.model,
    }
    try:
        for number, chunk in enumerate(_chunks(files, config.chunk_rows)):
            if number == 0:
                _check_columns([str(c) for c in chunk.columns], model, config.key)
            predictions = _score_chunk(model, chunk, config.predict_method)
            kept = chunk[[config.key]] if config.key else chunk
            out = pd.concat([kept.reset_index(drop=True), predictions], axis=1)
            if writer is None:
                table = pa.Table.from_pandas(out, preserve_index=False)
                schema = table.schema.with_metadata({k: str(v) for k, v in metadata.items()})
                writer = pq.ParquetWriter(tmp, schema)
            table = pa.Table.from_pandas(out, schema=writer.schema, preserve_index=False)
            writer.write_table(table)
            if capture is not None:
                capture.send(chunk.reset_index(drop=True), predictions)
            rows += len(chunk)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise UserError(f"a later part of the input has other column types: {exc}") from None
    finally:
        if writer is not None:
            writer.close()
        if capture is not None:
            capture.client.close(timeout=30.0)
    if rows == 0:
        raise UserError(f"the input {config.input} has no rows")
    return rows, capture.rows if capture is not None else 0


def _score_with_spark(
    config: ScoreConfig, files: list[Path], model: Any, name: str, version: str, tmp: Path
) -> int:
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    from pipelines.spark import spark_session

    if config.capture:
        raise UserError("capture=true is for the pandas path; score without spark to capture")
    session = spark_session(config.spark, "flowline-scoring")
    paths = [str(f) for f in files]
    if SUPPORTED_SUFFIXES[files[0].suffix.lower()] == "csv":
        frame = session.read.option("header", True).option("inferSchema", True).csv(paths)
    else:
        frame = session.read.parquet(*paths)
    _check_columns(frame.columns, model, config.key)
    inputs = model.metadata.get_input_schema().input_names()
    result_type, columns = _spark_result(model, config.predict_method, T)
    udf = mlflow.pyfunc.spark_udf(
        session,
        config.model,
        result_type=result_type,
        env_manager="local",
        params={"predict_method": config.predict_method},
    )
    scored = frame.withColumn("_flowline_out", udf(*[F.col(c) for c in inputs]))
    if columns is None:
        scored = scored.withColumnRenamed("_flowline_out", "prediction")
    else:
        for label, column in columns:
            scored = scored.withColumn(column, F.col("_flowline_out").getField(label))
        scored = scored.drop("_flowline_out")
    kept = [config.key] if config.key else frame.columns
    outputs = ["prediction"] if columns is None else [c for _, c in columns]
    scored.select(*kept, *outputs).write.parquet(str(tmp))
    (tmp / METADATA_FILE).write_text(
        json.dumps({"model": name, "version": version, "model_uri": config.model}) + "\n"
    )
    return int(session.read.parquet(str(tmp)).count())


def _spark_result(model: Any, method: str, T: Any) -> tuple[Any, list[tuple[str, str]] | None]:
    wrapped = model.unwrap_python_model()
    classes = [str(c) for c in getattr(getattr(wrapped, "pipeline", None), "classes_", [])]
    task = getattr(wrapped, "task", "")
    if method == "predict_proba":
        if not classes:
            raise UserError("predict_proba needs a classifier trained by flowline")
        fields = [T.StructField(c, T.DoubleType()) for c in classes]
        return T.StructType(fields), [(c, f"proba_{c}") for c in classes]
    if task == "regression":
        return T.DoubleType(), None
    labels = getattr(wrapped.pipeline, "classes_", np.array([], dtype=object))
    integer = np.issubdtype(np.asarray(labels).dtype, np.integer)
    return (T.LongType() if integer else T.StringType()), None


def score(config: ScoreConfig, report: Callable[[str], None] = print) -> ScoreSummary:
    """Score ``config.input`` with ``config.model`` and write ``config.output``.

    Raises UserError (one line) for bad input, leaving nothing at ``output``.
    """
    files = validate(config)
    if config.spark:
        from pipelines.spark import check_java, check_master

        check_master(config.spark)
        check_java()
    name, version = _resolve_model(config.model)
    model = _load(config.model)
    output = Path(config.output).expanduser()
    tmp = _temporary(output)
    started = time.perf_counter()
    engine = f"Spark {config.spark}" if config.spark else "pandas chunks"
    report(f"scoring {len(files)} file(s) from {config.input} with {config.model} ({engine})")
    try:
        if config.spark:
            rows, captured = _score_with_spark(config, files, model, name, version, tmp), 0
        else:
            rows, captured = _score_with_pandas(config, files, model, name, version, tmp)
        _move_into_place(tmp, output)
    finally:
        _remove(tmp)
    seconds = time.perf_counter() - started
    summary = ScoreSummary(name, version, rows, seconds, captured, output)
    label = f"{name} version {version}" if name else config.model
    report(
        f"scored {rows} rows with {label} in {seconds:.1f}s ({rows / max(seconds, 1e-9):,.0f} "
        f"rows/s) -> {output}"
        + (
            f"; {captured} rows sent to the drift monitor ({config.capture_sample:g} sample)"
            if config.capture
            else ""
        )
    )
    return summary
