"""A registered version scores the raw rows of its own training file through every MLflow
path: in-process pyfunc, `mlflow models predict` (CSV and JSON), stock `mlflow models
serve` and the gateway (dataframe_split, dataframe_records, CSV, Parquet).

The tables look real: integer columns with and without nulls, a date column, ID-like
columns, booleans as bools and as yes/no text, a constant and an empty column, null
targets and a rare class; and scikit-learn's digits as its original int64 frame.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.datasets import load_digits

from flowline.tracking import TrackingServer
from serving.model_metadata import deployment_from_model_dir
from tests.conftest import BIN, Service, mlflow_run, subprocess_env
from tests.helpers_serving import running, start_gateway, start_scoring_server
from tests.test_columns import real_table

pytestmark = pytest.mark.slow

ADMIN = "real-tables-admin-token"
PARQUET = "application/vnd.apache.parquet"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A real gateway process; each test deploys its model on it."""
    server = start_gateway(tmp_path_factory.mktemp("gw"), env={"FLOWLINE_ADMIN_TOKEN": ADMIN})
    try:
        yield server
    finally:
        server.stop()


def _train(tracking: TrackingServer, data: Path, target: str, name: str, **params: object):
    result = mlflow_run(
        tracking.url, data=data, target=target, registered_model=name, max_evals=2, **params
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mlflow.set_tracking_uri(tracking.url)
    version = MlflowClient(tracking.url).get_model_version(name, "1")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
    return result, version, local


def _predictions(answer: httpx.Response) -> list:
    assert answer.status_code == 200, answer.text[:500]
    return answer.json()["predictions"]


def _post(url: str, body: bytes, content_type: str) -> httpx.Response:
    return httpx.post(url, content=body, headers={"Content-Type": content_type}, timeout=60)


def _bodies(rows: pd.DataFrame) -> dict[str, tuple[bytes, str]]:
    parquet = io.BytesIO()
    rows.to_parquet(parquet, index=False)
    split = json.loads(rows.to_json(orient="split", index=False, date_format="iso"))
    records = json.loads(rows.to_json(orient="records", date_format="iso"))
    return {
        "dataframe_split": (json.dumps({"dataframe_split": split}).encode(), "application/json"),
        "dataframe_records": (
            json.dumps({"dataframe_records": records}).encode(),
            "application/json",
        ),
        "csv": (rows.to_csv(index=False).encode(), "text/csv"),
        "parquet": (parquet.getvalue(), PARQUET),
    }


def _models_predict(local: Path, rows: pd.DataFrame, tmp: Path, kind: str) -> list:
    source = tmp / f"rows.{kind}"
    if kind == "csv":
        rows.to_csv(source, index=False)
    else:
        split = json.loads(rows.to_json(orient="split", index=False, date_format="iso"))
        source.write_text(json.dumps({"dataframe_split": split}))
    out = tmp / f"out-{kind}.json"
    done = subprocess.run(
        [str(BIN / "mlflow"), "models", "predict", "-m", str(local), "-i", str(source)]
        + ["-t", kind, "-o", str(out), "--env-manager", "local"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())["predictions"]


def _deploy(gateway: Service, name: str, replica: Service, local: Path) -> None:
    body = deployment_from_model_dir(name, "1", [replica.url], local).to_dict()
    answer = httpx.put(
        f"{gateway.url}/admin/deployments/{name}",
        json=body,
        headers={"Authorization": f"Bearer {ADMIN}"},
        timeout=30,
    )
    assert answer.status_code in (200, 201), answer.text


def _as_list(values: object) -> list:
    return [v.item() if hasattr(v, "item") else v for v in np.asarray(values).tolist()]


def score_everywhere(
    local: Path, name: str, file_rows: pd.DataFrame, gateway: Service, tmp: Path
) -> None:
    """Every path gives the in-process predictions for the raw rows, as pandas read them."""
    model = mlflow.pyfunc.load_model(str(local))
    expected = _as_list(model.predict(file_rows))
    assert len(expected) == len(file_rows)
    # A subset has other dtypes than the whole file (an int column without its nulls is
    # int64, an all-blank text column is float64): still accepted.
    subset = file_rows.dropna().head(7) if len(file_rows.dropna()) else file_rows.head(7)
    assert _as_list(model.predict(subset)) == _as_list(model.predict(subset.copy()))
    rows = file_rows.head(40)
    want = expected[:40]
    assert _models_predict(local, rows, tmp, "csv") == want
    assert _models_predict(local, rows, tmp, "json") == want

    with running(start_scoring_server(local, tmp)) as stock:
        _deploy(gateway, name, stock, local)
        for kind, (body, content_type) in _bodies(rows).items():
            through_gateway = _post(f"{gateway.url}/models/{name}/invocations", body, content_type)
            assert _predictions(through_gateway) == want, kind
            if kind != "csv":  # stock 3.17.2 cannot read CSV for `any` columns (csv_bodies.py)
                assert _predictions(_post(f"{stock.url}/invocations", body, content_type)) == want
        # Nulls in every feature column are accepted, by stock and the gateway alike.
        nulls = {c: None for c in model.metadata.get_input_schema().input_names()}
        body = json.dumps({"dataframe_records": [nulls]}).encode()
        for url in (f"{stock.url}/invocations", f"{gateway.url}/models/{name}/invocations"):
            assert len(_predictions(_post(url, body, "application/json"))) == 1
        # A value of the wrong type is a 400 that names the column, from both.
        column = next(
            c for c, t in model.metadata.metadata["flowline.input_types"].items() if t == "integer"
        )
        wrong = json.loads(rows.head(1).to_json(orient="records", date_format="iso"))
        wrong[0][column] = "not-a-number"
        body = json.dumps({"dataframe_records": wrong}).encode()
        for url in (f"{stock.url}/invocations", f"{gateway.url}/models/{name}/invocations"):
            answer = _post(url, body, "application/json")
            assert answer.status_code == 400, answer.text
            assert answer.json()["error_code"] == "INVALID_PARAMETER_VALUE"
            assert f"column {column}: expected a number" in answer.json()["message"]
        spec = httpx.get(f"{gateway.url}/openapi.json", timeout=30).json()
        op = spec["paths"][f"/models/{name}/invocations"]["post"]
        records = op["requestBody"]["content"]["application/json"]["schema"]["oneOf"][1]
        props = records["properties"]["dataframe_records"]["items"]["properties"]
        assert props[column] == {"type": ["integer", "null"]}


def test_sklearn_on_a_real_looking_table(sqlite_tracking, gateway: Service, tmp_path: Path) -> None:
    table = real_table(600)
    table.loc[:11, "label"] = None
    data = tmp_path / "customers.csv"
    table.to_csv(data, index=False)
    result, version, local = _train(sqlite_tracking, data, "label", "customers")

    assert "left out 12 row(s) whose target 'label' is empty" in result.stdout
    assert "warning: column 'name' dropped (id-like)" in result.stdout
    assert json.loads(version.tags["flowline.dropped_columns"]) == {
        "passenger_id": "id_like",
        "customer_id": "id_like",
        "name": "id_like",
        "constant": "constant",
        "empty": "empty",
    }
    assert version.tags["flowline.metric"] == "average_precision"  # 6% positives
    parent = mlflow.get_run(version.tags["flowline.parent_run_id"])
    assert parent.data.metrics["rows_null_target_dropped"] == 12
    model = mlflow.models.Model.load(local)
    assert model.metadata["flowline.input_types"]["signup"] == "datetime"
    assert model.metadata["flowline.input_types"]["member"] == "boolean"

    file_rows = pd.read_csv(data).drop(columns=["label"])
    score_everywhere(local, "customers", file_rows, gateway, tmp_path)


def test_keras_on_digits_as_its_integer_frame(sqlite_tracking, gateway: Service, tmp_path: Path):
    # scikit-learn 1.9 ships every bundled frame's features as float64 (only targets are
    # int64); digits' pixels are whole numbers, so they are typed `integer`, and the int64
    # frame that reading them from a file gives is scored as well.
    digits = load_digits(as_frame=True)
    data = tmp_path / "digits.csv"
    digits.frame.astype("int64").to_csv(data, index=False)
    from_file = pd.read_csv(data).drop(columns=["target"])
    assert all(pd.api.types.is_integer_dtype(t) for t in from_file.dtypes)
    _, version, local = _train(sqlite_tracking, data, "target", "digits", family="keras", epochs=2)
    dropped = json.loads(version.tags["flowline.dropped_columns"])
    assert dropped and set(dropped.values()) == {"constant"}  # blank corner pixels
    types = mlflow.models.Model.load(local).metadata["flowline.input_types"]
    assert set(types.values()) == {"integer"}
    score_everywhere(local, "digits", from_file, gateway, tmp_path)
    model = mlflow.pyfunc.load_model(str(local))
    assert _as_list(model.predict(digits.data)) == _as_list(model.predict(from_file))
