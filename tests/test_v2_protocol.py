"""The Open Inference Protocol (V2) over REST and gRPC, with the real clients.

Unit tests check the mapping onto `/invocations` (inputs, raw bytes, outputs,
metadata, errors). The end-to-end tests train a model with `mlflow run` on a table
that looks real (integers with nulls, a date, booleans as bools and as yes/no,
a nullable category, ID-like columns), serve it with a real `mlflow models serve`
replica behind a real gateway process with its gRPC port on, and call it with:

* httpx (REST JSON) and flowline's own generated gRPC stub;
* tritonclient's HTTP (JSON and binary tensors) and gRPC clients, and KServe's
  InferenceRESTClient and InferenceGRPCClient, run from their own venv
  (.venv-clients, `make clients`: they need protobuf < 7).

Every prediction must equal what `/invocations` answers for the same rows.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import struct
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest

from common.processes import free_port
from flowline.tracking import TrackingServer
from serving.deployment import BatchingSettings, Deployment
from serving.gateway.app import create_app
from serving.gateway.config import GatewayConfig
from serving.gateway.routes import RouteTable
from serving.gateway.v2 import inference_pb2 as pb
from serving.gateway.v2 import inference_pb2_grpc as pb_grpc
from serving.gateway.v2.codec import (
    InferRequest,
    input_tensor,
    invocation_body,
    model_metadata,
    outputs_from_answer,
    parse_rest_request,
)
from serving.gateway.v2.grpc_server import grpc_status, infer_request
from serving.gateway.v2.tensors import TensorError, from_raw, to_raw
from serving.model_metadata import deployment_from_model_dir
from tests.conftest import REPO, Service, mlflow_run
from tests.helpers_serving import running, start_gateway, start_scoring_server
from tests.test_columns import real_table

CLIENTS_PYTHON = REPO / ".venv-clients" / "bin" / "python"
ADMIN = "v2-admin-token"
KEY = "v2-client-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = "application/json"
MODEL = "v2-churn"


# --- unit: requests onto /invocations ---------------------------------------------------------


def _deployment(columns: dict[str, str], params: bool = False) -> Deployment:
    inputs = [
        {"name": n, "type": "any", "x-flowline-type": t, "required": False}
        for n, t in columns.items()
    ]
    signature: dict[str, Any] = {"inputs": json.dumps(inputs), "outputs": None}
    if params:
        spec = [{"name": "predict_method", "type": "string", "default": "predict", "shape": None}]
        signature["params"] = json.dumps(spec)
    return Deployment(model="m", version="3", replicas=("http://127.0.0.1:1",), signature=signature)


COLUMNS = {"age": "integer", "fare": "float", "signup": "datetime", "vip": "boolean"}


def _split(body: bytes) -> dict[str, Any]:
    return json.loads(body)


def test_one_input_per_column_becomes_a_split_in_signature_order() -> None:
    request = parse_rest_request(
        json.dumps(
            {
                "id": "r-1",
                "parameters": {"predict_method": "predict_proba", "binary_data_output": True},
                "inputs": [
                    {"name": "vip", "datatype": "BOOL", "shape": [2], "data": [True, False]},
                    {"name": "age", "datatype": "FP64", "shape": [2, 1], "data": [[31], [None]]},
                    {"name": "signup", "datatype": "BYTES", "shape": [2],
                     "data": ["2024-01-02", "2023-12-31"]},
                    {"name": "fare", "datatype": "FP32", "shape": [2], "data": [7.25, 80.5]},
                ],
            }
        ).encode()
    )  # fmt: skip
    assert request.id == "r-1"
    body = _split(invocation_body(request, _deployment(COLUMNS, params=True)))
    assert body == {
        "dataframe_split": {
            "columns": ["age", "fare", "signup", "vip"],
            "data": [[31, 7.25, "2024-01-02", True], [None, 80.5, "2023-12-31", False]],
        },
        # Protocol parameters (binary_data_output) are not model params.
        "params": {"predict_method": "predict_proba"},
    }


def test_one_tabular_input_holds_rows_of_every_column() -> None:
    rows = [[40, 1.5, "2024-02-01", True], [22, 3.0, "2024-03-01", False]]
    request = InferRequest([input_tensor("input-0", "BYTES", [2, 4], sum(rows, []))])
    body = _split(invocation_body(request, _deployment(COLUMNS)))
    assert body["dataframe_split"] == {"columns": list(COLUMNS), "data": rows}
    assert "params" not in body


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"inputs": [{"name": "age", "datatype": "FP64", "shape": [3], "data": [1, 2]}]},
         "holds 3 elements, but 2 were sent"),
        ({"inputs": [{"name": "age", "datatype": "BF16", "shape": [1], "data": [1]}]},
         "unsupported datatype"),
        ({"inputs": [{"name": "age", "datatype": "FP64", "shape": [-1], "data": [1]}]},
         "non-negative integers"),
        ({"inputs": [{"name": "height", "datatype": "FP64", "shape": [1], "data": [1]}]},
         "unknown input 'height'"),
        ({"inputs": [{"name": "age", "datatype": "FP64", "shape": [1], "data": [1]},
                     {"name": "fare", "datatype": "FP64", "shape": [2], "data": [1, 2]}]},
         "same number of rows"),
        ({"inputs": [{"name": "age", "datatype": "FP64", "shape": [1, 2], "data": [1, 2]},
                     {"name": "fare", "datatype": "FP64", "shape": [1], "data": [1]}]},
         "shape [n] or [n, 1]"),
        ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1, 3], "data": [1, 2, 3]}]},
         "has 3 columns per row; the model takes 4"),
        ({"inputs": []}, "no inputs"),
        ({"instances": [[1]]}, "an 'inputs' array"),
        ({"inputs": [{"name": "age", "datatype": "FP64", "shape": [1], "data": 3}]},
         "'data' must be a JSON array"),
        ({"id": 5, "inputs": []}, "'id' must be a string"),
    ],
)  # fmt: skip
def test_malformed_requests_are_client_errors(payload: dict[str, Any], message: str) -> None:
    with pytest.raises(TensorError, match=re.escape(message)):
        request = parse_rest_request(json.dumps(payload).encode())
        invocation_body(request, _deployment(COLUMNS))


_ATOMS: list[Any] = [None, True, 0, 1, -1, 1.5, float("nan"), "", "age", "x", [], {}, [1],
                     [[1]], [2, 0], [0, 2], [2, 1], [-1], "FP64", "BYTES", "BF16"]  # fmt: skip


def _random_value(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 2 or roll < 0.4:
        return rng.choice(_ATOMS)
    if roll < 0.7:
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["name", "datatype", "shape", "data", "parameters", "inputs", "binary_data_size"]
    return {rng.choice(keys): _random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def _random_input(rng: random.Random) -> dict[str, Any]:
    item = {
        "name": rng.choice(["age", "fare", "x", 3]),
        "datatype": rng.choice(["FP64", "INT64", "BYTES", "BOOL", "BF16", None, ["FP64"]]),
        "shape": rng.choice([[1], [2], [1, 2], [2, 1], [0], [2, 0], [], [-1], "3", [True]]),
        "data": _random_value(rng, 1),
        "parameters": rng.choice([None, {}, [], {"binary_data_size": rng.choice([0, 8, -1])}]),
    }
    # Now and then any field is replaced by anything at all.
    return {k: _random_value(rng, 1) if rng.random() < 0.3 else v for k, v in item.items()}


@pytest.mark.parametrize("signature", [True, False])
def test_random_requests_are_mapped_or_refused_as_client_errors(signature: bool) -> None:
    """No request, however malformed, raises anything but TensorError (a 400), never a 500."""
    rng = random.Random(20261204)
    deployment = _deployment({"age": "integer", "fare": "float"})
    if not signature:
        deployment = Deployment(model="m", version="1", replicas=("http://127.0.0.1:1",))
    mapped = 0
    for _ in range(3000):
        payload: Any = {"inputs": [_random_input(rng) for _ in range(rng.randint(0, 3))]}
        for key in ("outputs", "parameters", "id"):
            if rng.random() < 0.25:
                payload[key] = _random_value(rng, 1)
        if rng.random() < 0.1:
            payload = _random_value(rng)
        body, length = json.dumps(payload).encode(), None
        if rng.random() < 0.2:  # the binary extension, with stray bytes after the header
            length, body = str(len(body)), body + bytes(rng.randint(0, 16))
        try:
            invocation_body(parse_rest_request(body, length), deployment)
            mapped += 1
        except TensorError:
            pass
    assert mapped > 0  # some of them are valid requests


def test_a_body_that_is_not_json_is_a_client_error() -> None:
    with pytest.raises(TensorError, match="not valid JSON"):
        parse_rest_request(b"\xff{")


def _binary_body(tensors: list[tuple[str, str, list[int], bytes]]) -> tuple[bytes, str]:
    header = json.dumps(
        {
            "inputs": [
                {"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(r)}}
                for n, d, s, r in tensors
            ]
        }
    ).encode()
    return header + b"".join(r for *_, r in tensors), str(len(header))


def test_the_binary_data_extension_reads_raw_little_endian_tensors() -> None:
    strings = b"".join(struct.pack("<I", len(s)) + s for s in (b"2024-01-02", b"2023-05-06"))
    body, length = _binary_body(
        [
            ("age", "INT64", [2], np.array([31, 7], "<i8").tobytes()),
            ("fare", "FP64", [2], np.array([1.5, np.nan], "<f8").tobytes()),
            ("signup", "BYTES", [2], strings),
            ("vip", "BOOL", [2], np.array([True, False]).tobytes()),
        ]
    )
    request = parse_rest_request(body, length)
    split = _split(invocation_body(request, _deployment(COLUMNS)))["dataframe_split"]
    # NaN in a float tensor is a missing value: null, as /invocations clients send it.
    assert split["data"] == [[31, 1.5, "2024-01-02", True], [7, None, "2023-05-06", False]]


@pytest.mark.parametrize(
    ("length", "extra", "message"),
    [("x", b"", "Inference-Header-Content-Length"), (None, b"\x00" * 9, "no input claims")],
)
def test_bad_binary_requests_are_client_errors(
    length: str | None, extra: bytes, message: str
) -> None:
    body, real_length = _binary_body([("age", "INT64", [1], np.array([3], "<i8").tobytes())])
    with pytest.raises(TensorError, match=message):
        parse_rest_request(body + extra, real_length if length is None else length)
    with pytest.raises(TensorError, match="do not hold"):
        from_raw("age", "INT64", b"\x00" * 7, 1)
    with pytest.raises(TensorError, match="truncated"):
        from_raw("city", "BYTES", struct.pack("<I", 10) + b"abc", 1)


@pytest.mark.parametrize("datatype", ["BOOL", "INT8", "UINT16", "INT32", "INT64", "FP32", "FP64"])
def test_raw_bytes_round_trip(datatype: str) -> None:
    values = [1, 0, 1] if datatype != "BOOL" else [True, False, True]
    assert from_raw("x", datatype, to_raw(datatype, values), 3) == values
    assert from_raw("x", "BYTES", to_raw("BYTES", ["a", "", "żółw"]), 3) == ["a", "", "żółw"]


def test_answers_become_outputs() -> None:
    labels = outputs_from_answer(b'{"predictions": [0, 1, 1]}', None)
    assert [(o.name, o.datatype, o.shape, o.values) for o in labels] == [
        ("predictions", "INT64", [3], [0, 1, 1])
    ]
    probabilities = outputs_from_answer(b'{"predictions": [[0.25, 0.75], [1.0, 0.0]]}', None)
    assert [(o.datatype, o.shape, o.values) for o in probabilities] == [
        ("FP64", [2, 2], [0.25, 0.75, 1.0, 0.0])
    ]
    names = outputs_from_answer(b'{"predictions": ["stay", "churn"]}', None)[0]
    assert (names.datatype, names.values) == ("BYTES", ["stay", "churn"])
    table = b'{"predictions": [{"a": 1, "b": true}, {"a": 2, "b": false}]}'
    assert [(o.name, o.datatype) for o in outputs_from_answer(table, ["b", "a"])] == [
        ("b", "BOOL"),
        ("a", "INT64"),
    ]
    with pytest.raises(TensorError, match="unknown output 'c'"):
        outputs_from_answer(table, ["c"])


def test_metadata_comes_from_the_signature() -> None:
    metadata = model_metadata(_deployment(COLUMNS | {"city": "string"}))
    assert metadata["name"] == "m" and metadata["versions"] == ["3"]
    assert metadata["platform"] == "mlflow"
    assert [(i["name"], i["datatype"], i["shape"]) for i in metadata["inputs"]] == [
        ("age", "INT64", [-1]),
        ("fare", "FP64", [-1]),
        ("signup", "BYTES", [-1]),
        ("vip", "BOOL", [-1]),
        ("city", "BYTES", [-1]),
    ]
    assert metadata["outputs"] == [{"name": "predictions", "datatype": "FP64", "shape": [-1]}]


def test_grpc_requests_read_typed_contents_and_raw_bytes() -> None:
    typed = pb.ModelInferRequest(model_name="m", id="g")
    tensor = typed.inputs.add(name="age", datatype="INT64", shape=[2])
    tensor.contents.int64_contents.extend([4, 5])
    typed.parameters["predict_method"].string_param = "predict_proba"
    typed.parameters["binary_data_output"].bool_param = True
    parsed = infer_request(typed)
    assert parsed.inputs[0].values == [4, 5] and parsed.id == "g"
    assert parsed.parameters == {"predict_method": "predict_proba"}
    raw = pb.ModelInferRequest(model_name="m")
    raw.inputs.add(name="fare", datatype="FP16", shape=[1])
    raw.raw_input_contents.append(np.array([2.5], "<f2").tobytes())
    assert infer_request(raw).inputs[0].values == [2.5]
    raw.raw_input_contents.append(b"")
    with pytest.raises(TensorError, match="one entry per input"):
        infer_request(raw)
    fp16 = pb.ModelInferRequest(model_name="m")
    fp16.inputs.add(name="fare", datatype="FP16", shape=[1])
    with pytest.raises(TensorError, match="raw_input_contents"):
        infer_request(fp16)
    assert grpc_status(429) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(503) == grpc.StatusCode.UNAVAILABLE
    assert grpc_status(500) == grpc.StatusCode.INTERNAL


# --- end to end: a trained model behind a real gateway -----------------------------------------


class Served:
    """The trained model's replica and gateway, and the rows to score."""

    def __init__(
        self, gateway: Service, grpc_port: int, rows: pd.DataFrame, replica_url: str
    ) -> None:
        self.gateway = gateway
        self.grpc_port = grpc_port
        self.rows = rows
        self.replica_url = replica_url

    @property
    def grpc_address(self) -> str:
        """host:port of the gateway's gRPC service."""
        return f"127.0.0.1:{self.grpc_port}"


@pytest.fixture(scope="module")
def trained(sqlite_tracking: TrackingServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained by `mlflow run` on a real-looking table, downloaded locally."""
    folder = tmp_path_factory.mktemp("v2-data")
    data = folder / "passengers.csv"
    real_table(n=300, seed=3).to_csv(data, index=False)
    result = mlflow_run(
        sqlite_tracking.url, data=data, target="label", registered_model=MODEL, max_evals=1
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(sqlite_tracking.url)
    return Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(folder)))


@pytest.fixture(scope="module")
def served(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The trained model on one replica behind a gateway with API keys and gRPC on."""
    logs = tmp_path_factory.mktemp("v2-logs")
    replica = start_scoring_server(trained, logs)
    with running(replica):
        grpc_port = free_port()
        env = {
            "FLOWLINE_ADMIN_TOKEN": ADMIN,
            "FLOWLINE_API_KEYS": KEY,
            "FLOWLINE_GRPC_PORT": str(grpc_port),
        }
        with running(start_gateway(logs, env)) as gateway:
            deployment = deployment_from_model_dir(MODEL, "1", [replica.url], trained)
            answer = httpx.put(
                f"{gateway.url}/admin/deployments/{MODEL}",
                json=deployment.to_dict(),
                headers={"Authorization": f"Bearer {ADMIN}"},
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            rows = real_table(n=40, seed=11).drop(columns=["label"])
            yield Served(gateway, grpc_port, rows, replica.url)


def _json_rows(rows: pd.DataFrame) -> dict[str, list[Any]]:
    """Each column as JSON values (NaN and None as null), the way a client has them."""
    split = json.loads(rows.to_json(orient="split", index=False))
    columns = split["columns"]
    return {c: [row[i] for row in split["data"]] for i, c in enumerate(columns)}


def _invocations(served: Served, rows: pd.DataFrame, params: dict | None = None) -> list[Any]:
    split = json.loads(rows.to_json(orient="split", index=False))
    body: dict[str, Any] = {"dataframe_split": split}
    if params:
        body["params"] = params
    answer = httpx.post(
        f"{served.gateway.url}/models/{MODEL}/invocations", json=body, headers=AUTH, timeout=60
    )
    assert answer.status_code == 200, answer.text[:500]
    return answer.json()["predictions"]


def _v2_inputs(served: Served, rows: pd.DataFrame) -> list[dict[str, Any]]:
    """One input per signature column, typed as the model's V2 metadata says."""
    metadata = httpx.get(f"{served.gateway.url}/v2/models/{MODEL}", headers=AUTH, timeout=10)
    assert metadata.status_code == 200, metadata.text
    values = _json_rows(rows)
    return [
        {"name": i["name"], "datatype": i["datatype"], "shape": [len(rows)],
         "data": values[i["name"]]}
        for i in metadata.json()["inputs"]
    ]  # fmt: skip


def _infer(served: Served, payload: dict[str, Any], path: str = "") -> httpx.Response:
    url = f"{served.gateway.url}/v2/models/{MODEL}{path}/infer"
    return httpx.post(url, json=payload, headers=AUTH, timeout=60)


@pytest.mark.slow
def test_rest_predictions_equal_invocations_on_real_rows(served: Served) -> None:
    rows = served.rows
    assert rows.isna().any().any(), "the rows must hold nulls"
    inputs = _v2_inputs(served, rows)
    answer = _infer(served, {"id": "req-7", "inputs": inputs})
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-flowline-model-version"] == f"{MODEL}/1"
    assert answer.headers["x-flowline-request-id"]  # flowline's id; "id" stays the client's
    payload = answer.json()
    assert (payload["model_name"], payload["model_version"], payload["id"]) == (MODEL, "1", "req-7")
    [output] = payload["outputs"]
    assert output["name"] == "predictions" and output["shape"] == [len(rows)]
    assert output["data"] == _invocations(served, rows)
    # Parameters are MLflow params: probabilities, a table with one column per class,
    # which is one output per class.
    params = {"predict_method": "predict_proba"}
    proba = _infer(served, {"inputs": inputs, "parameters": params}, "/versions/1")
    assert proba.status_code == 200, proba.text
    expected = _invocations(served, rows, params)
    classes = list(expected[0])
    assert sorted(classes) == ["churn", "stay"]
    outputs = {o["name"]: o for o in proba.json()["outputs"]}
    assert list(outputs) == classes
    for name, output in outputs.items():
        assert output["datatype"] == "FP64" and output["shape"] == [len(rows)]
        assert output["data"] == [row[name] for row in expected]


@pytest.mark.slow
def test_v2_health_metadata_and_refusals(served: Served) -> None:
    url = served.gateway.url
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}
    ready = httpx.get(f"{url}/v2/models/{MODEL}/versions/1/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert httpx.get(f"{url}/v2/models/{MODEL}/versions/9/ready").status_code == 404
    assert httpx.get(f"{url}/v2").json()["name"] == "flowline"
    # Metadata and inference need the key; the refusal is the protocol's error shape.
    refused = httpx.get(f"{url}/v2/models/{MODEL}")
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    signature_columns = {i["name"] for i in _v2_inputs(served, served.rows)}
    assert {"age", "signup", "vip", "member", "city"} <= signature_columns
    inputs = _v2_inputs(served, served.rows.head(2))
    no_key = httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": inputs})
    assert no_key.status_code == 401 and no_key.headers["x-flowline-request-id"]
    wrong = _infer(served, {"inputs": inputs}, "/versions/2")
    assert wrong.status_code == 404 and "version '1' is" in wrong.json()["error"]
    unknown = httpx.post(f"{url}/v2/models/nope/infer", json={"inputs": inputs}, headers=AUTH)
    assert unknown.status_code == 404 and "error" in unknown.json()
    short = [dict(inputs[0], shape=[3])]
    bad = _infer(served, {"inputs": short})
    assert bad.status_code == 400 and "elements" in bad.json()["error"]
    # Refusals name their request too, each with its own id.
    assert bad.headers["x-flowline-request-id"] != no_key.headers["x-flowline-request-id"]
    # A value the model cannot read is the replica's 400, passed on in the V2 shape.
    typo = [dict(i, data=["lots", "few"]) if i["name"] == "fare" else i for i in inputs]
    rejected = _infer(served, {"inputs": typo})
    assert rejected.status_code == 400 and "fare" in rejected.json()["error"]


@pytest.mark.slow
def test_grpc_with_flowline_stub(served: Served) -> None:
    rows = served.rows.head(5)
    with grpc.insecure_channel(served.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ServerLive(pb.ServerLiveRequest()).live
        assert stub.ServerReady(pb.ServerReadyRequest()).ready
        assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1")).ready
        metadata = [("authorization", f"Bearer {KEY}")]
        described = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL), metadata=metadata)
        request = pb.ModelInferRequest(model_name=MODEL, model_version="1", id="g-1")
        values = _json_rows(rows)
        for spec in described.inputs:
            column = values[spec.name]
            datatype = _numpy_datatype(spec.datatype, column)
            tensor = request.inputs.add(name=spec.name, datatype=datatype, shape=[len(rows)])
            if datatype == "BYTES":
                if any(v is None for v in column):
                    column = [v or "" for v in column]  # gRPC BYTES has no null
                    rows = rows.assign(**{spec.name: column})
                tensor.contents.bytes_contents.extend(str(v).encode() for v in column)
            elif datatype == "BOOL":
                tensor.contents.bool_contents.extend(column)
            else:
                tensor.datatype = "FP64"
                tensor.contents.fp64_contents.extend(np.nan if v is None else v for v in column)
        answer, call = stub.ModelInfer.with_call(request, metadata=metadata)
        assert (answer.model_name, answer.model_version, answer.id) == (MODEL, "1", "g-1")
        assert ("x-flowline-model-version", f"{MODEL}/1") in call.initial_metadata()
        assert "x-flowline-request-id" in dict(call.initial_metadata())
        [output] = answer.outputs
        labels = to_values(output.datatype, answer.raw_output_contents[0], len(rows))
        assert labels == _invocations(served, rows)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "x-flowline-request-id" in dict(refused.value.trailing_metadata())
        request.inputs[0].shape[0] = 99
        with pytest.raises(grpc.RpcError) as bad:
            stub.ModelInfer(request, metadata=metadata)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as missing:
            stub.ModelReady(pb.ModelReadyRequest(name="nope"))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def to_values(datatype: str, raw: bytes, count: int) -> list[Any]:
    """Decode a raw output tensor."""
    return from_raw("predictions", datatype, raw, count)


def _numpy_datatype(datatype: str, values: list[Any]) -> str:
    """The datatype a numpy client sends a column as: a nullable integer column is float
    in numpy, and yes/no text in a boolean column is text."""
    if datatype == "INT64" and any(v is None for v in values):
        return "FP64"
    if datatype == "BOOL" and any(isinstance(v, str) for v in values):
        return "BYTES"
    return datatype


def _client_spec(served: Served, rows: pd.DataFrame, params: dict | None) -> dict[str, Any]:
    inputs = []
    for item in _v2_inputs(served, rows):
        datatype, values = item["datatype"], item["data"]
        inputs.append({"name": item["name"], "datatype": _numpy_datatype(datatype, values),
                       "values": values})  # fmt: skip
    return {
        "http": served.gateway.url.removeprefix("http://"),
        "grpc": served.grpc_address,
        "key": KEY,
        "model": MODEL,
        "version": "1",
        "output": "predictions",
        "inputs": inputs,
        "parameters": params,
    }


def _require_clients() -> None:
    if CLIENTS_PYTHON.exists():
        return
    message = f"the V2 clients' venv is missing at {CLIENTS_PYTHON}: run `make clients`"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.mark.slow
@pytest.mark.parametrize("params", [None, {"predict_method": "predict_proba"}])
def test_real_v2_clients_over_rest_and_grpc(
    served: Served, tmp_path: Path, params: dict | None
) -> None:
    _require_clients()
    # Rows without a null text value: binary and gRPC BYTES tensors cannot carry null.
    rows = served.rows[served.rows["city"].notna()].head(12)
    spec = _client_spec(served, rows, params)
    if params:
        spec["output"] = "churn"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    report: dict[str, Any] = {}
    for family in ("triton", "kserve"):
        result = subprocess.run(
            [str(CLIENTS_PYTHON), str(REPO / "tests" / "clients" / "v2_clients.py"),
             str(spec_file), family],
            capture_output=True,
            text=True,
            timeout=180,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        report.update(json.loads(result.stdout))
    expected = _invocations(served, rows, params)
    if params:  # probabilities: one output per class, the spec asks for the first
        expected = [row[spec["output"]] for row in expected]
    assert set(report) == {
        "triton_http_json", "triton_http_binary", "triton_grpc",
        "kserve_rest_json", "kserve_rest_binary", "kserve_grpc",
    }  # fmt: skip
    for client, seen in report.items():
        assert seen["live"] is True and seen["ready"] is True, client
        assert seen["model_ready"] is True, client
        if client.startswith("kserve_rest"):
            # Its InferResponse.from_bytes drops model_version; the header carries it.
            assert seen["version_header"] == f"{MODEL}/1", client
        else:
            assert seen["model_version"] == "1", client
        assert seen["predictions"] == expected, client
        assert seen["bad_key"] in ("401", "StatusCode.UNAUTHENTICATED"), (client, seen["bad_key"])
    columns = {i["name"] for i in _v2_inputs(served, rows)}
    for client in ("triton_http_json", "triton_grpc"):
        metadata = report[client]["metadata"]
        assert metadata["name"] == MODEL and metadata["platform"] == "mlflow"
        assert {i["name"] for i in metadata["inputs"]} == columns
        assert report[client]["version_ready"] is True
    assert report["triton_http_json"]["id"] == "triton-http"


# --- batching and capture apply to V2 traffic --------------------------------------------------


@pytest.mark.slow
def test_v2_requests_merge_with_invocations_in_batches(served: Served, trained: Path) -> None:
    replica_url = served.replica_url
    with running(start_gateway(served.gateway.process.log_path.parent, {
        "FLOWLINE_ADMIN_TOKEN": ADMIN,
    })) as gateway:  # fmt: skip
        batching = BatchingSettings(enabled=True, max_batch_size=32, max_wait_ms=20)
        deployment = deployment_from_model_dir(MODEL, "1", [replica_url], trained, batching)
        put = httpx.put(
            f"{gateway.url}/admin/deployments/{MODEL}",
            json=deployment.to_dict(),
            headers={"Authorization": f"Bearer {ADMIN}"},
        )
        assert put.status_code == 200, put.text
        row = served.rows.head(1)
        local = Served(gateway, 0, served.rows, replica_url)
        inputs = _v2_inputs(local, row)
        expected = _invocations(local, row)
        batch_sizes: list[int] = []
        failures: list[str] = []

        def client(v2: bool) -> None:
            with httpx.Client(timeout=60) as http:
                for _ in range(15):
                    if v2:
                        answer = http.post(f"{gateway.url}/v2/models/{MODEL}/infer",
                                           json={"inputs": inputs})  # fmt: skip
                        ok = answer.status_code == 200
                        ok = ok and answer.json()["outputs"][0]["data"] == expected
                    else:
                        answer = http.post(
                            f"{gateway.url}/models/{MODEL}/invocations",
                            json={
                                "dataframe_split": json.loads(
                                    row.to_json(orient="split", index=False)
                                )
                            },
                        )
                        ok = answer.status_code == 200 and answer.json()["predictions"] == expected
                    if not ok:
                        failures.append(answer.text[:300])
                    if v2:
                        batch_sizes.append(int(answer.headers.get("x-flowline-batch-size", "1")))

        threads = [threading.Thread(target=client, args=(i % 2 == 0,)) for i in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert not failures, failures[:3]
        assert len(batch_sizes) == 90
        assert max(batch_sizes) > 1, "no V2 request was merged into a batch"


@pytest.mark.slow
def test_v2_requests_are_captured_like_invocations(served: Served, trained: Path) -> None:
    replica_url = served.replica_url
    rows = served.rows.head(3)
    inputs = _v2_inputs(served, rows)

    async def scenario() -> list[tuple[Any, ...]]:
        captured: list[tuple[Any, ...]] = []

        async def on_scored(model: str, version: str, request: Any, predictions: Any) -> None:
            frame = await asyncio.to_thread(request.to_frame)
            captured.append((model, version, frame, predictions))

        table = RouteTable()
        table.set_active(deployment_from_model_dir(MODEL, "1", [replica_url], trained))
        app = create_app(GatewayConfig(), table, on_scored=on_scored)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answer = await client.post(f"/v2/models/{MODEL}/infer", json={"inputs": inputs})
            assert answer.status_code == 200, answer.text
            deadline = asyncio.get_running_loop().time() + 20
            while not captured and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.02)
        await app.state.gateway.replicas.aclose()
        return captured

    captured = asyncio.run(scenario())
    assert len(captured) == 1
    model, version, frame, predictions = captured[0]
    assert (model, version) == (MODEL, "1")
    assert predictions == _invocations(served, rows)
    assert len(frame) == 3 and list(frame.columns) == [i["name"] for i in inputs]
