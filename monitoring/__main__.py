"""`python -m monitoring`: run the drift monitor (settings from FLOWLINE_* variables)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import NoReturn

from monitoring.service.settings import DEFAULT_HOST, MonitorSettings, port_from_env


def _fail(exc: Exception) -> NoReturn:
    """One line on stderr and exit status 2: the monitor did not start."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    print(f"flowline: error: the monitor cannot start: {first_line}", file=sys.stderr)
    raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(prog="python -m monitoring", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument(
        "--port", type=int, help="default $FLOWLINE_MONITOR_PORT or 8082; 0 picks a free port"
    )
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--home", help="flowline home (default $FLOWLINE_HOME or ./.flowline)")
    parser.add_argument("--db", help="store URL (default $FLOWLINE_MONITOR_DB or SQLite in home)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI)")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        # A bad FLOWLINE_* value stops it here, in one line like the errors below.
        settings = MonitorSettings.from_env()
        env_port = port_from_env()
    except ValueError as exc:
        _fail(exc)
    port = env_port if args.port is None else args.port
    if args.home:
        settings = replace(settings, home=Path(args.home).expanduser().resolve())
    if args.db:
        settings = replace(settings, db_url=args.db)
    if args.tracking_uri:
        settings = replace(settings, tracking_uri=args.tracking_uri)
    # Captured request bodies and the ingest token live here: owner-only files and folders.
    os.umask(0o077)
    try:
        settings.home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        _fail(exc)
    with contextlib.suppress(OSError):
        settings.home.chmod(0o700)  # FLOWLINE_HOME is flowline's own folder
    # Baseline downloads would draw progress bars into the service log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow's default (7 retries, doubling backoff) would hold the detector for minutes
    # while the registry is down; the monitor retries on its own schedule instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")

    from sqlalchemy.exc import SQLAlchemyError

    from monitoring.service.server import serve_monitor  # after logging is set up

    try:
        serve_monitor(settings, args.host, port, args.port_file, args.log_level)
    except (ValueError, SQLAlchemyError, OSError, OverflowError) as exc:
        # Raised while opening the store or binding the port, before serving starts.
        _fail(exc)


if __name__ == "__main__":
    main()
