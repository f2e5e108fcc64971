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
import math
import signal
import sys
import tempfile
import typing
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

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
from .errors import EdgeflError

log = logging.getLogger("edgefl")

#: Short spellings for the flags people type most.
ALIASES = {
    "mqtt.broker": ["--broker"],
    "mqtt.prefix": ["--prefix"],
    "inference.port": ["--predict-port"],
}
#: Settings no command line sets: the command itself says which role runs.
SET_BY_COMMAND = {"role"}
#: Settings of a node with a parent: ``edgefl cloud`` does not offer them.
GATEWAY_ONLY = {"parent", "sync_every", "parent_key", "max_version_jump", "hmac_key"}
#: The subcommands that hand their arguments to a module's ``configure_parser``/``main``.
DELEGATED = (
    ("simulate", "simulator", "simulate a whole fleet on this machine"),
    ("monitor", "monitor", "live view of a fleet's metrics and status topics"),
    ("dashboard", "dashboard", "the fleet in a web page, live from its metrics and status topics"),
    ("broker", "broker", "start a local broker (Mosquitto, or the embedded one)"),
    ("credentials", "credentials", "create broker passwords and update-signing keys"),
)


class UsageError(EdgeflError, ValueError):
    """A command line that cannot run; printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line on stderr, exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that shows a flag's default, where it has one worth saying."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def port(text: str) -> int:
    """An argparse type: a TCP port, 0 (a free one) to 65535."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port 0..65535, got {text!r}")
    return int(text)


def positive_int(text: str) -> int:
    """An argparse type: an integer of 1 or more."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer of 1 or more, got {text!r}")
    return int(text)


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number above 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a finite number, 0 or more."""
    value = _finite(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number of 0 or more, got {text!r}")
    return value


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


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


def _choices(ann: Any) -> tuple[str, ...] | None:
    """The allowed values of a Literal (or optional Literal) setting."""
    for arg in (ann, *typing.get_args(ann)):
        if typing.get_origin(arg) is typing.Literal:
            return tuple(str(v) for v in typing.get_args(arg))
    return None


def add_settings_flags(
    parser: argparse.ArgumentParser, model: type[BaseModel], skip: set[str] = SET_BY_COMMAND
) -> None:
    """One flag per leaf setting, help text with its default; absent flags stay unset."""
    groups: dict[str, Any] = {}
    for dotted, info in iter_fields(model):
        if dotted in skip:
            continue
        section = dotted.rpartition(".")[0]
        group = groups.get(section)
        if group is None:
            title = f"[{section}] settings" if section else "settings"
            group = groups[section] = parser.add_argument_group(title)
        names = [_flag(dotted), *ALIASES.get(dotted, [])]
        choices = _choices(info.annotation)
        text = info.description or ""
        if choices:
            text += f"; one of {', '.join(choices)}"
        help_text = f"{text} (default: {_default_text(info)})"
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
                *names,
                dest=dotted,
                default=argparse.SUPPRESS,
                choices=choices,
                metavar="{" + ",".join(choices) + "}" if choices else "VALUE",
                help=help_text,
            )


def settings_from_args(
    model: type[Any], args: argparse.Namespace, defaults: dict[str, Any] | None = None
) -> Any:
    """Settings from ``--config``, the environment and the flags, over ``defaults``."""
    fields = dict(iter_fields(model))
    flat, flags = {}, {}
    for dotted, value in vars(args).items():
        if dotted not in fields:
            continue
        flags[dotted] = "/".join([_flag(dotted), *ALIASES.get(dotted, [])])
        try:
            flat[dotted] = parse_flag_value(fields[dotted].annotation, value)
        except ConfigError as exc:
            raise ConfigError(f"{flags[dotted]}: {exc}") from None
    config = getattr(args, "config", None)
    return load_settings(model, config, nest(flat), flags=flags, defaults=defaults)


def check_writable_dir(path: Path, what: str = "state_dir") -> None:
    """``path`` is a directory (created if need be) that takes files; ``ConfigError``
    naming ``what`` (the setting or flag) if not: before anything starts."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            f"{what} {str(path)[:200]}: not a writable directory ({reason})"
        ) from None


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
    check_writable_dir(settings.state_dir)
    setup_logging(settings.log_level)
    from .device import serve_device

    run_until_signal(serve_device(settings))
    return 0


def _aggregator_command(role: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        # The command says the role; a file or variable that says another is a mistake.
        # The cloud is the node its gateways name as their parent, unless set otherwise.
        defaults = {"role": role, **({"id": "cloud"} if role == "cloud" else {})}
        settings = settings_from_args(AggregatorSettings, args, defaults)
        if settings.role != role:
            raise UsageError(
                f"'edgefl {role}' runs the {role}; the settings say role = {settings.role!r}"
            )
        check_writable_dir(settings.state_dir)
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
    parser = Parser(
        prog="edgefl",
        description="Hierarchical edge-to-cloud federated learning over MQTT.",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgefl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    role_help = "settings: TOML file < EDGEFL_* environment (EDGEFL_MQTT__BROKER=...) < flags"
    for name, model, func, text, skip in (
        ("device", DeviceSettings, _cmd_device, "run a device agent (a board)", SET_BY_COMMAND),
        (
            "gateway",
            AggregatorSettings,
            _aggregator_command("gateway"),
            "run a gateway node",
            SET_BY_COMMAND,
        ),
        (
            "cloud",
            AggregatorSettings,
            _aggregator_command("cloud"),
            "run the cloud node (id: cloud unless set)",
            SET_BY_COMMAND | GATEWAY_ONLY,
        ),
    ):
        p = sub.add_parser(name, help=text, description=f"{text}. {role_help}")
        p.add_argument("--config", "-c", metavar="FILE.toml", help="settings file (TOML)")
        add_settings_flags(p, model, skip)
        p.set_defaults(func=func, parser=p)

    for cmd, module, text in DELEGATED:
        # An import error here is a broken install: it must surface, not hide a command.
        configure = importlib.import_module(f"edgefl.{module}").configure_parser
        p = sub.add_parser(
            cmd,
            help=text,
            description=text,
            formatter_class=DefaultsFormatter,
        )
        configure(p)
        p.set_defaults(func=_delegate(module), parser=p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:
            args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exit_:
        if exit_.code != 2:
            raise  # --help, --version
        return 2  # the parser said why, in one line
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
