"""The cost of the gateway's rate limiter and response cache at 1 client, with wrk.

Two gateways in front of one `mlflow models serve` replica: one keeps limits and cache in
process, one shares them through Redis. Each serves three models on that replica: `plain`
(no limit, no cache: the baseline), `limited` (a limit far above the load, so every
request pays the check and none is refused) and `cached`. The limiter's cost is the p50
of `limited` minus the p50 of `plain` on the same gateway; the cache is measured with one
repeated body (every request a hit after the first) and with a body that changes on every
request (every request a miss: hash, replica call, store). Settings are run in
interleaved rounds, 1 connection, single-row JSON. Writes benchmarks/results/limits.json
and .md.

    python benchmarks/serving/limits.py [--duration 5] [--rounds 3]

Needs `wrk` on PATH and Redis at --redis (default redis://127.0.0.1:6379/0); the keys it
writes carry a prefix of their own and are deleted at the end.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness  # noqa: E402
from tests.conftest import Service  # noqa: E402
from tests.helpers_serving import (  # noqa: E402
    breast_cancer_frame,
    save_breast_cancer_model,
    start_gateway,
    start_scoring_server,
)

ADMIN_TOKEN = "benchmark-admin-token"
# Far above what one client sends: every request is checked, none refused.
HIGH_LIMIT = "100000/second"
CACHE = {"ttl_s": 600, "max_entries": 100000}
TARGETS = {"limiter_memory_added_ms": 0.3, "limiter_redis_added_ms": 1.0}
# A changing first value per request (a float near the repeated body's, so the replica does
# the same work): every request of the miss runs is a new cache key. WRK_SEED differs per
# run, so no run repeats the bodies (and hits the entries) of an earlier one.
MISS_LUA = (
    harness.LUA
    + r"""
local counter = 0
local seed = tonumber(os.getenv("WRK_SEED") or "0")
request = function()
  counter = counter + 1
  local value = string.format("%.9f", 17.99 + (seed * 100000 + counter) * 1e-9)
  local body = string.gsub(os.getenv("WRK_BODY"), "__N__", value, 1)
  return wrk.format(nil, nil, nil, body)
end
"""
)


def deploy(gateway: Service, model: str, replica: str, model_dir: Path, **fields: Any) -> None:
    """PUT a deployment of the benchmark model under `model`, with extra fields."""
    from serving.model_metadata import deployment_from_model_dir

    body = deployment_from_model_dir(model, "1", [replica], model_dir).to_dict()
    body.update(fields)
    harness.put_deployment(gateway.url, ADMIN_TOKEN, model, body)


def counters(gateway: Service) -> dict[str, float]:
    """Rate-limited, cache and store-error counters of the gateway now."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {
        "flowline_gateway_rate_limited",
        "flowline_gateway_cache_lookups",
        "flowline_gateway_store_errors",
    }
    out: dict[str, float] = {}
    text = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        if family.name in wanted:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                    out[f"{family.name}{{{labels}}}"] = sample.value
    return out


def clean_redis(url: str, prefix: str) -> int:
    """Delete the keys under `prefix`; how many there were."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
        return len(keys)
    finally:
        client.close()


def summarise(results: dict[str, Any]) -> str:
    """Markdown tables of the runs and the added latencies against the targets."""
    r = results["runs"]
    a = results["added_ms"]
    lines = [
        "# Gateway rate limits and response cache: added latency at 1 client",
        "",
        f"{results['when']} on {results['machine']}; model: {results['model']}; one "
        f"replica; single-row JSON; wrk -t1 -c1; {results['rounds']} interleaved rounds of "
        f"{results['duration_s']} s per setting (medians shown); load average before the "
        f"run {results['load_before']}. Limit on the `limited` model: {HIGH_LIMIT} "
        "(checked on every request, never refused).",
        "",
        "| store | setting | rps | p50 ms | p90 ms | p99 ms | gateway CPU us/request | "
        "errors + non-2xx |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for key, run in r.items():
        store, _, setting = key.partition("_")
        lines.append(
            f"| {store} | {setting} | {run['rps']} | {run['p50_ms']:.3f} | "
            f"{run['p90_ms']:.3f} | {run['p99_ms']:.3f} | {run.get('cpu_us_per_request')} | "
            f"{run['errors']} |"
        )
    lines += [
        "",
        "| measure | p50 difference | target | met |",
        "|---|---:|---:|:---:|",
    ]
    for key, value in a.items():
        target = TARGETS.get(key)
        met = "" if target is None else ("yes" if value <= target else "no")
        shown = "" if target is None else f"<= {target} ms"
        lines.append(f"| {key} | {value:+.3f} ms | {shown} | {met} |")
    lines += [
        "",
        "limiter_*: `limited` minus `plain` on the same gateway; cache_hit_vs_miss: a hit "
        "minus a miss (negative: the hit is faster); cache_miss_added: a miss minus `plain` "
        "(hashing the canonical body and storing the answer). The replica's own p50 "
        "(about 4-5 ms, p99 near 100 ms) dominates and varies by a few tenths of a "
        "millisecond between rounds; the gateway CPU per request column is the "
        "load-independent cost.",
        "",
        f"Counters after the run (warm-up included): {json.dumps(results['counters'])}; "
        f"requests of the measured miss runs: {json.dumps(results['miss_runs_requests'])}.",
        "",
    ]
    if results["load_before"] > 1.5:
        lines += [
            f"Note: the 2-core machine was busy (load average {results['load_before']}); "
            "differences of a few hundredths of a millisecond are within the noise.",
            "",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results."""
    parser = harness.command_line(__doc__)
    harness.add_wrk_options(parser)
    parser.set_defaults(duration=3, rounds=5, warmup=1)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--output", default=str(harness.RESULTS / "limits.json"))
    harness.add_markdown_only(parser)
    args = parser.parse_args(argv)
    if (code := harness.run_or_render(args, summarise)) is not None:
        return code

    features, _ = breast_cancer_frame()
    body = harness.single_row_body(features)
    payload = json.loads(body)
    payload["dataframe_split"]["data"][0][0] = "__N__"
    miss_body = json.dumps(payload).replace('"__N__"', "__N__")
    load_before = harness.load_average()
    prefix = f"flowline-bench-{uuid.uuid4().hex[:8]}:"

    rounds: dict[str, list[dict[str, Any]]] = {}
    seen: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="flowline-bench-") as tmp:
        tmp_path = Path(tmp)
        model_dir = save_breast_cancer_model(tmp_path / "model")
        hit_script = tmp_path / "post.lua"
        hit_script.write_text(harness.LUA)
        miss_script = tmp_path / "miss.lua"
        miss_script.write_text(MISS_LUA)
        replica = start_scoring_server(model_dir, tmp_path)
        gateways: dict[str, Service] = {}
        try:
            base = {"FLOWLINE_ADMIN_TOKEN": ADMIN_TOKEN}
            gateways["memory"] = start_gateway(tmp_path, env=base)
            gateways["redis"] = start_gateway(
                tmp_path,
                env={**base, "FLOWLINE_REDIS_URL": args.redis, "FLOWLINE_REDIS_PREFIX": prefix},
            )
            settings: dict[str, tuple[str, str, Path]] = {}
            for store, gateway in gateways.items():
                deploy(gateway, "plain", replica.url, model_dir)
                deploy(gateway, "limited", replica.url, model_dir, rate_limit=HIGH_LIMIT)
                deploy(gateway, "cached", replica.url, model_dir, cache=CACHE)
                url = f"{gateway.url}/models/{{}}/invocations"
                settings[f"{store}_plain"] = (url.format("plain"), body, hit_script)
                settings[f"{store}_limited"] = (url.format("limited"), body, hit_script)
                settings[f"{store}_cache-hit"] = (url.format("cached"), body, hit_script)
                settings[f"{store}_cache-miss"] = (url.format("cached"), miss_body, miss_script)
            quiet_pids = [g.pid for g in gateways.values()] + [replica.pid]
            seeds = itertools.count(1)
            for url, request_body, script in settings.values():
                os.environ["WRK_SEED"] = str(next(seeds))
                harness.run_wrk(url, request_body, 1, args.warmup, script)
            for i in range(args.rounds):
                for name, (url, request_body, script) in settings.items():
                    harness.wait_quiet(quiet_pids)
                    os.environ["WRK_SEED"] = str(next(seeds))
                    # Gateway CPU per request: the overhead independent of other load.
                    pid = gateways[name.partition("_")[0]].pid
                    result = harness.run_wrk_cpu(url, request_body, 1, args.duration, script, pid)
                    rounds.setdefault(name, []).append(result)
                    print(f"round {i + 1} {name}: {result}", flush=True)
            seen = {store: counters(g) for store, g in gateways.items()}
        finally:
            for gateway in gateways.values():
                gateway.stop()
            replica.stop()
            removed = clean_redis(args.redis, prefix)

    runs = {key: harness.median_run(value) for key, value in rounds.items()}
    p50 = {key: run["p50_ms"] for key, run in runs.items()}
    added = {
        "limiter_memory_added_ms": p50["memory_limited"] - p50["memory_plain"],
        "limiter_redis_added_ms": p50["redis_limited"] - p50["redis_plain"],
        "cache_hit_vs_miss_memory_ms": p50["memory_cache-hit"] - p50["memory_cache-miss"],
        "cache_hit_vs_miss_redis_ms": p50["redis_cache-hit"] - p50["redis_cache-miss"],
        "cache_miss_added_memory_ms": p50["memory_cache-miss"] - p50["memory_plain"],
        "cache_miss_added_redis_ms": p50["redis_cache-miss"] - p50["redis_plain"],
    }
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": harness.machine(),
        "load_before": load_before,
        "model": "LogisticRegression, breast_cancer, 30 float columns",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "rate_limit": HIGH_LIMIT,
        "cache": CACHE,
        "runs": runs,
        "raw_rounds": rounds,
        "added_ms": {k: round(v, 4) for k, v in added.items()},
        "counters": seen,
        # Every request of the measured miss runs must have been a miss.
        "miss_runs_requests": {
            store: sum(r["requests"] for r in rounds[f"{store}_cache-miss"]) for store in seen
        },
        "redis_keys_removed": removed,
        "targets": {k: f"<= {v}" for k, v in TARGETS.items()},
    }
    harness.write_results(results, args.output, summarise)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
