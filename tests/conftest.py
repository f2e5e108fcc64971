"""Shared fixtures: real Mosquitto brokers on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from edgefl.broker import INSTALL_HINT, RunningBroker, mosquitto_path, start_mosquitto

SMALL_PACKET = 128 * 1024


def _require_mosquitto() -> None:
    if mosquitto_path() is None:
        pytest.fail(f"the integration tests need a real mosquitto binary; {INSTALL_HINT}")


@pytest.fixture
def broker() -> Iterator[RunningBroker]:
    """A Mosquitto with the repository's mosquitto.conf; stopped after the test."""
    _require_mosquitto()
    running = start_mosquitto()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def small_broker() -> Iterator[RunningBroker]:
    """A Mosquitto that refuses packets over 128 KiB: payloads must travel in chunks."""
    _require_mosquitto()
    running = start_mosquitto(extra=[f"max_packet_size {SMALL_PACKET}"])
    try:
        yield running
    finally:
        running.stop()


#: Modules whose tests run longest (a random fault schedule, whole simulated fleets),
#: collected first so that the workers start on them and finish the short ones together.
LONGEST_FIRST = (
    "test_fault_schedule.py",
    "test_simulator.py",
    "test_node_faults.py",
    "test_robustness.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)
