"""The device agent: receive a model, train on local data, send back a quantized update.

``agent`` is the asyncio shell; ``update`` (encoding, persisted progress), ``policy``
(whether to take a round) and ``delivery`` (draining the outbox) are its parts. An
update the agent computed is never lost before PUBACK nor sent under two seqs.
"""

from __future__ import annotations

from ..delivery import Uploader
from .agent import DeviceAgent, serve_device
from .policy import DEADLINE_PASSED, decide, policy_of, selected
from .update import Progress, UpdateEncoder

__all__ = [
    "DEADLINE_PASSED",
    "DeviceAgent",
    "Progress",
    "UpdateEncoder",
    "Uploader",
    "decide",
    "policy_of",
    "selected",
    "serve_device",
]
