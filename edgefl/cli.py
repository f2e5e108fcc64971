"""The ``edgefl`` command: device, gateway, cloud, simulate, broker, monitor, dashboard,
credentials.

Flags of the role commands are generated from the settings models, so ``--help``,
TOML files and ``EDGEFL_`` variables never disagree. Bad input: one line, exit 2.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from . import __version__
from .config import (
    AggregatorSettings,
    ConfigError,
    DeviceSettings,
    is_bool,
    iter_fields,
    load_settings,
    nest,
    parse_flag_value,
)

log = logging.getLogger("edgefl")

#: Short spellings for the flags people type most.
ALIASES = {"mqtt.broker": ["--broker"], "mqtt.prefix": ["--prefix"]}


class UsageError(Exception):
    """A command line that cannot run; printed as one line, exit code 2."""


def _flag(dotted: str) -> str:
    return "--" + dotted.replace(".", "-").replace("_", "-")


def _default_text(info: Any) -> str:
    if info.default is not PydanticUndefined:
        value = info.default
    elif info.default_factory is not None:
        value = info.default_factory()
    else:
        return "required"
    if isinstance(value, BaseModel):
        return "see section"
    return repr(value) if value in ("", None) or isinstance(value, str) else str(value)


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per leaf setting, help text with its default; absent flags stay unset."""
    groups: dict[str, Any] = {}
    for dotted, info in iter_fields(model):
        section = dotted.rpartition(".")[0]
        group = groups.get(section)
        if group is None:
            title = f"[{section}] settings" if section else "settings"
            group = groups[section] = parser.add_argument_group(title)
        names = [_flag(dotted), *ALIASES.get(dotted, [])]
        help_text = f"{info.description or ''} (default: {_default_text(info)})".strip()
        if is_bool(info.annotation):
            group.add_argument(
                *names,
                dest=dotted,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            group.add_argument(
                *names, dest=dotted, default=argparse.SUPPRESS, metavar="VALUE", help=help_text
            )


def settings_from_args(model: type[Any], args: argparse.Namespace) -> Any:
    fields = dict(iter_fields(model))
    flat = {
        dotted: parse_flag_value(fields[dotted].annotation, value)
        for dotted, value in vars(args).items()
        if dotted in fields
    }
    return load_settings(model, getattr(args, "config", None), nest(flat))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def run_until_signal(main: Coroutine[Any, Any, Any]) -> Any:
    """Run ``main``; SIGINT or SIGTERM cancels it so its owners clean up, then we exit."""

    async def runner() -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(main)
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, task.cancel)
        try:
            return await task
        except asyncio.CancelledError:
            log.info("stopped by signal")
            return None

    return asyncio.run(runner())


# -------------------------------------------------------------------- commands


def _cmd_device(args: argparse.Namespace) -> int:
    settings = settings_from_args(DeviceSettings, args)
    setup_logging(settings.log_level)
    from .device import serve_device

    run_until_signal(serve_device(settings))
    return 0


def _aggregator_command(tier: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        if getattr(args, "tier", tier) != tier:
            raise UsageError(f"'edgefl {tier}' runs the {tier} tier; drop --tier")
        args.tier = tier
        settings = settings_from_args(AggregatorSettings, args)
        setup_logging(settings.log_level)
        from .aggregator import serve_aggregator

        run_until_signal(serve_aggregator(settings))
        return 0

    return command


def _delegate(module: str, name: str = "main") -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        func = getattr(importlib.import_module(f"edgefl.{module}"), name)
        return int(func(args) or 0)

    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefl",
        description="Hierarchical edge-to-cloud federated learning over MQTT.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgefl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    role_help = "settings: TOML file < EDGEFL_* environment (EDGEFL_MQTT__BROKER=...) < flags"
    for name, model, func, text in (
        ("device", DeviceSettings, _cmd_device, "run a device agent (a board)"),
        ("gateway", AggregatorSettings, _aggregator_command("gateway"), "run a gateway node"),
        ("cloud", AggregatorSettings, _aggregator_command("cloud"), "run the cloud node"),
    ):
        p = sub.add_parser(name, help=text, description=f"{text}. {role_help}")
        p.add_argument("--config", "-c", metavar="FILE.toml", help="settings file (TOML)")
        add_settings_flags(p, model)
        p.set_defaults(func=func)

    for module, text in (
        ("simulator", "simulate a whole fleet on this machine"),
        ("monitor", "live view of a fleet's metrics and status topics"),
        ("dashboard", "the fleet in a web page, live from its metrics and status topics"),
        ("broker", "start a local broker (Mosquitto, or the embedded one)"),
        ("credentials", "create broker passwords and update-signing keys"),
    ):
        with contextlib.suppress(ImportError):
            mod = importlib.import_module(f"edgefl.{module}")
            configure = getattr(mod, "configure_parser", None)
            if configure is None:
                continue
            cmd = "simulate" if module == "simulator" else module
            p = sub.add_parser(cmd, help=text, description=text)
            configure(p)
            p.set_defaults(func=_delegate(module))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, UsageError) as exc:
        print(f"edgefl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the imported module's main, not this __main__ copy: commands raise
    # edgefl.cli.UsageError, which a second copy of this module would not catch.
    from edgefl.cli import main as _main

    sys.exit(_main())
