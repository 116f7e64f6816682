"""The ingest credential: a bearer token that the capture client sends and the monitor checks.

It is ``FLOWLINE_INGEST_TOKEN`` when that is set, else the secret kept in
``$FLOWLINE_HOME/ingest-token`` (mode 0600). The monitor creates that file on
first start, so a monitor never runs without a token (secure by default), and
the gateway's capture client, started by `flowline up` with the same
FLOWLINE_HOME, reads it from there: nothing has to be passed between them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from common import http_auth
from common.secrets import persistent_secret

TOKEN_ENV = "FLOWLINE_INGEST_TOKEN"
TOKEN_FILE = "ingest-token"


def _env(environ: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def monitor_token(home: Path, environ: Mapping[str, str] | None = None) -> str:
    """The token the monitor accepts: the variable, or the home's secret (created if missing)."""
    configured = _env(environ).get(TOKEN_ENV, "").strip()
    if configured:
        return configured
    return persistent_secret(home / TOKEN_FILE)


def client_token(home: Path, environ: Mapping[str, str] | None = None) -> str | None:
    """The token the capture client sends: the variable, or the home's secret; None if neither.

    The client only reads the file (the monitor owns it); it asks again on every
    refusal, so a monitor started after the gateway, or a new token, is picked up.
    """
    configured = _env(environ).get(TOKEN_ENV, "").strip()
    if configured:
        return configured
    try:
        return (home / TOKEN_FILE).read_text().strip() or None
    except OSError:
        return None


def bearer_matches(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``token``; see `common.http_auth.bearer_matches`."""
    return http_auth.bearer_matches(header, token)
