"""Raft messages over gRPC: conversion to and from protobuf, and the outbound side.

Each peer gets one long-lived client stream (`Peer.Raft`) fed from a bounded queue.
Raft tolerates loss, so a full queue drops the oldest messages rather than blocking the
node, and a broken stream is re-opened with back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Generic, TypeVar

import grpc
import structlog

from exchange.raft.messages import Message, MessageType
from exchange.raft.types import ConfState, Entry, EntryKind, SnapshotMeta
from exchange.v1 import ledger_pb2, peer_pb2, peer_pb2_grpc

log = structlog.get_logger("exchange.peers")

QUEUE_MESSAGES_MAX = 4096
BATCH_MESSAGES_MAX = 256
ENTRIES_PER_MESSAGE_MAX = 10_000
RECONNECT_DELAY_S_MIN = 0.05
RECONNECT_DELAY_S_MAX = 1.0
GRPC_MESSAGE_BYTES_MAX = 64 << 20
ATTESTATION_LINGER_S = 0.1
A = TypeVar("A")

SERVER_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
    # peers ping every 10 s to notice dead links; allow it, also without calls
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
]

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", GRPC_MESSAGE_BYTES_MAX),
    ("grpc.max_receive_message_length", GRPC_MESSAGE_BYTES_MAX),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class BadPeerMessage(ValueError):
    """A protobuf Raft message that does not convert to a valid Message."""


def message_to_proto(m: Message) -> peer_pb2.RaftMessage:
    out = peer_pb2.RaftMessage(
        type=int(m.type), from_id=m.from_id, to_id=m.to_id, term=m.term, log_term=m.log_term,
        index=m.index, commit=m.commit, reject=m.reject, reject_hint=m.reject_hint,
        force=m.force,
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
                   reject=p.reject, reject_hint=p.reject_hint, snapshot=snapshot, force=p.force)


class AttestationQueue(Generic[A]):
    """Attestations waiting for the link to one peer: bounded, and handed over whole to
    the link that replaces this one (nothing sends an attestation again)."""

    def __init__(self, size_max: int = QUEUE_MESSAGES_MAX) -> None:
        self.size_max = size_max
        self._items: list[A] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, attestation: A) -> bool:
        """Queue one (False: the queue is full and it is dropped)."""
        if len(self._items) >= self.size_max:
            return False
        self._items.append(attestation)
        return True

    def take(self) -> list[A]:
        """Everything queued, oldest first; the queue is left empty."""
        items, self._items = self._items, []
        return items

    def take_over(self, old: AttestationQueue[A]) -> None:
        """Put what `old` still holds ahead of this queue's own."""
        self._items = (old.take() + self._items)[:self.size_max]


class PeerLink:
    """The outbound stream to one peer."""

    def __init__(self, peer_id: str, address: str, credentials: grpc.ChannelCredentials,
                 on_state: Callable[[str, bool], None]) -> None:
        self.peer_id = peer_id
        self.address = address
        self._credentials = credentials
        self._queue: asyncio.Queue[peer_pb2.RaftMessage] = asyncio.Queue(QUEUE_MESSAGES_MAX)
        self._attestations: AttestationQueue[ledger_pb2.Attestation] = AttestationQueue()
        self._on_state = on_state
        self._task: asyncio.Task[None] | None = None
        self.channel = grpc.aio.secure_channel(address, credentials, options=CHANNEL_OPTIONS)
        self.stub = peer_pb2_grpc.PeerStub(self.channel)
        self.dropped = 0
        self.connected = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"peer-{self.peer_id}")

    def send_attestation(self, att: ledger_pb2.Attestation) -> None:
        """Attestations ride along with the next Raft messages to this peer, or go on
        their own after ATTESTATION_LINGER_S: countersigning adds no write of its own
        while blocks flow."""
        self._attestations.add(att)

    def take_over(self, old: PeerLink) -> None:
        """Carry over what the link this one replaces (new credentials or address) had
        not sent yet: its pending attestations (above all those of the block that changed
        the credentials, which nothing sends again) and its queued Raft messages."""
        self._attestations.take_over(old._attestations)
        while not old._queue.empty():
            self.send(old._queue.get_nowait())

    def send(self, m: peer_pb2.RaftMessage) -> None:
        while True:
            try:
                self._queue.put_nowait(m)
                return
            except asyncio.QueueFull:
                with contextlib.suppress(asyncio.QueueEmpty):
                    self._queue.get_nowait()
                    self.dropped += 1

    async def _batches(self) -> AsyncIterator[peer_pb2.RaftBatch]:
        while True:
            batch: list[peer_pb2.RaftMessage] = []
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), ATTESTATION_LINGER_S))
            except TimeoutError:
                if not self._attestations:
                    continue
            while len(batch) < BATCH_MESSAGES_MAX and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            atts = self._attestations.take()
            yield peer_pb2.RaftBatch(messages=batch, attestations=atts)

    async def _run(self) -> None:
        delay = RECONNECT_DELAY_S_MIN
        while True:
            try:
                call = self.stub.Raft(self._batches())
                self._set_connected(True)
                await call
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                if self.connected:
                    log.info("peer stream closed", peer=self.peer_id, code=exc.code().name,
                             detail=exc.details())
            except Exception as exc:  # noqa: BLE001 - keep the link alive whatever happens
                log.warning("peer stream failed", peer=self.peer_id, error=repr(exc))
            self._set_connected(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_S_MAX)
            if self.connected:
                delay = RECONNECT_DELAY_S_MIN

    def _set_connected(self, value: bool) -> None:
        if value != self.connected:
            self.connected = value
            self._on_state(self.peer_id, value)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        await self.channel.close()


class PeerLinks:
    """Outbound links to every other member."""

    def __init__(self, self_id: str, peers: Mapping[str, str],
                 credentials: grpc.ChannelCredentials) -> None:
        self.self_id = self_id
        self._credentials = credentials
        self.links = {pid: PeerLink(pid, addr, credentials, self._state)
                      for pid, addr in peers.items() if pid != self_id}

    def _state(self, peer_id: str, connected: bool) -> None:
        log.info("peer link", peer=peer_id, connected=connected)

    def start(self) -> None:
        for link in self.links.values():
            link.start()

    def send(self, messages: Iterable[Message]) -> None:
        for m in messages:
            link = self.links.get(m.to_id)
            if link is not None:
                link.send(message_to_proto(m))

    def send_attestations(self, attestations: Iterable[ledger_pb2.Attestation]) -> None:
        for att in attestations:
            for link in self.links.values():
                link.send_attestation(att)

    async def update(self, peers: Mapping[str, str],
                     credentials: grpc.ChannelCredentials | None = None) -> None:
        """Follow a membership or TLS change: links to new members open, links to
        removed members close, and with new `credentials` every link is re-opened."""
        wanted = {pid: addr for pid, addr in peers.items() if pid != self.self_id}
        stale = [pid for pid, link in self.links.items()
                 if credentials is not None or wanted.get(pid) != link.address]
        closing = {pid: self.links.pop(pid) for pid in stale}
        if credentials is not None:
            self._credentials = credentials
        # the new links are in place before the old ones close, so nothing sent
        # meanwhile is lost, and each takes over what its predecessor had not sent
        for pid, addr in wanted.items():
            if pid not in self.links:
                self.links[pid] = link = PeerLink(pid, addr, self._credentials, self._state)
                old = closing.get(pid)
                if old is not None:
                    link.take_over(old)
                link.start()
        await asyncio.gather(*(link.close() for link in closing.values()))

    async def close(self) -> None:
        await asyncio.gather(*(link.close() for link in self.links.values()))
