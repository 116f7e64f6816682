"""The shadow: a copy of production's requests, scored by another version, answered to nobody.

Contract:
- only requests production answered with 200 (and not from the cache) are mirrored, a
  `sample` share of them, drawn with `random.random()`;
- the mirror runs as an asyncio task after the caller's answer is made: it adds no
  latency to the caller, and its answer, error or timeout never reaches the caller;
- at most `max_inflight` mirrors run at once; beyond that a mirror is dropped and
  counted (`outcome="dropped"`), so a slow shadow can never pile up memory or tasks;
- each shadow answer is compared with production's, row by row: a float on both sides
  is a regression output and adds its absolute difference; anything else (a label, a
  dict of probabilities) counts as equal or not. The counts are Prometheus metrics
  (`flowline_gateway_shadow_*`) and the `shadow` block of `GET /models`;
- shadow answers are not captured as traffic (the monitor sees what callers got).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from serving.gateway.batching import Outcome
from serving.gateway.config import DEFAULT_SHADOW_MAX_INFLIGHT
from serving.gateway.metrics import GatewayMetrics
from serving.gateway.routes import ModelRoute, RouteTable

logger = logging.getLogger(__name__)

Dispatch = Callable[[ModelRoute, bytes, str | None], Awaitable[Outcome]]


@dataclass
class Comparison:
    """Rows compared between production's and the shadow's predictions."""

    label_rows: int = 0
    equal_rows: int = 0
    numeric_rows: int = 0
    abs_diff: float = 0.0


def compare(production: list[Any], shadow: list[Any]) -> Comparison:
    """Row-by-row agreement of two prediction lists of the same length."""
    result = Comparison()
    for ours, theirs in zip(production, shadow, strict=True):
        # Only floats are regression outputs: a classifier's 0/1 labels are ints.
        if type(ours) is float and type(theirs) is float:
            result.numeric_rows += 1
            result.abs_diff += abs(ours - theirs)
        else:
            result.label_rows += 1
            result.equal_rows += ours == theirs
    return result


def predictions_of(body: bytes) -> list[Any] | None:
    """The `predictions` list of a stock scorer's JSON answer, or None."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    found = payload.get("predictions") if isinstance(payload, dict) else payload
    return found if isinstance(found, list) else None


@dataclass
class ShadowStats:
    """What one shadow version has done so far (this gateway process)."""

    mirrored: int = 0
    errors: int = 0
    dropped: int = 0
    compared: Comparison | None = None

    def to_dict(self) -> dict[str, Any]:
        """The counters of `GET /models`' shadow block."""
        c = self.compared or Comparison()
        return {
            "mirrored": self.mirrored,
            "errors": self.errors,
            "dropped": self.dropped,
            "compared_rows": c.label_rows + c.numeric_rows,
            "agreement": c.equal_rows / c.label_rows if c.label_rows else None,
            "mean_abs_diff": c.abs_diff / c.numeric_rows if c.numeric_rows else None,
        }


class ShadowMirror:
    """Starts, bounds and accounts for the mirrored calls of every model's shadow."""

    def __init__(
        self,
        table: RouteTable,
        dispatch: Dispatch,
        metrics: GatewayMetrics,
        max_inflight: int = DEFAULT_SHADOW_MAX_INFLIGHT,
    ) -> None:
        self.table = table
        self.dispatch = dispatch
        self.metrics = metrics
        self.max_inflight = max_inflight
        self._tasks: set[asyncio.Task[None]] = set()
        self._stats: dict[tuple[str, str], ShadowStats] = {}
        metrics.registry.register(_AgreementCollector(self._stats))

    def stats(self, model: str, version: str) -> ShadowStats:
        """The counters of one shadow version (created empty)."""
        return self._stats.setdefault((model, version), ShadowStats())

    def offer(self, model: str, body: bytes, content_type: str | None, answer: bytes) -> None:
        """Mirror one request production answered with `answer` to the model's shadow,
        if it has one and the sample draws it. Never raises, never waits."""
        route = self.table.variant(model, "shadow")
        if route is None or route.variant is None:
            return
        if route.variant.share < 1.0 and random.random() >= route.variant.share:
            return
        version = route.deployment.version
        if len(self._tasks) >= self.max_inflight:
            self.stats(model, version).dropped += 1
            self.metrics.shadow_requests.labels(model, version, "dropped").inc()
            return
        admitted = self.table.admit_variant(model, "shadow")
        if admitted is None:
            return
        task = asyncio.get_running_loop().create_task(
            self._mirror(admitted, body, content_type, answer)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _mirror(
        self, route: ModelRoute, body: bytes, content_type: str | None, answer: bytes
    ) -> None:
        d = route.deployment
        stats = self.stats(d.model, d.version)
        started = time.perf_counter()
        try:
            outcome = await self.dispatch(route, body, content_type)
        except Exception:  # the caller has its answer; a shadow bug must stay here
            logger.exception("shadow call to %s failed", d.label)
            outcome = Outcome(500, b"", None, True)
        finally:
            self.table.release(route)
        self.metrics.shadow_seconds.labels(d.model, d.version).observe(
            time.perf_counter() - started
        )
        result = self._outcome(outcome, answer, stats, (d.model, d.version))
        self.metrics.shadow_requests.labels(d.model, d.version, result).inc()

    def _outcome(
        self, outcome: Outcome, answer: bytes, stats: ShadowStats, labels: tuple[str, str]
    ) -> str:
        if outcome.status != 200:
            stats.errors += 1
            return "timeout" if outcome.status == 504 else "error"
        theirs = outcome.predictions or predictions_of(outcome.body)
        ours = predictions_of(answer)
        if theirs is None or ours is None or len(theirs) != len(ours):
            stats.errors += 1
            return "mismatch"
        stats.mirrored += 1
        found = compare(ours, theirs)
        total = stats.compared or Comparison()
        total.label_rows += found.label_rows
        total.equal_rows += found.equal_rows
        total.numeric_rows += found.numeric_rows
        total.abs_diff += found.abs_diff
        stats.compared = total
        rows = self.metrics.shadow_rows
        rows.labels(*labels, "equal").inc(found.equal_rows)
        rows.labels(*labels, "different").inc(found.label_rows - found.equal_rows)
        rows.labels(*labels, "numeric").inc(found.numeric_rows)
        self.metrics.shadow_abs_diff.labels(*labels).inc(found.abs_diff)
        return "ok"

    async def aclose(self) -> None:
        """Cancel mirrors still running (at shutdown: nobody waits for their answers)."""
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _AgreementCollector(Collector):
    """Agreement and mean absolute difference per shadow version, read at scrape time."""

    def __init__(self, stats: dict[tuple[str, str], ShadowStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        agreement = GaugeMetricFamily(
            "flowline_gateway_shadow_agreement",
            "Share of label predictions on which the shadow agreed with production.",
            labels=["model", "version"],
        )
        diff = GaugeMetricFamily(
            "flowline_gateway_shadow_mean_abs_diff",
            "Mean absolute difference of the shadow's numeric predictions from production's.",
            labels=["model", "version"],
        )
        for (model, version), stats in list(self._stats.items()):
            shown = stats.to_dict()
            if shown["agreement"] is not None:
                agreement.add_metric([model, version], shown["agreement"])
            if shown["mean_abs_diff"] is not None:
                diff.add_metric([model, version], shown["mean_abs_diff"])
        yield agreement
        yield diff
