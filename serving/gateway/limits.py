"""Per-key, per-model rate limits of the gateway, in process or shared through Redis.

A limit is a `limits` rate string ("100/second", "20/2 seconds"); the gateway-wide
default is FLOWLINE_RATE_LIMITS and a model may override it with its registered-model
tag ``flowline.rate_limit`` (carried in `Deployment.rate_limit`). The budget belongs to
one (model, API key) pair: the key is the SHA-256 of the caller's bearer token (the raw
key is never stored or sent to Redis), or "anonymous" when keys are off.

The strategy is `limits`' moving window: at most N requests in any window of the
given length, counted exactly (a timestamp per accepted request). A client may spend
its whole budget at once, so the burst is the limit itself, and it never gets twice
the budget across a window boundary as with a fixed window. Retry-After is when the
oldest request in the window leaves it.

With FLOWLINE_REDIS_URL the windows live in Redis, so every gateway process shares one
budget. A Redis error fails open: the request is let through, the error is counted and
logged (at most every few seconds), and Redis is not asked again for a second, so an
outage costs no latency per request.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter

from serving import deployment
from serving.gateway.store_backoff import REDIS_TIMEOUT_S, StoreBackoff

logger = logging.getLogger(__name__)

ANONYMOUS = "anonymous"


def parse_rate_limit(value: str) -> RateLimitItem:
    """A `limits` rate string ("100/second") as an item; ValueError when it is not one.

    Exactly one limit: "a/second;b/minute" is refused, so the budget is one number.
    """
    return parse(deployment.parse_rate_limit(value))


def key_id(api_key: str | None) -> str:
    """The identity a budget belongs to: a SHA-256 prefix of the key, or 'anonymous'."""
    if api_key is None:
        return ANONYMOUS
    return hashlib.sha256(api_key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Verdict:
    """The limiter's answer: allowed, or refused with the seconds until the window frees."""

    allowed: bool
    retry_after_s: int = 0


ALLOWED = Verdict(True)


class RateLimiter:
    """Moving-window budgets per (model, key) in memory or in Redis, failing open."""

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str = "flowline:",
        on_store_error: Callable[[], None] | None = None,
    ) -> None:
        self.shared = redis_url is not None
        self._prefix = prefix
        self._redis_url = redis_url
        self._backoff = StoreBackoff(
            logger, "rate limit store failed, letting requests through", on_store_error
        )
        self._storage: Storage | None = None
        self._strategy: MovingWindowRateLimiter | None = None

    def _limiter(self) -> MovingWindowRateLimiter:
        # Built on first use, inside the event loop (the storages bind to it).
        if self._strategy is None:
            if self._redis_url is None:
                self._storage = MemoryStorage()
            else:
                self._storage = RedisStorage(
                    _async_uri(self._redis_url),
                    implementation="redispy",
                    key_prefix=f"{self._prefix}limit",
                    socket_connect_timeout=REDIS_TIMEOUT_S,
                    socket_timeout=REDIS_TIMEOUT_S,
                )
            self._strategy = MovingWindowRateLimiter(self._storage)
        return self._strategy

    async def check(self, item: RateLimitItem, model: str, identity: str) -> Verdict:
        """Spend one request of `identity`'s budget for `model`; refused: seconds to wait."""
        now = time.monotonic()
        if not self._backoff.available(now):
            return ALLOWED
        try:
            limiter = self._limiter()
            if await limiter.hit(item, model, identity):
                return ALLOWED
            stats = await limiter.get_window_stats(item, model, identity)
        except Exception as exc:  # any store failure: fail open
            self._backoff.failed(exc, now)
            return ALLOWED
        return Verdict(False, max(1, math.ceil(stats.reset_time - time.time())))


@lru_cache(maxsize=256)
def cached_item(value: str) -> RateLimitItem:
    """`parse_rate_limit`, remembered (per-request lookups of a deployment's limit)."""
    return parse_rate_limit(value)


def _async_uri(url: str) -> str:
    # limits picks its asyncio storages by the "async+" scheme prefix.
    return url if url.startswith("async+") else f"async+{url}"
