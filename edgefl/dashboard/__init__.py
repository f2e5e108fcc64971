"""``edgefl dashboard``: the fleet in a web page, live from its metrics and status topics.

The monitor's session and FleetState feed an HTTP server (``server.py``) whose
page draws ``summary.py``'s JSON; it only subscribes and binds loopback by default.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..monitor import Monitor, add_broker_arguments, broker_settings
from .server import DashboardServer
from .summary import summary

__all__ = ["DashboardServer", "configure_parser", "main", "summary"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument(
        "--host", default="127.0.0.1",
        help="address to serve the page on (default: loopback only; 0.0.0.0 serves everyone)",
    )  # fmt: skip
    parser.add_argument(
        "--port", type=int, default=8088, help="HTTP port of the page (default: 8088)"
    )


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..config import describe_error

    try:
        settings = broker_settings(args)
    except ValidationError as exc:
        print(f"edgefl dashboard: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    if not 0 <= args.port <= 65535:
        print(f"edgefl dashboard: error: --port {args.port}: not a TCP port", file=sys.stderr)
        return 2
    monitor = Monitor(settings)
    server = DashboardServer(monitor.state, monitor.lock, args.host, args.port)
    try:
        asyncio.run(_run(monitor, server))
    except OSError as exc:
        print(f"edgefl dashboard: error: {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


async def _run(monitor: Monitor, server: DashboardServer) -> None:
    from ..supervise import first_completed

    def ready(port: int) -> None:
        print(f"edgefl dashboard: http://{server.host}:{port}/", flush=True)

    await first_completed(monitor.watch(), server.serve(ready))
