"""Baseline profile build time and size at 10k, 100k and 1M rows x 25 features.

Anchor: whylogs' published profile size of 518 KiB at 1M rows. Run:
``.venv/bin/python benchmarks/baseline_profile.py``; writes benchmarks/results/.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402
from monitoring.profile import baseline as profile  # noqa: E402

WHYLOGS_KIB_AT_1M = 518.0
FEATURES = 25
NUMERIC = 20  # and 5 categorical columns, as in a typical tabular model


def make_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """Mixed numeric and categorical columns with some nulls."""
    rng = np.random.default_rng(seed)
    data = {f"num_{i}": rng.normal(i, 1 + i / 10, rows) for i in range(NUMERIC)}
    for i in range(FEATURES - NUMERIC):
        data[f"cat_{i}"] = rng.choice([f"v{j}" for j in range(5 + 20 * i)], rows)
    frame = pd.DataFrame(data)
    frame.loc[rng.uniform(size=rows) < 0.02, "num_0"] = np.nan
    return frame


def main(argv: list[str] | None = None) -> None:
    """Measure and write the results file."""
    harness.command_line(__doc__).parse_args(argv)
    rows_out = []
    for rows in (10_000, 100_000, 1_000_000):
        frame = make_frame(rows)
        predictions = np.where(frame["num_1"] > 1, "yes", "no")
        started = time.perf_counter()
        text = profile.dumps(profile.build_profile(frame, predictions))
        seconds = time.perf_counter() - started
        kib = len(text.encode()) / 1024
        rows_out.append(
            {
                "rows": rows,
                "features": FEATURES,
                "build_seconds": round(seconds, 3),
                "size_kib": round(kib, 1),
            }
        )
        print(f"{rows:>9} rows: {seconds:6.2f} s, {kib:7.1f} KiB")
    at_1m = rows_out[-1]["size_kib"]
    result = {
        "benchmark": "baseline_profile",
        "machine": harness.machine(cores=False, python_label=False),
        "anchor": {"whylogs_kib_at_1m_rows": WHYLOGS_KIB_AT_1M},
        "results": rows_out,
        "size_ratio_vs_whylogs_at_1m": round(at_1m / WHYLOGS_KIB_AT_1M, 3),
        "target": "<= 200 KiB at 1M rows x 25 features, sublinear growth",
        "met": at_1m <= 200 and rows_out[2]["size_kib"] < 2 * rows_out[0]["size_kib"],
    }
    harness.write_results(result, harness.RESULTS / "baseline_profile.json")


if __name__ == "__main__":
    main()
