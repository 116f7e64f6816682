"""The MLflow pyfunc model that flowline logs for every family.

It wraps a fitted sklearn Pipeline (preprocessing + estimator, where the estimator may
be a Keras network) so that ``/invocations`` takes the raw columns of the training file.
Classifiers answer labels by default; ``params={"predict_method": "predict_proba"}``
returns one probability column per class instead. A value of the wrong type for its
column (text in a numeric column, say) is MLflow's INVALID_PARAMETER_VALUE: a 400 from
``/invocations`` that names the column.
"""

from __future__ import annotations

from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipelines.columns import ColumnTypeError

PREDICT_METHODS = ("predict", "predict_proba")


class TabularModel(mlflow.pyfunc.PythonModel):
    """Raw tabular rows in, labels/values (or class probabilities) out."""

    def __init__(self, pipeline: Any, task: str) -> None:
        self.pipeline = pipeline
        self.task = task

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
            if method == "predict_proba":
                proba = self.pipeline.predict_proba(model_input)
                return pd.DataFrame(proba, columns=[str(c) for c in self.pipeline.classes_])
            return np.asarray(self.pipeline.predict(model_input))
        except ColumnTypeError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
