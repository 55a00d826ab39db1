"""Group commit on a real four-node cluster: a busy leader waits (at most
block.interval_ms) for its next block to be as full as its recent ones, so what the
followers' clients submit, a forward behind the leader's own clients, goes in the same
block; a wait that runs out forgets the busy past, and a lone client's transactions are
then cut at once. The node's counter of fill waits says how each wait ended."""

from __future__ import annotations

import os
import re
import time
import urllib.request

import pytest

from exchange.client import Signer, chain_id_for, load_client_profile
from exchange.identity.config import load_node_config
from exchange.ledger.block import tx_id
from exchange.testing.localnet import Cluster
from exchange.v1 import ledger_pb2

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("block_filling")]

# Long against a forward (milliseconds), so only "the block is as full as the recent
# ones" ends a wait before it; short enough that the one wait that runs out is cheap.
INTERVAL_MS = 4000
BUSY_BLOCK_TXS = 40
COMMIT_TIMEOUT_S = 30.0


def cluster_setup(c: Cluster) -> None:
    for agency in c.agencies:
        c.edit_node_config(agency, "interval_ms = 20", f"interval_ms = {INTERVAL_MS}")


def cluster_ready(c: Cluster) -> None:
    from agents.catalog import catalog_entries

    wanted = sum(len(catalog_entries(a)) for a in c.agencies)  # the nodes' own start-up
    deadline = time.monotonic() + COMMIT_TIMEOUT_S * 2
    with c.client("tax") as client:
        while len(client.list_catalog().entries) < wanted:
            assert time.monotonic() < deadline, "catalogs were not published"
            time.sleep(0.2)


def _probes(cluster: Cluster, agency: str, count: int) -> list[bytes]:
    signer = Signer.load(load_client_profile(cluster.profile(agency)),
                         chain_id_for(cluster.profile(agency)))
    return [signer.make_envelope(lambda b: setattr(b.probe, "payload", os.urandom(64)))
            for _ in range(count)]


def _height_of(cluster: Cluster, envelope: bytes) -> int:
    tid = tx_id(ledger_pb2.Envelope.FromString(envelope).body)
    deadline = time.monotonic() + COMMIT_TIMEOUT_S
    with cluster.client("tax") as client:
        while True:
            try:
                return int(client.get_transaction(tid).height)
            except Exception:  # noqa: BLE001 - not committed yet
                assert time.monotonic() < deadline, f"{tid.hex()} did not commit"
                time.sleep(0.05)


def _fill_waits(cluster: Cluster, agency: str) -> dict[str, float]:
    config = load_node_config(cluster.node_config(agency))
    text = urllib.request.urlopen(f"http://{config.listen_metrics}/metrics",
                                  timeout=10).read().decode()
    return {ended: float(value) for ended, value in re.findall(
        r'^exchange_block_fill_waits_total\{ended="(\w+)"\} (\S+)$', text, re.M)}


def test_a_busy_leader_cuts_its_own_and_the_followers_clients_into_one_block(
        cluster: Cluster) -> None:
    leader = cluster.leader()
    follower = next(a for a in cluster.agencies if a != leader)
    busy = _probes(cluster, leader, BUSY_BLOCK_TXS)
    with cluster.client(leader) as client:
        results = client.submit_batch(busy, wait=True)
    assert {r.height for r in results} == {results[0].height}  # one busy block
    before = _fill_waits(cluster, leader)

    # half the next block from the leader's clients, half a forward behind
    own, forwarded = (_probes(cluster, leader, BUSY_BLOCK_TXS // 2),
                      _probes(cluster, follower, BUSY_BLOCK_TXS // 2))
    with cluster.client(leader) as client:
        client.submit_batch(own, wait=False)
    with cluster.client(follower) as client:
        client.submit_batch(forwarded, wait=False)
    heights = {_height_of(cluster, e) for e in own + forwarded}
    assert len(heights) == 1, f"the leader cut without waiting: heights {sorted(heights)}"
    after = _fill_waits(cluster, leader)
    assert after.get("filled", 0) == before.get("filled", 0) + 1
    assert after.get("interval", 0) == before.get("interval", 0)


def test_a_lone_client_after_a_busy_spell_waits_once_then_never(cluster: Cluster) -> None:
    leader = cluster.leader()
    with cluster.client(leader) as client:
        client.submit_batch(_probes(cluster, leader, BUSY_BLOCK_TXS), wait=True)
        before = _fill_waits(cluster, leader)
        heights = [client.submit(e, wait=True).height for e in _probes(cluster, leader, 4)]
    after = _fill_waits(cluster, leader)
    assert heights == sorted(set(heights))  # one block each, in order
    # the first waited for a block as full as the busy one and gave up; the others
    # were cut at once (no wait started at all)
    assert after.get("interval", 0) == before.get("interval", 0) + 1
    assert after.get("filled", 0) == before.get("filled", 0)
