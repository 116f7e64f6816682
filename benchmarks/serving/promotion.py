"""Promotion to first answer, and failed requests during a switch at constant load.

Starts the real platform (tracking server, gateway, controller; 1 replica per version)
in a temporary home, registers two versions of the demo sklearn model, then:

1. sets the alias ``production`` on version 1 and times until the gateway first
   answers from it (the figure a user waits for after clicking in the UI);
2. under constant load (8 client threads on the gateway), moves the alias to version 2
   and counts non-2xx answers and transport errors until version 2 answers and the
   old replicas are retired.

Run: ``.venv/bin/python benchmarks/serving/promotion.py``; writes
benchmarks/results/promotion.json. Anchor: stock MLflow has no promotion-driven
deployment at all (mlflow#12589), so the targets are absolute: <= 15 s and 0 failures.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import requests
from mlflow import MlflowClient

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness  # noqa: E402
from common.processes import free_port, free_port_block  # noqa: E402
from flowline.config import Ports  # noqa: E402
from flowline.platform import Platform  # noqa: E402
from pipelines.train import TrainConfig, train  # noqa: E402

MODEL = "bench-promotion"
CLIENTS = 8


def _served(gateway: str) -> dict[str, str]:
    models = requests.get(f"{gateway}/models", timeout=5).json()["models"]
    return {m["name"]: str(m["version"]) for m in models}


def main(argv: list[str] | None = None) -> None:
    """Measure both figures and write the results file."""
    harness.command_line(__doc__).parse_args(argv)
    ports = Ports(free_port(), free_port(), free_port(), free_port(), free_port_block(10))
    with tempfile.TemporaryDirectory() as home:
        running = Platform(home=Path(home), ports=ports, replicas=1, reconcile_interval=5.0)
        running.start()
        try:
            mlflow.set_tracking_uri(running.tracking.url)
            client = MlflowClient()
            first = train(TrainConfig(max_evals=1, registered_model=MODEL, seed=1), lambda _: None)
            second = train(TrainConfig(max_evals=1, registered_model=MODEL, seed=2), lambda _: None)
            example = json.loads(
                Path(
                    mlflow.artifacts.download_artifacts(
                        f"models:/{MODEL}/{first.version}/serving_input_example.json"
                    )
                ).read_text()
            )
            gateway = f"http://127.0.0.1:{ports.gateway}"
            url = f"{gateway}/models/{MODEL}/invocations"

            promoted = time.monotonic()
            client.set_registered_model_alias(MODEL, "production", first.version)
            while True:
                answer = requests.post(url, json=example, timeout=30)
                if answer.status_code == 200:
                    break
                time.sleep(0.05)
            first_answer_s = time.monotonic() - promoted

            statuses: Counter = Counter()
            versions: Counter = Counter()
            stop = threading.Event()

            def load() -> None:
                with requests.Session() as session:
                    while not stop.is_set():
                        try:
                            r = session.post(url, json=example, timeout=30)
                            statuses[r.status_code] += 1
                            versions[r.headers.get("x-flowline-model-version")] += 1
                        except requests.RequestException as exc:
                            statuses[type(exc).__name__] += 1

            threads = [threading.Thread(target=load) for _ in range(CLIENTS)]
            for thread in threads:
                thread.start()
            time.sleep(2.0)  # steady load before the switch, part of what is measured
            switched = time.monotonic()
            client.set_registered_model_alias(MODEL, "production", second.version)
            new_label = f"{MODEL}/{second.version}"
            while versions[new_label] == 0:
                time.sleep(0.05)
            switch_s = time.monotonic() - switched
            while (
                client.get_model_version(MODEL, first.version).tags.get(
                    "flowline.deployment.status"
                )
                != "undeployed"
            ):
                time.sleep(0.2)
            time.sleep(2.0)
            stop.set()
            for thread in threads:
                thread.join()
        finally:
            running.stop()
    failed = sum(n for status, n in statuses.items() if status != 200)
    result = {
        "benchmark": "promotion",
        "machine": harness.machine(cores=False, python_label=False),
        "promotion_to_first_answer_s": round(first_answer_s, 2),
        "switch_to_first_answer_from_new_version_s": round(switch_s, 2),
        "requests_during_switch": sum(statuses.values()),
        "failed_requests_during_switch": failed,
        "answers_by_version": dict(versions),
        "targets": {"promotion_to_first_answer_s": "<= 15", "failed_requests_during_switch": 0},
        "met": first_answer_s <= 15 and failed == 0,
    }
    harness.write_results(result, harness.RESULTS / "promotion.json")


if __name__ == "__main__":
    main()
