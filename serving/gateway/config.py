"""Gateway settings, read from the environment (FLOWLINE_*) or given in code."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_INFLIGHT = 256
# Longer than the replica's own 60 s request timeout, so its 504 reaches the client.
DEFAULT_BACKEND_TIMEOUT_S = 70.0
DEFAULT_HEALTH_INTERVAL_S = 1.0
DEFAULT_MAX_CONNECTIONS = 256


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

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> GatewayConfig:
        """Read FLOWLINE_* variables (see docs/gateway.md)."""
        env = os.environ if environ is None else environ
        return cls(
            api_keys=load_api_keys(env.get("FLOWLINE_API_KEYS"), env.get("FLOWLINE_API_KEYS_FILE")),
            admin_token=env.get("FLOWLINE_ADMIN_TOKEN") or None,
            default_model=env.get("FLOWLINE_DEFAULT_MODEL") or None,
            max_body_bytes=int(env.get("FLOWLINE_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
            max_inflight=int(env.get("FLOWLINE_MAX_INFLIGHT", DEFAULT_MAX_INFLIGHT)),
            backend_timeout_s=float(
                env.get("FLOWLINE_BACKEND_TIMEOUT_S", DEFAULT_BACKEND_TIMEOUT_S)
            ),
            health_interval_s=float(
                env.get("FLOWLINE_HEALTH_INTERVAL_S", DEFAULT_HEALTH_INTERVAL_S)
            ),
            max_connections=int(env.get("FLOWLINE_MAX_CONNECTIONS", DEFAULT_MAX_CONNECTIONS)),
            upstream=env.get("FLOWLINE_UPSTREAM", "aiohttp"),
        )


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
