"""Fail open on a shared store (Redis): skip it for a while after an error, log rarely.

The rate limiter and the response cache both keep their state in Redis when several
gateways share it. A Redis outage must never fail or slow scoring, so after an error
each skips its store for `STORE_BACKOFF_S` (a dead host would otherwise cost a timeout
per request), counts the failure and logs it at most every `LOG_EVERY_S`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

# After a Redis error, skip Redis for this long before trying it again.
STORE_BACKOFF_S = 1.0
# Longest a Redis call may take; connecting to a dead host must not stall scoring.
REDIS_TIMEOUT_S = 0.5
LOG_EVERY_S = 10.0


class StoreBackoff:
    """When a store may be asked again, and the bookkeeping of its failures."""

    def __init__(
        self, logger: logging.Logger, what: str, on_error: Callable[[], None] | None = None
    ) -> None:
        """``what`` ends the log line: "rate limit store failed, <what>: <error>"."""
        self._logger = logger
        self._what = what
        self._on_error = on_error or (lambda: None)
        self._down_until = 0.0
        self._logged_at = 0.0

    def available(self, now: float | None = None) -> bool:
        """Whether the store may be asked now (not within the back-off after an error)."""
        return (time.monotonic() if now is None else now) >= self._down_until

    def failed(self, exc: Exception, now: float | None = None) -> None:
        """Record a failure: back off, count it, and log it unless logged just now."""
        now = time.monotonic() if now is None else now
        self._down_until = now + STORE_BACKOFF_S
        self._on_error()
        if now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            self._logger.warning("%s: %s", self._what, exc)
