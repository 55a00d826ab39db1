"""Restart is independent of history (issue 16, item 4): the applied ledger state is
stored with the blocks, in the same transaction, and can be rebuilt from them and
checked equal."""

from __future__ import annotations

import os
import pickle
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.errors import StoreCorrupted
from exchange.identity.default_policies import default_policies
from exchange.identity.genesis import verify_genesis
from exchange.identity.keys import CachedSigner, SigningKey
from exchange.ledger import state as ledger_state
from exchange.ledger.apply import LedgerApplier, rebuild_state
from exchange.ledger.block import RESULT_OK, BlockInvalid, new_body, seal_envelope
from exchange.ledger.checkpoint import load_state, state_digest
from exchange.ledger.store import BlockStore
from exchange.v1 import ledger_pb2
from tests.support.ledger_net import AGENCIES, Net, make_net, probe
from tests.unit.ledger.test_queries import Ledger, inline_answer, query

EVERY = 4


@pytest.fixture(scope="module")
def net() -> Net:
    return make_net(policies=default_policies(AGENCIES))


@pytest.fixture
def replays(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts the transactions the state replays from stored blocks."""
    counted = [0]
    original = ledger_state.LedgerState.replay

    def counting(self: ledger_state.LedgerState, *args: object) -> None:
        counted[0] += 1
        original(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ledger_state.LedgerState, "replay", counting)
    yield counted


def _open(net: Net, path: Path, every: int = EVERY) -> Ledger:
    store = BlockStore.create(path, net.signed_genesis)
    return Ledger(net, verify_genesis(net.signed_genesis),
                  LedgerApplier(store, checkpoint_every_blocks=every), int(time.time() * 1000))


def _busy_chain(led: Ledger, blocks: int) -> None:
    """Blocks that move every part of the state: queries and their answers, a new
    credential and its revocation, a policy, a catalog entry, probes."""
    net = led.net
    fresh = CachedSigner(SigningKey.generate())
    for n in range(blocks):
        envelope, txid = query(led)
        assert led.one(envelope) == RESULT_OK
        assert led.one(inline_answer(led, txid)) == RESULT_OK
        if n == 1:
            from exchange.identity.genesis import issue_credential
            now = led.now_ms
            cred = issue_credential(net.chain_id, "tax", "analyst-9", fresh.public_key,
                                    ["analyst"], now - 1000, now + 86_400_000, net.roots["tax"])
            body = new_body(net.chain_id, "tax", now)
            body.credential_issue.signed_credential = cred.SerializeToString()
            assert led.one(seal_envelope(body, net.supervisors["tax"])) == RESULT_OK
        if n == 2:
            body = new_body(net.chain_id, "tax", led.now_ms)
            body.credential_revoke.key_id = fresh.key_id
            body.credential_revoke.reason = "left"
            assert led.one(seal_envelope(body, net.supervisors["tax"])) == RESULT_OK
        if n == 3:
            body = new_body(net.chain_id, "pboc", led.now_ms)
            body.catalog_entry.CopyFrom(ledger_pb2.CatalogEntry(dataset="accounts"))
            assert led.one(seal_envelope(body, net.nodes["pboc"])) == RESULT_OK
        led.one(probe(net, AGENCIES[n % len(AGENCIES)]))


def test_restart_reads_the_stored_state_and_replays_only_blocks_after_it(
        net: Net, tmp_path: Path, replays: list[int]) -> None:
    led = _open(net, tmp_path / "blocks.db")
    _busy_chain(led, 6)
    height = led.applier.store.height
    digest = state_digest(led.applier.state)
    led.applier.store.close()
    replays[0] = 0
    again = _open(net, tmp_path / "blocks.db")
    # the checkpoint is stored with the block crossing each multiple of EVERY
    assert again.applier.replayed_blocks == height % EVERY
    assert replays[0] <= EVERY * 3  # at most the transactions of those few blocks
    assert state_digest(again.applier.state) == digest
    # a clean stop stores the state at the tip: the next start replays nothing
    again.applier.write_checkpoint()
    again.applier.store.close()
    replays[0] = 0
    third = _open(net, tmp_path / "blocks.db")
    assert third.applier.replayed_blocks == 0 and replays[0] == 0
    assert state_digest(third.applier.state) == digest
    # and it goes on applying from there with the same results
    envelope, txid = query(third)
    assert third.one(envelope) == RESULT_OK
    assert third.one(inline_answer(third, txid)) == RESULT_OK
    third.applier.store.close()


def test_rebuilt_state_has_the_digest_of_the_stored_one(net: Net, tmp_path: Path) -> None:
    led = _open(net, tmp_path / "blocks.db")
    _busy_chain(led, 5)
    led.applier.store.close()
    with BlockStore.create(tmp_path / "blocks.db", net.signed_genesis) as store:
        stored = LedgerApplier(store)
        outcome = rebuild_state(store)
        assert outcome.checkpoint_height is not None and not outcome.checkpoint_refused
        assert outcome.agrees and outcome.stored_digest == outcome.rebuilt_digest
        assert outcome.rebuilt_digest == state_digest(stored.state)
        # the rebuild stored its state at the tip
        cp = store.checkpoint()
        assert cp is not None and cp.height == store.height
        assert state_digest(load_state(cp.state)) == outcome.rebuilt_digest


def test_state_digest_tells_states_apart(net: Net, tmp_path: Path) -> None:
    led = _open(net, tmp_path / "blocks.db")
    _busy_chain(led, 2)
    before = state_digest(led.applier.state)
    envelope, _ = query(led)
    assert led.one(envelope) == RESULT_OK
    assert state_digest(led.applier.state) != before
    led.applier.store.close()


def test_a_stored_state_that_disagrees_with_the_blocks_is_found_and_replaced(
        net: Net, tmp_path: Path) -> None:
    led = _open(net, tmp_path / "blocks.db")
    _busy_chain(led, 4)
    # a state that is not the blocks' (one query left out) stored as if it were
    led.applier.state.queries.queries.popitem()
    led.applier.write_checkpoint()
    led.applier.store.close()
    with BlockStore.create(tmp_path / "blocks.db", net.signed_genesis) as store:
        outcome = rebuild_state(store)
        assert not outcome.agrees
        assert LedgerApplier(store).replayed_blocks == 0
        assert state_digest(LedgerApplier(store).state) == outcome.rebuilt_digest


def test_damaged_or_foreign_checkpoint_is_refused_and_the_state_replayed(
        net: Net, tmp_path: Path) -> None:
    led = _open(net, tmp_path / "blocks.db")
    _busy_chain(led, 3)
    digest = state_digest(led.applier.state)
    height = led.applier.store.height
    led.applier.write_checkpoint()
    led.applier.store.close()
    db = sqlite3.connect(tmp_path / "blocks.db")
    with db:
        (blob,) = db.execute("SELECT state FROM state_checkpoint").fetchone()
        flipped = blob[:100] + bytes([blob[100] ^ 1]) + blob[101:]
        db.execute("UPDATE state_checkpoint SET state = ?", (flipped,))
    db.close()
    again = _open(net, tmp_path / "blocks.db")
    assert again.applier.checkpoint_refused == "its bytes do not match their digest"
    assert again.applier.replayed_blocks == height
    assert state_digest(again.applier.state) == digest
    # one written by other code (an upgrade since) is not loaded either
    again.applier.write_checkpoint()
    again.applier.store.close()
    db = sqlite3.connect(tmp_path / "blocks.db")
    with db:
        db.execute("UPDATE state_checkpoint SET format = 'ledger-state/1/0123456789abcdef'")
    db.close()
    upgraded = _open(net, tmp_path / "blocks.db")
    assert upgraded.applier.checkpoint_refused.startswith("format 'ledger-state/1/0123")
    assert upgraded.applier.replayed_blocks == height
    assert state_digest(upgraded.applier.state) == digest
    upgraded.applier.store.close()
    # a checkpoint naming something other than the ledger's classes is never loaded
    with pytest.raises(StoreCorrupted, match="may not name"):
        load_state(pickle.dumps(print))


def test_block_and_state_are_written_in_one_transaction(net: Net, tmp_path: Path) -> None:
    """A failure while storing the state leaves the block unstored too (and the other
    way round), so a crash between the two cannot leave them disagreeing."""
    led = _open(net, tmp_path / "blocks.db", every=1)
    led.one(probe(net, "tax"))
    height = led.applier.store.height
    cp = led.applier.store.checkpoint()
    assert cp is not None and cp.height == height
    db = sqlite3.connect(tmp_path / "blocks.db")
    with db:
        db.execute("CREATE TRIGGER no_state BEFORE INSERT ON state_checkpoint "
                   "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    db.close()
    block = led.applier.cut([probe(net, "police")], led.now_ms, net.nodes["tax"], "tax")
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        led.applier.apply(block)
    led.applier.store.close()
    with BlockStore.create(tmp_path / "blocks.db", net.signed_genesis) as store:
        assert store.height == height  # the block went with the state
        stored = store.checkpoint()
        assert stored is not None and stored.height == height


_CHILD = """
import sys, time
from pathlib import Path
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import new_body, seal_envelope
from exchange.ledger.store import BlockStore
from exchange.v1 import ledger_pb2
from tests.support.ledger_net import make_net, probe
net = make_net(seed=11)
applier = LedgerApplier(BlockStore.create(Path(sys.argv[1]), net.signed_genesis),
                        checkpoint_every_blocks=1)
while True:
    body = new_body(net.chain_id, "pboc", int(time.time() * 1000))
    body.catalog_entry.CopyFrom(ledger_pb2.CatalogEntry(
        dataset=f"d{applier.store.height % 200}", description=str(time.time())))
    envs = [probe(net, "tax", b"p" * 2000) for _ in range(10)]
    envs.append(seal_envelope(body, net.nodes["pboc"]))
    applier.apply(applier.cut(envs, int(time.time() * 1000), net.nodes["tax"], "tax"))
    print(applier.store.height, flush=True)
"""


def test_kill_9_while_applying_leaves_the_stored_state_equal_to_the_blocks(
        tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[3]
    net = make_net(seed=11)
    rng = random.Random(16)
    path = tmp_path / "blocks.db"
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], cwd=root,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            for _ in range(rng.randint(3, 12)):
                if not proc.stdout.readline():
                    break
            time.sleep(rng.random() * 0.05)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        with BlockStore.create(path, net.signed_genesis) as store:
            cp = store.checkpoint()
            assert cp is not None and cp.height == store.height  # written together
            loaded = LedgerApplier(store)
            assert loaded.replayed_blocks == 0 and not loaded.checkpoint_refused
            rebuilt = LedgerApplier(store, rebuild=True)
            assert rebuilt.replayed_blocks == store.height
            assert state_digest(loaded.state) == state_digest(rebuilt.state)


def test_no_state_is_stored_after_a_batch_failed_midway(net: Net, tmp_path: Path) -> None:
    led = _open(net, tmp_path / "blocks.db")
    led.one(probe(net, "tax"))
    good = led.applier.cut([probe(net, "police")], led.now_ms, net.nodes["tax"], "tax")
    broken = ledger_pb2.Block()
    broken.CopyFrom(good)
    broken.proposer_signature = bytes(64)
    with pytest.raises(BlockInvalid) as refused:
        led.applier.apply_many([(good, None), (broken, None)])
    assert refused.value.code == "CHAIN_BROKEN"
    # the first block of the batch was judged, nothing was stored: the state is ahead
    with pytest.raises(StoreCorrupted, match="not the stored blocks'"):
        led.applier.write_checkpoint()
    led.applier.store.close()
