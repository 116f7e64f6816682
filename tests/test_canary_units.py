"""Canary and shadow, module by module: the split, sticky hashing, tag parsing, the route
table and its file, the shadow's comparison, and the admin endpoints (in process).

tests/test_canary_gateway.py runs them through a real gateway process.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from typing import Any

import httpx
import pytest

from common.registry import (
    CanaryConfig,
    parse_canary_tag,
    parse_shadow_tag,
)
from serving.deployment import Deployment, Variant
from serving.gateway import GatewayConfig, RouteTable, create_app
from serving.gateway.canary import bucket, chooser, takes_canary
from serving.gateway.routes import ModelRoute, RouteSnapshot
from serving.gateway.shadow import compare
from tests.helpers_serving import RowScorer, one_column_deployment

ADMIN = {"Authorization": "Bearer admin"}


def deployment(version: str, url: str = "http://127.0.0.1:9001") -> Deployment:
    return Deployment("m", version, (url,))


def canary(weight: float, sticky: str | None = None, version: str = "2") -> Variant:
    return Variant("canary", deployment(version, "http://127.0.0.1:9002"), weight, sticky)


# --- the split -----------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0, 10, 50, 100])
def test_the_random_split_sends_the_weight_share_to_the_canary(weight: float) -> None:
    draw = random.Random(7).random
    taken = sum(takes_canary(weight, None, draw) for _ in range(20_000))
    # Binomial(20000, p): 5 standard deviations is at most 354 requests.
    assert abs(taken - 200 * weight) <= 360


def test_sticky_values_always_land_on_one_version_in_the_weight_proportion() -> None:
    callers = [f"caller-{i}" for i in range(4000)]
    first = [takes_canary(25, c) for c in callers]
    assert [takes_canary(25, c, draw=lambda: 0.0) for c in callers] == first  # no draw used
    assert abs(sum(first) - 1000) <= 150
    assert bucket("caller-1") == bucket("caller-1") and 0 <= bucket("") < 1


def test_the_chooser_pins_versions_and_reads_the_sticky_header() -> None:
    production = ModelRoute(deployment("1"))
    variant = canary(50, "x-user")
    route = ModelRoute(variant.deployment, variant)
    assert chooser("2", None)(production, route) is route
    assert chooser("1", None)(production, route) is production
    assert chooser("7", None)(production, route) is production  # then 404s on the version
    user = next(f"u{i}" for i in range(100) if bucket(f"u{i}") < 0.5)
    for _ in range(20):
        assert chooser(None, {"x-user": user})(production, route) is route
    draw = random.Random(1).random
    picks = Counter(chooser(None, {}, draw)(production, route) is route for _ in range(200))
    assert picks[True] and picks[False]  # no header: the random split


# --- the tags ------------------------------------------------------------------------------


def test_canary_and_shadow_tags_parse_and_refuse() -> None:
    assert parse_canary_tag('{"weight": 10}') == CanaryConfig(10.0, None)
    assert parse_canary_tag('{"weight": 0.5, "sticky": "X-User"}') == CanaryConfig(0.5, "x-user")
    assert parse_shadow_tag(None) == 1.0 and parse_shadow_tag('{"sample": 0.25}') == 0.25
    for bad in ('{"weight": 100.5}', '{"weight": "1"}', '{"weight": NaN}', "{", "null",
                '{"weight": 1, "sticky": ""}', '{"weight": 1, "sticky": "a b"}'):  # fmt: skip
        with pytest.raises(ValueError):
            parse_canary_tag(bad)
    for bad in ('{"sample": 1.5}', '{"sample": -0.1}', '{"rate": 1}', "[]"):
        with pytest.raises(ValueError):
            parse_shadow_tag(bad)


# --- the route table and its file -----------------------------------------------------------


def test_the_route_snapshot_round_trips_variants_and_an_old_file_still_loads() -> None:
    table = RouteTable()
    table.set_active(deployment("1"))
    table.set_variant(canary(10, "x-user"))
    shadow = Variant("shadow", deployment("3", "http://127.0.0.1:9003"), 0.5)
    table.set_variant(shadow)
    snapshot = table.snapshot()
    again = RouteSnapshot.from_dict(json.loads(json.dumps(snapshot.to_dict())))
    assert again == snapshot and len(again.variants) == 2
    restored = RouteTable()
    restored.restore(again)
    assert restored.variant("m", "canary").variant.same_as(canary(10, "x-user"))
    assert restored.variant("m", "shadow").variant.share == 0.5

    old = {"default_model": "m", "deployments": [deployment("1").to_dict()]}  # before canaries
    loaded = RouteSnapshot.from_dict(old)
    assert loaded.variants == () and loaded.deployments[0].version == "1"


def test_variants_need_production_count_in_flight_and_go_with_the_model() -> None:
    table = RouteTable()
    with pytest.raises(KeyError):
        table.set_variant(canary(10))
    table.set_active(deployment("1"))
    assert table.set_variant(canary(10)) is None
    assert table.set_variant(canary(10)) is None  # idempotent
    route, _ = table.admit("m", chooser(None, None, lambda: 0.0))  # draws the canary
    assert route is table.variant("m", "canary")
    assert table.inflight("http://127.0.0.1:9002") == 1
    table.remove("m")
    assert table.variant("m", "canary") is None
    assert table.inflight("http://127.0.0.1:9002") == 1  # still draining
    table.release(route)
    assert table.inflight("http://127.0.0.1:9002") == 0


# --- the shadow's comparison -------------------------------------------------------------------


def test_labels_are_compared_for_equality_and_floats_by_absolute_difference() -> None:
    found = compare([1, 0, "yes", 2.5, {"a": 1}], [1, 1, "yes", 2.0, {"a": 1}])
    assert (found.label_rows, found.equal_rows) == (4, 3)
    assert (found.numeric_rows, found.abs_diff) == (1, 0.5)
    with pytest.raises(ValueError):
        compare([1], [1, 2])


# --- the admin API and the capture, in process ------------------------------------------------


def test_admin_variant_endpoints_validate_and_show_what_they_set() -> None:
    async def scenario() -> None:
        app = create_app(GatewayConfig(admin_token="admin"))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            url = "/admin/deployments/m/canary"
            body = {"deployment": {"version": "2", "replicas": ["http://127.0.0.1:9002"]}}
            assert (await client.put(url, json={**body, "weight": 10})).status_code == 401
            answer = await client.put(url, json={**body, "weight": 10}, headers=ADMIN)
            assert answer.status_code == 404  # no production to stand beside
            prod = {"version": "1", "replicas": ["http://127.0.0.1:9001"]}
            await client.put("/admin/deployments/m", json=prod, headers=ADMIN)
            for bad in ({**body, "weight": 150}, {**body, "weight": "x"}, body,
                        {**body, "weight": 5, "sample": 1}, {"weight": 5}):  # fmt: skip
                answer = await client.put(url, json=bad, headers=ADMIN)
                assert answer.status_code == 400, bad
            answer = await client.put(url, content=b"{", headers=ADMIN)
            assert answer.status_code == 400
            shadow = "/admin/deployments/m/shadow"
            assert (await client.put(shadow, json={**body, "sample": 2}, headers=ADMIN)
                    ).status_code == 400  # fmt: skip
            assert (await client.put("/admin/deployments/m/blue", json=body, headers=ADMIN)
                    ).status_code == 404  # fmt: skip
            ok = await client.put(url, json={**body, "weight": 10, "sticky": "X-User"},
                                  headers=ADMIN)  # fmt: skip
            assert ok.status_code == 200, ok.text
            assert (await client.put(shadow, json=body, headers=ADMIN)).status_code == 200
            listed = (await client.get("/admin/deployments", headers=ADMIN)).json()
            (entry,) = listed["deployments"]
            assert entry["canary"]["weight"] == 10 and entry["canary"]["sticky"] == "x-user"
            assert entry["shadow"]["sample"] == 1.0
            assert (await client.delete(url, headers=ADMIN)).status_code == 200
            assert (await client.delete(url, headers=ADMIN)).status_code == 404
            models = (await client.get("/models")).json()["models"]
            assert models[0]["canary"] is None and models[0]["shadow"]["version"] == "2"

    asyncio.run(scenario())


def test_canary_answers_are_captured_under_their_version_and_shadow_answers_not() -> None:
    production, other = RowScorer(lambda row: 0), RowScorer(lambda row: 1)

    async def scenario() -> None:
        captured: list[tuple[str, str]] = []

        async def on_scored(model: str, version: str, request: Any, predictions: Any) -> None:
            captured.append((version, predictions[0]))

        table = RouteTable()
        table.set_active(Deployment.from_dict(one_column_deployment("m", "1", [production.url]),
                                              model="m"))  # fmt: skip
        canary_deployment = Deployment.from_dict(
            one_column_deployment("m", "2", [other.url]), model="m"
        )
        table.set_variant(Variant("canary", canary_deployment, 50))
        shadow_deployment = Deployment.from_dict(
            one_column_deployment("m", "3", [other.url]), model="m"
        )
        table.set_variant(Variant("shadow", shadow_deployment, 1.0))
        app = create_app(GatewayConfig(), table, on_scored=on_scored)
        gateway = app.state.gateway
        transport = httpx.ASGITransport(app=app)
        body = json.dumps({"dataframe_split": {"columns": ["x"], "data": [[1.0]]}})
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answers = [
                await client.post("/models/m/invocations", content=body,
                                  headers={"content-type": "application/json"})
                for _ in range(40)
            ]  # fmt: skip
            deadline = time.monotonic() + 20
            while len(captured) < 40 or gateway.shadow._tasks:
                assert time.monotonic() < deadline, (len(captured), gateway.shadow._tasks)
                await asyncio.sleep(0.01)
        await gateway.replicas.aclose()
        versions = Counter(a.headers["x-flowline-model-version"] for a in answers)
        assert set(versions) == {"m/1", "m/2"}
        # Each answer captured under the version that gave it, none under the shadow's.
        assert Counter(v for v, _ in captured) == Counter(
            {"1": versions["m/1"], "2": versions["m/2"]}
        )
        assert all(p == (0 if v == "1" else 1) for v, p in captured)
        stats = gateway.shadow.stats("m", "3").to_dict()
        assert stats["mirrored"] == versions["m/1"] and stats["agreement"] == 0.0

    try:
        asyncio.run(scenario())
    finally:
        production.stop()
        other.stop()


def test_a_v2_request_pinned_to_the_canary_version_gets_it() -> None:
    production, other = RowScorer(lambda row: 0), RowScorer(lambda row: 1)

    async def scenario() -> None:
        table = RouteTable()
        prod = one_column_deployment("m", "1", [production.url])
        table.set_active(Deployment.from_dict(prod, model="m"))
        pinned = Deployment.from_dict(one_column_deployment("m", "2", [other.url]), model="m")
        table.set_variant(Variant("canary", pinned, 0))  # weight 0: only pinned requests
        app = create_app(GatewayConfig(), table)
        transport = httpx.ASGITransport(app=app)
        infer = {"inputs": [{"name": "x", "datatype": "FP64", "shape": [1], "data": [1.0]}]}
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            for version, status in (("2", 200), ("1", 200), ("7", 404)):
                answer = await client.post(f"/v2/models/m/versions/{version}/infer", json=infer)
                assert answer.status_code == status, answer.text
                if status == 200:
                    assert answer.headers["x-flowline-model-version"] == f"m/{version}"
                    assert answer.json()["outputs"][0]["data"] == [int(version == "2")]
            assert (await client.get("/v2/models/m/versions/2")).status_code == 200
            plain = await client.post("/v2/models/m/infer", json=infer)
            assert plain.headers["x-flowline-model-version"] == "m/1"  # weight 0
        await app.state.gateway.replicas.aclose()

    try:
        asyncio.run(scenario())
    finally:
        production.stop()
        other.stop()


def test_the_shadow_bound_is_configured() -> None:
    assert GatewayConfig.from_env({"FLOWLINE_SHADOW_MAX_INFLIGHT": "4"}).shadow_max_inflight == 4
    with pytest.raises(ValueError):
        GatewayConfig.from_env({"FLOWLINE_SHADOW_MAX_INFLIGHT": "0"})
