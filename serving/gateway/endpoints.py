"""The gateway's public endpoints: scoring, model list, probes, metrics and the API docs.

One method per route, bound to a `Gateway`, so each handler can be called (and
tested) alone with a Starlette `Request`; serving/gateway/app.py maps the paths.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from serving.gateway.core import Gateway
from serving.gateway.openapi import build_openapi, render_docs, render_locked_docs


class ScoringEndpoints:
    """Handlers of /invocations, /models/{name}/invocations, /models, /ping, /health,
    /metrics, /openapi.json and /docs."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def invocations(self, request: Request) -> Response:
        """POST /invocations: score with the default model."""
        return await self.gateway.score(request, None)

    async def model_invocations(self, request: Request) -> Response:
        """POST /models/{name}/invocations: score with the named model."""
        return await self.gateway.score(request, request.path_params["name"])

    async def models(self, request: Request) -> Response:
        """GET /models: each deployment's version, state, replicas and batching (API key)."""
        if not self.gateway.authorized(request):
            return self.gateway.unauthorized()
        return JSONResponse({"models": self.gateway.model_states()})

    async def ping(self, request: Request) -> Response:
        """GET /ping: liveness, the same answer as the stock scorer's /ping."""
        return Response("\n", media_type="application/json")

    async def health(self, request: Request) -> Response:
        """GET /health: 200 when every model has a healthy replica, else 503."""
        states = self.gateway.model_states()
        ok = bool(states) and all(s["state"] != "unavailable" for s in states)
        summary = {s["name"]: s["state"] for s in states}
        payload = {"status": "ok" if ok else "unavailable", "models": summary}
        return JSONResponse(payload, status_code=200 if ok else 503)

    async def metrics(self, request: Request) -> Response:
        """GET /metrics: the Prometheus exposition of the gateway's metrics."""
        registry = self.gateway.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi(self, request: Request) -> Response:
        """GET /openapi.json: the OpenAPI 3.1 spec of the deployed models (API key)."""
        if not self.gateway.authorized(request):
            return self.gateway.unauthorized()
        keys = bool(self.gateway.config.api_keys)
        return JSONResponse(build_openapi(*self.gateway.deployed(), api_keys=keys))

    async def docs(self, request: Request) -> Response:
        """GET /docs: Swagger UI over /openapi.json and a summary of each model.

        Without a valid key while keys are on, the page asks for the key (a browser
        cannot send a header on a page load) and shows nothing about the models
        until /openapi.json accepts it. Its scripts and styles, served at
        /docs/assets, are public: they are Swagger UI's own files.
        """
        if not self.gateway.authorized(request):
            return HTMLResponse(render_locked_docs())
        keys = bool(self.gateway.config.api_keys)
        return HTMLResponse(render_docs(*self.gateway.deployed(), api_keys=keys))
