"""The internal admin API the controller uses to drive the gateway's route table.

Every endpoint needs `Authorization: Bearer $FLOWLINE_ADMIN_TOKEN`; without a
configured token the API answers 403. See docs/gateway.md for the contract.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import TYPE_CHECKING, Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from serving.deployment import Deployment
from serving.gateway import errors
from serving.gateway.routes import ModelRoute

if TYPE_CHECKING:
    from serving.gateway.app import Gateway

VERIFY_TIMEOUT_S = 10.0


def admin_routes(gateway: Gateway) -> list[Route]:
    """Starlette routes of the admin API bound to `gateway`."""
    table = gateway.table

    def check(request: Request) -> Response | None:
        token = gateway.config.admin_token
        if not token:
            return errors.error_response(
                403,
                errors.PERMISSION_DENIED,
                "The admin API is disabled: set FLOWLINE_ADMIN_TOKEN.",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 token.encode()):  # fmt: skip
            return errors.error_response(
                401, errors.UNAUTHENTICATED, "Missing or invalid admin token.",
                headers={"WWW-Authenticate": "Bearer"},
            )  # fmt: skip
        return None

    async def put_deployment(request: Request) -> Response:
        if (denied := check(request)) is not None:
            return denied
        model = request.path_params["model"]
        body = await gateway.read_body(request)
        if isinstance(body, Response):
            return body
        try:
            deployment = Deployment.from_dict(json.loads(body), model=model)
        except (ValueError, TypeError) as exc:
            return errors.error_response(400, errors.INVALID_PARAMETER_VALUE, str(exc))
        if request.query_params.get("verify", "").lower() in ("1", "true", "yes"):
            problems = await verify(gateway, deployment)
            if problems:
                return errors.error_response(
                    409,
                    errors.INVALID_PARAMETER_VALUE,
                    "Verification failed, route unchanged: " + "; ".join(problems),
                )
            # Verified just now: clear stale down-marks left by earlier users of these URLs.
            for url in deployment.replicas:
                table.mark_up(url)
        previous = table.set_active(deployment)
        active = table.get(model)
        return JSONResponse({
            "deployment": (active.deployment if active else deployment).to_dict(),
            "previous": previous.to_dict() if previous else None,
        })  # fmt: skip

    async def delete_deployment(request: Request) -> Response:
        if (denied := check(request)) is not None:
            return denied
        model = request.path_params["model"]
        removed = table.remove(model)
        if removed is None:
            return errors.error_response(
                404, errors.RESOURCE_DOES_NOT_EXIST, f"Model '{model}' is not deployed."
            )
        return JSONResponse({"removed": removed.to_dict()})

    async def list_deployments(request: Request) -> Response:
        if (denied := check(request)) is not None:
            return denied
        return JSONResponse({
            "deployments": [_describe(gateway, r) for r in table.routes()],
            "draining": [_describe(gateway, r) for r in table.draining()],
        })  # fmt: skip

    async def get_deployment(request: Request) -> Response:
        if (denied := check(request)) is not None:
            return denied
        route = table.get(request.path_params["model"])
        if route is None:
            return errors.error_response(
                404, errors.RESOURCE_DOES_NOT_EXIST,
                f"Model '{request.path_params['model']}' is not deployed.",
            )  # fmt: skip
        return JSONResponse(_describe(gateway, route))

    async def inflight(request: Request) -> Response:
        if (denied := check(request)) is not None:
            return denied
        replica = request.query_params.get("replica")
        if replica is not None:
            return JSONResponse({"replica": replica, "inflight": table.inflight(replica)})
        return JSONResponse({"replicas": table.inflight_by_replica()})

    async def replica_health(request: Request) -> Response:
        if (denied := check(request)) is not None:
            return denied
        body = await gateway.read_body(request)
        if isinstance(body, Response):
            return body
        try:
            data = json.loads(body)
            url, healthy = str(data["url"]).rstrip("/"), data["healthy"]
            if not isinstance(healthy, bool):
                raise ValueError("'healthy' must be true or false")
        except (ValueError, KeyError, TypeError) as exc:
            return errors.error_response(
                400, errors.INVALID_PARAMETER_VALUE, f"Expected {{url, healthy}}: {exc}"
            )
        if healthy:
            table.mark_up(url)
        else:
            table.mark_down(
                url, str(data.get("reason") or "marked down by the controller"), hold=True
            )
        state = table.replica(url)
        return JSONResponse({"url": url, "healthy": state.healthy})

    return [
        Route("/admin/deployments", list_deployments, methods=["GET"]),
        Route("/admin/deployments/{model}", put_deployment, methods=["PUT"]),
        Route("/admin/deployments/{model}", get_deployment, methods=["GET"]),
        Route("/admin/deployments/{model}", delete_deployment, methods=["DELETE"]),
        Route("/admin/inflight", inflight, methods=["GET"]),
        Route("/admin/replicas/health", replica_health, methods=["POST"]),
    ]


def _describe(gateway: Gateway, route: ModelRoute) -> dict[str, Any]:
    data = route.deployment.to_dict()
    data["admitted"] = route.admitted
    data["replica_states"] = [
        {"url": u, "healthy": gateway.table.replica(u).healthy,
         "active": gateway.table.replica(u).active,
         "last_error": gateway.table.replica(u).last_error}
        for u in route.deployment.replicas
    ]  # fmt: skip
    return data


async def verify(gateway: Gateway, deployment: Deployment) -> list[str]:
    """Ping every replica and score the input example on each; return the problems found."""
    client = gateway.replicas.client

    async def one(url: str) -> str | None:
        try:
            ping = await client.get(f"{url}/ping", timeout=VERIFY_TIMEOUT_S)
            if ping.status_code != 200:
                return f"{url}/ping answered {ping.status_code}"
            if deployment.input_example is not None:
                answer = await client.post(
                    f"{url}/invocations",
                    content=json.dumps(deployment.input_example).encode(),
                    headers={"content-type": "application/json"},
                    timeout=VERIFY_TIMEOUT_S,
                )
                if answer.status_code != 200:
                    return f"{url} answered the input example with {answer.status_code}"
        except httpx.HTTPError as exc:
            return f"{url}: {type(exc).__name__}: {exc}"
        return None

    results = await asyncio.gather(*(one(u) for u in deployment.replicas))
    return [r for r in results if r]
