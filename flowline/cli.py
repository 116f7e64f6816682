"""The ``flowline`` command: the platform's entry points."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd
import requests

from common.processes import port_in_use, venv_bin, venv_first_path
from common.registry import (
    DEMO_MODEL,
    GATE_OVERRIDE_TAG,
    GATE_REASON_TAG,
    GATE_TAG,
    PRODUCTION_ALIAS,
    gate_blocks,
)
from common.settings import SettingsError
from common.tls import LocalPki, TlsSettings, client_tls, generate_local_pki
from flowline.auth import ADMIN_USER, Auth, is_loopback
from flowline.config import PlatformSettings, Ports, home, make_private
from flowline.platform import Platform
from flowline.supervisor import Supervisor
from flowline.tracking import TrackingServer
from serving.backends.base import BackendError
from serving.backends.factory import BACKENDS
from serving.served import served_models, wait_until_served

PROJECT_DIR = Path(__file__).resolve().parent.parent
TLS_DIR = "tls"  # under FLOWLINE_HOME: the local CA and certificate of `flowline up --tls`
WILDCARD_HOSTS = ("0.0.0.0", "::")


def _say(line: str) -> None:
    print(f"[flowline] {line}", flush=True)


def _tracking_server(args: argparse.Namespace) -> TrackingServer:
    return TrackingServer(
        home=home(),
        host=args.host,
        port=args.port,
        backend_store_uri=args.backend_store_uri,
        artifacts_destination=args.artifacts_destination,
        workers=args.workers,
        auth=args.auth,
    )


def _exposure_refused(args: argparse.Namespace) -> bool:
    """Refuse (one line) to bind the registry or controller beyond loopback without auth."""
    if is_loopback(args.host) or args.auth:
        return False
    print(
        f"flowline: error: --host {args.host} exposes the tracking server and the controller "
        "beyond this machine without a password; add --auth (or bind 127.0.0.1)",
        file=sys.stderr,
    )
    return True


def _announce_auth(args: argparse.Namespace) -> None:
    if not args.auth:
        return
    password, created = Auth(home()).admin_password()
    if created:  # printed once: afterwards it is only in the 0600 file
        _say(f"MLflow user '{ADMIN_USER}' password (shown once): {password}")
    _say(f"basic auth on: users and passwords in {home()} (auth-admin-password, 0600)")


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def cmd_server(args: argparse.Namespace) -> int:
    """Run the tracking server in the foreground until Ctrl-C."""
    if _exposure_refused(args):
        return 2
    make_private(home())
    _announce_auth(args)
    server = _tracking_server(args)
    if port_in_use(server.port, server.host):
        _say(f"port {server.port} is already in use; choose another with --port")
        return 2
    _say(f"starting MLflow tracking server on {server.backend_uri()}")
    try:
        process = server.start()
    except (RuntimeError, TimeoutError) as exc:
        _say(f"tracking server failed to start: {exc}")
        return 1
    _say(f"tracking server and UI: {server.url}  (export MLFLOW_TRACKING_URI={server.url})")
    _say("press Ctrl-C to stop")
    try:
        _wait_for_interrupt()
    finally:
        process.stop()
        _say("stopped")
    return 0


def show_version(url: str, name: str) -> None:
    """Print the newest version of ``name`` with its tags and where to see it in the UI."""
    response = requests.get(
        f"{url}/api/2.0/mlflow/registered-models/get-latest-versions",
        params={"name": name},
        timeout=10,
    )
    response.raise_for_status()
    versions = sorted(response.json().get("model_versions", []), key=lambda v: int(v["version"]))
    if not versions:
        _say(f"no version of {name} is registered")
        return
    latest = versions[-1]
    _say(f"registered model {name} version {latest['version']} (source {latest['source']})")
    for tag in latest.get("tags", []):
        _say(f"  {tag['key']} = {tag['value']}")
    _say(f"see it in the UI: {url}/#/models/{name}/versions/{latest['version']}")


def _certificate_hosts(host: str) -> list[str]:
    """Names the local certificate needs beyond loopback: the bound host, and for a
    wildcard bind also this machine's names (what clients elsewhere connect to)."""
    if is_loopback(host):
        return []
    # The wildcard address itself too: the platform's own calls go to --host.
    if host in WILDCARD_HOSTS:
        return list(dict.fromkeys([host, socket.gethostname(), socket.getfqdn()]))
    return [host]


def _tls_settings(args: argparse.Namespace, create: bool) -> TlsSettings:
    """--tls/--mtls: the local PKI under FLOWLINE_HOME/tls (made when ``create``);
    without them, FLOWLINE_TLS_* as set (usually: TLS off)."""
    if not (getattr(args, "tls", False) or getattr(args, "mtls", False)):
        return TlsSettings.from_env()
    directory = home() / TLS_DIR
    if create:
        try:
            pki = generate_local_pki(directory, _certificate_hosts(args.host))
        except OSError as exc:
            raise SettingsError(f"cannot write the local CA in {directory}: {exc}") from None
    else:
        pki = LocalPki.at(directory)
        if not pki.exists():
            raise SettingsError(f"no local CA in {directory}: start with `flowline up --tls`")
    return pki.settings(mutual=args.mtls)


def _platform(args: argparse.Namespace, create_pki: bool = False) -> Platform:
    ports = Ports(
        tracking=args.port,
        gateway=args.gateway_port,
        controller=args.controller_port,
        monitor=args.monitor_port,
        replicas_from=args.replica_port_from,
    )
    try:
        return _new_platform(args, ports, create_pki)
    except ValueError as exc:  # a bad topology (--monitors 2 without PostgreSQL, say)
        raise SettingsError(str(exc)) from None


def _new_platform(args: argparse.Namespace, ports: Ports, create_pki: bool) -> Platform:
    return Platform(
        home=home(),
        ports=ports,
        host=args.host,
        backend_store_uri=args.backend_store_uri,
        replicas=args.replicas,
        auth=args.auth,
        backend=args.backend,
        tls=_tls_settings(args, create_pki),
        gateways=args.gateways,
        controllers=args.controllers,
        monitors=args.monitors,
    )


def _announce_tls(tls: TlsSettings, gateway: str) -> None:
    """How to reach the https roles: which CA to trust and, under mTLS, which certificate."""
    if not tls.enabled:
        return
    mode = "mutual TLS (client certificates required)" if tls.mutual else "TLS"
    _say(f"{mode} on the gateway, controller and monitor; tracking server and replicas: HTTP")
    curl = ["curl"]
    if tls.tls_ca is not None:
        curl += ["--cacert", str(tls.tls_ca)]
        _say(f"trust the CA {tls.tls_ca}:")
        _say(f"  export REQUESTS_CA_BUNDLE={tls.tls_ca}   (requests, MLflow's clients)")
        _say(f"  python: ssl.create_default_context(cafile={str(tls.tls_ca)!r})")
    if tls.mutual:
        curl += ["--cert", str(tls.tls_cert), "--key", str(tls.tls_key)]
        _say(f"  client certificate (requests): cert=({str(tls.tls_cert)!r}, {str(tls.tls_key)!r})")
    _say("  $ " + shlex.join([*curl, f"{gateway}/ping"]))


def _start_platform(platform: Platform) -> bool:
    busy = platform.busy_ports()
    if busy:
        _say(
            f"port(s) {', '.join(map(str, busy))} already in use: is flowline already up? "
            "(`flowline status`); choose other ports with --port/--gateway-port/--controller-port"
        )
        return False
    _say(f"starting flowline (home {platform.home})")
    make_private(platform.home)  # and the umask, for what this process writes too
    try:
        platform.start()
    except (RuntimeError, TimeoutError) as exc:
        _say(f"could not start: {exc}")
        return False
    for name, url in platform.urls().items():
        _say(f"{name:<28} {url}")
    _announce_tls(platform.tls, platform.urls()["gateway (POST /invocations)"])
    return True


def _supervise(platform: Platform) -> int:
    """Restart any role that exits (with backoff) until Ctrl-C or SIGTERM; then stop all."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    _say("press Ctrl-C to stop")
    try:
        Supervisor(platform, _say, tls=platform.tls).run(stop)
    finally:  # whatever ends supervision, nothing may be left running
        _say("stopping")
        platform.stop()
        _say("stopped")
    return 0


def _warn_open_gateway(args: argparse.Namespace) -> None:
    if is_loopback(args.host):
        return
    if not PlatformSettings.from_env().has_api_keys:
        _say("!" * 78)
        _say(f"WARNING: the gateway listens on {args.host} with NO API KEYS: anyone who can")
        _say("reach it can score. Set FLOWLINE_API_KEYS or FLOWLINE_API_KEYS_FILE.")
        _say("!" * 78)


def _docker_ready(args: argparse.Namespace) -> bool:
    """With ``--backend docker``: the daemon answers and the base image is there."""
    if args.backend != "docker":
        return True
    from serving.backends.docker import docker_client
    from serving.images.builder import base_image

    try:
        client = docker_client()
    except BackendError as exc:
        _say(f"error: {exc}")
        return False
    if not client.images.list(name=base_image()):
        _say(
            f"error: base image {base_image()!r} is not on the Docker daemon: pull it, or run "
            "`flowline image base` and set FLOWLINE_BASE_IMAGE=flowline-base:bookworm"
        )
        return False
    return True


def cmd_up(args: argparse.Namespace) -> int:
    """Start the whole platform and supervise it until Ctrl-C."""
    if _exposure_refused(args) or not _docker_ready(args):
        return 2
    _warn_open_gateway(args)
    make_private(home())
    _announce_auth(args)
    platform = _platform(args, create_pki=True)
    if not _start_platform(platform):
        return 1
    return _supervise(platform)


def cmd_status(args: argparse.Namespace) -> int:
    """Print what the controller and gateway report."""
    platform = _platform(args)
    verify, cert = client_tls(platform.tls)
    try:
        status = requests.get(
            f"{platform.urls()['controller (GET /status)']}/status",
            timeout=5,
            verify=verify,
            cert=cert,
        ).json()
    except requests.RequestException:
        _say("the controller does not answer: is flowline up?")
        return 1
    print(json.dumps(status, indent=2))
    return 0


def _wait_until_served(gateway: str, name: str, version: str, timeout: float = 180) -> float:
    """Seconds until the gateway serves ``name`` ``version``; TimeoutError after ``timeout``."""
    started = time.monotonic()
    try:
        # The platform is just up: a gateway that does not answer yet is "not yet".
        wait_until_served(
            lambda: served_models(gateway, timeout=5),
            name,
            version,
            timeout,
            interval=0.25,
            retry_on=(requests.RequestException, ValueError, KeyError),
        )
    except TimeoutError:
        raise TimeoutError(
            f"{name} version {version} was not deployed within {timeout:.0f}s"
        ) from None
    return time.monotonic() - started


def _curl(url: str, body_file: Path) -> None:
    argv = [
        "curl",
        "-s",
        "-X",
        "POST",
        url,
        "-H",
        "Content-Type: application/json",
        "-d",
        f"@{body_file}",
    ]
    _say("$ " + " ".join(shlex.quote(a) for a in argv))
    if shutil.which("curl"):
        subprocess.run(argv + ["-i"], check=False)
    else:
        response = requests.post(
            url,
            data=body_file.read_bytes(),
            headers={"Content-Type": "application/json"},
            timeout=30,
        )
        print(response.status_code, response.text)
    print(flush=True)


def _send_rows(url: str, frame: pd.DataFrame, rows_per_request: int = 50) -> list[str]:
    """Score the rows in requests of ``rows_per_request``; each row's id for feedback."""
    row_ids = []
    for start in range(0, len(frame), rows_per_request):
        split = json.loads(
            frame.iloc[start : start + rows_per_request].to_json(orient="split", index=False)
        )
        answer = requests.post(url, json={"dataframe_split": split}, timeout=30)
        answer.raise_for_status()
        request_id = answer.headers["x-flowline-request-id"]
        row_ids += [f"{request_id}:{i}" for i in range(len(split["data"]))]
    return row_ids


def demo_feedback(monitor: str, name: str, row_ids: list[str], labels: list) -> None:
    """Send the true labels of scored rows and show realized beside estimated accuracy."""
    from monitoring.service.feedback import feedback_token

    body = [{"request_id": r, "label": y} for r, y in zip(row_ids, labels, strict=True)]
    headers = {"Authorization": f"Bearer {feedback_token(home())}"}
    answer = requests.post(f"{monitor}/feedback/{name}", json=body, headers=headers, timeout=60)
    _say(
        f"$ curl -X POST {monitor}/feedback/{name} -H 'Authorization: Bearer <feedback-token>' "
        f'-d \'[{{"request_id": "{row_ids[0]}", "label": ...}}, ...]\'  '
        f"({len(body)} labels) -> {answer.status_code} {answer.text}"
    )
    view = requests.get(f"{monitor}/performance/{name}", timeout=30).json()
    version = max(view["versions"], key=lambda v: v["labelled_rows"])
    window = next((w for w in version["windows"] if w["labelled_rows"]), None)
    if window is None:
        return
    estimated = (window.get("estimated") or {}).get("accuracy")
    _say(
        f"window {window['window_index']}: realized accuracy "
        f"{window['realized'].get('accuracy', float('nan')):.3f} on {window['labelled_rows']} "
        "labelled rows; estimated without labels (CBPE) "
        + (f"{estimated:.3f}" if estimated is not None else "n/a")
        + f"; test split {(version.get('test') or {}).get('accuracy', float('nan')):.3f}"
    )
    _say(f"performance per window (JSON): {monitor}/performance/{name}")


def _next_window(monitor: str, name: str, seen: int, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = requests.get(f"{monitor}/drift/{name}", timeout=5)
        if answer.status_code == 200:
            windows = answer.json()["windows"]
            if len(windows) > seen:
                return windows[0]
        time.sleep(0.5)
    raise TimeoutError(f"no drift window for {name} within {timeout:.0f}s")


def demo_drift(platform: Platform, name: str) -> None:
    """Send training-like traffic, then shifted traffic, and show what the monitor says."""
    from pipelines.data import DEMO_DATA, DEMO_TARGET

    gateway = platform.urls()["gateway (POST /invocations)"]
    monitor = platform.urls()["drift monitor (GET /drift)"]
    window = PlatformSettings.from_env().window_rows
    data = pd.read_csv(DEMO_DATA)
    rows = data.drop(columns=[DEMO_TARGET])
    answer = requests.get(f"{monitor}/drift/{name}", timeout=5)
    seen = len(answer.json()["windows"]) if answer.status_code == 200 else 0
    calm_rows = data.sample(window, random_state=1, replace=len(data) < window)
    calm = calm_rows.drop(columns=[DEMO_TARGET])
    calm_ids = _send_rows(f"{gateway}/invocations", calm)
    verdict = _next_window(monitor, name, seen)
    _say(f"{window} rows like the training data: drifted={verdict['drifted']}")
    shifted = rows.sample(window, random_state=2, replace=len(rows) < window)
    # Longer-tenured customers on monthly contracts: a market the model never saw.
    shifted = shifted.assign(tenure_months=shifted["tenure_months"] + 24, contract="month-to-month")
    _send_rows(f"{gateway}/invocations", shifted)
    verdict = _next_window(monitor, name, seen + 1)
    _say(
        f"{window} shifted rows: drifted={verdict['drifted']}, "
        f"drifted features: {', '.join(verdict['drifted_features']) or 'none'}"
    )
    _say(f"report: {verdict['report_url']}")
    _say(f"drift history (JSON): {monitor}/drift/{name}; Prometheus: {monitor}/metrics")
    _say(
        f"in the MLflow UI ({platform.tracking.url}): experiment 'flowline-monitoring', "
        f"run 'monitor-{name}-v{verdict['version']}': its metrics chart drift per window, "
        "and reports/ holds each window's HTML report"
    )
    _say("the true labels of the training-like rows arrive: POST /feedback")
    demo_feedback(monitor, name, calm_ids, calm_rows[DEMO_TARGET].tolist())


def cmd_demo(args: argparse.Namespace) -> int:
    """The full lifecycle: up, train and register, promote, score, show the deployment."""
    from mlflow import MlflowClient

    if _exposure_refused(args):
        return 2
    make_private(home())
    _announce_auth(args)
    if args.auth:  # this process registers and promotes: as flowline's service user
        os.environ.update(Auth(home()).service_env())
    platform = _platform(args)
    if not _start_platform(platform):
        return 1
    try:
        tracking = platform.tracking.url
        gateway = platform.urls()["gateway (POST /invocations)"]
        env = dict(os.environ, MLFLOW_TRACKING_URI=tracking)
        env["PATH"] = venv_first_path(env.get("PATH", ""))
        run = _mlflow_run_argv(
            {"family": args.family, "max_evals": str(args.max_evals)}, DEMO_MODEL
        )
        _say("1/5 tune and register: $ " + " ".join(run[1:]))
        if subprocess.run(run, env=env, cwd=PROJECT_DIR).returncode != 0:
            _say("training failed; see the messages above")
            platform.stop()
            return 1
        client = MlflowClient(tracking, tracking)
        latest = max(
            client.search_model_versions("name='flowline-demo'"), key=lambda v: int(v.version)
        )
        show_version(tracking, DEMO_MODEL)
        gate = latest.tags.get(GATE_TAG)
        _say(f"champion/challenger gate: {gate} ({latest.tags.get(GATE_REASON_TAG, '')})")
        if gate_blocks(latest.tags):
            # A re-run on the same home can train a worse version than the one serving;
            # the demo lets it through the way a person would in the registry UI.
            _say(f"the demo sets {GATE_OVERRIDE_TAG}=true on it, as a person would in the UI")
            client.set_model_version_tag(DEMO_MODEL, latest.version, GATE_OVERRIDE_TAG, "true")
        _say(
            f"2/5 promote: alias 'production' -> version {latest.version} "
            "(what 'Add alias' in the registry UI does)"
        )
        client.set_registered_model_alias(DEMO_MODEL, PRODUCTION_ALIAS, latest.version)
        seconds = _wait_until_served(gateway, DEMO_MODEL, latest.version)
        _say(f"version {latest.version} is serving on the gateway {seconds:.1f}s after promotion")
        example = Path(
            mlflow_artifacts_download(
                tracking, f"models:/flowline-demo/{latest.version}/serving_input_example.json"
            )
        )
        _say("3/5 score it:")
        _curl(f"{gateway}/invocations", example)
        _say("4/5 the deployment:")
        print(json.dumps(requests.get(f"{gateway}/models", timeout=5).json(), indent=2), flush=True)
        tags = client.get_model_version(DEMO_MODEL, latest.version).tags
        _say(f"flowline.deployment.status = {tags.get('flowline.deployment.status')}")
        _say("5/5 monitor: training-like traffic, then shifted traffic, through the gateway")
        demo_drift(platform, DEMO_MODEL)
        for name, url in platform.urls().items():
            _say(f"{name:<28} {url}")
        if args.exit:
            platform.stop()
            return 0
    except BaseException:
        platform.stop()
        raise
    return _supervise(platform)


def mlflow_artifacts_download(tracking: str, uri: str) -> str:
    """Download one artifact of a model version from ``tracking`` to a temporary folder."""
    import mlflow

    mlflow.set_tracking_uri(tracking)
    return mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tempfile.mkdtemp())


def _mlflow_run_argv(
    params: dict[str, str], experiment: str | None = None, entry: str = "main"
) -> list[str]:
    argv = [os.path.join(venv_bin(), "mlflow"), "run", str(PROJECT_DIR)]
    argv += ["-e", entry, "--env-manager", "local"]
    if experiment:
        argv += ["--experiment-name", experiment]
    for key, value in params.items():
        argv += ["-P", f"{key}={value}"]
    return argv


def _checked_mlflow_run(args: argparse.Namespace, entry: str) -> int:
    """Check an entry point's parameters (and the server) in a second, then `mlflow run` it."""
    from pipelines.errors import UserError
    from pipelines.train import check_tracking_server

    params = dict(pair.split("=", 1) for pair in args.param if "=" in pair)
    bad = [pair for pair in args.param if "=" not in pair]
    if bad:
        print(
            f"flowline: error: parameters must look like -P key=value, got {bad[0]!r}",
            file=sys.stderr,
        )
        return 2
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in params.items()]
    import mlflow

    try:
        if entry == "main":
            from pipelines.train import preflight
            from projects.train import parse_args as parse_train

            preflight(parse_train(argv))
        else:
            from pipelines.batch_score import validate
            from projects.score import parse_args as parse_score

            validate(parse_score(argv))
        check_tracking_server(mlflow.get_tracking_uri())
    except SystemExit as exc:  # argparse has printed its one line
        return int(exc.code or 2)
    except UserError as exc:
        print(f"flowline: error: {exc}", file=sys.stderr)
        return 2
    env = dict(os.environ, PATH=venv_first_path(os.environ.get("PATH", "")))
    return subprocess.run(_mlflow_run_argv(params, args.experiment_name, entry), env=env).returncode


def cmd_train(args: argparse.Namespace) -> int:
    """Check the parameters, data and server in one second, then hand over to `mlflow run`."""
    return _checked_mlflow_run(args, "main")


def cmd_score(args: argparse.Namespace) -> int:
    """Check the model URI, paths and server, then `mlflow run -e score` (batch scoring)."""
    return _checked_mlflow_run(args, "score")


def cmd_k8s_render(args: argparse.Namespace) -> int:
    """Write the Kustomize base of the whole platform (docs/kubernetes.md)."""
    from flowline import k8s

    options = k8s.RenderOptions(
        image=args.image,
        namespace=args.namespace,
        database_url=args.database_url,
        monitor_database_url=args.monitor_database_url,
        artifacts=args.artifacts,
        gateways=args.gateways,
        max_gateways=args.max_gateways,
        controllers=args.controllers,
        monitors=args.monitors,
    )
    try:
        written = k8s.render(Path(args.out), options)
    except (ValueError, OSError) as exc:
        print(f"flowline: error: {exc}", file=sys.stderr)
        return 2
    _say(f"wrote {len(written)} files to {args.out}; apply with: kubectl apply -k {args.out}")
    _say(f"the tokens are in {args.out}/secret.yaml (mode 0600): keep it out of version control")
    return 0


def cmd_image_base(args: argparse.Namespace) -> int:
    """Make the offline base image with debootstrap, unless the daemon already has it."""
    from serving.images.base import BaseImageError, ensure_base_image

    try:
        image_id, built = ensure_base_image(args.name)
    except (BaseImageError, BackendError) as exc:
        _say(f"error: {exc}")
        return 1
    _say(f"{'built' if built else 'found'} {args.name} ({image_id[:19]})")
    _say(f"use it with: export FLOWLINE_BASE_IMAGE={args.name}")
    return 0


def cmd_image_build(args: argparse.Namespace) -> int:
    """Build (or find) the serving image of one registry version and print its tag."""
    from serving.backends.docker import build_image

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or TrackingServer(home()).url
    try:
        built = build_image(args.model_uri, tracking_uri, home())
    except BackendError as exc:
        _say(f"error: {exc}")
        return 1
    _say(f"{'built' if built.built else 'cached'} {built.tag} in {built.seconds:.1f} s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="flowline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    settings = PlatformSettings.from_env()

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=Ports().tracking)
        sub.add_argument(
            "--backend-store-uri",
            default=settings.backend_store_uri,
            help="SQLAlchemy URI, e.g. postgresql://user@host/db (default: SQLite in the home)",
        )
        sub.add_argument(
            "--artifacts-destination",
            default=settings.artifacts_destination,
            help="artifact store location (default: <home>/artifacts)",
        )
        sub.add_argument("--workers", type=int, default=2, help="tracking server workers")
        sub.add_argument(
            "--auth",
            action="store_true",
            default=settings.auth_on,
            help="MLflow basic auth on the tracking server (needed to bind beyond loopback)",
        )

    server = commands.add_parser("server", help="run the MLflow tracking server and registry")
    server_options(server)
    server.set_defaults(func=cmd_server)

    train = commands.add_parser(
        "train",
        help="check inputs, then `mlflow run` the tuning project against MLFLOW_TRACKING_URI",
    )
    train.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE")
    train.add_argument("--experiment-name", default=None)
    train.set_defaults(func=cmd_train)
    score = commands.add_parser(
        "score",
        help="check inputs, then `mlflow run -e score`: batch-score a table with a registered "
        "model (-P model=models:/name@production -P input=... -P output=...)",
    )
    score.add_argument("-P", "--param", action="append", default=[], metavar="KEY=VALUE")
    score.add_argument("--experiment-name", default=None)
    score.set_defaults(func=cmd_score)

    def platform_options(sub: argparse.ArgumentParser) -> None:
        server_options(sub)
        defaults = Ports()
        sub.add_argument("--gateway-port", type=int, default=defaults.gateway)
        sub.add_argument("--controller-port", type=int, default=defaults.controller)
        sub.add_argument("--monitor-port", type=int, default=defaults.monitor)
        sub.add_argument("--replica-port-from", type=int, default=defaults.replicas_from)
        sub.add_argument(
            "--replicas",
            type=int,
            default=settings.replicas,
            help="scoring replicas per deployed version",
        )
        sub.add_argument(
            "--backend",
            choices=BACKENDS,
            default=settings.backend,
            help="where replicas run: local processes, or docker containers",
        )
        for role, what in (
            ("gateways", "gateway processes (ports --gateway-port, +10, +20, ...)"),
            ("controllers", "controllers: one leads, the others take over if it dies"),
            ("monitors", "drift monitors sharing one PostgreSQL store (FLOWLINE_MONITOR_DB)"),
        ):
            sub.add_argument(f"--{role}", type=int, default=1, metavar="N", help=what)

    image = commands.add_parser("image", help="container images for the docker backend")
    images = image.add_subparsers(dest="image_command", required=True)
    base = images.add_parser("base", help="make the offline Debian base image (debootstrap)")
    base.add_argument("--name", default="flowline-base:bookworm")
    base.set_defaults(func=cmd_image_base)
    build = images.add_parser("build", help="build the serving image of a registry version")
    build.add_argument("model_uri", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    build.set_defaults(func=cmd_image_build)

    k8s = commands.add_parser("k8s", help="Kubernetes manifests for the whole platform")
    k8s_commands = k8s.add_subparsers(dest="k8s_command", required=True)
    render = k8s_commands.add_parser("render", help="write a Kustomize base (docs/kubernetes.md)")
    render.add_argument("--out", required=True, help="folder to write (created 0700)")
    render.add_argument("--image", default="flowline:latest", help="the flowline image")
    render.add_argument("--namespace", default="flowline")
    render.add_argument(
        "--database-url",
        default="postgresql://flowline@postgres:5432/mlflow",
        help="the tracking server's PostgreSQL (stored in the Secret)",
    )
    render.add_argument(
        "--monitor-database-url",
        default="postgresql://flowline@postgres:5432/flowline_monitor",
        help="the monitor's store (stored in the Secret)",
    )
    render.add_argument(
        "--artifacts", default="pvc", help="'pvc' (a PersistentVolumeClaim) or an s3:// URI"
    )
    render.add_argument("--gateways", type=int, default=2, help="gateway pods (HPA minimum)")
    render.add_argument("--max-gateways", type=int, default=6, help="the HPA's maximum")
    render.add_argument("--controllers", type=int, default=2, help="one leads (a Lease)")
    render.add_argument(
        "--monitors", type=int, default=1, help="monitor pods (they share the monitor store)"
    )
    render.set_defaults(func=cmd_k8s_render)

    def tls_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument(
            "--tls",
            action="store_true",
            help="HTTPS on the gateway, controller and monitor, with a local CA made in "
            "FLOWLINE_HOME/tls (docs/tls.md)",
        )
        sub.add_argument(
            "--mtls",
            action="store_true",
            help="--tls, and clients must present a certificate signed by that CA",
        )

    up = commands.add_parser("up", help="start the whole platform (Ctrl-C stops it)")
    platform_options(up)
    tls_options(up)
    up.set_defaults(func=cmd_up)

    status = commands.add_parser("status", help="show deployments and errors")
    platform_options(status)
    tls_options(status)
    status.set_defaults(func=cmd_status)

    demo = commands.add_parser(
        "demo", help="the full lifecycle: up, train, promote, score, show the deployment"
    )
    platform_options(demo)
    demo.add_argument("--family", default="sklearn", choices=("sklearn", "keras"))
    demo.add_argument("--max-evals", type=int, default=20)
    demo.add_argument("--exit", action="store_true", help="stop the server when done")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flowline`` console command."""
    try:
        # The parser's defaults come from FLOWLINE_* variables: a bad one stops here.
        args = build_parser().parse_args(argv)
        return args.func(args)
    except SettingsError as exc:
        print(f"flowline: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
