"""The docker backend for real: a real daemon, real per-version images, real containers
serving real HTTP on loopback, driven by a real `flowline up --backend docker`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import mlflow
import pytest
import requests
from mlflow import MlflowClient

from pipelines.train import TrainConfig, train
from serving.backends.docker import RESOURCES_MODEL_TAG, containers_of, remove_containers
from serving.images.builder import LABEL, REPLICA_USER, base_image
from tests.conftest import BIN, subprocess_env, wait_for
from tests.model_fixtures import log_model_with_requirements
from tests.test_platform_hardening import (
    DEADLINE,
    Load,
    Up,
    _text,
    flowline_up,
    served_version,
)

pytestmark = pytest.mark.slow
# A cold build of a TensorFlow environment takes minutes on two cores.
BUILD_DEADLINE = 600.0


@pytest.fixture(scope="module")
def daemon() -> docker.DockerClient:
    """The Docker daemon and the base image; mandatory (never skipped) when CI=true."""
    try:
        client = docker.from_env()
        client.ping()
        client.images.get(base_image())
    except docker.errors.DockerException as exc:
        message = f"the docker tests need dockerd and {base_image()} (make docker): {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return client


@contextlib.contextmanager
def docker_up(tmp: Path, client: docker.DockerClient, *extra: str) -> Iterator[Up]:
    """`flowline up --backend docker`; no container of its home may outlive the test."""
    try:
        with flowline_up(tmp, "--backend", "docker", *extra, FLOWLINE_REPLICA_MEMORY="1g") as up:
            yield up
    finally:
        remove_containers(client, tmp / "home")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, daemon: docker.DockerClient) -> Iterator[Up]:
    """One platform for the module, 2 replicas per version so a kill can be routed around."""
    with docker_up(tmp_path_factory.mktemp("docker"), daemon, "--replicas", "2") as running:
        mlflow.set_tracking_uri(running.url("tracking"))
        try:
            yield running
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _track_the_platform(request: pytest.FixtureRequest) -> None:
    # A test that starts its own platform points MLflow elsewhere; point it back.
    if "up" in request.fixturenames:
        mlflow.set_tracking_uri(request.getfixturevalue("up").url("tracking"))


def _containers(client: docker.DockerClient, up: Up, name: str) -> list:
    return [
        c
        for c in containers_of(client, up.home, all_states=False)
        if c.labels[f"{LABEL}.model"] == name
    ]


def _status_replicas(up: Up, name: str) -> list[dict]:
    status = requests.get(f"{up.url('controller')}/status", timeout=5).json()
    return next((d["replicas"] for d in status["deployments"] if d["model"] == name), [])


def _example(name: str, version: str) -> dict:
    path = mlflow.artifacts.download_artifacts(
        f"models:/{name}/{version}/serving_input_example.json"
    )
    return json.loads(Path(path).read_text())


def _train(name: str, family: str = "sklearn", seed: int = 1) -> str:
    # Versions of one model are switched between here: any retrain passes the gate
    # (an AUC-sized tolerance; the gate's own test is in test_deployment_e2e.py).
    config = TrainConfig(
        family=family, max_evals=1, epochs=2, registered_model=name, seed=seed, gate_tolerance=1.0
    )
    return train(config, report=lambda _: None).version


def _promote(up: Up, name: str, version: str, deadline: float = DEADLINE) -> None:
    """Set the alias and wait until the gateway serves the version; a failed rollout
    fails at once, with its recorded reason."""
    client = MlflowClient()
    client.set_registered_model_alias(name, "production", version)

    def served() -> bool:
        tags = client.get_model_version(name, version).tags
        assert tags.get("flowline.deployment.status") != "failed", tags.get(
            "flowline.deployment.reason"
        )
        return served_version(up.url("gateway"), name) == version

    wait_for(served, f"{name}/{version} to serve", deadline)


@pytest.fixture(scope="module")
def churn(up: Up) -> tuple[str, str, dict]:
    """A real pipelines model (code path, column coercion) served from containers."""
    name = f"churn-{uuid.uuid4().hex[:6]}"
    version = _train(name)
    MlflowClient().set_registered_model_tag(
        name, RESOURCES_MODEL_TAG, '{"cpus": 0.5, "memory": "768m"}'
    )
    _promote(up, name, version, BUILD_DEADLINE)
    return name, version, _example(name, version)


def test_promotion_serves_the_version_from_locked_down_containers(
    up: Up, daemon: docker.DockerClient, churn: tuple[str, str, dict]
) -> None:
    name, version, body = churn
    answer = requests.post(f"{up.url('gateway')}/models/{name}/invocations", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-flowline-model-version"] == f"{name}/{version}"
    assert len(answer.json()["predictions"]) == len(body["dataframe_split"]["data"])

    containers = _containers(daemon, up, name)
    assert len(containers) == 2
    ports = sorted(int(c.labels[f"{LABEL}.port"]) for c in containers)
    assert sorted(int(r["url"].rsplit(":", 1)[1]) for r in _status_replicas(up, name)) == ports
    for container in containers:
        assert container.labels[f"{LABEL}.version"] == version
        config, host = container.attrs["Config"], container.attrs["HostConfig"]
        assert config["User"] == REPLICA_USER
        assert host["NetworkMode"] == "host"
        assert host["CapDrop"] == ["ALL"]
        assert host["NanoCpus"] == 500_000_000
        assert host["Memory"] == 768 * 1024**2
        env = dict(item.split("=", 1) for item in config["Env"])
        assert not [k for k in env if k.startswith(("FLOWLINE_", "MLFLOW_TRACKING"))], env
        # The model is baked into the image: the replica needs no registry credentials.
        assert container.image.labels[f"{LABEL}.version"] == version
    # A compiled version scores with onnxruntime inside the container (the image got it
    # from the version's requirements); the replica says so when it cannot.
    runtime = MlflowClient().get_model_version(name, version).tags["flowline.runtime"]
    assert runtime in ("onnx", "python")
    logs = b"".join(c.logs() for c in containers)
    assert (b"cannot load ONNX graph" in logs) is False, logs[-2000:]


def test_switching_versions_under_load_fails_no_request(
    up: Up, daemon: docker.DockerClient, churn: tuple[str, str, dict]
) -> None:
    name, first, body = churn
    second = _train(name, seed=2)
    url = f"{up.url('gateway')}/models/{name}/invocations"
    with Load(url, body=body) as load:
        _promote(up, name, second)
        switched = time.monotonic()
        wait_for(lambda: load.successes_after(switched) >= 20, "traffic on the new version", 60)
    assert load.failures == [], load.failures[:5]
    wait_for(
        lambda: {c.labels[f"{LABEL}.version"] for c in _containers(daemon, up, name)} == {second},
        "the old containers to be removed",
        DEADLINE,
    )
    # A second promotion of a version reuses its image: nothing is built again.
    image = daemon.images.get(_containers(daemon, up, name)[0].image.id)
    logs_before = sorted((up.home / "images" / "logs").iterdir())
    _promote(up, name, first)
    _promote(up, name, second)
    assert daemon.images.get(_containers(daemon, up, name)[0].image.id).id == image.id
    assert sorted((up.home / "images" / "logs").iterdir()) == logs_before


def test_a_killed_container_is_routed_around_and_replaced(
    up: Up, daemon: docker.DockerClient, churn: tuple[str, str, dict]
) -> None:
    name, _, body = churn
    victim = _containers(daemon, up, name)[0]
    url = f"{up.url('gateway')}/models/{name}/invocations"
    with Load(url, body=body) as load:
        victim.kill()
        killed = time.monotonic()
        wait_for(
            lambda: (
                len(_containers(daemon, up, name)) == 2
                and victim.id not in [c.id for c in _containers(daemon, up, name)]
                and all(r["alive"] for r in _status_replicas(up, name))
            ),
            "a replacement container",
            DEADLINE,
        )
        replaced = time.monotonic()
        wait_for(lambda: load.successes_after(replaced) >= 20, "traffic after the heal", 60)
    # Requests in flight on the killed container may fail; the gateway retries idempotent
    # scoring on the other replica, so none should, and none may after the kill is seen.
    late = [f for f in load.failures if f[0] > killed + 5]
    assert late == [], late[:5]
    assert len(load.failures) <= 2, load.failures[:5]


def test_an_unbuildable_version_fails_its_rollout_and_the_old_keeps_serving(
    up: Up, churn: tuple[str, str, dict]
) -> None:
    name, _, body = churn
    served = served_version(up.url("gateway"), name)
    broken = log_model_with_requirements(name, ["flowline-no-such-package==0.0.1"])
    client = MlflowClient()
    client.set_registered_model_alias(name, "production", broken)
    tags = wait_for(
        lambda: (
            t
            if (t := client.get_model_version(name, broken).tags).get("flowline.deployment.status")
            == "failed"
            else None
        ),
        "the failed tag",
        DEADLINE,
    )
    reason = tags["flowline.deployment.reason"]
    assert "image build failed" in reason and "flowline-no-such-package" in reason, reason
    assert served_version(up.url("gateway"), name) == served
    answer = requests.post(f"{up.url('gateway')}/models/{name}/invocations", json=body, timeout=30)
    assert answer.status_code == 200
    logs = list((up.home / "images" / "logs").glob(f"*v{broken}-*.log"))
    assert logs and "flowline-no-such-package" in logs[0].read_text()
    client.set_registered_model_alias(name, "production", served)


def test_a_killed_controller_adopts_the_running_containers(
    up: Up, daemon: docker.DockerClient, churn: tuple[str, str, dict]
) -> None:
    name, _, body = churn
    before = sorted(c.id for c in _containers(daemon, up, name))
    old = up.pid("controller")
    with Load(f"{up.url('gateway')}/models/{name}/invocations", body=body) as load:
        os.killpg(old, signal.SIGKILL)
        wait_for(
            lambda: up.pid("controller") != old and "controller is back" in _text(up.log),
            "the controller to be restarted",
            DEADLINE,
        )
        wait_for(lambda: _status_replicas(up, name), "the adoption", DEADLINE)
        adopted = time.monotonic()
        wait_for(lambda: load.successes_after(adopted) >= 20, "traffic after the adoption", 60)
    assert load.failures == [], load.failures[:5]
    assert sorted(c.id for c in _containers(daemon, up, name)) == before
    assert all(r["alive"] for r in _status_replicas(up, name))


def test_flowline_image_build_reuses_the_promoted_image(
    up: Up, churn: tuple[str, str, dict]
) -> None:
    name, _, _ = churn
    env = subprocess_env(FLOWLINE_HOME=str(up.home), MLFLOW_TRACKING_URI=up.url("tracking"))
    built = subprocess.run(
        [str(BIN / "flowline"), "image", "build", f"models:/{name}@production"],
        env=env,
        capture_output=True,
        text=True,
        timeout=BUILD_DEADLINE,
    )
    assert built.returncode == 0, built.stderr
    assert "cached flowline-model/" in built.stdout + built.stderr
    missing = subprocess.run(
        [str(BIN / "flowline"), "image", "build", "models:/no-such-model/1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 1
    lines = (missing.stdout + missing.stderr).strip().splitlines()
    assert len(lines) == 1 and "no-such-model" in lines[0] and "Traceback" not in lines[0]


def test_keras_family_serves_from_a_container(up: Up, daemon: docker.DockerClient) -> None:
    name = f"keras-{uuid.uuid4().hex[:6]}"
    version = _train(name, family="keras")
    # One replica: two TensorFlow servers starting at once on 2 cores only cost time.
    MlflowClient().set_registered_model_tag(name, "flowline.replicas", "1")
    _promote(up, name, version, BUILD_DEADLINE)
    body = _example(name, version)
    url = f"{up.url('gateway')}/models/{name}/invocations"
    answer = requests.post(url, json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    assert set(answer.json()["predictions"]) <= {"yes", "no"}
    body["params"] = {"predict_method": "predict_proba"}
    probabilities = requests.post(url, json=body, timeout=30).json()["predictions"]
    assert all(abs(row["yes"] + row["no"] - 1) < 1e-4 for row in probabilities)
    assert len(_containers(daemon, up, name)) == 1


def test_the_deployments_plugin_chooses_the_backend_per_model(
    up: Up, daemon: docker.DockerClient
) -> None:
    name = f"local-{uuid.uuid4().hex[:6]}"
    version = _train(name)
    env = subprocess_env(
        MLFLOW_TRACKING_URI=up.url("tracking"), FLOWLINE_GATEWAY_URL=up.url("gateway")
    )
    argv = [str(BIN / "mlflow"), "deployments", "create", "-t", "flowline", "--name", name]
    argv += ["-m", f"models:/{name}/{version}"]
    bad = subprocess.run(
        [*argv, "--config", "backend=vm"], env=env, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode != 0 and "backend must be one of local, docker" in bad.stderr
    made = subprocess.run(
        [*argv, "--config", "backend=local", "--config", "replicas=1"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr[-2000:]
    assert served_version(up.url("gateway"), name) == version
    # Served by a local process on this docker platform: no container for it, a pid file.
    assert _containers(daemon, up, name) == []
    (replica,) = _status_replicas(up, name)
    port = replica["url"].rsplit(":", 1)[1]
    assert (up.home / "replicas" / f"{port}.json").exists()
    answer = requests.post(
        f"{up.url('gateway')}/models/{name}/invocations", json=_example(name, version), timeout=30
    )
    assert answer.status_code == 200
    MlflowClient().delete_registered_model_alias(name, "production")
    wait_for(lambda: served_version(up.url("gateway"), name) is None, "the undeploy", DEADLINE)


# Last in the module: it stops the module's platform.
def test_ctrl_c_of_flowline_up_leaves_no_container(
    up: Up, daemon: docker.DockerClient, churn: tuple[str, str, dict]
) -> None:
    assert len(containers_of(daemon, up.home)) >= 2
    os.killpg(up.service.pid, signal.SIGINT)
    wait_for(lambda: not up.service.alive(), "flowline up to stop", DEADLINE)
    assert "stopped" in _text(up.log)
    assert containers_of(daemon, up.home) == []
