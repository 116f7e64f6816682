"""The internal admin API the controller uses to drive the gateway's route table.

Every endpoint needs `Authorization: Bearer $FLOWLINE_ADMIN_TOKEN`; without a
configured token the API answers 403. See docs/gateway.md for the contract.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from common import http_auth
from serving.deployment import GENERATION_HEADER, ROLES, Deployment, Variant
from serving.gateway import errors
from serving.gateway.core import Gateway
from serving.gateway.routes import ModelRoute


class AdminEndpoints:
    """Handlers of /admin/*, bound to one `Gateway`; serving/gateway/app.py maps the paths."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.table = gateway.table

    def check(self, request: Request) -> Response | None:
        """None when the request bears the admin token, else the refusal to send.

        403 when no token is configured (the API is off), 401 for a missing or wrong one.
        """
        token = self.gateway.config.admin_token
        if not token:
            return errors.error_response(
                403,
                errors.PERMISSION_DENIED,
                "The admin API is disabled: set FLOWLINE_ADMIN_TOKEN.",
            )
        if not http_auth.bearer_matches(request.headers.get("authorization"), token):
            return errors.error_response(
                401,
                errors.UNAUTHENTICATED,
                "Missing or invalid admin token.",
                headers=http_auth.challenge(),
            )
        return None

    async def put_deployment(self, request: Request) -> Response:
        """PUT /admin/deployments/{model}: make a deployment active.

        The controller has smoke-tested its replicas before (serving/controller/reconciler.py).

        Answers the now-active deployment and the one it replaced.
        """
        if (denied := self.check(request)) is not None:
            return denied
        model = request.path_params["model"]
        body = await self.gateway.read_body(request)
        if isinstance(body, Response):
            return body
        try:
            deployment = Deployment.from_dict(json.loads(body), model=model)
        except (ValueError, TypeError) as exc:
            return errors.error_response(400, errors.INVALID_PARAMETER_VALUE, str(exc))
        previous = self.table.set_active(deployment)
        self.table.note_pushed(pushed_generation(request))
        active = self.table.get(model)
        payload = {
            "deployment": (active.deployment if active else deployment).to_dict(),
            "previous": previous.to_dict() if previous else None,
        }
        return JSONResponse(payload)

    async def delete_deployment(self, request: Request) -> Response:
        """DELETE /admin/deployments/{model}: stop routing to a model (404 if not deployed)."""
        if (denied := self.check(request)) is not None:
            return denied
        model = request.path_params["model"]
        removed = self.table.remove(model)
        self.table.note_pushed(pushed_generation(request))
        if removed is None:
            return errors.error_response(
                404, errors.RESOURCE_DOES_NOT_EXIST, f"Model '{model}' is not deployed."
            )
        return JSONResponse({"removed": removed.to_dict()})

    async def list_deployments(self, request: Request) -> Response:
        """GET /admin/deployments: the active and the draining deployments."""
        if (denied := self.check(request)) is not None:
            return denied
        payload = {
            "deployments": [_describe(self.gateway, r) for r in self.table.routes()],
            "draining": [_describe(self.gateway, r) for r in self.table.draining()],
        }
        return JSONResponse(payload)

    async def get_deployment(self, request: Request) -> Response:
        """GET /admin/deployments/{model}: one active deployment (404 if not deployed)."""
        if (denied := self.check(request)) is not None:
            return denied
        model = request.path_params["model"]
        route = self.table.get(model)
        if route is None:
            return errors.error_response(
                404, errors.RESOURCE_DOES_NOT_EXIST, f"Model '{model}' is not deployed."
            )
        return JSONResponse(_describe(self.gateway, route))

    async def put_variant(self, request: Request) -> Response:
        """PUT /admin/deployments/{model}/{canary|shadow}: set the model's canary or shadow.

        Body: {"deployment": <a deployment>, "weight": 0-100, "sticky": <header> | null}
        for a canary, {"deployment": ..., "sample": 0-1} for a shadow; 400 when it is not
        that, 404 when the model has no production deployment to stand beside.
        Answers the variant now set and the one it replaced.
        """
        if (denied := self.check(request)) is not None:
            return denied
        model, role = request.path_params["model"], request.path_params["role"]
        if role not in ROLES:
            return _no_such_role(role)
        body = await self.gateway.read_body(request)
        if isinstance(body, Response):
            return body
        try:
            variant = Variant.from_dict(role, json.loads(body), model=model)
        except (ValueError, TypeError) as exc:
            return errors.error_response(400, errors.INVALID_PARAMETER_VALUE, str(exc))
        try:
            previous = self.table.set_variant(variant)
        except KeyError:
            return errors.error_response(
                404,
                errors.RESOURCE_DOES_NOT_EXIST,
                f"Model '{model}' has no production deployment for a {role} to join.",
            )
        self.table.note_pushed(pushed_generation(request))
        payload = {"role": role, **variant.to_dict()}
        return JSONResponse({role: payload, "previous": previous.to_dict() if previous else None})

    async def delete_variant(self, request: Request) -> Response:
        """DELETE /admin/deployments/{model}/{canary|shadow}: remove it (404 if none)."""
        if (denied := self.check(request)) is not None:
            return denied
        model, role = request.path_params["model"], request.path_params["role"]
        if role not in ROLES:
            return _no_such_role(role)
        removed = self.table.remove_variant(model, role)
        self.table.note_pushed(pushed_generation(request))
        if removed is None:
            return errors.error_response(
                404, errors.RESOURCE_DOES_NOT_EXIST, f"Model '{model}' has no {role}."
            )
        return JSONResponse({"removed": removed.to_dict()})

    async def inflight(self, request: Request) -> Response:
        """GET /admin/inflight[?replica=URL]: requests in flight, per replica or for one."""
        if (denied := self.check(request)) is not None:
            return denied
        replica = request.query_params.get("replica")
        if replica is not None:
            # With the generation: the controller drains only once every gateway has
            # applied the switch, not just once this count is 0.
            return JSONResponse(
                {
                    "replica": replica,
                    "inflight": self.table.inflight(replica),
                    "generation": self.table.generation,
                }
            )
        return JSONResponse({"replicas": self.table.inflight_by_replica()})

    async def replica_health(self, request: Request) -> Response:
        """POST /admin/replicas/health: the controller marks a replica up or down (held)."""
        if (denied := self.check(request)) is not None:
            return denied
        body = await self.gateway.read_body(request)
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
            self.table.mark_up(url)
        else:
            reason = str(data.get("reason") or "marked down by the controller")
            self.table.mark_down(url, reason, hold=True)
        state = self.table.replica(url)
        return JSONResponse({"url": url, "healthy": state.healthy})


def pushed_generation(request: Request) -> int | None:
    """The published generation a controller's change carries (GENERATION_HEADER)."""
    value = request.headers.get(GENERATION_HEADER)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _describe(gateway: Gateway, route: ModelRoute) -> dict[str, Any]:
    data = route.deployment.to_dict()
    data["admitted"] = route.admitted
    states = []
    for url in route.deployment.replicas:
        state = gateway.table.replica(url)
        states.append(
            {
                "url": url,
                "healthy": state.healthy,
                "active": state.active,
                "last_error": state.last_error,
            }
        )
    data["replica_states"] = states
    for role in ROLES:
        variant = gateway.table.variant(route.deployment.model, role)
        data[role] = None
        if variant is not None and variant.variant is not None:
            data[role] = {**variant.variant.to_dict(), "admitted": variant.admitted}
    return data


def _no_such_role(role: str) -> Response:
    return errors.error_response(
        404, errors.ENDPOINT_NOT_FOUND, f"No such deployment role '{role}': canary or shadow."
    )
