"""The gateway's opt-in response cache: identical requests to one model version, answered once.

A model opts in with its registered-model tag ``flowline.cache``
(``{"ttl_s": 60, "max_entries": 10000}``, carried in `Deployment.cache`). The key is
the model, the version and the SHA-256 of the canonical body: a JSON body parsed and
re-serialised with sorted keys and no spaces (so key order and whitespace do not
matter), any other body as its raw bytes together with its content type. The version
in the key means a promotion never serves the previous version's answer. Only 200
answers are stored.

In process the store is a bounded LRU with a TTL per model; with FLOWLINE_REDIS_URL it
is Redis (``SET key value EX ttl`` under ``<prefix>cache:``), shared by every gateway
process, where `max_entries` is left to Redis' own eviction policy. A Redis error skips
the cache (counted, logged at most every few seconds; Redis is not asked again for a
second): scoring never fails because of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serving.deployment import CacheSettings
from serving.gateway.store_backoff import REDIS_TIMEOUT_S, StoreBackoff
from serving.gateway.wire import is_json_content_type

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedAnswer:
    """A stored 200 answer: its body and content type."""

    body: bytes
    content_type: str | None

    def encode(self) -> bytes:
        """`content-type\\n` + body, the value stored in Redis."""
        return (self.content_type or "").encode() + b"\n" + self.body

    @classmethod
    def decode(cls, raw: bytes) -> CachedAnswer:
        """The inverse of `encode`."""
        content_type, _, body = raw.partition(b"\n")
        return cls(body, content_type.decode() or None)


def body_digest(body: bytes, content_type: str | None) -> str:
    """SHA-256 of the canonical body (sorted-key compact JSON, else raw bytes + type)."""
    if is_json_content_type(content_type):
        try:
            canonical = json.dumps(
                json.loads(body), sort_keys=True, separators=(",", ":"), allow_nan=True
            ).encode()
            return hashlib.sha256(b"json\0" + canonical).hexdigest()
        except (ValueError, UnicodeDecodeError, RecursionError):
            pass  # not valid JSON: the raw bytes are the key
    mime = (content_type or "").split(";")[0].strip().lower()
    return hashlib.sha256(mime.encode() + b"\0" + body).hexdigest()


class LruTtl:
    """A bounded least-recently-used map whose entries expire after their TTL."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> CachedAnswer | None:
        """The live entry (now most recently used), or None (an expired one is dropped)."""
        found = self._items.get(key)
        if found is None:
            return None
        expires, answer = found
        if time.monotonic() >= expires:
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return answer

    def put(self, key: str, answer: CachedAnswer, ttl_s: float) -> None:
        """Store `answer` for `ttl_s` seconds, evicting the least recently used beyond the bound."""
        self._items[key] = (time.monotonic() + ttl_s, answer)
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)


class ResponseCache:
    """Per-model answer caches, in memory or in Redis."""

    def __init__(
        self,
        redis_url: str | None = None,
        prefix: str = "flowline:",
        on_store_error: Callable[[], None] | None = None,
    ) -> None:
        self.shared = redis_url is not None
        self._redis_url = redis_url
        self._prefix = f"{prefix}cache:"
        self._backoff = StoreBackoff(
            logger, "response cache store failed, skipping the cache", on_store_error
        )
        self._local: dict[str, LruTtl] = {}
        self._redis: Any = None

    def key(self, model: str, version: str, body: bytes, content_type: str | None) -> str:
        """The cache key of one request to one model version."""
        return f"{self._prefix}{model}:{version}:{body_digest(body, content_type)}"

    async def get(self, model: str, key: str, settings: CacheSettings) -> CachedAnswer | None:
        """The stored answer for `key`, or None (also when the store is failing)."""
        if not self.shared:
            return self._store(model, settings).get(key)
        client = self._client()
        if client is None:
            return None
        try:
            raw = await client.get(key)
        except Exception as exc:
            self._backoff.failed(exc)
            return None
        return CachedAnswer.decode(raw) if raw is not None else None

    async def put(
        self, model: str, key: str, answer: CachedAnswer, settings: CacheSettings
    ) -> None:
        """Store `answer` under `key` for the model's TTL (failures only counted)."""
        if not self.shared:
            self._store(model, settings).put(key, answer, settings.ttl_s)
            return
        client = self._client()
        if client is None:
            return
        try:
            await client.set(key, answer.encode(), ex=max(1, math.ceil(settings.ttl_s)))
        except Exception as exc:
            self._backoff.failed(exc)

    def _store(self, model: str, settings: CacheSettings) -> LruTtl:
        store = self._local.get(model)
        if store is None:
            store = self._local[model] = LruTtl(settings.max_entries)
        store.max_entries = settings.max_entries
        return store

    def _client(self) -> Any:
        if not self._backoff.available():
            return None
        if self._redis is None:
            import redis.asyncio

            self._redis = redis.asyncio.Redis.from_url(
                self._redis_url,
                socket_connect_timeout=REDIS_TIMEOUT_S,
                socket_timeout=REDIS_TIMEOUT_S,
            )
        return self._redis

    async def aclose(self) -> None:
        """Close the Redis connection, if any."""
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
