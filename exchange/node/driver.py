"""The Raft driver: runs the sans-I/O core (exchange.raft.core) against a Storage, a
Transport and an Applier, honouring the Ready contract.

Each Ready is handled in phases, in this order, so that nothing leaves the node before
it is durable and nothing is applied twice:

    take_ready -> write -> sync (durable) -> finish: send, install, apply, advance, compact

A node runs the phases in `run()` on its asyncio loop, with the disk phases in its
write-ahead log's thread (a Ready that needs no fsync, `Storage.needs_sync`, is written
in place); the seeded simulation (tests/sim) calls the same phases as
separate events with a fake disk and network, and may crash the node between any two.
The driver reads no clock and starts no thread: whoever runs it ticks it and steps it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from exchange.node import metrics as m
from exchange.raft.core import RaftNode, Ready, Role
from exchange.raft.messages import Message
from exchange.raft.types import Entry, SnapshotMeta

T = TypeVar("T")

DiskRunner = Callable[..., Awaitable[Any]]


class Storage(Protocol):
    """The node's durable Raft log."""

    def write(self, rd: Ready) -> None:
        """Write a Ready's snapshot, entries and hard state (durable once `sync` returns)."""

    def sync(self) -> None:
        """Make everything written so far durable."""

    def compact(self, meta: SnapshotMeta) -> None:
        """Drop the entries up to `meta.index`, durably (the state holds them)."""

    def needs_sync(self, rd: Ready) -> bool:
        """False when writing `rd` is a small write with no fsync (the commit index
        alone moved): the runner then writes it in place instead of handing it to the
        disk thread and back."""


class Transport(Protocol):
    """Raft messages to peers; best effort (Raft retries)."""

    def send(self, messages: Sequence[Message]) -> None: ...


class Applier(Protocol):
    """The state machine the committed entries go to."""

    def role_changed(self, role: Role, leader_id: str) -> None:
        """This node's role or leader changed (called before the Ready is persisted)."""

    async def apply(self, entries: Sequence[Entry]) -> None:
        """Apply committed entries, in order; each index at most once."""

    def install(self, meta: SnapshotMeta) -> None:
        """Fetch the state up to `meta` from elsewhere, then call the driver's
        `installed(meta)`."""

    def compact_index_max(self) -> int:
        """The highest Raft index the log may be compacted up to (nothing a lagging
        member still needs from the log)."""


@dataclass(frozen=True)
class CompactionSettings:
    """When and how far the driver compacts the log."""

    every_entries: int  # compact once this many applied entries are held
    log_bytes_max: int  # or once the log holds more than this
    keep_entries: int  # entries kept behind the applied index
    keep_bytes: int


async def run_here(fn: Callable[..., T], *args: Any) -> T:
    """The disk runner that calls the storage in place (the simulation's)."""
    return fn(*args)


class RaftDriver:
    """One node's Raft core, driven through its Storage, Transport and Applier."""

    def __init__(self, core: RaftNode, storage: Storage, transport: Transport,
                 applier: Applier, compaction: CompactionSettings,
                 on_input: Callable[[], None], on_disk: DiskRunner = run_here) -> None:
        """`on_input`: called whenever the core may have a new Ready (the runner wakes);
        `on_disk(fn, *args)`: how storage calls run (a node's WAL thread)."""
        self.core = core
        self.storage = storage
        self.transport = transport
        self.applier = applier
        self.compaction = compaction
        self._on_input = on_input
        self._on_disk = on_disk
        self._written: Ready | None = None  # written, not yet durable
        self._durable: Ready | None = None  # durable, not yet finished

    # -- inputs ----------------------------------------------------------------------
    def tick(self) -> None:
        self.core.tick()
        self._on_input()

    def step(self, message: Message) -> None:
        """A message from a peer (RaftError: refused, nothing changed)."""
        self.core.step(message)
        self._on_input()

    def poke(self) -> None:
        """Something was proposed to the core directly: look for a Ready."""
        self._on_input()

    def installed(self, meta: SnapshotMeta) -> None:
        """The applier holds the state up to `meta`: Raft may go on from there."""
        self.core.restore_snapshot_done(meta)
        self._on_input()

    def start(self) -> None:
        """After a restart: fetch the state a recovered snapshot names, if any."""
        if self.core.pending_snapshot is not None:
            self.applier.install(self.core.pending_snapshot)

    # -- the Ready phases --------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """A Ready is between `take_ready` and the end of `finish`."""
        return self._written is not None or self._durable is not None

    def take_ready(self) -> Ready | None:
        assert not self.busy, "a Ready is still being handled"
        rd = self.core.ready()
        if rd is not None and rd.soft_state is not None:
            self.applier.role_changed(rd.soft_state.role, rd.soft_state.leader_id)
        return rd

    def write(self, rd: Ready) -> None:
        assert self._written is None and self._durable is None
        self.storage.write(rd)
        self._written = rd

    def sync(self) -> None:
        assert self._written is not None
        self.storage.sync()
        self._durable, self._written = self._written, None

    def persist(self, rd: Ready) -> None:
        """write, then sync (what a node does in its WAL thread)."""
        self.write(rd)
        self.sync()

    async def finish(self, rd: Ready) -> None:
        """After `sync`: send, start an install, apply, advance, compact."""
        assert self._durable is rd, "a Ready is sent or applied before it is durable"
        self.transport.send(rd.messages)
        if rd.snapshot is not None:
            self.applier.install(rd.snapshot)
        if rd.committed_entries:
            await self.applier.apply(rd.committed_entries)
        self._durable = None
        self.core.advance(rd)
        await self.maybe_compact()

    async def maybe_compact(self) -> None:
        """Compact the log once it holds `every_entries` applied entries or more than
        `log_bytes_max`, never beyond what the applier allows."""
        core, settings = self.core, self.compaction
        m.RAFT_LOG_BYTES.set(core.log_bytes)
        first = core.snapshot_meta.index
        if (core.applied_index - first < settings.every_entries
                and core.log_bytes <= settings.log_bytes_max) or \
                core.pending_snapshot is not None:
            return
        target = min(core.compact_point(settings.keep_entries, settings.keep_bytes),
                     self.applier.compact_index_max())
        if target <= first:
            return
        meta = core.compact(target)
        await self._on_disk(self.storage.compact, meta)

    async def run(self, wake: asyncio.Event) -> None:
        """A node's loop: every Ready, as soon as `wake` is set."""
        while True:
            await wake.wait()
            wake.clear()
            while (rd := self.take_ready()) is not None:
                if self.storage.needs_sync(rd):
                    await self._on_disk(self.persist, rd)
                else:
                    self.persist(rd)
                await self.finish(rd)


