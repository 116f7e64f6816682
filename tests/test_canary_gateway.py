"""Canary and shadow through a real gateway process, on real HTTP stub replicas.

The replicas are `RowScorer`s (tests/helpers_serving.py): real servers on loopback that
score each row with a known function, row-aligned like the stock scorer, so the gateway
batches requests to them (batching is on in every deployment here) and thousands of
requests take seconds. Each version answers differently, so an answer shows which
version really produced it, not only which one the header names.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.processes import free_port
from tests.conftest import Service, wait_for
from tests.helpers_serving import HeldScorer, RowScorer, one_column_deployment, start_gateway
from tests.test_gateway import metric, metric_values

ADMIN = "admin-secret"
HEADERS = {"Authorization": f"Bearer {ADMIN}"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("canary-logs")


@pytest.fixture(scope="module")
def gateway(logs: Path) -> Iterator[Service]:
    server = start_gateway(logs, env={"FLOWLINE_ADMIN_TOKEN": ADMIN})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def scorers() -> Iterator[dict[str, RowScorer]]:
    """v1 answers "v1:<x>", v2 "v2:<x>"; label answers for the shadow: x > 0.5 (v1), x > 0.7
    (v3); a failing one."""
    made = {
        "v1": RowScorer(lambda row: f"v1:{row[0]}"),
        "v2": RowScorer(lambda row: f"v2:{row[0]}"),
        "label1": RowScorer(lambda row: int(row[0] > 0.5)),
        "label3": RowScorer(lambda row: int(row[0] > 0.7)),
        "broken": RowScorer(fail=True),
        "regress1": RowScorer(lambda row: row[0] * 2.0),
        "regress3": RowScorer(lambda row: row[0] * 2.0 + 0.25),
    }
    try:
        yield made
    finally:
        for scorer in made.values():
            scorer.stop()


def put(gateway: Service, model: str, version: str, urls: list[str]) -> None:
    body = one_column_deployment(model, version, urls)
    answer = httpx.put(f"{gateway.url}/admin/deployments/{model}", json=body, headers=HEADERS)
    answer.raise_for_status()


def put_variant(gateway: Service, model: str, role: str, version: str, urls: list[str],
                **share: Any) -> httpx.Response:  # fmt: skip
    body = {"deployment": one_column_deployment(model, version, urls), **share}
    return httpx.put(
        f"{gateway.url}/admin/deployments/{model}/{role}", json=body, headers=HEADERS, timeout=10
    )


def body(x: float) -> bytes:
    return json.dumps({"dataframe_split": {"columns": ["x"], "data": [[x]]}}).encode()


async def fire(url: str, bodies: list[bytes], headers: list[dict[str, str]] | None = None,
               concurrency: int = 16) -> list[httpx.Response]:  # fmt: skip
    """Send every body, `concurrency` at a time; the answers in order."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:

        async def one(i: int) -> httpx.Response:
            async with gate:
                extra = headers[i] if headers else {}
                return await client.post(url, content=bodies[i], headers={**JSON, **extra})

        return await asyncio.gather(*(one(i) for i in range(len(bodies))))


def models(gateway: Service) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in httpx.get(f"{gateway.url}/models", timeout=10).json()["models"]}


def test_a_10_percent_canary_gets_10_plus_minus_2_percent_of_5000_requests(
    gateway: Service, scorers: dict[str, RowScorer]
) -> None:
    put(gateway, "split", "1", [scorers["v1"].url])
    assert put_variant(gateway, "split", "canary", "2", [scorers["v2"].url], weight=10).is_success
    values = [i / 5000 for i in range(5000)]
    answers = asyncio.run(
        fire(f"{gateway.url}/models/split/invocations", [body(x) for x in values])
    )
    assert {a.status_code for a in answers} == {200}
    versions = Counter(a.headers["x-flowline-model-version"] for a in answers)
    assert set(versions) == {"split/1", "split/2"}
    assert 400 <= versions["split/2"] <= 600, versions  # 10 +- 2 % of 5,000
    for x, answer in zip(values, answers, strict=True):
        # The version named is the one that answered, with this request's own row.
        version = answer.headers["x-flowline-model-version"].split("/")[1]
        assert answer.json()["predictions"] == [f"v{version}:{x}"]
    assert any(int(a.headers.get("x-flowline-batch-size", "1")) > 1 for a in answers)
    canary = models(gateway)["split"]["canary"]
    assert canary["version"] == "2" and canary["weight"] == 10


def test_a_sticky_header_keeps_each_caller_on_one_version(
    gateway: Service, scorers: dict[str, RowScorer]
) -> None:
    put(gateway, "sticky", "1", [scorers["v1"].url])
    answer = put_variant(
        gateway, "sticky", "canary", "2", [scorers["v2"].url], weight=30, sticky="X-Caller"
    )
    assert answer.is_success, answer.text
    callers = [f"caller-{i % 200}" for i in range(1000)]
    answers = asyncio.run(fire(
        f"{gateway.url}/models/sticky/invocations", [body(0.1)] * len(callers),
        [{"X-Caller": c} for c in callers],
    ))  # fmt: skip
    seen: dict[str, set[str]] = {}
    for caller, answer in zip(callers, answers, strict=True):
        assert answer.status_code == 200
        seen.setdefault(caller, set()).add(answer.headers["x-flowline-model-version"])
    assert all(len(v) == 1 for v in seen.values()), seen
    on_canary = sum(v == {"sticky/2"} for v in seen.values())
    assert 30 <= on_canary <= 90, on_canary  # 30 % of 200 callers, loosely


def test_a_shadow_never_changes_an_answer_and_its_agreement_is_reported(
    gateway: Service, scorers: dict[str, RowScorer]
) -> None:
    put(gateway, "mirrored", "1", [scorers["label1"].url])
    url = f"{gateway.url}/models/mirrored/invocations"
    values = [i / 400 for i in range(400)]
    bodies = [body(x) for x in values]
    without = asyncio.run(fire(url, bodies))
    answer = put_variant(gateway, "mirrored", "shadow", "3", [scorers["label3"].url], sample=1.0)
    assert answer.is_success, answer.text
    with_shadow = asyncio.run(fire(url, bodies))
    for before, after in zip(without, with_shadow, strict=True):
        assert after.status_code == 200 and after.json() == before.json()
        assert after.headers["x-flowline-model-version"] == "mirrored/1"

    def compared() -> dict[str, Any] | None:
        shadow = models(gateway)["mirrored"]["shadow"]
        return shadow if shadow["mirrored"] + shadow["dropped"] >= len(bodies) else None

    shadow = wait_for(compared, "the shadow to see every request", 30)
    assert shadow["version"] == "3" and shadow["sample"] == 1.0 and shadow["errors"] == 0
    # v1 says x > 0.5, v3 x > 0.7: they disagree on x in (0.5, 0.7], 20 % of the rows.
    assert shadow["mirrored"] >= len(bodies) // 2
    assert shadow["agreement"] == pytest.approx(0.8, abs=0.08)
    values_now = metric_values(gateway)
    labels = {"model": "mirrored", "version": "3"}
    ok = metric(values_now, "flowline_gateway_shadow_requests_total", outcome="ok", **labels)
    assert ok == shadow["mirrored"]
    gauge = metric(values_now, "flowline_gateway_shadow_agreement", **labels)
    assert gauge == pytest.approx(shadow["agreement"])
    assert metric(values_now, "flowline_gateway_shadow_seconds_count", **labels) >= ok
    # Shadow calls are not production traffic in the request metrics.
    assert metric(values_now, "flowline_gateway_requests_total", **labels) == 0


def test_a_regression_shadow_reports_the_mean_absolute_difference(
    gateway: Service, scorers: dict[str, RowScorer]
) -> None:
    put(gateway, "regressed", "1", [scorers["regress1"].url])
    assert put_variant(
        gateway, "regressed", "shadow", "3", [scorers["regress3"].url], sample=1.0
    ).is_success
    url = f"{gateway.url}/models/regressed/invocations"
    answers = asyncio.run(fire(url, [body(i + 0.5) for i in range(100)]))
    assert [a.json()["predictions"] for a in answers] == [[(i + 0.5) * 2.0] for i in range(100)]

    def compared() -> dict[str, Any] | None:
        shadow = models(gateway)["regressed"]["shadow"]
        return shadow if shadow["mirrored"] + shadow["dropped"] >= 100 else None

    shadow = wait_for(compared, "the shadow to see every request", 30)
    assert shadow["mirrored"] > 0 and shadow["agreement"] is None
    assert shadow["mean_abs_diff"] == pytest.approx(0.25)
    gauge = metric(metric_values(gateway), "flowline_gateway_shadow_mean_abs_diff",
                   model="regressed")  # fmt: skip
    assert gauge == pytest.approx(0.25)


@pytest.mark.parametrize("failure", ["refused", "error"])
def test_a_failing_shadow_is_invisible_to_callers(
    gateway: Service, scorers: dict[str, RowScorer], failure: str
) -> None:
    model = f"guarded-{failure}"
    put(gateway, model, "1", [scorers["label1"].url])
    target = f"http://127.0.0.1:{free_port()}" if failure == "refused" else scorers["broken"].url
    assert put_variant(gateway, model, "shadow", "9", [target]).is_success
    url = f"{gateway.url}/models/{model}/invocations"
    answers = asyncio.run(fire(url, [body(i / 100) for i in range(100)]))
    assert [a.status_code for a in answers] == [200] * 100
    assert [a.json()["predictions"] for a in answers] == [[int(i / 100 > 0.5)] for i in range(100)]
    assert {a.headers["x-flowline-model-version"] for a in answers} == {f"{model}/1"}

    def failed() -> dict[str, Any] | None:
        shadow = models(gateway)[model]["shadow"]
        return shadow if shadow["errors"] + shadow["dropped"] >= 100 else None

    shadow = wait_for(failed, "the shadow's errors to be counted", 30)
    # The mirrors beyond the in-flight bound are dropped; every one sent failed.
    assert shadow["errors"] > 0 and shadow["mirrored"] == 0 and shadow["agreement"] is None
    errors = metric(metric_values(gateway), "flowline_gateway_shadow_requests_total",
                    model=model, outcome="error")  # fmt: skip
    assert errors == shadow["errors"]


def test_inflight_counts_requests_on_a_canary_route(
    gateway: Service, scorers: dict[str, RowScorer]
) -> None:
    held = HeldScorer()
    try:
        put(gateway, "drained", "1", [scorers["v1"].url])
        assert put_variant(gateway, "drained", "canary", "2", [held.url], weight=100).is_success

        async def scenario() -> None:
            async with httpx.AsyncClient(timeout=30) as client:
                call = asyncio.create_task(client.post(
                    f"{gateway.url}/models/drained/invocations", content=body(1.0), headers=JSON
                ))  # fmt: skip

                async def inflight() -> int:
                    answer = await client.get(
                        f"{gateway.url}/admin/inflight",
                        params={"replica": held.url},
                        headers=HEADERS,
                    )
                    return answer.json()["inflight"]

                for _ in range(500):
                    if held.received and await inflight() == 1:
                        break
                    await asyncio.sleep(0.02)
                assert await inflight() == 1
                held.release.set()
                answer = await call
                assert answer.headers["x-flowline-model-version"] == "drained/2"
                assert await inflight() == 0

        asyncio.run(scenario())
    finally:
        held.stop()


def test_canary_and_shadow_routes_survive_a_gateway_restart(
    logs: Path, scorers: dict[str, RowScorer]
) -> None:
    home = logs / "restart-home"
    env = {"FLOWLINE_ADMIN_TOKEN": ADMIN, "FLOWLINE_HOME": str(home)}
    first = start_gateway(logs, env=env)
    try:
        put(first, "kept", "1", [scorers["v1"].url])
        assert put_variant(first, "kept", "canary", "2", [scorers["v2"].url], weight=100,
                           sticky="X-Caller").is_success  # fmt: skip
        assert put_variant(first, "kept", "shadow", "3", [scorers["label3"].url],
                           sample=0.5).is_success  # fmt: skip
    finally:
        first.stop()
    again = start_gateway(logs, env=env)
    try:
        listed = httpx.get(f"{again.url}/admin/deployments", headers=HEADERS).json()
        (entry,) = listed["deployments"]
        assert entry["canary"]["weight"] == 100 and entry["canary"]["sticky"] == "x-caller"
        assert entry["shadow"]["sample"] == 0.5
        answer = httpx.post(f"{again.url}/models/kept/invocations", content=body(2.0),
                            headers=JSON)  # fmt: skip
        assert answer.headers["x-flowline-model-version"] == "kept/2"
    finally:
        again.stop()
