"""Promotion deploys: the real platform (tracking server, gateway, controller, replicas)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from common.processes import free_port, free_port_block
from common.registry import (
    ANALYSIS_MODEL_TAG,
    CANARY_ALIAS,
    CANARY_ERROR_MODEL_TAG,
    CANARY_MODEL_TAG,
    GATE_CHALLENGER_TAG,
    GATE_CHAMPION_TAG,
    GATE_CHAMPION_VERSION_TAG,
    GATE_METRIC_TAG,
    GATE_OVERRIDE_TAG,
    GATE_REASON_TAG,
    GATE_TAG,
    SHADOW_ALIAS,
    gate_blocks,
)
from flowline.config import Ports
from flowline.platform import Platform
from pipelines import gate
from pipelines.data import DEMO_DATA
from pipelines.train import TrainConfig, train
from serving.controller.webhooks import signature
from tests.conftest import BIN, subprocess_env, wait_for
from tests.model_fixtures import log_broken_version, log_flaky_version

pytestmark = pytest.mark.slow
DEADLINE = 120.0
_wait_for = partial(wait_for, timeout=DEADLINE)


def _ports() -> Ports:
    # Replicas take consecutive ports: start them below the kernel's ephemeral range,
    # where free_port()'s answers and every outgoing connection live.
    return Ports(
        tracking=free_port(), gateway=free_port(), controller=free_port(),
        monitor=free_port(), replicas_from=free_port_block(20),
    )  # fmt: skip


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """`flowline up` in a fresh home, 2 replicas per version, a fast reconcile loop."""
    home = tmp_path_factory.mktemp("platform")
    running = Platform(home=home, ports=_ports(), replicas=2, reconcile_interval=1.0)
    # Small drift windows, so the canary analysis sees a verdict on a canary's own traffic
    # within seconds; the roles read it at start.
    previous = os.environ.get("FLOWLINE_WINDOW_ROWS")
    os.environ["FLOWLINE_WINDOW_ROWS"] = "100"
    try:
        running.start()
    finally:
        if previous is None:
            os.environ.pop("FLOWLINE_WINDOW_ROWS")
        else:
            os.environ["FLOWLINE_WINDOW_ROWS"] = previous
    mlflow.set_tracking_uri(running.tracking.url)
    try:
        yield running
    finally:
        running.stop()
        mlflow.set_tracking_uri(None)


@pytest.fixture(autouse=True)
def _track_the_platform(request: pytest.FixtureRequest) -> None:
    # Tests that start their own platform point MLflow elsewhere; point it back.
    if "platform" in request.fixturenames:
        mlflow.set_tracking_uri(request.getfixturevalue("platform").tracking.url)


def _gateway(platform: Platform) -> str:
    return f"http://{platform.host}:{platform.ports.gateway}"


def _served_version(platform: Platform, name: str) -> str | None:
    models = requests.get(f"{_gateway(platform)}/models", timeout=5).json()["models"]
    return next((str(m["version"]) for m in models if m["name"] == name), None)


def _status_tag(client: MlflowClient, name: str, version: str) -> str | None:
    return client.get_model_version(name, version).tags.get("flowline.deployment.status")


# These tests switch between retrains of one model; the gate has its own test below, so
# they let any retrain through (an AUC-sized tolerance).
ANY_RETRAIN = 1.0


# Trained versions, once per tracking server and seed: every test then registers a copy
# under its own model name (the same run's artifacts), as a retrain would be registered.
_TRAINED: dict[tuple[str, int], Any] = {}


def _train(name: str, seed: int = 1) -> str:
    """A new version of ``name``: the model trained with ``seed`` on this tracking server."""
    key = (mlflow.get_tracking_uri(), seed)
    if key not in _TRAINED:
        config = TrainConfig(
            max_evals=1,
            registered_model=f"trained-{seed}-{uuid.uuid4().hex[:6]}",
            seed=seed,
            gate_tolerance=ANY_RETRAIN,
        )
        _TRAINED[key] = train(config, report=lambda _: None)
    trained = _TRAINED[key]
    return str(mlflow.register_model(trained.source, name, tags=trained.tags).version)


def _example(name: str, version: str) -> dict:
    path = mlflow.artifacts.download_artifacts(
        f"models:/{name}/{version}/serving_input_example.json"
    )
    return json.loads(Path(path).read_text())


def _score(platform: Platform, name: str, body: dict) -> requests.Response:
    return requests.post(f"{_gateway(platform)}/models/{name}/invocations", json=body, timeout=30)


def test_alias_promotion_deploys_and_switches_without_failing_a_request(platform: Platform) -> None:
    name = f"churn-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    first, second = _train(name, seed=1), _train(name, seed=2)
    body = _example(name, first)

    client.set_registered_model_alias(name, "production", first)
    _wait_for(lambda: _served_version(platform, name) == first, "version 1 to serve")
    response = _score(platform, name, body)
    assert response.status_code == 200
    assert response.headers["x-flowline-model-version"] == f"{name}/{first}"
    assert len(response.json()["predictions"]) == len(body["dataframe_split"]["data"])
    _wait_for(lambda: _status_tag(client, name, first) == "deployed", "the deployed tag")

    statuses: Counter = Counter()
    versions: Counter = Counter()
    stop = threading.Event()

    def load() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(
                    f"{_gateway(platform)}/models/{name}/invocations", json=body, timeout=30
                )
                statuses[r.status_code] += 1
                versions[r.headers.get("x-flowline-model-version")] += 1

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        client.set_registered_model_alias(name, "production", second)
        _wait_for(lambda: versions[f"{name}/{second}"] >= 20, "traffic on version 2")
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
    assert set(statuses) == {200}, statuses
    assert versions[f"{name}/{first}"] > 0 and versions[f"{name}/{second}"] > 0
    _wait_for(
        lambda: (
            client.get_model_version(name, first).tags.get("flowline.deployment.status")
            == "undeployed"
        ),
        "the old version to be retired",
    )

    client.delete_registered_model_alias(name, "production")
    _wait_for(lambda: _served_version(platform, name) is None, "the undeploy")
    assert _score(platform, name, body).status_code == 404


def _controller_status(platform: Platform) -> dict[str, Any]:
    url = f"http://{platform.host}:{platform.ports.controller}/status"
    return requests.get(url, timeout=5).json()


def _model_state(platform: Platform, name: str) -> dict[str, Any] | None:
    models = requests.get(f"{_gateway(platform)}/models", timeout=5).json()["models"]
    return next((m for m in models if m["name"] == name), None)


def _answering(platform: Platform, name: str, body: dict, count: int = 20) -> set[str]:
    """The versions that answered `count` requests (each must succeed)."""
    seen = set()
    for _ in range(count):
        answer = _score(platform, name, body)
        assert answer.status_code == 200, answer.text
        seen.add(answer.headers["x-flowline-model-version"])
    return seen


def _up(url: str) -> bool:
    try:
        return requests.get(f"{url}/ping", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_canary_and_a_shadow_set_in_the_registry_serve_beside_production(
    platform: Platform,
) -> None:
    name = f"canary-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    first, second = _train(name, seed=1), _train(name, seed=2)
    body = _example(name, first)
    client.set_registered_model_alias(name, "production", first)
    _wait_for(lambda: _served_version(platform, name) == first, "production")

    def refusal() -> str:
        return client.get_registered_model(name).tags.get(CANARY_ERROR_MODEL_TAG, "")

    # Refused: a weight of 150, then a canary alias on the production version itself.
    client.set_registered_model_tag(name, CANARY_MODEL_TAG, '{"weight": 150}')
    client.set_registered_model_alias(name, CANARY_ALIAS, second)
    _wait_for(lambda: "from 0 to 100" in refusal(), "the weight to be refused")
    assert "from 0 to 100" in _controller_status(platform)["errors"][f"{name} (canary)"]
    assert _answering(platform, name, body) == {f"{name}/{first}"}
    client.set_registered_model_tag(name, CANARY_MODEL_TAG, '{"weight": 50}')
    client.set_registered_model_alias(name, CANARY_ALIAS, first)
    _wait_for(lambda: "production version" in refusal(), "the alias to be refused")
    assert _answering(platform, name, body) == {f"{name}/{first}"}

    # A good canary: both versions answer, the refusal is gone.
    client.set_registered_model_alias(name, CANARY_ALIAS, second)
    both = {f"{name}/{first}", f"{name}/{second}"}
    _wait_for(lambda: _answering(platform, name, body) == both, "both versions to answer")
    _wait_for(lambda: refusal() == "", "the refusal tag to be removed")
    # The role's tag is written just after its route is put: poll for it.
    _wait_for(lambda: _status_tag(client, name, second) == "canary", "the canary tag")
    (canary,) = [d for d in _controller_status(platform)["deployments"] if d["role"] == "canary"]
    assert canary["version"] == second and canary["weight"] == 50
    urls = [r["url"] for r in canary["replicas"]]

    # The alias removed: the canary's replicas drain and stop; production alone answers.
    client.delete_registered_model_alias(name, CANARY_ALIAS)
    _wait_for(lambda: not any(_up(u) for u in urls), "the canary's replicas to stop")
    assert _model_state(platform, name)["canary"] is None
    assert _answering(platform, name, body) == {f"{name}/{first}"}
    _wait_for(lambda: _status_tag(client, name, second) == "undeployed", "the undeployed tag")

    # A shadow: callers only ever get production; its agreement is reported.
    client.set_registered_model_alias(name, SHADOW_ALIAS, second)
    _wait_for(lambda: (_model_state(platform, name) or {}).get("shadow"), "the shadow route")
    assert _answering(platform, name, body, 30) == {f"{name}/{first}"}

    def compared() -> dict[str, Any] | None:
        shadow = _model_state(platform, name)["shadow"]
        return shadow if shadow["mirrored"] >= 10 else None

    shadow = _wait_for(compared, "the shadow to compare answers")
    assert shadow["version"] == second and 0 <= shadow["agreement"] <= 1
    shadow_urls = [
        r["url"] for d in _controller_status(platform)["deployments"] if d["role"] == "shadow"
        for r in d["replicas"]
    ]  # fmt: skip
    client.delete_registered_model_alias(name, "production")  # the shadow goes with it
    _wait_for(lambda: _model_state(platform, name) is None, "the undeploy")
    _wait_for(lambda: not any(_up(u) for u in shadow_urls), "the shadow's replicas to stop")


class Load:
    """Callers scoring a model from 4 threads, counting answers by version and status."""

    def __init__(self, platform: Platform, name: str, frame: Any, rows: int = 5) -> None:
        self.url = f"{_gateway(platform)}/models/{name}/invocations"
        self.frame, self.rows = frame, rows
        self.answers: Counter = Counter()  # (version header, status)
        self.stop = threading.Event()
        self.workers = [threading.Thread(target=self._load, args=(i,)) for i in range(4)]

    def _load(self, seed: int) -> None:
        with requests.Session() as session:
            for i in itertools.count():
                if self.stop.is_set():
                    return
                chunk = self.frame.sample(self.rows, random_state=seed * 100_000 + i)
                split = json.loads(chunk.to_json(orient="split", index=False))
                r = session.post(self.url, json={"dataframe_split": split}, timeout=30)
                self.answers[(r.headers.get("x-flowline-model-version"), r.status_code)] += 1

    def __enter__(self) -> Load:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(timeout=60)

    def of(self, label: str) -> dict[int, int]:
        """Answers of one version by status."""
        return {s: n for (v, s), n in self.answers.items() if v == label}


def _rolled_back(client: MlflowClient, name: str, version: str) -> bool:
    tags = client.get_model_version(name, version).tags
    return tags.get("flowline.analysis.verdict") == "failed"


def _canary_beside_production(
    platform: Platform,
    prefix: str,
    analysis: str,
    weight: int,
    canary_of: Callable[[str], str] = _train,
) -> tuple[str, MlflowClient, str, str]:
    """A new model serving a trained version in production and ``canary_of(name)`` as its
    canary at ``weight`` %, analysed with ``analysis``: (name, client, production, canary)."""
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    production = _train(name)
    client.set_registered_model_alias(name, "production", production)
    _wait_for(lambda: _served_version(platform, name) == production, "production")
    canary = canary_of(name)
    client.set_registered_model_tag(name, ANALYSIS_MODEL_TAG, analysis)
    client.set_registered_model_tag(name, CANARY_MODEL_TAG, json.dumps({"weight": weight}))
    client.set_registered_model_alias(name, CANARY_ALIAS, canary)
    _wait_for(lambda: _status_tag(client, name, canary) == "canary", "the canary")
    return name, client, production, canary


def _features() -> pd.DataFrame:
    return pd.read_csv(DEMO_DATA).drop(columns=["churned"])


def test_a_canary_that_fails_requests_is_rolled_back_and_production_fails_none(
    platform: Platform,
) -> None:
    features = _features()
    name, client, good, flaky = _canary_beside_production(
        platform,
        "flaky",
        '{"interval_s": 8, "min_requests": 20}',
        30,
        lambda model: log_flaky_version(model, features),
    )
    started = time.monotonic()
    with Load(platform, name, features) as load:
        _wait_for(lambda: _rolled_back(client, name, flaky), "the rollback", timeout=60)
        rolled_back_after = time.monotonic() - started
        _wait_for(lambda: _model_state(platform, name)["canary"] is None, "the canary route to go")
        answered = sum(load.of(f"{name}/{good}").values())
        _wait_for(lambda: sum(load.of(f"{name}/{good}").values()) > answered + 20, "more traffic")
    # Within two intervals (8 s each) of traffic reaching it, plus a pass.
    assert rolled_back_after < 2 * 8 + 6, rolled_back_after
    assert set(load.of(f"{name}/{good}")) == {200}, load.answers  # production failed nobody
    assert any(status != 200 for status in load.of(f"{name}/{flaky}")), load.answers
    tags = client.get_model_version(name, flaky).tags
    assert tags["flowline.analysis.check"] == "error_rate"
    assert "error rate" in tags["flowline.analysis.reason"]
    assert CANARY_ALIAS not in client.get_registered_model(name).aliases
    client.delete_registered_model_alias(name, "production")
    _wait_for(lambda: _served_version(platform, name) is None, "the undeploy")


def test_a_canary_whose_own_traffic_drifts_is_rolled_back(platform: Platform) -> None:
    # The same model twice: only the drift differs.
    config = '{"interval_s": 8, "min_requests": 10, "rollback_on_drift": true}'
    name, client, first, second = _canary_beside_production(platform, "drifty", config, 50)
    features = _features()
    # Longer-tenured customers on monthly contracts: a market neither version saw.
    shifted = features.assign(
        tenure_months=features["tenure_months"] + 24, contract="month-to-month"
    )
    monitor = f"http://{platform.host}:{platform.ports.monitor}"

    def canary_drifted() -> bool:
        answer = requests.get(f"{monitor}/drift/{name}?version={second}", timeout=5)
        return answer.status_code == 200 and answer.json()["drifted"]

    with Load(platform, name, shifted, rows=20) as load:
        _wait_for(canary_drifted, "the monitor's drift verdict on the canary", timeout=90)
        drifted_at = time.monotonic()
        _wait_for(lambda: _rolled_back(client, name, second), "the rollback", timeout=60)
        # Within two intervals (8 s each) of the verdict, plus a pass.
        assert time.monotonic() - drifted_at < 2 * 8 + 6
    tags = client.get_model_version(name, second).tags
    assert tags["flowline.analysis.check"] == "drift", tags["flowline.analysis.reason"]
    assert set(load.of(f"{name}/{first}")) == {200}
    client.delete_registered_model_alias(name, "production")
    _wait_for(lambda: _served_version(platform, name) is None, "the undeploy")


def test_a_canary_passing_k_intervals_is_promoted_when_asked(platform: Platform) -> None:
    config = '{"interval_s": 5, "min_requests": 10, "promote_after": 2}'
    name, client, _, second = _canary_beside_production(platform, "promoted", config, 50)
    features = _features()
    with Load(platform, name, features) as load:
        _wait_for(
            lambda: client.get_registered_model(name).aliases.get("production") == second,
            "the promotion",
        )
        _wait_for(lambda: _served_version(platform, name) == second, "version 2 in production")
    tags = client.get_model_version(name, second).tags
    assert tags["flowline.analysis.verdict"] == "promoted"
    assert int(tags["flowline.analysis.passed"]) >= 2
    assert CANARY_ALIAS not in client.get_registered_model(name).aliases
    assert {status for (_, status) in load.answers} == {200}, load.answers  # nobody failed
    _wait_for(lambda: _model_state(platform, name)["canary"] is None, "no canary left")
    client.delete_registered_model_alias(name, "production")
    _wait_for(lambda: _served_version(platform, name) is None, "the undeploy")


def test_legacy_stage_promotion_deploys_and_archiving_undeploys(platform: Platform) -> None:
    name = f"staged-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    version = _train(name)
    client.transition_model_version_stage(name, version, "Production")
    _wait_for(lambda: _served_version(platform, name) == version, "the staged version to serve")
    assert _score(platform, name, _example(name, version)).status_code == 200
    client.transition_model_version_stage(name, version, "Archived")
    _wait_for(lambda: _served_version(platform, name) is None, "the archived version to go")


def test_failed_smoke_test_keeps_the_old_version_and_tags_the_reason(platform: Platform) -> None:
    name = f"guarded-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    good = _train(name)
    client.set_registered_model_alias(name, "production", good)
    _wait_for(lambda: _served_version(platform, name) == good, "the good version")
    broken = log_broken_version(name)
    client.set_registered_model_alias(name, "production", broken)
    _wait_for(
        lambda: (
            client.get_model_version(name, broken).tags.get("flowline.deployment.status")
            == "failed"
        ),
        "the failure tag",
    )
    reason = client.get_model_version(name, broken).tags["flowline.deployment.reason"]
    assert "smoke test" in reason and "broken on purpose" in reason
    assert _served_version(platform, name) == good
    assert _score(platform, name, _example(name, good)).status_code == 200
    status = requests.get(
        f"http://{platform.host}:{platform.ports.controller}/status", timeout=5
    ).json()
    assert f"version {broken}" in status["errors"][name]


def test_a_worse_challenger_is_held_back_by_the_gate_until_a_person_overrides_it(
    platform: Platform, tmp_path: Path
) -> None:
    name = f"gated-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    # Two halves of the demo table: the champion learns from 1,200 rows, the challenger
    # from 75 (test_size 0.95), then both score the challenger's 1,425 held-out rows.
    frame = pd.read_csv(DEMO_DATA)
    champion_file, challenger_file = tmp_path / "champion.csv", tmp_path / "challenger.csv"
    frame.iloc[:1500].to_csv(champion_file, index=False)
    frame.iloc[1500:].to_csv(challenger_file, index=False)

    def trained(data: Path, **params: Any) -> str:
        config = TrainConfig(data=str(data), target="churned", registered_model=name, **params)
        return train(config, report=lambda _: None).version

    champion = trained(champion_file, max_evals=2, seed=1)
    first = client.get_model_version(name, champion).tags
    assert first[GATE_TAG] == "passed" and "no champion" in first[GATE_REASON_TAG]
    client.set_registered_model_alias(name, "production", champion)
    _wait_for(lambda: _served_version(platform, name) == champion, "the champion")

    challenger = trained(challenger_file, max_evals=1, seed=2, test_size=0.95)
    tags = client.get_model_version(name, challenger).tags
    assert tags[GATE_TAG] == "failed", tags
    assert tags[GATE_CHAMPION_VERSION_TAG] == champion
    metric = tags[GATE_METRIC_TAG]
    assert metric == client.get_model_version(name, challenger).tags["flowline.metric"]
    # Greater is better for the classification defaults (roc_auc, average_precision).
    assert float(tags[GATE_CHAMPION_TAG]) > float(tags[GATE_CHALLENGER_TAG])

    client.set_registered_model_alias(name, "production", challenger)
    status_url = f"http://{platform.host}:{platform.ports.controller}/status"

    def held_back() -> str | None:
        error = requests.get(status_url, timeout=5).json()["errors"].get(name, "")
        return error if "champion/challenger gate" in error else None

    error = _wait_for(held_back, "the gate to hold the challenger back")
    assert error.startswith(f"version {challenger}: held back") and metric in error
    assert _served_version(platform, name) == champion
    assert _status_tag(client, name, challenger) is None  # never started

    client.set_model_version_tag(name, challenger, GATE_OVERRIDE_TAG, "true")
    _wait_for(lambda: _served_version(platform, name) == challenger, "the overridden version")
    # The route switches first, then the controller tags the version.
    _wait_for(lambda: _status_tag(client, name, challenger) == "deployed", "the deployed tag")


def test_a_champion_that_cannot_score_skips_the_gate(platform: Platform) -> None:
    name = f"ungated-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    broken = log_broken_version(name)
    client.set_registered_model_alias(name, "production", broken)
    frame = pd.read_csv(DEMO_DATA).head(50)
    result = gate.evaluate(
        client, name, "classification", "roc_auc", 0.8,
        frame.drop(columns=["churned"]), frame["churned"], 0.005,
    )  # fmt: skip
    assert result.verdict == "skipped" and result.champion_version == broken
    # Its schema does not take the demo columns; the reason keeps the rows out of the tag.
    assert result.reason == (
        f"champion version {broken} cannot score the test split: Failed to enforce schema"
    )
    assert not gate_blocks(result.tags())


def test_killed_replica_is_routed_around_and_restarted(platform: Platform) -> None:
    name = f"sturdy-{uuid.uuid4().hex[:6]}"
    client = MlflowClient()
    version = _train(name)
    client.set_registered_model_alias(name, "production", version)
    _wait_for(lambda: _served_version(platform, name) == version, "the version to serve")
    body = _example(name, version)
    controller = f"http://{platform.host}:{platform.ports.controller}"

    def replicas() -> list[dict]:
        status = requests.get(f"{controller}/status", timeout=5).json()
        return next(d["replicas"] for d in status["deployments"] if d["model"] == name)

    victim = replicas()[0]["url"]
    pidfile = platform.home / "replicas" / f"{victim.rsplit(':', 1)[1]}.json"
    os.killpg(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
    for _ in range(20):
        assert _score(platform, name, body).status_code == 200
    _wait_for(
        lambda: (
            len(replicas()) == 2
            and all(r["alive"] for r in replicas())
            and victim not in [r["url"] for r in replicas()]
        ),
        "a replacement replica",
    )
    assert _score(platform, name, body).status_code == 200


@pytest.mark.parametrize(
    "tamper, status",
    [("signature", 401), ("stale", 401), ("replay", 409), ("unsigned", 401)],
)
def test_forged_or_replayed_webhooks_are_rejected(
    platform: Platform, tamper: str, status: int
) -> None:
    secret = (platform.home / "webhook-secret").read_text().strip()
    body = json.dumps(
        {"entity": "model_version_alias", "action": "created", "timestamp": "now",
         "data": {"name": "nobody", "alias": "production", "version": "1"}}
    ).encode()  # fmt: skip
    delivery, stamp = uuid.uuid4().hex, str(int(time.time()) - (3600 if tamper == "stale" else 0))
    headers = {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature(
            "wrong" if tamper == "signature" else secret, delivery, stamp, body
        ),
        "Content-Type": "application/json",
    }
    if tamper == "unsigned":
        del headers["X-MLflow-Signature"]
    url = f"http://{platform.host}:{platform.ports.controller}/webhooks/mlflow"
    if tamper == "replay":
        assert requests.post(url, data=body, headers=headers, timeout=5).status_code == 200
    assert requests.post(url, data=body, headers=headers, timeout=5).status_code == status


def test_restart_resumes_the_deployed_state(tmp_path: Path) -> None:
    ports = _ports()
    first = Platform(home=tmp_path, ports=ports, replicas=1, reconcile_interval=1.0)
    first.start()
    name = "resume"
    try:
        mlflow.set_tracking_uri(first.tracking.url)
        version = _train(name)
        MlflowClient().set_registered_model_alias(name, "production", version)
        _wait_for(lambda: _served_version(first, name) == version, "the first deployment")
    finally:
        first.stop()
    assert not first.busy_ports()
    again = Platform(home=tmp_path, ports=ports, replicas=1, reconcile_interval=1.0)
    again.start()
    try:
        _wait_for(lambda: _served_version(again, name) == version, "the deployment to come back")
        assert _score(again, name, _example(name, version)).status_code == 200
    finally:
        again.stop()
        mlflow.set_tracking_uri(None)


def test_mlflow_deployments_cli_with_the_flowline_target(
    platform: Platform, tmp_path: Path
) -> None:
    name = f"cli-{uuid.uuid4().hex[:6]}"
    version = _train(name)
    env = subprocess_env(
        MLFLOW_TRACKING_URI=platform.tracking.url, FLOWLINE_GATEWAY_URL=_gateway(platform)
    )

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / "mlflow"), "deployments", *args, "-t", "flowline"],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    created = cli("create", "--name", name, "-m", f"models:/{name}/{version}")
    assert created.returncode == 0, created.stderr[-600:]
    assert _served_version(platform, name) == version
    assert name in cli("list").stdout
    got = cli("get", "--name", name)
    assert got.returncode == 0 and f"version: {version}\n" in got.stdout
    example = tmp_path / "input.json"
    split = _example(name, version)["dataframe_split"]
    # `mlflow deployments predict` reads the file with pandas.read_json.
    pd.DataFrame(split["data"], columns=split["columns"]).to_json(example, orient="records")
    predicted = cli("predict", "--name", name, "--input-path", str(example))
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert "predictions" in predicted.stdout
    assert cli("delete", "--name", name).returncode == 0
    assert _served_version(platform, name) is None
    wrong = cli("create", "--name", "other", "-m", f"models:/{name}/{version}")
    assert wrong.returncode != 0 and "registered model's name" in wrong.stderr


def test_keras_family_deploys_like_sklearn(platform: Platform) -> None:
    name = f"keras-{uuid.uuid4().hex[:6]}"
    config = TrainConfig(
        family="keras", max_evals=1, epochs=2, registered_model=name, gate_tolerance=ANY_RETRAIN
    )
    version = train(config, report=lambda _: None).version
    MlflowClient().set_registered_model_alias(name, "production", version)
    _wait_for(lambda: _served_version(platform, name) == version, "the keras version to serve")
    body = _example(name, version)
    answer = _score(platform, name, body)
    assert answer.status_code == 200
    assert set(answer.json()["predictions"]) <= {"yes", "no"}
    body["params"] = {"predict_method": "predict_proba"}
    probabilities = _score(platform, name, body).json()["predictions"]
    assert all(abs(row["yes"] + row["no"] - 1) < 1e-4 for row in probabilities)


def flowline_up_argv(ports: Ports, *extra: str) -> list[str]:
    """`flowline up` on ``ports``."""
    return [
        str(BIN / "flowline"), "up", "--port", str(ports.tracking),
        "--gateway-port", str(ports.gateway), "--controller-port", str(ports.controller),
        "--monitor-port", str(ports.monitor), "--replica-port-from", str(ports.replicas_from),
        *extra,
    ]  # fmt: skip


def test_flowline_up_prints_urls_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    ports = _ports()
    argv = flowline_up_argv(ports)
    log = tmp_path / "up.log"
    with log.open("w") as out:
        up = subprocess.Popen(
            argv, env=subprocess_env(FLOWLINE_HOME=str(tmp_path / "home")), stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_for(lambda: "press Ctrl-C" in log.read_text(), "flowline up to be ready")
        text = log.read_text()
        for port in (ports.tracking, ports.gateway, ports.controller, ports.monitor):
            assert f"http://127.0.0.1:{port}" in text
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=90) == 0
        assert "stopped" in log.read_text()
        platform = Platform(home=tmp_path / "home", ports=ports)
        assert platform.busy_ports() == []
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def test_a_killed_controller_is_replaced_and_adopts_the_running_replicas(tmp_path: Path) -> None:
    running = Platform(home=tmp_path, ports=_ports(), replicas=1, reconcile_interval=1.0)
    running.start()
    name = "adopted"
    try:
        mlflow.set_tracking_uri(running.tracking.url)
        version = _train(name)
        MlflowClient().set_registered_model_alias(name, "production", version)
        _wait_for(lambda: _served_version(running, name) == version, "the deployment")
        status_url = f"http://{running.host}:{running.ports.controller}/status"
        before = requests.get(status_url, timeout=5).json()["deployments"][0]["replicas"]
        body = _example(name, version)

        controller = next(p for role, p in running.processes if role == "controller")
        os.kill(controller.pid, signal.SIGKILL)  # the replicas live in their own groups
        controller.popen.wait(timeout=30)
        running.processes.remove(("controller", controller))
        assert _score(running, name, body).status_code == 200  # served without a controller

        running.start_controller()
        _wait_for(lambda: requests.get(status_url, timeout=5).json()["deployments"], "the adoption")
        after = requests.get(status_url, timeout=5).json()["deployments"][0]["replicas"]
        assert [r["url"] for r in after] == [r["url"] for r in before]
        assert all(r["alive"] for r in after)
        assert _score(running, name, body).status_code == 200
    finally:
        running.stop()
        mlflow.set_tracking_uri(None)
    assert not list((tmp_path / "replicas").glob("*.json"))
