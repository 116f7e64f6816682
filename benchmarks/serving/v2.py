"""The Open Inference Protocol (V2) against `/invocations`, REST and gRPC, at 1 and 64 clients.

One `mlflow models serve` replica of the breast-cancer model (30 float columns) behind
one gateway with its gRPC port on (batching on, the default). Single-row requests, in
interleaved rounds per setting:

* wrk (C): `POST /models/bc/invocations` (the anchor) and `POST /v2/models/bc/infer`,
  one V2 input per column;
* one Python client (asyncio, the same loop for both protocols): V2 REST through
  aiohttp and V2 gRPC through grpc.aio with flowline's generated stub, so the REST/gRPC
  comparison pays the same client language.

Reports rps, p50/p99 and the gateway's CPU per request, and the ratios against the
targets: V2 REST p50 within 10% of `/invocations` (wrk), gRPC p50 <= V2 REST p50 (same
Python client). Writes benchmarks/results/v2.json and .md.

    python benchmarks/serving/v2.py [--duration 5] [--rounds 3]

Needs `wrk` on PATH.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness  # noqa: E402
from common.processes import free_port  # noqa: E402
from tests.helpers_serving import (  # noqa: E402
    breast_cancer_frame,
    save_breast_cancer_model,
    start_gateway,
    start_scoring_server,
)

ADMIN_TOKEN = "benchmark-admin-token"
CLIENTS = (1, 64)
TARGETS = {"v2_rest_p50_over_invocations": 1.10, "grpc_p50_over_v2_rest": 1.0}


def v2_body(features: Any) -> dict[str, Any]:
    """A V2 request with one FP64 input per column, the first row of `features`."""
    row = features.iloc[0]
    return {
        "inputs": [
            {"name": name, "datatype": "FP64", "shape": [1], "data": [float(row[name])]}
            for name in features.columns
        ]
    }


def grpc_request(features: Any) -> Any:
    """The same request as a protobuf ModelInferRequest (typed contents)."""
    from serving.gateway.v2 import inference_pb2 as pb

    request = pb.ModelInferRequest(model_name="bc")
    row = features.iloc[0]
    for name in features.columns:
        tensor = request.inputs.add(name=name, datatype="FP64", shape=[1])
        tensor.contents.fp64_contents.append(float(row[name]))
    return request


async def _closed_loop(call: Any, clients: int, duration: float) -> dict[str, Any]:
    """`clients` tasks calling `call()` back to back for `duration` seconds."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        while time.perf_counter() < stop:
            started = time.perf_counter()
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - started)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    elapsed = time.perf_counter() - began
    latencies.sort()

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000, 3)

    return {
        "connections": clients,
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "max_ms": pct(1.0),
        "errors": errors,
    }


async def python_rest(url: str, body: dict[str, Any], clients: int, duration: float) -> dict:
    """V2 REST from aiohttp, `clients` concurrent callers."""
    import aiohttp

    payload = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call() -> None:
            async with session.post(url, data=payload, headers=headers) as answer:
                await answer.read()
                if answer.status != 200:
                    raise RuntimeError(answer.status)

        return await _closed_loop(call, clients, duration)


async def python_grpc(address: str, request: Any, clients: int, duration: float) -> dict:
    """V2 gRPC from grpc.aio, `clients` concurrent callers on one channel."""
    import grpc

    from serving.gateway.v2 import inference_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call() -> None:
            await stub.ModelInfer(request, timeout=10)

        return await _closed_loop(call, clients, duration)


def _measured(run: Any, clients: int, duration: int, gateway_pid: int) -> dict[str, Any]:
    before = harness.cpu_seconds(gateway_pid)
    result = run(clients, duration)
    after = harness.cpu_seconds(gateway_pid)
    if before is not None and after is not None:
        result["cpu_us_per_request"] = round((after - before) / max(result["requests"], 1) * 1e6, 1)
    return result


def summarise(results: dict[str, Any]) -> str:
    """Markdown tables of the runs and the ratios against the targets."""
    lines = [
        "# Open Inference Protocol (V2) vs `/invocations`: REST and gRPC",
        "",
        f"{results['when']} on {results['machine']}; model: {results['model']}; one replica, "
        f"batching on; single-row requests; {results['rounds']} interleaved rounds of "
        f"{results['duration_s']} s per setting (medians shown); load average before the run "
        f"{results['load_before']}. The client runs on the same 2 cores.",
        "",
        "| clients | setting | client | rps | p50 ms | p90 ms | p99 ms | gateway CPU us/req | "
        "errors |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, run in results["runs"].items():
        setting, _, clients = key.rpartition("@")
        client = "wrk" if setting in ("invocations", "v2_rest") else "python asyncio"
        lines.append(
            f"| {clients} | {setting.removeprefix('py_')} | {client} | {run['rps']} | "
            f"{run['p50_ms']:.3f} | {run['p90_ms']:.3f} | {run['p99_ms']:.3f} | "
            f"{run.get('cpu_us_per_request')} | {run['errors']} |"
        )
    lines += ["", "| ratio | clients | value | target | met |", "|---|---:|---:|---:|:---:|"]
    for key, value in results["ratios"].items():
        name, _, clients = key.rpartition("@")
        target = TARGETS[name]
        met = "yes" if value <= target else "no"
        lines.append(f"| {name} | {clients} | {value:.3f} | <= {target} | {met} |")
    lines += [
        "",
        "v2_rest_p50_over_invocations: V2 REST p50 / `/invocations` p50, both from wrk. "
        "grpc_p50_over_v2_rest: gRPC p50 / V2 REST p50, both from the same Python asyncio "
        "client (aiohttp and grpc.aio), so neither side gets a faster client. V2 requests "
        "are turned into the same `dataframe_split` body `/invocations` takes, so the "
        "replica's work is identical; the difference is the gateway's decoding and "
        "encoding (its CPU per request column).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    parser = harness.command_line(__doc__)
    harness.add_wrk_options(parser)
    parser.set_defaults(duration=5, rounds=3, warmup=2)
    parser.add_argument("--output", default=str(harness.RESULTS / "v2.json"))
    harness.add_markdown_only(parser)
    args = parser.parse_args(argv)
    if (code := harness.run_or_render(args, summarise)) is not None:
        return code

    import httpx

    from serving.model_metadata import deployment_from_model_dir

    features, _ = breast_cancer_frame()
    invocations_body = harness.single_row_body(features)
    v2 = v2_body(features)
    request = grpc_request(features)
    load_before = harness.load_average()
    rounds: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="flowline-bench-") as tmp:
        tmp_path = Path(tmp)
        model_dir = save_breast_cancer_model(tmp_path / "model")
        replica = start_scoring_server(model_dir, tmp_path)
        grpc_port = free_port()
        env = {"FLOWLINE_ADMIN_TOKEN": ADMIN_TOKEN, "FLOWLINE_GRPC_PORT": str(grpc_port)}
        gateway = start_gateway(tmp_path, env)
        try:
            deployment = deployment_from_model_dir("bc", "1", [replica.url], model_dir)
            httpx.put(
                f"{gateway.url}/admin/deployments/bc",
                json=deployment.to_dict(),
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=30,
            ).raise_for_status()
            script = tmp_path / "post.lua"
            script.write_text(harness.LUA)
            invocations_url = f"{gateway.url}/models/bc/invocations"
            v2_url = f"{gateway.url}/v2/models/bc/infer"
            address = f"127.0.0.1:{grpc_port}"
            v2_text = json.dumps(v2)
            settings = {
                "invocations": lambda c, d: harness.run_wrk(
                    invocations_url, invocations_body, c, d, script
                ),
                "v2_rest": lambda c, d: harness.run_wrk(v2_url, v2_text, c, d, script),
                "py_v2_rest": lambda c, d: asyncio.run(python_rest(v2_url, v2, c, d)),
                "py_grpc": lambda c, d: asyncio.run(python_grpc(address, request, c, d)),
            }
            for run in settings.values():
                run(64, args.warmup)
            for clients in CLIENTS:
                for _ in range(args.rounds):
                    for name, run in settings.items():
                        result = _measured(run, clients, args.duration, gateway.pid)
                        rounds.setdefault(f"{name}@{clients}", []).append(result)
        finally:
            gateway.stop()
            replica.stop()

    runs = {key: harness.median_run(values) for key, values in rounds.items()}
    ratios = {}
    for clients in CLIENTS:
        p50 = {name: runs[f"{name}@{clients}"]["p50_ms"] for name in settings}
        ratios[f"v2_rest_p50_over_invocations@{clients}"] = round(
            p50["v2_rest"] / p50["invocations"], 3
        )
        ratios[f"grpc_p50_over_v2_rest@{clients}"] = round(p50["py_grpc"] / p50["py_v2_rest"], 3)
    doc = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": harness.machine(),
        "model": "LogisticRegression, breast_cancer (30 float columns)",
        "rounds": args.rounds,
        "duration_s": args.duration,
        "load_before": round(load_before, 2),
        "runs": runs,
        "ratios": ratios,
        "per_round_p50_ms": {key: [r["p50_ms"] for r in values] for key, values in rounds.items()},
        "spread_p50_ms": {
            key: round(statistics.pstdev(r["p50_ms"] for r in values), 3)
            for key, values in rounds.items()
        },
    }
    harness.write_results(doc, args.output, summarise)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
