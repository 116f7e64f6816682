"""Tuning on Apache Spark (SparkTrials on a real local[2] Spark) against a real tracking
server: the same parent, children, registered version and baseline as sequential tuning."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipelines.data import DEMO_DATA
from tests.conftest import mlflow_run
from tests.test_training_e2e import (
    _assert_baseline,
    _assert_model_files,
    _assert_registered,
    _assert_search_runs,
    _parent_run,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("family", "params", "metric"),
    [
        ("sklearn", {"max_evals": 4}, "roc_auc"),
        ("keras", {"max_evals": 2, "epochs": 2}, "roc_auc"),
    ],
)
def test_tuning_on_spark_logs_and_registers_like_sequential_tuning(
    sqlite_tracking, family: str, params: dict, metric: str
) -> None:
    name = f"churn-spark-{family}"
    result = mlflow_run(
        sqlite_tracking.url,
        family=family,
        registered_model=name,
        spark="local[2]",
        parallelism=2,
        seed=5,
        **params,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on Spark local[2] (2 at a time)" in result.stdout
    max_evals = params["max_evals"]
    for n in range(1, max_evals + 1):
        assert f"[flowline] trial {n}/{max_evals}" in result.stdout
    client = MlflowClient(sqlite_tracking.url)
    mlflow.set_tracking_uri(sqlite_tracking.url)
    mv = _assert_registered(client, name, family, metric, DEMO_DATA)
    parent = _parent_run(client, name, mv.version)
    _assert_search_runs(client, parent, metric, max_evals)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    # Named in trial order by the driver, although executors ran them out of order.
    assert sorted(c.data.tags["flowline.trial"] for c in children) == [
        str(n) for n in range(1, max_evals + 1)
    ]
    assert {c.info.run_name for c in children} == {
        f"trial-{n:03d}" for n in range(1, max_evals + 1)
    }
    raw = pd.read_csv(DEMO_DATA).drop(columns=["churned"])
    baseline = _assert_model_files(f"models:/{name}/{mv.version}", raw)
    _assert_baseline(baseline, raw, int(mv.tags["flowline.training_rows"]))


@pytest.mark.parametrize(
    ("master", "expected"),
    [
        ("spark://127.0.0.1:1", "cannot reach the Spark master at spark://127.0.0.1:1"),
        ("mesos://x:5050", "unknown Spark master 'mesos://x:5050'"),
    ],
)
def test_a_bad_spark_master_is_one_line_before_any_run(
    sqlite_tracking, master: str, expected: str
) -> None:
    result = mlflow_run(sqlite_tracking.url, spark=master, max_evals=1, registered_model="never")
    assert result.returncode != 0
    assert f"flowline: error: {expected}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not MlflowClient(sqlite_tracking.url).search_model_versions("name='never'")


def test_java_missing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines.errors import UserError
    from pipelines.spark import check_java

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(UserError, match="Java is missing: Spark needs a Java 17"):
        check_java()


# --- batch scoring -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def production_model(sqlite_tracking) -> str:
    """The demo model, trained with `mlflow run` and given the alias production."""
    result = mlflow_run(sqlite_tracking.url, max_evals=1, registered_model="churn-batch")
    assert result.returncode == 0, result.stderr[-3000:]
    MlflowClient(sqlite_tracking.url).set_registered_model_alias("churn-batch", "production", "1")
    return "models:/churn-batch@production"


def _parts(tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    """The demo rows (int columns, nulls, text) as a folder of three Parquet files."""
    rows = pd.read_csv(DEMO_DATA).drop(columns=["churned"]).head(900)
    rows.insert(0, "customer", [f"c{i:04d}" for i in range(len(rows))])
    folder = tmp_path / "input"
    folder.mkdir()
    for i in range(3):
        rows.iloc[i * 300 : (i + 1) * 300].to_parquet(folder / f"part-{i}.parquet", index=False)
    (folder / "_SUCCESS").write_text("")
    return folder, rows


def _score(sqlite_tracking, env: dict[str, str] | None = None, **params: object):
    return mlflow_run(sqlite_tracking.url, entry="score", env=env, **params)


@pytest.mark.parametrize("engine", ["pandas", "spark"])
def test_batch_scoring_equals_pyfunc_predict(
    sqlite_tracking, production_model: str, tmp_path: Path, engine: str
) -> None:
    folder, rows = _parts(tmp_path)
    output = tmp_path / "scored"
    spark = {"spark": "local[2]"} if engine == "spark" else {}
    result = _score(
        sqlite_tracking,
        model=production_model,
        input=folder,
        output=output,
        predict_method="predict_proba",
        **spark,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scored 900 rows with churn-batch version 1" in result.stdout
    mlflow.set_tracking_uri(sqlite_tracking.url)
    model = mlflow.pyfunc.load_model(production_model)
    expected = model.predict(
        rows.drop(columns=["customer"]), params={"predict_method": "predict_proba"}
    )
    scored = pd.read_parquet(output)
    assert list(scored.columns)[:1] == ["customer"] and "proba_yes" in scored
    scored = scored.set_index("customer").loc[rows["customer"]]  # Spark may reorder rows
    assert np.allclose(scored["proba_yes"].to_numpy(), expected["yes"].to_numpy(), atol=1e-12)
    assert scored["tenure_months"].tolist() == rows["tenure_months"].tolist()
    if engine == "pandas":
        meta = pq.read_schema(output).metadata
        assert meta[b"flowline.model"] == b"churn-batch" and meta[b"flowline.version"] == b"1"
    else:
        meta = json.loads((output / "_flowline_model.json").read_text())
        assert meta == {"model": "churn-batch", "version": "1", "model_uri": production_model}
    runs = MlflowClient(sqlite_tracking.url).search_runs(
        ["0"], "params.output = '" + str(output) + "'"
    )
    assert runs and runs[0].data.metrics["rows_scored"] == 900
    assert runs[0].data.params["resolved_version"] == "1"


def test_batch_scoring_in_chunks_keeps_a_key_column(
    sqlite_tracking, production_model: str, tmp_path: Path
) -> None:
    data = tmp_path / "rows.csv"
    rows = pd.read_csv(DEMO_DATA).drop(columns=["churned"])
    rows.insert(0, "customer", range(len(rows)))
    rows.to_csv(data, index=False)  # 3000 rows, nulls in later chunks than the first
    output = tmp_path / "labels.parquet"
    result = _score(
        sqlite_tracking,
        model=production_model,
        input=data,
        output=output,
        key="customer",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scored = pd.read_parquet(output)
    assert list(scored.columns) == ["customer", "prediction"]
    mlflow.set_tracking_uri(sqlite_tracking.url)
    model = mlflow.pyfunc.load_model(production_model)
    assert scored["prediction"].tolist() == list(model.predict(pd.read_csv(data)))


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("exists", "already exists; pass -P overwrite=true to replace it"),
        ("columns", "the input lacks the model's column(s) contract"),
        ("master", "cannot reach the Spark master at spark://127.0.0.1:1"),
    ],
)
def test_batch_scoring_bad_input_is_one_line_and_leaves_no_output(
    sqlite_tracking, production_model: str, tmp_path: Path, case: str, expected: str
) -> None:
    folder, rows = _parts(tmp_path)
    output = tmp_path / "out.parquet"
    params: dict[str, object] = {"model": production_model, "input": folder, "output": output}
    if case == "exists":
        output.write_bytes(b"keep me")
    elif case == "columns":
        bad = tmp_path / "bad.parquet"
        rows.drop(columns=["contract"]).to_parquet(bad, index=False)
        params["input"] = bad
    else:
        params["spark"] = "spark://127.0.0.1:1"
    result = _score(sqlite_tracking, **params)
    assert result.returncode != 0
    line = next(x for x in result.stderr.splitlines() if x.startswith("flowline: error: "))
    assert expected in line
    assert "Traceback" not in result.stderr
    if case == "exists":
        assert output.read_bytes() == b"keep me"
    else:
        assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]


def test_batch_scoring_sends_a_recorded_sample_to_the_monitor(
    sqlite_tracking, production_model: str, tmp_path: Path
) -> None:
    from tests.conftest import wait_for
    from tests.helpers_monitor import INGEST_TOKEN, start_monitor

    monitor = start_monitor(
        tmp_path,
        {
            "FLOWLINE_HOME": str(tmp_path / "monitor-home"),
            "MLFLOW_TRACKING_URI": sqlite_tracking.url,
        },
    )
    try:
        folder, _ = _parts(tmp_path)
        env = {
            "FLOWLINE_MONITOR_URL": monitor.url,
            "FLOWLINE_INGEST_TOKEN": INGEST_TOKEN,
            "FLOWLINE_HOME": str(tmp_path / "scorer-home"),
        }
        result = _score(
            sqlite_tracking,
            env=env,
            model=production_model,
            input=folder,
            output=tmp_path / "out.parquet",
            capture="true",
            capture_sample=0.5,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        line = next(x for x in result.stdout.splitlines() if "sent to the drift monitor" in x)
        sent = int(line.split("; ")[1].split()[0])
        assert 350 < sent < 550  # a 0.5 sample of 900 rows
        run = MlflowClient(sqlite_tracking.url).search_runs(
            ["0"], "params.capture = 'true'", max_results=1
        )[0]
        assert run.data.params["capture_sample_rate"] == "0.5"
        assert run.data.metrics["rows_captured"] == sent

        def stored() -> float:
            text = httpx.get(f"{monitor.url}/metrics", timeout=10).text
            return sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("flowline_monitor_rows_captured_total{")
                and 'model="churn-batch"' in line
            )

        wait_for(lambda: stored() == sent, "the captured rows in the monitor", timeout=60)
    finally:
        monitor.stop()
