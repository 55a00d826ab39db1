"""A hostile leader cannot slip a forged or altered transaction into the chain (issue 16,
item 8a; decision 3).

The test holds the current leader's own keys (its node signing key and its TLS
identity, as a compromised leader would) and sends every follower, through the
follower's real peer service, the Raft APPEND the leader would send for the next block:
the right term, index and predecessor, a header the leader's key really signs, but an
envelope altered after its signer signed it, one signed by a key that is not the one it
names, or a header changed after the leader signed it. Every follower must refuse each
before it appends and acknowledges it (exchange_invalid_blocks_from_leader rises on each),
and nothing of those blocks ever commits on any node.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from exchange.client import Signer, load_client_profile
from exchange.errors import NotFound
from exchange.identity.config import load_node_config, read_signed_genesis
from exchange.identity.genesis import verify_genesis
from exchange.identity.keys import CachedSigner, Domain, SigningKey, read_signing_key
from exchange.ledger.block import block_hash, build_block, parse_header, tx_id
from exchange.node.peers import CHANNEL_OPTIONS, message_to_proto
from exchange.node.tls_state import NodeTls
from exchange.raft.messages import Message, MessageType
from exchange.raft.types import Entry, EntryKind
from exchange.testing.localnet import Cluster
from exchange.v1 import ledger_pb2, peer_pb2, peer_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("hostile_leader")]

WAIT_S = 60.0
INVALID_METRIC = "exchange_invalid_blocks_from_leader_total"




def _wait(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _metric(cluster: Cluster, agency: str, name: str) -> float:
    address = load_node_config(cluster.node_config(agency)).listen_metrics
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _quiet_tip(cluster: Cluster) -> tuple[str, int, int, int, int, bytes]:
    """Wait until every node has applied the same last entry and that entry is the tip
    block; (leader, term, tip height, the tip's Raft index and term, tip hash)."""
    found: list[tuple[str, int, int, int, int, bytes]] = []

    def settled() -> bool:
        leader = cluster.leader()
        statuses = [cluster.status(a) for a in cluster.agencies]
        if any(s is None for s in statuses):
            return False
        heights = {(s.height, s.commit_index, s.applied_index, bytes(s.tip_hash))
                   for s in statuses if s is not None}
        if len(heights) != 1:
            return False
        ((height, commit, _, tip),) = heights
        with cluster.client(leader) as client:
            header = parse_header(client.get_block(height).header)
        if header.raft_index != commit:
            return False  # an entry after the tip block (a leader's no-op): wait
        st = statuses[0]
        assert st is not None
        found.append((leader, st.term, height, header.raft_index, header.raft_term, tip))
        return True

    _wait("a quiet cluster whose last entry is its tip block", settled)
    return found[-1]


def test_followers_refuse_a_leaders_block_with_a_forged_or_altered_envelope(
        cluster: Cluster) -> None:
    probe = cluster.cli("submit-probe", agency="tax")
    assert probe.returncode == 0, probe.stderr
    leader, term, height, raft_index, raft_term, tip = _quiet_tip(cluster)
    with cluster.client(leader) as client:
        tip_header = parse_header(client.get_block(height).header)
        chain_id = client.status().chain_id
    followers = [a for a in cluster.agencies if a != leader]

    # what the compromised leader holds: its node key and its TLS identity
    config = load_node_config(cluster.node_config(leader))
    leader_key = CachedSigner(read_signing_key(config.paths.node_key))
    members = verify_genesis(read_signed_genesis(config.paths.genesis)).members
    credentials = NodeTls(config, members).client_credentials()

    # a genuine analyst's probe, then three ways to misuse it
    analyst = Signer.load(load_client_profile(cluster.profile("tax")), chain_id)
    genuine = ledger_pb2.Envelope.FromString(analyst.make_envelope(
        lambda body: setattr(body.probe, "payload", b"genuine")))
    altered = ledger_pb2.Envelope()
    altered.CopyFrom(genuine)
    body = ledger_pb2.TxBody.FromString(genuine.body)
    body.probe.payload = b"altered by the leader"
    altered.body = body.SerializeToString()
    forged = ledger_pb2.Envelope()
    forged.CopyFrom(altered)
    impostor = SigningKey.generate()  # claims the analyst's key id, signs with its own
    forged.signature = impostor.sign(Domain.ENVELOPE, chain_id, bytes(forged.body))
    now_ms = max(int(time.time() * 1000), tip_header.timestamp_ms)

    def block_of(envelope: ledger_pb2.Envelope) -> ledger_pb2.Block:
        return build_block(chain_id, height + 1, tip, [envelope.SerializeToString()], now_ms,
                           leader, leader_key, term, raft_index + 1)

    resigned_header = block_of(genuine)
    header = ledger_pb2.BlockHeader.FromString(resigned_header.header)
    header.timestamp_ms += 1  # changed after the leader signed it
    header_changed = ledger_pb2.Block()
    header_changed.CopyFrom(resigned_header)
    header_changed.header = header.SerializeToString()
    hostile = {"altered envelope": block_of(altered), "forged envelope": block_of(forged),
               "altered header": header_changed}

    async def send(follower: str, block: ledger_pb2.Block) -> None:
        message = Message(type=MessageType.APPEND, from_id=leader, to_id=follower, term=term,
                          log_term=raft_term, index=raft_index,
                          entries=(Entry(term=term, index=raft_index + 1,
                                         kind=EntryKind.NORMAL,
                                         data=block.SerializeToString()),),
                          commit=raft_index)
        target = next(m.address for m in members if m.agency == follower)
        async with grpc.aio.secure_channel(target, credentials,
                                           options=CHANNEL_OPTIONS) as channel:
            stub = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]

            async def batches() -> AsyncIterator[peer_pb2.RaftBatch]:
                yield peer_pb2.RaftBatch(messages=[message_to_proto(message)])

            await stub.Raft(batches(), timeout=10)

    for name, block in hostile.items():
        before = {f: _metric(cluster, f, INVALID_METRIC) for f in followers}
        for follower in followers:
            asyncio.run(send(follower, block))

        def refused_everywhere(before: dict[str, float] = before) -> bool:
            return all(_metric(cluster, f, INVALID_METRIC) > before[f] for f in followers)

        _wait(f"every follower refusing the block with an {name}", refused_everywhere)

    # nothing of those blocks commits: the chain goes on with honest blocks only, the
    # same on every node, and none of the hostile blocks or their envelopes is in it
    after = cluster.cli("submit-probe", agency="police")
    assert after.returncode == 0, after.stderr
    _, _, new_height, _, _, new_tip = _quiet_tip(cluster)
    assert new_height > height
    hostile_hashes = {block_hash(b.header) for b in hostile.values()}
    for agency in cluster.agencies:
        st = cluster.status(agency)
        assert st is not None and bytes(st.tip_hash) == new_tip
        with cluster.client(agency) as client:
            assert block_hash(client.get_block(height + 1).header) not in hostile_hashes
            for envelope in (altered, forged):
                with pytest.raises(NotFound):
                    client.get_transaction(tx_id(envelope.body))
