"""Values shared by the Raft core, its durable log and its transports.

Everything here is plain data: no I/O, no clock. The core (`core.py`) consumes and
produces these; the write-ahead log (`wal.py`) persists `Entry`, `HardState` and
`SnapshotMeta`; the gRPC transport maps `Message` to protobuf and back.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryKind(enum.IntEnum):
    """What a log entry carries."""

    NORMAL = 0  # application data (in the node: one block)
    NOOP = 1  # appended by a new leader so it can commit entries of earlier terms
    CONFIG = 2  # a membership change (data is an encoded ConfChange)


@dataclass(frozen=True, slots=True)
class Entry:
    """One Raft log entry."""

    term: int
    index: int
    kind: EntryKind = EntryKind.NORMAL
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class HardState:
    """What must be durable before any message that depends on it is sent."""

    term: int = 0
    vote: str = ""  # node id voted for in `term`, "" for none
    commit: int = 0


@dataclass(frozen=True, slots=True)
class ConfState:
    """The voting members of the cluster (node ids)."""

    voters: tuple[str, ...] = ()
    learners: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SnapshotMeta:
    """The point the log has been compacted to: entries <= index are in the state machine."""

    index: int = 0
    term: int = 0
    conf: ConfState = field(default_factory=ConfState)
