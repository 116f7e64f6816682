"""Open Inference Protocol (V2) requests and answers, mapped onto MLflow's `/invocations`.

A V2 inference request names its inputs. flowline maps them onto the model's
signature columns in one of two ways:

* one input per column: each input is named after a column, with shape `[n]` or
  `[n, 1]`, and all inputs have the same `n`;
* one tabular input: a single input of shape `[n, k]`, whose name is not a column,
  holding `n` rows of the signature's `k` columns in signature order.

Either becomes the `dataframe_split` body a stock `/invocations` takes (columns in
signature order), so the replica, the batcher, the cache and the capture see
exactly what an `/invocations` client would have sent for the same rows, and the
predictions are identical. The request's `parameters` become MLflow `params`.

The answer's `predictions` become outputs: one `predictions` tensor of shape `[n]`
(labels, values) or `[n, k]` (probabilities), or, when the model returns a table,
one output per column.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from serving.deployment import Deployment
from serving.gateway.v2.tensors import (
    BYTES,
    TensorError,
    check_datatype,
    check_shape,
    datatype_of,
    element_count,
    flatten,
    from_raw,
    normalise,
)

PLATFORM = "mlflow"
PREDICTIONS = "predictions"
# Parameters with a meaning in the protocol or Triton's extensions, not model params.
RESERVED_PARAMETERS = frozenset(
    {
        "binary_data",
        "binary_data_output",
        "binary_data_size",
        "classification",
        "content_type",
        "headers",
        "priority",
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "timeout",
    }
)
# MLflow column types and the V2 datatype of each (flowline's `any` columns carry theirs).
_COLUMN_DATATYPES = {
    "double": "FP64",
    "float": "FP32",
    "long": "INT64",
    "integer": "INT32",
    "boolean": "BOOL",
    "string": BYTES,
    "binary": BYTES,
    "datetime": BYTES,
}
_FLOWLINE_DATATYPES = {
    "integer": "INT64",
    "float": "FP64",
    "boolean": "BOOL",
    "datetime": BYTES,
    "string": BYTES,
}
_NUMPY_DATATYPES = {
    "float64": "FP64",
    "float32": "FP32",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "int16": "INT16",
    "int8": "INT8",
    "uint64": "UINT64",
    "uint32": "UINT32",
    "uint16": "UINT16",
    "uint8": "UINT8",
    "bool": "BOOL",
    "str": BYTES,
    "object": BYTES,
}


@dataclass(slots=True)
class InputTensor:
    """One named input, its elements flat in row-major order."""

    name: str
    datatype: str
    shape: list[int]
    values: list[Any]


@dataclass(slots=True)
class OutputTensor:
    """One named output, its elements flat in row-major order."""

    name: str
    datatype: str
    shape: list[int]
    values: list[Any]

    def to_json(self) -> dict[str, Any]:
        """The output as the REST protocol spells it."""
        return {
            "name": self.name,
            "datatype": self.datatype,
            "shape": self.shape,
            "data": self.values,
        }


@dataclass(frozen=True)
class InferRequest:
    """A V2 inference request, whatever its encoding (JSON, binary extension, gRPC)."""

    inputs: list[InputTensor]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None


# --- reading requests --------------------------------------------------------------------------


def input_tensor(name: Any, datatype: Any, shape: Any, values: list[Any]) -> InputTensor:
    """A checked `InputTensor`: known datatype, valid shape, as many elements as it says."""
    if not isinstance(name, str) or not name:
        raise TensorError("every input needs a non-empty 'name'")
    datatype = check_datatype(name, datatype)
    dims = check_shape(name, shape)
    if len(values) != element_count(dims):
        raise TensorError(
            f"input '{name}': shape {dims} holds {element_count(dims)} elements, "
            f"but {len(values)} were sent"
        )
    return InputTensor(name, datatype, dims, normalise(datatype, values))


def parse_rest_request(body: bytes, json_length: str | None = None) -> InferRequest:
    """A REST inference request: JSON, or JSON + raw tensors (the binary-data extension,
    `Inference-Header-Content-Length: <json bytes>`)."""
    header, binary = body, b""
    if json_length is not None:
        if not json_length.isdigit() or int(json_length) > len(body):
            raise TensorError(
                "Inference-Header-Content-Length must be the byte length of the JSON header"
            )
        header, binary = body[: int(json_length)], body[int(json_length) :]
    try:
        payload = json.loads(header)
    except (ValueError, UnicodeDecodeError):
        raise TensorError("the request body is not valid JSON") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("inputs"), list):
        raise TensorError("a V2 inference request is a JSON object with an 'inputs' array")
    inputs = []
    offset = 0
    for item in payload["inputs"]:
        if not isinstance(item, dict):
            raise TensorError("each of 'inputs' must be an object")
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        params = item.get("parameters") or {}
        size = params.get("binary_data_size") if isinstance(params, dict) else None
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise TensorError(f"input '{name}': binary_data_size runs past the request body")
            check_datatype(str(name), datatype)
            count = element_count(check_shape(str(name), shape))
            values = from_raw(str(name), datatype, binary[offset : offset + size], count)
            offset += size
        else:
            values = flatten(str(name), item.get("data"))
        inputs.append(input_tensor(name, datatype, shape, values))
    if offset != len(binary):
        raise TensorError("the request body has raw bytes that no input claims")
    return InferRequest(
        inputs,
        _request_id(payload.get("id")),
        model_parameters(payload.get("parameters")),
        _requested_outputs(payload.get("outputs")),
    )


def _request_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise TensorError("'id' must be a string")
    return value


def model_parameters(value: Any) -> dict[str, Any]:
    """A request's `parameters` as MLflow params: the protocol's own keys left out."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TensorError("'parameters' must be an object")
    return {k: v for k, v in value.items() if k not in RESERVED_PARAMETERS}


def _requested_outputs(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in value
    ):
        raise TensorError("'outputs' must be a list of objects with a 'name'")
    return [o["name"] for o in value] or None


# --- to and from /invocations ------------------------------------------------------------------


def signature_columns(deployment: Deployment) -> list[str]:
    """The names of the deployment's signature input columns, in order."""
    return [spec["name"] for spec in deployment.input_columns() or [] if "name" in spec]


def invocation_body(
    request: InferRequest, deployment: Deployment, columns: list[str] | None = None
) -> bytes:
    """The `/invocations` JSON body (`dataframe_split` + `params`) for a V2 request;
    `columns` are the deployment's `signature_columns` when the caller has them."""
    if columns is None:
        columns = signature_columns(deployment)
    names, rows = _rows(request.inputs, columns)
    payload: dict[str, Any] = {"dataframe_split": {"columns": names, "data": rows}}
    if request.parameters:
        payload["params"] = request.parameters
    return json.dumps(payload).encode()


def _rows(inputs: list[InputTensor], columns: list[str]) -> tuple[list[str], list[list[Any]]]:
    if not inputs:
        raise TensorError("the request has no inputs")
    if len(inputs) == 1 and inputs[0].name not in columns and len(inputs[0].shape) == 2:
        tensor = inputs[0]
        width = tensor.shape[1]
        if width == 0:
            raise TensorError(f"input '{tensor.name}' has no columns (shape {tensor.shape})")
        if columns and width != len(columns):
            raise TensorError(
                f"input '{tensor.name}' has {width} columns per row; the model takes "
                f"{len(columns)}: {', '.join(columns)}"
            )
        names = columns or [f"{tensor.name}_{i}" for i in range(width)]
        values = tensor.values
        return names, [values[i : i + width] for i in range(0, len(values), width)]
    by_name: dict[str, InputTensor] = {}
    for tensor in inputs:
        if columns and tensor.name not in columns:
            raise TensorError(
                f"unknown input '{tensor.name}'; the model's inputs are: {', '.join(columns)}"
            )
        if tensor.name in by_name:
            raise TensorError(f"input '{tensor.name}' is given twice")
        if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
            raise TensorError(
                f"input '{tensor.name}': one column takes shape [n] or [n, 1], not {tensor.shape}"
            )
        by_name[tensor.name] = tensor
    counts = {t.shape[0] for t in by_name.values()}
    if len(counts) != 1:
        raise TensorError("all inputs must have the same number of rows (shape[0])")
    # Signature order, as a stock client would send them: merged batches line up.
    names = [c for c in columns if c in by_name] or list(by_name)
    tensors = [by_name[name] for name in names]
    return names, [list(row) for row in zip(*(t.values for t in tensors), strict=True)]


def outputs_from_answer(body: bytes, requested: list[str] | None) -> list[OutputTensor]:
    """The V2 outputs of a replica's `{"predictions": ...}` answer, optionally only some."""
    predictions = json.loads(body).get(PREDICTIONS)
    outputs = _outputs(predictions)
    if requested is None:
        return outputs
    by_name = {o.name: o for o in outputs}
    missing = [name for name in requested if name not in by_name]
    if missing:
        raise TensorError(
            f"unknown output '{missing[0]}'; the model's outputs are: {', '.join(by_name)}"
        )
    return [by_name[name] for name in requested]


def _outputs(predictions: Any) -> list[OutputTensor]:
    if isinstance(predictions, dict) and all(isinstance(v, list) for v in predictions.values()):
        # A model that returns a table, column by column.
        return [_output(str(name), values, [len(values)]) for name, values in predictions.items()]
    if not isinstance(predictions, list):
        predictions = [predictions]
    rows = len(predictions)
    if predictions and all(isinstance(p, dict) for p in predictions):
        names = list(predictions[0])
        columns = {name: [p.get(name) for p in predictions] for name in names}
        return [_output(name, values, [rows]) for name, values in columns.items()]
    if predictions and all(isinstance(p, list) for p in predictions):
        width = len(predictions[0])
        if all(len(p) == width for p in predictions):
            flat = [v for p in predictions for v in p]
            return [_output(PREDICTIONS, flat, [rows, width])]
    return [_output(PREDICTIONS, predictions, [rows])]


def _output(name: str, values: list[Any], shape: list[int]) -> OutputTensor:
    datatype = datatype_of(values)
    if datatype == BYTES:
        values = [v if isinstance(v, str) else json.dumps(v) for v in values]
    return OutputTensor(name, datatype, shape, values)


def answer_json(
    request: InferRequest, deployment: Deployment, outputs: list[OutputTensor]
) -> dict[str, Any]:
    """The REST inference response."""
    answer: dict[str, Any] = {
        "model_name": deployment.model,
        "model_version": deployment.version,
        "outputs": [o.to_json() for o in outputs],
    }
    if request.id is not None:
        answer["id"] = request.id
    return answer


# --- metadata ----------------------------------------------------------------------------------


def model_metadata(deployment: Deployment) -> dict[str, Any]:
    """`GET /v2/models/{name}`: name, versions, platform, inputs and outputs."""
    return {
        "name": deployment.model,
        "versions": [deployment.version],
        "platform": PLATFORM,
        "inputs": _tensor_metadata(deployment.input_columns(), "input"),
        "outputs": _tensor_metadata(deployment.output_spec(), PREDICTIONS)
        or [{"name": PREDICTIONS, "datatype": "FP64", "shape": [-1]}],
    }


def _tensor_metadata(specs: list[dict[str, Any]] | None, fallback: str) -> list[dict[str, Any]]:
    tensors = []
    for i, spec in enumerate(specs or []):
        name = spec.get("name") or (fallback if i == 0 else f"{fallback}-{i}")
        if spec.get("type") == "tensor":
            tensor = spec.get("tensor-spec", {})
            datatype = _NUMPY_DATATYPES.get(str(tensor.get("dtype")), BYTES)
            shape = [int(d) for d in tensor.get("shape", [-1])]
        else:
            kind = str(spec.get("type"))
            datatype = _COLUMN_DATATYPES.get(kind, BYTES)
            if kind == "any":
                datatype = _FLOWLINE_DATATYPES.get(str(spec.get("x-flowline-type")), BYTES)
            shape = [-1]
        tensors.append({"name": name, "datatype": datatype, "shape": shape})
    return tensors
