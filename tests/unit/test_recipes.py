"""The deploy recipes in cloud/ and gateways/ stay valid and speak edgefl's topic scheme.

Also the pure half of ``edgefl credentials``: the ACL blocks it writes and the
config lines it prints. (The brokers themselves run in tests/integration.)
"""

from __future__ import annotations

import json
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from edgefl import acl, credentials
from edgefl.config import AggregatorSettings, DeviceSettings
from edgefl.signing import generate_key_pair, load_private_key, public_hex
from edgefl.topics import Topics
from edgefl.wire import Reason, Status, decode_metrics, encode_metrics

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
T = Topics()


def documented_fields() -> set[str]:
    """Field names in the first column of the tables of the README's operations chapter."""
    text = (REPO / "README.md").read_text().split("\n## Operating a fleet", 1)[1]
    text = text.split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_<>]+)`", text, flags=re.MULTILINE))


# ------------------------------------------------------------------ Node-RED


@pytest.fixture(scope="module")
def flow() -> dict[str, dict[str, Any]]:
    nodes = json.loads((REPO / "cloud" / "node-red-flow.json").read_text())
    assert isinstance(nodes, list)
    by_id = {n["id"]: n for n in nodes}
    assert len(by_id) == len(nodes), "node ids must be unique"
    return by_id


def test_node_red_flow_is_wired_to_nodes_that_exist(flow: dict[str, dict[str, Any]]) -> None:
    for node in flow.values():
        for output in node.get("wires", []):
            assert set(output) <= set(flow), f"{node['id']} wires to a missing node"
        if "z" in node:
            assert flow[node["z"]]["type"] == "tab"
    charts = [n for n in flow.values() if n["type"] == "ui_chart"]
    assert charts
    for chart in charts:
        group = flow[chart["group"]]
        assert group["type"] == "ui_group" and flow[group["tab"]]["type"] == "ui_tab"


def test_node_red_flow_reads_the_metrics_topics_as_json(flow: dict[str, dict[str, Any]]) -> None:
    inputs = [n for n in flow.values() if n["type"] == "mqtt in"]
    assert [n["topic"] for n in inputs] == [T.all_metrics()]
    assert all(flow[n["broker"]]["type"] == "mqtt-broker" for n in inputs)
    reachable = {t for n in inputs for out in n["wires"] for t in out}
    assert {flow[t]["type"] for t in reachable} == {"json"}


def test_node_red_functions_read_only_documented_metrics(flow: dict[str, dict[str, Any]]) -> None:
    known = documented_fields() | {"role", "id"}
    for node in flow.values():
        if node["type"] == "function":
            used = set(re.findall(r"\bm\.([a-z_]+)", node["func"]))
            assert used <= known, f"{node['name']}: {sorted(used - known)}"


# ------------------------------------------------------------------- Telegraf


def test_telegraf_consumes_the_metrics_topics_with_role_and_id_tags() -> None:
    conf = tomllib.loads((REPO / "cloud" / "telegraf.conf").read_text())
    (consumer,) = conf["inputs"]["mqtt_consumer"]
    assert consumer["topics"] == [T.all_metrics()]
    assert consumer["data_format"] == "json"
    record = decode_metrics(encode_metrics("gateway", "gw-1", {"round": 3, "accuracy": 0.9}))
    assert set(consumer["tag_keys"]) == {"role", "id"} and {"role", "id"} <= set(record)
    assert consumer["json_time_format"] == "unix"
    assert isinstance(record[consumer["json_time_key"]], float)
    assert set(consumer["json_string_fields"]) <= documented_fields()
    assert conf["outputs"], "a consumer without an output drops everything"


# --------------------------------------------------------------------- bridge


def test_bridge_carries_only_this_gateways_cloud_traffic_in_its_direction() -> None:
    lines = (REPO / "gateways" / "mosquitto-bridge.conf").read_text().splitlines()
    routes = {
        (parts[1], parts[2]) for parts in (ln.split() for ln in lines) if parts[:1] == ["topic"]
    }
    assert routes == {
        *((topic, "in") for topic in T.downlink("cloud")),  # announcement, delta, model
        (T.update("cloud", "gw-1"), "out"),
        (T.status("cloud", "gw-1"), "out"),
        (T.metrics("gateway", "gw-1"), "out"),
    }
    settings = dict(ln.split(None, 1) for ln in lines if ln and not ln.startswith("#"))
    assert settings["cleansession"] == "false" and settings["remote_username"] == "gw-1"
    assert settings["max_queued_messages"] == "0"  # bounded by bytes, never by count


# ------------------------------------------------------------ ACL, credentials


def _acl_blocks(text: str) -> dict[str, str]:
    blocks: dict[str, str] = {}
    for chunk in text.split("\n\n"):
        if chunk.startswith("# edgefl "):
            blocks[chunk.splitlines()[1].split()[1]] = chunk.strip() + "\n"
    return blocks


def test_shipped_acl_is_what_edgefl_credentials_writes() -> None:
    text = (REPO / "cloud" / "acl").read_text()
    users = acl.acl_users(text)
    assert users == {"cloud": "cloud", "monitor": "monitor"}
    blocks = _acl_blocks(text)
    for node_id, role in users.items():
        block = acl.acl_block(role, node_id)
        assert blocks[node_id] == block
        assert acl.upsert_acl(text, node_id, block) == text


def _writes(rules: list[str]) -> set[str]:
    return {r.split()[2] for r in rules if r.split()[1] == "write"}


def _reads(rules: list[str]) -> set[str]:
    return {r.split()[2] for r in rules if r.split()[1] == "read"}


def test_each_role_writes_only_its_own_topics() -> None:
    device = acl.acl_rules("device", "dev-7", parent="gw-1")
    assert _writes(device) == {
        T.update("gw-1", "dev-7"), T.status("gw-1", "dev-7"), T.metrics("device", "dev-7"),
    }  # fmt: skip
    assert _reads(device) == set(T.downlink("gw-1"))
    gateway = acl.acl_rules("gateway", "gw-2")
    assert _writes(gateway) == {
        *T.downlink("gw-2"), T.update("cloud", "gw-2"), T.status("cloud", "gw-2"),
        T.metrics("gateway", "gw-2"),
    }  # fmt: skip
    assert _reads(gateway) == {
        T.updates_of("gw-2"), T.statuses_of("gw-2"), *T.downlink("cloud"),
    }  # fmt: skip
    regional = acl.acl_rules("gateway", "gw-3", parent="eu", prefix="fl")
    assert "topic write fl/eu/update/gw-3" in regional
    monitor = acl.acl_rules("monitor", "grafana")
    assert _writes(monitor) == set()
    assert _reads(monitor) == {T.all_metrics(), "edgefl/+/status/#"}


def test_adding_a_user_again_replaces_its_block_and_keeps_the_others() -> None:
    first = acl.acl_block("device", "dev-1", parent="gw-9")
    text = acl.upsert_acl("", "dev-1", first)
    text = acl.upsert_acl(text, "gw-1", acl.acl_block("gateway", "gw-1"))
    pinned = acl.acl_block("device", "dev-1", parent="gw-1")
    again = acl.upsert_acl(text, "dev-1", pinned)
    assert acl.acl_users(again) == {"dev-1": "device", "gw-1": "gateway"}
    assert "topic write edgefl/gw-1/update/dev-1" in again
    assert "topic write edgefl/gw-9/update/dev-1" not in again
    assert again.startswith(acl.ACL_HEADER.splitlines()[0])
    assert "\n\n\n" not in again


@pytest.mark.parametrize(
    ("role", "node_id", "parent"),
    [("device", "dev 7", None), ("device", "dev/7", None), ("gateway", "gw-1", "+"),
     ("cloud", "cloud", "sky"), ("robot", "r-1", None)],
)  # fmt: skip
def test_bad_ids_and_roles_are_refused_in_one_line(
    tmp_path: Path, role: str, node_id: str, parent: str | None
) -> None:
    with pytest.raises(credentials.CredentialsError) as err:
        credentials.add(
            role, node_id, passwd_file=tmp_path / "passwd", acl_file=tmp_path / "acl",
            keys_dir=tmp_path / "keys", parent=parent,
        )  # fmt: skip
    assert "\n" not in str(err.value)
    assert not (tmp_path / "passwd").exists()


def test_a_missing_mosquitto_passwd_is_reported_with_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefl.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))
    argv = ["credentials", "add", "--role", "device", "--id", "dev-7", "--parent", "gw-1",
            "--passwd-file", str(tmp_path / "passwd"), "--acl-file", str(tmp_path / "acl"),
            "--keys-dir", str(tmp_path / "keys")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "mosquitto_passwd not found" in err and "apt-get install" in err
    assert not (tmp_path / "acl").exists() and not (tmp_path / "keys").exists()


def _sections(printed: str) -> list[str]:
    return [s for s in re.split(r"^# --- .*$", printed, flags=re.MULTILINE) if s.strip()]


def test_printed_config_lines_load_as_the_nodes_settings() -> None:
    key = "ab" * 32
    gw_private, gw_public = generate_key_pair()
    cloud_public = generate_key_pair()[1]
    device = credentials.Credential(
        "device", "dev-7", "pw", key, None, "gw-2", parent_key=gw_public
    )
    own, parents = map(tomllib.loads, _sections(credentials.config_lines(device)))
    settings = DeviceSettings(**own)
    assert (settings.id, settings.gateway, settings.hmac_key) == ("dev-7", "gw-2", key)
    assert (settings.mqtt.username, settings.mqtt.password) == ("dev-7", "pw")
    assert settings.parent_key == gw_public
    assert AggregatorSettings(id="gw-2", **parents).keys == {"dev-7": key}
    gateway = credentials.Credential(
        "gateway", "gw-2", "pw", key, None, None, model_key=gw_private, parent_key=cloud_public
    )
    own, parents, children = map(tomllib.loads, _sections(credentials.config_lines(gateway)))
    node = AggregatorSettings(**own)
    assert (node.parent, node.model_key, node.parent_key) == ("cloud", gw_private, cloud_public)
    assert node.require_signature
    assert AggregatorSettings(id="cloud", role="cloud", **parents).keys == {"gw-2": key}
    assert DeviceSettings(id="dev-8", **children).parent_key == gw_public
    cloud_private, cloud_public = generate_key_pair()
    cloud = credentials.Credential(
        "cloud", "cloud", "pw", None, None, None, model_key=cloud_private
    )
    own, children = map(tomllib.loads, _sections(credentials.config_lines(cloud)))
    assert AggregatorSettings(role="cloud", **own).model_key == cloud_private
    assert AggregatorSettings(id="gw-3", **children).parent_key == cloud_public


def _add(tmp_path: Path, role: str, node_id: str, parent: str | None = None) -> Any:
    return credentials.add(
        role, node_id, passwd_file=tmp_path / "passwd", acl_file=tmp_path / "acl",
        keys_dir=tmp_path / "keys", parent=parent,
    )  # fmt: skip


def test_a_device_without_a_parent_is_refused_in_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edgefl.cli import main

    argv = ["credentials", "add", "--role", "device", "--id", "dev-7",
            "--passwd-file", str(tmp_path / "passwd"), "--acl-file", str(tmp_path / "acl"),
            "--keys-dir", str(tmp_path / "keys")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--parent" in err, err
    assert not (tmp_path / "passwd").exists() and not (tmp_path / "acl").exists()
    with pytest.raises(credentials.CredentialsError, match="--parent"):
        acl.acl_rules("device", "dev-7")


def test_a_device_is_not_pinned_under_a_node_that_is_not_a_gateway(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "set_password", lambda *args: None)
    _add(tmp_path, "cloud", "cloud")
    _add(tmp_path, "device", "dev-1", "gw-1")
    for parent in ("cloud", "dev-1"):
        with pytest.raises(credentials.CredentialsError, match="not a gateway"):
            _add(tmp_path, "device", "dev-7", parent)
    assert "dev-7" not in acl.acl_users((tmp_path / "acl").read_text())


def test_gateways_and_the_cloud_keep_a_model_key_and_children_are_told_its_public_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "set_password", lambda *args: None)
    cloud = _add(tmp_path, "cloud", "cloud")
    gateway = _add(tmp_path, "gateway", "gw-1")
    device = _add(tmp_path, "device", "dev-1", "gw-1")
    for node in (cloud, gateway):
        key_file = tmp_path / "keys" / f"{node.id}.model.key"
        assert key_file.read_text().strip() == node.model_key
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert device.model_key is None and device.hmac_key is not None
    assert gateway.parent_key == public_hex(load_private_key(cloud.model_key))
    assert device.parent_key == public_hex(load_private_key(gateway.model_key))
    assert _add(tmp_path, "gateway", "gw-1").model_key == gateway.model_key  # kept
    lone = _add(tmp_path, "device", "dev-2", "gw-5")  # its gateway has no key here yet
    assert lone.parent_key is None
    assert "parent_key" not in tomllib.loads(_sections(credentials.config_lines(lone))[0])


# ----------------------------------------------------------------------- docs


def test_every_status_field_and_rejection_reason_is_documented() -> None:
    documented = documented_fields()
    status_fields = {f.alias or name for name, f in Status.model_fields.items()}
    assert status_fields <= documented, sorted(status_fields - documented)
    reasons = {f"rejected_{r.value}" for r in Reason}
    assert "rejected_<reason>" in documented or reasons <= documented
