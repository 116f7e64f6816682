"""The typed settings layer (common.settings) and the five places that read FLOWLINE_*.

Defaults and overrides as documented, one-line errors naming the variable, settings
read when asked (never at import), and start-up errors as one line and exit status 2.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from pydantic import Field

from common.settings import (
    CommaList,
    EnvFloat,
    EnvInt,
    FlowlineBaseSettings,
    HomeSettings,
    OptionalStr,
    Port,
    PositiveFloat,
    PositiveInt,
    ResolvedPath,
    SettingsError,
)
from flowline.config import Ports, home
from monitoring.capture.client import SamplingPolicy, client_from_env
from monitoring.service.settings import MonitorSettings, port_from_env
from serving.gateway.config import GatewayConfig, flowline_home
from tests.conftest import BIN, REPO, subprocess_env


class Kinds(FlowlineBaseSettings):
    """One field of each value kind, for the tests."""

    count: EnvInt = 3
    ratio: EnvFloat = 0.5
    size: PositiveInt = 10
    timeout_s: PositiveFloat = 1.0
    port: Port = 8000
    folder: ResolvedPath = Path("here")
    items: CommaList = ()
    name: OptionalStr = None
    tracking_uri: str = Field("", validation_alias="MLFLOW_TRACKING_URI")


def one_line_error(environ: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as caught:
        Kinds.from_env(environ)
    message = str(caught.value)
    assert "\n" not in message and "validation error" not in message
    return message


# --- the shared layer ---------------------------------------------------------------------


def test_defaults_and_overrides_from_a_mapping(tmp_path: Path) -> None:
    defaults = Kinds.from_env({})
    assert (defaults.count, defaults.ratio, defaults.size, defaults.port) == (3, 0.5, 10, 8000)
    assert defaults.folder == Path("here").resolve() and defaults.items == ()
    assert defaults.name is None and defaults.tracking_uri == ""
    given = Kinds.from_env(
        {
            "FLOWLINE_COUNT": " 1_000 ",
            "FLOWLINE_RATIO": "1e-3",
            "FLOWLINE_SIZE": "+7",
            "FLOWLINE_TIMEOUT_S": "2.5",
            "FLOWLINE_PORT": "0",
            "FLOWLINE_FOLDER": str(tmp_path),
            "FLOWLINE_ITEMS": " a, b,,c ,",
            "FLOWLINE_NAME": "x",
            "MLFLOW_TRACKING_URI": "http://t",
        }
    )
    assert (given.count, given.ratio, given.size, given.timeout_s) == (1000, 0.001, 7, 2.5)
    assert given.port == 0 and given.folder == tmp_path.resolve()
    assert given.items == ("a", "b", "c") and given.name == "x"
    assert given.tracking_uri == "http://t"
    assert Kinds.from_env({"FLOWLINE_NAME": "", "FLOWLINE_RATIO": "inf"}).name is None
    assert Kinds.from_env({"FLOWLINE_FOLDER": "~/f"}).folder == Path.home() / "f"


def test_names_match_exactly_and_nothing_but_the_environment_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Kinds.from_env({"flowline_count": "9", "Flowline_Count": "9"}).count == 3
    assert Kinds.from_env({"FLOWLINE_COUNT": "9", "OTHER": "x"}).count == 9
    # No .env file, however named, is read.
    (tmp_path / ".env").write_text("FLOWLINE_COUNT=5\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWLINE_COUNT", raising=False)
    assert Kinds.from_env().count == 3
    monkeypatch.setenv("FLOWLINE_COUNT", "4")
    assert Kinds.from_env().count == 4 and Kinds.from_env({}).count == 3
    # Values given in code win over the environment.
    assert Kinds(count=8).count == 8


def test_a_bad_value_is_one_line_naming_the_variable_and_the_value() -> None:
    assert one_line_error({"FLOWLINE_COUNT": "abc"}) == (
        "FLOWLINE_COUNT: must be an integer, got 'abc'"
    )
    assert "FLOWLINE_COUNT" in one_line_error({"FLOWLINE_COUNT": "1.0"})  # int() refuses it too
    assert "FLOWLINE_COUNT" in one_line_error({"FLOWLINE_COUNT": ""})
    assert "FLOWLINE_RATIO: must be a number, got 'x'" == one_line_error({"FLOWLINE_RATIO": "x"})
    assert "positive integer" in one_line_error({"FLOWLINE_SIZE": "0"})
    for bad in ("0", "-1", "nan", "inf"):
        assert "FLOWLINE_TIMEOUT_S: must be a positive, finite number" in one_line_error(
            {"FLOWLINE_TIMEOUT_S": bad}
        )
    assert "FLOWLINE_PORT: must be a port number" in one_line_error({"FLOWLINE_PORT": "65536"})
    both = one_line_error({"FLOWLINE_COUNT": "a", "FLOWLINE_PORT": "-1"})
    assert "FLOWLINE_COUNT" in both and "FLOWLINE_PORT" in both
    long = one_line_error({"FLOWLINE_COUNT": "9" * 500 + "x"})
    assert len(long) < 200
    assert isinstance(SettingsError("x"), ValueError)  # callers catching ValueError see it


def test_settings_read_at_call_time_not_at_import() -> None:
    bad = {
        "FLOWLINE_HOME": "/nonexistent",
        "FLOWLINE_TRACKING_PORT": "abc",
        "FLOWLINE_GATEWAY_PORT": "x",
        "FLOWLINE_MAX_INFLIGHT": "x",
        "FLOWLINE_WINDOW_ROWS": "x",
        "FLOWLINE_CAPTURE_SAMPLE": "x",
        "FLOWLINE_CONTROLLER_PORT": "x",
        "FLOWLINE_REPLICAS": "x",
    }
    code = (
        "import flowline.config, flowline.cli, serving.gateway.config, "
        "monitoring.service.settings, monitoring.capture.client, serving.controller.__main__\n"
        "try:\n    flowline.config.Ports()\nexcept ValueError as exc:\n    print(exc)\n"
    )
    done = subprocess.run(
        [str(BIN / "python"), "-c", code],
        env=subprocess_env(**bad),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "FLOWLINE_TRACKING_PORT: must be an integer" in done.stdout


# --- the five places ---------------------------------------------------------------------


def test_home_and_ports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HOME", "TRACKING_PORT", "GATEWAY_PORT", "CONTROLLER_PORT", "MONITOR_PORT"):
        monkeypatch.delenv(f"FLOWLINE_{name}", raising=False)
    monkeypatch.delenv("FLOWLINE_REPLICA_PORT_FROM", raising=False)
    monkeypatch.chdir(tmp_path)
    assert home() == tmp_path.resolve() / ".flowline"
    assert Ports() == Ports(5000, 8080, 8081, 8082, 9000)
    monkeypatch.setenv("FLOWLINE_HOME", str(tmp_path / "h"))
    monkeypatch.setenv("FLOWLINE_GATEWAY_PORT", "18080")
    assert home() == tmp_path.resolve() / "h"
    assert Ports().gateway == 18080 and Ports(gateway=1).gateway == 1
    monkeypatch.setenv("FLOWLINE_REPLICA_PORT_FROM", "nine")
    with pytest.raises(ValueError, match="FLOWLINE_REPLICA_PORT_FROM: must be an integer"):
        Ports()


def test_gateway_settings(tmp_path: Path) -> None:
    config = GatewayConfig.from_env({"FLOWLINE_HOME": str(tmp_path)})
    in_code = GatewayConfig()
    for name in (
        "max_body_bytes",
        "max_inflight",
        "backend_timeout_s",
        "health_interval_s",
        "max_connections",
        "upstream",
        "body_timeout_s",
        "header_timeout_s",
        "max_header_bytes",
        "api_keys",
        "admin_token",
        "default_model",
    ):
        assert getattr(config, name) == getattr(in_code, name), name
    assert config.routes_file == tmp_path.resolve() / "gateway" / "routes.json"
    keys = tmp_path / "keys"
    keys.write_text("k2  # a comment\n\n# only a comment\nk3\n")
    config = GatewayConfig.from_env(
        {
            "FLOWLINE_API_KEYS": " k1, ,k2",
            "FLOWLINE_API_KEYS_FILE": str(keys),
            "FLOWLINE_ADMIN_TOKEN": "",
            "FLOWLINE_DEFAULT_MODEL": "m",
            "FLOWLINE_MAX_INFLIGHT": "5",
            "FLOWLINE_BACKEND_TIMEOUT_S": "2.5",
            "FLOWLINE_UPSTREAM": "httpx",
        }
    )
    assert config.api_keys == {"k1", "k2", "k3"} and config.admin_token is None
    assert (config.default_model, config.max_inflight, config.backend_timeout_s) == ("m", 5, 2.5)
    assert config.upstream == "httpx"
    assert flowline_home({"FLOWLINE_HOME": str(tmp_path)}) == tmp_path.resolve()
    with pytest.raises(ValueError, match=r"^FLOWLINE_MAX_INFLIGHT: must be an integer, got 'x'$"):
        GatewayConfig.from_env({"FLOWLINE_MAX_INFLIGHT": "x"})
    with pytest.raises(ValueError, match="FLOWLINE_HEALTH_INTERVAL_S"):
        GatewayConfig.from_env({"FLOWLINE_HEALTH_INTERVAL_S": "-1"})
    with pytest.raises(OSError):
        GatewayConfig.from_env({"FLOWLINE_API_KEYS_FILE": str(tmp_path / "missing")})


def test_monitor_settings(tmp_path: Path) -> None:
    settings = MonitorSettings.from_env({"FLOWLINE_HOME": str(tmp_path)})
    assert settings == MonitorSettings(home=tmp_path.resolve())
    settings = MonitorSettings.from_env(
        {
            "FLOWLINE_MONITOR_DB": "sqlite:///x.db",
            "MLFLOW_TRACKING_URI": "http://t",
            "FLOWLINE_ALERT_FORMAT": " Slack ",
            "FLOWLINE_ALERT_MAX_ATTEMPTS": "3",
            "FLOWLINE_ALERT_BACKOFF_S": "0.5",
            "FLOWLINE_MONITOR_PUBLIC_URL": "http://m:1//",
            "FLOWLINE_MONITOR_EXPERIMENT": "e",
            "FLOWLINE_MONITOR_POLL_S": "0.1",
            "FLOWLINE_MONITOR_MAX_STREAMS": "4",
            "FLOWLINE_WINDOW_SECONDS": "inf",
        }
    )
    assert (settings.db_url, settings.store_url, settings.tracking_uri) == (
        "sqlite:///x.db",
        "sqlite:///x.db",
        "http://t",
    )
    assert (settings.alert_format, settings.alert_max_attempts, settings.alert_backoff_s) == (
        "slack",
        3,
        0.5,
    )
    assert (settings.public_url, settings.experiment, settings.poll_interval_s) == (
        "http://m:1",
        "e",
        0.1,
    )
    assert settings.max_streams == 4 and settings.window_seconds == float("inf")
    assert MonitorSettings.from_env({"FLOWLINE_ALERT_FORMAT": " "}).alert_format == "json"
    for value, enabled in (
        ("0", False),
        ("false", False),
        ("no", False),
        ("1", True),
        ("yes", True),
        ("", True),
    ):
        assert MonitorSettings.from_env({"FLOWLINE_MONITOR_MLFLOW": value}).mlflow_enabled is (
            enabled
        )
    with pytest.raises(ValueError, match="FLOWLINE_WINDOW_ROWS must be >= 1"):
        MonitorSettings.from_env({"FLOWLINE_WINDOW_ROWS": "0"})
    with pytest.raises(ValueError, match="^FLOWLINE_MONITOR_RETENTION_DAYS: must be a number"):
        MonitorSettings.from_env({"FLOWLINE_MONITOR_RETENTION_DAYS": "a week"})
    assert port_from_env({}) == 8082 and port_from_env({"FLOWLINE_MONITOR_PORT": "0"}) == 0


def test_capture_settings(tmp_path: Path) -> None:
    assert SamplingPolicy.from_env({}) == SamplingPolicy()
    policy = SamplingPolicy.from_env(
        {"FLOWLINE_CAPTURE_SAMPLE": " *=0.2, a=0 ,", "FLOWLINE_CAPTURE_DISABLED": "b, c"}
    )
    assert (policy.default, dict(policy.per_model)) == (0.2, {"a": 0.0})
    assert policy.disabled == {"b", "c"}
    for bad in ("2", "a=x", "[0.5]"):
        with pytest.raises(ValueError, match="^FLOWLINE_CAPTURE_SAMPLE: rates must be"):
            SamplingPolicy.from_env({"FLOWLINE_CAPTURE_SAMPLE": bad})
    # Without a monitor URL, or with capture off for all, the rest is not read (nor fails).
    assert client_from_env({"FLOWLINE_CAPTURE_QUEUE": "x", "FLOWLINE_CAPTURE_SAMPLE": "x"}) is None
    assert (
        client_from_env(
            {
                "FLOWLINE_MONITOR_URL": "http://x",
                "FLOWLINE_CAPTURE_DISABLED": "*",
                "FLOWLINE_CAPTURE_QUEUE": "x",
            }
        )
        is None
    )
    with pytest.raises(ValueError, match="^FLOWLINE_CAPTURE_BATCH: must be an integer, got ''$"):
        client_from_env({"FLOWLINE_MONITOR_URL": "http://x", "FLOWLINE_CAPTURE_BATCH": ""})
    client = client_from_env(
        {
            "FLOWLINE_MONITOR_URL": " http://127.0.0.1:1/ ",
            "FLOWLINE_HOME": str(tmp_path),
            "FLOWLINE_CAPTURE_QUEUE": "7",
            "FLOWLINE_CAPTURE_BATCH": "3",
            "FLOWLINE_CAPTURE_FLUSH_S": "0.5",
            "FLOWLINE_INGEST_TOKEN": " t ",
        }
    )
    assert client is not None
    try:
        assert client.ingest_url == "http://127.0.0.1:1/ingest"
        assert (client.queue_size, client.batch_size, client.flush_interval_s) == (7, 3, 0.5)
        assert client.spool.path.parent == tmp_path.resolve() / "capture-spool"
        assert client._token == "t"
    finally:
        client.close(timeout=0.5)


def test_controller_settings() -> None:
    from serving.controller.__main__ import ControllerSettings

    env = ControllerSettings.from_env({})
    assert (env.controller_port, env.gateway_url, env.home, env.replicas) == (
        8081,
        "http://127.0.0.1:8080",
        ".flowline",
        1,
    )
    assert (env.replica_port_from, env.env_manager, env.backend) == (9000, "local", "local")
    assert (env.reconcile_interval_s, env.auth, env.admin_token, env.tracking_uri) == (
        5.0,
        False,
        None,
        None,
    )
    # Auth is on for "1" only, as `flowline up --auth` sets it.
    assert ControllerSettings.from_env({"FLOWLINE_AUTH": "1"}).auth is True
    assert ControllerSettings.from_env({"FLOWLINE_AUTH": "true"}).auth is False
    assert ControllerSettings.from_env({"MLFLOW_TRACKING_URI": ""}).tracking_uri == ""
    assert ControllerSettings.from_env({"FLOWLINE_HOME": "~/h"}).home == "~/h"


def test_home_settings_are_shared(tmp_path: Path) -> None:
    assert HomeSettings.from_env({"FLOWLINE_HOME": str(tmp_path)}).home == tmp_path.resolve()
    assert HomeSettings.from_env({"FLOWLINE_HOME": ""}).home == Path.cwd()


# --- start-up errors: one line, exit status 2, no traceback -------------------------------


def run_module(module: str, args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "python"), "-m", module, *args],
        env=subprocess_env(**env),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_one_line(done: subprocess.CompletedProcess, *expected: str) -> None:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().count("\n") == 0, done.stderr[-2000:]
    assert done.stderr.startswith("flowline: error: ")
    for text in expected:
        assert text in done.stderr


def test_the_controller_stops_in_one_line_on_a_bad_start(tmp_path: Path) -> None:
    home_dir = tmp_path / "home"
    tracking = "http://127.0.0.1:1"
    args = ["--port", "0", "--home", str(home_dir)]
    done = run_module(
        "serving.controller", args, tmp_path, MLFLOW_TRACKING_URI=tracking, FLOWLINE_REPLICAS="x"
    )
    assert_one_line(done, "FLOWLINE_REPLICAS: must be an integer, got 'x'")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        done = run_module(
            "serving.controller",
            ["--port", port, "--home", str(home_dir)],
            tmp_path,
            MLFLOW_TRACKING_URI=tracking,
        )
    assert_one_line(done, "the controller cannot start", "in use")
    assert not home_dir.exists()  # nothing was started before the port was bound
    env = subprocess_env()
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(
        [str(BIN / "python"), "-m", "serving.controller", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_one_line(done, "MLFLOW_TRACKING_URI is not set")
    assert list(tmp_path.iterdir()) == []  # no stray home or database in the working dir


def test_the_monitor_and_the_gateway_stop_in_one_line_on_a_bad_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from monitoring.__main__ import main as monitor_main
    from serving.gateway.__main__ import main as gateway_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLOWLINE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLOWLINE_WINDOW_SECONDS", "soon")
    with pytest.raises(SystemExit) as stopped:
        monitor_main(["--port", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == (
        "flowline: error: the monitor cannot start: "
        "FLOWLINE_WINDOW_SECONDS: must be a number, got 'soon'\n"
    )
    monkeypatch.delenv("FLOWLINE_WINDOW_SECONDS")
    monkeypatch.setenv("FLOWLINE_MONITOR_PORT", "http")
    with pytest.raises(SystemExit) as stopped:
        monitor_main([])
    assert stopped.value.code == 2 and "FLOWLINE_MONITOR_PORT" in capsys.readouterr().err
    monkeypatch.setenv("FLOWLINE_MAX_BODY_BYTES", "10MB")
    with pytest.raises(SystemExit) as stopped:
        gateway_main(["--port", "0"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("flowline: error: the gateway cannot start: FLOWLINE_MAX_BODY_BYTES")
    assert err.count("\n") == 1


def test_the_flowline_command_and_the_serving_parts_read_the_same_layer(tmp_path: Path) -> None:
    from flowline.config import PlatformSettings
    from serving.backends.docker import ReplicaResourceSettings
    from serving.deployments_plugin import TargetSettings
    from serving.images.builder import ImageSettings, base_image

    platform = PlatformSettings.from_env({})
    assert (platform.replicas, platform.backend, platform.window_rows) == (1, "local", 1000)
    assert not platform.auth_on and not platform.has_api_keys
    given = PlatformSettings.from_env(
        {"FLOWLINE_AUTH": "1", "FLOWLINE_REPLICAS": "3", "FLOWLINE_API_KEYS_FILE": "/k"}
    )
    assert given.auth_on and given.replicas == 3 and given.has_api_keys
    assert not PlatformSettings.from_env({"FLOWLINE_AUTH": "true"}).auth_on  # exactly "1"
    resources = ReplicaResourceSettings.from_env({"FLOWLINE_REPLICA_CPUS": "0.5"})
    assert (resources.replica_cpus, resources.replica_memory) == (0.5, "2g")
    with pytest.raises(SettingsError, match="FLOWLINE_REPLICA_CPUS: must be a number, got 'a'"):
        ReplicaResourceSettings.from_env({"FLOWLINE_REPLICA_CPUS": "a"})
    assert ImageSettings.from_env({}).base_image == ""
    assert base_image() in (ImageSettings.from_env().base_image, "python:3.11-slim")
    assert TargetSettings.from_env({}).gateway_url == "http://127.0.0.1:8080"

    for name, value in (("FLOWLINE_REPLICAS", "x"), ("FLOWLINE_GATEWAY_PORT", "99999")):
        done = subprocess.run(
            [str(BIN / "flowline"), "status"],
            env=subprocess_env(**{name: value}),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert_one_line(done, f"{name}: ", repr(value))


def test_a_variable_is_read_only_under_its_documented_name() -> None:
    # FLOWLINE_MONITOR_DB is the monitor's store; the field's own name is no second spelling.
    settings = MonitorSettings.from_env({"FLOWLINE_DB_URL": "sqlite:////x.db"})
    assert settings.db_url == ""
    settings = MonitorSettings.from_env({"FLOWLINE_MONITOR_DB": "sqlite:////x.db"})
    assert settings.db_url == "sqlite:////x.db"
    assert MonitorSettings.from_env({"FLOWLINE_TRACKING_URI": "http://x"}).tracking_uri == ""
