"""The Open Inference Protocol's gRPC service (`inference.GRPCInferenceService`).

It runs on the gateway's own event loop (grpc.aio), started and stopped with the
app (see serving/gateway/app.py), and scores through the same `InferenceService`
as the REST endpoints. An API key travels as `authorization: Bearer <key>`
metadata; the answering version comes back in the response's `model_version`
and in the `x-flowline-model-version` initial metadata. Outputs are sent as
`raw_output_contents`, the form every client decodes (tritonclient reads no
other for numbers).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from serving.gateway.core import REQUEST_ID_HEADER, Gateway
from serving.gateway.v2 import inference_pb2 as pb
from serving.gateway.v2 import inference_pb2_grpc as pb_grpc
from serving.gateway.v2.codec import InferRequest, input_tensor, model_parameters
from serving.gateway.v2.service import InferenceService, InferResult
from serving.gateway.v2.tensors import BYTES, TensorError, check_datatype, from_raw, to_raw

logger = logging.getLogger(__name__)

# HTTP statuses of the shared scoring path and the gRPC codes a client expects for them.
_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
# Which field of InferTensorContents carries each datatype (FP16 only travels raw).
_CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    BYTES: "bytes_contents",
}


def grpc_status(http_status: int) -> grpc.StatusCode:
    """The gRPC status code for an HTTP status of the scoring path."""
    if http_status in _CODES:
        return _CODES[http_status]
    return grpc.StatusCode.INTERNAL if http_status >= 500 else grpc.StatusCode.INVALID_ARGUMENT


def infer_request(message: pb.ModelInferRequest) -> InferRequest:
    """A protobuf ModelInferRequest as the protocol-neutral `InferRequest`."""
    raw = list(message.raw_input_contents)
    if raw and len(raw) != len(message.inputs):
        raise TensorError("raw_input_contents must hold one entry per input")
    inputs = []
    for index, tensor in enumerate(message.inputs):
        shape = list(tensor.shape)
        if raw:
            count = 1
            for dim in shape:
                count *= max(dim, 0)
            datatype = check_datatype(tensor.name, tensor.datatype)
            values = from_raw(tensor.name, datatype, raw[index], count)
        else:
            field = _CONTENTS.get(tensor.datatype)
            if field is None:
                raise TensorError(
                    f"input '{tensor.name}': {tensor.datatype!r} data must be sent as "
                    "raw_input_contents"
                )
            values = list(getattr(tensor.contents, field))
        inputs.append(input_tensor(tensor.name, tensor.datatype, shape, values))
    parameters = {k: _parameter(v) for k, v in message.parameters.items()}
    outputs = [o.name for o in message.outputs] or None
    return InferRequest(inputs, message.id or None, model_parameters(parameters), outputs)


def _parameter(value: pb.InferParameter) -> Any:
    choice = value.WhichOneof("parameter_choice")
    return None if choice is None else getattr(value, choice)


def infer_response(result: InferResult, request_id: str | None) -> pb.ModelInferResponse:
    """The protobuf answer of a successful inference, outputs as raw bytes."""
    assert result.deployment is not None
    response = pb.ModelInferResponse(
        model_name=result.deployment.model,
        model_version=result.deployment.version,
        id=request_id or "",
    )
    for output in result.outputs:
        response.outputs.add(name=output.name, datatype=output.datatype, shape=output.shape)
        response.raw_output_contents.append(to_raw(output.datatype, output.values))
    return response


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """The protocol's six RPCs over an `InferenceService`."""

    def __init__(self, service: InferenceService) -> None:
        self.service = service
        self.gateway = service.gateway

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        """Live while the gateway runs."""
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        """Ready when every deployed model can be scored."""
        return pb.ServerReadyResponse(ready=self.service.ready())

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:  # noqa: N802
        """The server's name, version and extensions."""
        return pb.ServerMetadataResponse(**self.service.server_metadata())

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        """Whether the model (version) has a healthy replica; NOT_FOUND when not deployed."""
        ready = self.service.model_ready(request.name, request.version or None)
        if ready is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                self.service.not_deployed(request.name, request.version or None),
            )
        return pb.ModelReadyResponse(ready=bool(ready))

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:  # noqa: N802
        """The model's inputs and outputs (API key when keys are on)."""
        await self._authenticate(context)
        metadata = self.service.metadata(request.name, request.version or None)
        if metadata is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                self.service.not_deployed(request.name, request.version or None),
            )
        return pb.ModelMetadataResponse(**metadata)

    async def ModelInfer(self, request: Any, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        """Score the request's inputs through the gateway's scoring path."""
        started = time.perf_counter()
        authorization = await self._authenticate(context, scoring=True)
        try:
            parsed = infer_request(request)
        except TensorError as exc:
            self.gateway.reject("bad_request", 400, "BAD_REQUEST", str(exc))
            self._set_new_request_id(context)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        result = await self.service.infer(
            request.model_name, request.model_version or None, parsed, authorization, started
        )
        metadata = tuple((k.lower(), v) for k, v in result.headers.items())
        if result.error is not None:
            context.set_trailing_metadata(metadata)
            await context.abort(grpc_status(result.status), result.error)
        await context.send_initial_metadata(metadata)
        return infer_response(result, parsed.id)

    def _set_new_request_id(self, context: Any) -> None:
        # A scoring refusal before the scoring path still names its request.
        request_id = self.gateway.next_request_id()
        context.set_trailing_metadata(((REQUEST_ID_HEADER.lower(), request_id),))

    async def _authenticate(self, context: Any, scoring: bool = False) -> str | None:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        if not self.gateway.authorization_valid(authorization):
            self.gateway.unauthorized()  # counts the refusal
            if scoring:
                self._set_new_request_id(context)
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "Missing or invalid API key: send 'authorization: Bearer <key>' metadata.",
            )
        return authorization


@contextlib.asynccontextmanager
async def grpc_serving(
    gateway: Gateway,
    address: str,
    credentials: grpc.ServerCredentials | None = None,
) -> AsyncIterator[int]:
    """Serve the V2 gRPC service on `address` ("host:port", port 0 picks one) while the
    context is open; yields the bound port. TLS when `credentials` are given."""
    max_bytes = gateway.config.max_body_bytes
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.so_reuseport", 0),
        ]
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(InferenceService(gateway)), server
    )
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind the gRPC port at {address}")
    await server.start()
    logger.warning("flowline gateway gRPC (Open Inference Protocol) on %s", address)
    try:
        yield port
    finally:
        # In-flight calls get the drain time the HTTP side gives its requests.
        await server.stop(grace=5.0)
