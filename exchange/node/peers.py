"""The outbound side of the Raft peer links.

Each peer gets one long-lived TLS connection (raftlink.py) fed from a bounded queue.
Raft tolerates loss, so a full queue drops the oldest messages rather than blocking the
node, and a broken connection is re-opened with back-off. The gRPC channel options for
the other peer calls live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Generic, TypeVar

import grpc
import structlog

from exchange.errors import Unavailable
from exchange.node import metrics as m
from exchange.node.peers_wire import message_to_proto
from exchange.node.raftlink import FRAME_BYTES_MAX, LINK_ERRORS, MemberCerts, dial, encode_frame
from exchange.node.tls_state import NodeTls
from exchange.raft.messages import Message, MessageType
from exchange.v1 import ledger_pb2, node_pb2, peer_pb2, peer_pb2_grpc

log = structlog.get_logger("exchange.peers")

QUEUE_MESSAGES_MAX = 4096
BATCH_MESSAGES_MAX = 256
BATCH_ENTRY_BYTES_MAX = FRAME_BYTES_MAX // 2  # the rest is room for attestations
RECONNECT_DELAY_S_MIN = 0.05
RECONNECT_DELAY_S_MAX = 1.0
GRPC_MESSAGE_BYTES_MAX = 64 << 20
ATTESTATION_LINGER_S = 0.1
REPLY_LINGER_S = 0.02  # an "accepted" forward reply waits at most this for a ride
FORWARD_TIMEOUT_S = 5.0  # as the gRPC forward's deadline (mempool.py)
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


class AttestationQueue(Generic[A]):
    """Attestations waiting for the link to one peer: bounded, and handed over whole to
    the link that replaces this one (nothing sends an attestation again)."""

    def __init__(self, size_max: int = QUEUE_MESSAGES_MAX) -> None:
        self.size_max = size_max
        self._items: list[A] = []

    @classmethod
    def of(cls, items: list[A]) -> AttestationQueue[A]:
        queue: AttestationQueue[A] = cls()
        queue._items = items[:queue.size_max]
        return queue

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


Outgoing = peer_pb2.RaftMessage | peer_pb2.Forward | peer_pb2.ForwardReply


def _payload_bytes(m: Outgoing) -> int:
    """What an item weighs in a frame, counted only where it can be large."""
    if isinstance(m, peer_pb2.RaftMessage) and not m.entries:
        return 0
    return m.ByteSize()


_RAFT_KINDS = {t.value: t.name.lower() for t in MessageType}


def _count(batch: peer_pb2.RaftBatch) -> None:
    m.PEER_FRAMES.inc()
    for msg in batch.messages:
        m.PEER_ITEMS.labels(_RAFT_KINDS.get(msg.type, "raft")).inc()
    for kind, items in (("forward", batch.forwards),
                        ("forward_reply", batch.forward_replies),
                        ("attestation", batch.attestations)):
        if items:
            m.PEER_ITEMS.labels(kind).inc(len(items))


class PeerLink:
    """The outbound Raft link to one peer (raftlink.py: TLS, length-prefixed frames),
    and a gRPC channel to its peer service for the status calls."""

    def __init__(self, peer_id: str, address: str, credentials: grpc.ChannelCredentials,
                 tls: NodeTls, certs: MemberCerts,
                 on_state: Callable[[str, bool], None]) -> None:
        self.peer_id = peer_id
        self.address = address
        self._credentials = credentials
        self._tls = tls
        self._certs = certs
        self._queue: deque[Outgoing] = deque()
        self._attestations: AttestationQueue[ledger_pb2.Attestation] = AttestationQueue()
        # forward replies that only say "accepted": they ride along like attestations
        self._replies: AttestationQueue[peer_pb2.ForwardReply] = AttestationQueue()
        self._wake = asyncio.Event()  # something was queued, or lingering items are due
        self._linger_until: float | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_due = False
        self._on_state = on_state
        self._task: asyncio.Task[None] | None = None
        self._carry: Outgoing | None = None  # taken, goes first in the next batch
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
        self._linger(ATTESTATION_LINGER_S)

    def send_reply(self, reply: peer_pb2.ForwardReply) -> None:
        """The answer to a forward. One that refuses something goes at once; one that
        only says "accepted" rides along with the next Raft messages (the block with
        those envelopes, usually) or goes on its own after REPLY_LINGER_S: forwarding
        adds no write of its own while blocks flow."""
        if any(r.error_code for r in reply.results) or not self._replies.add(reply):
            self.send(reply)
        else:
            self._linger(REPLY_LINGER_S)

    def _linger(self, seconds: float) -> None:
        """Have what lingers sent within `seconds`."""
        loop = asyncio.get_running_loop()
        due = loop.time() + seconds
        if self._linger_until is not None and self._linger_until <= due:
            return
        self._linger_until = due
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        self._linger_timer = loop.call_at(due, self._lingered)

    def _lingered(self) -> None:
        self._linger_timer = None
        self._linger_due = True
        self._wake.set()

    def take_over(self, old: PeerLink) -> None:
        """Carry over what the link this one replaces (new credentials or address) had
        not sent yet: its pending attestations (above all those of the block that changed
        the credentials, which nothing sends again), forward replies and queued Raft
        messages."""
        self._attestations.take_over(old._attestations)
        self._replies.take_over(old._replies)
        if self._attestations or self._replies:
            self._linger(REPLY_LINGER_S)
        if old._carry is not None:
            self.send(old._carry)
        for item in old._queue:
            self.send(item)
        old._queue.clear()

    def send(self, item: Outgoing) -> None:
        if len(self._queue) >= QUEUE_MESSAGES_MAX:
            self._queue.popleft()
            self.dropped += 1
            m.PEER_DROPPED.inc()
        self._queue.append(item)
        self._wake.set()

    async def _next_batch(self) -> peer_pb2.RaftBatch:
        """The queued messages and forwards (at most BATCH_MESSAGES_MAX, and entries and
        envelopes of at most BATCH_ENTRY_BYTES_MAX: a frame stays under FRAME_BYTES_MAX)
        with the attestations and forward replies that linger; waits for one item, or
        until what lingers is due."""
        while self._carry is None and not self._queue:
            if self._linger_due and (self._attestations or self._replies):
                break
            self._wake.clear()
            await self._wake.wait()
        batch: list[Outgoing] = []
        if self._carry is not None:
            batch.append(self._carry)
            self._carry = None
        size = sum(_payload_bytes(item) for item in batch)
        while len(batch) < BATCH_MESSAGES_MAX and self._queue:
            item = self._queue.popleft()
            size += _payload_bytes(item)
            if size > BATCH_ENTRY_BYTES_MAX:
                self._carry = item  # first in the next frame
                break
            batch.append(item)
        out = peer_pb2.RaftBatch(attestations=self._attestations.take(),
                                 forward_replies=self._replies.take())
        self._linger_until = None
        self._linger_due = False
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None
        for item in batch:
            if isinstance(item, peer_pb2.RaftMessage):
                out.messages.append(item)
            elif isinstance(item, peer_pb2.Forward):
                out.forwards.append(item)
            else:
                out.forward_replies.append(item)
        return out

    async def _pump(self, writer: asyncio.StreamWriter) -> None:
        while True:
            batch = await self._next_batch()
            if writer.is_closing():
                # not sent: the attestations go on the next connection
                self._attestations.take_over(AttestationQueue.of(list(batch.attestations)))
                if self._attestations:
                    self._linger(ATTESTATION_LINGER_S)
                return
            writer.write(encode_frame(batch.SerializeToString()))
            _count(batch)
            await writer.drain()

    async def _watch(self, reader: asyncio.StreamReader) -> None:
        """The peer sends nothing on this link: any byte or the end means it is gone."""
        await reader.read(1)

    async def _run(self) -> None:
        delay = RECONNECT_DELAY_S_MIN
        while True:
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await dial(self.address, self.peer_id,
                                            self._tls.ssl_client_context(), self._certs)
                self._set_connected(True)
                delay = RECONNECT_DELAY_S_MIN
                tasks = {asyncio.ensure_future(self._pump(writer)),
                         asyncio.ensure_future(self._watch(reader))}
                try:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                for task in done:
                    task.result()
                log.info("peer link closed by the peer", peer=self.peer_id)
            except asyncio.CancelledError:
                raise
            except LINK_ERRORS as exc:
                (log.info if self.connected else log.debug)(
                    "peer link down", peer=self.peer_id, error=str(exc) or type(exc).__name__)
            except Exception as exc:  # noqa: BLE001 - keep the link alive whatever happens
                log.warning("peer link failed", peer=self.peer_id, error=repr(exc))
            finally:
                if writer is not None:
                    writer.close()
            self._set_connected(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_DELAY_S_MAX)

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
                 credentials: grpc.ChannelCredentials, tls: NodeTls,
                 certs: MemberCerts) -> None:
        self.self_id = self_id
        self._credentials = credentials
        self._tls = tls
        self._certs = certs
        self.links = {pid: self._link(pid, addr) for pid, addr in peers.items()
                      if pid != self_id}
        # forwards sent and not yet answered: id -> (the leader asked, its answer)
        self._forwards: dict[int, tuple[str, asyncio.Future[node_pb2.SubmitBatchResponse]]] = {}
        self._forward_id = 0

    def _link(self, peer_id: str, address: str) -> PeerLink:
        return PeerLink(peer_id, address, self._credentials, self._tls, self._certs,
                        self._state)

    def _state(self, peer_id: str, connected: bool) -> None:
        log.info("peer link", peer=peer_id, connected=connected)
        if not connected:  # what went to it may be lost: its forwards fail now
            self._fail_forwards(peer_id, "the link to the leader went down")

    def _fail_forwards(self, peer_id: str, why: str) -> None:
        for fid, (leader, fut) in list(self._forwards.items()):
            if leader == peer_id:
                del self._forwards[fid]
                if not fut.done():
                    fut.set_exception(Unavailable(why))

    def forward(self, leader: str, envelopes: Sequence[bytes]
                ) -> asyncio.Task[node_pb2.SubmitBatchResponse] | None:
        """Send `envelopes` to `leader` on the Raft link, as SubmitBatch with no_wait:
        the task's result is the leader's answer (Unavailable: no answer in
        FORWARD_TIMEOUT_S, or the link went down). None: no link up to `leader` (the
        caller uses the gRPC call instead)."""
        link = self.links.get(leader)
        if link is None or not link.connected:
            return None
        self._forward_id += 1
        fid = self._forward_id
        fut: asyncio.Future[node_pb2.SubmitBatchResponse] = \
            asyncio.get_running_loop().create_future()
        self._forwards[fid] = (leader, fut)
        link.send(peer_pb2.Forward(id=fid, envelopes=envelopes))

        async def answer() -> node_pb2.SubmitBatchResponse:
            try:
                return await asyncio.wait_for(fut, FORWARD_TIMEOUT_S)
            except TimeoutError:
                raise Unavailable(f"{leader} did not answer a forward in "
                                  f"{FORWARD_TIMEOUT_S} s") from None
            finally:
                self._forwards.pop(fid, None)

        return asyncio.get_running_loop().create_task(answer())

    def forward_replied(self, agency: str, replies: Sequence[peer_pb2.ForwardReply]) -> None:
        """`agency` answered forwards (an answer to a forward sent to another member, or
        to none pending, is ignored)."""
        for reply in replies:
            pending = self._forwards.get(reply.id)
            if pending is None or pending[0] != agency:
                continue
            del self._forwards[reply.id]
            if not pending[1].done():
                pending[1].set_result(node_pb2.SubmitBatchResponse(results=reply.results))

    def reply_forward(self, agency: str, reply: peer_pb2.ForwardReply) -> None:
        """Answer a forward from `agency` (dropped if it is no member any more)."""
        link = self.links.get(agency)
        if link is not None:
            link.send_reply(reply)

    def start(self) -> None:
        for link in self.links.values():
            link.start()

    def send(self, messages: Iterable[Message]) -> None:
        for msg in messages:
            link = self.links.get(msg.to_id)
            if link is not None:
                link.send(message_to_proto(msg))

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
                self.links[pid] = link = self._link(pid, addr)
                old = closing.get(pid)
                if old is not None:
                    link.take_over(old)
                link.start()
        for pid in closing:
            if pid not in wanted:
                self._fail_forwards(pid, f"{pid} is no longer a member")
        await asyncio.gather(*(link.close() for link in closing.values()))

    async def close(self) -> None:
        for peer_id in list(self.links):
            self._fail_forwards(peer_id, "the node is stopping")
        await asyncio.gather(*(link.close() for link in self.links.values()))
