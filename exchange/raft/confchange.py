"""Single-server membership changes and their encoding in CONFIG log entries.

A CONFIG entry carries the change *and* the full voter set it produces, so a node can
take the configuration from the latest CONFIG entry alone, whatever it started from
(Raft dissertation 4.1: a server uses the latest configuration in its log, committed
or not).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass

from exchange.raft.types import ConfState

__all__ = [
    "ConfChange",
    "ConfChangeOp",
    "InvalidConfEntry",
    "NODE_ID_BYTES_MAX",
    "VOTERS_MAX",
    "decode_conf_entry",
    "encode_conf_entry",
]

NODE_ID_BYTES_MAX = 256
VOTERS_MAX = 64
_CONF_ENTRY_BYTES_MAX = 4 + VOTERS_MAX * (NODE_ID_BYTES_MAX + 8) + 512


class InvalidConfEntry(ValueError):
    """A CONFIG entry's data does not decode to a valid change."""


class ConfChangeOp(enum.Enum):
    ADD_VOTER = "add_voter"
    REMOVE_VOTER = "remove_voter"


@dataclass(frozen=True, slots=True)
class ConfChange:
    """Add or remove one voter."""

    op: ConfChangeOp
    node_id: str

    def apply_to(self, conf: ConfState) -> ConfState:
        """The configuration after this change; ValueError if it does not apply."""
        _check_node_id(self.node_id)
        voters = set(conf.voters)
        if self.op is ConfChangeOp.ADD_VOTER:
            if self.node_id in voters:
                raise ValueError(f"{self.node_id!r} is already a voter")
            if len(voters) >= VOTERS_MAX:
                raise ValueError(f"at most {VOTERS_MAX} voters")
            voters.add(self.node_id)
        else:
            if self.node_id not in voters:
                raise ValueError(f"{self.node_id!r} is not a voter")
            if len(voters) == 1:
                raise ValueError("cannot remove the last voter")
            voters.remove(self.node_id)
        return ConfState(voters=tuple(sorted(voters)), learners=conf.learners)


def _check_node_id(node_id: str) -> None:
    if not node_id or len(node_id.encode()) > NODE_ID_BYTES_MAX:
        raise ValueError(f"node id must be 1..{NODE_ID_BYTES_MAX} bytes: {node_id!r}")


def encode_conf_entry(change: ConfChange, conf_after: ConfState) -> bytes:
    """Canonical bytes for a CONFIG entry (sorted-key JSON)."""
    body = {"op": change.op.value, "node_id": change.node_id, "voters": list(conf_after.voters)}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def decode_conf_entry(data: bytes) -> tuple[ConfChange, ConfState]:
    """Inverse of `encode_conf_entry`; InvalidConfEntry on anything malformed."""
    if len(data) > _CONF_ENTRY_BYTES_MAX:
        raise InvalidConfEntry(f"config entry of {len(data)} bytes is too large")
    try:
        body = json.loads(data)
        change = ConfChange(ConfChangeOp(body["op"]), body["node_id"])
        voters = body["voters"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidConfEntry(f"config entry does not decode: {exc}") from exc
    if not isinstance(change.node_id, str) or not isinstance(voters, list):
        raise InvalidConfEntry("config entry fields have the wrong types")
    if not voters or len(voters) > VOTERS_MAX:
        raise InvalidConfEntry(f"config entry must name 1..{VOTERS_MAX} voters")
    if any(not isinstance(v, str) for v in voters) or voters != sorted(set(voters)):
        raise InvalidConfEntry("config entry voters must be distinct sorted strings")
    try:
        for voter in voters:
            _check_node_id(voter)
        _check_node_id(change.node_id)
    except ValueError as exc:
        raise InvalidConfEntry(str(exc)) from exc
    added = change.op is ConfChangeOp.ADD_VOTER
    if (change.node_id in voters) != added:
        raise InvalidConfEntry("config entry voters do not reflect its change")
    return change, ConfState(voters=tuple(voters))
