"""What a node knows about itself: one ``Reading`` of battery, link and resources.

Plain data, shared by the OS readers, the simulated models and the policy.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..wire.schemas import LINKS, Link

__all__ = ["LINKS", "Link", "Reading"]


@dataclass
class Reading:
    """One look at a node's resources. ``battery`` is None on mains power."""

    battery: float | None = None
    charging: bool = True
    link: Link = "unknown"
    uplink_kbps: float | None = None
    cpu_temp_c: float | None = None
    mem_available_mb: float | None = None
    cuda: bool = False
