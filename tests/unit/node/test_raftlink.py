"""The Raft peer link on plain TLS (exchange.node.raftlink, the sending side in peers.py):
frames, who may connect, and reconnection. Real sockets and TLS on loopback, real
certificates from the agencies' CAs; the registry is a plain record of members."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from structlog.testing import capture_logs

from exchange.errors import CredentialInvalid, Unavailable
from exchange.identity.config import RAFT_PORT_OFFSET, BlockCutting, NodeConfig, NodePaths
from exchange.identity.tls import (
    TlsIdentity,
    create_ca,
    issue_client_certificate,
    issue_node_certificate,
    write_identity,
)
from exchange.node import peers
from exchange.node.peers import PeerLinks
from exchange.node.peers_wire import message_to_proto
from exchange.node.raftlink import (
    FRAME_BYTES_MAX,
    HEADER,
    MAGIC,
    BadFrame,
    MemberCerts,
    RaftLinkServer,
    check_batch,
    dial,
    encode_frame,
    read_frame,
)
from exchange.node.tls_state import NodeTls
from exchange.raft.messages import Message, MessageType
from exchange.raft.types import Entry
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2, peer_pb2

WAIT_S = 20.0


@dataclass
class Registry:
    """The members and pinned node certificates, as the ledger's registry holds them."""

    members: dict[str, identity_pb2.Member]
    node_certs: dict[str, bytes] = field(default_factory=dict)
    version: int = 1


@dataclass
class Agency:
    ca: TlsIdentity
    node: TlsIdentity
    cert_path: Path
    key_path: Path


def _agency(tmp: Path, name: str) -> Agency:
    ca = create_ca(name)
    node = issue_node_certificate(ca, name)
    cert_path, key_path = tmp / f"{name}.pem", tmp / f"{name}.key"
    write_identity(node, cert_path, key_path)
    return Agency(ca, node, cert_path, key_path)


def _tls(tmp: Path, agency: str, a: Agency, members: Mapping[str, identity_pb2.Member]
         ) -> NodeTls:
    paths = NodePaths(data_dir=tmp, genesis=tmp / "genesis.pb", node_key=tmp / "k",
                      data_key=tmp / "d", tls_cert=a.cert_path, tls_key=a.key_path)
    config = NodeConfig(agency=agency, node_id="node", paths=paths,
                        listen_grpc="127.0.0.1:1", listen_metrics="127.0.0.1:2",
                        block=BlockCutting(tx_max=1, bytes_max=1, interval_ms=1))
    return NodeTls(config, members.values())


def _free_base_port() -> int:
    """A gRPC port whose Raft link port is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1]) - RAFT_PORT_OFFSET


@dataclass
class Net:
    tmp: Path
    agencies: dict[str, Agency]
    registry: Registry

    def tls(self, agency: str) -> NodeTls:
        return _tls(self.tmp, agency, self.agencies[agency], self.registry.members)


@pytest.fixture
def net(tmp_path: Path) -> Net:
    agencies = {name: _agency(tmp_path, name) for name in ("tax", "police")}
    members = {name: identity_pb2.Member(agency=name, tls_ca_certificate=a.ca.cert_der)
               for name, a in agencies.items()}
    return Net(tmp_path, agencies, Registry(members))


class Inbox:
    """What a Raft link server delivered."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.attestations: list[ledger_pb2.Attestation] = []
        self.arrived = asyncio.Event()

    async def deliver(self, m: Message) -> None:
        self.messages.append(m)
        self.arrived.set()

    def attest(self, atts: Sequence[ledger_pb2.Attestation]) -> None:
        self.attestations.extend(atts)
        self.arrived.set()


async def _until(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


async def _serve(net: Net, inbox: Inbox, grpc_port: int, agency: str = "police"
                 ) -> RaftLinkServer:
    server = RaftLinkServer(agency, MemberCerts(net.registry),
                            net.tls(agency).ssl_server_context, inbox.deliver, inbox.attest)
    await server.start(f"127.0.0.1:{grpc_port}")
    return server


def _heartbeat(term: int = 3, sender: str = "tax", to: str = "police") -> Message:
    return Message(type=MessageType.HEARTBEAT, from_id=sender, to_id=to, term=term,
                   commit=7)


def _frame(*messages: Message) -> bytes:
    batch = peer_pb2.RaftBatch(messages=[message_to_proto(m) for m in messages])
    return encode_frame(batch.SerializeToString())


@contextlib.asynccontextmanager
async def serving(net: Net) -> AsyncIterator[tuple[Inbox, int]]:
    """A police node's Raft link server: what it delivers, its gRPC port."""
    inbox, port = Inbox(), _free_base_port()
    server = await _serve(net, inbox, port)
    try:
        yield inbox, port
    finally:
        await server.close()


async def _connect_raw(port: int, context: ssl.SSLContext
                       ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port + RAFT_PORT_OFFSET, ssl=context,
                                         server_hostname="127.0.0.1")


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """The server ended the connection (end of stream or a TLS alert/reset)."""
    try:
        async with asyncio.timeout(WAIT_S):
            return await reader.read(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


# -- framing --------------------------------------------------------------------------

def _reader(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_read_frame_returns_each_payload_then_none_at_a_clean_end() -> None:
    async def body() -> None:
        reader = _reader(encode_frame(b"one") + encode_frame(b"") + encode_frame(b"three"))
        assert [await read_frame(reader) for _ in range(4)] == [b"one", b"", b"three", None]

    asyncio.run(body())

def test_read_frame_refuses_an_oversize_frame_before_reading_it() -> None:
    async def body() -> None:
        reader = _reader(HEADER.pack(FRAME_BYTES_MAX + 1))
        with pytest.raises(BadFrame, match="over the limit"):
            await read_frame(reader)

    asyncio.run(body())

def test_read_frame_refuses_a_truncated_header_and_a_truncated_payload() -> None:
    async def body() -> None:
        with pytest.raises(BadFrame, match="truncated frame header"):
            await read_frame(_reader(b"\x00\x00"))
        with pytest.raises(BadFrame, match=r"truncated frame \(3 of 10 bytes\)"):
            await read_frame(_reader(HEADER.pack(10) + b"abc"))

    asyncio.run(body())

def test_encode_frame_refuses_a_payload_over_the_limit() -> None:
    with pytest.raises(BadFrame, match="over the limit"):
        encode_frame(b"x" * 11, size_max=10)


def test_check_batch_is_all_or_nothing_and_keeps_only_the_senders_attestations() -> None:
    good, forged = _heartbeat(), _heartbeat(sender="customs")
    batch = peer_pb2.RaftBatch(messages=[message_to_proto(good), message_to_proto(forged)])
    with pytest.raises(BadFrame, match="from 'customs'"):
        check_batch(batch.SerializeToString(), "tax", "police")
    with pytest.raises(BadFrame, match="undecodable"):
        check_batch(b"\xff\xff\xff", "tax", "police")
    atts = [ledger_pb2.Attestation(agency="tax", height=1),
            ledger_pb2.Attestation(agency="customs", height=1)]
    ok = check_batch(peer_pb2.RaftBatch(messages=[message_to_proto(good)],
                                        attestations=atts).SerializeToString(),
                     "tax", "police")
    assert ok.messages == [good]
    assert [a.agency for a in ok.attestations] == ["tax"]


# -- the server: what it accepts and what it refuses -----------------------------------

def test_a_member_node_s_frames_are_delivered_in_order(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            reader, writer = await _connect_raw(port, net.tls("tax").ssl_client_context())
            writer.write(MAGIC + _frame(_heartbeat(1), _heartbeat(2)) + _frame(_heartbeat(3)))
            await writer.drain()
            await _until(lambda: len(inbox.messages) == 3, "three messages delivered")
            assert [m.term for m in inbox.messages] == [1, 2, 3]
            writer.close()

    asyncio.run(body())

@pytest.mark.parametrize(("what", "data", "error"), [
    ("oversize", HEADER.pack(FRAME_BYTES_MAX + 1) + b"x" * 64, "over the limit"),
    ("garbage", encode_frame(b"\xff\xfe garbage \x00\x01"), "undecodable frame"),
    ("forged sender", None, "sent a message from 'customs'"),
    ("wrong preamble", b"GET / HTTP/1.1\r\n\r\n", "wrong preamble"),
])
def test_a_bad_frame_closes_the_connection_and_nothing_of_it_is_delivered(
        net: Net, what: str,
        data: bytes | None, error: str) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            reader, writer = await _connect_raw(port, net.tls("tax").ssl_client_context())
            # None: a good message, then one claiming another sender, in one frame
            sent = data if data is not None else _frame(_heartbeat(), _heartbeat(sender="customs"))
            with capture_logs() as logs:
                writer.write(sent if what == "wrong preamble" else MAGIC + sent)
                await writer.drain()
                assert await _closed_by_server(reader)
                await _until(lambda: any(e["event"] == "raft link closed" for e in logs), "logged")
            assert inbox.messages == []
            closed = [e for e in logs if e["event"] == "raft link closed"]
            assert error in closed[0]["error"]
            writer.close()

    asyncio.run(body())

def test_a_truncated_frame_at_the_end_of_the_stream_is_refused(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            reader, writer = await _connect_raw(port, net.tls("tax").ssl_client_context())
            with capture_logs() as logs:
                writer.write(MAGIC + _frame(_heartbeat())[:-3])
                await writer.drain()
                writer.close()
                await _until(lambda: any(e["event"] == "raft link closed" for e in logs), "logged")
            assert "truncated frame" in next(e for e in logs if e["event"] == "raft link closed")["error"]
            assert inbox.messages == []

    asyncio.run(body())

def _client_context(net: Net, cert: TlsIdentity, trust_ca: TlsIdentity | None = None
                    ) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=(trust_ca or net.agencies["police"].ca).cert_pem.decode())
    path = net.tmp / f"client-{id(cert)}"
    write_identity(cert, path.with_suffix(".pem"), path.with_suffix(".key"), overwrite=True)
    ctx.load_cert_chain(path.with_suffix(".pem"), path.with_suffix(".key"))
    return ctx


async def _refused(net: Net, port: int, inbox: Inbox, context: ssl.SSLContext) -> None:
    """Connecting with `context` and sending a good frame delivers nothing: the server
    closes the connection (or the handshake fails)."""
    try:
        reader, writer = await _connect_raw(port, context)
    except (ssl.SSLError, ConnectionError):
        return
    writer.write(MAGIC + _frame(_heartbeat()))
    assert await _closed_by_server(reader)
    writer.close()
    assert inbox.messages == []


def test_a_caller_without_a_certificate_is_refused(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.load_verify_locations(cadata=net.agencies["police"].ca.cert_pem.decode())
            await _refused(net, port, inbox, ctx)

    asyncio.run(body())

def test_a_certificate_from_a_ca_that_is_not_a_member_is_refused(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            outsider = create_ca("tax")  # claims to be tax, not tax's CA on the ledger
            await _refused(net, port, inbox, _client_context(net, issue_node_certificate(outsider,
                                                                                         "tax")))

    asyncio.run(body())

def test_a_member_ca_certifying_another_agency_s_node_is_refused(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            police_ca = net.agencies["police"].ca
            with capture_logs() as logs:
                await _refused(net, port, inbox,
                               _client_context(net, issue_node_certificate(police_ca, "tax")))
                await _until(lambda: any(e["event"] == "raft link closed" for e in logs), "logged")
            assert "not certified by tax's CA" in logs[-1]["error"]

    asyncio.run(body())

def test_a_person_s_certificate_is_not_a_member_node(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            tax_ca = net.agencies["tax"].ca
            await _refused(net, port, inbox,
                           _client_context(net, issue_client_certificate(tax_ca, "tax", "analyst-1")))

    asyncio.run(body())

def test_a_node_certificate_revoked_on_the_ledger_is_refused(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            net.registry.node_certs["tax"] = issue_node_certificate(net.agencies["tax"].ca,
                                                                   "tax").cert_der
            net.registry.version += 1
            await _refused(net, port, inbox, net.tls("tax").ssl_client_context())

    asyncio.run(body())

def test_a_member_removed_is_cut_off_at_its_next_frame(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            reader, writer = await _connect_raw(port, net.tls("tax").ssl_client_context())
            writer.write(MAGIC + _frame(_heartbeat(1)))
            await _until(lambda: len(inbox.messages) == 1, "delivered while a member")
            del net.registry.members["tax"]
            net.registry.version += 1
            writer.write(_frame(_heartbeat(2)))
            assert await _closed_by_server(reader)
            assert [m.term for m in inbox.messages] == [1]
            writer.close()

    asyncio.run(body())

# -- the dialling side ------------------------------------------------------------------

def test_dial_refuses_a_server_that_is_not_the_member_it_meant_to_reach(net: Net) -> None:
    async def body() -> None:
        async with serving(net) as (inbox, port):
            net.registry.members["customs"] = identity_pb2.Member(
                agency="customs", tls_ca_certificate=create_ca("customs").cert_der)
            net.registry.version += 1
            with pytest.raises(CredentialInvalid, match="presents police/node's certificate"):
                await dial(f"127.0.0.1:{port}", "customs", net.tls("tax").ssl_client_context(),
                           MemberCerts(net.registry))

    asyncio.run(body())

def _links(net: Net, port: int) -> PeerLinks:
    return PeerLinks("tax", {"tax": "127.0.0.1:1", "police": f"127.0.0.1:{port}"},
                     grpc.ssl_channel_credentials(), net.tls("tax"), MemberCerts(net.registry))


def test_links_deliver_raft_messages_and_attestations(net: Net) -> None:
    async def body() -> None:
        inbox, port = Inbox(), _free_base_port()
        server = await _serve(net, inbox, port)
        links = _links(net, port)
        links.start()
        try:
            links.send([_heartbeat(5)])
            links.send_attestations([ledger_pb2.Attestation(agency="tax", height=9)])
            await _until(lambda: bool(inbox.messages) and bool(inbox.attestations),
                         "message and attestation delivered")
            assert inbox.messages == [_heartbeat(5)]
            assert links.links["police"].connected
        finally:
            await links.close()
            await server.close()

    asyncio.run(body())

def test_links_reconnect_after_the_peer_restarts(net: Net) -> None:
    async def body() -> None:
        inbox, port = Inbox(), _free_base_port()
        server = await _serve(net, inbox, port)
        links = _links(net, port)
        link = links.links["police"]
        links.start()
        try:
            links.send([_heartbeat(1)])
            await _until(lambda: len(inbox.messages) == 1, "first message")
            await server.close()
            await _until(lambda: not link.connected, "link down while the peer is away")
            links.send([_heartbeat(2)])
            server = await _serve(net, inbox, port)
            await _until(lambda: len(inbox.messages) == 2, "message after the restart")
            assert inbox.messages[1].term == 2
            assert link.connected
        finally:
            await links.close()
            await server.close()

    asyncio.run(body())


def _loop_errors() -> list[dict[str, object]]:
    """What the running loop's exception handler is told from now on."""
    errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


def test_a_member_s_new_connection_ends_its_older_one_and_no_error_is_logged(
        net: Net) -> None:
    """One inbound link per member; a handler cancelled on purpose (by a newer link or
    by closing) ends quietly: asyncio 3.11 logs a cancelled handler's task as "Exception
    in callback" with a traceback."""
    async def body() -> None:
        errors = _loop_errors()
        async with serving(net) as (inbox, port):
            context = net.tls("tax").ssl_client_context()
            old_reader, old_writer = await _connect_raw(port, context)
            old_writer.write(MAGIC + _frame(_heartbeat(1)))
            await _until(lambda: len(inbox.messages) == 1, "old link delivers")
            new_reader, new_writer = await _connect_raw(port, context)
            new_writer.write(MAGIC + _frame(_heartbeat(2)))
            assert await _closed_by_server(old_reader)
            await _until(lambda: len(inbox.messages) == 2, "new link delivers")
        # the server closed with the new link still open
        assert await _closed_by_server(new_reader)
        old_writer.close()
        new_writer.close()
        await asyncio.sleep(0)  # the done callbacks of the handlers' tasks run
        assert errors == []

    asyncio.run(body())


def test_a_batch_holds_entries_up_to_the_frame_budget_and_the_rest_goes_next(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "BATCH_ENTRY_BYTES_MAX", 2500)

    def append(index: int) -> Message:
        return Message(type=MessageType.APPEND, from_id="tax", to_id="police", term=2,
                       index=index, entries=(Entry(term=2, index=index + 1,
                                                   data=b"x" * 1000),))

    async def body() -> None:
        link = _links(net, _free_base_port()).links["police"]
        for i in range(5):
            link.send(message_to_proto(append(i)))
        sizes = [len((await link._next_batch()).messages) for _ in range(3)]
        assert sizes == [2, 2, 1]
        await link.close()

    asyncio.run(body())


def _reply(forward_id: int, *codes: str) -> peer_pb2.ForwardReply:
    return peer_pb2.ForwardReply(id=forward_id, results=[
        node_pb2.SubmitResponse(error_code=c) if c else
        node_pb2.SubmitResponse(status="accepted") for c in codes])


def test_an_accepting_forward_reply_rides_with_the_next_raft_message(
        net: Net, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply that only says "accepted" adds no frame of its own while Raft messages
    flow; one that refuses something goes at once; alone, an accepting reply and an
    attestation go once their linger is up."""
    monkeypatch.setattr(peers, "REPLY_LINGER_S", 0.2)
    monkeypatch.setattr(peers, "ATTESTATION_LINGER_S", 0.2)

    async def next_batch(link: peers.PeerLink, within_s: float) -> peer_pb2.RaftBatch | None:
        try:
            return await asyncio.wait_for(link._next_batch(), within_s)
        except TimeoutError:
            return None

    async def body() -> None:
        link = _links(net, _free_base_port()).links["police"]
        link.send_reply(_reply(1, "", ""))
        assert await next_batch(link, 0.05) is None  # lingers
        link.send(message_to_proto(_heartbeat(3)))
        batch = await next_batch(link, 0.05)
        assert batch is not None and len(batch.messages) == 1
        assert [r.id for r in batch.forward_replies] == [1]  # rode along

        link.send_reply(_reply(2, "", "BAD_SIGNATURE"))  # a refusal: at once
        batch = await next_batch(link, 0.05)
        assert batch is not None and [r.id for r in batch.forward_replies] == [2]

        link.send_reply(_reply(3, ""))
        link.send_attestation(ledger_pb2.Attestation(height=7, agency="tax"))
        started = asyncio.get_running_loop().time()
        batch = await next_batch(link, 2.0)  # nothing to ride with: on its own
        assert batch is not None and not batch.messages
        assert [r.id for r in batch.forward_replies] == [3]
        assert [a.height for a in batch.attestations] == [7]
        assert asyncio.get_running_loop().time() - started >= 0.15
        assert await next_batch(link, 0.3) is None  # nothing sent twice
        await link.close()

    asyncio.run(body())


class Leader:
    """A leader's side of forwarding: answers each forward with "accepted" per
    envelope, on its own link back to the follower."""

    def __init__(self) -> None:
        self.links: PeerLinks | None = None
        self.forwarded_envelopes: list[bytes] = []

    def forwarded(self, agency: str, forward: peer_pb2.Forward) -> None:
        self.forwarded_envelopes.extend(forward.envelopes)
        assert self.links is not None
        self.links.reply_forward(agency, peer_pb2.ForwardReply(
            id=forward.id, results=[node_pb2.SubmitResponse(status="accepted")
                                    for _ in forward.envelopes]))

    def forward_replied(self, agency: str, replies: Sequence[peer_pb2.ForwardReply]
                        ) -> None:
        raise AssertionError("the leader sent no forwards")


class Follower:
    def __init__(self, links: PeerLinks) -> None:
        self.links = links

    def forwarded(self, agency: str, forward: peer_pb2.Forward) -> None:
        raise AssertionError("nobody forwards to a follower here")

    def forward_replied(self, agency: str, replies: Sequence[peer_pb2.ForwardReply]
                        ) -> None:
        self.links.forward_replied(agency, replies)


def test_a_forward_on_the_link_gets_the_leader_s_answer_and_fails_when_the_link_drops(
        net: Net) -> None:
    async def body() -> None:
        tax_port, police_port = _free_base_port(), _free_base_port()
        certs = MemberCerts(net.registry)
        tax_links = PeerLinks("tax", {"police": f"127.0.0.1:{police_port}"},
                              grpc.ssl_channel_credentials(), net.tls("tax"), certs)
        police_links = PeerLinks("police", {"tax": f"127.0.0.1:{tax_port}"},
                                 grpc.ssl_channel_credentials(), net.tls("police"), certs)
        leader, inbox = Leader(), Inbox()
        leader.links = police_links
        police_server = RaftLinkServer("police", certs, net.tls("police").ssl_server_context,
                                       inbox.deliver, inbox.attest, leader)
        tax_server = RaftLinkServer("tax", certs, net.tls("tax").ssl_server_context,
                                    inbox.deliver, inbox.attest, Follower(tax_links))
        await police_server.start(f"127.0.0.1:{police_port}")
        await tax_server.start(f"127.0.0.1:{tax_port}")
        tax_links.start()
        police_links.start()
        try:
            assert tax_links.forward("customs", [b"x"]) is None  # no link to it
            await _until(lambda: tax_links.links["police"].connected
                         and police_links.links["tax"].connected, "links up")
            task = tax_links.forward("police", [b"env-1", b"env-2"])
            assert task is not None
            reply = await task
            assert [r.status for r in reply.results] == ["accepted", "accepted"]
            assert leader.forwarded_envelopes == [b"env-1", b"env-2"]
            # an answer that never comes: the link to the leader drops, the forward fails
            await police_links.close()  # the leader answers nothing any more
            pending = tax_links.forward("police", [b"env-3"])
            assert pending is not None
            await _until(lambda: b"env-3" in leader.forwarded_envelopes, "forward arrived")
            await police_server.close()
            with pytest.raises(Unavailable, match="went down"):
                await pending
        finally:
            await tax_links.close()
            await police_links.close()
            await tax_server.close()
            await police_server.close()

    asyncio.run(body())
