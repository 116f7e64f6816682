"""Bad input: one clear line, a non-zero exit, no traceback and no model version."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from common.processes import free_port
from projects.train import main as train_main
from tests.conftest import BIN, REPO, mlflow_run, subprocess_env


def _write(tmp_path: Path, frame: pd.DataFrame, name: str = "data.csv") -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def _frame(n: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "b": rng.choice(["x", "y"], n),
            "label": rng.choice(["p", "q"], n),
        }
    )


def _train(uri: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "projects.train", *args],
        env=subprocess_env(MLFLOW_TRACKING_URI=uri),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


CASES = {
    "missing file": (
        lambda p: ["--data", str(p / "nope.csv"), "--target", "label"],
        "data file not found",
    ),
    "unsupported format": (
        lambda p: ["--data", str(_touch(p / "data.xlsx")), "--target", "label"],
        "unsupported data format '.xlsx'",
    ),
    "unknown target": (
        lambda p: ["--data", str(_write(p, _frame())), "--target", "nope"],
        "target column 'nope' not found",
    ),
    "empty data": (
        lambda p: ["--data", str(_write(p, _frame(0))), "--target", "label"],
        "has no rows",
    ),
    "single class": (
        lambda p: ["--data", str(_write(p, _frame().assign(label="p"))), "--target", "label"],
        "has a single class ('p')",
    ),
    "non-numeric regression target": (
        lambda p: ["--data", str(_write(p, _frame())), "--target", "label", "--task", "regression"],
        "is not numeric, so task=regression",
    ),
    "only empty or constant features": (
        lambda p: [
            "--data",
            str(_write(p, _frame()[["label"]].assign(b=np.nan, c=1))),
            "--target",
            "label",
        ],
        "no usable feature column in data.csv: all were dropped: b (empty), c (constant)",
    ),
    "max_evals below one": (
        lambda p: ["--data", str(_write(p, _frame())), "--target", "label", "--max-evals", "0"],
        "max_evals must be at least 1",
    ),
    "gate tolerance not a number": (
        lambda p: [
            "--data",
            str(_write(p, _frame())),
            "--target",
            "label",
            "--gate-tolerance",
            "nan",
        ],  # fmt: skip
        "gate_tolerance must be a finite number",
    ),
    "unreadable parquet": (
        lambda p: ["--data", str(_touch(p / "data.parquet", b"garbage")), "--target", "label"],
        "cannot read parquet file",
    ),
}


def _touch(path: Path, content: bytes = b"") -> Path:
    path.write_bytes(content)
    return path


def _assert_one_clear_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("flowline: error:")]
    assert len(errors) == 1, result.stderr
    assert expected in errors[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_registers_nothing(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    make_args, expected = CASES[case]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # In-process for speed; the subprocess tests below cover the real command line.
    code = train_main(make_args(tmp_path))
    captured = capsys.readouterr()
    _assert_one_clear_line(
        subprocess.CompletedProcess([], code, captured.out, captured.err), expected
    )
    if (tmp_path / "mlflow.db").exists():
        client = mlflow.MlflowClient(uri)
        assert client.search_model_versions() == []


def test_unreachable_tracking_server_fails_fast(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    result = _train(uri, "--max-evals", "1")
    _assert_one_clear_line(result, f"cannot reach the MLflow tracking server at {uri}")


def _flowline(command: str, tracking_uri: str, *params: str) -> subprocess.CompletedProcess:
    """`flowline <command> -P k=v ...` as a real subprocess against ``tracking_uri``."""
    return subprocess.run(
        [str(BIN / "flowline"), command, *(arg for p in params for arg in ("-P", p))],
        env=subprocess_env(MLFLOW_TRACKING_URI=tracking_uri),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_flowline_train_checks_server_before_mlflow_run(tmp_path: Path) -> None:
    result = _flowline("train", f"http://127.0.0.1:{free_port()}", "max_evals=1")
    _assert_one_clear_line(result, "cannot reach the MLflow tracking server")


def test_flowline_train_checks_data_before_creating_a_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = _flowline("train", uri, f"data={tmp_path / 'nope.csv'}", "target=y")
    _assert_one_clear_line(result, "data file not found")
    assert not (tmp_path / "mlflow.db").exists()


def test_flowline_score_checks_its_paths_before_creating_a_run(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    params = ["model=models:/m/1", f"input={tmp_path / 'nope.parquet'}", "output=out.parquet"]
    result = _flowline("score", uri, *params)
    _assert_one_clear_line(result, "input not found")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_bad_input_through_mlflow_run_against_a_real_server(
    tracking_server, tmp_path: Path
) -> None:
    data = _write(tmp_path, _frame().assign(label="p"))
    result = mlflow_run(tracking_server.url, data=data, target="label", registered_model="bad")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "flowline: error: target 'label' has a single class ('p')" in result.stderr
    client = mlflow.MlflowClient(tracking_server.url)
    assert client.search_model_versions("name='bad'") == []


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        ("mysql://user@127.0.0.1/db", "must be sqlite:///<path> or postgresql://"),
        (f"postgresql://postgres@127.0.0.1:{free_port()}/none", "connection failed"),
    ],
)
def test_monitor_with_a_bad_store_url_fails_in_one_line(
    tmp_path: Path, store: str, expected: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "monitoring", "--port", "0", "--home", str(tmp_path),
         "--db", store],
        env=subprocess_env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    _assert_one_clear_line(result, expected)


def test_gateway_on_a_taken_port_or_missing_file_fails_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, expected in (
            (["--port", str(port)], "Address already in use"),
            (["--port", "0", "--deployments", str(tmp_path / "none.json")], "No such file"),
        ):
            result = subprocess.run(
                [sys.executable, "-m", "serving.gateway", "--host", "127.0.0.1", *args],
                env=subprocess_env(),
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
            )
            _assert_one_clear_line(result, expected)


# --- the monitor's POST /ingest and report URLs: the probe's bad input gets 4xx, never 500 ---


def _ingest_record(i: int, **change: object) -> dict:
    body = '{"dataframe_split": {"columns": ["x"], "data": [[1]]}}'
    record = {"id": f"probe-{i}", "model": "probe", "version": "1", "time": 1.8e9}
    return {**record, "content_type": "application/json", "body": body, **change}


MONITOR_BAD_INPUT = {
    "999 distinct model versions": {
        "records": [_ingest_record(i, model=f"m{i}") for i in range(999)]
    },
    "rows=2**70": {"records": [_ingest_record(0, rows=2**70)]},
    "rows=10**12": {"records": [_ingest_record(0, rows=10**12)]},
    "dropped 10**30": {
        "client": {"id": "c", "dropped": [{"model": "probe", "version": "1", "records": 10**30}]},
        "records": [_ingest_record(0)],
    },
    "dropped -100": {
        "client": {"id": "c", "dropped": [{"model": "probe", "version": "1", "records": -100}]},
        "records": [_ingest_record(0)],
    },
    "lone surrogate in a model name": {"records": [_ingest_record(0, model="m\ud800")]},
    "NUL in a model name": {"records": [_ingest_record(0, model="m\x00")]},
}


@pytest.fixture(scope="module")
def bad_input_monitor(tmp_path_factory: pytest.TempPathFactory):
    from tests.helpers_monitor import start_monitor

    workdir = tmp_path_factory.mktemp("bad-input-monitor")
    env = {"FLOWLINE_HOME": str(workdir / "home"), "MLFLOW_TRACKING_URI": ""}
    env.update(FLOWLINE_MONITOR_MLFLOW="0", FLOWLINE_WINDOW_SECONDS="3600")
    service = start_monitor(workdir, env)
    try:
        yield service
    finally:
        service.stop()


@pytest.mark.parametrize("case", sorted(MONITOR_BAD_INPUT))
def test_monitor_bad_ingest_gets_a_4xx_and_stores_nothing(bad_input_monitor, case: str) -> None:
    import json

    import httpx

    from tests.helpers_monitor import AUTH

    url = bad_input_monitor.url
    # ensure_ascii: the surrogate and NUL travel as \u escapes, as the probe sent them.
    body = json.dumps(MONITOR_BAD_INPUT[case]).encode()
    headers = {**AUTH, "content-type": "application/json"}
    answer = httpx.post(f"{url}/ingest", content=body, headers=headers, timeout=30)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert "nothing was stored" in answer.json()["error"] or "new model versions" in answer.text
    # Refused whole: nothing of the batch is stored, so the sender still holds all of it.
    assert httpx.get(f"{url}/drift", timeout=10).json()["models"] == []
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    unauthenticated = httpx.post(f"{url}/ingest", content=body, timeout=30)
    assert unauthenticated.status_code == 401


@pytest.mark.parametrize(
    "path",
    [f"/reports/probe/{2**63}", f"/reports/probe/{2**64 + 1}", f"/drift/probe/windows/{2**63}"],
)
def test_monitor_window_ids_beyond_64_bits_are_404(bad_input_monitor, path: str) -> None:
    import httpx

    answer = httpx.get(f"{bad_input_monitor.url}{path}", timeout=10)
    assert answer.status_code == 404


def test_mlflow_deployments_errors_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = subprocess_env(
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
        FLOWLINE_GATEWAY_URL=f"http://127.0.0.1:{free_port()}",
    )
    commands = {
        "Registered Model with name=nosuch not found": [
            "create", "-t", "flowline", "--name", "nosuch", "-m", "models:/nosuch/1",
        ],
        "flowline gateway not reachable": ["get", "-t", "flowline", "--name", "nosuch"],
        "update needs -m models:/NAME/VERSION": ["update", "-t", "flowline", "--name", "x"],
    }  # fmt: skip
    for expected, args in commands.items():
        done = subprocess.run(
            [str(BIN / "mlflow"), "deployments", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, (args, done.stderr[-2000:])
        assert "Traceback" not in done.stderr, done.stderr[-2000:]
        # MLflow itself logs the creation of a new SQLite store at INFO; the rest is ours.
        lines = [line for line in done.stderr.splitlines() if " INFO mlflow." not in line]
        assert len(lines) == 1, done.stderr[-2000:]
        assert lines[0].startswith("Error: ") and expected in lines[0], done.stderr


def test_the_deployments_target_still_raises_mlflow_exceptions_in_code(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mlflow.deployments import get_deploy_client
    from mlflow.exceptions import MlflowException

    monkeypatch.setenv("FLOWLINE_GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MlflowException, match="gateway not reachable"):
        get_deploy_client("flowline").list_deployments()
