"""Real processes: four nodes on loopback, clients submitting throughout, kill -9 of the
leader and of a follower at random moments. Every acknowledged transaction must be
present exactly once, in the same place, on every node; after each leader dies another
node leads in a later term and commits resume. How soon is a figure, not a pass mark
(bench.failover measures failover over many runs)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from exchange.client import Signer, chain_id_for
from exchange.errors import ExchangeError
from exchange.ledger.block import tx_id
from exchange.ledger.store import BlockStore
from exchange.ledger.verify import verify_store
from exchange.testing.localnet import Cluster
from exchange.v1 import ledger_pb2

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

NEW_LEADER_WAIT_S = 10.0  # a bound on waiting, not a measured figure


class Submitters:
    """Clients that keep submitting probes to the given nodes and record what was
    acknowledged as committed: tx id -> (height, index)."""

    def __init__(self, cluster: Cluster, agencies: list[str], per_agency: int = 2) -> None:
        self.cluster = cluster
        self.acked: dict[bytes, tuple[int, int]] = {}
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        chain_id = chain_id_for(cluster.profile(agencies[0]))
        self._threads = [threading.Thread(target=self._run, args=(a, chain_id), daemon=True)
                         for a in agencies for _ in range(per_agency)]

    def __enter__(self) -> Submitters:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=40)

    def _run(self, agency: str, chain_id: str) -> None:
        from exchange.client import load_client_profile

        profile = load_client_profile(self.cluster.profile(agency))
        signer = Signer.load(profile, chain_id)
        while not self._stop.is_set():
            envelope = signer.make_envelope(
                lambda body: body.probe.SetInParent() or setattr(body.probe, "payload",
                                                                 os.urandom(64)))
            try:
                with self.cluster.client(agency, deadline_s=10) as client:
                    while not self._stop.is_set():
                        res = client.submit(envelope)
                        if res.status == "committed" and res.result == "OK":
                            with self._lock:
                                self.acked[bytes(res.tx_id)] = (res.height, res.index)
                        envelope = signer.make_envelope(
                            lambda body: setattr(body.probe, "payload", os.urandom(64)))
            except ExchangeError:
                with self._lock:
                    self.errors += 1
                time.sleep(0.05)

    def count(self) -> int:
        with self._lock:
            return len(self.acked)


def _wait_new_leader(cluster: Cluster, old: str, old_term: int) -> int:
    """The term in which a live node other than `old` reports being leader, after
    `old_term`, waiting for it."""
    deadline = time.monotonic() + NEW_LEADER_WAIT_S
    while time.monotonic() < deadline:
        for agency in cluster.live():
            st = cluster.status(agency)
            if st is not None and st.role == "leader" and agency != old and st.term > old_term:
                return st.term
        time.sleep(0.02)
    raise AssertionError(f"no new leader within {NEW_LEADER_WAIT_S:g} s after {old} died\n"
                         + cluster.logs_tail())


def _wait_growth(subs: Submitters, more: int, timeout_s: float = 30) -> None:
    target = subs.count() + more
    deadline = time.monotonic() + timeout_s
    while subs.count() < target:
        assert time.monotonic() < deadline, f"commits stalled at {subs.count()}"
        time.sleep(0.05)


def _check_everything_once(cluster: Cluster, acked: dict[bytes, tuple[int, int]]) -> None:
    leader = cluster.wait_ready()
    top = cluster.status(leader)
    assert top is not None
    cluster.wait_height(top.height, timeout_s=60)
    cluster.stop()
    hashes: dict[str, list[bytes]] = {}
    for agency in cluster.agencies:
        with BlockStore.open(cluster.net / agency / "data" / "blocks.db") as store:
            report = verify_store(store)
            assert report.ok, f"{agency}: {report.error}"
            hashes[agency] = [store.block_hash_at(h) for h in range(1, store.height + 1)]
            seen: dict[bytes, list[tuple[int, int]]] = {}
            for height in range(1, store.height + 1):
                for index, raw in enumerate(store.envelopes(height)):
                    tid = tx_id(ledger_pb2.Envelope.FromString(raw).body)
                    seen.setdefault(tid, []).append((height, index))
            for tid, where in acked.items():
                assert seen.get(tid) == [where], \
                    f"{agency}: acknowledged {tid.hex()[:16]} at {where}, found {seen.get(tid)}"
    common = min(len(h) for h in hashes.values())
    assert common >= max(h for h, _ in acked.values())
    for agency, chain in hashes.items():
        assert chain[:common] == hashes[cluster.agencies[0]][:common], \
            f"{agency} diverges from {cluster.agencies[0]}"


def test_kill_9_leader_and_follower_loses_nothing_acknowledged(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("EXCHANGE_TEST_SEED", "20261122")))
    terms: list[int] = []  # the term of each leader elected after a kill
    with Cluster(tmp_path) as cluster:
        with Submitters(cluster, list(cluster.agencies)) as subs:
            _wait_growth(subs, 20)
            for _ in range(3):
                # the leader, at a random moment
                leader = cluster.leader()
                st = cluster.status(leader)
                assert st is not None
                time.sleep(rng.uniform(0.0, 0.5))
                cluster.kill(leader, signal.SIGKILL)
                terms.append(_wait_new_leader(cluster, leader, st.term))
                assert terms[-1] > st.term
                _wait_growth(subs, 10)
                cluster.start_node(leader)
                # a follower, at a random moment
                new_leader = cluster.leader()
                follower = rng.choice([a for a in cluster.agencies if a != new_leader])
                time.sleep(rng.uniform(0.0, 0.5))
                cluster.kill(follower, signal.SIGKILL)
                _wait_growth(subs, 10)
                cluster.start_node(follower)
                cluster.wait_ready()
                _wait_growth(subs, 10)
            acked = dict(subs.acked)
        assert len(acked) >= 80
        assert terms == sorted(set(terms)), terms  # each election in a later term
        _check_everything_once(cluster, acked)


def test_stopped_node_catches_up_after_compaction(tmp_path: Path) -> None:
    """A node stopped while the others commit far past the Raft log compaction point
    comes back and catches up by streaming and verifying final blocks."""
    compact_every = 100
    cluster = Cluster(tmp_path)
    cluster.init()
    for agency in cluster.agencies:  # compact early so that the test stays short
        cluster.edit_node_config(agency, "compact_every_entries = 2000",
                                 f"compact_every_entries = {compact_every}")
        cluster.edit_node_config(agency, "compact_keep_entries = 500",
                                 "compact_keep_entries = 20")
    with cluster:
        leader = cluster.leader()
        away = next(a for a in cluster.agencies if a != leader)
        cluster.kill(away, signal.SIGTERM)
        chain_id = chain_id_for(cluster.profile(leader))
        from exchange.client import load_client_profile

        signer = Signer.load(load_client_profile(cluster.profile(leader)), chain_id)
        with cluster.client(leader, deadline_s=30) as client:
            # one transaction per block (each waits for its commit) to grow the log
            for _ in range(compact_every * 3):
                client.submit(signer.make_envelope(
                    lambda body: setattr(body.probe, "payload", os.urandom(16))))
            top = client.status().height
        cluster.start_node(away)
        cluster.wait_height(top, agencies=[away], timeout_s=90)
        st = cluster.status(away)
        assert st is not None and st.height >= top
        log = cluster.log_path(away).read_text()
        assert "catching up by streaming blocks" in log
    with BlockStore.open(cluster.net / away / "data" / "blocks.db") as store:
        assert verify_store(store).ok
