"""What the gateway serves, and waiting until a promotion (or a removal) shows there.

A promotion is done once the gateway's public ``GET /models`` lists the version: that is
what a client will get, whatever the controller thinks. Used by ``flowline demo`` and by
the ``mlflow deployments -t flowline`` target.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import requests


def served_models(gateway: str, timeout: float) -> dict[str, dict[str, Any]]:
    """``GET {gateway}/models`` as {model name: its description}.

    Raises requests.RequestException (no answer), ValueError (not JSON) or KeyError
    (not the gateway's shape); the caller decides which of those mean "not yet".
    """
    models = requests.get(f"{gateway}/models", timeout=timeout).json()["models"]
    return {m["name"]: m for m in models}


def wait_until_served(
    served: Callable[[], dict[str, dict[str, Any]]],
    name: str,
    version: str | None,
    timeout: float,
    interval: float,
    *,
    retry_on: tuple[type[Exception], ...] = (),
    check: Callable[[], None] | None = None,
) -> dict[str, Any] | None:
    """Poll ``served()`` until ``name`` serves ``version`` (None: until it is not served).

    Returns the model's description (None when waiting for its removal). An exception in
    ``retry_on`` from ``served()`` counts as "not yet"; any other propagates. ``check``
    runs after each poll that did not find the state, and raises to stop waiting (a
    rollout the controller marked failed will never serve). Raises TimeoutError after
    ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            current = served().get(name)
        except retry_on:
            pass
        else:
            if version is None and current is None:
                return None
            if version is not None and current and str(current.get("version")) == version:
                return current
        if check is not None:
            check()
        time.sleep(interval)
    raise TimeoutError(f"{name} did not reach the requested state within {timeout:.0f}s")
