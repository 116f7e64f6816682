"""Leader election and published routes (serving/coordination.py, serving/controller/leader*.py).

The SQL electors run on real databases: the advisory lock on the real PostgreSQL, held
by a child process that is then killed with SIGKILL; the lease on SQLite. The Lease
elector runs against the shared in-memory Kubernetes fake (tests/k8s_fake.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

from serving.controller.gateway_client import GatewayError
from serving.controller.gateway_fleet import GatewayFleet
from serving.controller.leader import AdvisoryLockElector, Election, LeaseElector, holder_is_dead
from serving.controller.leader_k8s import KubernetesLeaseElector
from serving.coordination import GATEWAY, CoordinationStore, instance_id
from serving.deployment import Deployment, RouteSnapshot
from serving.gateway.route_sync import RouteSync, apply_snapshot
from serving.gateway.routes import RouteTable
from tests.conftest import BIN, POSTGRES_ADMIN, REPO, subprocess_env, wait_for
from tests.k8s_fake import FakeCluster


def _deployment(model: str, version: str, *replicas: str) -> Deployment:
    return Deployment(model=model, version=version, replicas=replicas)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> CoordinationStore:
    store = CoordinationStore(f"sqlite:///{tmp_path / 'coordination.db'}")
    yield store
    store.close()


# -- electors ---------------------------------------------------------------------------

HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    from serving.controller.leader import AdvisoryLockElector
    from serving.coordination import CoordinationStore
    elector = AdvisoryLockElector(CoordinationStore(sys.argv[1]), "child")
    assert elector.try_lead()
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.mark.postgres
def test_the_advisory_lock_passes_to_a_follower_at_once_when_its_holder_is_killed(
    postgres_database: str,
) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, postgres_database],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    store = CoordinationStore(postgres_database)
    follower = AdvisoryLockElector(store, "follower")
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "locked"
        assert not follower.try_lead(), "two leaders while the child holds the lock"
        child.kill()
        killed = time.monotonic()
        wait_for(follower.try_lead, "the follower to take the lock", 10)
        took = time.monotonic() - killed
        assert took < 2.0, f"the lock came free {took:.2f}s after the kill"
        assert follower.try_lead(), "a leader keeps its lock on the next round"
        other = AdvisoryLockElector(store, "third")
        assert not other.try_lead()
        follower.resign()
        assert other.try_lead(), "a resigned lock is free at once"
        other.resign()
    finally:
        child.kill()
        child.wait(timeout=10)
        follower.resign()
        store.close()


def test_the_sqlite_lease_is_exclusive_renewed_and_taken_over_after_expiry(
    sqlite_store: CoordinationStore,
) -> None:
    # Holders on "another host": only the expiry frees their lease.
    first = LeaseElector(sqlite_store, "controller-elsewhere-1-aaaaaa", ttl_s=0.6)
    second = LeaseElector(sqlite_store, "controller-elsewhere-2-bbbbbb", ttl_s=0.6)
    assert first.try_lead()
    assert not second.try_lead()
    time.sleep(0.3)
    assert first.try_lead(), "renewing"
    assert not second.try_lead(), "a renewed lease is not expired"
    wait_for(second.try_lead, "the lease to expire and pass on", 5)
    assert not first.try_lead(), "the old holder lost it"
    second.resign()
    assert first.try_lead(), "a resigned lease is free at once"


def test_a_dead_holder_on_this_host_loses_its_lease_without_waiting(
    sqlite_store: CoordinationStore,
) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=30)
    dead = instance_id("controller").rsplit("-", 2)[0] + f"-{child.pid}-cccccc"
    assert holder_is_dead(dead)
    assert not holder_is_dead(instance_id("controller")), "this very process is alive"
    assert not holder_is_dead("controller-elsewhere-1-aaaaaa")
    assert LeaseElector(sqlite_store, dead, ttl_s=600).try_lead()
    taker = LeaseElector(sqlite_store, instance_id("controller"), ttl_s=600)
    assert taker.try_lead(), "a lease whose holder is gone is taken before it expires"


def test_the_kubernetes_lease_is_exclusive_and_taken_over_after_expiry() -> None:
    cluster = FakeCluster()
    api = cluster.apis().coordination
    first = KubernetesLeaseElector(api, "flowline", "pod-a", ttl_s=1)
    second = KubernetesLeaseElector(api, "flowline", "pod-b", ttl_s=1)
    assert first.try_lead(), "creates the Lease"
    assert not second.try_lead()
    assert first.try_lead(), "renews"
    lease = cluster.get("Lease", "flowline", "flowline-controller")
    assert lease is not None and lease["spec"]["holderIdentity"] == "pod-a"
    wait_for(second.try_lead, "the Lease to expire and pass on", 5)
    lease = cluster.get("Lease", "flowline", "flowline-controller")
    assert lease["spec"]["holderIdentity"] == "pod-b"
    assert lease["spec"]["leaseTransitions"] == 1
    assert not first.try_lead()
    second.resign()
    assert first.try_lead(), "a resigned Lease is free at once"


def test_of_two_candidates_racing_for_an_expired_lease_one_wins() -> None:
    cluster = FakeCluster()
    api = cluster.apis().coordination
    assert KubernetesLeaseElector(api, "ns", "old", ttl_s=1).try_lead()
    lease = api.read_namespaced_lease("flowline-controller", "ns")
    lease.spec.renew_time = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=30)
    api.replace_namespaced_lease("flowline-controller", "ns", lease)
    # Both read the expired Lease before either writes: the second write is a 409.
    stale = api.read_namespaced_lease("flowline-controller", "ns")

    class StaleReads:
        def __getattr__(self, name: str):
            if name == "read_namespaced_lease":
                return lambda *_a, **_k: stale
            return getattr(api, name)

    a = KubernetesLeaseElector(StaleReads(), "ns", "a", ttl_s=1)
    b = KubernetesLeaseElector(StaleReads(), "ns", "b", ttl_s=1)
    assert [a.try_lead(), b.try_lead()] == [True, False]


def test_the_election_thread_reports_winning_and_losing(sqlite_store: CoordinationStore) -> None:
    changes: list[bool] = []
    rounds: list[float] = []
    election = Election(
        LeaseElector(sqlite_store, "controller-elsewhere-1-aaaaaa", ttl_s=5), 0.05, changes.append
    )
    election.on_round = lambda: rounds.append(time.monotonic())
    election.start()
    try:
        assert election.leading.is_set() and changes == [True]
        wait_for(lambda: len(rounds) >= 3, "election rounds", 5)
    finally:
        election.stop()
    assert not election.leading.is_set()
    rival = LeaseElector(sqlite_store, "controller-elsewhere-2-bbbbbb", ttl_s=5)
    assert rival.try_lead(), "stop() resigned"


# -- published routes --------------------------------------------------------------------


def test_published_generations_grow_and_reads_skip_what_a_gateway_has(
    sqlite_store: CoordinationStore,
) -> None:
    assert sqlite_store.published() is None
    one = RouteSnapshot((_deployment("m", "1", "http://r:1"),), "m")
    assert sqlite_store.publish(one) == 1
    two = RouteSnapshot((_deployment("m", "2", "http://r:2"),), "m")
    assert sqlite_store.publish(two) == 2
    latest = sqlite_store.published()
    assert latest is not None and latest.generation == 2
    assert latest.snapshot.deployments[0].version == "2"
    assert sqlite_store.published(newer_than=2) is None
    sqlite_store.forget_routes()
    assert sqlite_store.published() is None


def test_apply_snapshot_converges_a_table_both_ways() -> None:
    table = RouteTable()
    table.set_active(_deployment("gone", "1", "http://r:9"))
    table.set_active(_deployment("kept", "1", "http://r:1"))
    kept_route = table.get("kept")
    wanted = RouteSnapshot(
        (_deployment("kept", "1", "http://r:1"), _deployment("new", "3", "http://r:3")), "kept"
    )
    assert apply_snapshot(table, wanted)
    assert sorted(r.deployment.model for r in table.routes()) == ["kept", "new"]
    assert table.get("kept") is kept_route, "an unchanged route keeps its state"
    assert not apply_snapshot(table, wanted), "idempotent"


def test_a_gateway_syncs_newer_tables_and_never_undoes_a_newer_push(
    sqlite_store: CoordinationStore,
) -> None:
    table = RouteTable()
    sync = RouteSync(table, sqlite_store, "gw-1", "http://127.0.0.1:1", 1.0)
    sqlite_store.publish(RouteSnapshot((_deployment("m", "1", "http://r:1"),), "m"))
    assert asyncio.run(sync.sync_once())
    assert table.generation == 1 and table.get("m").deployment.version == "1"
    [member] = sqlite_store.members(GATEWAY)
    assert (member.instance, member.generation) == ("gw-1", 0), "heartbeat before applying"
    # A push of generation 2 arrives before the poll sees it: the poll does not revert.
    generation = sqlite_store.publish(RouteSnapshot((_deployment("m", "2", "http://r:2"),), "m"))
    table.set_active(_deployment("m", "2", "http://r:2"))
    table.note_pushed(generation)
    assert table.generation == 2
    assert not asyncio.run(sync.sync_once())
    # A missed push (generation 4 without 3) is not counted: the poll fetches the whole.
    sqlite_store.publish(RouteSnapshot((_deployment("m", "3", "http://r:3"),), "m"))
    sqlite_store.publish(
        RouteSnapshot((_deployment("m", "3", "http://r:3"), _deployment("x", "1", "http://x")), "m")
    )
    table.note_pushed(4)
    assert table.generation == 2
    assert asyncio.run(sync.sync_once())
    assert table.generation == 4 and sorted(r.deployment.model for r in table.routes()) == [
        "m",
        "x",
    ]
    sync.leave()
    assert sqlite_store.members(GATEWAY) == []


class FakeGateway:
    """A GatewayClient stand-in: records pushes, answers in-flight and generation."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.pushed: list[tuple[str, int | None]] = []
        self.generation = 0
        self.inflight_count = 0

    def put(self, deployment: Deployment, generation: int | None = None) -> None:
        if self.fail:
            raise GatewayError("gateway unreachable")
        self.pushed.append((deployment.version, generation))
        self.generation = generation or 0

    def inflight_report(self, url: str) -> dict:
        if self.fail:
            raise GatewayError("gateway unreachable")
        return {"inflight": self.inflight_count, "generation": self.generation}


def test_the_fleet_publishes_then_pushes_to_every_live_gateway(
    sqlite_store: CoordinationStore,
) -> None:
    gateways = {"http://a": FakeGateway(), "http://b": FakeGateway(fail=True)}
    for url in gateways:
        sqlite_store.heartbeat(GATEWAY, url, url, 0, 1.0)
    fleet = GatewayFleet(sqlite_store, gateways.__getitem__)
    fleet.load()
    fleet.put(_deployment("m", "1", "http://r:1"))  # b's failed push is no failure
    assert gateways["http://a"].pushed == [("1", 1)]
    assert sqlite_store.published().snapshot.deployments[0].version == "1"
    fleet.put(_deployment("m", "1", "http://r:1"))
    assert sqlite_store.published().generation == 1, "an unchanged route is not republished"
    # Drained only once every live gateway applied the generation and sends nothing.
    gateways["http://a"].inflight_count = 1
    assert not fleet.drain(["http://r:0"], timeout=0.2)
    gateways["http://a"].inflight_count = 0
    assert fleet.drain(["http://r:0"], timeout=0.2), "an unreachable gateway sends nothing"
    # A new leader starts from what was published.
    again = GatewayFleet(sqlite_store, gateways.__getitem__)
    again.load()
    assert again.generation == 1 and again.snapshot().deployments[0].version == "1"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--monitors", "2"], "more than one monitor needs one PostgreSQL store"),
        (["--gateways", "0"], "--gateways must be between 1 and 8"),
        (["--controllers", "9"], "--controllers must be between 1 and 8"),
    ],
)
def test_a_topology_flowline_up_cannot_run_is_one_line_and_exit_2(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    env = subprocess_env(FLOWLINE_HOME=str(tmp_path / "home"))
    env.pop("FLOWLINE_MONITOR_DB", None)
    done = subprocess.run(
        [str(BIN / "flowline"), "up", "--port", "1", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("flowline: error: ") and message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.postgres
def test_processes_starting_together_on_an_empty_postgresql_database_all_start(
    postgres_database: str,
) -> None:
    # Two monitors (or controller and gateway pods) starting at once used to race in
    # CREATE TABLE, and one died on PostgreSQL's catalog unique index.
    from monitoring.service.store import MonitorStore

    admin = psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=5)
    name = f"flowline_race_{uuid.uuid4().hex[:8]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{POSTGRES_ADMIN.rsplit('/', 1)[0]}/{name}"
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []
    stores: list[Any] = []

    def start(kind: type) -> None:
        barrier.wait()
        try:
            stores.append(kind(url))
        except BaseException as exc:  # recorded, asserted below
            errors.append(exc)

    threads = [
        threading.Thread(target=start, args=(kind,))
        for kind in (MonitorStore, CoordinationStore) * 3
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == [], errors[:1]
        assert len(stores) == 6
    finally:
        for store in stores:
            store.close()
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
