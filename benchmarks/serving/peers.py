"""flowline against its peers on one model version, in one interleaved run, with wrk.

The model is the demo version exactly as `make demo` trains it (20 trials, seed 42: a
logistic regression behind the ColumnTransformer, compiled to ONNX). Servers, each at 1
and 64 connections, single-row JSON:

* ``stock``: `mlflow models serve` of the version scored the Python way (its ONNX graph
  taken out of the copy): what a user of stock MLflow serves;
* ``stock_onnx``: `mlflow models serve` of the version as registered (compiled path);
* ``flowline_before``: the gateway of the commit before this work (``--before``, checked
  out into a temporary worktree) over the Python replica: flowline as it was before the
  compiled path, the fuller batches and the plain-ASGI scoring path;
* ``flowline``: the gateway (hold on) over the compiled replica;
* ``bentoml``: BentoML 1.4.40 serving the same version (adaptive batching, 1 worker) from
  its own venv (benchmarks/.bentoml-venv, created when missing; never a flowline
  dependency). Every 1-client run comes before the first 64-client one, so BentoML meets
  them fresh: after a 64-client burst its 1-client latency stays high until a restart.

Reported per server: rps, p50/p99, CPU per request of all its processes (gateway and
replica for flowline) and rows per model call (the replica's mean batch). Writes
benchmarks/results/peers.json and .md.

    .venv/bin/python benchmarks/serving/peers.py [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness  # noqa: E402
from tests.conftest import Service, spawn_service, wait_for  # noqa: E402
from tests.helpers_serving import http_ok, start_gateway, start_scoring_servers  # noqa: E402

ADMIN_TOKEN = "benchmark-admin-token"
# The last commit before the compiled path (issue 14): the anchor of the "before" gateway.
BEFORE = "8142ecb"
BENTO_VENV = harness.REPO / "benchmarks" / ".bentoml-venv"
BENTO_PACKAGES = [
    "bentoml==1.4.40",
    "mlflow==3.17.2",
    "scikit-learn==1.9.1",
    "pandas==3.1.1",
    "onnxruntime==1.32.0",
]
SERVERS = ("stock", "stock_onnx", "flowline_before", "flowline", "bentoml")
MODEL = "flowline-demo"


def ensure_bento_venv() -> Path:
    """The BentoML venv's bin folder, created (python3.11 -m venv + pip) when missing."""
    bin_dir = BENTO_VENV / "bin"
    if not (bin_dir / "bentoml").exists():
        subprocess.run(["python3.11", "-m", "venv", str(BENTO_VENV)], check=True)
        pip = [str(bin_dir / "python"), "-m", "pip", "install", "-q", *BENTO_PACKAGES]
        subprocess.run(pip, check=True)
    return bin_dir


def train_demo(tmp: Path) -> tuple[Path, Path, str]:
    """Train the demo version into a private store; (compiled dir, Python dir, runtime)."""
    import mlflow
    import yaml

    from pipelines.train import TrainConfig, train

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    mlflow.set_experiment("peers-benchmark")
    version = train(TrainConfig(max_evals=20, seed=42), report=lambda line: None)
    compiled = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version.version}"))
    python = tmp / "python-model"
    shutil.copytree(compiled, python)
    spec_path = python / "MLmodel"
    spec = yaml.safe_load(spec_path.read_text())
    spec["flavors"]["python_function"].get("artifacts", {}).pop("compiled", None)
    spec_path.write_text(yaml.safe_dump(spec))
    (python / "artifacts" / "model.onnx").unlink(missing_ok=True)
    return compiled, python, version.tags.get("flowline.runtime", "?")


def checkout(commit: str, folder: Path) -> Path:
    """A detached worktree of ``commit`` (removed by the caller when done)."""
    git = ["git", "-C", str(harness.REPO), "worktree", "add", "--detach", str(folder), commit]
    subprocess.run(git, check=True, capture_output=True)
    return folder


def start_bento(bin_dir: Path, model_dir: Path, tmp: Path) -> Service:
    """`bentoml serve` of bento_service.py on a free port, once it answers /readyz."""
    from common.processes import free_port

    port = free_port()
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(tmp),
        "BENTOML_HOME": str(tmp / "bentoml"),
        "FLOWLINE_BENCH_MODEL": str(model_dir),
        "BENTOML_DO_NOT_TRACK": "True",
    }
    argv = [
        str(bin_dir / "bentoml"), "serve", "bento_service:Scorer", "--host", "127.0.0.1",
        "--port", str(port), "--working-dir", str(Path(__file__).parent),
    ]  # fmt: skip
    service = spawn_service(argv, tmp / f"bentoml-{port}.log", env, f"http://127.0.0.1:{port}")
    try:
        wait_for(lambda: http_ok(f"{service.url}/readyz"), "BentoML to be ready", 180)
    except Exception:
        print(service.log_tail(), file=sys.stderr)
        service.stop()
        raise
    return service


def deploy(gateway: Service, replica: Service, model_dir: Path) -> None:
    """PUT the deployment on the gateway, as the controller does after its smoke test
    (default settings; the old gateway knows no ``hold_ms``, so none is sent)."""
    from serving.model_metadata import deployment_from_model_dir

    deployment = deployment_from_model_dir(MODEL, "1", [replica.url], model_dir).to_dict()
    deployment["batching"].pop("hold_ms")
    harness.put_deployment(gateway.url, ADMIN_TOKEN, MODEL, deployment)


def _metric_sums(url: str, fragment: str) -> tuple[float, float]:
    """(sum of ``*_sum``, sum of ``*_count``) of the histograms whose name holds ``fragment``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    total = count = 0.0
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        if fragment in family.name:
            for sample in family.samples:
                if sample.name.endswith("_sum"):
                    total += sample.value
                elif sample.name.endswith("_count"):
                    count += sample.value
    return total, count


def gateway_calls(gateway: Service) -> float:
    """Replica calls the gateway has made so far (single, batch and fallback)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    calls = 0.0
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name == "flowline_gateway_backend_calls":
            calls += sum(s.value for s in family.samples if s.name.endswith("_total"))
    return calls


def measure(
    name: str,
    url: str,
    body: str,
    connections: int,
    duration: int,
    script: Path,
    groups: list[int],
    calls: Any,
) -> dict[str, Any]:
    """One wrk run with the CPU of the process trees ``groups`` (each started in its own
    group, so also idle-checked as one) and the model calls that ``calls()`` counts."""
    quiet_s = harness.wait_quiet(groups)
    cpu_before = [harness.tree_cpu_seconds(g) for g in groups]
    calls_before = calls()
    result = harness.run_wrk(url, body, connections, duration, script)
    cpu = [harness.tree_cpu_seconds(g) - b for g, b in zip(groups, cpu_before, strict=True)]
    requests = max(result["requests"], 1)
    result["cpu_us_per_request"] = round(sum(cpu) / requests * 1e6, 1)
    result["cpu_us_per_request_first_process"] = round(cpu[0] / requests * 1e6, 1)
    model_calls = calls() - calls_before
    result["rows_per_model_call"] = round(requests / model_calls, 2) if model_calls else None
    result["quiet_wait_s"] = round(quiet_s, 2)
    print(f"{name} c={connections}: {result}", flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    parser = harness.command_line(__doc__)
    harness.add_wrk_options(parser)
    harness.add_markdown_only(parser)
    parser.add_argument("--output", default=str(harness.RESULTS / "peers.json"))
    parser.add_argument("--before", default=BEFORE, help="commit of the flowline_before gateway")
    args = parser.parse_args(argv)
    exit_code = harness.run_or_render(args, summarise)
    if exit_code is not None:
        return exit_code
    bin_dir = ensure_bento_venv()
    load_before = harness.load_average()
    rounds: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="flowline-peers-") as tmp_name:
        tmp = Path(tmp_name)
        compiled, python, runtime = train_demo(tmp)
        example = json.loads((compiled / "serving_input_example.json").read_text())
        split = example["dataframe_split"]
        row = dict(zip(split["columns"], split["data"][0], strict=True))
        first = {"columns": split["columns"], "data": split["data"][:1]}
        body = json.dumps({"dataframe_split": first})
        bento_body = json.dumps({"rows": [row]})
        script = tmp / "post.lua"
        script.write_text(harness.LUA)
        services: list[Service] = []
        try:
            replica_py, replica_onnx = start_scoring_servers([python, compiled], tmp)
            services += [replica_py, replica_onnx]
            env = {"FLOWLINE_ADMIN_TOKEN": ADMIN_TOKEN}
            for folder in ("gw-before", "gw-after"):
                (tmp / folder).mkdir()
            tree = checkout(args.before, tmp / "before")
            before = start_gateway(tmp / "gw-before", env=env, cwd=tree)
            services.append(before)
            after = start_gateway(tmp / "gw-after", env=env)
            services.append(after)
            deploy(before, replica_py, python)
            deploy(after, replica_onnx, compiled)
            bento = start_bento(bin_dir, compiled, tmp)
            services.append(bento)

            def bento_calls() -> float:
                return _metric_sums(f"{bento.url}/metrics", "adaptive_batch_size")[1]

            def no_calls() -> float:
                return 0.0

            targets = {
                "stock": (f"{replica_py.url}/invocations", body, [replica_py.pid], no_calls),
                "stock_onnx": (
                    f"{replica_onnx.url}/invocations", body, [replica_onnx.pid], no_calls,
                ),
                "flowline_before": (
                    f"{before.url}/invocations", body, [before.pid, replica_py.pid],
                    lambda: gateway_calls(before),
                ),
                "flowline": (
                    f"{after.url}/invocations", body, [after.pid, replica_onnx.pid],
                    lambda: gateway_calls(after),
                ),
                "bentoml": (f"{bento.url}/invocations", bento_body, [bento.pid], bento_calls),
            }  # fmt: skip
            for connections in (1, 64):
                for url, payload, _, _ in targets.values():
                    harness.run_wrk(url, payload, connections, args.warmup, script)
                for _ in range(args.rounds):
                    for name, (url, payload, groups, calls) in targets.items():
                        rounds.setdefault(f"{name}_c{connections}", []).append(
                            measure(name, url, payload, connections, args.duration, script,
                                    groups, calls)
                        )  # fmt: skip
        finally:
            for service in services:
                service.stop()
            subprocess.run(
                [
                    "git",
                    "-C",
                    str(harness.REPO),
                    "worktree",
                    "remove",
                    "--force",
                    str(tmp / "before"),
                ],
                capture_output=True,
            )
    runs = {key: summarise_rounds(value) for key, value in rounds.items()}
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": harness.machine(),
        "load_before": load_before,
        "model": f"the demo version (runtime {runtime}): {MODEL}, 20 trials, seed 42",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "before": args.before,
        "runs": runs,
        "raw_rounds": rounds,
        "ratios": ratios(runs),
    }
    harness.write_results(results, args.output, summarise)
    return 0


def summarise_rounds(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds, with the CPU and batch figures."""
    import statistics

    out = harness.median_run(rounds)
    for key in ("cpu_us_per_request_first_process", "rows_per_model_call"):
        values = [r[key] for r in rounds if r.get(key) is not None]
        out[key] = round(statistics.median(values), 2) if values else None
    return out


def ratios(runs: dict[str, Any]) -> dict[str, float]:
    """The issue's targets as ratios of the same run."""
    return {
        "rps_c64_vs_flowline_before": runs["flowline_c64"]["rps"]
        / runs["flowline_before_c64"]["rps"],
        "rps_c64_vs_bentoml": runs["flowline_c64"]["rps"] / runs["bentoml_c64"]["rps"],
        "p50_c1_vs_stock": runs["flowline_c1"]["p50_ms"] / runs["stock_c1"]["p50_ms"],
        "gateway_cpu_us_c64": runs["flowline_c64"]["cpu_us_per_request_first_process"],
    }


def summarise(results: dict[str, Any]) -> str:
    """Markdown: the table of servers, then the targets."""
    r, q = results["runs"], results["ratios"]
    lines = [
        "# Serving peers: stock MLflow, flowline and BentoML on one model version",
        "",
        f"{results['when']} on {results['machine']}; model: {results['model']}; single-row "
        f"JSON; wrk -t1; {results['rounds']} interleaved rounds of {results['duration_s']} s "
        f"per setting (medians); load average before the run {results['load_before']}.",
        "",
        "| server | clients | rps | p50 ms | p99 ms | CPU µs/request (all its processes) "
        "| rows per model call | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for connections in (1, 64):
        for name in SERVERS:
            run = r.get(f"{name}_c{connections}")
            if run is None:
                continue
            rows = run.get("rows_per_model_call")
            lines.append(
                f"| {name} | {connections} | {run['rps']} | {run['p50_ms']:.2f} | "
                f"{run['p99_ms']:.2f} | {run.get('cpu_us_per_request', '')} | "
                f"{'' if rows is None else rows} | {run['errors']} |"
            )
    lines += [
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
        f"| rps at 64 clients ≥ 2× flowline before | {q['rps_c64_vs_flowline_before']:.2f}× | "
        f"{'yes' if q['rps_c64_vs_flowline_before'] >= 2 else 'no'} |",
        f"| rps at 64 clients ≥ 6× BentoML | {q['rps_c64_vs_bentoml']:.2f}× | "
        f"{'yes' if q['rps_c64_vs_bentoml'] >= 6 else 'no'} |",
        f"| p50 at 1 client ≤ 0.5× stock | {q['p50_c1_vs_stock']:.2f}× | "
        f"{'yes' if q['p50_c1_vs_stock'] <= 0.5 else 'no'} |",
        f"| gateway CPU per request at 64 clients ≤ 80 µs | {q['gateway_cpu_us_c64']} µs | "
        f"{'yes' if q['gateway_cpu_us_c64'] <= 80 else 'no'} |",
        "",
        "stock: `mlflow models serve` of the version without its ONNX graph (the Python "
        "pipeline); stock_onnx: the same server on the version as registered. "
        f"flowline_before: the gateway of commit {results.get('before', BEFORE)} (before "
        "this work) over the Python replica. "
        "Rows per model call: requests / replica calls (flowline, from the gateway's "
        "counters) or BentoML's adaptive batch size histogram.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    raise SystemExit(main())
