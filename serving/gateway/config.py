"""Gateway settings, read from the environment (FLOWLINE_*) or given in code."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator

from common.settings import (
    CommaList,
    HomeSettings,
    OptionalPort,
    OptionalStr,
    PositiveFloat,
    PositiveInt,
    dataclass_values,
)
from serving.deployment import parse_rate_limit

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_INFLIGHT = 256
# Longer than the replica's own 60 s request timeout, so its 504 reaches the client.
DEFAULT_BACKEND_TIMEOUT_S = 70.0
DEFAULT_HEALTH_INTERVAL_S = 1.0
DEFAULT_MAX_CONNECTIONS = 256
# A client has this long to send its whole body (408 after) or its request head (closed
# with 408): slow senders must not hold memory and connections indefinitely.
DEFAULT_BODY_TIMEOUT_S = 10.0
DEFAULT_HEADER_TIMEOUT_S = 10.0
# The request line plus headers; larger heads get 431. Clients send well under 8 KiB.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
ROUTES_FILE = Path("gateway") / "routes.json"
# Keys the gateway writes to Redis (rate-limit windows, cached answers) start with this.
DEFAULT_REDIS_PREFIX = "flowline:"
# Mirrored shadow calls running at once; more are dropped (counted), never queued.
DEFAULT_SHADOW_MAX_INFLIGHT = 32
DEFAULT_GRPC_HOST = "127.0.0.1"
# How often a coordinated gateway polls the published routes: well within the
# controller's 5 s reconcile interval, one cheap SELECT per second.
DEFAULT_ROUTE_SYNC_S = 1.0


@dataclass(frozen=True)
class GatewayConfig:
    """Everything the gateway needs besides its routes.

    api_keys: bearer tokens accepted on scoring, /models and the docs; empty
        means no authentication.
    admin_token: bearer token of the /admin API; None disables that API.
    default_model: the model `POST /invocations` goes to when several are deployed.
    max_body_bytes: larger request bodies get 413.
    max_inflight: scoring requests in the gateway at once; more get 503 + Retry-After.
    backend_timeout_s: how long one replica call may take before 504.
    health_interval_s: how often replicas marked down are pinged.
    max_connections: keep-alive connections per replica.
    upstream: HTTP client for scoring calls: "aiohttp" (fast, default) or "httpx".
    body_timeout_s: how long reading one request body may take before 408.
    header_timeout_s: how long a connection may take to send a request head before
        it gets 408 and is closed.
    max_header_bytes: request heads larger than this get 431 and the connection closed.
    rate_limits: the default budget of every (API key, model) pair, a `limits` rate
        string like "100/second"; None: no limit unless a model's ``flowline.rate_limit``
        tag sets one.
    redis_url: where rate-limit windows and cached answers are shared by several
        gateway processes (redis://host:6379/0); None keeps them in process.
    redis_prefix: the prefix of every Redis key the gateway writes.
    grpc_port: the port of the Open Inference Protocol's gRPC service (0 picks a free
        one); None: no gRPC service.
    grpc_host: the address the gRPC service binds.
    shadow_max_inflight: mirrored shadow calls at once; beyond it a mirror is dropped.
    routes_file: where the route table is persisted and restored from at start;
        None keeps it in memory only (the default in code; `from_env` sets
        FLOWLINE_ROUTES_FILE, else $FLOWLINE_HOME/gateway/routes.json).
    coordination_url: the database where the active controller publishes routes
        (serving/coordination.py); when set, the gateway converges to them by itself
        every `route_sync_s` and heartbeats as `advertise_url`, where controllers push.
    """

    api_keys: frozenset[str] = field(default_factory=frozenset)
    admin_token: str | None = None
    default_model: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    backend_timeout_s: float = DEFAULT_BACKEND_TIMEOUT_S
    health_interval_s: float = DEFAULT_HEALTH_INTERVAL_S
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    upstream: str = "aiohttp"
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    rate_limits: str | None = None
    redis_url: str | None = None
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    grpc_port: int | None = None
    grpc_host: str = DEFAULT_GRPC_HOST
    routes_file: Path | None = None
    shadow_max_inflight: int = DEFAULT_SHADOW_MAX_INFLIGHT
    coordination_url: str | None = None
    advertise_url: str | None = None
    route_sync_s: float = DEFAULT_ROUTE_SYNC_S

    def __post_init__(self) -> None:
        if self.rate_limits is not None:
            object.__setattr__(self, "rate_limits", parse_rate_limit(self.rate_limits))
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(f"redis_url must be a redis:// URL, got {self.redis_url!r}")
        positive = ("max_body_bytes", "max_inflight", "max_connections", "max_header_bytes")
        for name in (*positive, "shadow_max_inflight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be a positive number")
        seconds = (
            "backend_timeout_s",
            "health_interval_s",
            "body_timeout_s",
            "header_timeout_s",
            "route_sync_s",
        )
        for name in seconds:
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{name} must be a positive, finite number of seconds")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewayConfig:
        """Read FLOWLINE_* variables (see docs/gateway.md); a bad one: one-line ValueError."""
        env = GatewaySettings.from_env(environ)
        values = dataclass_values(env, cls)
        values["api_keys"] = frozenset(env.api_keys) | load_api_keys(None, env.api_keys_file)
        given = values.pop("routes_file", None)
        routes_file = Path(given) if given else env.home / ROUTES_FILE
        return cls(**values, routes_file=routes_file)


def _rate_limit(value: str | None) -> str | None:
    return None if value is None else parse_rate_limit(value)


RateLimit = Annotated[OptionalStr, AfterValidator(_rate_limit)]
"""A `limits` rate string ("100/second"); unset or empty is None."""


class GatewaySettings(HomeSettings):
    """The gateway's FLOWLINE_* variables, typed (`GatewayConfig.from_env` reads them).

    FLOWLINE_API_KEYS is comma-separated and merged with the keys of
    FLOWLINE_API_KEYS_FILE; FLOWLINE_HOME holds the persisted route table.
    """

    api_keys: CommaList = ()
    api_keys_file: OptionalStr = None
    admin_token: OptionalStr = None
    default_model: OptionalStr = None
    max_body_bytes: PositiveInt = DEFAULT_MAX_BODY_BYTES
    max_inflight: PositiveInt = DEFAULT_MAX_INFLIGHT
    backend_timeout_s: PositiveFloat = DEFAULT_BACKEND_TIMEOUT_S
    health_interval_s: PositiveFloat = DEFAULT_HEALTH_INTERVAL_S
    max_connections: PositiveInt = DEFAULT_MAX_CONNECTIONS
    upstream: str = "aiohttp"
    body_timeout_s: PositiveFloat = DEFAULT_BODY_TIMEOUT_S
    header_timeout_s: PositiveFloat = DEFAULT_HEADER_TIMEOUT_S
    max_header_bytes: PositiveInt = DEFAULT_MAX_HEADER_BYTES
    rate_limits: RateLimit = None
    redis_url: OptionalStr = None
    redis_prefix: str = DEFAULT_REDIS_PREFIX
    grpc_port: OptionalPort = None
    grpc_host: str = DEFAULT_GRPC_HOST
    shadow_max_inflight: PositiveInt = DEFAULT_SHADOW_MAX_INFLIGHT
    routes_file: OptionalStr = None
    coordination_url: OptionalStr = None
    advertise_url: OptionalStr = None
    route_sync_s: PositiveFloat = DEFAULT_ROUTE_SYNC_S


def flowline_home(env: Mapping[str, str]) -> Path:
    """$FLOWLINE_HOME, else ./.flowline (the same rule as `flowline.config.home`)."""
    return HomeSettings.from_env(env).home


def load_api_keys(inline: str | None, path: str | None) -> frozenset[str]:
    """Keys from a comma-separated string and/or a file (one per line, '#' comments)."""
    keys: set[str] = set()
    if inline:
        keys.update(k.strip() for k in inline.split(","))
    if path:
        for line in Path(path).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                keys.add(line)
    keys.discard("")
    return frozenset(keys)
