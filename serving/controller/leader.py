"""Leader election: exactly one controller acts; the others wait to take over.

Three electors behind one protocol (``try_lead``: become or stay leader, True while so):

- ``AdvisoryLockElector`` (PostgreSQL): ``pg_try_advisory_lock`` on a connection held
  for as long as this controller leads. A leader that dies, ``kill -9`` included, closes
  its connection and PostgreSQL frees the lock at once, so a follower polling every
  quarter interval takes over within well under one interval.
- ``LeaseElector`` (SQLite, one host): a lease row with an expiry, renewed every
  quarter interval and taken over once expired (one interval after a leader's last
  renewal): the same guarantee without a lock that outlives its holder's connection.
- ``KubernetesLeaseElector`` (``serving/controller/leader_k8s.py``): a
  ``coordination.k8s.io/v1`` Lease, as Kubernetes' own controllers elect.

``Election`` runs the elector on a thread of its own, so a leader renews its claim even
while a long rollout holds the reconcile loop.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from common.db import advisory_key
from common.processes import pid_running
from serving.coordination import CoordinationStore, leases

log = logging.getLogger("flowline.controller")
LEADER_LEASE = "flowline-controller"


class Elector(Protocol):
    """One way to hold the controllers' leadership."""

    identity: str

    def try_lead(self) -> bool:
        """Become or stay the leader; True while this instance leads."""
        ...

    def resign(self) -> None:
        """Give leadership up now (a clean stop), so a follower need not wait."""
        ...


class AlwaysLeader:
    """One controller and no shared database: it always leads (the single-host default)."""

    def __init__(self, identity: str = "only") -> None:
        self.identity = identity

    def try_lead(self) -> bool:
        """Always True."""
        return True

    def resign(self) -> None:
        """Nothing to give up."""


class AdvisoryLockElector:
    """PostgreSQL: a session advisory lock on a connection kept open while leading."""

    def __init__(self, store: CoordinationStore, identity: str, name: str = LEADER_LEASE) -> None:
        self.store = store
        self.identity = identity
        self.key = advisory_key(name)
        self._conn: Any = None

    def try_lead(self) -> bool:
        """Take the lock if free; while held, check its connection still lives."""
        try:
            if self._conn is not None:
                self._conn.execute(text("SELECT 1"))
                self._conn.commit()
                return True
            conn = self.store.engine.connect()
            got = conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.key}).scalar()
            conn.commit()  # the lock is the session's: no transaction left open
            if got:
                self._conn = conn
                return True
            conn.close()
            return False
        except SQLAlchemyError as exc:
            # The connection (and with it the lock) is gone: a follower may lead by now.
            log.warning("leader lock lost: %s", str(exc).splitlines()[0][:200])
            self._drop()
            return False

    def resign(self) -> None:
        """Unlock and close the connection."""
        if self._conn is None:
            return
        try:
            self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.commit()
        except SQLAlchemyError:
            pass  # closing the connection frees the lock anyway
        self._drop()

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()  # never back into the pool: it may still hold the lock
            except SQLAlchemyError:
                pass


class LeaseElector:
    """A lease row with an expiry: the holder renews, anyone takes it once expired."""

    def __init__(
        self, store: CoordinationStore, identity: str, ttl_s: float, name: str = LEADER_LEASE
    ) -> None:
        self.store = store
        self.identity = identity
        self.ttl_s = ttl_s
        self.name = name

    def try_lead(self) -> bool:
        """Renew our lease, or take one that expired; False when another holds it."""
        now = time.time()
        try:
            with self.store.engine.begin() as conn:
                mine = leases.c.holder == self.identity
                taken = conn.execute(
                    update(leases)
                    .where(leases.c.name == self.name, mine | (leases.c.expires_at < now))
                    .values(holder=self.identity, expires_at=now + self.ttl_s)
                ).rowcount
                if taken:
                    return True
                holder = conn.execute(
                    select(leases.c.holder).where(leases.c.name == self.name)
                ).scalar()
                if holder is not None:
                    if not holder_is_dead(holder):
                        return False
                    # Its process is gone (same host): no need to wait for the expiry.
                    taken = conn.execute(
                        update(leases)
                        .where(leases.c.name == self.name, leases.c.holder == holder)
                        .values(holder=self.identity, expires_at=now + self.ttl_s)
                    ).rowcount
                    return bool(taken)
                conn.execute(
                    insert(leases).values(
                        name=self.name, holder=self.identity, expires_at=now + self.ttl_s
                    )
                )
                return True
        except IntegrityError:
            return False  # another controller created the lease first
        except SQLAlchemyError as exc:
            # Cannot renew: stop acting now rather than risk two leaders.
            log.warning("leader lease not renewed: %s", str(exc).splitlines()[0][:200])
            return False

    def resign(self) -> None:
        """Expire our lease at once."""
        try:
            with self.store.engine.begin() as conn:
                conn.execute(
                    update(leases)
                    .where(leases.c.name == self.name, leases.c.holder == self.identity)
                    .values(expires_at=0.0)
                )
        except SQLAlchemyError:
            pass  # it expires by itself within its TTL


def holder_is_dead(holder: str) -> bool:
    """True when ``holder`` (an ``instance_id``) ran on this host under a pid now gone.

    A lease holder on another host, or one whose name says nothing, is never judged:
    only its lease's expiry frees it.
    """
    try:
        rest, pid_text, _random = holder.rsplit("-", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if not rest.endswith(f"-{socket.gethostname()}") or pid == os.getpid():
        return False
    return not pid_running(pid)


def sql_elector(store: CoordinationStore, identity: str, interval_s: float) -> Elector:
    """The SQL database's elector: an advisory lock on PostgreSQL, a lease on SQLite."""
    if store.dialect == "postgresql":
        return AdvisoryLockElector(store, identity)
    return LeaseElector(store, identity, ttl_s=interval_s)


class Election:
    """Runs an elector every ``poll_s`` on its own thread and reports changes.

    ``on_change(leading)`` is called from that thread when leadership is won or lost.
    """

    def __init__(
        self,
        elector: Elector,
        poll_s: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.elector = elector
        self.poll_s = poll_s
        self.on_change = on_change
        # Called after every round (the controller's heartbeat); errors are its own.
        self.on_round: Callable[[], None] | None = None
        self.leading = threading.Event()
        self.since: float | None = None
        self.last_check: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def identity(self) -> str:
        """This instance's name in the election."""
        return self.elector.identity

    def check(self) -> bool:
        """One election round now; True while leading."""
        leading = self.elector.try_lead()
        self.last_check = time.time()
        if self.on_round is not None:
            self.on_round()
        if leading != self.leading.is_set():
            if leading:
                self.since = time.time()
                self.leading.set()
                log.warning("%s is now the leader", self.identity)
            else:
                self.since = None
                self.leading.clear()
                log.warning("%s is no longer the leader", self.identity)
            if self.on_change is not None:
                self.on_change(leading)
        return leading

    def start(self) -> None:
        """Start the election thread (one round first, so a lone controller leads at once)."""
        self.check()
        self._thread = threading.Thread(target=self._run, name="election", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.check()
            except Exception:  # the election thread must outlive any one failure
                log.exception("leader election round failed")

    def stop(self, resign: bool = True) -> None:
        """Stop the thread; give leadership up unless ``resign`` is False."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if resign and self.leading.is_set():
            self.elector.resign()
            self.leading.clear()
