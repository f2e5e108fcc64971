from __future__ import annotations

import pytest

from edgefl.topics import ParsedTopic, TopicError, Topics


def test_topics_follow_the_design_table() -> None:
    t = Topics()
    assert t.model("gw-1") == "edgefl/gw-1/model"
    assert t.update("gw-1", "dev-7") == "edgefl/gw-1/update/dev-7"
    assert t.status("gw-1", "dev-7") == "edgefl/gw-1/status/dev-7"
    assert t.model("cloud") == "edgefl/cloud/model"
    assert t.update("cloud", "gw-1") == "edgefl/cloud/update/gw-1"
    assert t.metrics("device", "dev-7") == "edgefl/metrics/device/dev-7"
    assert t.updates_of("gw-1") == "edgefl/gw-1/update/+"


@pytest.mark.parametrize(
    ("topic", "parsed"),
    [
        ("edgefl/gw-1/model", ParsedTopic("model", "gw-1", None)),
        ("edgefl/gw-1/update/dev-7", ParsedTopic("update", "gw-1", "dev-7")),
        ("edgefl/cloud/status/gw_2", ParsedTopic("status", "cloud", "gw_2")),
        ("edgefl/metrics/gateway/gw-1", ParsedTopic("metrics", "gateway", "gw-1")),
    ],
)
def test_parse_inverts_build(topic: str, parsed: ParsedTopic) -> None:
    assert Topics().parse(topic) == parsed


@pytest.mark.parametrize(
    "topic",
    ["other/gw/model", "edgefl/gw/unknown", "edgefl/gw/update/bad id", "edgefl/gw/update/a/b"],
)
def test_foreign_topics_raise(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics().parse(topic)


@pytest.mark.parametrize("bad", ["", "a b", "x" * 65, "dev/1", "dev+", "#"])
def test_ids_are_validated(bad: str) -> None:
    with pytest.raises(TopicError):
        Topics().update("gw-1", bad)


def test_custom_prefix_and_invalid_prefix() -> None:
    assert Topics("fleet/eu").model("gw") == "fleet/eu/gw/model"
    assert Topics("fleet/eu").parse("fleet/eu/gw/update/d").sender == "d"
    with pytest.raises(TopicError):
        Topics("bad/+/prefix")
