"""Drift monitoring end to end, with real processes only: an `mlflow server` (SQLite), a model
version trained and registered by `pipelines.train`, an `mlflow models serve` replica, the
gateway with the capture hook, the monitor process, and a loopback webhook receiver.

One trained version is registered under three names so the scenarios have independent
drift state: calm traffic, shifted-then-calm traffic, and restarts under load.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import mlflow
import pytest
from mlflow import MlflowClient

from common.processes import free_port
from flowline.tracking import TrackingServer
from monitoring.service.mlflow_runs import MODEL_TAG, VERSION_TAG
from pipelines.train import TrainConfig, train
from serving.model_metadata import deployment_from_model_dir
from tests.conftest import Service, wait_for
from tests.helpers_monitor import (
    AUTH,
    CHURN,
    FEATURES,
    INGEST_TOKEN,
    LoopbackServer,
    churn_features,
    send_rows,
    shifted,
    split_body,
    start_capture_gateway,
    start_monitor,
)
from tests.helpers_serving import start_scoring_server

pytestmark = pytest.mark.slow
WINDOW = 200
SCENARIOS = ("calm", "shift", "restart", "feedback")
FEEDBACK_TOKEN = "test-feedback-token"


@dataclass
class Stack:
    """The running platform pieces the scenarios talk to."""

    workdir: Path
    tracking_uri: str
    names: dict[str, str]
    model_dir: Path
    replica_url: str
    receiver: LoopbackServer
    monitor_port: int
    monitor_env: dict[str, str]
    gateway_env: dict[str, str]
    monitor: Service | None = None
    gateway: Service | None = None
    rows_sent: dict[str, int] = field(default_factory=dict)

    def score_url(self, scenario: str) -> str:
        assert self.gateway is not None
        return f"{self.gateway.url}/models/{self.names[scenario]}/invocations"

    def drift(self, scenario: str) -> dict[str, Any] | None:
        assert self.monitor is not None
        answer = httpx.get(f"{self.monitor.url}/drift/{self.names[scenario]}", timeout=10)
        return answer.json() if answer.status_code == 200 else None

    def alerts(self, scenario: str) -> list[str]:
        name = self.names[scenario]
        return [b["event"] for b in self.receiver.bodies() if b["model"] == name]

    def start_monitor(self) -> None:
        self.monitor = start_monitor(self.workdir, self.monitor_env, port=self.monitor_port)

    def start_gateway(self) -> None:
        deployments = [
            deployment_from_model_dir(name, "1", [self.replica_url], self.model_dir).to_dict()
            for name in self.names.values()
        ]
        self.gateway = start_capture_gateway(self.workdir, deployments, self.gateway_env)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("monitor-e2e")
    with contextlib.ExitStack() as cleanup:
        tracking = TrackingServer(home=workdir / "tracking", port=free_port(), workers=1)
        cleanup.callback(tracking.start().stop)
        mlflow.set_tracking_uri(tracking.url)
        cleanup.callback(mlflow.set_tracking_uri, None)
        base = f"churn-{uuid.uuid4().hex[:6]}"
        version = train(TrainConfig(max_evals=1, registered_model=base), report=lambda _: None)
        names = {}
        for scenario in SCENARIOS:
            # The same model under another name: independent monitoring state, no retraining.
            copy = mlflow.register_model(version.source, f"{base}-{scenario}", tags=version.tags)
            names[scenario] = copy.name
        model_dir = Path(
            mlflow.artifacts.download_artifacts(
                f"models:/{base}/{version.version}", dst_path=str(workdir / "model")
            )
        )
        replica = start_scoring_server(model_dir, workdir)
        cleanup.callback(replica.stop)
        receiver = LoopbackServer()
        cleanup.callback(receiver.stop)
        running = Stack(
            workdir=workdir,
            tracking_uri=tracking.url,
            names=names,
            model_dir=model_dir,
            replica_url=replica.url,
            receiver=receiver,
            monitor_port=free_port(),
            monitor_env={
                "FLOWLINE_HOME": str(workdir / "monitor-home"),
                "MLFLOW_TRACKING_URI": tracking.url,
                "FLOWLINE_WINDOW_ROWS": str(WINDOW),
                "FLOWLINE_WINDOW_SECONDS": "600",
                "FLOWLINE_ALERT_WEBHOOKS": f"{receiver.url}/hook",
                "FLOWLINE_ALERT_BACKOFF_S": "0.2",
                "FLOWLINE_MONITOR_POLL_S": "0.2",
                "FLOWLINE_FEEDBACK_TOKEN": FEEDBACK_TOKEN,
            },
            gateway_env={
                "FLOWLINE_HOME": str(workdir / "gateway-home"),
                "FLOWLINE_MONITOR_URL": "",  # set below, once the monitor's port is known
                "FLOWLINE_CAPTURE_SPOOL_DIR": str(workdir / "spool"),
                "FLOWLINE_CAPTURE_FLUSH_S": "0.1",
                "FLOWLINE_CAPTURE_TIMEOUT_S": "2",
            },
        )
        running.gateway_env["FLOWLINE_MONITOR_URL"] = f"http://127.0.0.1:{running.monitor_port}"
        running.start_monitor()
        cleanup.callback(lambda: running.monitor and running.monitor.stop())
        running.start_gateway()
        cleanup.callback(lambda: running.gateway and running.gateway.stop())
        yield running


def windows_of(stack: Stack, scenario: str, count: int, timeout: float = 60.0) -> list[dict]:
    """Wait for ``count`` windows of a scenario's model; oldest first."""

    def ready() -> list[dict] | None:
        view = stack.drift(scenario)
        if view and len(view["windows"]) >= count:
            return list(reversed(view["windows"]))
        return None

    return wait_for(ready, f"{count} windows of {scenario}", timeout)


def monitoring_run(stack: Stack, scenario: str) -> list[Any]:
    client = MlflowClient(stack.tracking_uri)
    experiment = client.get_experiment_by_name("flowline-monitoring")
    if experiment is None:
        return []
    name = stack.names[scenario]
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{MODEL_TAG}` = '{name}' and tags.`{VERSION_TAG}` = '1'",
    )


def test_training_traffic_raises_no_drift_and_lands_in_an_mlflow_run(stack: Stack) -> None:
    traffic = churn_features().sample(2 * WINDOW, random_state=11)
    stack.rows_sent["calm"] = send_rows(stack.score_url("calm"), traffic)
    windows = windows_of(stack, "calm", 2)
    assert [w["drifted"] for w in windows] == [False, False], [w["reasons"] for w in windows]
    assert [w["rows"] for w in windows] == [WINDOW, WINDOW]
    view = stack.drift("calm")
    assert view["versions"][0]["rows_captured"] == 2 * WINDOW
    assert view["versions"][0]["rows_dropped"] == 0
    assert stack.alerts("calm") == []

    wait_for(
        lambda: all(w["logged_to_mlflow"] for w in stack.drift("calm")["windows"]),
        "windows logged to MLflow",
    )
    [run] = monitoring_run(stack, "calm")
    assert run.info.run_name == f"monitor-{stack.names['calm']}-v1"
    client = MlflowClient(stack.tracking_uri)
    history = client.get_metric_history(run.info.run_id, "drift.dataset_drifted")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.0), (1, 0.0)]
    steps = {
        m.step for m in client.get_metric_history(run.info.run_id, "drift.tenure_months.p_value")
    }
    assert steps == {0, 1}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "reports")}
    assert {"reports/window-0000.html", "reports/window-0001.html"} <= artifacts
    local = client.download_artifacts(
        run.info.run_id, "reports/window-0001.html", str(stack.workdir)
    )
    page = Path(local).read_text()
    assert "<svg" in page and "tenure_months" in page


def test_labels_give_the_realized_accuracy_beside_the_cbpe_estimate_in_mlflow(
    stack: Stack,
) -> None:
    """Scored through the gateway, estimated without labels by the version itself (in the
    monitor's sandboxed scorer), then labelled by request id: realized equals sklearn's."""
    import pandas as pd
    from sklearn.metrics import accuracy_score

    name = stack.names["feedback"]
    data = pd.read_csv(CHURN).sample(5 * WINDOW, random_state=21)  # 1,000 requests' rows
    pairs: list[tuple[str, str, str]] = []  # row id, label, what the caller was answered
    with httpx.Client(timeout=30) as client:
        # 600 single-row requests (labelled by their bare id), then 20 requests of 20 rows
        # (labelled "<id>:<row>"): 620 requests, 1,000 rows.
        starts = [*range(600), *range(600, len(data), 20)]
        for start, end in zip(starts, [*starts[1:], len(data)], strict=True):
            chunk = data.iloc[start:end]
            answer = client.post(
                stack.score_url("feedback"),
                content=split_body(chunk[FEATURES]),
                headers={"content-type": "application/json"},
            )
            assert answer.status_code == 200, answer.text
            request_id = answer.headers["x-flowline-request-id"]
            predicted = answer.json()["predictions"]
            labels = chunk["churned"].tolist()
            ids = (
                [request_id]
                if len(chunk) == 1
                else [f"{request_id}:{i}" for i in range(len(chunk))]
            )
            pairs += list(zip(ids, labels, predicted, strict=True))
    windows_of(stack, "feedback", 5)
    performance_url = f"{stack.monitor.url}/performance/{name}"

    def estimated() -> list[dict] | None:
        view = httpx.get(performance_url, timeout=10).json()
        windows = view["versions"][0]["windows"]
        return windows if all(w["estimated"] for w in windows) else None

    before = wait_for(estimated, "CBPE estimates of every window")
    for w in before:
        assert w["estimated"]["probabilities"] == "scored" and w["labelled_rows"] == 0
        assert 0.5 < w["estimated"]["accuracy"] <= 1 and 0.5 < w["estimated"]["roc_auc"] <= 1

    auth = {"authorization": f"Bearer {FEEDBACK_TOKEN}"}
    half = len(pairs) // 2
    csv = "request_id,label\n" + "".join(f"{r},{y}\n" for r, y, _ in pairs[:half])
    sent = httpx.post(
        f"{stack.monitor.url}/feedback/{name}",
        content=csv.encode(),
        headers={**auth, "content-type": "text/csv"},
        timeout=30,
    )
    assert sent.status_code == 200 and sent.json()["matched"] == half, sent.text
    rest = [{"request_id": r, "label": y} for r, y, _ in pairs[half:]]
    sent = httpx.post(f"{stack.monitor.url}/feedback/{name}", json=rest, headers=auth, timeout=30)
    assert sent.json() == {
        "received": len(rest), "new": len(rest), "updated": 0, "unchanged": 0,
        "matched": len(rest), "unknown": 0,
    }  # fmt: skip
    again = httpx.post(f"{stack.monitor.url}/feedback/{name}", json=rest, headers=auth, timeout=30)
    assert again.json()["unchanged"] == len(rest)

    def labelled() -> dict | None:
        version = httpx.get(performance_url, timeout=10).json()["versions"][0]
        return version if version["labelled_rows"] == len(pairs) else None

    version = wait_for(labelled, "every label joined")
    expected = accuracy_score([y for _, y, _ in pairs], [p for _, _, p in pairs])
    assert version["realized"]["accuracy"] == pytest.approx(expected, abs=1e-12)
    for w in version["windows"]:
        assert w["labelled_rows"] == WINDOW
        # CBPE tracks the truth: a loose bound for 200-row windows of a ~0.8 model.
        assert abs(w["estimated"]["accuracy"] - w["realized"]["accuracy"]) < 0.15

    def logged() -> list[Any] | None:
        [run] = monitoring_run(stack, "feedback") or [None]
        if run is None:
            return None
        client = MlflowClient(stack.tracking_uri)
        realized = client.get_metric_history(run.info.run_id, "performance.realized.accuracy")
        estimated = client.get_metric_history(run.info.run_id, "performance.estimated.accuracy")
        steps = ({m.step for m in realized}, {m.step for m in estimated})
        every = set(range(5))
        return [realized, estimated] if steps == (every, every) else None

    realized_history, _ = wait_for(logged, "realized and estimated accuracy in MLflow")
    last = {m.step: m.value for m in sorted(realized_history, key=lambda m: m.timestamp)}
    assert last == {
        w["window_index"]: pytest.approx(w["realized"]["accuracy"]) for w in version["windows"]
    }
    metrics = httpx.get(f"{stack.monitor.url}/metrics", timeout=10).text
    assert f'flowline_monitor_labelled_rows{{model="{name}",version="1"}} {len(pairs)}.0' in metrics
    assert (
        f'flowline_monitor_estimated_performance{{metric="accuracy",model="{name}",version="1"}}'
        in metrics
    )


def test_shifted_traffic_drifts_on_the_right_features_and_alerts_once_per_change(
    stack: Stack,
) -> None:
    data = churn_features().sample(4 * WINDOW, random_state=12)
    send_rows(stack.score_url("shift"), shifted(data.iloc[: 2 * WINDOW]))
    send_rows(stack.score_url("shift"), data.iloc[2 * WINDOW :])
    windows = windows_of(stack, "shift", 4)
    assert [w["drifted"] for w in windows] == [True, True, False, False], [
        w["reasons"] for w in windows
    ]
    for w in windows[:2]:
        assert {"tenure_months", "contract"} <= set(w["drifted_features"])
        assert not {"monthly_charges", "internet_service", "payment_method"} & set(
            w["drifted_features"]
        )
    wait_for(lambda: len(stack.alerts("shift")) >= 2, "two alerts")
    time.sleep(0.5)  # an extra (duplicate) delivery would arrive within the alerter's interval
    assert stack.alerts("shift") == ["drift_started", "drift_ended"]
    started = next(b for b in stack.receiver.bodies() if b["model"] == stack.names["shift"])
    assert started["window_index"] == 0 and "contract" in started["drifted_features"]
    page = httpx.get(started["report_url"], timeout=10)
    assert page.status_code == 200 and "tenure_months — drift" in page.text

    metrics = httpx.get(f"{stack.monitor.url}/metrics", timeout=10).text
    name = stack.names["shift"]
    assert f'flowline_monitor_rows_captured_total{{model="{name}",version="1"}} 800.0' in metrics
    assert f'flowline_monitor_rows_dropped_total{{model="{name}",version="1"}} 0.0' in metrics
    assert f'flowline_monitor_dataset_drift{{model="{name}",version="1"}} 0.0' in metrics


def test_monitor_and_gateway_restarts_under_load_lose_no_row_and_do_not_realert(
    stack: Stack,
) -> None:
    sent = {"rows": 0, "errors": 0}
    stop = threading.Event()
    pool = shifted(churn_features())

    def traffic() -> None:
        with httpx.Client(timeout=30) as client:
            offset = 0
            while not stop.is_set():
                chunk = pool.sample(10, random_state=offset)
                offset += 1
                try:
                    sent["rows"] += send_rows(stack.score_url("restart"), chunk, 10, client)
                except (httpx.HTTPError, AssertionError):
                    sent["errors"] += 1  # only while the gateway itself restarts
                    time.sleep(0.05)

    worker = threading.Thread(target=traffic, daemon=True)
    worker.start()
    try:
        windows_of(stack, "restart", 1)
        wait_for(lambda: stack.alerts("restart") == ["drift_started"], "the drift alert")
        wait_for(
            lambda: stack.drift("restart")["windows"][-1]["logged_to_mlflow"], "window 0 in MLflow"
        )
        stack.monitor.kill()  # a crash, while traffic flows
        at_kill = sent["rows"]
        wait_for(lambda: sent["rows"] >= at_kill + 300, "traffic while the monitor is down")
        stack.gateway.stop()  # graceful: the capture queue goes to the spool
        stack.start_gateway()
        at_gateway = sent["rows"]
        wait_for(lambda: sent["rows"] >= at_gateway + 200, "traffic through the new gateway")
        stack.start_monitor()
        at_start = sent["rows"]
        wait_for(lambda: sent["rows"] >= at_start + 200, "traffic after the monitor restart")
    finally:
        stop.set()
        worker.join(timeout=60)
    total = sent["rows"]
    wait_for(
        lambda: stack.drift("restart")["versions"][0]["rows_captured"] == total,
        f"all {total} rows ingested",
        timeout=90,
    )
    version = stack.drift("restart")["versions"][0]
    assert version["rows_captured"] == total and version["rows_dropped"] == 0
    windows = windows_of(stack, "restart", total // WINDOW)
    assert all(w["drifted"] for w in windows)
    assert sum(w["rows"] for w in windows) == WINDOW * len(windows)
    time.sleep(1.5)  # give a wrongful re-alert time to arrive
    assert stack.alerts("restart") == ["drift_started"]
    wait_for(
        lambda: all(w["logged_to_mlflow"] for w in stack.drift("restart")["windows"]),
        "every window in MLflow",
    )
    [run] = monitoring_run(stack, "restart")  # found again after the restart, not recreated
    history = MlflowClient(stack.tracking_uri).get_metric_history(
        run.info.run_id, "drift.dataset_drifted"
    )
    assert sorted(m.step for m in history) == list(range(len(windows)))


@pytest.mark.postgres
def test_monitor_process_on_postgresql_survives_a_crash_without_duplicates(
    stack: Stack, postgres_database: str
) -> None:
    from monitoring.capture.client import CaptureClient
    from serving.gateway.capture import CapturedRequest
    from tests.helpers_monitor import split_body

    env = {
        **stack.monitor_env,
        "FLOWLINE_HOME": str(stack.workdir / "pg-home"),
        "FLOWLINE_MONITOR_DB": postgres_database,
        "FLOWLINE_MONITOR_MLFLOW": "0",  # the SQLite monitor owns this model's MLflow run
        "FLOWLINE_ALERT_WEBHOOKS": "",
    }
    port = free_port()
    monitor = start_monitor(stack.workdir, env, port=port, name="pg-monitor")
    name = stack.names["calm"]
    data = shifted(churn_features().sample(2 * WINDOW, random_state=21))
    requests = [
        CapturedRequest(split_body(data.iloc[i : i + 20]), "application/json")
        for i in range(0, len(data), 20)
    ]
    client = CaptureClient(
        monitor.url, stack.workdir / "pg-spool", flush_interval_s=0.05, token=INGEST_TOKEN
    )
    client.start()
    try:
        for request in requests[:10]:
            client.submit(name, "1", request, ["yes"] * 20)
        assert client.flush(30)
        monitor.kill()
        for request in requests[10:]:
            client.submit(name, "1", request, ["yes"] * 20)
        wait_for(lambda: client.stats()["spool_pending"] == 10, "records spooled while down")
        monitor = start_monitor(stack.workdir, env, port=port, name="pg-monitor")
        assert client.flush(60)
        windows = windows_of_url(monitor.url, name, 2)
        assert [w["drifted"] for w in windows] == [True, True]
        assert {"tenure_months", "contract"} <= set(windows[0]["drifted_features"])
        # A redelivery after a lost acknowledgement: the same record id twice.
        record = {
            "id": f"pg-dup-{uuid.uuid4().hex}", "model": name, "version": "1",
            "time": time.time(), "content_type": "application/json",
            "body": split_body(data.iloc[:20]).decode(), "predictions": ["yes"] * 20,
        }  # fmt: skip
        for _ in range(2):
            answer = httpx.post(
                f"{monitor.url}/ingest", json={"records": [record]}, headers=AUTH, timeout=10
            )
            assert answer.status_code == 200
        assert answer.json() == {
            "records": 1, "new_records": 0, "duplicates": 1, "rows": 0,
            "malformed_records": 0, "rejected": 0, "dropped_ignored": 0,
        }  # fmt: skip
        version = httpx.get(f"{monitor.url}/drift/{name}", timeout=10).json()["versions"][0]
        assert version["rows_captured"] == 2 * WINDOW + 20
        assert version["duplicate_records"] == 1 and version["rows_dropped"] == 0
    finally:
        client.close(timeout=2)
        monitor.stop()


def windows_of_url(url: str, model: str, count: int) -> list[dict]:
    """Wait for ``count`` windows of ``model`` at the monitor at ``url``; oldest first."""

    def ready() -> list[dict] | None:
        answer = httpx.get(f"{url}/drift/{model}", timeout=10)
        if answer.status_code == 200 and len(answer.json()["windows"]) >= count:
            return list(reversed(answer.json()["windows"]))
        return None

    return wait_for(ready, f"{count} windows of {model}")
