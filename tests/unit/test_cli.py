"""The ``edgefl`` command line: every flag has help, bad input is one line and exit 2.

The fuzz calls ``edgefl.cli.main`` in-process with every flag of every subcommand
set to wrong, out-of-range and hostile values; what would run a service is
replaced by a sentinel, so an accepted value ends the call at once.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from edgefl import cli
from edgefl.config import AggregatorSettings, DeviceSettings, iter_fields

HOSTILE = [
    "",
    "-1",
    "1e309",
    "nan",
    "a/b",
    "x" * 300,
    "../../../../passwd",  # up and out of the working directory: a file of tmp_path here
    "{",
    '["a/b"]',
]
#: What each subcommand needs before a flag can be judged.
BASE = {"device": ["--id", "d1"], "gateway": ["--id", "g1"], "credentials": ["add"]}


#: The real delegation, for tests that run a command's main to its end.
real_delegate = cli._delegate


class Ran(Exception):
    """The command line was accepted: the service would start here."""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if action.option_strings and not isinstance(
            action, (argparse._HelpAction, argparse._VersionAction)
        ):
            yield action


def _commands() -> dict[str, argparse.ArgumentParser]:
    subs = _subparsers(cli.build_parser())
    subs["credentials"] = _subparsers(subs["credentials"])["add"]
    return subs


@pytest.fixture
def accepted(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing runs: a role's service, a delegated command's main, a simulation."""
    for name in [n for n in os.environ if n.startswith("EDGEFL_")]:
        monkeypatch.delenv(name)
    # Paths that climb out of the working directory land in tmp_path, never in the
    # system's files: credentials writes the files it is given.
    (tmp_path / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    work = tmp_path / "w" / "x" / "y" / "z"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)

    def run(main: Any) -> None:
        main.close()
        raise Ran

    def ran(*args: Any, **kwargs: Any) -> Any:
        raise Ran

    real = cli._delegate

    def delegate(module: str, name: str = "main") -> Any:
        # The simulator and the monitor check their values in main: run it up to the start.
        return real(module, name) if module in ("simulator", "monitor", "credentials") else ran

    import edgefl.monitor
    import edgefl.simulator.fleet

    monkeypatch.setattr(edgefl.simulator.fleet, "run_simulation", ran)
    monkeypatch.setattr(edgefl.monitor, "Monitor", ran)
    monkeypatch.setattr(cli, "run_until_signal", run)
    monkeypatch.setattr(cli, "_delegate", delegate)
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)


def _one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str | None:
    """None if ``argv`` was accepted, else the one error line (asserted)."""
    try:
        code = cli.main(argv)
    except Ran:
        return None
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    if code == 0:
        return None  # a command that ran to its end here (credentials writes into tmp_path)
    shown = [a[:40] for a in argv], err[-400:]
    assert code == 2, shown
    assert err.count("\n") == 1 and "Traceback" not in err, shown
    command = "edgefl credentials add" if argv[0] == "credentials" else f"edgefl {argv[0]}"
    assert err.startswith(f"{command}: error:") or err.startswith(f"edgefl {argv[0]}: error"), err
    return err


@pytest.mark.usefixtures("accepted")
@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_with_hostile_values_is_one_line_and_exit_2(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    base = [command, *BASE.get(command, [])]
    if command == "credentials":
        base = ["credentials", "add", "--role", "device", "--id", "d1", "--parent", "gw"]
    refused = 0
    for action in _options(_commands()[command]):
        flag = action.option_strings[-1] if action.nargs == 0 else action.option_strings[0]
        if action.nargs == 0:
            continue  # a switch takes no value
        for value in HOSTILE:
            refused += _one_line_exit_2([*base, flag, value], capsys) is not None
    assert refused > 0


@pytest.mark.usefixtures("accepted")
@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["device", "--id", "d1", "--gateway", "gw/1"], "gateway"),
        (["gateway", "--id", "g1", "--parent", "x/y"], "parent"),
        (["gateway", "--id", "g1", "--children", '["a/b"]'], "children"),
        (["gateway", "--id", "g1", "--keys", '{"gw-1": "zz"}'], "keys"),
        (["device", "--id", "d1", "--hmac-key", "xyz"], "--hmac-key"),
        (["monitor", "--prometheus", "80000"], "--prometheus"),
        (["broker", "--port", "65536"], "--port"),
        (["gateway", "--id", "g1", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["cloud", "--parent", "cloud"], "unrecognized arguments: --parent"),
        (["cloud", "--sync-every", "2"], "unrecognized arguments: --sync-every"),
        (["gateway", "--id", "g1", "--role", "cloud"], "unrecognized arguments: --role"),
        (["simulate", "--rounds", "x"], "error: --rounds: "),
        (["simulate", "--time-scale", "0"], "error: --time-scale: "),
    ],
)
def test_a_bad_command_line_says_what_is_wrong(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _one_line_exit_2(argv, capsys)
    assert err is not None and says in err
    assert err.startswith(f"edgefl {argv[0]}: error:")  # the subcommand's, not the top level's


@pytest.mark.usefixtures("accepted")
def test_a_file_of_the_other_role_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    kit = Path("gateway.toml")
    kit.write_text('id = "gw-1"\nrole = "gateway"\nparent = "cloud"\n')
    err = _one_line_exit_2(["cloud", "-c", str(kit)], capsys)
    assert (
        err
        == "edgefl cloud: error: 'edgefl cloud' runs the cloud; the settings say role = 'gateway'\n"
    )
    with pytest.raises(Ran):
        cli.main(["gateway", "-c", str(kit)])


@pytest.mark.usefixtures("accepted")
def test_an_unusable_state_dir_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    for argv, what in (
        (["device", "--id", "d1", "--state-dir", str(a_file)], "state_dir"),
        (["gateway", "--id", "g1", "--state-dir", str(a_file / "below")], "state_dir"),
        (["simulate", "--out", str(a_file)], "--out"),
    ):
        err = _one_line_exit_2(argv, capsys)
        assert err is not None and f"{what} {a_file}" in err and "not a writable directory" in err


@pytest.mark.usefixtures("accepted")
def test_a_bad_flag_is_blamed_on_the_flag_not_on_the_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    kit = Path("gateway.toml")
    kit.write_text('id = "gw-1"\n[train]\nepochs = 2\n')
    err = _one_line_exit_2(["gateway", "-c", str(kit), "--train-epochs", "many"], capsys)
    assert err is not None and "--train-epochs: " in err and str(kit) not in err
    kit.write_text('id = "gw-1"\n[train]\nepochs = "many"\n')
    err = _one_line_exit_2(["gateway", "-c", str(kit)], capsys)
    assert err is not None and "gateway.toml: train.epochs: " in err


@pytest.mark.usefixtures("accepted")
def test_a_variable_that_names_no_setting_is_an_error_like_an_unknown_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFL_TRAIN__EPOCHS", "3")  # a node's setting, not a device's
    err = _one_line_exit_2(["device", "--id", "d1"], capsys)
    assert err is not None and "EDGEFL_TRAIN__EPOCHS: unknown setting" in err
    with pytest.raises(Ran):
        cli.main(["gateway", "--id", "g1"])  # where it is a setting, it is taken
    monkeypatch.delenv("EDGEFL_TRAIN__EPOCHS")
    monkeypatch.setenv("EDGEFL_TASK_OPTIONS__MODEL", "mlp")  # one entry of a map: a setting
    with pytest.raises(Ran):
        cli.main(["device", "--id", "d1"])
    monkeypatch.setenv("EDGEFL_TRAIN__EPOCHS", "many")
    err = _one_line_exit_2(["gateway", "--id", "g1"], capsys)
    assert err is not None and err.startswith("edgefl gateway: error: EDGEFL_TRAIN__EPOCHS: ")


@pytest.mark.usefixtures("accepted")
def test_the_cloud_needs_no_id(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Any] = []
    real = cli.settings_from_args

    def spy(*args: Any) -> Any:
        seen.append(real(*args))
        return seen[-1]

    monkeypatch.setattr(cli, "settings_from_args", spy)
    with pytest.raises(Ran):
        cli.main(["cloud"])
    assert seen[0].id == "cloud" and seen[0].role == "cloud"


@pytest.mark.parametrize("model", [DeviceSettings, AggregatorSettings], ids=lambda m: m.__name__)
def test_every_setting_says_what_it_is(model: type[Any]) -> None:
    assert [dotted for dotted, info in iter_fields(model) if not info.description] == []


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_flag_has_help_and_lists_its_choices(command: str) -> None:
    for action in _options(_commands()[command]):
        assert action.help and action.help.strip(), (command, action.option_strings)
        if action.choices:
            assert all(
                str(c) in action.help or str(c) in str(action.metavar) for c in action.choices
            )


def test_literal_settings_list_their_values_and_the_cloud_offers_no_gateway_flag() -> None:
    commands = _commands()
    device = {o: a for a in _options(commands["device"]) for o in a.option_strings}
    assert device["--mqtt-protocol"].choices == ("3.1.1", "5")
    assert device["--log-level"].choices == ("DEBUG", "INFO", "WARNING", "ERROR")
    assert "one of DEBUG, INFO, WARNING, ERROR" in (device["--log-level"].help or "")
    cloud = {o for a in _options(commands["cloud"]) for o in a.option_strings}
    gateway = {o for a in _options(commands["gateway"]) for o in a.option_strings}
    for flag in ("--role", "--parent", "--sync-every", "--parent-key", "--hmac-key"):
        assert flag not in cloud
    assert {"--parent", "--sync-every"} <= gateway and "--role" not in gateway
    for command in ("monitor", "broker"):
        assert "(default:" in commands[command].format_help()
    for command, _, _ in cli.DELEGATED:
        text = " ".join(commands[command].format_help().split())
        assert "(default: None)" not in text and "(default: False)" not in text, command
        assert "(default: simulators/default.toml) (default:" not in text


def test_a_broker_on_a_busy_port_says_so_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["broker", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err == f"edgefl broker: error: 127.0.0.1:{port} is already in use (another broker?)\n"


@pytest.mark.usefixtures("accepted")
@pytest.mark.parametrize("flag", ["--passwd-file", "--acl-file"])
def test_credentials_refuses_to_write_into_a_file_that_is_not_the_brokers(
    flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An /etc/passwd given by mistake is left as it was."""
    monkeypatch.setattr(cli, "_delegate", real_delegate)
    system = tmp_path / "passwd"
    before = system.read_text()
    argv = ["credentials", "add", "--role", "cloud", flag, str(system)]
    err = _one_line_exit_2(argv, capsys)
    assert err is not None and f"{system}" in err and "not a Mosquitto" in err
    assert system.read_text() == before
