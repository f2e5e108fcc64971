"""``edgefl monitor``: the fleet as seen from its metrics and status topics alone.

``FleetState`` folds messages into per-node and per-device views (pure); this
shell subscribes, renders it with rich, prints one snapshot, or serves it to
Prometheus. A monitor only subscribes: it never publishes anything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from typing import Any

from ..cli import non_negative_float, port, positive_float, positive_int, run_until_signal
from .state import DeviceView, FleetState, NodeView

__all__ = [
    "DeviceView", "FleetState", "Monitor", "NodeView", "add_broker_arguments",
    "broker_settings", "configure_parser", "main",
]  # fmt: skip


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker, prefix and credential flags of every command that only subscribes."""
    env = os.environ.get
    parser.add_argument(
        "--broker",
        default=env("EDGEFL_MQTT__BROKER", "127.0.0.1:1883"),
        metavar="HOST:PORT",
        help="the fleet's broker (or EDGEFL_MQTT__BROKER)",
    )
    parser.add_argument(
        "--prefix", default=env("EDGEFL_MQTT__PREFIX", "edgefl"), help="the fleet's topic prefix"
    )
    parser.add_argument(
        "--username", default=env("EDGEFL_MQTT__USERNAME"), help="broker user (a monitor's)"
    )
    parser.add_argument(
        "--password", default=env("EDGEFL_MQTT__PASSWORD"), help="or EDGEFL_MQTT__PASSWORD"
    )
    parser.add_argument(
        "--ca-file", default=env("EDGEFL_MQTT__CA_FILE"), help="CA certificate: connect over TLS"
    )
    parser.add_argument("--tls-insecure", action="store_true", help="skip the host name check")


def broker_settings(args: argparse.Namespace) -> Any:
    """``MqttSettings`` from :func:`add_broker_arguments`' flags; ``ValidationError`` if bad."""
    from ..config import MqttSettings

    return MqttSettings(
        broker=args.broker, prefix=args.prefix, username=args.username,
        password=args.password, ca_file=args.ca_file, tls_insecure=args.tls_insecure,
    )  # fmt: skip


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument("--once", action="store_true", help="print one snapshot and exit")
    parser.add_argument(
        "--wait", type=positive_float, default=5.0, metavar="S",
        help="with --once: seconds to listen (statuses are retained; metrics need a round)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="with --once: print JSON")
    parser.add_argument(
        "--prometheus", type=port, metavar="PORT", help="serve gauges on 127.0.0.1:PORT/metrics"
    )
    parser.add_argument(
        "--no-view", action="store_true", help="no terminal view (with --prometheus: exporter)"
    )
    parser.add_argument(
        "--max-devices", type=positive_int, default=40, metavar="N", help="device rows shown"
    )
    parser.add_argument(
        "--expire-s", type=non_negative_float, default=600.0, metavar="S",
        help="forget a node or device offline for this long (0: never)",
    )  # fmt: skip


def main(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ..config import describe_error

    try:
        settings = broker_settings(args)
    except ValidationError as exc:
        print(f"edgefl monitor: error: {describe_error(exc)}", file=sys.stderr)
        return 2
    monitor = Monitor(settings, max_devices=args.max_devices, expire_s=args.expire_s)
    server = None
    if args.prometheus is not None:
        try:
            from .exporter import serve_prometheus

            server = serve_prometheus(monitor.state, monitor.lock, args.prometheus)
        except ImportError:
            print("edgefl monitor: error: --prometheus needs prometheus-client; "
                  "pip install '.[sim]' in the edgefl checkout", file=sys.stderr)  # fmt: skip
            return 2
        except OSError as exc:
            print(f"edgefl monitor: error: port {args.prometheus}: {exc}", file=sys.stderr)
            return 2
    try:
        if args.once:
            return monitor.once(args.wait, as_json=args.json)
        return monitor.live(view=not args.no_view)
    except KeyboardInterrupt:
        return 130
    finally:
        if server is not None:
            server.shutdown()


class Monitor:
    """The shell: one MQTT session feeding a FleetState, shown or exported."""

    def __init__(self, settings: Any, *, max_devices: int = 40, expire_s: float = 0.0) -> None:
        self.settings = settings
        self.state = FleetState(settings.prefix)
        self.lock = threading.Lock()
        self.max_devices = max_devices
        self.expire_s = expire_s
        self.connects = 0  # sessions the broker accepted

    async def watch(self) -> None:
        """Fold every metrics and status message into the state until cancelled."""
        import secrets

        from ..transport import Transport

        topics = self.state.topics
        client_id = f"edgefl-monitor-{secrets.token_hex(4)}"
        transport = Transport(self.settings, client_id, on_connect=self._on_connect)
        await transport.subscribe(topics.all_metrics(), qos=0)
        await transport.subscribe(topics.all_statuses(), qos=1)
        async with transport:
            async for message in transport.messages():
                now = time.monotonic()
                with self.lock:
                    self.state.apply(message.topic, message.payload, at=now)
                    self.state.expire(now, self.expire_s)

    async def _on_connect(self) -> None:
        self.connects += 1

    def once(self, seconds: float, *, as_json: bool = False) -> int:
        asyncio.run(self._collect(seconds))
        if not self.connects:
            print(
                f"edgefl monitor: error: could not connect to {self.settings.broker} in "
                f"{seconds:g}s (broker down, or wrong credentials)",
                file=sys.stderr,
            )
            return 1
        if as_json:
            print(json.dumps(self.state.snapshot(), indent=2, sort_keys=True))
        else:
            from .view import render_text

            sys.stdout.write(render_text(self.state, max_devices=self.max_devices))
        return 0

    async def _collect(self, seconds: float) -> None:
        task = asyncio.ensure_future(self.watch())
        try:
            await asyncio.wait([task], timeout=seconds)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def live(self, *, view: bool = True) -> int:
        """Until SIGINT or SIGTERM, which end it with exit code 0 as they end every node."""
        run_until_signal(self._live(view))
        return 0

    async def _live(self, view: bool) -> None:
        if not view:
            await self.watch()
            return
        from rich.live import Live

        from .view import render

        def frame() -> Any:
            with self.lock:
                self.state.expire(time.monotonic(), self.expire_s)
                return render(self.state, max_devices=self.max_devices)

        with Live(get_renderable=frame, refresh_per_second=2, screen=False):
            await self.watch()
