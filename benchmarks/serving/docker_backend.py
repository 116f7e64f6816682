"""The docker backend: promotion to first answer, throughput against a local process,
and image size and build time for both model families.

One run, on the real platform (`flowline up --backend docker` as a `Platform`, one
replica per version, a 1 s reconcile loop):

1. **cold promotion**: the sklearn demo model's environment image is removed first, so
   promotion pays for the whole build (wheelhouse, environment, model layer) plus the
   container start; the host's pip cache is warm, as on any machine that installed
   flowline;
2. **warm promotion**: the alias is removed, the version undeployed, then set again:
   its image is cached, so this is container start, smoke test and route switch
   (target <= 15 s);
3. **a new version, environment cached**: only the model layer is built;
4. **throughput at 64 clients** with wrk through the gateway: a container replica
   against a local-process replica of the very same model files, each behind its own
   gateway, interleaved rounds, medians (target: within 10 %);
5. **image size and build time** of the sklearn and keras demo models, each built cold.

Run: ``.venv/bin/python benchmarks/serving/docker_backend.py`` (needs dockerd, wrk and
``FLOWLINE_BASE_IMAGE``, default flowline-base:bookworm: see `make docker`). Writes
benchmarks/results/docker_backend.json and .md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("FLOWLINE_BASE_IMAGE", "flowline-base:bookworm")

import docker  # noqa: E402 - after the repo is on sys.path
import mlflow  # noqa: E402
import requests  # noqa: E402
from docker.errors import ImageNotFound  # noqa: E402
from mlflow import MlflowClient  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.serving.run import ADMIN_TOKEN, register  # noqa: E402
from common.processes import free_port, free_port_block  # noqa: E402
from flowline.config import Ports  # noqa: E402
from flowline.platform import Platform  # noqa: E402
from pipelines.train import TrainConfig, train  # noqa: E402
from serving.backends.docker import RESOURCES_MODEL_TAG  # noqa: E402
from serving.images.builder import ImageBuilder  # noqa: E402
from tests.helpers_serving import spawn_scoring_server, start_gateway, wait_ready  # noqa: E402

MODEL, KERAS = "bench-docker", "bench-docker-keras"


def _served(gateway: str, name: str) -> str | None:
    models = requests.get(f"{gateway}/models", timeout=5).json()["models"]
    return next((str(m["version"]) for m in models if m["name"] == name), None)


def _first_answer(url: str, body: dict, version: str, timeout: float = 900.0) -> float:
    """Seconds until ``url`` answers 200 from ``version`` (polled every 50 ms)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            answer = requests.post(url, json=body, timeout=30)
            if answer.status_code == 200 and answer.headers.get(
                "x-flowline-model-version", ""
            ).endswith(f"/{version}"):
                return time.monotonic() - started
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"version {version} did not answer within {timeout:.0f} s")


def _remove_environment(client: docker.DockerClient, tag: str) -> None:
    """Drop a cached environment image, and the model images built on it: a cold build."""
    for image in client.images.list(filters={"label": f"io.flowline.environment={tag}"}):
        client.images.remove(image.id, force=True)
    try:
        client.images.remove(tag, force=True)
    except ImageNotFound:
        pass


def _promotions(running: Platform, client: docker.DockerClient) -> dict[str, Any]:
    registry = MlflowClient()
    first = train(TrainConfig(max_evals=1, registered_model=MODEL, seed=1), lambda _: None)
    second = train(TrainConfig(max_evals=1, registered_model=MODEL, seed=2), lambda _: None)
    # The whole machine for the container, as the local process has it.
    registry.set_registered_model_tag(MODEL, RESOURCES_MODEL_TAG, json.dumps({"cpus": 2}))
    uri = f"models:/{MODEL}/{first.version}"
    example = json.loads(
        Path(mlflow.artifacts.download_artifacts(f"{uri}/serving_input_example.json")).read_text()
    )
    probe = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(running.home / "probe")))
    _remove_environment(client, ImageBuilder(client, running.home).environment_tag(probe))
    gateway = f"http://127.0.0.1:{running.ports.gateway}"
    url = f"{gateway}/models/{MODEL}/invocations"

    registry.set_registered_model_alias(MODEL, "production", first.version)
    cold = _first_answer(url, example, first.version)
    registry.delete_registered_model_alias(MODEL, "production")
    deadline = time.monotonic() + 120
    while _served(gateway, MODEL) is not None and time.monotonic() < deadline:
        time.sleep(0.1)
    registry.set_registered_model_alias(MODEL, "production", first.version)
    warm = _first_answer(url, example, first.version)
    registry.set_registered_model_alias(MODEL, "production", second.version)
    new_version = _first_answer(url, example, second.version)
    return {
        "cold_promotion_to_first_answer_s": round(cold, 2),
        "warm_promotion_to_first_answer_s": round(warm, 2),
        "new_version_environment_cached_to_first_answer_s": round(new_version, 2),
        "example": example,
        "version": second.version,
    }


def _throughput(
    running: Platform, example: dict, version: str, duration: int, rounds: int, tmp: Path
) -> dict[str, Any]:
    """rps and p99 at 64 clients: a container replica against a local process."""
    status = requests.get(f"http://127.0.0.1:{running.ports.controller}/status", timeout=5).json()
    container_url = next(d for d in status["deployments"] if d["model"] == MODEL)["replicas"][0][
        "url"
    ]
    model_dir = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{MODEL}/{version}", dst_path=str(tmp / "model")
        )
    )
    (tmp / "local-logs").mkdir()
    local = spawn_scoring_server(model_dir, tmp / "local-logs")
    gateways = []
    try:
        assert wait_ready(local), local.log_tail()
        for name, replica in (("local", local.url), ("container", container_url)):
            (tmp / f"gw-{name}").mkdir()
            gateway = start_gateway(tmp / f"gw-{name}", env={"FLOWLINE_ADMIN_TOKEN": ADMIN_TOKEN})
            gateways.append(gateway)
            register(gateway, [replica], model_dir)
        script = tmp / "post.lua"
        script.write_text(harness.LUA)
        body = json.dumps(
            {
                "dataframe_split": {
                    **example["dataframe_split"],
                    "data": example["dataframe_split"]["data"][:1],
                }
            }
        )
        targets = {
            "local": f"{gateways[0].url}/invocations",
            "container": f"{gateways[1].url}/invocations",
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for url in targets.values():
            harness.run_wrk(url, body, 64, 2, script)
        for i in range(rounds):
            for name, url in targets.items():
                harness.wait_quiet([g.pid for g in gateways] + [local.pid])
                result = harness.run_wrk(url, body, 64, duration, script)
                runs[name].append(result)
                print(f"round {i + 1} {name}: {result}", flush=True)
    finally:
        for gateway in gateways:
            gateway.stop()
        local.stop()
    medians = {
        name: {
            k: statistics.median(r[k] for r in results)
            for k in ("rps", "p50_ms", "p99_ms", "errors")
        }
        for name, results in runs.items()
    }
    return {
        "c64": medians,
        "rounds": runs,
        "container_rps_vs_local": round(medians["container"]["rps"] / medians["local"]["rps"], 3),
        "container_p99_vs_local": round(
            medians["container"]["p99_ms"] / medians["local"]["p99_ms"], 3
        ),
    }


def _demo_models(tmp: Path) -> dict[str, Path]:
    """The sklearn and keras demo models' files, downloaded while the registry is up."""
    keras = train(
        TrainConfig(family="keras", max_evals=1, epochs=2, registered_model=KERAS), lambda _: None
    )
    uris = {"sklearn": f"models:/{MODEL}/1", "keras": f"models:/{KERAS}/{keras.version}"}
    return {
        family: Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp / family)))
        for family, uri in uris.items()
    }


def _image_figures(client: docker.DockerClient, home: Path, models: dict[str, Path]) -> dict:
    """Cold build time and size of each demo model's image, once no container uses one."""
    figures = {}
    for family, model_dir in models.items():
        builder = ImageBuilder(client, home / f"build-{family}")
        _remove_environment(client, builder.environment_tag(model_dir))
        built = builder.image_for(f"bench-{family}", "1", model_dir)
        image = client.images.get(built.tag)
        figures[family] = {
            "build_s": round(built.seconds, 1),
            "image_mb": round(image.attrs["Size"] / 1e6),
            "tag": built.tag,
        }
        print(f"{family} image: {figures[family]}", flush=True)
    return figures


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def summarise(results: dict[str, Any]) -> str:
    """The results as a short Markdown report."""
    p, t, images = results["promotion"], results["throughput"], results["images"]
    runs = t["c64"]
    lines = [
        "# Docker backend",
        "",
        f"{results['when']}, {results['machine']}, load before {results['load_before']}.",
        "",
        _row("promotion to first answer", "seconds", "target"),
        _row("---", "---", "---"),
        _row("cold: environment and model images built", p["cold_promotion_to_first_answer_s"], ""),
        _row("warm: image cached", p["warm_promotion_to_first_answer_s"], "<= 15"),
        _row(
            "new version, environment cached",
            p["new_version_environment_cached_to_first_answer_s"],
            "",
        ),
        "",
        _row("64 clients through the gateway", "rps", "p50 ms", "p99 ms", "errors"),
        _row("---", "---", "---", "---", "---"),
        *[
            _row(f"{name} replica", r["rps"], r["p50_ms"], r["p99_ms"], r["errors"])
            for name, r in runs.items()
        ],
        "",
        f"container / local: rps {t['container_rps_vs_local']}, "
        f"p99 {t['container_p99_vs_local']} (target: within 10 %)",
        "",
        _row("image", "cold build s", "size MB"),
        _row("---", "---", "---"),
        *[_row(family, v["build_s"], v["image_mb"]) for family, v in images.items()],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and write the results."""
    parser = harness.command_line(__doc__)
    harness.add_wrk_options(parser, warmup=False)
    args = parser.parse_args(argv)
    client = docker.from_env()
    load_before = harness.load_average()
    ports = Ports(free_port(), free_port(), free_port(), free_port(), free_port_block(10))
    with tempfile.TemporaryDirectory(prefix="flowline-bench-docker-") as tmp:
        home = Path(tmp) / "home"
        running = Platform(
            home=home, ports=ports, replicas=1, reconcile_interval=1.0, backend="docker"
        )
        running.start()
        try:
            mlflow.set_tracking_uri(running.tracking.url)
            promotion = _promotions(running, client)
            print(f"promotion: { {k: v for k, v in promotion.items() if k != 'example'} }")
            throughput = _throughput(
                running, promotion.pop("example"), promotion.pop("version"), args.duration,
                args.rounds, Path(tmp),
            )  # fmt: skip
            models = _demo_models(Path(tmp))
        finally:
            running.stop()
            mlflow.set_tracking_uri(None)
        images = _image_figures(client, Path(tmp), models)
    results = {
        "benchmark": "docker_backend",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{harness.machine()}, Docker {client.version()['Version']} "
        f"({client.info()['Driver']})",
        "load_before": load_before,
        "promotion": promotion,
        "throughput": throughput,
        "images": images,
    }
    harness.write_results(results, harness.RESULTS / "docker_backend.json", summarise)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
