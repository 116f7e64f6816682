"""Verification of MLflow registry webhook deliveries (HMAC-SHA256, timestamp window, replay)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sqlite3
import threading
import time
from pathlib import Path

SIGNATURE_HEADER = "x-mlflow-signature"
DELIVERY_HEADER = "x-mlflow-delivery-id"
TIMESTAMP_HEADER = "x-mlflow-timestamp"
# MLflow retries a delivery for well under this; older or future-dated ones are refused.
MAX_SKEW_SECONDS = 300
# Seen delivery ids kept at most (a signed flood must not grow the file without bound).
MAX_SEEN = 100_000
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
    """Checks signature and freshness, and refuses a delivery id seen before.

    Seen ids are kept in a SQLite file (``seen_path``, mode 0600) so that a replay is
    refused after a controller restart too. Only ids inside the timestamp window need
    keeping: an older delivery fails the freshness check anyway. Only signed deliveries
    are recorded, so nobody without the secret can grow the file.
    """

    def __init__(
        self, secret: str, max_skew: float = MAX_SKEW_SECONDS, seen_path: Path | None = None
    ) -> None:
        self.secret = secret
        self.max_skew = max_skew
        self._lock = threading.Lock()
        if seen_path is not None:
            seen_path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(seen_path, os.O_CREAT | os.O_WRONLY, 0o600))
            seen_path.chmod(0o600)
        self._db = sqlite3.connect(
            str(seen_path) if seen_path else ":memory:", check_same_thread=False
        )
        with self._db:
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS seen (delivery_id TEXT PRIMARY KEY, at REAL NOT NULL)"
            )

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
        if not abs(now - sent) <= self.max_skew:  # also refuses nan
            raise WebhookRejected(401, "webhook timestamp outside the accepted window")
        with self._lock, self._db:
            # Ids older than the window can be forgotten: their timestamps fail above.
            self._db.execute("DELETE FROM seen WHERE at < ?", (now - self.max_skew,))
            try:
                self._db.execute("INSERT INTO seen VALUES (?, ?)", (delivery, now))
            except sqlite3.IntegrityError:
                raise WebhookRejected(409, "webhook delivery already received (replay)") from None
            # A hard bound as well, should a flood of signed deliveries ever arrive.
            self._db.execute(
                "DELETE FROM seen WHERE delivery_id IN (SELECT delivery_id FROM seen "
                "ORDER BY at DESC LIMIT -1 OFFSET ?)",
                (MAX_SEEN,),
            )
