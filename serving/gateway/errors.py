"""Error responses the gateway itself generates, in MLflow's error JSON shape."""

from __future__ import annotations

import json

from starlette.responses import Response

# MLflow error codes (mlflow.protos.databricks_pb2 names) for the statuses the gateway emits.
BAD_REQUEST = "BAD_REQUEST"
INVALID_PARAMETER_VALUE = "INVALID_PARAMETER_VALUE"
UNAUTHENTICATED = "UNAUTHENTICATED"
PERMISSION_DENIED = "PERMISSION_DENIED"
RESOURCE_DOES_NOT_EXIST = "RESOURCE_DOES_NOT_EXIST"
ENDPOINT_NOT_FOUND = "ENDPOINT_NOT_FOUND"
REQUEST_LIMIT_EXCEEDED = "REQUEST_LIMIT_EXCEEDED"
TEMPORARILY_UNAVAILABLE = "TEMPORARILY_UNAVAILABLE"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
INTERNAL_ERROR = "INTERNAL_ERROR"

JSON_TYPE = "application/json"


class ClientError(ValueError):
    """A request the client got wrong, found past the HTTP layer: answered with 400."""


def error_body(error_code: str, message: str) -> bytes:
    """`{"error_code": ..., "message": ...}` serialised the way MLflow does (json.dumps)."""
    return json.dumps({"error_code": error_code, "message": message}).encode()


def error_response(
    status: int, error_code: str, message: str, headers: dict[str, str] | None = None
) -> Response:
    """A JSON error response in MLflow's shape."""
    return Response(
        error_body(error_code, message), status_code=status, media_type=JSON_TYPE, headers=headers
    )
