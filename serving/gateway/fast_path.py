"""The scoring routes as plain ASGI, in front of the Starlette app for everything else.

`POST /invocations` and `POST /models/{name}/invocations` are nearly every request a
gateway serves. Starlette's middleware stack and router cost them about 27% of the
gateway's CPU per request (a profile at 64 clients), for nothing they need: this
dispatcher matches the two paths on the raw scope and calls `Gateway.score` directly.
Every other request (probes, metrics, docs, admin, V2, wrong methods, unknown paths)
and the lifespan go to the Starlette app unchanged, so their behaviour, errors
included, is the app's own.

What the scoring routes keep: the handler is the same `Gateway.score` (auth, body
limits, rate limits, routing, batching, the version and request-id headers, metrics,
capture); an exception it does not handle is the app's 500 in MLflow's error shape.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.gateway.app import internal_error
from serving.gateway.core import Gateway

_MODELS = "/models/"
_INVOCATIONS = "/invocations"


def scoring_model(path: str) -> str | None | bool:
    """The model a scoring path names: None for /invocations (the default model), the
    name for /models/{name}/invocations, False for any other path."""
    if path == _INVOCATIONS:
        return None
    if path.startswith(_MODELS) and path.endswith(_INVOCATIONS):
        name = path[len(_MODELS) : -len(_INVOCATIONS)]
        # Starlette's {name} is one non-empty path segment.
        if name and "/" not in name:
            return name
    return False


class ScoringFastPath:
    """ASGI app: scoring requests to `gateway.score`, everything else to `app`."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Dispatch one ASGI connection scope."""
        if scope["type"] == "http" and scope["method"] == "POST":
            model = scoring_model(scope["path"])
            if model is not False:
                request = Request(scope, receive)
                try:
                    response = await self.gateway.score(request, model)
                except Exception as exc:  # the app's own 500, as its middleware would give
                    response = await internal_error(request, exc)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
