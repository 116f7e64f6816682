"""The MLflow pyfunc model that flowline logs for every family.

It wraps a fitted sklearn Pipeline (preprocessing + estimator, where the estimator may
be a Keras network) so that ``/invocations`` takes the raw columns of the training file.
Classifiers answer labels by default; ``params={"predict_method": "predict_proba"}``
returns one probability column per class instead. A value of the wrong type for its
column (text in a numeric column, say) is MLflow's INVALID_PARAMETER_VALUE: a 400 from
``/invocations`` that names the column.

When training logged an ONNX graph that it proved equivalent (artifact ``compiled``, see
``pipelines/onnx_export.py``), the model scores with it (``pipelines/compiled.py``); the
pickled pipeline stays inside as the reference and the fallback, used whenever
onnxruntime cannot load the graph.
"""

from __future__ import annotations

import logging
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipelines.columns import ColumnTypeError

logger = logging.getLogger(__name__)

PREDICT_METHODS = ("predict", "predict_proba")
COMPILED_ARTIFACT = "compiled"


class TabularModel(mlflow.pyfunc.PythonModel):
    """Raw tabular rows in, labels/values (or class probabilities) out."""

    def __init__(self, pipeline: Any, task: str) -> None:
        self.pipeline = pipeline
        self.task = task
        self.scorer: Any = None  # the compiled path, set by load_context when logged

    def load_context(self, context: Any) -> None:
        """Open the ONNX graph when the version has one; else keep the Python pipeline."""
        self.scorer = None
        path = (getattr(context, "artifacts", None) or {}).get(COMPILED_ARTIFACT)
        if not path:
            return
        try:
            from pipelines.compiled import CompiledScorer

            plan = self.pipeline.named_steps["columns"].plan
            with open(path, "rb") as handle:
                graph = handle.read()
            classes = getattr(self.pipeline, "classes_", None)
            self.scorer = CompiledScorer(graph, plan, self.task, classes)
        except Exception as exc:  # missing onnxruntime, unreadable graph: still serve
            logger.warning("scoring with the Python pipeline: cannot load ONNX graph: %s", exc)

    @property
    def _engine(self) -> Any:
        # Models pickled before the compiled path have no `scorer` attribute.
        return getattr(self, "scorer", None) or self.pipeline

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> Any:
        """Predict on raw rows; ``predict_method`` chooses labels or probabilities."""
        method = (params or {}).get("predict_method", "predict")
        if method not in PREDICT_METHODS:
            raise MlflowException.invalid_parameter_value(
                f"predict_method must be one of {', '.join(PREDICT_METHODS)}, got {method!r}"
            )
        if method == "predict_proba" and self.task != "classification":
            raise MlflowException.invalid_parameter_value(
                "predict_proba is only available for classification models"
            )
        try:
            engine = self._engine
            if method == "predict_proba":
                proba = engine.predict_proba(model_input)
                return pd.DataFrame(proba, columns=[str(c) for c in self.pipeline.classes_])
            return np.asarray(engine.predict(model_input))
        except ColumnTypeError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
