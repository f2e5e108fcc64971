"""``edgefl device``: help lists every setting with its default; bad input is one line, exit 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefl.cli import main
from edgefl.config import DeviceSettings, iter_fields


def test_help_lists_every_device_setting_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["device", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for dotted, _ in iter_fields(DeviceSettings):
        assert "--" + dotted.replace(".", "-").replace("_", "-") in out
    for text in ("(default: 30.0)", "(default: 'INFO')", "(default: 0.3)", "(default: 'fp32')"):
        assert text in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--heartbeat-s", "-1"], "--heartbeat-s"),
        (["--update-codec", "nope"], "--update-codec"),
        (["--policy-min-battery", "2"], "--policy-min-battery"),
        (["--hmac-key", "xyz"], "--hmac-key"),
        (["--task", "no_such_module:Task"], "no_such_module"),
        (["--shard", "4", "--num-shards", "4"], "shard 4"),
    ],
)
def test_a_bad_value_prints_one_line_and_exits_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["device", "--id", "dev-1", "--state-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("edgefl device: error:") and message in err
    assert err.count("\n") == 1, err
