"""The deployment contract between the controller and the gateway.

A `Deployment` is one model version on its replicas, with the signature and the
input example the gateway needs for its docs, batching and smoke checks. The
controller builds it (`serving.model_metadata`) and sends it to the gateway, in
process or as JSON over the admin API (`serving.gateway.admin`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_WAIT_MS = 50.0
DEFAULT_HOLD_MS = 10.0
DEFAULT_CACHE_TTL_S = 60.0
DEFAULT_CACHE_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class BatchingSettings:
    """Adaptive batching settings of one deployment.

    enabled: coalesce concurrent tabular JSON requests (still only where safe,
        see `serving.gateway.wire`).
    max_batch_size: most rows in one merged backend call.
    max_wait_ms: longest a request waits in the gateway for a free backend
        slot; after that it is sent on its own even though replicas are busy.
        An idle deployment never delays a request.
    calls_per_replica: backend calls in flight per healthy replica before
        requests start to queue (and so to coalesce).
    hold_ms: after a merged call, how long its freed slot may wait for the callers it
        just answered to send their next request, so the next call is full instead of
        half full (at most the finished call's own duration and `max_wait_ms`; 0 turns
        it off).
    """

    enabled: bool = True
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS
    calls_per_replica: int = 1
    hold_ms: float = DEFAULT_HOLD_MS

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_wait_ms < 0:
            raise ValueError("max_wait_ms must be >= 0")
        if self.calls_per_replica < 1:
            raise ValueError("calls_per_replica must be >= 1")
        if self.hold_ms < 0:
            raise ValueError("hold_ms must be >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> BatchingSettings:
        """Build from the admin API's JSON (missing keys keep their defaults)."""
        if data is None:
            return cls()
        known = {"enabled", "max_batch_size", "max_wait_ms", "calls_per_replica", "hold_ms"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown batching settings: {sorted(unknown)}")
        return cls(
            enabled=bool(data.get("enabled", True)),
            max_batch_size=int(data.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)),
            max_wait_ms=float(data.get("max_wait_ms", DEFAULT_MAX_WAIT_MS)),
            calls_per_replica=int(data.get("calls_per_replica", 1)),
            hold_ms=float(data.get("hold_ms", DEFAULT_HOLD_MS)),
        )


@dataclass(frozen=True)
class CacheSettings:
    """The response cache of one deployment (the registered-model tag ``flowline.cache``).

    ttl_s: how long a stored answer is served (seconds, > 0).
    max_entries: most answers kept per model in one gateway process (in-process store).
    """

    ttl_s: float = DEFAULT_CACHE_TTL_S
    max_entries: int = DEFAULT_CACHE_MAX_ENTRIES

    def __post_init__(self) -> None:
        if not 0 < self.ttl_s < float("inf"):
            raise ValueError("cache ttl_s must be a positive, finite number of seconds")
        if self.max_entries < 1:
            raise ValueError("cache max_entries must be >= 1")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CacheSettings | None:
        """Build from JSON (missing keys keep their defaults); None stays None (cache off)."""
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValueError('cache settings must be a JSON object like {"ttl_s": 60}')
        unknown = set(data) - {"ttl_s", "max_entries"}
        if unknown:
            raise ValueError(f"unknown cache settings: {sorted(unknown)}")
        try:
            return cls(
                ttl_s=float(data.get("ttl_s", DEFAULT_CACHE_TTL_S)),
                max_entries=int(data.get("max_entries", DEFAULT_CACHE_MAX_ENTRIES)),
            )
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad cache settings {data!r}: {exc}") from None


@dataclass(frozen=True)
class Deployment:
    """One model version deployed on a set of replicas.

    model: registered model name; version: registry version ("3").
    replicas: base URLs of `mlflow models serve` processes ("http://127.0.0.1:9000").
    input_example: the version's serving input example, i.e. a request body
        the stock scorer accepts (MLflow's serving_input_example.json), or None.
    signature: the MLflow signature dict as stored in MLmodel:
        {"inputs": "<json>", "outputs": "<json>", "params": "<json>" | None}
        (the values may also be given already decoded), or None.
    batching: adaptive batching settings.
    timeout_s: how long one replica call may take before the caller gets 504 (the
        registered-model tag ``flowline.timeout_s``); None: the gateway's default.
    rate_limit: requests each API key may send this model, a `limits` rate string
        like "50/second" (the tag ``flowline.rate_limit``); None: the gateway's
        FLOWLINE_RATE_LIMITS, if any.
    cache: response cache settings (the tag ``flowline.cache``); None: no cache.
    since: when this deployment became active (Unix seconds).
    """

    model: str
    version: str
    replicas: tuple[str, ...]
    input_example: dict[str, Any] | None = None
    signature: dict[str, Any] | None = None
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    timeout_s: float | None = None
    rate_limit: str | None = None
    cache: CacheSettings | None = None
    since: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if not self.model or "/" in self.model:
            raise ValueError("model name must be non-empty and contain no '/'")
        if not self.replicas:
            raise ValueError("a deployment needs at least one replica URL")
        object.__setattr__(self, "version", str(self.version))
        object.__setattr__(self, "replicas", tuple(u.rstrip("/") for u in self.replicas))
        for url in self.replicas:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"replica URL must be http(s): {url!r}")
        if self.timeout_s is not None:
            object.__setattr__(self, "timeout_s", parse_timeout(self.timeout_s))
        if self.rate_limit is not None:
            object.__setattr__(self, "rate_limit", parse_rate_limit(self.rate_limit))

    @property
    def label(self) -> str:
        """'name/version', the value of the X-Flowline-Model-Version header."""
        return f"{self.model}/{self.version}"

    def input_columns(self) -> list[dict[str, Any]] | None:
        """The signature's input column specs (decoded), or None."""
        return _decoded_spec(self.signature, "inputs")

    def output_spec(self) -> list[dict[str, Any]] | None:
        """The signature's output specs (decoded), or None."""
        return _decoded_spec(self.signature, "outputs")

    def params_spec(self) -> list[dict[str, Any]] | None:
        """The signature's params specs (decoded), or None."""
        return _decoded_spec(self.signature, "params")

    def to_dict(self) -> dict[str, Any]:
        """JSON form used by the admin API."""
        data = asdict(self)
        data["replicas"] = list(self.replicas)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], model: str | None = None) -> Deployment:
        """Parse the admin API's JSON; `model` (from the URL path) wins when given."""
        if not isinstance(data, dict):
            raise ValueError("deployment must be a JSON object")
        known = {
            "model",
            "version",
            "replicas",
            "input_example",
            "signature",
            "batching",
            "timeout_s",
            "rate_limit",
            "cache",
            "since",
        }
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown deployment fields: {sorted(unknown)}")
        name = model if model is not None else data.get("model")
        if data.get("model") not in (None, name):
            raise ValueError("'model' in the body differs from the model in the path")
        if "version" not in data or "replicas" not in data:
            raise ValueError("'version' and 'replicas' are required")
        replicas = data["replicas"]
        if not isinstance(replicas, list) or not all(isinstance(u, str) for u in replicas):
            raise ValueError("'replicas' must be a list of URLs")
        example = data.get("input_example")
        if example is not None and not isinstance(example, dict):
            raise ValueError("'input_example' must be a JSON object (a serving request body)")
        signature = data.get("signature")
        if signature is not None and not isinstance(signature, dict):
            raise ValueError("'signature' must be an object with inputs/outputs/params")
        since = data.get("since")
        return cls(
            model=str(name),
            version=str(data["version"]),
            replicas=tuple(replicas),
            input_example=example,
            signature=signature,
            batching=BatchingSettings.from_dict(data.get("batching")),
            timeout_s=data.get("timeout_s"),
            rate_limit=data.get("rate_limit"),
            cache=CacheSettings.from_dict(data.get("cache")),
            since=float(since) if since is not None else time.time(),
        )


CANARY = "canary"
SHADOW = "shadow"
ROLES = (CANARY, SHADOW)


@dataclass(frozen=True)
class Variant:
    """A second version of a model beside its production deployment.

    role: "canary" (answers `weight` percent of the model's requests; with `sticky`,
        the value of that request header decides, so one caller keeps one version)
        or "shadow" (gets a copy of a `sample` share of production's successful
        requests; its answers reach nobody).
    deployment: the version and its replicas, like a production deployment.
    share: the canary's weight (0-100) or the shadow's sample (0-1).
    """

    role: str
    deployment: Deployment
    share: float
    sticky: str | None = None

    def __post_init__(self) -> None:
        # The registry contract's checks, so a tag and the admin API refuse the same values.
        from common.registry import canary_weight, shadow_sample, sticky_header

        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, not {self.role!r}")
        check = canary_weight if self.role == CANARY else shadow_sample
        object.__setattr__(self, "share", check(self.share))
        if self.role == SHADOW and self.sticky is not None:
            raise ValueError("a shadow has no sticky header")
        object.__setattr__(self, "sticky", sticky_header(self.sticky))

    @property
    def model(self) -> str:
        """The registered model's name."""
        return self.deployment.model

    def same_as(self, other: Variant | None) -> bool:
        """Equal apart from when the deployment became active (idempotent puts)."""
        if other is None:
            return False
        mine = replace(self, deployment=replace(self.deployment, since=0))
        return mine == replace(other, deployment=replace(other.deployment, since=0))

    def to_dict(self) -> dict[str, Any]:
        """The admin API's JSON: {"deployment", "weight", "sticky"} or {"deployment", "sample"}."""
        if self.role == CANARY:
            return {
                "deployment": self.deployment.to_dict(),
                "weight": self.share,
                "sticky": self.sticky,
            }
        return {"deployment": self.deployment.to_dict(), "sample": self.share}

    @classmethod
    def from_dict(cls, role: str, data: Any, model: str | None = None) -> Variant:
        """Parse `to_dict`'s form for `role`; ValueError (a 400) when it is not that."""
        if not isinstance(data, dict):
            raise ValueError(f"a {role} must be a JSON object")
        share_key = "weight" if role == CANARY else "sample"
        known = {"deployment", share_key} | ({"sticky"} if role == CANARY else set())
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {role} fields: {sorted(unknown)}")
        if "deployment" not in data or (role == CANARY and share_key not in data):
            raise ValueError(f"a {role} needs 'deployment' and '{share_key}'")
        deployment = Deployment.from_dict(data["deployment"], model=model)
        return cls(role, deployment, data.get(share_key, 1.0), data.get("sticky"))


# The admin API header with which a coordinated controller says which published route
# generation (serving/coordination.py) a change makes.
GENERATION_HEADER = "X-Flowline-Generation"


@dataclass(frozen=True)
class RouteSnapshot:
    """What a restarted gateway needs to route as before: the active deployments, in the
    order they were first deployed, and the default model of `POST /invocations`."""

    deployments: tuple[Deployment, ...]
    default_model: str | None
    variants: tuple[Variant, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the route file)."""
        return {
            "default_model": self.default_model,
            "deployments": [d.to_dict() for d in self.deployments],
            "variants": [{"role": v.role, **v.to_dict()} for v in self.variants],
        }

    @classmethod
    def from_dict(cls, data: Any) -> RouteSnapshot:
        """Parse `to_dict`'s form; ValueError when it is not that."""
        if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
            raise ValueError("expected an object with a 'deployments' list")
        default = data.get("default_model")
        if default is not None and not isinstance(default, str):
            raise ValueError("'default_model' must be a string or null")
        # A route file written before canaries existed has no "variants": none, then.
        variants = data.get("variants", [])
        if not isinstance(variants, list) or not all(isinstance(v, dict) for v in variants):
            raise ValueError("'variants' must be a list of objects")
        parsed = tuple(
            Variant.from_dict(str(v.get("role")), {k: x for k, x in v.items() if k != "role"})
            for v in variants
        )
        deployments = tuple(Deployment.from_dict(d) for d in data["deployments"])
        return cls(deployments, default, parsed)


def parse_timeout(value: Any) -> float:
    """A per-model replica timeout in seconds: a positive, finite number (ValueError if not)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"'timeout_s' must be a number of seconds, not {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise ValueError(f"'timeout_s' must be a positive, finite number of seconds: {value!r}")
    return seconds


def parse_rate_limit(value: Any) -> str:
    """A rate limit: exactly one `limits` rate string ("50/second"), returned stripped
    (ValueError if not)."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"a rate limit must be a string like '50/second', not {value!r}")
    text = value.strip()
    if ";" in text or "," in text:
        raise ValueError(f"one rate limit expected (like '50/second'), got {value!r}")
    # Imported here: the contract module stays light for the controller and plugins.
    from limits import parse

    try:
        parse(text)
    except ValueError:
        raise ValueError(f"not a rate limit (like '50/second'): {value!r}") from None
    return text


def _decoded_spec(signature: dict[str, Any] | None, key: str) -> list[dict[str, Any]] | None:
    # MLmodel stores each part of the signature as a JSON string; accept both forms.
    # Plain JSON, not mlflow's ModelSignature (serving.model_metadata parses MLmodel with
    # it): the gateway calls this per request and imports no MLflow, and ColSpec would
    # drop the x-flowline-type annotation the OpenAPI page reads.
    if not signature:
        return None
    value = signature.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, list) else None
