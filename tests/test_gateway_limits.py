"""Rate limits and the response cache of real gateway processes, in process and through Redis.

Each test starts its own gateways (`python -m serving.gateway`) in front of one real
`mlflow models serve` replica and deploys through the admin API, as the controller
does. Redis is the real one at FLOWLINE_TEST_REDIS_URL (default 127.0.0.1:6379/0);
every key a test run writes starts with a prefix of its own, deleted at the end. With
CI=true an unreachable Redis fails the tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.processes import free_port
from serving.model_metadata import deployment_from_model_dir
from tests.conftest import Service
from tests.helpers_serving import (
    FEW_COLUMNS,
    running,
    start_gateway,
)

ADMIN = "admin-secret"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
JSON = "application/json"
ROW = [17.99, 10.38, 122.8, 1001.0, 0.1184]
BODY = json.dumps({"dataframe_split": {"columns": FEW_COLUMNS, "data": [ROW]}}).encode()
# The same request with its keys in another order and other spacing.
REORDERED = json.dumps({"dataframe_split": {"data": [ROW], "columns": FEW_COLUMNS}}, indent=2)
OTHER_ROW = [13.0, 15.0, 85.0, 520.0, 0.1]
OTHER_BODY = json.dumps({"dataframe_split": {"columns": FEW_COLUMNS, "data": [OTHER_ROW]}})
REDIS_URL = os.environ.get("FLOWLINE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


# --- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test run in the real Redis; its keys are deleted afterwards."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"Redis is required in CI but unreachable at {REDIS_URL}: {exc}")
        pytest.skip(f"Redis unreachable at {REDIS_URL}")
    prefix = f"flowline-test-{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        assert list(client.scan_iter(match=f"{prefix}*")) == []
        client.close()


def gateway_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "FLOWLINE_ADMIN_TOKEN": ADMIN,
        "FLOWLINE_HOME": str(tmp_path / f"home-{uuid.uuid4().hex[:8]}"),
        **extra,
    }


def deploy(
    gateway: Service,
    version: str,
    replica: Service,
    model_dir: Path,
    model: str = "bc",
    **fields: Any,
) -> None:
    """PUT a deployment (with extra fields such as cache or rate_limit) through the admin API."""
    body = deployment_from_model_dir(model, version, [replica.url], model_dir).to_dict()
    body.update(fields)
    answer = httpx.put(
        f"{gateway.url}/admin/deployments/{model}", json=body, headers=ADMIN_HEADERS, timeout=30
    )
    assert answer.status_code == 200, answer.text


def score(
    gateway: Service,
    body: bytes | str = BODY,
    key: str | None = None,
    model: str = "bc",
    client: httpx.Client | None = None,
) -> httpx.Response:
    headers = {"content-type": JSON}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    url = f"{gateway.url}/models/{model}/invocations"
    if client is not None:
        return client.post(url, content=body, headers=headers)
    return httpx.post(url, content=body, headers=headers, timeout=30)


def metric(gateway: Service, name: str, labels: str) -> float:
    """The value of `name{labels}` on the gateway's /metrics now (0 when absent)."""
    for line in httpx.get(f"{gateway.url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# --- (a) 429 per key ---------------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_each_key_has_its_own_budget_and_429_says_when_to_retry(
    store: str,
    request: pytest.FixtureRequest,
    replica: Service,
    model_dir: Path,
    logs: Path,
    tmp_path: Path,
) -> None:
    extra = {"FLOWLINE_API_KEYS": "key-one,key-two", "FLOWLINE_RATE_LIMITS": "3/minute"}
    if store == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        extra |= {"FLOWLINE_REDIS_URL": REDIS_URL, "FLOWLINE_REDIS_PREFIX": f"{prefix}a:"}
    with running(start_gateway(logs, env=gateway_env(tmp_path, **extra))) as gateway:
        deploy(gateway, "1", replica, model_dir)
        assert [score(gateway, key="key-one").status_code for _ in range(3)] == [200] * 3
        refused = score(gateway, key="key-one")
        assert refused.status_code == 429
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.json()["error_code"] == "REQUEST_LIMIT_EXCEEDED"
        assert set(refused.json()) == {"error_code", "message"}
        # The other key's budget is untouched.
        assert [score(gateway, key="key-two").status_code for _ in range(3)] == [200] * 3
        assert score(gateway, key="key-two").status_code == 429
        assert metric(gateway, "flowline_gateway_rate_limited_total", 'model="bc"') == 2.0
        # The 429s cost no replica call.
        calls = 'kind="single",model="bc",version="1"'
        assert metric(gateway, "flowline_gateway_backend_calls_total", calls) == 6.0
    if store == "redis":
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        stored = [k.decode() for k in client.scan_iter(match=f"{prefix}a:*")]
        client.close()
        assert stored and not any("key-one" in k or "key-two" in k for k in stored), stored


# --- (b) one budget shared by two gateway processes --------------------------------------------


def test_two_gateways_share_one_redis_limit(
    redis_prefix: str, replica: Service, model_dir: Path, logs: Path, tmp_path: Path
) -> None:
    extra = {
        "FLOWLINE_RATE_LIMITS": "10/second",
        "FLOWLINE_REDIS_URL": REDIS_URL,
        "FLOWLINE_REDIS_PREFIX": f"{redis_prefix}b:",
    }
    with (
        running(start_gateway(logs, env=gateway_env(tmp_path, **extra))) as one,
        running(start_gateway(logs, env=gateway_env(tmp_path, **extra))) as two,
    ):
        for gateway in (one, two):
            deploy(gateway, "1", replica, model_dir)
            # A model with a long window: spent on one gateway, refused on the other.
            deploy(gateway, "1", replica, model_dir, model="bc-tag", rate_limit="4/minute")
        # GET /models says which budget each model has: its tag's, else the default.
        listed = {m["name"]: m for m in httpx.get(f"{one.url}/models").json()["models"]}
        assert listed["bc-tag"]["rate_limit"] == "4/minute"
        assert listed["bc"]["rate_limit"] == "10/second" and listed["bc"]["cache"] is None
        assert [score(one, model="bc-tag").status_code for _ in range(4)] == [200] * 4
        assert score(two, model="bc-tag").status_code == 429

        # 10/second, moving window, hammered through both gateways for 2.5 s: the windows
        # free at about 1 s and 2 s after the first burst, so 3 x 10 are accepted; the
        # next frees at 3 s, after the clients stop.
        duration = 2.5
        statuses: dict[str, list[int]] = {"one": [], "two": []}
        start = threading.Event()
        lock = threading.Lock()

        def hammer(name: str, gateway: Service) -> None:
            with httpx.Client(timeout=10) as client:
                start.wait(10)
                deadline = time.monotonic() + duration
                while time.monotonic() < deadline:
                    status = score(gateway, client=client).status_code
                    with lock:
                        statuses[name].append(status)

        threads = [
            threading.Thread(target=hammer, args=(name, gateway))
            for name, gateway in (("one", one), ("two", two), ("one", one), ("two", two))
        ]
        for thread in threads:
            thread.start()
        start.set()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
        every = statuses["one"] + statuses["two"]
        assert set(every) <= {200, 429}, set(every)
        accepted = every.count(200)
        assert 28.5 <= accepted <= 31.5, (accepted, len(every))
        assert statuses["one"].count(200) > 0 and statuses["two"].count(200) > 0
        refused = sum(
            metric(g, "flowline_gateway_rate_limited_total", 'model="bc"') for g in (one, two)
        )
        assert refused == every.count(429) > 0


# --- (c) the response cache --------------------------------------------------------------------


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_cache_hits_equivalent_json_and_never_serves_a_previous_version(
    store: str,
    request: pytest.FixtureRequest,
    replica: Service,
    model_dir: Path,
    logs: Path,
    tmp_path: Path,
) -> None:
    extra: dict[str, str] = {}
    if store == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        extra = {"FLOWLINE_REDIS_URL": REDIS_URL, "FLOWLINE_REDIS_PREFIX": f"{prefix}c:"}
    cache = {"ttl_s": 60, "max_entries": 100}
    with running(start_gateway(logs, env=gateway_env(tmp_path, **extra))) as gateway:
        deploy(gateway, "1", replica, model_dir, cache=cache)
        [listed] = httpx.get(f"{gateway.url}/models").json()["models"]
        assert listed["cache"] == {"ttl_s": 60.0, "max_entries": 100}
        assert listed["rate_limit"] is None
        first = score(gateway)
        assert first.status_code == 200 and first.headers["x-flowline-cache"] == "miss"
        hit = score(gateway)
        assert hit.headers["x-flowline-cache"] == "hit"
        assert hit.content == first.content
        assert hit.headers["content-type"] == first.headers["content-type"]
        assert hit.headers["x-flowline-model-version"] == "bc/1"
        assert score(gateway, OTHER_BODY).headers["x-flowline-cache"] == "miss"
        assert score(gateway, REORDERED).headers["x-flowline-cache"] == "hit"
        calls = 'kind="single",model="bc",version="1"'
        assert metric(gateway, "flowline_gateway_backend_calls_total", calls) == 2.0

        # A promotion: the same body is answered by version 2, never from version 1's entry.
        deploy(gateway, "2", replica, model_dir, cache=cache)
        promoted = score(gateway)
        assert promoted.headers["x-flowline-model-version"] == "bc/2"
        assert promoted.headers["x-flowline-cache"] == "miss"
        again = score(gateway)
        assert again.headers["x-flowline-model-version"] == "bc/2"
        assert again.headers["x-flowline-cache"] == "hit"
        hits = metric(gateway, "flowline_gateway_cache_lookups_total", 'model="bc",result="hit"')
        assert hits == 3.0

        # A model without the cache setting gets no cache header.
        deploy(gateway, "1", replica, model_dir, model="plain")
        plain = score(gateway, model="plain")
        assert plain.status_code == 200 and "x-flowline-cache" not in plain.headers


# --- (d) Redis down ----------------------------------------------------------------------------


def test_scoring_works_when_redis_is_down(
    replica: Service, model_dir: Path, logs: Path, tmp_path: Path
) -> None:
    closed = free_port()  # nothing listens there
    extra = {
        "FLOWLINE_RATE_LIMITS": "1/minute",
        "FLOWLINE_REDIS_URL": f"redis://127.0.0.1:{closed}/0",
    }
    with running(start_gateway(logs, env=gateway_env(tmp_path, **extra))) as gateway:
        deploy(gateway, "1", replica, model_dir, cache={"ttl_s": 60})
        answers = [score(gateway) for _ in range(5)]
        assert [a.status_code for a in answers] == [200] * 5  # the limit failed open
        assert {a.headers["x-flowline-cache"] for a in answers} == {"miss"}
        assert all(a.elapsed.total_seconds() < 2 for a in answers)
        assert metric(gateway, "flowline_gateway_store_errors_total", 'store="limit"') >= 1
        assert metric(gateway, "flowline_gateway_store_errors_total", 'store="cache"') >= 1
