"""`python -m serving.gateway`: run the gateway (settings from FLOWLINE_* variables)."""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import replace

from monitoring.capture.client import capture_hook_from_env
from serving.gateway.config import GatewayConfig
from serving.gateway.server import DEFAULT_HOST, DEFAULT_PORT, load_deployments, serve_gateway


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve."""
    parser = argparse.ArgumentParser(prog="python -m serving.gateway", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--default-model", help="model for POST /invocations")
    parser.add_argument("--deployments", help="JSON file: list of deployments to start with")
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        config = GatewayConfig.from_env()
        if args.default_model:
            config = replace(config, default_model=args.default_model)
        serve_gateway(
            args.host,
            args.port,
            config=config,
            deployments=load_deployments(args.deployments) if args.deployments else None,
            port_file=args.port_file,
            log_level=args.log_level,
            # Capture to the drift monitor when FLOWLINE_MONITOR_URL is set.
            on_scored=capture_hook_from_env(),
        )
    except (ValueError, OSError, OverflowError) as exc:
        # Bad settings, an unreadable deployments file, a taken or impossible port
        # (OverflowError: over 65535): before serving.
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"flowline: error: the gateway cannot start: {first_line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
