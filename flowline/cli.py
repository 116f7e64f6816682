"""The ``flowline`` command: the platform's entry points."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import requests

from flowline.config import Ports, home
from flowline.tracking import TrackingServer
from serving.processes import port_in_use

PROJECT_DIR = Path(__file__).resolve().parent.parent


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
    )


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def cmd_server(args: argparse.Namespace) -> int:
    """Run the tracking server in the foreground until Ctrl-C."""
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


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a tracking server, run the tuning project, show the registered version."""
    server = _tracking_server(args)
    process = None
    if port_in_use(server.port, server.host):
        _say(f"using the tracking server already listening at {server.url}")
    else:
        _say(f"starting MLflow tracking server on {server.backend_uri()}")
        process = server.start()
    try:
        _say(f"tracking server and UI: {server.url}")
        env = dict(os.environ, MLFLOW_TRACKING_URI=server.url)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        run = _mlflow_run_argv(
            {"family": args.family, "max_evals": str(args.max_evals)}, "flowline-demo"
        )
        _say("$ " + " ".join(run[1:]))
        if subprocess.run(run, env=env, cwd=PROJECT_DIR).returncode != 0:
            _say("training failed; see the messages above")
            return 1
        show_version(server.url, "flowline-demo")
        if process is not None and not args.exit:
            _say("the tracking server keeps running; press Ctrl-C to stop it")
            _wait_for_interrupt()
    finally:
        if process is not None:
            process.stop()
    return 0


def _mlflow_run_argv(params: dict[str, str], experiment: str | None = None) -> list[str]:
    argv = [os.path.join(os.path.dirname(sys.executable), "mlflow"), "run", str(PROJECT_DIR)]
    argv += ["-e", "main", "--env-manager", "local"]
    if experiment:
        argv += ["--experiment-name", experiment]
    for key, value in params.items():
        argv += ["-P", f"{key}={value}"]
    return argv


def cmd_train(args: argparse.Namespace) -> int:
    """Check the parameters, data and server in one second, then hand over to `mlflow run`."""
    from pipelines.errors import UserError
    from pipelines.train import check_tracking_server, preflight
    from projects.train import parse_args

    params = dict(pair.split("=", 1) for pair in args.param if "=" in pair)
    bad = [pair for pair in args.param if "=" not in pair]
    if bad:
        print(
            f"flowline: error: parameters must look like -P key=value, got {bad[0]!r}",
            file=sys.stderr,
        )
        return 2
    try:
        config = parse_args([f"--{k.replace('_', '-')}={v}" for k, v in params.items()])
    except SystemExit as exc:
        return int(exc.code or 2)
    import mlflow

    try:
        preflight(config)
        check_tracking_server(mlflow.get_tracking_uri())
    except UserError as exc:
        print(f"flowline: error: {exc}", file=sys.stderr)
        return 2
    env = dict(
        os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    )
    return subprocess.run(_mlflow_run_argv(params, args.experiment_name), env=env).returncode


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(prog="flowline", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=Ports().tracking)
        sub.add_argument(
            "--backend-store-uri",
            default=os.environ.get("FLOWLINE_BACKEND_STORE_URI", ""),
            help="SQLAlchemy URI, e.g. postgresql://user@host/db (default: SQLite in the home)",
        )
        sub.add_argument(
            "--artifacts-destination",
            default=os.environ.get("FLOWLINE_ARTIFACTS_DESTINATION", ""),
            help="artifact store location (default: <home>/artifacts)",
        )
        sub.add_argument("--workers", type=int, default=2, help="tracking server workers")

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

    demo = commands.add_parser("demo", help="train and register the demo model end to end")
    server_options(demo)
    demo.add_argument("--family", default="sklearn", choices=("sklearn", "keras"))
    demo.add_argument("--max-evals", type=int, default=20)
    demo.add_argument("--exit", action="store_true", help="stop the server when done")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``flowline`` console command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
