"""Verification of MLflow registry webhook deliveries (HMAC-SHA256, timestamp window, replay)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import threading
import time
from collections import OrderedDict

SIGNATURE_HEADER = "x-mlflow-signature"
DELIVERY_HEADER = "x-mlflow-delivery-id"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
# MLflow retries a delivery for well under this; older or future-dated ones are refused.
MAX_SKEW_SECONDS = 300
ALIAS_EVENTS = ("model_version_alias.created", "model_version_alias.deleted")


class WebhookRejected(Exception):
    """A delivery that must not be acted on; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature: ``v1,`` + base64 HMAC-SHA256 of ``{id}.{timestamp}.{body}``."""
    content = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookVerifier:
    """Checks signature and freshness, and refuses a delivery id seen before."""

    def __init__(self, secret: str, max_skew: float = MAX_SKEW_SECONDS) -> None:
        self.secret = secret
        self.max_skew = max_skew
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, headers: dict[str, str], body: bytes, now: float | None = None) -> None:
        """Raise WebhookRejected unless the delivery is authentic, fresh and new."""
        now = time.time() if now is None else now
        delivery = headers.get(DELIVERY_HEADER, "")
        stamp = headers.get(TIMESTAMP_HEADER, "")
        given = headers.get(SIGNATURE_HEADER, "")
        if not (delivery and stamp and given):
            raise WebhookRejected(401, "missing webhook signature headers")
        expected = signature(self.secret, delivery, stamp, body)
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise WebhookRejected(401, "invalid webhook signature")
        try:
            sent = float(stamp)
        except ValueError:
            raise WebhookRejected(400, "malformed webhook timestamp") from None
        if abs(now - sent) > self.max_skew:
            raise WebhookRejected(401, "webhook timestamp outside the accepted window")
        with self._lock:
            # Ids older than the window can be forgotten: their timestamps fail above.
            while self._seen and next(iter(self._seen.values())) < now - self.max_skew:
                self._seen.popitem(last=False)
            if delivery in self._seen:
                raise WebhookRejected(409, "webhook delivery already received (replay)")
            self._seen[delivery] = now
