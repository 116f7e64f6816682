"""A hardened `flowline up`: crashed roles come back, with real processes under real load."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from flowline.platform import Platform
from flowline.supervisor import Backoff
from monitoring.capture.client import DEFAULT_FLUSH_INTERVAL_S
from serving.controller.webhooks import signature
from tests.conftest import BIN, REPO, Service, spawn_service, subprocess_env, wait_for
from tests.helpers_serving import FEW_COLUMNS, breast_cancer_frame
from tests.test_deployment_e2e import _ports, flowline_up_argv

pytestmark = pytest.mark.slow
DEADLINE = 120.0


@dataclass
class Up:
    """A running `flowline up` (a real child process) and where it keeps its state."""

    service: Service
    home: Path
    log: Path
    ports: object

    def url(self, role: str) -> str:
        """Base URL of ``role`` (tracking, gateway, controller, monitor)."""
        return f"http://127.0.0.1:{getattr(self.ports, role)}"

    def pid(self, role: str) -> int:
        """The pid (and process group) of ``role``, from its pid file."""
        return int((self.home / "pids" / f"{role}.pid").read_text())


def _kill_leftovers(home: Path) -> None:
    # Only after a failed stop: no role or replica may outlive the test.
    pids = [int(p.read_text()) for p in (home / "pids").glob("*.pid")]
    pids += [json.loads(p.read_text())["pid"] for p in (home / "replicas").glob("*.json")]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def flowline_up(tmp: Path, *extra: str, **env: str) -> Iterator[Up]:
    """`flowline up` on free ports in a fresh home; SIGTERM (then cleanup) at the end."""
    ports = _ports()
    home = tmp / "home"
    argv = flowline_up_argv(ports, *extra)
    log = tmp / "up.log"
    environment = subprocess_env(
        **{"FLOWLINE_HOME": str(home), "FLOWLINE_RECONCILE_INTERVAL_S": "1", **env}
    )
    service = spawn_service(argv, log, environment, f"http://127.0.0.1:{ports.gateway}")
    up = Up(service, home, log, ports)
    try:
        wait_for(
            lambda: "press Ctrl-C" in _text(log) or not service.alive(),
            "flowline up to be ready",
            DEADLINE,
        )
        assert service.alive(), _text(log)[-3000:]
        yield up
    finally:
        service.stop(grace=90.0)
        _kill_leftovers(home)


def _text(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def register_model(tracking: str, name: str) -> str:
    """Log a small LogisticRegression as a new version of ``name``; return the version."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression

    features, target = breast_cancer_frame(FEW_COLUMNS)
    model = LogisticRegression(max_iter=5000).fit(features, target)
    mlflow.set_tracking_uri(tracking)
    try:
        with mlflow.start_run():
            info = mlflow.sklearn.log_model(
                model,
                name="model",
                signature=infer_signature(features, model.predict(features)),
                input_example=features.head(2),
                registered_model_name=name,
            )
    finally:
        mlflow.set_tracking_uri(None)
    return str(info.registered_model_version)


def served_version(gateway: str, name: str) -> str | None:
    """The version of ``name`` the gateway serves, if any."""
    try:
        models = requests.get(f"{gateway}/models", timeout=5).json()["models"]
    except (requests.RequestException, ValueError, KeyError):
        return None
    return next((str(m["version"]) for m in models if m["name"] == name), None)


def promote(up: Up, name: str, version: str) -> None:
    """Set alias production and wait until the gateway serves the version."""
    MlflowClient(up.url("tracking"), up.url("tracking")).set_registered_model_alias(
        name, "production", version
    )
    wait_for(lambda: served_version(up.url("gateway"), name) == version, "the deployment", DEADLINE)


BODY = {
    "dataframe_split": {
        "columns": FEW_COLUMNS,
        "data": [[14.0, 19.0, 91.0, 650.0, 0.09], [20.0, 25.0, 130.0, 1200.0, 0.11]],
    }
}


@dataclass
class Load:
    """Constant scoring traffic from a few threads, every answer recorded with its time."""

    url: str
    threads: int = 2
    body: dict = field(default_factory=lambda: BODY)
    ok: int = 0
    failures: list[tuple[float, str]] = field(default_factory=list)
    successes: list[float] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _run(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    answer = session.post(self.url, json=self.body, timeout=30)
                    outcome = None if answer.status_code == 200 else f"HTTP {answer.status_code}"
                except requests.RequestException as exc:
                    outcome = type(exc).__name__
                    session.close()  # a dead gateway's connection must not be reused
                with self._lock:
                    if outcome is None:
                        self.ok += 1
                        self.successes.append(time.monotonic())
                    else:
                        self.failures.append((time.monotonic(), outcome))

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for worker in self._workers:
            worker.start()
        wait_for(lambda: self.ok >= 10, "scoring traffic to flow", 30)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=60)

    def successes_after(self, moment: float) -> int:
        """How many requests succeeded after ``moment`` (time.monotonic)."""
        with self._lock:
            return sum(1 for t in self.successes if t > moment)


# Secrets in the platform's own environment; none may reach a replica (model code).
PLANTED_SECRETS = {
    "FLOWLINE_PROBE_SECRET": "planted-flowline-secret",
    "MLFLOW_TRACKING_USERNAME": "flowline-service",
    "MLFLOW_TRACKING_PASSWORD": "planted-tracking-password",
    "MLFLOW_TRACKING_TOKEN": "planted-tracking-token",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "planted-flask-key",
    "OPENAI_API_KEY": "planted-api-key",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Up, str]]:
    """`flowline up` serving one small model (1 replica)."""
    tmp = tmp_path_factory.mktemp("up")
    # A home made before, world-readable: flowline up must close it.
    (tmp / "home" / "logs").mkdir(parents=True, mode=0o755)
    (tmp / "home").chmod(0o755)
    (tmp / "home" / "logs" / "old.log").write_text("from an earlier run\n")
    (tmp / "home" / "logs" / "old.log").chmod(0o644)
    with flowline_up(tmp, **PLANTED_SECRETS) as up:
        name = f"sturdy-{uuid.uuid4().hex[:6]}"
        promote(up, name, register_model(up.url("tracking"), name))
        yield up, name


def _crash(up: Up, role: str) -> int:
    """kill -9 the role's whole process group; return the pid it had."""
    pid = up.pid(role)
    os.killpg(pid, signal.SIGKILL)
    return pid


def _wait_restarted(up: Up, role: str, old_pid: int, health: str) -> None:
    wait_for(
        lambda: up.pid(role) != old_pid and f"{role} is back" in _text(up.log),
        f"the {role} to be restarted",
        DEADLINE,
    )
    assert requests.get(up.url(role) + health, timeout=5).status_code == 200
    assert f"{role} exited unexpectedly (killed by signal 9)" in _text(up.log)


@pytest.mark.parametrize(
    "role, health", [("monitor", "/health"), ("controller", "/health"), ("tracking", "/health")]
)
def test_a_killed_role_is_restarted_with_no_failed_scoring_request(
    served: tuple[Up, str], role: str, health: str
) -> None:
    up, name = served
    before = _settled_captures(up, name)
    with Load(f"{up.url('gateway')}/models/{name}/invocations") as load:
        old = _crash(up, role)
        _wait_restarted(up, role, old, health)
        restarted = time.monotonic()
        wait_for(lambda: load.successes_after(restarted) >= 20, "traffic after the restart", 60)
    assert load.failures == [], load.failures[:5]
    assert up.service.alive(), "flowline up itself must keep running"
    assert served_version(up.url("gateway"), name) is not None
    if role == "monitor":  # what the gateway captured meanwhile reaches the new monitor
        wait_for(
            lambda: _captures(up, name) - before >= load.ok,
            f"all {load.ok} scored requests to be captured",
            DEADLINE,
        )
        stored = _settled_captures(up, name) - before
        print(f"monitor kill -9: {load.ok} requests scored, {stored} captured")
        assert stored == load.ok


def _captures(up: Up, name: str) -> int:
    """Capture records the monitor stored for ``name`` (its SQLite store, read-only)."""
    with contextlib.closing(
        sqlite3.connect(f"file:{up.home / 'monitor.db'}?mode=ro", uri=True)
    ) as db:
        query = "SELECT count(*) FROM flowline_mon_captured_records WHERE model = ?"
        return db.execute(query, (name,)).fetchone()[0]


def _settled_captures(up: Up, name: str) -> int:
    """The stored capture count once it has not changed for 3 s (the client flushed)."""
    seen = [(-1, time.monotonic())]

    def settled() -> bool:
        count = _captures(up, name)
        if count != seen[-1][0]:
            seen.append((count, time.monotonic()))
        return time.monotonic() - seen[-1][1] >= 3.0

    wait_for(settled, "captures to settle", DEADLINE)
    return seen[-1][0]


def test_a_killed_controller_adopts_its_replicas(served: tuple[Up, str]) -> None:
    up, name = served
    status = f"{up.url('controller')}/status"

    def replica_urls() -> list[str]:
        deployments = requests.get(status, timeout=5).json()["deployments"]
        return [r["url"] for d in deployments if d["model"] == name for r in d["replicas"]]

    before = wait_for(replica_urls, "the controller's view", DEADLINE)
    old = _crash(up, "controller")
    wait_for(lambda: up.pid("controller") != old, "a new controller", DEADLINE)
    wait_for(lambda: _answers(status) and replica_urls(), "the adoption", DEADLINE)
    assert replica_urls() == before


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_killed_gateway_scores_again_within_5_seconds(served: tuple[Up, str]) -> None:
    up, name = served
    with Load(f"{up.url('gateway')}/models/{name}/invocations") as load:
        old = _crash(up, "gateway")
        killed = time.monotonic()
        wait_for(
            lambda: load.failures and load.successes_after(load.failures[-1][0]) >= 5,
            "scoring after the kill",
            DEADLINE,
        )
    # The outage ends with the first success after the last failure (a request answered
    # just before the kill can land just after it).
    last_failure = load.failures[-1][0]
    back = min(t for t in load.successes if t > last_failure)
    outage = back - killed
    print(f"gateway kill -9: scoring back after {outage:.2f}s, {len(load.failures)} failed")
    assert outage <= 5.0, f"scoring came back {outage:.1f}s after the kill"
    assert up.pid("gateway") != old


def test_a_killed_gateway_loses_at_most_a_few_flush_intervals_of_captures(
    served: tuple[Up, str],
) -> None:
    """Item 7: kill -9 loses only what waited in memory, about one flush interval of traffic.

    The bound allows 3 intervals (75 ms) at the rate measured just before the kill,
    for the POST in flight and a delivery thread held back by the busy event loop;
    the old 0.2 s interval lost up to ~200 ms and fails it most of the time.
    Spooled records are redelivered by the restarted gateway: they are not lost.
    """
    up, name = served
    before = _settled_captures(up, name)
    with Load(f"{up.url('gateway')}/models/{name}/invocations") as load:
        first = load.successes[0]
        wait_for(lambda: load.successes[-1] - first >= 3.0, "3 s of steady traffic", DEADLINE)
        old = _crash(up, "gateway")
        killed = time.monotonic()
        rate = (load.successes_after(killed - 2.0) - load.successes_after(killed)) / 2.0
        wait_for(
            lambda: up.pid("gateway") != old and load.successes_after(killed) >= 20,
            "scoring after the kill",
            DEADLINE,
        )
    stored = _settled_captures(up, name) - before
    lost = load.ok - stored
    bound = 3 * DEFAULT_FLUSH_INTERVAL_S * rate
    print(f"gateway kill -9: {load.ok} scored, {stored} captured, {lost} lost "
          f"({lost / rate * 1000:.0f} ms at {rate:.0f} requests/s; bound {bound:.1f})")  # fmt: skip
    assert lost <= bound, f"{lost} captures lost, more than {bound:.1f} (3 flush intervals)"


def test_backoff_doubles_and_is_capped() -> None:
    backoff = Backoff(first=0.5, factor=2.0, cap=30.0)
    assert [backoff.delay(n) for n in (1, 2, 3, 4, 5)] == [0.0, 0.5, 1.0, 2.0, 4.0]
    assert backoff.delay(50) == 30.0


def _group(pgid: int) -> list[int]:
    """Every live process in process group ``pgid`` (the replica and its uvicorn workers)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(") ", 1)[1].split()[2]) == pgid:
                members.append(int(stat.parent.name))
    return members


def test_replicas_inherit_no_platform_secret(served: tuple[Up, str]) -> None:
    up, _ = served
    replica_pids = [json.loads(p.read_text())["pid"] for p in (up.home / "replicas").glob("*.json")]
    assert replica_pids, "no replica is running"
    admin_token = (up.home / "admin-token").read_text().strip()
    secrets = [admin_token, *PLANTED_SECRETS.values()]
    checked = 0
    for pid in replica_pids:
        for member in _group(pid):
            raw = Path(f"/proc/{member}/environ").read_bytes()
            env = dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
            assert not [k for k in env if k.startswith("FLOWLINE_")], sorted(env)
            assert not [k for k in env if k in PLANTED_SECRETS], sorted(env)
            assert not [s for s in secrets if s in raw.decode()]
            assert env["PATH"].split(os.pathsep)[0] == str(BIN)
            checked += 1
    # The leader and its uvicorn worker, which loads the model code.
    assert checked >= 2 * len(replica_pids)


def _signed_delivery(secret: str) -> tuple[bytes, dict[str, str]]:
    body = json.dumps(
        {"entity": "model_version_alias", "action": "created", "timestamp": "now",
         "data": {"name": "nobody", "alias": "production", "version": "1"}}
    ).encode()  # fmt: skip
    delivery, stamp = uuid.uuid4().hex, str(int(time.time()))
    return body, {
        "X-MLflow-Delivery-Id": delivery,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature(secret, delivery, stamp, body),
        "Content-Type": "application/json",
    }


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """The platform in this process, unsupervised, with a 1 s reconcile interval."""
    running = Platform(home=tmp_path, ports=_ports(), reconcile_interval=1.0)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def test_replayed_webhook_is_refused_after_a_controller_restart(platform: Platform) -> None:
    url = f"http://127.0.0.1:{platform.ports.controller}/webhooks/mlflow"
    body, headers = _signed_delivery((platform.home / "webhook-secret").read_text().strip())
    assert requests.post(url, data=body, headers=headers, timeout=5).status_code == 200
    assert requests.post(url, data=body, headers=headers, timeout=5).status_code == 409

    controller = next(p for role, p in platform.processes if role == "controller")
    controller.stop()  # a clean restart; a crash keeps the committed ids just the same
    platform.processes.remove(("controller", controller))
    platform.start_controller()
    replayed = requests.post(url, data=body, headers=headers, timeout=5)
    assert replayed.status_code == 409, replayed.text
    fresh_body, fresh = _signed_delivery((platform.home / "webhook-secret").read_text().strip())
    assert requests.post(url, data=fresh_body, headers=fresh, timeout=5).status_code == 200
    assert (platform.home / "webhook-deliveries.db").stat().st_mode & 0o777 == 0o600


def test_controller_health_is_503_while_no_reconcile_succeeds(platform: Platform) -> None:
    health = f"http://127.0.0.1:{platform.ports.controller}/health"
    assert requests.get(health, timeout=5).status_code == 200
    tracking = next(p for role, p in platform.processes if role == "tracking")
    tracking.stop()
    # (A Response is falsy when it is a 5xx: poll for its body.)
    answer = wait_for(
        lambda: (r := requests.get(health, timeout=5)).status_code == 503 and r.json(),
        "the controller to report unhealthy",
        60,
    )
    # Not before three intervals (1 s each) without a successful pass.
    assert answer["seconds_since_success"] >= 3.0  # rounded to 0.1 s
    assert "no successful reconcile pass" in answer["reason"]

    platform.respawn("tracking").wait_healthy(platform.health_url("tracking"), 120)
    wait_for(
        lambda: requests.get(health, timeout=5).status_code == 200,
        "the controller to be healthy again",
        60,
    )


def test_replica_count_follows_the_model_tag_with_no_failed_request(
    served: tuple[Up, str],
) -> None:
    up, name = served
    client = MlflowClient(up.url("tracking"), up.url("tracking"))
    status = f"{up.url('controller')}/status"

    def replicas() -> list[str]:
        deployments = requests.get(status, timeout=5).json()["deployments"]
        return [
            r["url"] for d in deployments if d["model"] == name for r in d["replicas"] if r["alive"]
        ]

    def routed() -> set[str]:
        models = requests.get(f"{up.url('gateway')}/models", timeout=5).json()["models"]
        return {r["url"] for m in models if m["name"] == name for r in m["replicas"]}

    before = wait_for(replicas, "the served replica", DEADLINE)
    assert len(before) == 1
    with Load(f"{up.url('gateway')}/models/{name}/invocations") as load:
        client.set_registered_model_tag(name, "flowline.replicas", "2")
        scaled = wait_for(lambda: len(replicas()) == 2 and replicas(), "2 replicas", DEADLINE)
        assert before[0] in scaled  # scaled in place: the serving replica stays
        wait_for(lambda: routed() == set(scaled), "the gateway to route to both", DEADLINE)
        grown = time.monotonic()
        wait_for(lambda: load.successes_after(grown) >= 20, "traffic on 2 replicas", 60)
        client.set_registered_model_tag(name, "flowline.replicas", "1")
        wait_for(lambda: len(replicas()) == 1, "1 replica again", DEADLINE)
        assert routed() == set(replicas())
        shrunk = time.monotonic()
        wait_for(lambda: load.successes_after(shrunk) >= 20, "traffic after scaling down", 60)
    assert load.failures == [], load.failures[:5]
    assert replicas()[0] in scaled
    client.delete_registered_model_tag(name, "flowline.replicas")


def test_files_under_the_home_are_private(served: tuple[Up, str]) -> None:
    up, name = served
    # Traffic first, so captures, the monitor's store and every log exist.
    with Load(f"{up.url('gateway')}/models/{name}/invocations"):
        pass
    seen = {"file": 0, "dir": 0}
    loose = []
    for folder, _dirs, files in os.walk(up.home):
        for path, kind in [(folder, "dir"), *((os.path.join(folder, f), "file") for f in files)]:
            with contextlib.suppress(FileNotFoundError):  # a journal can vanish meanwhile
                mode = os.lstat(path).st_mode & 0o777
                seen[kind] += 1
                if mode & 0o077 or (kind == "dir" and mode != 0o700):
                    loose.append(f"{oct(mode)} {path}")
    assert loose == []
    names = {p.name for p in up.home.rglob("*")}
    assert {"mlflow.db", "admin-token", "webhook-secret", "old.log", "gateway.pid"} <= names
    assert seen["file"] > 10 and seen["dir"] > 3, seen


SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"  # no venv: as a shell that never activated it


@pytest.mark.parametrize("tracking_server", ["sqlite"], indirect=True)
def test_venv_mlflow_run_works_without_an_activated_venv(tracking_server, tmp_path) -> None:
    name = f"novenv-{uuid.uuid4().hex[:6]}"
    env = {
        "PATH": SYSTEM_PATH, "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": tracking_server.url,
    }  # fmt: skip
    argv = [str(BIN / "mlflow"), "run", str(REPO), "-e", "main", "--env-manager", "local"]
    argv += ["-P", "max_evals=1", "-P", f"registered_model={name}"]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(tracking_server.url)
    assert client.get_latest_versions(name), "no version registered"
    run_id = client.get_latest_versions(name)[0].run_id
    assert client.get_run(run_id).info.status == "FINISHED"


def test_the_launcher_says_what_to_do_when_no_python_has_mlflow(tmp_path: Path) -> None:
    # Started from a process that is not `mlflow run`, with no venv on PATH.
    done = subprocess.run(
        ["bash", str(REPO / "projects" / "python.sh"), "-c", "print('ran')"],
        env={"PATH": SYSTEM_PATH}, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "ran" not in done.stdout
    assert done.stderr.count("\n") == 1 and "activate the venv" in done.stderr


def test_binding_beyond_loopback_without_auth_is_refused(tmp_path: Path) -> None:
    for command in ("up", "server"):
        done = subprocess.run(
            [str(BIN / "flowline"), command, "--host", "0.0.0.0", "--port", "1"],
            env=subprocess_env(FLOWLINE_HOME=str(tmp_path)), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "--auth" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr + done.stdout


def test_with_auth_a_read_user_cannot_promote_and_the_platform_serves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with flowline_up(tmp_path, "--auth") as up:
        tracking = up.url("tracking")
        secret_file = up.home / "auth-admin-password"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        admin = ("admin", secret_file.read_text().strip())
        assert _text(up.log).count(admin[1]) == 1  # printed once, at creation
        api = f"{tracking}/api/2.0/mlflow"
        anonymous = requests.get(f"{api}/registered-models/search", timeout=10)
        assert anonymous.status_code == 401

        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin[0])
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin[1])
        name = f"guarded-{uuid.uuid4().hex[:6]}"
        version = register_model(tracking, name)
        reader = ("reader", "reader-password-1234")
        made = requests.post(
            f"{api}/users/create",
            json={"username": reader[0], "password": reader[1]},
            auth=admin,
            timeout=10,
        )
        assert made.status_code == 200, made.text
        granted = requests.post(
            f"{tracking}/api/3.0/mlflow/users/permissions/grant",
            json={
                "username": reader[0], "resource_type": "registered_model",
                "resource_id": name, "permission": "READ",
            },
            auth=admin,
            timeout=10,
        )  # fmt: skip
        assert granted.status_code == 200, granted.text
        promote_body = {"name": name, "alias": "production", "version": version}
        # What the registry UI's "Add alias" sends.
        refused = requests.post(
            f"{api}/registered-models/alias", json=promote_body, auth=reader, timeout=10
        )
        assert refused.status_code == 403, refused.text
        assert requests.get(
            f"{api}/registered-models/get", params={"name": name}, auth=reader, timeout=10
        ).json()["registered_model"].get("aliases") in (None, [])

        # The admin may; the controller, on its own credentials, deploys it.
        allowed = requests.post(
            f"{api}/registered-models/alias", json=promote_body, auth=admin, timeout=10
        )
        assert allowed.status_code == 200, allowed.text
        wait_for(
            lambda: served_version(up.url("gateway"), name) == version, "the deployment", DEADLINE
        )
        answer = requests.post(
            f"{up.url('gateway')}/models/{name}/invocations", json=BODY, timeout=30
        )
        assert answer.status_code == 200, answer.text
        service_password = (up.home / "auth-service-password").read_text().strip()
        for record in (up.home / "replicas").glob("*.json"):
            for member in _group(json.loads(record.read_text())["pid"]):
                environ = Path(f"/proc/{member}/environ").read_bytes().decode()
                assert service_password not in environ and admin[1] not in environ


def test_a_controller_beyond_loopback_without_auth_is_refused() -> None:
    done = subprocess.run(
        [str(BIN / "python"), "-m", "serving.controller", "--host", "0.0.0.0", "--port", "1"],
        env=subprocess_env(MLFLOW_TRACKING_URI="http://127.0.0.1:1", FLOWLINE_AUTH=""),
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().count("\n") == 0 and "only with auth" in done.stderr


def test_a_gateway_beyond_loopback_without_api_keys_warns_loudly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    from flowline.cli import _warn_open_gateway

    monkeypatch.delenv("FLOWLINE_API_KEYS", raising=False)
    monkeypatch.delenv("FLOWLINE_API_KEYS_FILE", raising=False)
    _warn_open_gateway(argparse.Namespace(host="0.0.0.0"))
    assert "WARNING" in capsys.readouterr().out
    monkeypatch.setenv("FLOWLINE_API_KEYS", "a-key")
    _warn_open_gateway(argparse.Namespace(host="0.0.0.0"))
    _warn_open_gateway(argparse.Namespace(host="127.0.0.1"))
    assert capsys.readouterr().out == ""
