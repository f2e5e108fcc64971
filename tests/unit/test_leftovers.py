"""Which retained topics a simulation's clean-up takes as its own: its nodes', no others."""

from __future__ import annotations

from edgefl.simulator.leftovers import owned
from edgefl.topics import Topics

T = Topics()
NODES = {"cloud", "gw-1"}


def test_the_runs_statuses_models_chunks_and_announcements_are_its_own() -> None:
    for topic in (
        T.status("cloud", "gw-1"),
        T.status("gw-1", "dev-3"),
        T.model("gw-1"),
        T.model("cloud") + "/chunk/4",
        "edgefl/gw-1/round",
        "edgefl/cloud/delta",
    ):
        assert owned(T, topic, NODES), topic


def test_another_fleets_and_foreign_topics_are_not() -> None:
    for topic in (
        T.status("gw-2", "dev-3"),
        T.model("site-9"),
        "edgefl/metrics/device/dev-3",
        "other/gw-1/model",
        "edgefl/gw-1/model/chunk/x",
        "edgefl/gw-1/nonsense",
    ):
        assert not owned(T, topic, NODES), topic
