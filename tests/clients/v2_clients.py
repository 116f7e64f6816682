"""Call a flowline gateway with the real V2 clients: tritonclient (HTTP, gRPC) and KServe's.

Run by tests/test_v2_protocol.py with the clients' own venv (.venv-clients), never
imported by flowline. Reads a JSON spec from argv[1] and the client family from
argv[2] (triton or kserve); prints one JSON object: per
client, what each call returned (health, readiness, metadata, predictions, the
answering version) and the errors a bad API key gets.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np

NUMPY = {"FP64": np.float64, "FP32": np.float32, "INT64": np.int64, "INT32": np.int32,
         "BOOL": np.bool_, "BYTES": np.object_}  # fmt: skip


def arrays(spec: dict[str, Any]) -> list[tuple[str, str, np.ndarray]]:
    out = []
    for item in spec["inputs"]:
        values = item["values"]
        if item["datatype"].startswith("FP"):
            values = [np.nan if v is None else v for v in values]
        array = np.array(values, dtype=NUMPY[item["datatype"]])
        out.append((item["name"], item["datatype"], array))
    return out


def plain(array: np.ndarray) -> list[Any]:
    """A result tensor as JSON values: BYTES elements come back as bytes, labels are text."""
    return [v.decode("utf-8") if isinstance(v, bytes) else v for v in array.tolist()]


def triton_http(spec: dict[str, Any], binary: bool) -> dict[str, Any]:
    import tritonclient.http as http

    headers = {"Authorization": f"Bearer {spec['key']}"}
    client = http.InferenceServerClient(url=spec["http"])
    inputs = []
    for name, datatype, array in arrays(spec):
        tensor = http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    outputs = [http.InferRequestedOutput(spec["output"], binary_data=binary)]
    result = client.infer(
        spec["model"], inputs, model_version=spec["version"], outputs=outputs,
        request_id="triton-http", headers=headers, parameters=spec.get("parameters"),
    )  # fmt: skip
    answer = result.get_response()
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(spec["model"], headers=headers),
        "version_ready": client.is_model_ready(spec["model"], spec["version"], headers=headers),
        "metadata": client.get_model_metadata(spec["model"], headers=headers),
        "predictions": plain(result.as_numpy(spec["output"])),
        "model_version": answer["model_version"],
        "id": answer.get("id"),
    }
    try:
        client.infer(spec["model"], inputs, headers={"Authorization": "Bearer wrong"})
        report["bad_key"] = "accepted"
    except Exception as exc:  # tritonclient's InferenceServerException
        report["bad_key"] = str(getattr(exc, "status", lambda: None)())
    client.close()
    return report


def triton_grpc(spec: dict[str, Any]) -> dict[str, Any]:
    import tritonclient.grpc as grpcclient

    headers = {"authorization": f"Bearer {spec['key']}"}
    client = grpcclient.InferenceServerClient(url=spec["grpc"])
    inputs = []
    for name, datatype, array in arrays(spec):
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(spec["output"])]
    result = client.infer(
        spec["model"], inputs, model_version=spec["version"], outputs=outputs,
        request_id="triton-grpc", headers=headers, parameters=spec.get("parameters"),
    )  # fmt: skip
    answer = result.get_response(as_json=True)
    metadata = client.get_model_metadata(spec["model"], headers=headers, as_json=True)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(spec["model"], headers=headers),
        "version_ready": client.is_model_ready(spec["model"], spec["version"], headers=headers),
        "metadata": metadata,
        "predictions": plain(result.as_numpy(spec["output"])),
        "model_version": answer["model_version"],
        "id": answer.get("id"),
    }
    try:
        client.infer(spec["model"], inputs, headers={"authorization": "Bearer wrong"})
        report["bad_key"] = "accepted"
    except Exception as exc:
        report["bad_key"] = str(exc.status())
    client.close()
    return report


def kserve_request(spec: dict[str, Any], binary: bool, request_id: str) -> Any:
    from kserve import InferInput, InferRequest

    inputs = []
    for name, datatype, array in arrays(spec):
        tensor = InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return InferRequest(
        model_name=spec["model"], infer_inputs=inputs, request_id=request_id,
        parameters=spec.get("parameters"),
    )  # fmt: skip


async def kserve_rest(spec: dict[str, Any], binary: bool) -> dict[str, Any]:
    from kserve import InferenceRESTClient, RESTConfig

    base = f"http://{spec['http']}"
    headers = {"Authorization": f"Bearer {spec['key']}"}
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    seen_headers: dict[str, str] = {}
    try:
        answer = await client.infer(
            base, kserve_request(spec, binary, "kserve-rest"), model_name=spec["model"],
            headers=headers, response_headers=seen_headers,
        )  # fmt: skip
        output = next(o for o in answer.outputs if o.name == spec["output"])
        report = {
            "live": await client.is_server_live(base),
            "ready": await client.is_server_ready(base),
            "model_ready": await client.is_model_ready(base, spec["model"]),
            "predictions": plain(output.as_numpy()),
            # KServe's REST client drops model_version from the answer: read the header.
            "model_version": answer.model_version,
            "version_header": seen_headers.get("x-flowline-model-version"),
            "id": answer.id,
        }
        try:
            await client.infer(
                base, kserve_request(spec, binary, "bad"), model_name=spec["model"],
                headers={"Authorization": "Bearer wrong"},
            )  # fmt: skip
            report["bad_key"] = "accepted"
        except Exception as exc:  # httpx.HTTPStatusError
            report["bad_key"] = str(exc.response.status_code)
    finally:
        await client.close()
    return report


async def kserve_grpc(spec: dict[str, Any]) -> dict[str, Any]:
    from kserve import InferenceGRPCClient

    headers = (("authorization", f"Bearer {spec['key']}"),)
    client = InferenceGRPCClient(url=spec["grpc"], timeout=60)
    try:
        answer = await client.infer(kserve_request(spec, True, "kserve-grpc"), headers=headers)
        output = next(o for o in answer.outputs if o.name == spec["output"])
        report = {
            "live": await client.is_server_live(),
            "ready": await client.is_server_ready(),
            "model_ready": await client.is_model_ready(spec["model"]),
            "predictions": plain(output.as_numpy()),
            "model_version": answer.model_version,
            "id": answer.id,
        }
        try:
            await client.infer(
                kserve_request(spec, True, "bad"), headers=(("authorization", "Bearer wrong"),)
            )
            report["bad_key"] = "accepted"
        except Exception as exc:  # grpc.aio.AioRpcError
            report["bad_key"] = str(exc.code())
    finally:
        await client.close()
    return report


def main() -> None:
    """argv: the spec file, then "triton" or "kserve": one family per process, since
    both register the protocol's messages (inference.*) in protobuf's global pool."""
    spec = json.loads(open(sys.argv[1]).read())
    if sys.argv[2] == "triton":
        report = {
            "triton_http_json": triton_http(spec, binary=False),
            "triton_http_binary": triton_http(spec, binary=True),
            "triton_grpc": triton_grpc(spec),
        }
    else:
        report = {
            "kserve_rest_json": asyncio.run(kserve_rest(spec, binary=False)),
            "kserve_rest_binary": asyncio.run(kserve_rest(spec, binary=True)),
            "kserve_grpc": asyncio.run(kserve_grpc(spec)),
        }
    print(json.dumps(report, default=str))


if __name__ == "__main__":
    main()
