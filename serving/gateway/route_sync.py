"""A coordinated gateway converges its route table to the published one by itself.

The active controller publishes the whole route table, with a generation, in the shared
database (``serving/coordination.py``) before it pushes each change to the gateways it
knows. This loop polls that table every ``route_sync_s`` and applies any newer
generation, so a gateway needs no push from a particular controller: one that starts
late, restarts, or missed a push serves the same routes within a second. Each poll is
also the gateway's heartbeat (its URL and applied generation), from which controllers
learn where to push and when every gateway has switched.

Pushes and polls never undo each other: both run on the event loop, a poll applies a
snapshot only when it is newer than what the table holds, and a push counts only when it
is the very next generation (``RouteTable.note_pushed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from serving.coordination import GATEWAY, CoordinationStore, Published
from serving.deployment import RouteSnapshot
from serving.gateway.routes import RouteTable

logger = logging.getLogger(__name__)


def apply_snapshot(table: RouteTable, snapshot: RouteSnapshot) -> bool:
    """Make ``table`` route exactly as ``snapshot`` says; True when anything changed.

    Each step is the admin API's own (idempotent) operation, so routes that did not
    change keep their replicas' health and in-flight counts, and a replaced route drains.
    """
    before = table.snapshot()
    wanted = {d.model for d in snapshot.deployments}
    for deployment in snapshot.deployments:
        table.set_active(deployment)
    for route in table.routes():
        if route.deployment.model not in wanted:
            table.remove(route.deployment.model)
    roles = {(v.model, v.role) for v in snapshot.variants}
    for variant in snapshot.variants:
        with contextlib.suppress(KeyError):  # a variant whose model is not routed
            table.set_variant(variant)
    for route in table.variants():
        if route.variant is not None and (route.variant.model, route.variant.role) not in roles:
            table.remove_variant(route.variant.model, route.variant.role)
    table.loaded = True
    return table.snapshot() != before


class RouteSync:
    """Polls the published routes, applies newer ones, and heartbeats this gateway."""

    def __init__(
        self,
        table: RouteTable,
        store: CoordinationStore,
        instance: str,
        url: str,
        interval_s: float,
    ) -> None:
        self.table = table
        self.store = store
        self.instance = instance
        self.url = url
        self.interval_s = interval_s
        self.failures = 0

    def _read(self) -> Published | None:
        # Runs on a worker thread: a database call must never block scoring.
        published = self.store.published(newer_than=self.table.generation)
        self.store.heartbeat(
            GATEWAY, self.instance, self.url, self.table.generation, self.interval_s
        )
        return published

    async def sync_once(self) -> bool:
        """One poll; True when a newer published table was applied."""
        try:
            published = await asyncio.to_thread(self._read)
        except Exception as exc:  # the database is away: serve on with what we have
            self.failures += 1
            if self.failures == 1 or self.failures % 60 == 0:
                logger.warning("route sync: %s", str(exc).splitlines()[0][:300])
            return False
        self.failures = 0
        # Back on the event loop, where pushes are applied: a push that landed while
        # the database answered may already have brought the table further.
        if published is None or published.generation <= self.table.generation:
            return False
        changed = apply_snapshot(self.table, published.snapshot)
        self.table.generation = published.generation
        if changed:
            logger.warning("applied published routes, generation %d", published.generation)
        return changed

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            await self.sync_once()

    def leave(self) -> None:
        """Remove this gateway's heartbeat (a clean stop): no controller waits for it."""
        with contextlib.suppress(Exception):
            self.store.leave(GATEWAY, self.instance)
