"""What a shadow costs production's callers: p99 at 64 clients, shadow off vs on, same run.

One gateway, two `mlflow models serve` replicas of the breast-cancer model (batching on,
the default). Three models on that gateway share production's replica: `plain` has no
shadow, `mirrored` has a shadow with sample 1.0 (every successful request copied) and
`sampled` one with sample 0.1, both on the second replica. Single-row requests from 64
concurrent Python clients (aiohttp, the closed loop of benchmarks/serving/v2.py), in
interleaved rounds, so every setting meets the same machine load. Reports rps and
p50/p90/p99 per setting, the p99 each shadow adds, and what each shadow did (mirrored,
dropped, errors). Writes benchmarks/results/shadow.json and .md.

    python benchmarks/serving/shadow.py [--duration 10] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness  # noqa: E402
from benchmarks.serving.rate_limits import ADMIN_TOKEN, deploy  # noqa: E402
from benchmarks.serving.v2 import python_rest  # noqa: E402
from tests.helpers_serving import (  # noqa: E402
    breast_cancer_frame,
    save_breast_cancer_model,
    start_gateway,
    start_scoring_servers,
)

CLIENTS = 64
SETTINGS = {"shadow_off": "plain", "shadow_on": "mirrored", "shadow_on_10pct": "sampled"}
SAMPLES = {"mirrored": 1.0, "sampled": 0.1}
TARGET_MS = 1.0


def add_shadow(gateway_url: str, model: str, replica: str, model_dir: Path, sample: float) -> None:
    """PUT a shadow (version 2, ``sample``) of `model` on `replica`."""
    import httpx

    from serving.model_metadata import deployment_from_model_dir

    deployment = deployment_from_model_dir(model, "2", [replica], model_dir).to_dict()
    answer = httpx.put(
        f"{gateway_url}/admin/deployments/{model}/shadow",
        json={"deployment": deployment, "sample": sample},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=30,
    )
    answer.raise_for_status()


def shadow_state(gateway_url: str, model: str) -> dict[str, Any] | None:
    """The `shadow` block of `GET /models` for `model`."""
    import httpx

    models = httpx.get(f"{gateway_url}/models", timeout=10).json()["models"]
    return next(m["shadow"] for m in models if m["name"] == model)


def summarise(results: dict[str, Any]) -> str:
    """Markdown: one row per setting, then the p99 ratio and the shadow's counters."""
    lines = [
        "# Shadow traffic: production latency with the shadow off and on",
        "",
        f"{results['when']}, {results['machine']}, load before {results['load_before']}; "
        f"{results['clients']} clients, {results['rounds']} rounds of {results['duration_s']} s "
        "(medians).",
        "",
        "| setting | rps | p50 ms | p90 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in results["runs"].items():
        lines.append(
            f"| {name} | {run['rps']} | {run['p50_ms']} | {run['p90_ms']} | {run['p99_ms']} "
            f"| {run['errors']} |"
        )
    off = results["runs"]["shadow_off"]["p99_ms"]
    lines += ["", f"p99 added (target <= {TARGET_MS:g} ms):", ""]
    for name, run in results["runs"].items():
        if name != "shadow_off":
            added = run["p99_ms"] - off
            verdict = "met" if added <= TARGET_MS else "missed"
            lines.append(f"- {name}: {added:+.1f} ms ({run['p99_ms'] / off:.3f}x): **{verdict}**")
    shadow = results["shadow"]
    # Results written before the 10 % setting hold one shadow's block, not one per model.
    shadows = shadow if isinstance(shadow.get("mirrored"), dict) else {"mirrored": shadow}
    lines += ["", "What each shadow did (GET /models):", ""]
    for model, state in shadows.items():
        lines.append(f"- {model}: {json.dumps(state)}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    parser = harness.command_line(__doc__)
    harness.add_wrk_options(parser, warmup=False)
    parser.set_defaults(duration=10, rounds=3)
    parser.add_argument("--output", default=str(harness.RESULTS / "shadow.json"))
    harness.add_markdown_only(parser)
    args = parser.parse_args(argv)
    if args.markdown_only:
        harness.rewrite_markdown(args.output, summarise)
        return 0

    features, _ = breast_cancer_frame()
    body = json.loads(harness.single_row_body(features))
    load_before = harness.load_average()
    rounds: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="flowline-bench-") as tmp:
        tmp_path = Path(tmp)
        model_dir = save_breast_cancer_model(tmp_path / "model")
        production, shadow = start_scoring_servers([model_dir, model_dir], tmp_path)
        gateway = None
        try:
            gateway = start_gateway(tmp_path, env={"FLOWLINE_ADMIN_TOKEN": ADMIN_TOKEN})
            for model in SETTINGS.values():
                deploy(gateway, model, production.url, model_dir)
            for model, sample in SAMPLES.items():
                add_shadow(gateway.url, model, shadow.url, model_dir, sample)
            quiet = [gateway.pid, production.pid, shadow.pid]
            for i in range(args.rounds):
                for name, model in SETTINGS.items():
                    harness.wait_quiet(quiet)
                    url = f"{gateway.url}/models/{model}/invocations"
                    result = asyncio.run(python_rest(url, body, CLIENTS, args.duration))
                    rounds.setdefault(name, []).append(result)
                    print(f"round {i + 1} {name}: {result}", flush=True)
            mirrored = {model: shadow_state(gateway.url, model) for model in SAMPLES}
        finally:
            if gateway is not None:
                gateway.stop()
            production.stop()
            shadow.stop()

    runs = {name: harness.median_run(value) for name, value in rounds.items()}
    off, on = runs["shadow_off"]["p99_ms"], runs["shadow_on"]["p99_ms"]
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": harness.machine(),
        "load_before": load_before,
        "model": "LogisticRegression, breast_cancer, 30 float columns",
        "clients": CLIENTS,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "runs": runs,
        "raw_rounds": rounds,
        "p99_on_over_off": round(on / off, 3) if off else None,
        "shadow": mirrored,
    }
    harness.write_results(results, args.output, summarise)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
