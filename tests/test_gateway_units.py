"""Fast in-process tests of the gateway's parts: wire rules, batcher, route table, app."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response

from common import http_auth
from serving.deployment import BatchingSettings, CacheSettings, Deployment
from serving.gateway import Gateway, GatewayConfig, RouteTable, create_app
from serving.gateway.admin import AdminEndpoints
from serving.gateway.batching import AdaptiveBatcher, Outcome
from serving.gateway.cache import CachedAnswer, LruTtl, ResponseCache, body_digest
from serving.gateway.endpoints import ScoringEndpoints
from serving.gateway.fast_path import ScoringFastPath, scoring_model
from serving.gateway.limits import RateLimiter, cached_item, key_id
from serving.gateway.openapi import build_openapi, type_schema
from serving.gateway.wire import (
    BatchSchema,
    is_json_content_type,
    merge_body,
    parse_tabular,
    scrub_error_body,
    split_predictions,
)

SIGNATURE = {
    "inputs": json.dumps([
        {"type": "double", "name": "a", "required": True},
        {"type": "long", "name": "n", "required": True},
        {"type": "string", "name": "s", "required": False},
    ]),
    "outputs": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}]),
    "params": None,
}  # fmt: skip
SCHEMA = BatchSchema.from_signature_inputs(json.loads(SIGNATURE["inputs"]))


def split_body(rows: list[list[Any]], columns: tuple[str, ...] = ("a", "n", "s"), **extra: Any):
    return json.dumps({"dataframe_split": {"columns": list(columns), "data": rows}, **extra})


# --- wire --------------------------------------------------------------------------------------


def test_json_content_type_follows_the_stock_parser() -> None:
    assert is_json_content_type("application/json")
    assert is_json_content_type("application/json; charset=UTF-8")
    assert not is_json_content_type("application/json; charset=latin-1")
    assert not is_json_content_type("application/json; foo=bar")
    assert not is_json_content_type("Application/JSON")
    assert not is_json_content_type("text/csv")
    assert not is_json_content_type(None)


def test_schema_needs_named_scalar_columns() -> None:
    assert SCHEMA is not None and SCHEMA.float_columns == {"a"}
    tensor = [{"type": "tensor", "tensor-spec": {"dtype": "float64", "shape": [-1, 4]}}]
    assert BatchSchema.from_signature_inputs(tensor) is None
    assert BatchSchema.from_signature_inputs([{"type": "binary", "name": "b"}]) is None
    assert BatchSchema.from_signature_inputs(None) is None


def test_same_kinds_share_a_key_and_floats_absorb_ints_and_nulls() -> None:
    assert SCHEMA is not None
    one = parse_tabular(split_body([[1.5, 2, "x"]]).encode(), SCHEMA, 64)
    two = parse_tabular(split_body([[1, 3, "y"], [None, 4, "z"]]).encode(), SCHEMA, 64)
    assert one is not None and two is not None
    assert one.key == two.key  # ints/nulls in the double column cast the same way
    float_in_long = parse_tabular(split_body([[1.5, 2.5, "x"]]).encode(), SCHEMA, 64)
    null_string = parse_tabular(split_body([[1.5, 2, None]]).encode(), SCHEMA, 64)
    assert float_in_long is not None and float_in_long.key != one.key
    assert null_string is not None and null_string.key != one.key


@pytest.mark.parametrize(
    "body",
    [
        split_body([[1.5, 2, "x"]], index=[0]),  # unknown top-level key
        json.dumps({"dataframe_split": {"columns": ["a"], "data": [[1]], "index": [7]}}),
        json.dumps({"dataframe_split": {"data": [[1, 2, "x"]]}}),  # positional columns
        split_body([]),  # no rows
        split_body([[1.5, 2]]),  # ragged row
        split_body([[1.5, 2, ["x"]]]),  # nested value
        split_body([[1.5, 2, "x"]], columns=("a", "n", "other")),  # not in the signature
        split_body([[1.5, 2, "x"]], columns=("a", "a", "s")),  # duplicate column
        json.dumps({"dataframe_records": [{"a": 1.0, "n": 1}, {"n": 1, "a": 1.0}]}),
        json.dumps({"instances": [{"a": 1.0}]}),
        json.dumps({"inputs": {"a": [1.0]}}),
        json.dumps([1, 2]),
        "not json",
    ],
)
def test_anything_unusual_is_forwarded_unchanged(body: str) -> None:
    assert SCHEMA is not None
    assert parse_tabular(body.encode(), SCHEMA, 64) is None


def test_requests_above_the_batch_size_go_alone() -> None:
    assert SCHEMA is not None
    assert parse_tabular(split_body([[1.0, 1, "x"]] * 5).encode(), SCHEMA, 4) is None


def test_params_are_part_of_the_key() -> None:
    assert SCHEMA is not None
    a = parse_tabular(split_body([[1.0, 1, "x"]], params={"k": 1}).encode(), SCHEMA, 64)
    b = parse_tabular(split_body([[1.0, 1, "x"]], params={"k": 2}).encode(), SCHEMA, 64)
    c = parse_tabular(split_body([[1.0, 1, "x"]]).encode(), SCHEMA, 64)
    assert a is not None and b is not None and c is not None
    assert len({a.key, b.key, c.key}) == 3


def test_merge_and_split_round_trip() -> None:
    assert SCHEMA is not None
    first = parse_tabular(split_body([[1.0, 1, "x"]], params={"k": 1}).encode(), SCHEMA, 64)
    second = parse_tabular(split_body([[2.0, 2, "y"], [3.0, 3, "z"]], params={"k": 1}).encode(),
                           SCHEMA, 64)  # fmt: skip
    assert first is not None and second is not None
    merged = json.loads(merge_body([first, second]))
    assert merged == {
        "dataframe_split": {"columns": ["a", "n", "s"],
                            "data": [[1.0, 1, "x"], [2.0, 2, "y"], [3.0, 3, "z"]]},
        "params": {"k": 1},
    }  # fmt: skip
    parts = split_predictions(b'{"predictions": [0, 1, 0.5]}', [1, 2])
    assert parts == [(b'{"predictions": [0]}', [0]), (b'{"predictions": [1, 0.5]}', [1, 0.5])]
    assert split_predictions(b'{"predictions": [0, 1]}', [1, 2]) is None
    assert split_predictions(b'{"predictions": {"a": 1}}', [1]) is None
    assert split_predictions(b'{"predictions": [1], "extra": 1}', [1]) is None


def test_stack_traces_are_removed_and_the_rest_kept() -> None:
    body = json.dumps({"error_code": "BAD_REQUEST", "message": "m", "stack_trace": "Traceback"})
    assert json.loads(scrub_error_body(body.encode())) == {
        "error_code": "BAD_REQUEST",
        "message": "m",
    }
    plain = b'{"error_code": "BAD_REQUEST", "message": "m"}'
    assert scrub_error_body(plain) is plain


# --- batcher ------------------------------------------------------------------------------------


class FakeReplica:
    """A `send` for the batcher that records calls and answers after a gate opens."""

    def __init__(self, fail_merged: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_merged = fail_merged

    async def send(self, body: bytes, content_type: str | None, kind: str) -> Outcome:
        self.calls.append((kind, json.loads(body)))
        await self.gate.wait()
        rows = json.loads(body)["dataframe_split"]["data"]
        if any(r[0] < 0 for r in rows):  # a "bad" row fails its whole call
            return Outcome(
                400, b'{"error_code": "BAD_REQUEST", "message": "bad"}', "application/json"
            )
        if kind == "batch" and self.fail_merged:
            return Outcome(200, b'{"predictions": "not a list"}', "application/json")
        preds = [r[0] * 10 for r in rows]
        return Outcome(200, json.dumps({"predictions": preds}).encode(), "application/json")


def make_batcher(replica: FakeReplica, **settings: Any) -> AdaptiveBatcher:
    assert SCHEMA is not None
    return AdaptiveBatcher(
        BatchingSettings(**settings), SCHEMA, replica.send, lambda: 1, lambda r, n: None, "t/1"
    )


async def submit(batcher: AdaptiveBatcher, value: float) -> Outcome:
    body = split_body([[value, 1, "x"]]).encode()
    item = parse_tabular(body, batcher.schema, batcher.settings.max_batch_size)
    assert item is not None
    return await batcher.submit(item, body, "application/json")


def test_idle_batcher_sends_at_once_and_unchanged() -> None:
    async def scenario() -> None:
        replica = FakeReplica()
        batcher = make_batcher(replica, max_wait_ms=10_000)
        outcome = await asyncio.wait_for(submit(batcher, 1.0), 5)
        assert outcome.body == b'{"predictions": [10.0]}'
        assert [k for k, _ in replica.calls] == ["single"]

    asyncio.run(scenario())


def test_requests_queued_behind_a_busy_slot_are_merged_and_split() -> None:
    async def scenario() -> None:
        replica = FakeReplica()
        replica.gate.clear()
        batcher = make_batcher(replica, max_batch_size=4, max_wait_ms=10_000)
        tasks = [asyncio.create_task(submit(batcher, float(i))) for i in range(7)]
        while batcher.queued < 6:
            await asyncio.sleep(0)
        replica.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        for i, outcome in enumerate(outcomes):
            assert json.loads(outcome.body) == {"predictions": [i * 10.0]}
        # One alone (the slot was free), then 6 queued ones in batches of at most 4 rows.
        assert [(k, len(b["dataframe_split"]["data"])) for k, b in replica.calls] == [
            ("single", 1), ("batch", 4), ("batch", 2),
        ]  # fmt: skip

    asyncio.run(scenario())


class SlowReplica:
    """A replica whose every call takes `call_s`, whatever its rows (as a real one nearly does)."""

    def __init__(self, call_s: float) -> None:
        self.call_s = call_s
        self.rows: list[int] = []  # rows of each call

    async def send(self, body: bytes, content_type: str | None, kind: str) -> Outcome:
        rows = json.loads(body)["dataframe_split"]["data"]
        self.rows.append(len(rows))
        await asyncio.sleep(self.call_s)
        preds = [r[0] * 10 for r in rows]
        return Outcome(200, json.dumps({"predictions": preds}).encode(), "application/json")


def closed_loop_batch_rows(hold_ms: float, clients: int, requests: int) -> list[int]:
    """Rows per backend call when `clients` callers each send `requests` one after another,
    starting spread over one call's duration as real callers do."""
    replica = SlowReplica(0.02)
    assert SCHEMA is not None
    batcher = AdaptiveBatcher(
        BatchingSettings(max_batch_size=64, max_wait_ms=1000, hold_ms=hold_ms),
        SCHEMA,
        replica.send,
        lambda: 1,
        lambda r, n: None,
        "t/1",
    )

    async def caller(i: int) -> None:
        await asyncio.sleep(replica.call_s * i / clients)
        for _ in range(requests):
            outcome = await submit(batcher, float(i))
            assert json.loads(outcome.body) == {"predictions": [i * 10.0]}
            await asyncio.sleep(0.001)  # the answer's trip back and the next request's

    async def scenario() -> None:
        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(clients))), 60)

    asyncio.run(scenario())
    return replica.rows


def test_holding_the_freed_slot_fills_the_batches_the_two_groups_left_half_empty() -> None:
    without = closed_loop_batch_rows(0.0, 16, 12)
    held = closed_loop_batch_rows(5.0, 16, 12)
    mean_without = sum(without) / len(without)
    mean_held = sum(held) / len(held)
    assert mean_without <= 10  # groups take turns, each call carries a part of the callers
    assert mean_held >= 14 and mean_held >= 1.5 * mean_without, (without, held)


def test_a_lone_caller_never_meets_the_hold() -> None:
    assert closed_loop_batch_rows(5.0, 1, 10) == [1] * 10  # every call went alone, at once


def test_a_bad_request_does_not_fail_its_batch_mates() -> None:
    async def scenario() -> None:
        replica = FakeReplica()
        replica.gate.clear()
        batcher = make_batcher(replica, max_wait_ms=10_000)
        tasks = [asyncio.create_task(submit(batcher, v)) for v in (1.0, 2.0, -1.0, 3.0)]
        while batcher.queued < 3:
            await asyncio.sleep(0)
        replica.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert [o.status for o in outcomes] == [200, 200, 400, 200]
        assert json.loads(outcomes[3].body) == {"predictions": [30.0]}
        assert [k for k, _ in replica.calls] == ["single", "batch"] + ["fallback"] * 3

    asyncio.run(scenario())


def test_answers_that_are_not_row_aligned_disable_batching() -> None:
    async def scenario() -> None:
        replica = FakeReplica(fail_merged=True)
        replica.gate.clear()
        batcher = make_batcher(replica, max_wait_ms=10_000)
        tasks = [asyncio.create_task(submit(batcher, v)) for v in (1.0, 2.0, 3.0)]
        while batcher.queued < 2:
            await asyncio.sleep(0)
        replica.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks), 5)
        assert [json.loads(o.body)["predictions"] for o in outcomes] == [[10.0], [20.0], [30.0]]
        assert batcher.disabled_reason is not None

    asyncio.run(scenario())


def test_max_wait_sends_queued_requests_even_if_the_slot_stays_busy() -> None:
    async def scenario() -> None:
        replica = FakeReplica()
        replica.gate.clear()
        batcher = make_batcher(replica, max_wait_ms=20)
        first = asyncio.create_task(submit(batcher, 1.0))
        while not replica.calls:
            await asyncio.sleep(0)
        second = asyncio.create_task(submit(batcher, 2.0))
        # The first call never finishes until the gate opens; the second must be sent anyway.
        while len(replica.calls) < 2:
            await asyncio.sleep(0.005)
        replica.gate.set()
        assert json.loads((await asyncio.wait_for(second, 5)).body) == {"predictions": [20.0]}
        await asyncio.wait_for(first, 5)

    asyncio.run(asyncio.wait_for(scenario(), 10))


# --- route table -------------------------------------------------------------------------------


def deployment(version: str, replicas: tuple[str, ...]) -> Deployment:
    return Deployment("m", version, replicas, signature=SIGNATURE)


def test_switch_keeps_admitted_requests_on_the_old_route() -> None:
    table = RouteTable()
    table.set_active(deployment("1", ("http://old:1",)))
    route, _ = table.admit("m")
    assert route is not None
    previous = table.set_active(deployment("2", ("http://new:1",)))
    assert previous is not None and previous.version == "1"
    assert table.inflight("http://old:1") == 1
    assert [r.deployment.version for r in table.draining()] == ["1"]
    new_route, _ = table.admit("m")
    assert new_route is not None and new_route.deployment.version == "2"
    table.release(route)
    assert table.inflight("http://old:1") == 0
    assert table.draining() == []
    # Setting the same deployment again (a reconcile loop) keeps the live route.
    again = Deployment("m", "2", ("http://new:1",), signature=SIGNATURE, since=1.0)
    assert table.set_active(again) is None
    assert table.get("m") is new_route
    table.release(new_route)


def test_replica_choice_routes_around_down_replicas() -> None:
    table = RouteTable()
    table.set_active(deployment("1", ("http://a:1", "http://b:1")))
    route = table.get("m")
    assert route is not None
    assert {table.choose_replica(route) for _ in range(4)} == {"http://a:1", "http://b:1"}
    table.mark_down("http://a:1", "refused")
    assert {table.choose_replica(route) for _ in range(4)} == {"http://b:1"}
    assert table.choose_replica(route, exclude=("http://b:1",)) == "http://a:1"
    assert table.replicas_to_probe() == ["http://a:1"]
    table.mark_up("http://a:1")
    assert table.healthy_count(route) == 2
    table.mark_down("http://b:1", "draining", hold=True)  # the controller's mark sticks
    assert table.replicas_to_probe() == []


def test_deployment_json_round_trip_and_validation() -> None:
    d = Deployment.from_dict(
        {"version": 3, "replicas": ["http://x:1/"], "batching": {"max_batch_size": 8}},
        model="m",
    )
    assert d.version == "3" and d.replicas == ("http://x:1",) and d.batching.max_batch_size == 8
    assert Deployment.from_dict(d.to_dict()) == d
    for bad in ({"version": "1"}, {"version": "1", "replicas": []},
                {"version": "1", "replicas": ["x"]}, {"version": "1", "replicas": ["http://x"],
                                                      "colour": 1}):  # fmt: skip
        with pytest.raises(ValueError):
            Deployment.from_dict(bad, model="m")


def test_openapi_has_exact_columns_and_types() -> None:
    spec = build_openapi([deployment("1", ("http://x:1",))], None)
    op = spec["paths"]["/models/m/invocations"]["post"]
    body = op["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    records = body[1]["properties"]["dataframe_records"]["items"]
    assert records["properties"] == {
        "a": {"type": "number", "format": "double"},
        "n": {"type": "integer", "format": "int64"},
        "s": {"type": ["string", "null"]},
    }
    assert records["required"] == ["a", "n"]
    split = body[0]["properties"]["dataframe_split"]["properties"]
    assert split["columns"]["items"]["enum"] == ["a", "n", "s"]


# --- app without replicas ----------------------------------------------------------------------


@pytest.mark.parametrize("fast_path", [False, True], ids=["starlette", "fast-path"])
def test_health_and_errors_without_a_reachable_replica(fast_path: bool) -> None:
    async def scenario() -> None:
        table = RouteTable()
        app: Any = create_app(GatewayConfig(admin_token="t"), table)
        gateway = app.state.gateway
        if fast_path:  # as the gateway process serves it (serving/gateway/server.py)
            app = ScoringFastPath(app, gateway)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            assert (await client.get("/ping")).status_code == 200
            unknown = await client.get("/nope")
            assert unknown.status_code == 404
            assert unknown.json() == {"error_code": "ENDPOINT_NOT_FOUND", "message": "Not Found"}
            wrong_method = await client.get("/invocations")
            assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
            assert wrong_method.json()["error_code"] == "BAD_REQUEST"
            assert (await client.get("/health")).status_code == 503
            answer = await client.post("/invocations", content=b"{}")
            assert answer.status_code == 404
            assert answer.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"
            # A replica nobody listens on: the gateway answers 503 in MLflow's shape.
            table.set_active(deployment("1", ("http://127.0.0.1:9",)))
            answer = await client.post(
                "/models/m/invocations",
                content=split_body([[1.0, 1, "x"]]),
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 503
            assert set(answer.json()) == {"error_code", "message"}
            assert answer.headers["x-flowline-model-version"] == "m/1"
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["models"] == {"m": "unavailable"}
        await gateway.replicas.aclose()

    asyncio.run(scenario())


# --- aiohttp upstream client --------------------------------------------------------------------


async def serve_raw(answers: list[bytes]):
    """A loopback server that replies to each request with the next raw answer."""
    from serving.gateway.upstream import AiohttpUpstream

    received: list[bytes] = []
    queue = list(answers)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while queue:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                received.append(head + await reader.readexactly(length))
                writer.write(queue.pop(0))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = AiohttpUpstream(max_connections=4, keepalive_expiry_s=4, connect_timeout_s=2)
    return server, client, f"http://127.0.0.1:{port}/invocations", received


def test_upstream_client_reads_length_chunked_and_close_delimited_answers() -> None:
    async def scenario() -> None:
        answers = [
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
            b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.0 200 OK\r\n\r\nuntil close",
        ]
        server, client, url, received = await serve_raw(answers)
        async with server:
            first = await client.post(url, b"{}", "application/json", 5)
            assert (first.status, first.content_type, first.body) == (
                200,
                "application/json",
                b"{}",
            )
            second = await client.post(url, b"x", None, 5)
            assert (second.status, second.content_type, second.body) == (
                400,
                "text/plain",
                b"abcde",
            )
            third = await client.post(url, b"x", None, 5)
            assert (third.status, third.body) == (204, b"")
            fourth = await client.post(url, b"x", None, 5)
            assert (fourth.status, fourth.body) == (200, b"until close")
            await client.aclose()
        assert received[0].startswith(b"POST /invocations HTTP/1.1\r\n")
        assert b"Content-Type: application/json\r\n" in received[0]
        assert b"Content-Type" not in received[1]  # none given, none sent (as the client did)

    asyncio.run(scenario())


def test_upstream_client_resends_when_a_kept_alive_connection_was_closed() -> None:
    from serving.gateway.upstream import AiohttpUpstream, UpstreamError

    async def scenario() -> None:
        connections: list[int] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Each connection answers one request, then reads the next and hangs up
            # without a word, like a server whose keep-alive timer just fired.
            connections.append(1)
            for answered in (True, False):
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                await reader.readexactly(length)
                if answered:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/invocations"
        client = AiohttpUpstream(max_connections=4, keepalive_expiry_s=60, connect_timeout_s=2)
        async with server:
            assert (await client.post(url, b"1", None, 5)).body == b"ok"
            assert (await client.post(url, b"2", None, 5)).body == b"ok"
            assert (await client.post(url, b"3", None, 5)).body == b"ok"
        assert len(connections) == 3
        await client.aclose()
        with pytest.raises(UpstreamError) as refused:
            await client.post(url, b"4", None, 5)
        assert refused.value.connect

    asyncio.run(scenario())


def test_the_fast_path_takes_only_the_scoring_paths() -> None:
    assert scoring_model("/invocations") is None
    assert scoring_model("/models/churn-v2/invocations") == "churn-v2"
    for path in ("/models//invocations", "/models/a/b/invocations", "/invocationsx", "/ping"):
        assert scoring_model(path) is False


def test_an_unhandled_error_on_the_fast_path_is_a_500_in_mlflow_shape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        app = create_app(GatewayConfig(admin_token="t"), RouteTable())
        gateway = app.state.gateway

        async def broken(request: Request, model: str | None) -> Response:
            raise RuntimeError("boom")

        monkeypatch.setattr(gateway, "score", broken)
        transport = httpx.ASGITransport(app=ScoringFastPath(app, gateway))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answer = await client.post("/invocations", content=b"{}")
            assert answer.status_code == 500
            assert answer.json() == {
                "error_code": "INTERNAL_ERROR",
                "message": "Internal gateway error.",
            }
            assert (await client.get("/ping")).status_code == 200  # the app's own route

    asyncio.run(scenario())


def test_admin_api_is_off_without_a_token() -> None:
    async def scenario() -> None:
        app = create_app(GatewayConfig(admin_token=None), RouteTable())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            answer = await client.get("/admin/deployments", headers={"Authorization": "Bearer x"})
            assert answer.status_code == 403
            assert answer.json()["error_code"] == "PERMISSION_DENIED"
        await app.state.gateway.replicas.aclose()

    asyncio.run(scenario())


# --- endpoint classes, each handler alone ------------------------------------------------------


def make_request(
    method: str,
    path: str,
    *,
    token: str | None = None,
    body: bytes = b"",
    path_params: dict[str, str] | None = None,
    query: bytes = b"",
    content_type: str | None = None,
) -> Request:
    """A Starlette request as the router would hand it to a handler (no app, no server)."""
    headers = [(b"content-length", str(len(body)).encode())]
    if token is not None:
        headers.append((b"authorization", f"Bearer {token}".encode()))
    if content_type is not None:
        headers.append((b"content-type", content_type.encode()))
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": headers,
        "query_string": query,
        "path_params": path_params or {},
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def decoded(answer: Response) -> Any:
    return json.loads(bytes(answer.body))


def test_bearer_tokens_are_parsed_and_compared_in_one_place() -> None:
    assert http_auth.bearer_token("Bearer  abc ") == "abc"
    assert http_auth.bearer_token("bearer abc") == "abc"  # the scheme is case-insensitive
    assert http_auth.bearer_token("Basic abc") is None
    assert http_auth.bearer_token("Bearer ") is None
    assert http_auth.bearer_token(None) is None
    assert http_auth.bearer_matches("Bearer k2", ["k1", "k2"])
    assert http_auth.bearer_matches("BEARER k1", "k1")
    assert not http_auth.bearer_matches("Bearer k3", ["k1", "k2"])
    assert not http_auth.bearer_matches("Bearer k1", [])
    assert not http_auth.bearer_matches("Bearer  ", "")  # an empty token never matches
    assert not http_auth.bearer_matches(None, "k1")
    assert http_auth.challenge() == {"WWW-Authenticate": "Bearer"}
    assert http_auth.challenge("m") == {"WWW-Authenticate": 'Bearer realm="m"'}


def test_scoring_endpoints_alone() -> None:
    async def scenario() -> None:
        gateway = Gateway(GatewayConfig(api_keys=frozenset({"key"})), RouteTable())
        scoring = ScoringEndpoints(gateway)
        ping = await scoring.ping(make_request("GET", "/ping"))
        assert (ping.status_code, ping.body, ping.media_type) == (200, b"\n", "application/json")
        health = await scoring.health(make_request("GET", "/health"))
        assert health.status_code == 503
        assert decoded(health) == {"status": "unavailable", "models": {}}
        for handler in (scoring.models, scoring.openapi):
            refused = await handler(make_request("GET", "/models", token="nope"))
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            assert decoded(refused)["error_code"] == "UNAUTHENTICATED"
        # /docs without the key is only the key prompt.
        prompt = await scoring.docs(make_request("GET", "/docs", token="nope"))
        assert prompt.status_code == 200 and b'id="key-form"' in prompt.body
        refused = await scoring.invocations(make_request("POST", "/invocations"))
        assert refused.status_code == 401
        # Every scoring answer, refusals too, names the request (a new id each time).
        first_id = refused.headers["x-flowline-request-id"]
        gateway.table.set_active(deployment("1", ("http://127.0.0.1:9",)))
        models = await scoring.models(make_request("GET", "/models", token="key"))
        [state] = decoded(models)["models"]
        assert (state["name"], state["version"], state["state"]) == ("m", "1", "ready")
        assert state["default"] and state["replicas"][0]["inflight"] == 0
        assert state["last_error"] is None
        health = await scoring.health(make_request("GET", "/health"))
        assert health.status_code == 200 and decoded(health)["models"] == {"m": "ready"}
        spec = await scoring.openapi(make_request("GET", "/openapi.json", token="key"))
        assert "/invocations" in decoded(spec)["paths"]
        docs = await scoring.docs(make_request("GET", "/docs", token="key"))
        assert docs.media_type == "text/html" and b"<code>n</code>" in docs.body
        unknown = await scoring.model_invocations(
            make_request(
                "POST",
                "/models/other/invocations",
                token="key",
                body=b"{}",
                path_params={"name": "other"},
                content_type="application/json",
            )
        )
        assert unknown.status_code == 404
        assert decoded(unknown)["error_code"] == "RESOURCE_DOES_NOT_EXIST"
        second_id = unknown.headers["x-flowline-request-id"]
        assert first_id != second_id
        assert first_id.split("-")[0] == second_id.split("-")[0]  # this gateway's prefix
        metrics = await scoring.metrics(make_request("GET", "/metrics"))
        assert b'flowline_gateway_rejected_total{reason="unauthorized"} 3.0' in metrics.body
        await gateway.replicas.aclose()

    asyncio.run(scenario())


def test_admin_endpoints_alone() -> None:
    async def scenario() -> None:
        gateway = Gateway(GatewayConfig(admin_token="adm"), RouteTable())
        admin = AdminEndpoints(gateway)
        wrong = admin.check(make_request("GET", "/admin/deployments", token="x"))
        assert wrong is not None and wrong.status_code == 401
        assert wrong.headers["www-authenticate"] == "Bearer"
        assert decoded(wrong) == {
            "error_code": "UNAUTHENTICATED",
            "message": "Missing or invalid admin token.",
        }
        assert admin.check(make_request("GET", "/admin/deployments", token="adm")) is None
        off = AdminEndpoints(Gateway(GatewayConfig(admin_token=None), RouteTable()))
        denied = await off.list_deployments(make_request("GET", "/admin/deployments", token=""))
        assert denied.status_code == 403
        await off.gateway.replicas.aclose()

        body = json.dumps({"version": "2", "replicas": ["http://r:1"]}).encode()
        put = await admin.put_deployment(
            make_request(
                "PUT", "/admin/deployments/m", token="adm", body=body, path_params={"model": "m"}
            )
        )
        assert put.status_code == 200
        assert decoded(put)["deployment"]["version"] == "2" and decoded(put)["previous"] is None
        got = await admin.get_deployment(
            make_request("GET", "/admin/deployments/m", token="adm", path_params={"model": "m"})
        )
        assert decoded(got)["replica_states"] == [
            {"url": "http://r:1", "healthy": True, "active": 0, "last_error": None}
        ]
        listed = await admin.list_deployments(
            make_request("GET", "/admin/deployments", token="adm")
        )
        assert [d["version"] for d in decoded(listed)["deployments"]] == ["2"]
        down = json.dumps({"url": "http://r:1/", "healthy": False}).encode()
        marked = await admin.replica_health(
            make_request("POST", "/admin/replicas/health", token="adm", body=down)
        )
        assert decoded(marked) == {"url": "http://r:1", "healthy": False}
        bad = await admin.replica_health(
            make_request("POST", "/admin/replicas/health", token="adm", body=b"{}")
        )
        assert bad.status_code == 400
        inflight = await admin.inflight(
            make_request("GET", "/admin/inflight", token="adm", query=b"replica=http://r:1")
        )
        assert decoded(inflight) == {"replica": "http://r:1", "inflight": 0, "generation": 0}
        removed = await admin.delete_deployment(
            make_request("DELETE", "/admin/deployments/m", token="adm", path_params={"model": "m"})
        )
        assert decoded(removed)["removed"]["version"] == "2"
        missing = await admin.get_deployment(
            make_request("GET", "/admin/deployments/m", token="adm", path_params={"model": "m"})
        )
        assert missing.status_code == 404
        assert decoded(missing)["message"] == "Model 'm' is not deployed."
        await gateway.replicas.aclose()

    asyncio.run(scenario())


def test_object_columns_get_a_schema_in_both_spellings_of_their_properties() -> None:
    from mlflow.types.schema import Array, DataType, Object, Property

    spec = Object([Property("a", DataType.long), Property("b", Array(DataType.string))]).to_dict()
    expected = {
        "type": "object",
        "properties": {
            "a": {"type": "integer", "format": "int64"},
            "b": {"type": "array", "items": {"type": "string"}},
        },
    }
    assert type_schema(spec) == expected
    as_list = dict(spec, properties=[{"name": k, **v} for k, v in spec["properties"].items()])
    assert type_schema(as_list) == expected


def test_a_deployments_timeout_is_a_positive_number_of_seconds() -> None:
    d = Deployment.from_dict({"version": "1", "replicas": ["http://x:1"], "timeout_s": 2}, "m")
    assert d.timeout_s == 2.0 and Deployment.from_dict(d.to_dict()) == d
    assert Deployment.from_dict({"version": "1", "replicas": ["http://x:1"]}, "m").timeout_s is None
    for bad in ("soon", 0, -1, float("inf"), [1]):
        with pytest.raises(ValueError, match="timeout_s"):
            Deployment.from_dict(
                {"version": "1", "replicas": ["http://x:1"], "timeout_s": bad}, "m"
            )


# --- rate limits and the response cache ---------------------------------------------------------


def test_rate_limits_and_cache_settings_in_the_deployment_contract() -> None:
    base = {"version": "1", "replicas": ["http://x:1"]}
    old = Deployment.from_dict(base, "m")
    assert old.rate_limit is None and old.cache is None
    d = Deployment.from_dict(
        {**base, "rate_limit": " 50/second ", "cache": {"ttl_s": 5, "max_entries": 3}}, "m"
    )
    assert d.rate_limit == "50/second"
    assert d.cache == CacheSettings(ttl_s=5.0, max_entries=3)
    assert Deployment.from_dict(d.to_dict()) == d
    assert Deployment.from_dict({**base, "cache": {}}, "m").cache == CacheSettings()
    for bad in ("fast", "", "1/second;5/minute", 5):
        with pytest.raises(ValueError, match="rate limit"):
            Deployment.from_dict({**base, "rate_limit": bad}, "m")
    for bad_cache in ({"ttl_s": 0}, {"max_entries": 0}, {"size": 1}, [1], {"ttl_s": "x"}):
        with pytest.raises(ValueError, match="cache"):
            Deployment.from_dict({**base, "cache": bad_cache}, "m")


def test_rate_limit_setting_is_validated_and_names_the_variable() -> None:
    assert GatewayConfig.from_env({}).rate_limits is None
    assert GatewayConfig.from_env({}).redis_url is None
    config = GatewayConfig.from_env(
        {"FLOWLINE_RATE_LIMITS": "100/second", "FLOWLINE_REDIS_URL": "redis://127.0.0.1:6379/0"}
    )
    assert config.rate_limits == "100/second" and config.redis_prefix == "flowline:"
    with pytest.raises(ValueError, match="FLOWLINE_RATE_LIMITS"):
        GatewayConfig.from_env({"FLOWLINE_RATE_LIMITS": "lots"})
    with pytest.raises(ValueError, match="redis_url"):
        GatewayConfig(redis_url="http://127.0.0.1:6379")


def test_budget_identities_hash_the_key() -> None:
    assert key_id(None) == "anonymous"
    assert key_id("secret") != key_id("other")
    assert "secret" not in key_id("secret") and len(key_id("secret")) == 32


def test_moving_window_limiter_refuses_with_seconds_to_wait() -> None:
    async def scenario() -> None:
        limiter = RateLimiter()
        item = cached_item("3/2 seconds")
        verdicts = [await limiter.check(item, "m", "a") for _ in range(4)]
        assert [v.allowed for v in verdicts] == [True, True, True, False]
        assert 1 <= verdicts[-1].retry_after_s <= 2
        # Another key and another model have budgets of their own.
        assert (await limiter.check(item, "m", "b")).allowed
        assert (await limiter.check(item, "other", "a")).allowed

    asyncio.run(scenario())


def test_limiter_fails_open_and_backs_off_when_redis_is_down() -> None:
    async def scenario() -> None:
        errors: list[int] = []
        limiter = RateLimiter("redis://127.0.0.1:9/0", on_store_error=lambda: errors.append(1))
        item = cached_item("1/second")
        assert all([(await limiter.check(item, "m", "a")).allowed for _ in range(5)])
        assert errors == [1]  # asked once, then skipped during the back-off

    asyncio.run(scenario())


def test_cache_keys_are_canonical_json_or_raw_bytes_with_the_type() -> None:
    json_type = "application/json"
    assert body_digest(b'{"a": 1, "b": [1, 2]}', json_type) == body_digest(
        b'{"b":[1,2],"a":1}', json_type
    )
    assert body_digest(b'{"a": 1}', json_type) != body_digest(b'{"a": 2}', json_type)
    assert body_digest(b"a,b\n1,2\n", "text/csv") != body_digest(b"a,b\n1,2\n", "text/plain")
    assert body_digest(b"not json", json_type) == body_digest(b"not json", json_type)
    cache = ResponseCache()
    assert cache.key("m", "1", b"{}", json_type) != cache.key("m", "2", b"{}", json_type)
    assert cache.key("m", "1", b"{}", json_type).startswith("flowline:cache:m:1:")


def test_lru_ttl_store_bounds_entries_and_expires_them() -> None:
    store = LruTtl(max_entries=2)
    answer = CachedAnswer(b"{}", "application/json")
    store.put("a", answer, 60)
    store.put("b", answer, 60)
    assert store.get("a") == answer  # a is now the most recently used
    store.put("c", answer, 60)
    assert store.get("b") is None and store.get("a") == answer and len(store) == 2
    store.put("d", answer, 1e-9)
    assert store.get("d") is None
    assert CachedAnswer.decode(answer.encode()) == answer
    assert CachedAnswer.decode(CachedAnswer(b"x\ny", None).encode()) == CachedAnswer(b"x\ny", None)


def test_limits_and_cache_in_process_without_changing_uncached_answers() -> None:
    async def scenario() -> None:
        server = await serve_counting()
        try:
            captured: list[bool] = []

            async def on_scored(model: str, version: str, request: Any, predictions: Any) -> None:
                captured.append(request.cached)

            config = GatewayConfig(api_keys=frozenset({"k1", "k2"}))
            gateway = Gateway(config, RouteTable(), on_scored=on_scored)
            scoring = ScoringEndpoints(gateway)
            limited = Deployment(
                "m", "1", (server.url,), rate_limit="2/minute", cache=CacheSettings(60, 10)
            )
            gateway.table.set_active(limited)
            gateway.table.set_active(Deployment("plain", "1", (server.url,)))

            async def call(model: str, key: str, body: bytes) -> Response:
                request = make_request(
                    "POST",
                    f"/models/{model}/invocations",
                    token=key,
                    body=body,
                    path_params={"name": model},
                    content_type="application/json",
                )
                return await scoring.model_invocations(request)

            first = await call("m", "k1", b'{"inputs": [1], "x": 2}')
            assert first.headers["x-flowline-cache"] == "miss"
            again = await call("m", "k1", b'{"x":2,"inputs":[1]}')
            assert again.headers["x-flowline-cache"] == "hit" and again.body == first.body
            assert again.headers["x-flowline-model-version"] == "m/1"
            over = await call("m", "k1", b"{}")
            assert over.status_code == 429 and int(over.headers["retry-after"]) >= 1
            assert decoded(over)["error_code"] == "REQUEST_LIMIT_EXCEEDED"
            assert (await call("m", "k2", b"{}")).status_code == 200
            assert server.calls == 2  # the hit and the 429 cost no replica call
            plain = await call("plain", "k1", b"{}")
            assert plain.status_code == 200 and "x-flowline-cache" not in plain.headers
            await gateway.capture.drain()
            assert captured == [False, True, False, False]  # the hit is captured, marked
            text = (await scoring.metrics(make_request("GET", "/metrics"))).body.decode()
            assert 'flowline_gateway_rate_limited_total{model="m"} 1.0' in text
            assert 'flowline_gateway_cache_lookups_total{model="m",result="hit"} 1.0' in text
            await gateway.replicas.aclose()
        finally:
            await server.stop()

    asyncio.run(scenario())


class _CountingServer:
    def __init__(self, server: asyncio.Server) -> None:
        self.server = server
        self.calls = 0
        port = server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def serve_counting() -> _CountingServer:
    """A loopback HTTP/1.1 replica answering every POST with {"predictions": [n]}."""
    holder: list[_CountingServer] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                holder[0].calls += 1
                body = json.dumps({"predictions": [holder[0].calls]}).encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    holder.append(_CountingServer(server))
    return holder[0]


# --- capture dispatcher ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_captures_of_one_loop_turn_share_one_delivery_in_order(kind: str) -> None:
    from serving.gateway.capture import CaptureDispatcher, CapturedRequest

    seen: list[str] = []
    dropped: list[int] = []

    async def async_hook(model: str, version: str, request: CapturedRequest, predictions: Any):
        seen.append(request.request_id or "")

    def sync_hook(model: str, version: str, request: CapturedRequest, predictions: Any) -> None:
        seen.append(request.request_id or "")

    async def scenario() -> None:
        hook = async_hook if kind == "async" else sync_hook
        dispatcher = CaptureDispatcher(hook, lambda: dropped.append(1), limit=150)
        for i in range(200):
            request = CapturedRequest(b"{}", "application/json", request_id=str(i))
            dispatcher.submit("m", "1", request, b'{"predictions": [1]}', None)
        await asyncio.sleep(0)  # the turn ends: its delivery starts
        assert len(dispatcher._tasks) == 1
        await dispatcher.drain()
        # Past the limit of 150 waiting captures the rest are dropped and counted.
        assert seen == [str(i) for i in range(150)] and len(dropped) == 50
        request = CapturedRequest(b"{}", "application/json", request_id="later")
        dispatcher.submit("m", "1", request, b'{"predictions": [1]}', [1])
        await dispatcher.drain()
        assert seen[-1] == "later"

    asyncio.run(scenario())
