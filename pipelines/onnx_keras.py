"""An skl2onnx converter for the keras family's network (`KerasMLP`), training time only.

The network is a stack of Dense layers (relu, then softmax for a classifier or linear
for a regressor; dropout does nothing at inference), so its graph is written directly:
``Cast(float32) → (MatMul + Add → Relu)* → MatMul + Add → Softmax | scale back``, in
float32 as Keras computes, and cast to float64 at the end. A Dense stack needs no
TensorFlow graph tracer, so tf2onnx (and keeping it in step with TensorFlow) is not used.

A network with any other layer is refused (``NotImplementedError``), and the version
keeps the Python pipeline. Whether the graph is close enough to Keras' own arithmetic
(matrix products sum in another order) is decided, as for every version, by
``onnx_export.check_equivalence``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ALIAS = "FlowlineKerasMLP"


def dense_layers(network: Any) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """(kernel, bias, activation) of each Dense layer; dropout layers are skipped."""
    layers = []
    for layer in network.layers:
        kind = type(layer).__name__
        if kind == "Dropout":
            continue
        if kind != "Dense":
            raise NotImplementedError(f"no ONNX conversion for a Keras {kind} layer")
        kernel, bias = layer.get_weights()
        activation = layer.activation.__name__
        if activation not in ("relu", "softmax", "linear"):
            raise NotImplementedError(f"no ONNX conversion for the activation {activation}")
        layers.append((kernel.astype(np.float32), bias.astype(np.float32), activation))
    return layers


def register() -> None:
    """Make skl2onnx convert `KerasMLP` inside a pipeline (idempotent)."""
    from skl2onnx import update_registered_converter

    from pipelines.keras_family import KerasMLP

    # "zipmap" is accepted (and ignored) so the exporter can ask every classifier for arrays.
    options = {"zipmap": [True, False]}
    update_registered_converter(KerasMLP, ALIAS, _shapes, _convert, parser=_parse, options=options)


def _parse(scope: Any, model: Any, inputs: list[Any], custom_parsers: Any = None) -> list[Any]:
    from skl2onnx.common.data_types import DoubleTensorType, Int64TensorType

    operator = scope.declare_local_operator(ALIAS, model)
    operator.inputs = inputs
    if model.task == "classification":
        operator.outputs.append(scope.declare_local_variable("label", Int64TensorType()))
        operator.outputs.append(scope.declare_local_variable("probabilities", DoubleTensorType()))
    else:
        operator.outputs.append(scope.declare_local_variable("variable", DoubleTensorType()))
    return list(operator.outputs)


def _shapes(operator: Any) -> None:
    rows = operator.inputs[0].get_first_dimension()
    model = operator.raw_operator
    if model.task == "classification":
        operator.outputs[0].type.shape = [rows]
        operator.outputs[1].type.shape = [rows, len(model.classes_)]
    else:
        operator.outputs[0].type.shape = [rows, 1]


def _constant(scope: Any, container: Any, name: str, value: np.ndarray) -> str:
    from skl2onnx.proto import onnx_proto

    tensor = scope.get_unique_variable_name(name)
    dtype = (
        onnx_proto.TensorProto.FLOAT if value.dtype == np.float32 else onnx_proto.TensorProto.INT64
    )
    container.add_initializer(tensor, dtype, list(value.shape), value.ravel().tolist())
    return tensor


def _node(scope: Any, container: Any, op: str, inputs: list[str], **attrs: Any) -> str:
    output = scope.get_unique_variable_name(op.lower())
    container.add_node(op, inputs, [output], name=scope.get_unique_operator_name(op), **attrs)
    return output


def _convert(scope: Any, operator: Any, container: Any) -> None:
    from skl2onnx.proto import onnx_proto

    model = operator.raw_operator
    x = _node(
        scope, container, "Cast", [operator.inputs[0].full_name], to=onnx_proto.TensorProto.FLOAT
    )
    for kernel, bias, activation in dense_layers(model.model_):
        x = _node(scope, container, "MatMul", [x, _constant(scope, container, "kernel", kernel)])
        x = _node(scope, container, "Add", [x, _constant(scope, container, "bias", bias)])
        if activation == "relu":
            x = _node(scope, container, "Relu", [x])
        elif activation == "softmax":
            x = _node(scope, container, "Softmax", [x], axis=-1)
    if model.task == "classification":
        container.add_node(
            "Cast", [x], [operator.outputs[1].full_name], to=onnx_proto.TensorProto.DOUBLE,
            name=scope.get_unique_operator_name("Cast"),
        )  # fmt: skip
        container.add_node(
            "ArgMax", [x], [operator.outputs[0].full_name], axis=1, keepdims=0,
            name=scope.get_unique_operator_name("ArgMax"),
        )  # fmt: skip
        return
    # The target was standardised for training: scale back in float32, as predict does.
    scale = _constant(scope, container, "y_std", np.array([model.y_std_], dtype=np.float32))
    shift = _constant(scope, container, "y_mean", np.array([model.y_mean_], dtype=np.float32))
    x = _node(scope, container, "Add", [_node(scope, container, "Mul", [x, scale]), shift])
    container.add_node(
        "Cast", [x], [operator.outputs[0].full_name], to=onnx_proto.TensorProto.DOUBLE,
        name=scope.get_unique_operator_name("Cast"),
    )  # fmt: skip
