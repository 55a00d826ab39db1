"""The production Storage and Transport of the Raft driver: the write-ahead log on disk
and the peer links (peers.py; mutual TLS frames, raftlink.py)."""

from __future__ import annotations

from collections.abc import Sequence

from exchange.node import metrics as m
from exchange.node.peers import PeerLinks
from exchange.raft.core import Ready
from exchange.raft.messages import Message
from exchange.raft.types import SnapshotMeta
from exchange.raft.wal import WriteAheadLog


class WalStorage:
    """The driver's Storage over the write-ahead log, which fsyncs in each save that
    needs it: a Ready is durable when `write` returns, and `sync` has nothing left to do.

    etcd's rule for what needs the fsync: entries, a snapshot, a new term or a vote. A
    Ready that only moves the commit index is written without one: the commit index
    need not survive a crash (after a restart it is at least what the block store has
    applied, and the leader tells it again), and that Ready is on the path of every
    commit at every node, where an fsync would add a disk round trip to each block."""

    def __init__(self, wal: WriteAheadLog) -> None:
        self.wal = wal

    def needs_sync(self, rd: Ready) -> bool:
        """`rd` holds something that must be durable before its messages go out."""
        if rd.snapshot is not None or rd.entries_to_persist:
            return True
        hs, held = rd.hard_state, self.wal.hard_state
        return hs is not None and (hs.term, hs.vote) != (held.term, held.vote)

    def write(self, rd: Ready) -> None:
        sync = self.needs_sync(rd)
        if rd.snapshot is not None:
            self.wal.save_snapshot(rd.snapshot)
        if rd.entries_to_persist or rd.hard_state is not None:
            with m.WAL_SECONDS.time():
                self.wal.save(rd.hard_state, list(rd.entries_to_persist), sync=sync)

    def sync(self) -> None:
        """Nothing: `write` returned after the log's fsync."""

    def compact(self, meta: SnapshotMeta) -> None:
        self.wal.save_snapshot(meta)


class LinksTransport:
    """The driver's Transport over the peer links (none until the node starts)."""

    def __init__(self) -> None:
        self.links: PeerLinks | None = None

    def send(self, messages: Sequence[Message]) -> None:
        if self.links is not None:
            self.links.send(messages)
