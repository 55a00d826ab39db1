"""Raft messages to and from their protobuf form (`exchange.v1.RaftMessage`), shared by
the peer links (peers.py, raftlink.py) and the gRPC peer service."""

from __future__ import annotations

from exchange.raft.messages import Message, MessageType
from exchange.raft.types import ConfState, Entry, EntryKind, SnapshotMeta
from exchange.v1 import peer_pb2

ENTRIES_PER_MESSAGE_MAX = 10_000


class BadPeerMessage(ValueError):
    """A protobuf Raft message that does not convert to a valid Message."""


def message_to_proto(m: Message) -> peer_pb2.RaftMessage:
    out = peer_pb2.RaftMessage(
        type=int(m.type), from_id=m.from_id, to_id=m.to_id, term=m.term, log_term=m.log_term,
        index=m.index, commit=m.commit, reject=m.reject, reject_hint=m.reject_hint,
        force=m.force, quiet=m.quiet,
        entries=[peer_pb2.RaftEntry(term=e.term, index=e.index, kind=int(e.kind), data=e.data)
                 for e in m.entries])
    if m.snapshot is not None:
        out.snapshot.CopyFrom(peer_pb2.RaftSnapshotMeta(
            index=m.snapshot.index, term=m.snapshot.term, voters=list(m.snapshot.conf.voters),
            learners=list(m.snapshot.conf.learners)))
    return out


def message_from_proto(p: peer_pb2.RaftMessage) -> Message:
    try:
        mtype = MessageType(p.type)
        entries = tuple(Entry(term=e.term, index=e.index, kind=EntryKind(e.kind), data=e.data)
                        for e in p.entries)
    except ValueError as exc:
        raise BadPeerMessage(str(exc)) from exc
    if len(entries) > ENTRIES_PER_MESSAGE_MAX:
        raise BadPeerMessage("too many entries in one message")
    snapshot = None
    if p.HasField("snapshot"):
        snapshot = SnapshotMeta(index=p.snapshot.index, term=p.snapshot.term,
                                conf=ConfState(voters=tuple(p.snapshot.voters),
                                               learners=tuple(p.snapshot.learners)))
    return Message(type=mtype, from_id=p.from_id, to_id=p.to_id, term=p.term,
                   log_term=p.log_term, index=p.index, entries=entries, commit=p.commit,
                   reject=p.reject, reject_hint=p.reject_hint, snapshot=snapshot, force=p.force,
                   quiet=p.quiet)
