"""The reconciler's decisions, against an in-memory registry, backend and gateway.

No server runs here: the registry is a stub of the few MlflowClient calls the controller
makes, replicas are fake URLs whose ``/invocations`` answers come from the stub backend,
and the gateway is a route table in a dict. Every stub writes into one event list, so a
test can assert not only what happened but in which order (blue/green: switch, then
drain, then stop). tests/test_deployment_e2e.py runs the same decisions on real servers.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import requests
import yaml
from mlflow.exceptions import MlflowException

import serving.controller.reconciler as reconciler_module
from common.registry import (
    ANALYSIS_ERROR_MODEL_TAG,
    ANALYSIS_MODEL_TAG,
    CACHE_MODEL_TAG,
    CANARY_ALIAS,
    CANARY_ERROR_MODEL_TAG,
    CANARY_MODEL_TAG,
    GATE_OVERRIDE_TAG,
    GATE_REASON_TAG,
    GATE_TAG,
    PRODUCTION_ALIAS,
    PRODUCTION_STAGE,
    RATE_LIMIT_MODEL_TAG,
    REASON_TAG,
    REPLICAS_MODEL_TAG,
    SHADOW_ALIAS,
    SHADOW_ERROR_MODEL_TAG,
    SHADOW_MODEL_TAG,
    STATUS_TAG,
    TIMEOUT_MODEL_TAG,
    gate_blocks,
)
from serving.backends.base import BackendError, Replica
from serving.controller.gateway_client import GatewayError
from serving.controller.reconciler import Reconciler
from serving.deployment import Deployment, Variant

Event = tuple[Any, ...]

EXAMPLE = {"dataframe_split": {"columns": ["x"], "data": [[1.0], [2.0]]}}
INPUTS = [{"type": "double", "name": "x", "required": True}]


# -- the registry --------------------------------------------------------------------------


class Page(list):
    """One page of search_registered_models: a list with the next page's token."""

    token: str | None = None


@dataclass
class Version:
    version: str
    tags: dict[str, str] = field(default_factory=dict)
    current_stage: str = "None"
    example: dict[str, Any] | None = None  # its serving_input_example.json


@dataclass
class RegisteredModel:
    name: str
    aliases: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    versions: dict[str, Version] = field(default_factory=dict)

    @property
    def latest_versions(self) -> list[Version]:
        return list(self.versions.values())


class StubRegistry:
    """The MlflowClient calls the reconciler makes, plus artifact downloads, in memory."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.models: dict[str, RegisteredModel] = {}

    def add_version(self, model: str, version: str, example: dict | None = EXAMPLE) -> None:
        """A registered version whose MLmodel has a signature (and its serving example)."""
        entry = self.models.setdefault(model, RegisteredModel(model))
        entry.versions[version] = Version(version, example=example)

    def promote(self, model: str, version: str) -> None:
        self.models[model].aliases[PRODUCTION_ALIAS] = version

    def demote(self, model: str) -> None:
        self.models[model].aliases.pop(PRODUCTION_ALIAS, None)

    def tags(self, model: str, version: str) -> dict[str, str]:
        return self.models[model].versions[version].tags

    # MlflowClient
    def search_registered_models(self, max_results: int = 100, page_token: str | None = None):
        return Page(self.models.values())

    def get_registered_model(self, name: str) -> RegisteredModel:
        return self.models[name]

    def get_model_version(self, name: str, version: str) -> Version:
        try:
            return self.models[name].versions[str(version)]
        except KeyError:
            raise MlflowException(f"no version {name}/{version}") from None

    def set_model_version_tag(self, name: str, version: str, key: str, value: str) -> None:
        self.events.append(("tag", name, version, key, value))
        self.get_model_version(name, version).tags[key] = value

    def set_registered_model_tag(self, name: str, key: str, value: str) -> None:
        self.events.append(("model_tag", name, key, value))
        self.models[name].tags[key] = value

    def delete_registered_model_tag(self, name: str, key: str) -> None:
        self.events.append(("model_tag_deleted", name, key))
        self.models[name].tags.pop(key, None)

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        self.events.append(("alias", name, alias, version))
        self.models[name].aliases[alias] = version

    def delete_registered_model_alias(self, name: str, alias: str) -> None:
        self.events.append(("alias_deleted", name, alias))
        del self.models[name].aliases[alias]

    # mlflow.artifacts.download_artifacts, for models:/NAME/VERSION/FILE
    def download_artifacts(self, artifact_uri: str, dst_path: str) -> str:
        model, version, filename = artifact_uri.removeprefix("models:/").split("/")
        entry = self.get_model_version(model, version)
        target = Path(dst_path) / filename
        if filename == "MLmodel":
            signature = {"inputs": json.dumps(INPUTS), "outputs": None, "params": None}
            target.write_text(yaml.safe_dump({"signature": signature}))
        elif filename == "serving_input_example.json" and entry.example is not None:
            target.write_text(json.dumps(entry.example))
        else:
            raise MlflowException(f"no artifact {artifact_uri}")
        return str(target)


# -- the backend and its replicas ------------------------------------------------------------


class StubBackend:
    """A `Backend` whose replicas are fake URLs; ``post`` answers for them."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.ports = itertools.count(9001)  # next() is atomic: starts run in threads
        self.alive: set[str] = set()
        self.broken: set[tuple[str, str]] = set()  # versions that fail their smoke test
        self.unstartable: dict[tuple[str, str], str] = {}  # version: BackendError message
        self.left_running: list[Replica] = []

    def start_replica(self, model: str, version: str, model_uri: str) -> Replica:
        assert model_uri == f"models:/{model}/{version}"
        if (model, version) in self.unstartable:
            raise BackendError(self.unstartable[(model, version)])
        replica = Replica(model, version, f"http://127.0.0.1:{next(self.ports)}")
        self.alive.add(replica.url)
        self.events.append(("start", model, version, replica.url))
        return replica

    def is_alive(self, replica: Replica) -> bool:
        return replica.url in self.alive

    def stop_replica(self, replica: Replica) -> None:
        self.alive.discard(replica.url)
        self.events.append(("stop", replica.url))

    def stop_all(self) -> None:
        self.alive.clear()

    def adopt_running(self) -> list[Replica]:
        self.alive.update(r.url for r in self.left_running)
        return list(self.left_running)

    def post(self, url: str, json: dict, timeout: float) -> requests.Response:
        """What the stock scorer of the replica at ``url`` answers to ``json``."""
        base = url.removesuffix("/invocations")
        self.events.append(("smoke", base, json))
        version = next(r for r in self.replicas() if r.url == base)
        response = requests.Response()
        if (version.model, version.version) in self.broken:
            response.status_code = 400
            body: dict[str, Any] = {
                "error_code": "BAD_REQUEST",
                "message": "Encountered an unexpected error while evaluating the model.",
                "stack_trace": "Traceback (most recent call last):\n  ...\n"
                "ValueError: this version is broken on purpose\n",
            }
        else:
            response.status_code = 200
            body = {"predictions": [0] * len(json["dataframe_split"]["data"])}
        response._content = _encoded(body)
        return response

    def replicas(self) -> Iterator[Replica]:
        for event in self.events:
            if event[0] == "start":
                yield Replica(event[1], event[2], event[3])
        yield from self.left_running


def _encoded(body: dict[str, Any]) -> bytes:
    # Module level: inside ``post`` the name ``json`` is the request body (requests' keyword).
    return json.dumps(body).encode()


# -- the gateway ------------------------------------------------------------------------------


class StubGateway:
    """The admin API as the reconciler uses it: a route table in a dict."""

    def __init__(self, events: list[Event]) -> None:
        self.events = events
        self.table: dict[str, Deployment] = {}
        self.variants: dict[tuple[str, str], Variant] = {}
        self.down = False

    def _answer(self) -> None:
        if self.down:
            raise GatewayError("gateway unreachable at http://127.0.0.1:8080: ConnectionError")

    def put(self, deployment: Deployment) -> None:
        self._answer()
        self.events.append(("put", deployment.model, deployment.version, deployment.replicas))
        self.table[deployment.model] = deployment

    def delete(self, model: str) -> None:
        self._answer()
        self.events.append(("delete", model))
        self.table.pop(model, None)
        for key in [k for k in self.variants if k[0] == model]:
            del self.variants[key]  # the gateway drops a model's canary and shadow with it

    def put_variant(self, variant: Variant) -> None:
        self._answer()
        assert variant.model in self.table, "a variant needs its production route first"
        d = variant.deployment
        self.events.append(("put_" + variant.role, d.model, d.version, d.replicas, variant.share))
        self.variants[(variant.model, variant.role)] = variant

    def delete_variant(self, model: str, role: str) -> None:
        self._answer()
        self.events.append(("delete_" + role, model))
        self.variants.pop((model, role), None)

    def routes(self) -> dict[str, dict[str, Any]]:
        self._answer()
        routes = {m: d.to_dict() for m, d in self.table.items()}
        for (model, role), variant in self.variants.items():
            routes[model][role] = variant.to_dict()
        return routes

    def drain(self, replica_urls: list[str], timeout: float) -> bool:
        self._answer()
        self.events.append(("drain", tuple(replica_urls)))
        return True


# -- the fixture ------------------------------------------------------------------------------


@dataclass
class World:
    events: list[Event]
    registry: StubRegistry
    backend: StubBackend
    gateway: StubGateway
    reconciler: Reconciler

    def urls(self, model: str) -> tuple[str, ...]:
        """The replica URLs the gateway routes ``model`` to."""
        return self.gateway.table[model].replicas

    def settled(self, model: str, version: str) -> tuple[str, ...]:
        """Promote ``version``, run a pass, forget its events; the version's URLs."""
        self.registry.promote(model, version)
        self.reconciler.reconcile()
        assert self.gateway.table[model].version == version
        self.events.clear()
        return self.urls(model)


@pytest.fixture
def world(monkeypatch: pytest.MonkeyPatch) -> World:
    events: list[Event] = []
    registry, backend, gateway = StubRegistry(events), StubBackend(events), StubGateway(events)
    monkeypatch.setattr(
        reconciler_module.mlflow.artifacts, "download_artifacts", registry.download_artifacts
    )
    # Only the reconciler's smoke test goes to the stub replicas; nothing else is patched.
    fake_requests = SimpleNamespace(post=backend.post, RequestException=requests.RequestException)
    monkeypatch.setattr(reconciler_module, "requests", fake_requests)
    reconciler = Reconciler(registry, backend, gateway, replicas=1, drain_timeout=1.0)
    return World(events, registry, backend, gateway, reconciler)


def _once(events: list[Event]) -> list[Event]:
    """``events`` without a put of the route that was put last.

    After healing or scaling, the pass's route check compares with the routes it read at
    its start and puts the same route again: idempotent on the gateway (docs/gateway.md).
    """
    kept: list[Event] = []
    for event in events:
        puts = [e for e in kept if e[0] == "put"]
        if event[0] == "put" and puts and puts[-1] == event:
            continue
        kept.append(event)
    return kept


def _status_tags(world: World) -> list[Event]:
    return [e for e in world.events if e[0] == "tag" and e[3] == STATUS_TAG]


# -- desired against actual -------------------------------------------------------------------


def test_a_promoted_version_is_started_smoke_tested_then_routed(world: World) -> None:
    world.registry.add_version("m", "1")
    world.registry.promote("m", "1")
    world.reconciler.reconcile()

    (url,) = world.backend.alive
    assert world.events == [
        ("tag", "m", "1", REASON_TAG, ""),
        ("tag", "m", "1", STATUS_TAG, "deploying"),
        ("start", "m", "1", url),
        ("smoke", url, EXAMPLE),
        ("put", "m", "1", (url,)),
        ("tag", "m", "1", REASON_TAG, ""),
        ("tag", "m", "1", STATUS_TAG, "deployed"),
    ]
    routed = world.gateway.table["m"]
    assert routed.input_example == EXAMPLE
    assert routed.input_columns() == INPUTS
    assert world.reconciler.status()["deployments"][0]["version"] == "1"


def test_a_new_version_is_switched_to_before_the_old_one_drains_and_stops(world: World) -> None:
    world.registry.add_version("m", "1")
    (old,) = world.settled("m", "1")
    world.registry.add_version("m", "2")
    world.registry.promote("m", "2")
    world.reconciler.reconcile()

    (new,) = world.backend.alive
    assert new != old
    assert world.events == [
        ("tag", "m", "2", REASON_TAG, ""),
        ("tag", "m", "2", STATUS_TAG, "deploying"),
        ("start", "m", "2", new),
        ("smoke", new, EXAMPLE),
        ("put", "m", "2", (new,)),
        ("tag", "m", "2", REASON_TAG, ""),
        ("tag", "m", "2", STATUS_TAG, "deployed"),
        ("drain", (old,)),
        ("stop", old),
        ("tag", "m", "1", REASON_TAG, "replaced by version 2"),
        ("tag", "m", "1", STATUS_TAG, "undeployed"),
    ]


def test_a_model_no_longer_in_production_is_unrouted_drained_and_stopped(world: World) -> None:
    world.registry.add_version("m", "1")
    world.registry.add_version("other", "4")
    (url,) = world.settled("m", "1")
    world.settled("other", "4")
    world.registry.demote("m")
    world.reconciler.reconcile()

    assert world.events == [
        ("delete", "m"),
        ("drain", (url,)),
        ("stop", url),
        ("tag", "m", "1", REASON_TAG, "no longer in production"),
        ("tag", "m", "1", STATUS_TAG, "undeployed"),
    ]
    assert set(world.gateway.table) == {"other"}
    assert set(world.reconciler.deployed) == {"other"}


def test_a_converged_state_makes_a_pass_that_changes_nothing(world: World) -> None:
    world.registry.add_version("m", "1")
    world.registry.add_version("n", "3")
    world.settled("m", "1")
    world.settled("n", "3")
    before = dict(world.gateway.table)
    for _ in range(3):
        world.reconciler.reconcile()
    assert world.events == []
    assert world.gateway.table == before
    assert world.reconciler.last_pass is not None


def test_the_legacy_production_stage_is_desired_when_no_alias_is_set(world: World) -> None:
    world.registry.add_version("m", "1")
    world.registry.add_version("m", "2")
    world.registry.models["m"].versions["2"].current_stage = PRODUCTION_STAGE
    world.reconciler.reconcile()
    assert world.gateway.table["m"].version == "2"
    world.events.clear()
    world.registry.promote("m", "1")  # the alias wins over the stage
    world.reconciler.reconcile()
    assert world.gateway.table["m"].version == "1"


def test_a_restarted_gateway_gets_the_route_back_without_a_restart(world: World) -> None:
    world.registry.add_version("m", "1")
    (url,) = world.settled("m", "1")
    world.gateway.table.clear()  # a gateway that came back without its routes
    world.reconciler.reconcile()
    assert world.events == [("put", "m", "1", (url,))]


def test_a_pass_without_the_gateway_heals_and_the_next_one_pushes_the_route(
    world: World,
) -> None:
    world.registry.add_version("m", "1")
    (dead,) = world.settled("m", "1")
    world.gateway.down = True
    world.backend.alive.discard(dead)
    world.reconciler.reconcile()  # the gateway's outage is logged, not raised
    (fresh,) = world.backend.alive
    assert world.events == [("start", "m", "1", fresh), ("stop", dead)]
    assert world.urls("m") == (dead,)  # the gateway never heard of the new replica

    world.events.clear()
    world.gateway.down = False
    world.reconciler.reconcile()
    assert world.events == [("put", "m", "1", (fresh,))]


def test_a_dead_replica_is_replaced_and_the_route_updated(world: World) -> None:
    world.registry.add_version("m", "1")
    (dead,) = world.settled("m", "1")
    world.backend.alive.discard(dead)  # kill -9
    world.reconciler.reconcile()
    (fresh,) = world.backend.alive
    moves = [e for e in world.events if e[0] in ("start", "stop", "put")]
    assert _once(moves) == [("start", "m", "1", fresh), ("stop", dead), ("put", "m", "1", (fresh,))]
    assert not _status_tags(world)  # still the same deployed version


def test_the_replica_count_converges_up_smoke_tested_and_down_drained(world: World) -> None:
    world.registry.add_version("m", "1")
    (first,) = world.settled("m", "1")
    world.registry.models["m"].tags[REPLICAS_MODEL_TAG] = "2"
    world.reconciler.reconcile()
    (second,) = world.backend.alive - {first}
    assert _once(world.events) == [
        ("start", "m", "1", second),
        ("smoke", second, EXAMPLE),
        ("put", "m", "1", (first, second)),
    ]
    world.events.clear()
    world.registry.models["m"].tags[REPLICAS_MODEL_TAG] = "1"
    world.reconciler.reconcile()
    # Off the route first, then drained, then stopped: no request is cut.
    assert _once(world.events) == [
        ("put", "m", "1", (first,)),
        ("drain", (second,)),
        ("stop", second),
    ]


# -- a failed version is not retried ------------------------------------------------------------


def test_a_version_failing_its_smoke_test_is_tagged_failed_and_the_old_one_serves(
    world: World,
) -> None:
    world.registry.add_version("m", "1")
    (old,) = world.settled("m", "1")
    world.registry.add_version("m", "2")
    world.backend.broken.add(("m", "2"))
    world.registry.promote("m", "2")
    world.reconciler.reconcile()

    (new,) = {e[3] for e in world.events if e[0] == "start"}
    assert ("stop", new) in world.events
    assert not [e for e in world.events if e[0] in ("put", "drain", "delete")]
    assert world.backend.alive == {old}
    assert world.gateway.table["m"].version == "1"
    tags = world.registry.tags("m", "2")
    assert tags[STATUS_TAG] == "failed"
    # The reason names the HTTP status and the model's own exception, not a traceback.
    assert tags[REASON_TAG].startswith("smoke test got HTTP 400: ")
    assert tags[REASON_TAG].endswith("ValueError: this version is broken on purpose")
    assert world.registry.tags("m", "1")[STATUS_TAG] == "deployed"
    assert world.reconciler.status()["errors"]["m"] == f"version 2: {tags[REASON_TAG]}"

    # The next passes leave it alone: no replica started, no tag rewritten.
    world.events.clear()
    world.reconciler.reconcile()
    world.reconciler.reconcile()
    assert world.events == []
    assert world.backend.alive == {old}


def test_while_the_wanted_version_is_failed_the_serving_one_is_still_healed(
    world: World,
) -> None:
    world.registry.add_version("m", "1")
    (old,) = world.settled("m", "1")
    world.registry.add_version("m", "2")
    world.backend.broken.add(("m", "2"))
    world.registry.promote("m", "2")
    world.reconciler.reconcile()
    assert world.registry.tags("m", "2")[STATUS_TAG] == "failed"

    world.backend.alive.discard(old)  # version 1's replica dies while 2 stays failed
    world.events.clear()
    world.reconciler.reconcile()
    (fresh,) = world.backend.alive
    moves = [e for e in world.events if e[0] in ("start", "stop", "put")]
    assert _once(moves) == [("start", "m", "1", fresh), ("stop", old), ("put", "m", "1", (fresh,))]
    assert world.gateway.table["m"].version == "1"
    assert world.registry.tags("m", "2")[STATUS_TAG] == "failed"  # and not retried


def test_a_version_whose_replicas_cannot_start_is_failed_with_the_backend_reason(
    world: World,
) -> None:
    world.registry.add_version("m", "1")
    world.registry.models["m"].tags[REPLICAS_MODEL_TAG] = "2"
    world.backend.unstartable[("m", "1")] = "replica of m/1 did not answer /ping within 60s"
    world.registry.promote("m", "1")
    world.reconciler.reconcile()

    assert world.registry.tags("m", "1") == {
        STATUS_TAG: "failed",
        REASON_TAG: "replica of m/1 did not answer /ping within 60s",
    }
    assert "m" not in world.gateway.table and not world.backend.alive
    world.events.clear()
    world.reconciler.reconcile()
    assert world.events == []


def test_a_failed_start_stops_the_replicas_that_did_start(world: World) -> None:
    world.registry.add_version("m", "1")
    world.registry.models["m"].tags[REPLICAS_MODEL_TAG] = "3"
    calls = itertools.count()
    start = world.backend.start_replica

    def second_fails(model: str, version: str, model_uri: str) -> Replica:
        if next(calls) == 1:
            raise BackendError("port taken")
        return start(model, version, model_uri)

    world.backend.start_replica = second_fails
    world.registry.promote("m", "1")
    world.reconciler.reconcile()
    started = {e[3] for e in world.events if e[0] == "start"}
    assert len(started) == 2
    assert {e[1] for e in world.events if e[0] == "stop"} == started
    assert world.registry.tags("m", "1")[REASON_TAG] == "port taken"


def test_a_retry_allows_one_more_rollout_of_a_failed_version(world: World) -> None:
    world.registry.add_version("m", "1")
    world.backend.broken.add(("m", "1"))
    world.registry.promote("m", "1")
    world.reconciler.reconcile()
    assert world.registry.tags("m", "1")[STATUS_TAG] == "failed"

    world.backend.broken.clear()  # fixed, e.g. a dependency came back
    world.reconciler.reconcile()
    assert "m" not in world.gateway.table  # the periodic pass does not retry
    world.reconciler.retry("m", "1")  # a fresh promotion (webhook) does
    world.reconciler.reconcile()
    assert world.gateway.table["m"].version == "1"
    assert world.registry.tags("m", "1") == {STATUS_TAG: "deployed", REASON_TAG: ""}


# -- adoption -----------------------------------------------------------------------------------


def test_replicas_running_at_start_are_adopted_not_restarted(world: World) -> None:
    world.registry.add_version("m", "1")
    world.registry.promote("m", "1")
    running = [
        Replica("m", "1", "http://127.0.0.1:9100"),
        Replica("m", "1", "http://127.0.0.1:9101"),
    ]
    world.backend.left_running = running
    world.registry.models["m"].tags[REPLICAS_MODEL_TAG] = "2"
    # The gateway kept its routes (route table on disk) across the controller's death.
    world.gateway.table["m"] = Deployment("m", "1", tuple(r.url for r in running))

    world.reconciler.adopt(world.backend.adopt_running())
    world.reconciler.reconcile()
    world.reconciler.reconcile()

    assert world.events == []  # no start, no stop, no put, no tag
    adopted = world.reconciler.deployed["m"]
    assert adopted.version == "1" and adopted.replicas == running
    assert adopted.deployment.input_example == EXAMPLE


def test_adopted_replicas_are_routed_when_the_gateway_lost_its_routes(world: World) -> None:
    world.registry.add_version("m", "1")
    world.registry.promote("m", "1")
    world.backend.left_running = [Replica("m", "1", "http://127.0.0.1:9100")]
    world.reconciler.adopt(world.backend.adopt_running())
    world.reconciler.reconcile()
    assert world.events == [("put", "m", "1", ("http://127.0.0.1:9100",))]
    assert world.gateway.table["m"].input_example == EXAMPLE


def test_a_second_running_version_of_an_adopted_model_is_stopped(world: World) -> None:
    # A controller killed mid-rollout leaves the old and the new version running.
    world.registry.add_version("m", "1")
    world.registry.add_version("m", "2")
    world.registry.promote("m", "1")
    world.backend.left_running = [
        Replica("m", "1", "http://127.0.0.1:9100"),
        Replica("m", "2", "http://127.0.0.1:9200"),
    ]
    world.reconciler.adopt(world.backend.adopt_running())
    assert world.events == [("stop", "http://127.0.0.1:9200")]
    assert world.reconciler.deployed["m"].version == "1"


def test_adopted_replicas_of_a_version_no_longer_wanted_are_retired(world: World) -> None:
    world.registry.add_version("m", "1")  # demoted while no controller ran
    world.backend.left_running = [Replica("m", "1", "http://127.0.0.1:9100")]
    world.reconciler.adopt(world.backend.adopt_running())
    world.reconciler.reconcile()
    assert [e for e in world.events if e[0] != "tag"] == [
        ("delete", "m"),
        ("drain", ("http://127.0.0.1:9100",)),
        ("stop", "http://127.0.0.1:9100"),
    ]
    assert world.registry.tags("m", "1")[STATUS_TAG] == "undeployed"


def test_the_models_timeout_tag_reaches_the_route_and_a_bad_one_fails_the_rollout(
    world: World,
) -> None:
    world.registry.add_version("m", "1")
    world.registry.models["m"].tags[TIMEOUT_MODEL_TAG] = "2.5"
    world.settled("m", "1")
    assert world.gateway.table["m"].timeout_s == 2.5
    world.registry.add_version("m", "2")
    world.registry.models["m"].tags[TIMEOUT_MODEL_TAG] = "soon"
    world.registry.promote("m", "2")
    world.reconciler.reconcile()
    assert world.registry.tags("m", "2")[STATUS_TAG] == "failed"
    assert "'timeout_s' must be a number of seconds" in world.registry.tags("m", "2")[REASON_TAG]
    assert world.gateway.table["m"].version == "1"


def test_the_rate_limit_and_cache_tags_reach_the_route_and_bad_ones_fail_the_rollout(
    world: World,
) -> None:
    world.registry.add_version("m", "1")
    world.registry.models["m"].tags[RATE_LIMIT_MODEL_TAG] = "50/second"
    world.registry.models["m"].tags[CACHE_MODEL_TAG] = '{"ttl_s": 60, "max_entries": 100}'
    world.settled("m", "1")
    deployed = world.gateway.table["m"]
    assert deployed.rate_limit == "50/second"
    assert deployed.cache is not None and deployed.cache.ttl_s == 60
    for tag, bad in ((RATE_LIMIT_MODEL_TAG, "lots"), (CACHE_MODEL_TAG, "{")):
        version = str(int(world.gateway.table["m"].version) + 1)
        world.registry.add_version("m", version)
        world.registry.models["m"].tags[tag] = bad
        world.registry.promote("m", version)
        world.reconciler.reconcile()
        assert world.registry.tags("m", version)[STATUS_TAG] == "failed", tag
        assert world.gateway.table["m"].version == "1"
        world.registry.models["m"].tags[tag] = (
            "50/second" if tag == RATE_LIMIT_MODEL_TAG else '{"ttl_s": 60}'
        )


def test_a_version_failed_by_the_gate_is_held_back_until_a_person_overrides_it(
    world: World,
) -> None:
    world.registry.add_version("m", "1")
    (old,) = world.settled("m", "1")
    world.registry.add_version("m", "2")
    reason = "roc_auc 0.61 vs champion version 1 0.93 on this version's test split: worse"
    world.registry.tags("m", "2").update({GATE_TAG: "failed", GATE_REASON_TAG: reason})
    world.registry.promote("m", "2")
    world.reconciler.reconcile()
    world.reconciler.retry("m", "2")  # the promotion's webhook: no way past the gate
    world.reconciler.reconcile()

    # Nothing started, nothing tagged, the champion still serves; status says why.
    assert not [e for e in world.events if e[0] in ("start", "put", "tag")]
    assert world.gateway.table["m"].version == "1" and world.backend.alive == {old}
    error = world.reconciler.status()["errors"]["m"]
    assert error == f"version 2: held back by the champion/challenger gate: {reason}"

    for override, deployed in (("yes", False), ("TRUE", True)):
        world.registry.tags("m", "2")[GATE_OVERRIDE_TAG] = override
        world.reconciler.reconcile()
        assert (world.gateway.table["m"].version == "2") is deployed, override
    assert world.registry.tags("m", "2")[STATUS_TAG] == "deployed"
    assert "m" not in world.reconciler.status()["errors"]


@pytest.mark.parametrize(
    ("tags", "blocks"),
    [
        ({}, False),
        ({GATE_TAG: "passed"}, False),
        ({GATE_TAG: "skipped"}, False),
        ({GATE_TAG: "failed"}, True),
        ({GATE_TAG: "failed", GATE_OVERRIDE_TAG: "false"}, True),
        ({GATE_TAG: "failed", GATE_OVERRIDE_TAG: " true "}, False),
    ],
)
def test_gate_blocks(tags: dict[str, str], blocks: bool) -> None:
    assert gate_blocks(tags) is blocks


# -- canary and shadow --------------------------------------------------------------------------


def _with_canary(world: World, weight: str = '{"weight": 10}') -> tuple[str, ...]:
    """m/1 in production, m/2 registered and named the canary with ``weight``; m/1's URLs."""
    world.registry.add_version("m", "1")
    world.registry.add_version("m", "2")
    production = world.settled("m", "1")
    world.registry.models["m"].aliases[CANARY_ALIAS] = "2"
    world.registry.models["m"].tags[CANARY_MODEL_TAG] = weight
    return production


def test_a_canary_is_started_smoke_tested_and_routed_beside_production(world: World) -> None:
    _with_canary(world, '{"weight": 10, "sticky": "X-User"}')
    world.reconciler.reconcile()
    (url,) = world.gateway.variants[("m", "canary")].deployment.replicas
    assert [e[:3] for e in world.events if e[0] != "tag"] == [
        ("start", "m", "2"),
        ("smoke", url, EXAMPLE),
        ("put_canary", "m", "2"),
    ]
    assert world.gateway.variants[("m", "canary")].share == 10
    assert world.gateway.variants[("m", "canary")].sticky == "x-user"
    assert world.gateway.table["m"].version == "1"  # production untouched
    assert world.registry.tags("m", "2")[STATUS_TAG] == "canary"
    roles = {(d["version"], d["role"]) for d in world.reconciler.status()["deployments"]}
    assert roles == {("1", "production"), ("2", "canary")}
    world.events.clear()
    world.reconciler.reconcile()
    assert world.events == []  # converged: nothing to do


def test_a_new_weight_is_pushed_without_new_replicas(world: World) -> None:
    _with_canary(world)
    world.reconciler.reconcile()
    world.events.clear()
    world.registry.models["m"].tags[CANARY_MODEL_TAG] = '{"weight": 50}'
    world.reconciler.reconcile()
    assert [e[0] for e in world.events] == ["put_canary"]
    assert world.gateway.variants[("m", "canary")].share == 50


def test_removing_the_canary_alias_unroutes_drains_and_stops_its_replicas(world: World) -> None:
    _with_canary(world)
    world.reconciler.reconcile()
    (url,) = world.gateway.variants[("m", "canary")].deployment.replicas
    world.events.clear()
    del world.registry.models["m"].aliases[CANARY_ALIAS]
    world.reconciler.reconcile()
    assert [e for e in world.events if e[0] != "tag"] == [
        ("delete_canary", "m"),
        ("drain", (url,)),
        ("stop", url),
    ]
    assert world.registry.tags("m", "2")[STATUS_TAG] == "undeployed"
    assert url not in world.backend.alive and world.gateway.table["m"].version == "1"


@pytest.mark.parametrize(
    ("tag", "reason"),
    [
        ('{"weight": 150}', "must be from 0 to 100"),
        ('{"weight": -1}', "must be from 0 to 100"),
        ('{"weight": "ten"}', "must be a number"),
        ('{"weight": true}', "must be a number"),
        ("{weight: 10", "is not JSON"),
        ("[10]", "must be a JSON object"),
        ('{"share": 10}', "unknown keys"),
        (None, "needs the tag flowline.canary"),
    ],
)
def test_bad_canary_settings_are_refused_with_the_reason_and_production_serves(
    world: World, tag: str | None, reason: str
) -> None:
    production = _with_canary(world)
    if tag is None:
        del world.registry.models["m"].tags[CANARY_MODEL_TAG]
    else:
        world.registry.models["m"].tags[CANARY_MODEL_TAG] = tag
    world.reconciler.reconcile()
    assert not [e for e in world.events if e[0] in ("start", "put", "put_canary", "stop")]
    assert world.urls("m") == production and world.backend.alive == set(production)
    assert reason in world.registry.models["m"].tags[CANARY_ERROR_MODEL_TAG]
    assert reason in world.reconciler.status()["errors"]["m (canary)"]
    assert "m" not in world.reconciler.status()["errors"]  # production has no error

    world.registry.models["m"].tags[CANARY_MODEL_TAG] = '{"weight": 5}'  # fixed
    world.reconciler.reconcile()
    assert world.gateway.variants[("m", "canary")].share == 5
    assert CANARY_ERROR_MODEL_TAG not in world.registry.models["m"].tags
    assert "m (canary)" not in world.reconciler.status()["errors"]


@pytest.mark.parametrize("role", ["canary", "shadow"])
def test_a_canary_or_shadow_alias_on_the_production_version_is_refused(
    world: World, role: str
) -> None:
    world.registry.add_version("m", "1")
    production = world.settled("m", "1")
    world.registry.models["m"].aliases[role] = "1"
    world.registry.models["m"].tags[CANARY_MODEL_TAG] = '{"weight": 10}'
    world.reconciler.reconcile()
    assert world.events == [
        ("model_tag", "m", f"flowline.{role}.error",
         f"the {role} alias is on the production version 1"),
    ]  # fmt: skip
    assert world.urls("m") == production and not world.gateway.variants


def test_a_running_canary_whose_weight_turns_bad_is_removed_and_production_serves(
    world: World,
) -> None:
    production = _with_canary(world)
    world.reconciler.reconcile()
    world.registry.models["m"].tags[CANARY_MODEL_TAG] = '{"weight": 150}'
    world.reconciler.reconcile()
    assert ("m", "canary") not in world.gateway.variants
    assert world.backend.alive == set(production)
    assert "from 0 to 100" in world.reconciler.status()["errors"]["m (canary)"]


def test_the_gate_holds_a_canary_back_but_not_a_shadow(world: World) -> None:
    _with_canary(world)
    world.registry.tags("m", "2").update({GATE_TAG: "failed", GATE_REASON_TAG: "worse"})
    world.registry.models["m"].aliases[SHADOW_ALIAS] = "2"
    world.reconciler.reconcile()
    assert ("m", "canary") not in world.gateway.variants
    error = world.reconciler.status()["errors"]["m (canary)"]
    assert error == "version 2: held back by the champion/challenger gate: worse"
    shadow = world.gateway.variants[("m", "shadow")]
    assert shadow.deployment.version == "2" and shadow.share == 1.0  # the default sample
    world.registry.models["m"].tags[SHADOW_MODEL_TAG] = '{"sample": 2}'
    world.reconciler.reconcile()
    assert ("m", "shadow") not in world.gateway.variants
    assert "from 0 to 1" in world.registry.models["m"].tags[SHADOW_ERROR_MODEL_TAG]


def test_a_canary_failing_its_smoke_test_is_tagged_failed_and_not_retried(world: World) -> None:
    production = _with_canary(world)
    world.backend.broken.add(("m", "2"))
    world.reconciler.reconcile()
    assert world.registry.tags("m", "2")[STATUS_TAG] == "failed"
    assert "broken on purpose" in world.registry.tags("m", "2")[REASON_TAG]
    assert "broken on purpose" in world.reconciler.status()["errors"]["m (canary)"]
    assert world.backend.alive == set(production) and not world.gateway.variants
    world.events.clear()
    world.reconciler.reconcile()
    assert not [e for e in world.events if e[0] == "start"]
    world.backend.broken.clear()
    world.reconciler.retry("m", "2")  # the alias set again
    world.reconciler.reconcile()
    assert world.gateway.variants[("m", "canary")].deployment.version == "2"


def test_undeploying_production_removes_its_canary_and_shadow(world: World) -> None:
    _with_canary(world)
    world.registry.add_version("m", "3")
    world.registry.models["m"].aliases[SHADOW_ALIAS] = "3"
    world.reconciler.reconcile()
    assert set(world.gateway.variants) == {("m", "canary"), ("m", "shadow")}
    world.registry.demote("m")
    world.reconciler.reconcile()
    assert not world.gateway.table and not world.gateway.variants
    assert world.backend.alive == set()
    assert world.reconciler.status()["deployments"] == []


def test_a_dead_canary_replica_is_replaced_and_a_lost_canary_route_restored(world: World) -> None:
    _with_canary(world)
    world.reconciler.reconcile()
    (url,) = world.gateway.variants[("m", "canary")].deployment.replicas
    world.backend.alive.discard(url)
    world.reconciler.reconcile()
    (fresh,) = world.gateway.variants[("m", "canary")].deployment.replicas
    assert fresh != url and fresh in world.backend.alive
    world.gateway.variants.clear()  # a gateway restarted without its route file
    world.reconciler.reconcile()
    assert world.gateway.variants[("m", "canary")].deployment.replicas == (fresh,)


def test_canary_replicas_running_at_start_are_adopted_in_their_role(world: World) -> None:
    world.registry.add_version("m", "1")
    world.registry.add_version("m", "2")
    world.registry.promote("m", "1")
    world.registry.models["m"].aliases[CANARY_ALIAS] = "2"
    world.registry.models["m"].tags[CANARY_MODEL_TAG] = '{"weight": 20}'
    # The canary's replica is listed first: it must not be taken for production.
    world.backend.left_running = [
        Replica("m", "2", "http://127.0.0.1:9102"),
        Replica("m", "1", "http://127.0.0.1:9101"),
    ]
    world.reconciler.adopt(world.backend.adopt_running())
    world.reconciler.reconcile()
    assert not [e for e in world.events if e[0] in ("start", "stop")]
    assert world.gateway.table["m"].replicas == ("http://127.0.0.1:9101",)
    canary = world.gateway.variants[("m", "canary")]
    assert canary.deployment.replicas == ("http://127.0.0.1:9102",) and canary.share == 20


# -- the canary analysis, wired into the pass -------------------------------------------------


class Analysed:
    """The world with a canary analyst reading a real gateway metrics registry."""

    def __init__(self, world: World, tag: str | None) -> None:
        from prometheus_client import generate_latest

        from serving.controller.analysis import CanaryAnalyst, Sources
        from serving.gateway.metrics import GatewayMetrics

        self.world, self.now, self.alerts = world, 0.0, []
        self.metrics = GatewayMetrics()
        sources = Sources(
            gateway_metrics=lambda: generate_latest(self.metrics.registry).decode(),
            gateway_models=lambda: [],
            post_alert=lambda url, body: self.alerts.append(body),
            webhooks=("http://hook",),
        )
        world.reconciler.analyst = CanaryAnalyst(world.registry, sources, clock=lambda: self.now)
        _with_canary(world)
        if tag is not None:
            world.registry.models["m"].tags[ANALYSIS_MODEL_TAG] = tag
        world.reconciler.reconcile()  # the canary starts, and so does its first interval

    def interval(self, canary_errors: int) -> None:
        for version, errors in (("1", 0), ("2", canary_errors)):
            route = self.metrics.for_route("m", version)
            for i in range(100):
                route.request(500 if i < errors else 200, 0.01, False)
        self.now += 31
        self.world.reconciler.reconcile()


def test_a_failing_canary_is_rolled_back_by_the_pass_and_stopped_by_the_next(
    world: World,
) -> None:
    analysed = Analysed(world, '{"interval_s": 30}')
    assert world.gateway.variants[("m", "canary")].deployment.version == "2"
    analysed.interval(canary_errors=0)
    assert world.registry.tags("m", "2")["flowline.analysis.verdict"] == "passing"
    analysed.interval(canary_errors=30)
    assert CANARY_ALIAS not in world.registry.models["m"].aliases
    assert world.registry.tags("m", "2")["flowline.analysis.check"] == "error_rate"
    assert [a["event"] for a in analysed.alerts] == ["canary_rolled_back"]
    world.reconciler.reconcile()
    assert ("m", "canary") not in world.gateway.variants
    assert world.gateway.table["m"].version == "1"
    # Setting the alias again is refused while the version carries the verdict.
    world.registry.models["m"].aliases[CANARY_ALIAS] = "2"
    world.reconciler.reconcile()
    assert (
        "rolled back by the canary analysis"
        in world.registry.models["m"].tags[CANARY_ERROR_MODEL_TAG]
    )
    assert ("m", "canary") not in world.gateway.variants


def test_a_bad_analysis_tag_is_refused_on_the_model_and_the_canary_keeps_serving(
    world: World,
) -> None:
    analysed = Analysed(world, '{"interval_s": -5}')
    analysed.interval(canary_errors=90)
    tags = world.registry.models["m"].tags
    assert "interval_s" in tags[ANALYSIS_ERROR_MODEL_TAG]
    assert world.gateway.variants[("m", "canary")].deployment.version == "2"
    tags[ANALYSIS_MODEL_TAG] = '{"interval_s": 30}'
    analysed.interval(canary_errors=0)  # starts the interval under the fixed tag
    assert ANALYSIS_ERROR_MODEL_TAG not in tags
