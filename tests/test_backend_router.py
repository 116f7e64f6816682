"""The per-model backend router and the deployments plugin's --config, with stub backends."""

from __future__ import annotations

import json

import pytest
from mlflow.exceptions import MlflowException

from serving.backends.base import BackendError, Replica
from serving.backends.router import BackendRouter
from serving.deployments_plugin import model_tags_from_config


class StubBackend:
    """Records what it was asked; replicas get consecutive fake URLs."""

    def __init__(self, kind: str, port: int, adoptable: list[Replica] | None = None) -> None:
        self.kind, self.port = kind, port
        self.started: list[Replica] = []
        self.stopped: list[str] = []
        self.adoptable = adoptable or []
        self.stopped_all = False

    def start_replica(self, model: str, version: str, model_uri: str) -> Replica:
        self.port += 1
        replica = Replica(model, version, f"http://127.0.0.1:{self.port}", self.kind)
        self.started.append(replica)
        return replica

    def is_alive(self, replica: Replica) -> bool:
        return replica.handle == self.kind

    def stop_replica(self, replica: Replica) -> None:
        self.stopped.append(replica.url)

    def stop_all(self) -> None:
        self.stopped_all = True

    def adopt_running(self) -> list[Replica]:
        return self.adoptable


def _router(tags: dict[str, str], docker_works: bool = True) -> tuple[BackendRouter, dict]:
    made: dict[str, StubBackend] = {}

    def make(kind: str) -> StubBackend:
        if kind == "docker" and not docker_works:
            raise BackendError("no Docker daemon answers")
        made[kind] = StubBackend(kind, 9000 if kind == "local" else 9100)
        return made[kind]

    return BackendRouter("local", make, tags.get), made


def test_each_model_runs_where_its_tag_says_and_stops_there() -> None:
    router, made = _router({"boxed": "docker"})
    plain = router.start_replica("plain", "1", "models:/plain/1")
    boxed = router.start_replica("boxed", "3", "models:/boxed/3")
    assert [r.model for r in made["local"].started] == ["plain"]
    assert [r.model for r in made["docker"].started] == ["boxed"]
    assert router.is_alive(plain) and router.is_alive(boxed)
    router.stop_replica(boxed)
    assert made["docker"].stopped == [boxed.url] and made["local"].stopped == []
    router.stop_all()
    assert made["local"].stopped_all and made["docker"].stopped_all


def test_a_bad_backend_tag_is_a_clear_rollout_error() -> None:
    router, _ = _router({"odd": "vm"})
    with pytest.raises(BackendError, match="flowline.backend='vm' is invalid"):
        router.start_replica("odd", "1", "models:/odd/1")


def test_an_unreadable_registry_is_a_backend_error() -> None:
    def tag_of(model: str) -> str:
        raise MlflowException("connection refused")

    router = BackendRouter("local", lambda kind: StubBackend(kind, 9000), tag_of)
    with pytest.raises(BackendError, match="could not read m's tags: connection refused"):
        router.start_replica("m", "1", "models:/m/1")


def test_adoption_skips_a_backend_whose_runtime_is_gone() -> None:
    router, made = _router({}, docker_works=False)
    left = Replica("m", "1", "http://127.0.0.1:9001", "local")
    made["local"].adoptable = [left]
    assert router.adopt_running() == [left]
    router.stop_replica(left)
    assert made["local"].stopped == [left.url]


def test_the_default_backend_must_work_at_start() -> None:
    def make(kind: str) -> StubBackend:
        raise BackendError("no Docker daemon answers")

    with pytest.raises(BackendError):
        BackendRouter("docker", make, lambda _: None)


def test_deployments_config_becomes_model_tags() -> None:
    tags = model_tags_from_config(
        {"backend": "docker", "replicas": "3", "cpus": "0.5", "memory": "1g"}
    )
    assert tags["flowline.backend"] == "docker"
    assert tags["flowline.replicas"] == "3"
    assert json.loads(tags["flowline.resources"]) == {"cpus": "0.5", "memory": "1g"}
    assert model_tags_from_config({}) == {}


@pytest.mark.parametrize(
    "config, words",
    [
        ({"backend": "vm"}, "backend must be one of"),
        ({"replicas": "many"}, "replicas must be"),
        ({"replicas": "0"}, "replicas must be"),
        ({"memory": "1 ton"}, "flowline.resources"),
        ({"gpu": "1"}, "unknown --config key(s) gpu"),
    ],
)
def test_bad_deployments_config_changes_nothing(config: dict, words: str) -> None:
    with pytest.raises(MlflowException, match=words.replace("(", r"\(").replace(")", r"\)")):
        model_tags_from_config(config)
