"""What a controller does as it wins, loses or hands over leadership.

Winning: forget whatever it knew, start from the routes the last leader published,
adopt the replicas that run (by their labels, pid files or containers: the backend's
``adopt_running``), point the registry's webhook at itself, and reconcile at once.
Losing: forget, without stopping anything: the new leader adopts those replicas.
Stopping: a controller with a live peer leaves its replicas for the peer to adopt; the
last controller to stop stops them all, those it never adopted included.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from serving.backends.base import Backend
from serving.controller.gateway_fleet import GatewayFleet
from serving.controller.leader import Election
from serving.controller.reconciler import Reconciler
from serving.coordination import CONTROLLER, CoordinationStore

log = logging.getLogger("flowline.controller")


class Leadership:
    """Ties an election to the reconcile loop; ``act()`` is called before every pass."""

    def __init__(
        self,
        election: Election,
        reconciler: Reconciler,
        backend: Backend,
        *,
        store: CoordinationStore | None = None,
        fleet: GatewayFleet | None = None,
        url: str = "",
        on_elected: list[Callable[[], None]] | None = None,
    ) -> None:
        self.election = election
        self.reconciler = reconciler
        self.backend = backend
        self.store = store
        self.fleet = fleet
        self.url = url
        self.on_elected = on_elected or []
        self.active = False
        self.took_over_s: float | None = None
        self.wake: Callable[[], None] = lambda: None
        election.on_change = lambda _leading: self.wake()
        election.on_round = self._heartbeat

    def _heartbeat(self) -> None:
        # Peers learn this controller is alive (a stopping leader hands over only then).
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.heartbeat(
                    CONTROLLER, self.election.identity, self.url, 0, self.election.poll_s
                )

    def act(self) -> bool:
        """Take over or hand back as the election says; True when this controller acts."""
        leading = self.election.leading.is_set()
        if leading and not self.active:
            self._take_over()
        elif not leading and self.active:
            log.warning("handing over: no longer reconciling")
            self.reconciler.forget()
            self.active = False
        return self.active

    def _take_over(self) -> None:
        started = time.monotonic()
        self.reconciler.forget()
        if self.fleet is not None:
            self.fleet.load()
        self.reconciler.adopt(self.backend.adopt_running())
        for hook in self.on_elected:
            hook()
        self.active = True
        self.took_over_s = time.monotonic() - started
        log.warning("took over as leader in %.2fs", self.took_over_s)

    def step_down(self) -> None:
        """At shutdown: hand the replicas to a live peer, or stop them as the last one."""
        peers = self._peers()
        self.election.stop(resign=True)
        if peers:
            log.warning("leaving the replicas to %s", ", ".join(peers))
            self.reconciler.forget()
        else:
            self.reconciler.stop_all()
            for replica in self.backend.adopt_running():  # a leader's we never adopted
                self.backend.stop_replica(replica)
        if self.store is not None:
            with contextlib.suppress(Exception):
                self.store.leave(CONTROLLER, self.election.identity)

    def _peers(self) -> list[str]:
        if self.store is None:
            return []
        try:
            members = self.store.members(CONTROLLER)
        except Exception:  # the database is away: assume alone, and stop what we run
            return []
        return [m.instance for m in members if m.instance != self.election.identity]

    def describe(self) -> dict[str, Any]:
        """For /status: who this is, whether it leads, since when."""
        return {
            "identity": self.election.identity,
            "leader": self.active,
            "since": self.election.since,
            "took_over_s": self.took_over_s,
        }
