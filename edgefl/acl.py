"""The broker's access rules: what each role's id may publish and read, as Mosquitto ACL
``user`` blocks, and their place in an ACL file. Pure text; no file is written here.
"""

from __future__ import annotations

import re

from .errors import EdgeflError
from .topics import ROLES as NODE_ROLES
from .topics import Topics

ROLES = (*NODE_ROLES, "monitor")  # a monitor only reads
ACL_HEADER = """\
# Mosquitto ACL for edgefl: one `user` block per broker user, whose name is the
# node id that appears in its topics. `edgefl credentials add` writes and
# replaces these blocks. Topics are spelled out per user rather than with
# `pattern ... %u` lines because a pattern applies to every user, and the roles
# need different rights: a monitor may write nothing, a device must not write
# a model.
#
# Bridges announce their connection state on $SYS; this is the one pattern.
pattern write $SYS/broker/connection/%c/state
"""

_BLOCK_START = "# edgefl "
_BLOCK_RE = re.compile(r"^# edgefl (?P<role>\w+) (?P<id>[A-Za-z0-9_-]{1,64})$")


class CredentialsError(EdgeflError):
    """A request that cannot be carried out; the message is one line for the user."""


def acl_rules(
    role: str, node_id: str, *, prefix: str = "edgefl", parent: str | None = None
) -> list[str]:
    """The ``topic`` lines that give ``node_id`` exactly the rights of ``role``.

    A device writes only its own update and status under its gateway (``parent``,
    required: a wildcard would include the cloud's topics) and reads that gateway's
    model; a gateway owns its model, reads its children, and talks to its parent as
    a child; the cloud is a node without a parent; a monitor only reads metrics and
    statuses.
    """
    if role not in ROLES:
        raise CredentialsError(f"unknown role {role!r}: one of {', '.join(ROLES)}")
    if role == "device" and parent is None:
        raise CredentialsError("a device needs --parent GATEWAY: the gateway it reports to")
    t = Topics(prefix)
    p = prefix
    if role == "monitor":
        return [f"topic read {t.all_metrics()}", f"topic read {p}/+/status/#"]
    rules: list[str] = []
    if role in ("gateway", "cloud"):
        rules += _node_rules(t, node_id)
    if role == "device" and parent is not None:
        rules += _child_rules(p, node_id, parent)
    if role == "gateway":
        rules += _child_rules(p, node_id, parent or "cloud")
    rules.append(f"topic write {t.metrics(role, node_id)}")
    return rules


def _node_rules(t: Topics, node_id: str) -> list[str]:
    return [
        *(f"topic write {f}" for f in t.downlink(node_id)),
        f"topic read {t.updates_of(node_id)}",
        f"topic read {t.statuses_of(node_id)}",
    ]


def _child_rules(prefix: str, node_id: str, parent: str) -> list[str]:
    t = Topics(prefix)
    return [
        f"topic write {t.update(parent, node_id)}",
        f"topic write {t.status(parent, node_id)}",
        *(f"topic read {f}" for f in t.downlink(parent)),
    ]


def acl_block(role: str, node_id: str, *, prefix: str = "edgefl", parent: str | None = None) -> str:
    """A complete ``user`` block, marked so that a later ``add`` can replace it."""
    lines = [f"{_BLOCK_START}{role} {node_id}", f"user {node_id}"]
    lines += acl_rules(role, node_id, prefix=prefix, parent=parent)
    return "\n".join(lines) + "\n"


def upsert_acl(text: str, node_id: str, block: str) -> str:
    """``text`` with the block of ``node_id`` replaced in place by ``block``, or appended."""
    kept: list[str] = []
    at: int | None = None
    skipping = False
    for line in text.splitlines():
        mark = _BLOCK_RE.match(line)
        if mark is not None:
            skipping = mark["id"] == node_id
            if skipping and at is None:
                at = len(kept)
        elif not line.strip():
            skipping = False  # blocks written here end at a blank line
        if not skipping:
            kept.append(line)
    if not any(line.strip() for line in kept):
        kept = ACL_HEADER.splitlines()
    new = block.rstrip("\n").splitlines()
    if at is None:
        kept += ["", *new]
    else:
        kept[at:at] = new
    # Removing a block leaves its blank separator behind: squeeze repeats.
    lines = [ln for i, ln in enumerate(kept) if ln.strip() or (i and kept[i - 1].strip())]
    while lines and not lines[-1].strip():
        lines.pop()
    return "\n".join(lines) + "\n"


def acl_users(text: str) -> dict[str, str]:
    """``{id: role}`` of every block written by ``edgefl credentials``."""
    return {m["id"]: m["role"] for m in map(_BLOCK_RE.match, text.splitlines()) if m}
