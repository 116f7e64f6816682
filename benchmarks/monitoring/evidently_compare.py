"""flowline's drift test against Evidently 0.7.23's default DataDriftPreset, on the same data.

1. Speed: one 10 000-row x 25-feature window (plus the model output) against a
   50 000-row training set: flowline's `evaluate_window` with the baseline prepared
   once (the monitor's steady state) and cold (deserialising the sketches too),
   against `Report([DataDriftPreset()]).run(...)` on the raw reference rows.
2. Detection and false alarms on the windows of `benchmarks/drift_calibration.py`
   (`iter_windows`), a subset of its cases. Evidently gets the raw reference rows
   each baseline was built from; flowline only the profile.

Evidently runs in its own venv (it needs pandas<3), created when missing:

    .venv/bin/python benchmarks/monitoring/evidently_compare.py [--windows 40]

Writes benchmarks/results/monitoring_evidently.json and .md.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import harness  # noqa: E402
from benchmarks.drift_calibration import (  # noqa: E402
    CASES,
    TRAIN_ROWS,
    case_lines,
    iter_windows,
    synthetic_frame,
    synthetic_model,
)
from monitoring.drift.evaluate import DriftConfig, evaluate_window, prepare_baseline  # noqa: E402
from monitoring.profile.baseline import build_profile  # noqa: E402

VENV = harness.REPO / "benchmarks" / ".evidently-venv"
WORKER = Path(__file__).resolve().parent / "evidently_worker.py"
EVIDENTLY = "evidently==0.7.23"
OUTPUT_COLUMN = "model_output"  # not "prediction": Evidently would give that name a role
RATE_CASES = (
    "false_alarm",
    "mean_shift_0.2sd",
    "category_shift_0.1",
    "null_rise_0_to_10pct",
    "breast_cancer_false_alarm",
    "breast_cancer_covariate_shift",
)
TARGET_RATIO = 20.0


def ensure_venv() -> Path:
    """The Evidently venv's python, created (python3.11 -m venv + pip) when missing."""
    python = VENV / "bin" / "python"
    if not python.exists():
        print(f"creating {VENV} with {EVIDENTLY} (once)", flush=True)
        subprocess.run(["python3.11", "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", EVIDENTLY, "pandas<3", "pyarrow"],
            check=True,
        )
    return python


def with_output(frame: pd.DataFrame, output: np.ndarray | None) -> pd.DataFrame:
    """The frame plus the model's output as one more column (what flowline also tests)."""
    out = frame.copy()
    if output is not None:
        out[OUTPUT_COLUMN] = output
    return out


def run_worker(python: Path, manifest: dict[str, Any], tmp: Path) -> list[dict[str, Any]]:
    """Run evidently_worker.py on a manifest; its results."""
    path, results = tmp / "manifest.json", tmp / "results.json"
    path.write_text(json.dumps(manifest))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(python), str(WORKER), str(path), str(results)], check=True, env=env)
    return json.loads(results.read_text())


def time_flowline(profile: dict[str, Any], live: pd.DataFrame, preds: np.ndarray, repeats: int):
    """Median seconds: prepared baseline (steady state) and cold (prepare + evaluate)."""
    config = DriftConfig()
    prepared = prepare_baseline(profile, config)
    evaluate_window(prepared, live, preds, config)  # warm caches and imports
    warm = harness.repeat_timed(lambda: evaluate_window(prepared, live, preds, config), repeats)
    cold = harness.repeat_timed(
        lambda: evaluate_window(prepare_baseline(profile, config), live, preds, config),
        max(3, repeats // 4),
    )
    return statistics.median(warm), statistics.median(cold), warm


def speed(python: Path, tmp: Path, repeats: int) -> dict[str, Any]:
    """Part 1: the 10k x 25 window."""
    rng = np.random.default_rng(99)
    reference = synthetic_frame(rng, TRAIN_ROWS)
    ref_pred = synthetic_model(reference)
    live = synthetic_frame(rng, 10_000)
    live_pred = synthetic_model(live)
    started = time.perf_counter()
    profile = build_profile(reference, ref_pred)
    profile_s = time.perf_counter() - started
    warm, cold, samples = time_flowline(profile, live, live_pred, repeats)
    report = evaluate_window(profile, live, live_pred)
    ref_path, live_path = tmp / "speed_ref.parquet", tmp / "speed_live.parquet"
    with_output(reference, ref_pred).to_parquet(ref_path)
    with_output(live, live_pred).to_parquet(live_path)
    [ev] = run_worker(
        python,
        {
            "warmup": [str(ref_path), str(live_path)],
            "windows": [
                {"key": "speed", "reference": str(ref_path), "live": str(live_path),
                 "repeats": 3}
            ],
        },
        tmp,
    )  # fmt: skip
    ev_median = statistics.median(ev["seconds"])
    return {
        "reference_rows": len(reference),
        "window_rows": len(live),
        "features": live.shape[1],
        "plus_model_output": True,
        "flowline_prepared_s": warm,
        "flowline_prepared_p90_s": float(np.percentile(samples, 90)),
        "flowline_cold_s": cold,
        "flowline_profile_build_s": profile_s,
        "flowline_drifted": report.drifted,
        "evidently_s": ev_median,
        "evidently_runs_s": ev["seconds"],
        "evidently_methods": ev["methods"],
        "evidently_dataset_drift": ev["dataset_drift"],
        "ratio_prepared": ev_median / warm,
        "ratio_cold": ev_median / cold,
        "target_ratio": TARGET_RATIO,
    }


def rates(python: Path, tmp: Path, windows: int) -> list[dict[str, Any]]:
    """Part 2: both tools on the same calibration windows."""
    cases = [c for c in CASES if c.name in RATE_CASES]
    manifest: dict[str, Any] = {"warmup": None, "windows": []}
    flowline: dict[str, dict[str, Any]] = {}
    references: dict[int, str] = {}
    config = DriftConfig()
    for case in cases:
        for i, w in enumerate(iter_windows(case, windows)):
            key = f"{case.name}/{i}"
            started = time.perf_counter()
            report = evaluate_window(w.profile, w.live, w.live_predictions, config)
            flowline[key] = {
                "drifted": report.drifted,
                "seconds": time.perf_counter() - started,
                "reasons": report.reasons,
                "rows": len(w.live),
            }
            ref_id = id(w.reference)
            if ref_id not in references:
                path = tmp / f"ref_{len(references)}.parquet"
                with_output(w.reference, w.reference_predictions).to_parquet(path)
                references[ref_id] = str(path)
            live_path = tmp / f"live_{case.name}_{i}.parquet"
            with_output(w.live, w.live_predictions).to_parquet(live_path)
            manifest["windows"].append(
                {"key": key, "reference": references[ref_id], "live": str(live_path)}
            )
        print(f"flowline done: {case.name}", flush=True)
    if manifest["windows"]:
        first = manifest["windows"][0]
        manifest["warmup"] = [first["reference"], first["live"]]
    evidently = {r["key"]: r for r in run_worker(python, manifest, tmp)}
    out = []
    for case in cases:
        keys = [k for k in flowline if k.startswith(f"{case.name}/")]
        n = len(keys)
        fl = sum(flowline[k]["drifted"] for k in keys)
        ev_dataset = sum(evidently[k]["dataset_drift"] for k in keys)
        ev_any = sum(evidently[k]["any_column_drift"] for k in keys)
        out.append({
            "case": case.name,
            "description": case.description,
            "drift_expected": case.drift_expected,
            "windows": n,
            "live_rows": int(np.median([flowline[k]["rows"] for k in keys])),
            "flowline_rate": fl / n,
            "evidently_dataset_rate": ev_dataset / n,
            "evidently_any_column_rate": ev_any / n,
            "flowline_median_ms": 1000 * statistics.median(flowline[k]["seconds"] for k in keys),
            "evidently_median_ms": 1000 * statistics.median(
                statistics.median(evidently[k]["seconds"]) for k in keys
            ),
            "evidently_methods": sorted({m for k in keys for m in evidently[k]["methods"]}),
        })  # fmt: skip
    return out


def markdown(doc: dict[str, Any]) -> str:
    """The results as a readable page."""
    s = doc["speed"]
    lines = [
        "# Drift evaluation: flowline vs Evidently 0.7.23 (default DataDriftPreset)",
        "",
        f"Generated {doc['generated_at']} by `benchmarks/monitoring/evidently_compare.py` on "
        f"{doc['machine']['cpus']} CPUs (shared; load average {doc['machine']['load_before']}).",
        "",
        "## Speed: one window",
        "",
        f"{s['window_rows']} live rows x {s['features']} features plus the model output, "
        f"against {s['reference_rows']} training rows.",
        "",
        "| tool | median time | vs Evidently |",
        "|---|---:|---:|",
        f"| Evidently `Report([DataDriftPreset()]).run` (raw reference rows) | "
        f"{s['evidently_s'] * 1000:.0f} ms | 1x |",
        f"| flowline `evaluate_window`, baseline prepared once (monitor steady state) | "
        f"{s['flowline_prepared_s'] * 1000:.1f} ms | 1/{s['ratio_prepared']:.0f} |",
        f"| flowline cold: deserialise the baseline sketches + evaluate | "
        f"{s['flowline_cold_s'] * 1000:.1f} ms | 1/{s['ratio_cold']:.0f} |",
        "",
        f"Target: at most 1/{s['target_ratio']:.0f} of Evidently's time: "
        f"**{'met' if s['ratio_prepared'] >= s['target_ratio'] else 'not met'}** "
        f"(steady state), {'met' if s['ratio_cold'] >= s['target_ratio'] else 'not met'} (cold). "
        f"Evidently used: {', '.join(s['evidently_methods'])}. flowline builds the baseline "
        f"profile once at training time ({s['flowline_profile_build_s']:.2f} s here), "
        "not per window.",
        "",
        "## Detection and false alarms on the same windows",
        "",
        "Windows from `benchmarks/drift_calibration.py` (`iter_windows`); both tools see the "
        "same live rows and model outputs, Evidently the raw reference rows, flowline only "
        "the baseline profile. Evidently's dataset verdict is its default (at least 50% of "
        "columns drifted); 'any column' counts a window as an alarm when Evidently flags "
        "any single column, which is what catching a one-feature change needs.",
        "",
        "| case | drift? | live rows | windows | flowline | Evidently dataset |"
        " Evidently any column | flowline ms | Evidently ms |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["rates"]:
        lines.append(
            f"| {r['case']} | {'yes' if r['drift_expected'] else 'no'} | {r['live_rows']} | "
            f"{r['windows']} | "
            f"{r['flowline_rate']:.1%} | {r['evidently_dataset_rate']:.1%} | "
            f"{r['evidently_any_column_rate']:.1%} | {r['flowline_median_ms']:.1f} | "
            f"{r['evidently_median_ms']:.0f} |"
        )
    lines += [
        "",
        "Rows marked 'drift? no' are false-alarm rates (lower is better); 'yes' rows are "
        "detection rates (higher is better). Evidently's 'any column' detection rates are "
        "inflated by its false alarms: with that rule it also alarms on most unchanged "
        "windows, and it drops nulls before testing, so a window it flags in the null-rise "
        "case is flagged for other columns, not for the nulls.",
        "",
        *case_lines(doc["rates"]),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run both parts and write the results."""
    parser = harness.command_line(__doc__)
    parser.add_argument("--windows", type=int, default=40, help="windows per case")
    parser.add_argument("--repeats", type=int, default=20, help="flowline timing repeats")
    parser.add_argument("--output", default=str(harness.RESULTS / "monitoring_evidently.json"))
    harness.add_markdown_only(parser)
    args = parser.parse_args(argv)
    if args.markdown_only:
        harness.rewrite_markdown(args.output, markdown)
        return 0
    python = ensure_venv()
    load = harness.load_average()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flowline-evidently-") as tmp:
        timing = speed(python, Path(tmp), args.repeats)
        print(json.dumps(timing, indent=1), flush=True)
        rate_rows = rates(python, Path(tmp), args.windows)
    doc = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "elapsed_s": time.perf_counter() - started,
        "machine": harness.machine_info(load_before=load),
        "evidently": EVIDENTLY,
        "speed": timing,
        "rates": rate_rows,
    }
    harness.write_results(doc, args.output, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
