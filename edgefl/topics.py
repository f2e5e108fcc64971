"""Every MQTT topic edgefl uses, built and parsed in this one place.

A node's children publish under the node's id: ``{prefix}/{node}/update/{child}``;
a node announces its rounds on ``{node}/round`` and its models on ``{node}/delta``
and ``{node}/model``. The cloud is the node ``cloud``. Never build a topic elsewhere.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from typing import Literal

from .errors import EdgeflError

#: Every id (device, node, sender): what a topic level and a wire ``sender`` may hold.
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ID_RE = re.compile(ID_PATTERN)
Kind = Literal["round", "delta", "model", "update", "status", "metrics"]
#: Who publishes: a device, or an aggregation node of one of the two tiers.
Role = Literal["device", "gateway", "cloud"]
ROLES: tuple[Role, ...] = typing.get_args(Role)


class TopicError(EdgeflError, ValueError):
    """A topic or id that does not follow the edgefl topic scheme."""


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid edgefl id, else raise ``TopicError``."""
    if not isinstance(value, str) or not ID_RE.match(value):
        raise TopicError(f"invalid {what} {value!r}: use 1-64 of A-Z a-z 0-9 _ -")
    return value


@dataclass(frozen=True)
class ParsedTopic:
    kind: Kind
    node: str  # the aggregation node (gateway id, or "cloud"); role for metrics
    sender: str | None  # the child for update/status, the id for metrics


@dataclass(frozen=True)
class Topics:
    """Topic names under one prefix (``edgefl`` by default)."""

    prefix: str = "edgefl"

    def __post_init__(self) -> None:
        parts = self.prefix.split("/")
        if not self.prefix or any(not p or "+" in p or "#" in p for p in parts):
            raise TopicError(f"invalid topic prefix {self.prefix!r}")

    def round(self, node: str) -> str:
        """The round announcement: version, round, selection, deadline, receipts (small)."""
        return f"{self.prefix}/{check_id(node, 'node id')}/round"

    def delta(self, node: str) -> str:
        """The latest version as a quantized delta against the one before it."""
        return f"{self.prefix}/{check_id(node, 'node id')}/delta"

    def model(self, node: str) -> str:
        """The latest version whole: for a child that joins late or missed a version."""
        return f"{self.prefix}/{check_id(node, 'node id')}/model"

    def update(self, node: str, sender: str) -> str:
        return f"{self.prefix}/{check_id(node, 'node id')}/update/{check_id(sender, 'sender id')}"

    def status(self, node: str, sender: str) -> str:
        return f"{self.prefix}/{check_id(node, 'node id')}/status/{check_id(sender, 'sender id')}"

    def metrics(self, role: str, sender: str) -> str:
        if role not in ROLES:
            raise TopicError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
        return f"{self.prefix}/metrics/{role}/{check_id(sender, 'sender id')}"

    # Subscription filters -------------------------------------------------
    def model_filters(self, node: str) -> list[str]:
        """The model topic and its retained chunk sub-topics (large models, small brokers)."""
        return [self.model(node), f"{self.model(node)}/chunk/+"]

    def downlink(self, node: str) -> list[str]:
        """Every topic a node publishes to its children: announcement, delta, whole model."""
        return [self.round(node), self.delta(node), *self.model_filters(node)]

    def updates_of(self, node: str) -> str:
        return f"{self.prefix}/{check_id(node, 'node id')}/update/+"

    def statuses_of(self, node: str) -> str:
        return f"{self.prefix}/{check_id(node, 'node id')}/status/+"

    def all_metrics(self) -> str:
        return f"{self.prefix}/metrics/#"

    def all_statuses(self) -> str:
        return f"{self.prefix}/+/status/+"

    def parse(self, topic: str) -> ParsedTopic:
        """Split a topic of this prefix into kind, node and sender; ``TopicError`` if foreign."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise TopicError(f"topic {topic!r} is not under {self.prefix!r}")
        parts = topic[len(head) :].split("/")
        if len(parts) == 3 and parts[0] == "metrics" and parts[1] in ROLES:
            return ParsedTopic("metrics", parts[1], check_id(parts[2]))
        if len(parts) == 2 and parts[1] in ("round", "delta", "model"):
            kind2: Kind = (
                "round" if parts[1] == "round" else "delta" if parts[1] == "delta" else "model"
            )
            return ParsedTopic(kind2, check_id(parts[0]), None)
        if len(parts) == 3 and parts[1] in ("update", "status"):
            kind: Kind = "update" if parts[1] == "update" else "status"
            return ParsedTopic(kind, check_id(parts[0]), check_id(parts[2]))
        raise TopicError(f"unknown topic {topic!r}")
