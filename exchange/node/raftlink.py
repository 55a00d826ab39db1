"""The Raft peer link on plain TLS: length-prefixed `RaftBatch` frames over one asyncio
connection per direction of each peer pair, instead of a grpc.aio stream.

Moving messages through grpc.aio costs about three times the CPU of a plain asyncio
socket (BENCHMARKS.md, issue 20), and the Raft link carries most of a node's messages.
The security is the gRPC peer service's: mutual TLS with the node certificates, trusting
exactly the member CAs on the ledger (NodeTls), and the certificate presented checked
against the ledger (its name `<agency>/node`, issued by that agency's own CA, the node
certificate pinned on the ledger) on both sides: the server refuses a caller that is not
a member node, and checks it again when the registry changes (a member removed or a
certificate revoked is cut off); the dialling side refuses a server that is not the
member it meant to reach. Every Raft message must come from the authenticated member and
be addressed to this node.

Wire format, after the TLS handshake: the dialling side sends MAGIC, then frames of a
4-byte big-endian length and a serialized `exchange.v1.RaftBatch`. Nothing flows back.
A frame over FRAME_BYTES_MAX, a truncated or undecodable frame, or a batch with one bad
message closes the connection with a logged reason, and nothing of that frame is
delivered. The link listens on the gRPC port + RAFT_PORT_OFFSET of the same host.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from google.protobuf.message import DecodeError

from exchange.errors import CredentialInvalid, ExchangeError, MalformedInput
from exchange.identity.config import RAFT_PORT_OFFSET, format_address, parse_address
from exchange.identity.peer_auth import PeerAuthenticator, PeerIdentity, member_cas_from
from exchange.node.peers_wire import BadPeerMessage, message_from_proto
from exchange.raft.messages import Message
from exchange.v1 import identity_pb2, ledger_pb2, peer_pb2

log = structlog.get_logger("exchange.raftlink")

MAGIC = b"EXRAFT/1"
HEADER = struct.Struct(">I")
FRAME_BYTES_MAX = 64 << 20
HANDSHAKE_TIMEOUT_S = 5.0
INBOUND_CONNECTIONS_MAX = 64
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_PROBES = 2


class BadFrame(MalformedInput):
    """A frame that is too large, truncated, undecodable or not a valid Raft batch."""


def raft_address(grpc_address: str) -> tuple[str, int]:
    """The Raft link's host and port for a node's gRPC address."""
    host, port = parse_address(grpc_address)
    if port + RAFT_PORT_OFFSET > 65535:
        raise MalformedInput(f"no Raft link port above {grpc_address}")
    return host, port + RAFT_PORT_OFFSET


def encode_frame(payload: bytes, size_max: int = FRAME_BYTES_MAX) -> bytes:
    if len(payload) > size_max:
        raise BadFrame(f"frame of {len(payload)} bytes is over the limit of {size_max}")
    return HEADER.pack(len(payload)) + payload


async def read_frame(reader: asyncio.StreamReader, size_max: int = FRAME_BYTES_MAX
                     ) -> bytes | None:
    """The next frame's payload; None at a clean end of the stream (between frames)."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            return None
        raise BadFrame(f"truncated frame header ({len(exc.partial)} of {HEADER.size} "
                       "bytes)") from exc
    (size,) = HEADER.unpack(head)
    if size > size_max:
        raise BadFrame(f"frame of {size} bytes is over the limit of {size_max}")
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise BadFrame(f"truncated frame ({len(exc.partial)} of {size} bytes)") from exc


FORWARD_ENVELOPES_MAX = 10_000  # as SubmitBatch


@dataclass(frozen=True, slots=True)
class CheckedBatch:
    messages: list[Message]
    attestations: list[ledger_pb2.Attestation]
    forwards: Sequence[peer_pb2.Forward] = ()
    forward_replies: Sequence[peer_pb2.ForwardReply] = ()


def check_batch(payload: bytes, sender: str, receiver: str) -> CheckedBatch:
    """A frame's batch, every message checked (all or nothing): valid, from `sender`,
    to `receiver`; attestations kept only if `sender` made them."""
    batch = peer_pb2.RaftBatch()
    try:
        batch.ParseFromString(payload)
    except DecodeError as exc:
        raise BadFrame(f"undecodable frame: {exc}") from exc
    messages: list[Message] = []
    for pm in batch.messages:
        try:
            m = message_from_proto(pm)
        except BadPeerMessage as exc:
            raise BadFrame(f"bad raft message: {exc}") from exc
        if m.from_id != sender or m.to_id != receiver:
            raise BadFrame(f"{sender} sent a message from {m.from_id!r} to {m.to_id!r}")
        messages.append(m)
    for forward in batch.forwards:
        if len(forward.envelopes) > FORWARD_ENVELOPES_MAX:
            raise BadFrame(f"a forward of {len(forward.envelopes)} envelopes (at most "
                           f"{FORWARD_ENVELOPES_MAX})")
    return CheckedBatch(messages, [a for a in batch.attestations if a.agency == sender],
                        batch.forwards, batch.forward_replies)


class MemberRegistry(Protocol):
    """What MemberCerts reads of the key registry (exchange.identity.registry)."""

    @property
    def version(self) -> int: ...

    @property
    def members(self) -> Mapping[str, identity_pb2.Member]: ...

    @property
    def node_certs(self) -> Mapping[str, bytes]: ...


class MemberCerts:
    """Which member node a certificate belongs to, by the member CAs and the pinned node
    certificates on the ledger as of the registry's current version."""

    def __init__(self, registry: MemberRegistry) -> None:
        self.registry = registry
        self._version = -1
        self._authenticator = PeerAuthenticator({})

    @property
    def version(self) -> int:
        return self.registry.version

    def node(self, cert_der: bytes | None) -> PeerIdentity:
        """The member node presenting `cert_der` (CredentialInvalid: none)."""
        if self.registry.version != self._version:
            self._version = self.registry.version
            self._authenticator = PeerAuthenticator(
                member_cas_from(self.registry.members.values()), self.registry.node_certs)
        if not cert_der:
            raise CredentialInvalid("no peer certificate")
        who = self._authenticator.identify(cert_der)
        if not who.is_node:
            raise CredentialInvalid(f"{who} is not a member node")
        return who


def peer_certificate_der(writer: asyncio.StreamWriter) -> bytes | None:
    ssl_object = writer.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cert: bytes | None = ssl_object.getpeercert(binary_form=True)
    return cert


def set_keepalive(writer: asyncio.StreamWriter) -> None:
    """Notice a peer gone silent (no FIN, no RST) within about 20 s, as gRPC's keepalive
    pings did."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL_S)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)


LINK_ERRORS = (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError,
               ExchangeError)


class Forwarding(Protocol):
    """Where forwarded envelopes and the answers to this node's forwards go."""

    def forwarded(self, agency: str, forward: peer_pb2.Forward) -> None:
        """Member `agency` forwards envelopes to this node (as its leader)."""

    def forward_replied(self, agency: str, replies: Sequence[peer_pb2.ForwardReply]
                        ) -> None:
        """Member `agency` answers forwards this node sent it."""


class RaftLinkServer:
    """Accepts the member nodes' Raft links and delivers what they send."""

    def __init__(self, agency: str, certs: MemberCerts,
                 server_context: Callable[[], ssl.SSLContext],
                 deliver: Callable[[Message], Awaitable[None]],
                 attest: Callable[[Sequence[ledger_pb2.Attestation]], None],
                 forwarding: Forwarding | None = None) -> None:
        """`server_context()`: the TLS context as of now (trust follows the ledger);
        `deliver(m)`: one Raft message, in order; `attest(atts)`: a peer's attestations;
        `forwarding`: forwarded envelopes and answers (none: they are ignored)."""
        self.agency = agency
        self._forwarding = forwarding
        self.certs = certs
        self._server_context = server_context
        self._deliver = deliver
        self._attest = attest
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._by_agency: dict[str, asyncio.Task[None]] = {}  # the latest link of each
        self.address = ""

    async def start(self, grpc_listen: str) -> None:
        host, port = raft_address(grpc_listen)
        listening = self._server_context()
        listening.sni_callback = self._current_context
        self._server = await asyncio.start_server(
            self._accept, host, port, ssl=listening, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        self.address = format_address(host, port)
        log.info("raft link listening", address=self.address)

    def _current_context(self, sock: ssl.SSLObject, server_name: str | None,
                         listening: ssl.SSLContext) -> None:
        """Each handshake uses the certificate and trust as of now (OpenSSL asks this
        during every ClientHello, with or without a server name): a member added or
        removed, or this node's certificate switched, counts from the next connection."""
        current = self._server_context()
        if current is not listening:
            sock.context = current

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                      ) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= INBOUND_CONNECTIONS_MAX:
            log.warning("raft link refused: too many connections",
                        peer=writer.get_extra_info("peername"))
            writer.close()
            return
        self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # ended on purpose (the node closing, or a newer link from the same member):
            # the handler finishes normally, as asyncio 3.11's server callback calls
            # exception() on its task and logs a cancelled one as an error with a
            # traceback (fixed in 3.12)
            pass
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
                     ) -> None:
        peer = writer.get_extra_info("peername")
        who: PeerIdentity | None = None
        try:
            der = peer_certificate_der(writer)
            who = self.certs.node(der)
            self._replace(who.agency)
            magic = await asyncio.wait_for(reader.readexactly(len(MAGIC)), HANDSHAKE_TIMEOUT_S)
            if magic != MAGIC:
                raise BadFrame("not a Raft link (wrong preamble)")
            set_keepalive(writer)
            version = self.certs.version
            while (payload := await read_frame(reader)) is not None:
                if self.certs.version != version:  # a member removed, a certificate revoked
                    version = self.certs.version
                    who = self.certs.node(der)
                batch = check_batch(payload, who.agency, self.agency)
                if batch.attestations:
                    self._attest(batch.attestations)
                if self._forwarding is not None:
                    if batch.forward_replies:
                        self._forwarding.forward_replied(who.agency, batch.forward_replies)
                    for forward in batch.forwards:
                        self._forwarding.forwarded(who.agency, forward)
                for m in batch.messages:
                    await self._deliver(m)
        except asyncio.CancelledError:
            raise
        except LINK_ERRORS as exc:
            log.warning("raft link closed", peer=str(who) if who else str(peer),
                        error=str(exc) or type(exc).__name__)

    def _replace(self, agency: str) -> None:
        """A member's new link ends its older one (a peer that restarted, or one whose
        old connection went silent): one inbound link per member."""
        task = asyncio.current_task()
        assert task is not None
        older = self._by_agency.get(agency)
        if older is not None and older is not task and not older.done():
            older.cancel()
        self._by_agency[agency] = task
        task.add_done_callback(lambda t: self._by_agency.pop(agency, None)
                               if self._by_agency.get(agency) is t else None)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        for task in list(self._connections):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self._server.wait_closed()


async def dial(address: str, peer_id: str, context: ssl.SSLContext, certs: MemberCerts
               ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A Raft link to the member `peer_id` at gRPC address `address`: TLS (its host name
    checked against its certificate), the certificate checked to be `peer_id`'s node's,
    the preamble sent."""
    host, port = raft_address(address)
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=host),
        HANDSHAKE_TIMEOUT_S)
    try:
        who = certs.node(peer_certificate_der(writer))
        if who.agency != peer_id:
            raise CredentialInvalid(f"{address} presents {who}'s certificate, not {peer_id}'s")
        set_keepalive(writer)
        writer.write(MAGIC)
    except BaseException:
        writer.close()
        raise
    return reader, writer
