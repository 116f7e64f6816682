"""The compiled (ONNX) scoring path in process, and how often it applies.

1. Per-call cost on the demo version as `make demo` trains it (20 trials, seed 42),
   medians of interleaved repeats, 1 and 64 rows, for: `pyfunc.predict` (what a caller
   of the loaded model pays, MLflow's schema enforcement included), the model's own
   `predict` on the compiled path, and the same on the Python pipeline (the anchor).
2. The fallback survey: for each bundled or scikit-learn data set and each estimator
   kind of both families (3 hyperparameter draws each), whether the refit pipeline
   compiles and passes the equivalence check, or why not.

Writes benchmarks/results/compiled_path.json and .md.

    .venv/bin/python benchmarks/compiled_path.py [--repeats 300]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import harness  # noqa: E402

KINDS = {
    "classification": ("logistic_regression", "random_forest", "gradient_boosting", "mlp"),
    "regression": ("ridge", "random_forest", "gradient_boosting", "mlp"),
}
KERAS_EPOCHS = 5  # the survey checks conversion, not accuracy: short trainings do
DRAWS = 3


def demo_model(tmp: Path) -> Any:
    """The demo version, trained into a private store and loaded as a pyfunc."""
    import mlflow

    from pipelines.train import TrainConfig, train

    mlflow.set_tracking_uri(f"sqlite:///{tmp / 'mlflow.db'}")
    version = train(TrainConfig(max_evals=20, seed=42), report=lambda line: None)
    return version, mlflow.pyfunc.load_model(f"models:/{version.name}/{version.version}")


def per_call_costs(model: Any, features: Any, repeats: int) -> dict[str, dict[str, float]]:
    """Median µs per call of each way to score, at 1 and 64 rows, interleaved."""
    inner = model.unwrap_python_model()
    ways = {
        "pyfunc.predict (compiled)": lambda rows: model.predict(rows),
        "model predict, compiled": lambda rows: inner.scorer.predict(rows),
        "model predict, Python pipeline": lambda rows: inner.pipeline.predict(rows),
    }
    out: dict[str, dict[str, float]] = {}
    for size in (1, 64):
        rows = features.head(size)
        samples: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, call in ways.items():
                samples[name] += harness.repeat_timed(lambda c=call, r=rows: c(r), 1)
        for name, values in samples.items():
            out.setdefault(name, {})[f"{size}_rows_us"] = round(statistics.median(values) * 1e6, 1)
    return out


def tables() -> dict[str, tuple[Any, Any, str]]:
    """The data sets of the survey: (features, target, task)."""
    from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine

    from pipelines.data import load_training_data
    from tests.test_columns import real_table

    demo = load_training_data("demo", "", "auto")
    out = {"churn (demo)": (demo.features, demo.target, demo.task)}
    for name, loader, task in (
        ("breast_cancer", load_breast_cancer, "classification"),
        ("digits", load_digits, "classification"),
        ("wine", load_wine, "classification"),
        ("diabetes", load_diabetes, "regression"),
    ):
        bunch = loader(as_frame=True)
        out[name] = (bunch.data, bunch.target, task)
    frame = real_table(1500)
    out["real-looking table"] = (frame.drop(columns=["label"]), frame["label"], "classification")
    return out


def _draws(task: str, kind: str) -> list[dict[str, Any]]:
    import numpy as np
    from hyperopt.pyll.stochastic import sample

    from pipelines import keras_family, sklearn_family

    family = keras_family if kind == "mlp" else sklearn_family
    space, draws, seed = family.search_space(task), [], 0
    while len(draws) < DRAWS:
        params = sample(space, rng=np.random.default_rng(seed))
        seed += 1
        if params["estimator"] == kind:
            draws.append(params)
    return draws


def survey() -> list[dict[str, Any]]:
    """One row per data set and estimator kind: how many draws compiled, and the reasons."""
    from sklearn.model_selection import train_test_split

    from pipelines import keras_family, onnx_export, sklearn_family
    from pipelines.columns import plan_columns
    from pipelines.preprocess import with_preprocessing

    rows = []
    for name, (features, target, task) in tables().items():
        plan = plan_columns(features)
        x_train, x_test, y_train, _ = train_test_split(
            features, target, test_size=0.2, random_state=0
        )
        check = [x_test, onnx_export.stress_rows(x_test, plan)]
        for kind in KINDS[task]:
            reasons = []
            for params in _draws(task, kind):
                if kind == "mlp":
                    estimator = keras_family.build_estimator(params, task, 0, KERAS_EPOCHS)
                else:
                    estimator = sklearn_family.build_estimator(params, task, 0)
                pipeline = with_preprocessing(plan, estimator).fit(x_train, y_train)
                result = onnx_export.compile_pipeline(pipeline, plan, task, check)
                reasons.append("" if result.compiled else result.reason)
            compiled = sum(not r for r in reasons)
            rows.append(
                {
                    "table": name,
                    "estimator": kind,
                    "compiled": compiled,
                    "draws": DRAWS,
                    "fallback_reasons": sorted({r[:120] for r in reasons if r}),
                }
            )
            print(rows[-1], flush=True)
    return rows


def summarise(results: dict[str, Any]) -> str:
    """Markdown: the per-call table, the targets, the survey."""
    costs = results["per_call_us"]
    lines = [
        "# The compiled scoring path",
        "",
        f"{results['when']} on {results['machine']}; {results['model']}; medians of "
        f"{results['repeats']} interleaved calls.",
        "",
        "| way to score | 1 row µs | 64 rows µs |",
        "|---|---:|---:|",
    ]
    for name, value in costs.items():
        lines.append(f"| {name} | {value['1_rows_us']} | {value['64_rows_us']} |")
    compiled = costs["model predict, compiled"]
    python = costs["model predict, Python pipeline"]
    pyfunc = costs["pyfunc.predict (compiled)"]
    lines += [
        "",
        "| target | measured | met |",
        "|---|---:|:---:|",
        f"| compiled path per call, 1 row ≤ 0.5 ms | {compiled['1_rows_us'] / 1000:.3f} ms "
        f"({python['1_rows_us'] / compiled['1_rows_us']:.0f}× faster than the pipeline) | "
        f"{'yes' if compiled['1_rows_us'] <= 500 else 'no'} |",
        f"| compiled path per call, 64 rows ≤ 1 ms | {compiled['64_rows_us'] / 1000:.3f} ms | "
        f"{'yes' if compiled['64_rows_us'] <= 1000 else 'no'} |",
        f"| `pyfunc.predict`, 1 / 64 rows ≤ 0.5 / 1 ms | {pyfunc['1_rows_us'] / 1000:.3f} / "
        f"{pyfunc['64_rows_us'] / 1000:.3f} ms | "
        f"{'yes' if pyfunc['1_rows_us'] <= 500 and pyfunc['64_rows_us'] <= 1000 else 'no'} |",
        "",
        "`pyfunc.predict` adds MLflow's own schema enforcement to the model's `predict`: "
        "for the `Any` columns of a flowline signature it rebuilds every column value by "
        "value (`mlflow.models.utils._enforce_named_col_schema`). The signature stays as it "
        "is (the issue forbids changing it), so that part is MLflow's floor, paid by "
        "every server that loads the pyfunc, stock and BentoML included.",
        "",
        "## Which versions compile",
        "",
        f"{DRAWS} hyperparameter draws per estimator kind; equivalence checked on the test "
        "split plus the stress rows (nulls, unseen categories).",
        "",
        "| table | estimator | compiled | fallback reasons |",
        "|---|---|---:|---|",
    ]
    total = compiled_count = 0
    for row in results["survey"]:
        total += row["draws"]
        compiled_count += row["compiled"]
        reasons = "; ".join(row["fallback_reasons"]) or ""
        lines.append(
            f"| {row['table']} | {row['estimator']} | {row['compiled']}/{row['draws']} | "
            f"{reasons} |"
        )
    lines += [
        "",
        f"Overall {compiled_count}/{total} compiled: fallback rate "
        f"{1 - compiled_count / total:.0%}. `mlp` is the keras family's network "
        f"({KERAS_EPOCHS} epochs per draw).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run both parts and write the results."""
    parser = harness.command_line(__doc__)
    parser.add_argument("--repeats", type=int, default=300)
    harness.add_markdown_only(parser)
    parser.add_argument("--output", default=str(harness.RESULTS / "compiled_path.json"))
    args = parser.parse_args(argv)
    if args.markdown_only:
        harness.rewrite_markdown(args.output, summarise)
        return 0
    warnings.filterwarnings("ignore")
    from pipelines.data import load_training_data

    with tempfile.TemporaryDirectory(prefix="flowline-compiled-") as tmp:
        version, model = demo_model(Path(tmp))
        features = load_training_data("demo", "", "auto").features
        costs = per_call_costs(model, features, args.repeats)
    results = {
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": harness.machine(),
        "model": f"demo version, runtime {version.tags.get('flowline.runtime')}",
        "repeats": args.repeats,
        "per_call_us": costs,
        "survey": survey(),
    }
    harness.write_results(results, args.output, summarise)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
