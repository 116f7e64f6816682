"""Runs Evidently 0.7.23's default DataDriftPreset on windows listed in a manifest.

Runs inside benchmarks/.evidently-venv (Evidently needs pandas<3), never imports
flowline. Called by evidently_compare.py:

    benchmarks/.evidently-venv/bin/python evidently_worker.py manifest.json results.json

manifest: {"warmup": [ref, live] | null,
           "windows": [{"key": ..., "reference": path, "live": path, "repeats": n}, ...]}
results:  [{"key", "seconds": [...], "drifted_share", "drifted_columns", "columns",
            "dataset_drift", "any_column_drift"}, ...]
"""

from __future__ import annotations

import json
import sys
import time

import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset

_frames: dict[str, pd.DataFrame] = {}


def load(path: str) -> pd.DataFrame:
    """Parquet file, cached (synthetic windows share their reference)."""
    if path not in _frames:
        _frames[path] = pd.read_parquet(path)
    return _frames[path]


def evaluate(reference: pd.DataFrame, live: pd.DataFrame) -> tuple[float, dict]:
    """One default DataDriftPreset report: seconds and the verdicts."""
    started = time.perf_counter()
    snapshot = Report([DataDriftPreset()]).run(current_data=live, reference_data=reference)
    doc = snapshot.dict()
    seconds = time.perf_counter() - started
    count = next(m for m in doc["metrics"] if m["metric_name"].startswith("DriftedColumnsCount"))
    drift_share = float(count["config"].get("drift_share", 0.5))
    columns = [m for m in doc["metrics"] if m["metric_name"].startswith("ValueDrift")]
    drifted = []
    for m in columns:
        method = m["config"].get("method", "")
        threshold = float(m["config"]["threshold"])
        value = m["value"]
        # p-value tests drift below the threshold, distances above it (Evidently's rule).
        is_p_value = "p_value" in method.lower() or "test" in method.lower()
        if (value < threshold) if is_p_value else (value >= threshold):
            drifted.append(m["config"]["column"])
    share = float(count["value"]["share"])
    return seconds, {
        "drifted_share": share,
        "drifted_columns": sorted(drifted),
        "columns": len(columns),
        "methods": sorted({m["config"].get("method", "") for m in columns}),
        "dataset_drift": share >= drift_share,
        "any_column_drift": float(count["value"]["count"]) > 0,
    }


def main() -> int:
    """Read the manifest, evaluate every window, write the results."""
    manifest_path, results_path = sys.argv[1], sys.argv[2]
    manifest = json.loads(open(manifest_path).read())
    if manifest.get("warmup"):
        ref, live = manifest["warmup"]
        evaluate(load(ref).head(500), load(live).head(200))
    results = []
    for item in manifest["windows"]:
        reference, live = load(item["reference"]), load(item["live"])
        seconds = []
        verdict: dict = {}
        for _ in range(int(item.get("repeats", 1))):
            took, verdict = evaluate(reference, live)
            seconds.append(took)
        results.append({"key": item["key"], "seconds": seconds, **verdict})
        _frames.pop(item["live"], None)
    with open(results_path, "w") as out:
        json.dump(results, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
