"""The compiled scoring path: the fitted preprocessing and estimator as one ONNX graph.

Training converts the pipeline after its column coercion (``pipelines/onnx_export.py``)
and keeps the graph only when it reproduces the Python pipeline (same labels, values
within ``RTOL``/``ATOL``). At serving time ``CompiledScorer`` coerces the raw columns
exactly as the Python path does (``pipelines.columns.coerce_columns``), hands the arrays
to onnxruntime without building a DataFrame, and never calls the ColumnTransformer.

Labels are ``classes_[argmax(probabilities)]``, the rule every sklearn classifier the
family trains uses in ``predict``, so the label dtype is the Python path's own.

This module runs inside the replica: it imports onnxruntime, never skl2onnx.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pipelines.columns import ColumnPlan, coerce_columns

# The equivalence rule (docs/compiled-scoring.md): |onnx - python| <= ATOL + RTOL * |python|.
# ATOL is float32's rounding at 1.0 (tree leaves are float32 in ONNX's TreeEnsemble), so a
# probability of exactly 0 in Python may be 1e-8 in ONNX; everything else is relative.
RTOL = 1e-6
ATOL = 1e-7

# Names of the graph's inputs and outputs, shared with the exporter.
LABEL_OUTPUT = "label"
PROBABILITY_OUTPUT = "probabilities"
VALUE_OUTPUT = "variable"


def session_options() -> Any:
    """onnxruntime settings tuned for single-row latency on a small, shared machine.

    One intra- and one inter-op thread: a replica is one process among several on a few
    cores, and a thread pool's wake-up costs more than a one-row graph takes (measured:
    24 µs per 1-row call with one thread). Full graph optimisation, sequential execution.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # warnings about unused initialisers are noise here
    return options


def graph_columns(plan: ColumnPlan) -> list[str]:
    """The coerced columns, in the order of the graph's inputs: numbers, then categories."""
    return plan.numeric + plan.categorical


class CompiledScorer:
    """Raw rows in, the Python pipeline's labels, probabilities or values out."""

    def __init__(self, model: bytes, plan: ColumnPlan, task: str, classes: Any = None) -> None:
        import onnxruntime as ort

        self.plan = plan
        self.task = task
        self.classes = None if classes is None else np.asarray(classes)
        self.session = ort.InferenceSession(
            model, session_options(), providers=["CPUExecutionProvider"]
        )
        # The graph's inputs are the coerced columns in the exporter's order; skl2onnx
        # renames some ("mean radius" becomes "mean_radius"), so they are matched by position.
        inputs = [i.name for i in self.session.get_inputs()]
        columns = graph_columns(plan)
        if len(inputs) != len(columns):
            raise ValueError(f"the graph has {len(inputs)} inputs for {len(columns)} columns")
        self._feeds = list(zip(inputs, columns, strict=True))
        self._output = [PROBABILITY_OUTPUT if task == "classification" else VALUE_OUTPUT]

    def _run(self, frame: pd.DataFrame) -> np.ndarray:
        columns = coerce_columns(frame, self.plan)
        feeds = {name: columns[column].reshape(-1, 1) for name, column in self._feeds}
        return self.session.run(self._output, feeds)[0]

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Class probabilities, columns ordered as ``classes``."""
        return np.asarray(self._run(frame), dtype=np.float64)

    def predict(self, frame: pd.DataFrame) -> np.ndarray:
        """Class labels (classification) or values (regression), one per row."""
        out = self._run(frame)
        if self.task == "classification":
            return self.classes[np.argmax(out, axis=1)]
        return np.asarray(out, dtype=np.float64).reshape(-1)
