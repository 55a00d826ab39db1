"""The production Storage and Transport of the Raft driver: the write-ahead log on disk
and the peer links over gRPC."""

from __future__ import annotations

from collections.abc import Sequence

from exchange.node import metrics as m
from exchange.node.peers import PeerLinks
from exchange.raft.core import Ready
from exchange.raft.messages import Message
from exchange.raft.types import SnapshotMeta
from exchange.raft.wal import WriteAheadLog


class WalStorage:
    """The driver's Storage over the write-ahead log, which fsyncs in each save: a
    Ready is durable when `write` returns, and `sync` has nothing left to do."""

    def __init__(self, wal: WriteAheadLog) -> None:
        self.wal = wal

    def write(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.wal.save_snapshot(rd.snapshot)
        if rd.entries_to_persist or rd.hard_state is not None:
            with m.WAL_SECONDS.time():
                self.wal.save(rd.hard_state, list(rd.entries_to_persist))

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
