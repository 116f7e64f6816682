"""What several controllers and gateways share: one SQL database, the contract between them.

Three tables, all prefixed ``flowline_`` so they sit beside MLflow's own in the tracking
server's PostgreSQL database (on the embedded SQLite default they get a file of their own,
``coordination.db`` in the home, so lease renewals never wait on MLflow's write lock):

- ``flowline_route_state``: the route table the active controller *published*, one row
  with a generation that grows by one per change. Every gateway polls it and converges
  to it by itself; a gateway that starts late or restarts serves the same routes at once.
- ``flowline_members``: a heartbeat per running gateway and controller (its URL and the
  route generation it has applied), so the controller knows which gateways to push to and
  drain, and a stopping controller knows whether a peer will take over its replicas.
- ``flowline_leases``: the leader lease of the SQLite elector
  (``serving/controller/leader.py``; on PostgreSQL an advisory lock is used instead).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from common.db import schema_lock, sqlalchemy_url, sqlite_engine
from serving.deployment import RouteSnapshot

COORDINATION_URL_ENV = "FLOWLINE_COORDINATION_URL"
GATEWAY = "gateway"
CONTROLLER = "controller"
# A member whose heartbeat is older than this many of its intervals is taken for dead.
MEMBER_STALE_INTERVALS = 3.0

metadata = MetaData()
route_state = Table(
    "flowline_route_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("generation", BigInteger, nullable=False),
    Column("body", Text, nullable=False),
    Column("updated_at", Float, nullable=False),
)
members = Table(
    "flowline_members",
    metadata,
    Column("role", String(32), primary_key=True),
    Column("instance", String(128), primary_key=True),
    Column("url", String(512), nullable=False),
    Column("generation", BigInteger, nullable=False, default=0),
    Column("interval_s", Float, nullable=False),
    Column("seen_at", Float, nullable=False),
)
leases = Table(
    "flowline_leases",
    metadata,
    Column("name", String(128), primary_key=True),
    Column("holder", String(128), nullable=False),
    Column("expires_at", Float, nullable=False),
)
ROUTE_ROW = 1


def instance_id(role: str) -> str:
    """A name for this process that no other instance shares: role, host, pid, random."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def default_coordination_url(home: Path, backend_store_uri: str) -> str:
    """The tracking server's PostgreSQL database, or ``coordination.db`` beside SQLite's."""
    if backend_store_uri.startswith(("postgresql", "postgres:")):
        return backend_store_uri
    return f"sqlite:///{home / 'coordination.db'}"


@dataclass(frozen=True)
class Published:
    """The route table the active controller published, and its generation."""

    generation: int
    snapshot: RouteSnapshot


@dataclass(frozen=True)
class Member:
    """One running gateway or controller, as its last heartbeat described it."""

    role: str
    instance: str
    url: str
    generation: int
    seen_at: float


class CoordinationStore:
    """Reads and writes the shared tables; every call is one short transaction."""

    def __init__(self, url: str) -> None:
        url = sqlalchemy_url(url)
        if url.startswith("sqlite:///"):
            self.engine: Engine = sqlite_engine(Path(url.removeprefix("sqlite:///")))
        elif url.startswith("postgresql+psycopg://"):
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2)
        else:
            raise ValueError(
                f"the coordination database must be sqlite:///<path> or postgresql://..., "
                f"not {url.split(':', 1)[0]!r}"
            )
        self.url = url
        with schema_lock(self.engine, "flowline-coordination-schema"):
            metadata.create_all(self.engine, checkfirst=True)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Release the connection pool."""
        self.engine.dispose()

    # -- the published route table ---------------------------------------------------

    def publish(self, snapshot: RouteSnapshot) -> int:
        """Make ``snapshot`` the published route table; return its new generation."""
        body = json.dumps(snapshot.to_dict(), separators=(",", ":"))
        now = time.time()
        for _ in range(3):
            with self.engine.begin() as conn:
                done = conn.execute(
                    update(route_state)
                    .where(route_state.c.id == ROUTE_ROW)
                    .values(generation=route_state.c.generation + 1, body=body, updated_at=now)
                    .returning(route_state.c.generation)
                ).scalar()
                if done is not None:
                    return int(done)
            try:
                with self.engine.begin() as conn:
                    conn.execute(
                        insert(route_state).values(
                            id=ROUTE_ROW, generation=1, body=body, updated_at=now
                        )
                    )
                return 1
            except IntegrityError:
                continue  # another writer created the row first: update it
        raise RuntimeError("could not publish the route table")

    def forget_routes(self) -> None:
        """Delete the published table (a cold start: its replicas are gone)."""
        with self.engine.begin() as conn:
            conn.execute(delete(route_state))

    def published(self, newer_than: int = 0) -> Published | None:
        """The published table when its generation is above ``newer_than``, else None."""
        with self.engine.connect() as conn:
            # One round trip, and no body unless it is newer: gateways poll every second.
            row = conn.execute(
                select(route_state.c.generation, route_state.c.body).where(
                    route_state.c.id == ROUTE_ROW, route_state.c.generation > newer_than
                )
            ).first()
        if row is None:
            return None
        return Published(int(row.generation), RouteSnapshot.from_dict(json.loads(row.body)))

    # -- members ---------------------------------------------------------------------

    def heartbeat(
        self, role: str, instance: str, url: str, generation: int, interval_s: float
    ) -> None:
        """Record that ``instance`` is alive, where it answers and what it has applied."""
        values: dict[str, Any] = {
            "url": url,
            "generation": generation,
            "interval_s": interval_s,
            "seen_at": time.time(),
        }
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(members)
                .where(members.c.role == role, members.c.instance == instance)
                .values(**values)
            ).rowcount
            if not changed:
                conn.execute(insert(members).values(role=role, instance=instance, **values))

    def members(self, role: str) -> list[Member]:
        """The live members of ``role``: heartbeats younger than 3 of their intervals."""
        now = time.time()
        with self.engine.connect() as conn:
            rows = conn.execute(select(members).where(members.c.role == role)).all()
        return [
            Member(r.role, r.instance, r.url, int(r.generation), r.seen_at)
            for r in rows
            if now - r.seen_at <= MEMBER_STALE_INTERVALS * max(r.interval_s, 0.5)
        ]

    def leave(self, role: str, instance: str) -> None:
        """Remove ``instance``'s heartbeat (a clean stop), so nobody waits for it."""
        with self.engine.begin() as conn:
            conn.execute(
                delete(members).where(members.c.role == role, members.c.instance == instance)
            )

    def forget_stale(self, older_than_s: float = 3600.0) -> int:
        """Delete heartbeats older than ``older_than_s`` (killed members leave rows)."""
        cutoff = time.time() - older_than_s
        with self.engine.begin() as conn:
            return conn.execute(delete(members).where(members.c.seen_at < cutoff)).rowcount
