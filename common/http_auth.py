"""Bearer-token checks shared by the gateway (API keys, admin token) and the monitor (ingest).

Pure functions on the ``Authorization`` header's value, so every runtime can use
them without a web framework; each caller keeps its own 401 body, and builds its
``WWW-Authenticate`` header with `challenge`.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

SCHEME = "bearer"


def bearer_token(authorization: str | None) -> str | None:
    """The token of ``Authorization: Bearer <token>`` (scheme in any case), else None.

    Surrounding whitespace is dropped; an empty token is None.
    """
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != SCHEME:
        return None
    return token.strip() or None


def bearer_matches(authorization: str | None, accepted: str | Iterable[str]) -> bool:
    """Whether the header carries `accepted` (one token) or one of `accepted` (several).

    Constant-time: the candidate is compared with every accepted token, so neither
    the timing of one comparison nor which token nearly matched leaks. Empty
    accepted tokens never match, and neither does a missing or empty credential.
    """
    token = bearer_token(authorization)
    if token is None:
        return False
    candidate = token.encode()
    keys = (accepted,) if isinstance(accepted, str) else accepted
    matched = False
    for key in keys:
        # `|=` instead of `any()`: no early exit, every key costs the same.
        matched |= bool(key) and hmac.compare_digest(candidate, key.encode())
    return matched


def challenge(realm: str | None = None) -> dict[str, str]:
    """The ``WWW-Authenticate`` header a 401 answer carries (RFC 6750 section 3)."""
    return {"WWW-Authenticate": "Bearer" if realm is None else f'Bearer realm="{realm}"'}
