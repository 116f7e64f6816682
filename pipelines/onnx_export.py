"""Training time: convert a fitted pipeline to ONNX, and keep it only if it is equivalent.

The graph covers everything after the column coercion: the ColumnTransformer (median
imputation, scaling, one-hot encoding with infrequent categories) and the estimator.
Each coerced column is one graph input of shape ``[N, 1]``: float64 for numbers, string
for categories, so the graph computes in float64 like sklearn does.

Two conversions differ from skl2onnx's defaults, both so the graph matches sklearn:

* ``SimpleImputer`` on float64 input: skl2onnx emits the ``ai.onnx.ml`` Imputer, which
  onnxruntime implements for float32 only. Here it is ``Where(IsNaN(x), medians, x)``.
* tree ensembles (random forests): sklearn rounds the features to float32 and compares
  them with float64 thresholds; skl2onnx's default stores float32 thresholds, and a
  threshold that rounds onto a feature value sends that row down the other branch (0.04
  probability error on a 50-tree forest here). The graph rounds the input to float32 and
  back, and keeps the thresholds in float64 (``ai.onnx.ml`` opset 3).

``check_equivalence`` then scores the held-out test split plus rows with nulls and unseen
categories both ways. The version is compiled only if every label is identical and every
probability or value is within ``compiled.RTOL``/``compiled.ATOL``; otherwise it keeps the
Python pipeline, and the reason is recorded (tag ``flowline.runtime.reason``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from monitoring.profile import column_types
from pipelines import onnx_keras
from pipelines.columns import ColumnPlan
from pipelines.compiled import ATOL, RTOL, CompiledScorer, graph_columns

ONNX = "onnx"
PYTHON = "python"
# Opsets onnxruntime 1.32 runs; ai.onnx.ml 3 is the first with float64 tree thresholds.
TARGET_OPSET = {"": 18, "ai.onnx.ml": 3}
UNSEEN_CATEGORY = "__flowline_unseen_category__"
STRESS_ROWS = 20


@dataclass(frozen=True)
class Compilation:
    """What training decided: ``runtime`` is ``onnx`` (with the graph) or ``python``."""

    runtime: str
    reason: str
    model: bytes | None = None

    @property
    def compiled(self) -> bool:
        """True when the version scores with the ONNX graph."""
        return self.model is not None


def stress_rows(features: pd.DataFrame, plan: ColumnPlan) -> pd.DataFrame:
    """Raw rows the test split may lack: each column null in turn, all nulls at once, and
    a category never seen in training in every text column."""
    base = features.loc[:, list(plan.types)].head(STRESS_ROWS).reset_index(drop=True)
    if base.empty:
        return base
    frames = []
    for name in plan.types:
        nulled = base.copy()
        nulled[name] = None
        frames.append(nulled)
    frames.append(pd.DataFrame({name: [None] * len(base) for name in plan.types}))
    unseen = base.copy()
    for name, type_ in plan.types.items():
        if type_ == column_types.STRING:
            unseen[name] = UNSEEN_CATEGORY
    frames.append(unseen)
    return pd.concat([f.astype(object) for f in frames], ignore_index=True)


def compile_pipeline(
    pipeline: Any, plan: ColumnPlan, task: str, check_rows: list[pd.DataFrame]
) -> Compilation:
    """Convert ``pipeline`` (``columns`` → ``preprocess`` → ``model``) and check it on
    ``check_rows``; never raises (a failure is a ``python`` compilation with its reason)."""
    try:
        model = convert(pipeline, plan, task)
    except Exception as exc:  # skl2onnx raises many kinds for what it does not support
        return Compilation(PYTHON, f"conversion failed: {_one_line(exc)}")
    try:
        scorer = CompiledScorer(model, plan, task, getattr(pipeline, "classes_", None))
        problem = check_equivalence(pipeline, scorer, task, pd.concat(check_rows))
    except Exception as exc:  # a graph onnxruntime cannot load or run
        return Compilation(PYTHON, f"onnxruntime cannot run the graph: {_one_line(exc)}")
    if problem:
        return Compilation(PYTHON, f"not equivalent to the Python pipeline: {problem}")
    rows = sum(len(f) for f in check_rows)
    return Compilation(ONNX, f"identical on {rows} check rows", model)


def check_equivalence(pipeline: Any, scorer: CompiledScorer, task: str, rows: pd.DataFrame) -> str:
    """Empty when ``scorer`` reproduces ``pipeline`` on ``rows``, else what differs."""
    expected = np.asarray(pipeline.predict(rows))
    got = scorer.predict(rows)
    if task == "classification":
        same = expected == got
        if not same.all():
            return f"{int((~same).sum())} of {len(rows)} labels differ"
        expected, got = pipeline.predict_proba(rows), scorer.predict_proba(rows)
    expected = np.asarray(expected, dtype=np.float64)
    close = np.isclose(got, expected, rtol=RTOL, atol=ATOL)
    if not close.all():
        worst = float(np.max(np.abs(got - expected)))
        return f"{int((~close).sum())} values differ by more than the tolerance (max {worst:.3g})"
    return ""


def convert(pipeline: Any, plan: ColumnPlan, task: str) -> bytes:
    """The ONNX graph (serialised) of ``pipeline`` after its coercion step."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import DoubleTensorType, StringTensorType
    from sklearn.pipeline import Pipeline

    _register_float64_converters()
    steps = dict(pipeline.steps)
    graph_part = Pipeline([("preprocess", steps["preprocess"]), ("model", steps["model"])])
    numeric = set(plan.numeric)
    inputs = [
        (name, DoubleTensorType([None, 1]) if name in numeric else StringTensorType([None, 1]))
        for name in graph_columns(plan)
    ]
    options = {id(steps["model"]): {"zipmap": False}} if task == "classification" else None
    onx = to_onnx(graph_part, initial_types=inputs, options=options, target_opset=TARGET_OPSET)
    return onx.SerializeToString()


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


@functools.cache
def _register_float64_converters() -> None:
    # Once per process: skl2onnx's converter registry is global.
    from skl2onnx.common._registration import _converter_pool, register_converter
    from skl2onnx.operator_converters.one_hot_encoder import convert_sklearn_one_hot_encoder
    from skl2onnx.operator_converters.random_forest import (
        convert_sklearn_random_forest_classifier,
        convert_sklearn_random_forest_regressor_converter,
    )

    register_converter("SklearnSimpleImputer", _convert_imputer, overwrite=True)
    onnx_keras.register()
    options = _converter_pool["SklearnOneHotEncoder"].get_allowed_options()
    register_converter(
        "SklearnOneHotEncoder",
        _unknown_as_zeros(convert_sklearn_one_hot_encoder),
        overwrite=True,
        options=options,
    )
    for name, converter in (
        ("SklearnRandomForestClassifier", convert_sklearn_random_forest_classifier),
        ("SklearnRandomForestRegressor", convert_sklearn_random_forest_regressor_converter),
    ):
        options = _converter_pool[name].get_allowed_options()
        register_converter(name, _float32_features(converter), overwrite=True, options=options)
    for name, converter in (
        ("SklearnHistGradientBoostingClassifier", convert_sklearn_random_forest_classifier),
        ("SklearnHistGradientBoostingRegressor", convert_sklearn_random_forest_regressor_converter),
    ):
        options = _converter_pool[name].get_allowed_options()
        register_converter(name, _float64_trees(converter), overwrite=True, options=options)
    for name, position in (
        ("SklearnRandomForestRegressor", 0),
        ("SklearnHistGradientBoostingRegressor", 0),
        ("SklearnHistGradientBoostingClassifier", 1),
    ):
        registered = _converter_pool[name]
        register_converter(
            name,
            _float_output_cast(registered._fct, position),
            overwrite=True,
            options=registered.get_allowed_options(),
        )


def _convert_imputer(scope: Any, operator: Any, container: Any) -> None:
    from skl2onnx.common.data_types import DoubleTensorType
    from skl2onnx.operator_converters.common import concatenate_variables
    from skl2onnx.operator_converters.imputer_op import convert_sklearn_imputer
    from skl2onnx.proto import onnx_proto

    imputer = operator.raw_operator
    missing = imputer.missing_values
    nan_missing = isinstance(missing, float) and np.isnan(missing)
    if not (isinstance(operator.inputs[0].type, DoubleTensorType) and nan_missing):
        convert_sklearn_imputer(scope, operator, container)
        return
    features = concatenate_variables(scope, operator.inputs, container)
    fill = scope.get_unique_variable_name("statistics")
    stats = np.asarray(imputer.statistics_, dtype=np.float64)
    container.add_initializer(fill, onnx_proto.TensorProto.DOUBLE, [1, stats.size], stats.tolist())
    is_nan = scope.get_unique_variable_name("is_nan")
    container.add_node("IsNaN", [features], [is_nan], name=scope.get_unique_operator_name("IsNaN"))
    container.add_node(
        "Where",
        [is_nan, fill, features],
        [operator.outputs[0].full_name],
        name=scope.get_unique_operator_name("Where"),
    )


def _unknown_as_zeros(converter: Callable[..., Any]) -> Callable[..., Any]:
    # skl2onnx makes an unseen category an error unless handle_unknown="ignore"; sklearn's
    # "infrequent_if_exist" encodes it as zeros when the column has no infrequent bucket
    # (and as that bucket otherwise: the equivalence check's unseen rows catch that case).
    def convert_ignoring_unknown(scope: Any, operator: Any, container: Any) -> Any:
        add_node = container.add_node
        lenient = operator.raw_operator.handle_unknown != "error"

        def add_lenient_node(op_type: str, *args: Any, **attrs: Any) -> Any:
            if op_type == "OneHotEncoder" and lenient:
                attrs["zeros"] = 1
            return add_node(op_type, *args, **attrs)

        container.add_node = add_lenient_node
        try:
            return converter(scope, operator, container)
        finally:
            container.add_node = add_node

    return convert_ignoring_unknown


def _float_output_cast(converter: Callable[..., Any], position: int) -> Callable[..., Any]:
    # onnxruntime's tree ensembles write float32 whatever their input, while the
    # float64 graph declares a float64 output: the tree writes a float32 variable that is
    # cast to the declared output.
    def convert_then_cast(scope: Any, operator: Any, container: Any) -> Any:
        from skl2onnx.common._apply_operation import apply_cast
        from skl2onnx.common.data_types import DoubleTensorType, FloatTensorType
        from skl2onnx.proto import onnx_proto

        target = operator.outputs[position]
        if not isinstance(target.type, DoubleTensorType):
            return converter(scope, operator, container)
        values = scope.declare_local_variable("tree_values", FloatTensorType(target.type.shape))
        operator.outputs.set_element(position, values)
        try:
            result = converter(scope, operator, container)
        finally:
            operator.outputs.set_element(position, target)
        apply_cast(
            scope, values.full_name, target.full_name, container, to=onnx_proto.TensorProto.DOUBLE
        )
        return result

    return convert_then_cast


def _float64_trees(converter: Callable[..., Any]) -> Callable[..., Any]:
    # HistGradientBoosting compares float64 features with float64 thresholds, so the graph
    # keeps both in float64 (ai.onnx.ml opset 3). sklearn 1.9 stores node ids as uint32,
    # which onnx's attribute builder refuses: they are made plain ints on the way.
    def convert_float64(scope: Any, operator: Any, container: Any) -> Any:
        add_node = container.add_node

        def add_plain_node(*args: Any, **attrs: Any) -> Any:
            for key, value in attrs.items():
                if isinstance(value, list) and any(isinstance(v, np.integer) for v in value):
                    attrs[key] = [int(v) for v in value]
            return add_node(*args, **attrs)

        container.add_node = add_plain_node
        try:
            return converter(scope, operator, container, op_version=3)
        finally:
            container.add_node = add_node

    return convert_float64


def _float32_features(converter: Callable[..., Any]) -> Callable[..., Any]:
    def convert_rounded(scope: Any, operator: Any, container: Any) -> Any:
        from skl2onnx.common._apply_operation import apply_cast
        from skl2onnx.common.data_types import DoubleTensorType
        from skl2onnx.proto import onnx_proto

        source = operator.inputs[0]
        if not isinstance(source.type, DoubleTensorType):
            return converter(scope, operator, container)
        as_float = scope.get_unique_variable_name("features_float32")
        rounded = scope.declare_local_variable(
            "features_rounded", DoubleTensorType(source.type.shape)
        )
        apply_cast(scope, source.full_name, as_float, container, to=onnx_proto.TensorProto.FLOAT)
        apply_cast(scope, as_float, rounded.full_name, container, to=onnx_proto.TensorProto.DOUBLE)
        operator.inputs.set_element(0, rounded)
        try:
            return converter(scope, operator, container, op_version=3)
        finally:
            operator.inputs.set_element(0, source)

    return convert_rounded
