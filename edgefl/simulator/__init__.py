"""``edgefl simulate``: run a whole fleet (cloud, gateways, devices) on this machine.

A scenario file (``simulators/*.toml``) describes the fleet; every device is a
real DeviceAgent with its own MQTT session. Importing this package stays
light (no torch): the CLI builds every command's parser at start-up.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import EdgeflError

HOST_PORT = re.compile(r"^[^\s:]+:\d{1,5}$")
BROKER_CHOICES = ("mosquitto", "embedded")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING")


class SimulationError(EdgeflError, RuntimeError):
    """The simulation could not run (no broker, a worker died); one line for the user."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "scenario",
        nargs="?",
        metavar="SCENARIO.toml",
        help="scenario file, or a name under simulators/ (default: simulators/default.toml)",
    )
    # Values stay strings here and are validated with the scenario, so that a
    # bad flag and a bad file field read the same: one line, exit code 2.
    flags = (
        ("--seed", "N", "seed of the partition, profiles and training"),
        ("--rounds", "N", "cloud rounds"),
        ("--devices", "N", "devices per gateway"),
        ("--workers", "N", "device processes (default: one per core)"),
        ("--time-scale", "X", "simulated seconds per real second"),
        ("--timeout", "SECONDS", "stop and report after this long"),
    )
    for flag, metavar, text in flags:
        parser.add_argument(flag, metavar=metavar, help=f"{text}; overrides the scenario")
    parser.add_argument(
        "--broker",
        metavar="HOST:PORT",
        default="mosquitto",
        help="use a running broker at HOST:PORT; 'mosquitto' (default) starts Mosquitto, "
        "or the embedded broker where it is not installed; 'embedded' always starts amqtt",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="where the report goes (default: ./edgefl-runs/<scenario>-<timestamp>)",
    )
    parser.add_argument(
        "--plain",
        action="store_true",
        help="plain progress lines instead of a live bar (the default when not a terminal)",
    )
    parser.add_argument(
        "--log-level", default="WARNING", metavar="LEVEL", help="DEBUG, INFO or WARNING"
    )


#: The scenario field of each flag.
FLAG_FIELDS = {
    "seed": "seed",
    "rounds": "rounds",
    "devices": "fleet.devices_per_gateway",
    "workers": "workers",
    "time_scale": "time_scale",
    "timeout": "timeout_s",
}


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Scenario fields set on the command line, as dotted keys."""
    return {
        dotted: getattr(args, name)
        for name, dotted in FLAG_FIELDS.items()
        if getattr(args, name, None) is not None
    }


def flag_names() -> dict[str, str]:
    """``scenario field -> flag``: an error in a value set by a flag names the flag."""
    return {dotted: "--" + name.replace("_", "-") for name, dotted in FLAG_FIELDS.items()}


def default_out(name: str) -> Path:
    return Path("edgefl-runs") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(args: argparse.Namespace) -> int:
    """Load the scenario, run the fleet, print and write the report."""
    from ..cli import check_writable_dir, setup_logging
    from ..config import ConfigError
    from .scenario_file import load_scenario

    broker = args.broker
    if broker not in BROKER_CHOICES and not HOST_PORT.match(broker):
        raise ConfigError(
            f"--broker: expected HOST:PORT, 'mosquitto' or 'embedded', got {broker!r}"
        )
    level = str(args.log_level).upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"--log-level: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    scenario = load_scenario(args.scenario, flags=flag_names(), **overrides_from_args(args))
    setup_logging(level)
    out = Path(args.out) if args.out else default_out(scenario.name)
    check_writable_dir(out, "--out")  # before the run, not after it
    plain = bool(args.plain) or not sys.stdout.isatty()

    from .fleet import run_simulation

    try:
        result = run_simulation(scenario, broker=broker, out=out, plain=plain, log_level=level)
    except SimulationError as exc:
        print(f"edgefl simulate: error: {exc}", file=sys.stderr)
        return 1
    return 130 if result.interrupted else 0
