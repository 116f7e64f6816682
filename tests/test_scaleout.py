"""Several instances of each role (issue 15): real `flowline up`, real processes, kill -9.

- two gateways behind a round-robin client, one killed under constant load: no request
  fails beyond one retry on the other gateway, and the restarted one serves the
  published routes as soon as it answers;
- two controllers, the leader killed: the follower leads within 2 reconcile intervals,
  adopts the replicas (the same URLs keep serving), and deploys a later promotion.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import requests
from mlflow import MlflowClient

from tests.conftest import wait_for
from tests.test_platform_hardening import (
    BODY,
    DEADLINE,
    Up,
    flowline_up,
    register_model,
    served_version,
)

pytestmark = pytest.mark.slow
INTERVAL_S = 2.0
STEP = 10  # flowline.platform.INSTANCE_PORT_STEP: instance i listens 10 * i above


def instance_url(up: Up, role: str, index: int) -> str:
    """Base URL of instance ``index`` (0-based) of ``role``."""
    return f"http://127.0.0.1:{getattr(up.ports, role) + STEP * index}"


def instance_pid(up: Up, name: str) -> int:
    """The pid of role instance ``name`` (gateway-2, controller, ...), from its pid file."""
    return int((up.home / "pids" / f"{name}.pid").read_text())


def leadership(url: str) -> dict | None:
    """A controller's /status leadership block, None when it does not answer."""
    try:
        return requests.get(f"{url}/status", timeout=2).json().get("leadership")
    except (requests.RequestException, ValueError):
        return None


def served_everywhere(up: Up, name: str, version: str, gateways: int = 2) -> None:
    """Wait until every gateway serves ``version`` of ``name``."""
    for index in range(gateways):
        wait_for(
            lambda i=index: served_version(instance_url(up, "gateway", i), name) == version,
            f"gateway {index + 1} to serve version {version}",
            DEADLINE,
        )


def _replica_urls(controller: str, model: str) -> list[str]:
    status = requests.get(f"{controller}/status", timeout=5).json()
    found = [d for d in status["deployments"] if d["model"] == model and d["role"] == "production"]
    return sorted(r["url"] for d in found for r in d["replicas"])


@dataclass
class RoundRobin:
    """Constant traffic over several gateways; a failed request is retried once on the
    next gateway, and only a failed retry counts as a failure."""

    urls: list[str]
    threads: int = 4
    ok: int = 0
    retried: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _once(self, session: requests.Session, url: str) -> str | None:
        try:
            answer = session.post(url, json=BODY, timeout=30)
        except requests.RequestException as exc:
            session.close()  # a dead gateway's pooled connection must not be reused
            return type(exc).__name__
        return None if answer.status_code == 200 else f"HTTP {answer.status_code}"

    def _run(self, start: int) -> None:
        turn = itertools.count(start)
        with requests.Session() as session:
            while not self._stop.is_set():
                index = next(turn) % len(self.urls)
                error = self._once(session, self.urls[index])
                retried = error is not None
                if retried:
                    error = self._once(session, self.urls[(index + 1) % len(self.urls)])
                with self._lock:
                    self.retried += retried
                    if error is None:
                        self.ok += 1
                    else:
                        self.failures.append(error)

    def __enter__(self) -> RoundRobin:
        self._workers = [threading.Thread(target=self._run, args=(i,)) for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        wait_for(lambda: self.ok >= 20, "traffic over both gateways", 60)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, str]]:
    """`flowline up --gateways 2 --controllers 2` serving one small model."""
    tmp = tmp_path_factory.mktemp("scaleout")
    with flowline_up(
        tmp,
        "--gateways",
        "2",
        "--controllers",
        "2",
        FLOWLINE_RECONCILE_INTERVAL_S=str(INTERVAL_S),
    ) as up:
        name = f"scaled-{uuid.uuid4().hex[:6]}"
        version = register_model(up.url("tracking"), name)
        MlflowClient(up.url("tracking"), up.url("tracking")).set_registered_model_alias(
            name, "production", version
        )
        served_everywhere(up, name, version)
        yield up, name


def _models_at_first_answer(url: str, deadline: float) -> list[dict]:
    """The gateway's /models at the first moment its /ping answers 200."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            if requests.get(f"{url}/ping", timeout=1).status_code == 200:
                return requests.get(f"{url}/models", timeout=5).json()["models"]
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer within {deadline}s")


def test_a_gateway_killed_under_load_fails_no_request_beyond_one_retry(
    topology: tuple[Up, str],
) -> None:
    up, name = topology
    urls = [f"{instance_url(up, 'gateway', i)}/models/{name}/invocations" for i in range(2)]
    with RoundRobin(urls) as load:
        before = load.ok
        old = instance_pid(up, "gateway-2")
        os.killpg(old, signal.SIGKILL)
        wait_for(
            lambda: (
                (up.home / "pids" / "gateway-2.pid").exists()
                and instance_pid(up, "gateway-2") != old
            ),
            "the supervisor to restart gateway 2",
            DEADLINE,
        )
        # Routes come from the published table before the first request is served.
        models = _models_at_first_answer(instance_url(up, "gateway", 1), DEADLINE)
        scored_since = load.ok
        wait_for(lambda: load.ok >= scored_since + 50, "traffic after the restart", DEADLINE)
    print(f"2 gateways, one kill -9: {load.ok - before} answered, {load.retried} retried")
    assert load.failures == [], f"{len(load.failures)} failed after a retry: {load.failures[:5]}"
    assert load.retried >= 1, "the kill was not felt: did it hit the gateway under load?"
    assert [m["name"] for m in models] == [name]


def test_the_follower_takes_over_when_the_leader_is_killed(topology: tuple[Up, str]) -> None:
    up, name = topology
    controllers = [instance_url(up, "controller", i) for i in range(2)]
    wait_for(
        lambda: sum(bool((leadership(u) or {}).get("leader")) for u in controllers) == 1,
        "exactly one leader",
        DEADLINE,
    )
    leader = next(i for i, u in enumerate(controllers) if leadership(u)["leader"])
    follower = controllers[1 - leader]
    replicas_before = _replica_urls(controllers[leader], name)
    assert replicas_before
    os.killpg(instance_pid(up, "controller" if leader == 0 else "controller-2"), signal.SIGKILL)
    killed = time.monotonic()
    wait_for(
        lambda: bool((leadership(follower) or {}).get("leader")),
        "the follower to lead",
        DEADLINE,
    )
    took = time.monotonic() - killed
    print(f"leader kill -9 -> follower leads after {took:.2f}s (interval {INTERVAL_S}s)")
    assert took <= 2 * INTERVAL_S, f"took over after {took:.1f}s, more than 2 intervals"
    # Adopted, not restarted: the new leader runs the very replicas the old one started.
    assert _replica_urls(follower, name) == replicas_before
    # A promotion made after the kill is deployed by the new leader, on every gateway.
    version = register_model(up.url("tracking"), name)
    MlflowClient(up.url("tracking"), up.url("tracking")).set_registered_model_alias(
        name, "production", version
    )
    served_everywhere(up, name, version)
    # The killed controller is back as a follower: still exactly one leader.
    wait_for(
        lambda: (
            sum(bool((leadership(u) or {}).get("leader")) for u in controllers) == 1
            and all(leadership(u) is not None for u in controllers)
        ),
        "one leader among the two controllers again",
        DEADLINE,
    )
