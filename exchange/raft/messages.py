"""Messages exchanged by Raft peers.

Plain values: the core (`core.py`) consumes and produces them, the gRPC transport maps
them to protobuf and back. Snapshot responses travel as APPEND_RESP (as in etcd): a
follower that installed a snapshot answers with the index it now holds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from exchange.raft.types import Entry, SnapshotMeta

__all__ = ["Message", "MessageType", "is_response"]


class MessageType(enum.IntEnum):
    """What a message asks or answers."""

    PRE_VOTE = 0  # "would you vote for me at term+1?" (changes nobody's term)
    PRE_VOTE_RESP = 1
    VOTE = 2  # RequestVote
    VOTE_RESP = 3
    APPEND = 4  # AppendEntries carrying entries (possibly none)
    APPEND_RESP = 5  # also the answer to SNAPSHOT
    HEARTBEAT = 6  # leader liveness plus commit index, no entries
    HEARTBEAT_RESP = 7
    SNAPSHOT = 8  # "your log is behind my compaction point: install this snapshot"
    TIMEOUT_NOW = 9  # leadership transfer: "campaign now, skipping pre-vote and lease"


_RESPONSES = frozenset(
    {
        MessageType.PRE_VOTE_RESP,
        MessageType.VOTE_RESP,
        MessageType.APPEND_RESP,
        MessageType.HEARTBEAT_RESP,
    }
)


def is_response(message_type: MessageType) -> bool:
    """True for message types that answer a request."""
    return message_type in _RESPONSES


@dataclass(frozen=True, slots=True)
class Message:
    """One Raft message.

    Field meaning per type (unused fields keep their defaults):

    - PRE_VOTE / VOTE: `term` is the term campaigned for, (`index`, `log_term`) the
      candidate's last entry, `force` set when campaigning on TIMEOUT_NOW (voters then
      ignore their leader lease).
    - PRE_VOTE_RESP / VOTE_RESP: `reject` false when granted; `term` is the term granted,
      or the voter's own term when rejecting.
    - APPEND: (`index`, `log_term`) identify the entry preceding `entries`; `commit` is
      the leader's commit index. `quiet` is set on one without entries to a follower
      known to hold everything up to `index` (it only moves the commit index): accepted,
      it is not answered, as the answer would tell the leader nothing new.
    - APPEND_RESP: `index` is the last index known to match the leader's log, or on
      `reject` the rejected `index` of the APPEND; then (`reject_hint`, `log_term`) give
      the follower's best guess of where the logs may still agree (Raft paper 5.3).
    - HEARTBEAT: `commit` is min(leader commit, what the follower is known to hold).
    - SNAPSHOT: `snapshot` is the leader's compaction point; the state itself is
      transferred by the application, not by Raft.
    """

    type: MessageType
    from_id: str
    to_id: str
    term: int
    log_term: int = 0
    index: int = 0
    entries: tuple[Entry, ...] = ()
    commit: int = 0
    reject: bool = False
    reject_hint: int = 0
    snapshot: SnapshotMeta | None = None
    force: bool = False
    quiet: bool = False
