"""The device agent: receive a model, train on local data, send back a quantized update.

``agent`` is the asyncio shell; ``update`` (encoding, persisted progress), ``policy``
(whether to take a round) and ``rounds`` are its parts; ``edgefl.delivery`` drains
its outbox. An update the agent computed leaves the device only on its node's
receipt, and is never sent under two seqs.
"""

from __future__ import annotations

from .agent import DeviceAgent, serve_device
from .policy import DEADLINE_PASSED, decide, policy_of, selected
from .update import Progress, UpdateEncoder

__all__ = [
    "DEADLINE_PASSED",
    "DeviceAgent",
    "Progress",
    "UpdateEncoder",
    "decide",
    "policy_of",
    "selected",
    "serve_device",
]
