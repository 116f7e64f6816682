"""Which version answers a request when a model has a canary: the weighted split.

A canary with weight W takes W percent of the model's requests, drawn fairly at random
(`random.random()`) for each request. With a sticky header named in its settings and
present on the request, the header's value is hashed instead (SHA-256, the first 8
bytes as a fraction of 2**64): one caller always lands on one version, and callers
spread over the versions in the same W : 100 - W proportion. A request pinned to a
version (the V2 protocol's `/versions/{v}` paths) goes to that version when it is the
production or the canary one. Pure functions, no I/O: `RouteTable.admit` calls the
chooser under its lock.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping

from serving.gateway.routes import Choose, ModelRoute

Draw = Callable[[], float]


def bucket(value: str) -> float:
    """A stable fraction in [0, 1) for `value` (the same in every gateway process)."""
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def takes_canary(weight: float, sticky_value: str | None, draw: Draw = random.random) -> bool:
    """Whether one request goes to a canary of `weight` percent."""
    if weight <= 0:
        return False
    if weight >= 100:
        return True
    point = bucket(sticky_value) if sticky_value is not None else draw()
    return point * 100 < weight


def chooser(
    version: str | None, headers: Mapping[str, str] | None, draw: Draw = random.random
) -> Choose:
    """The `choose(production, canary)` of one request: pinned to `version` when given,
    else the weighted (or sticky) split."""

    def choose(production: ModelRoute, canary: ModelRoute) -> ModelRoute:
        if version is not None:
            return canary if canary.deployment.version == version else production
        variant = canary.variant
        if variant is None:  # not a canary route: nothing to split
            return production
        sticky = None
        if variant.sticky is not None and headers is not None:
            sticky = headers.get(variant.sticky)
        return canary if takes_canary(variant.share, sticky, draw) else production

    return choose
