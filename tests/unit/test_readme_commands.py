"""The commands in the README and the kits' READMEs work as written.

Every ``bash``/``sh`` block parses (``bash -n``), every ``edgefl`` invocation in
them is accepted by the CLI parser (and a role's settings load), every install
line installs this checkout, and the first two commands run with or without sudo.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from edgefl.cli import build_parser, settings_from_args
from edgefl.config import AggregatorSettings, DeviceSettings

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
DOCS = [
    REPO / "README.md",
    *(REPO / kit / "README.md" for kit in ("cloud", "gateways", "devices", "simulators")),
]
#: The name on PyPI that belongs to an unrelated project.
FOREIGN = "edgefl"


def _blocks(path: Path) -> list[str]:
    """The blocks marked as shell commands."""
    return re.findall(r"^ *```(?:bash|sh)\n(.*?)^ *```", path.read_text(), re.S | re.M)


def _invocations() -> list[tuple[Path, list[str]]]:
    """``(doc, argv)`` of every ``edgefl ...`` command in a shell block, with the block's
    ``NAME="..."`` variables expanded."""
    found = []
    for doc in DOCS:
        for block in _blocks(doc):
            names = dict(re.findall(r'^ *([A-Z]+)="([^"]*)"$', block, re.M))
            for line in block.splitlines():  # P=1883 S=./state, and a loop's first value
                names.update(re.findall(r"(?:^| )([A-Z]+)=([^\s\"']+)(?= |$)", line.split("#")[0]))
                names.update(re.findall(r"\bfor (\w+) in (\S+)", line))
            for line in block.splitlines():
                for name, value in names.items():
                    line = line.replace(f"${name}", value)
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                words: list[str] = []
                for token in [*lexer, ";"]:
                    if token not in ("&&", "||", ";", "|", "&"):
                        words.append(token)
                        continue
                    while words and (words[0] in ("sudo", "do", "then") or "=" in words[0]):
                        words.pop(0)
                    if words and Path(words[0]).name == "edgefl":
                        found.append((doc, words[1:]))
                    words = []
    return found


def test_the_distribution_is_not_the_unrelated_edgefl_on_pypi() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "edgefl-mqtt" != FOREIGN
    assert project["scripts"] == {"edgefl": "edgefl.cli:main"}
    # An extra that names the foreign project would make pip fetch it from PyPI.
    for extra in project["optional-dependencies"].values():
        for requirement in extra:
            name = re.split(r"[\[<>=; ]", requirement)[0]
            assert name != FOREIGN, requirement


def test_every_install_line_installs_this_checkout() -> None:
    lines = [(REPO / ".ci" / "run", (REPO / ".ci" / "run").read_text())]
    lines += [(doc, doc.read_text()) for doc in DOCS]
    checked = 0
    for path, text in lines:
        for args in re.findall(r"pip install ([^`\n&|;#]*)", text):
            for word in shlex.split(args):
                if word.startswith("-") or word.startswith("torch") or word == "...":
                    continue
                checked += 1
                local = word.startswith((".", "/", "dist/")) or word.endswith(".whl")
                assert local, f"{path.name}: pip install {word} is not this checkout"
    assert checked >= 8


def _stub(directory: Path, name: str, body: str = "") -> None:
    script = directory / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "$LOG"\n{body}\n')
    script.chmod(0o755)


@pytest.mark.parametrize("with_sudo", [False, True], ids=["root-without-sudo", "user-with-sudo"])
@pytest.mark.parametrize("which", [0, 1], ids=["simulate", "tests"])
def test_the_first_two_commands_run_with_or_without_sudo(
    which: int, with_sudo: bool, tmp_path: Path
) -> None:
    """The programs are stubs that record their arguments: what is tested is the line."""
    command = _blocks(REPO / "README.md")[which].strip()
    assert "\n" not in command  # one copy-paste line
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    _stub(bin_dir, "apt-get")
    _stub(bin_dir, "python3", '[ "$2" = venv ] && /bin/mkdir -p "$3/bin" && : > "$3/bin/activate"')
    for name in ("pip", "python", "edgefl"):
        _stub(bin_dir, name)
    if with_sudo:
        _stub(bin_dir, "sudo", 'exec "$@"')
    env = {"PATH": str(bin_dir), "LOG": str(log), "HOME": str(tmp_path)}
    done = subprocess.run(
        ["/bin/bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    apt = [c for c in calls if "apt-get" in c]
    prefix = "sudo apt-get" if with_sudo else "apt-get"
    assert [c for c in apt if c.startswith(prefix)][:2] == [
        f"{prefix} update",
        f"{prefix} install -y python3-venv mosquitto" + " mosquitto-clients" * which,
    ]
    assert calls[-1] == ("python -m pytest -q -n 2" if which else "edgefl simulate")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_shell_block_parses(doc: Path) -> None:
    for block in _blocks(doc):
        done = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert done.returncode == 0, f"{done.stderr}\n{block}"


def test_every_edgefl_invocation_is_accepted_and_its_settings_load(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith("EDGEFL_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(REPO)
    invocations = _invocations()
    assert len(invocations) >= 25
    models = {"device": DeviceSettings, "gateway": AggregatorSettings, "cloud": AggregatorSettings}
    for doc, argv in invocations:
        if "--help" in argv:
            continue
        try:
            args = build_parser().parse_args(argv)
        except SystemExit:
            pytest.fail(f"{doc.name}: edgefl {shlex.join(argv)} is refused")
        config = getattr(args, "config", None)
        if args.command in models and (config is None or Path(config).is_file()):
            settings_from_args(models[args.command], args)  # raises ConfigError
