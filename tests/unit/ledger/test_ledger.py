"""The ledger: blocks, the store, chain verification and tampering."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from exchange.errors import ChainBroken, StoreCorrupted
from exchange.identity.keys import CachedSigner, SigningKey
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import BlockInvalid, build_block, new_body, seal_envelope
from exchange.ledger.judge import CODE_AGENCY, CODE_DUPLICATE, CODE_SIGNER, CODE_TIME
from exchange.ledger.store import POS_BITS, POS_INDEX_MASK, SCHEMA_VERSION, BlockStore
from exchange.ledger.verify import verify_store
from tests.support.ledger_net import make_net, probe, write_chain


@pytest.fixture(scope="module")
def net():  # type: ignore[no-untyped-def]
    return make_net()


def test_written_chain_verifies_and_is_final(net, tmp_path: Path) -> None:
    store = write_chain(net, tmp_path / "s.db", blocks=5, txs_per_block=3)
    report = verify_store(store)
    assert report.ok, report.error
    assert (report.height, report.transactions, report.final_height) == (5, 15, 5)
    assert report.attestations == 20


def test_store_reads_back_blocks_and_transactions(net, tmp_path: Path) -> None:
    store = write_chain(net, tmp_path / "s.db", blocks=3, txs_per_block=2)
    block = store.block(2)
    assert len(block.envelopes) == 2 and len(block.attestations) == 4
    stored = store.tx(LedgerApplier(store).check(block, 2, store.block_hash_at(1),
                                                 0).envelopes[1].tx_id)
    assert stored is not None and (stored.height, stored.index, stored.result) == (2, 1, "OK")
    store.close()
    reopened = BlockStore.open(tmp_path / "s.db")
    assert reopened.height == 3 and reopened.tip_hash == store.tip_hash


def _as_schema_1(path: Path) -> None:
    """Rewrite a store's transactions as schema 1 held them (WITHOUT ROWID, keyed by
    height and index), as a store written by an earlier version is on disk."""
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE txs_v1 (height INTEGER NOT NULL, idx INTEGER NOT NULL, "
                   "tx_id BLOB NOT NULL, envelope BLOB NOT NULL, result TEXT NOT NULL "
                   "DEFAULT '', PRIMARY KEY (height, idx)) WITHOUT ROWID")
        db.execute(f"INSERT INTO txs_v1 SELECT pos >> {POS_BITS}, pos & "
                   f"{POS_INDEX_MASK}, tx_id, envelope, result FROM txs")
        db.execute("DROP TABLE txs")
        db.execute("ALTER TABLE txs_v1 RENAME TO txs")
        db.execute("CREATE INDEX txs_by_id ON txs (tx_id)")
        db.execute("UPDATE meta SET value=1 WHERE key='schema'")
    db.close()


def test_a_store_of_schema_1_is_upgraded_on_open_and_reads_the_same(
        net, tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = write_chain(net, path, blocks=4, txs_per_block=3)
    before = [store.block(h) for h in range(1, 5)]
    ids = [env.tx_id for env in LedgerApplier(store).check(
        before[2], 3, store.block_hash_at(2), 0).envelopes]
    store.close()
    _as_schema_1(path)

    upgraded = BlockStore.open(path)
    assert [upgraded.block(h) for h in range(1, 5)] == before
    assert upgraded.raw_rows(3)[1] == ids and upgraded.results(3) == ["OK"] * 3
    found = upgraded.tx(ids[2])
    assert found is not None and (found.height, found.index) == (3, 2)
    assert upgraded.stored_tx_ids(ids) == set(ids)
    assert upgraded.has_tx(ids[0]) and not upgraded.has_tx(ids[0], below_height=3)
    assert verify_store(upgraded).ok
    upgraded.close()
    db = sqlite3.connect(path)
    columns = {r[1] for r in db.execute("PRAGMA table_info(txs)")}
    schema = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0]
    db.close()
    assert "pos" in columns and "idx" not in columns and schema == SCHEMA_VERSION


def test_a_store_of_an_unknown_schema_is_refused(net, tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write_chain(net, path, blocks=1).close()
    db = sqlite3.connect(path)
    with db:
        db.execute("ALTER TABLE txs RENAME COLUMN pos TO place")
    db.close()
    with pytest.raises(StoreCorrupted, match="no schema"):
        BlockStore.open(path)


def test_store_refuses_block_that_does_not_extend_tip(net, tmp_path: Path) -> None:
    store = write_chain(net, tmp_path / "s.db", blocks=2)
    stale = build_block(net.chain_id, 2, store.block_hash_at(1), [probe(net, "tax")],
                        int(time.time() * 1000), "tax", net.nodes["tax"])
    with pytest.raises(ChainBroken):
        store.append(stale)
    assert store.height == 2


def test_store_refuses_another_networks_genesis(net, tmp_path: Path) -> None:
    write_chain(net, tmp_path / "s.db", blocks=1).close()
    with pytest.raises(ChainBroken, match="another network"):
        BlockStore.create(tmp_path / "s.db", make_net().signed_genesis)


def test_applier_refuses_block_from_non_member_proposer(net, tmp_path: Path) -> None:
    applier = LedgerApplier(BlockStore.create(tmp_path / "s.db", net.signed_genesis))
    rogue = CachedSigner(SigningKey.generate())
    block = applier.cut([probe(net, "tax")], int(time.time() * 1000), rogue, "tax")
    with pytest.raises(BlockInvalid, match="proposer") as refused:
        applier.apply(block)
    assert refused.value.code == ChainBroken.code
    assert applier.store.height == 0


def test_applier_refuses_envelope_with_forged_signature(net, tmp_path: Path) -> None:
    applier = LedgerApplier(BlockStore.create(tmp_path / "s.db", net.signed_genesis))
    forged = bytearray(probe(net, "tax"))
    forged[-1] ^= 0xFF  # last byte of the signature
    block = applier.cut([bytes(forged)], int(time.time() * 1000), net.nodes["tax"], "tax")
    with pytest.raises(BlockInvalid, match="envelope 0") as refused:
        applier.apply(block)
    assert refused.value.code == ChainBroken.code
    assert applier.store.height == 0


def test_state_checks_mark_transactions_invalid_deterministically(net, tmp_path: Path) -> None:
    store = BlockStore.create(tmp_path / "s.db", net.signed_genesis)
    applier = LedgerApplier(store)
    now = int(time.time() * 1000)
    good = probe(net, "tax")
    # signed by police's analyst but claiming to be tax
    body = new_body(net.chain_id, "tax", now)
    body.probe.payload = b"x"
    wrong_agency = seal_envelope(body, net.analysts["police"])
    stale = probe(net, "customs", at_ms=now - 3_600_000)
    block = applier.cut([good, good, wrong_agency, stale], now, net.nodes["tax"], "tax")
    assert applier.apply(block).codes == ("OK", CODE_DUPLICATE, CODE_AGENCY, CODE_TIME)
    again = applier.cut([good], now + 1, net.nodes["tax"], "tax")
    assert applier.apply(again).codes == (CODE_DUPLICATE,)
    report = verify_store(store)
    assert report.ok and report.invalid_transactions == 4


@pytest.mark.parametrize("ids_per_query", [1, 2, 500])
def test_stored_tx_ids_finds_exactly_the_stored_ones_in_chunks(
        net, tmp_path: Path, ids_per_query: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("exchange.ledger.store.TX_IDS_PER_QUERY", ids_per_query)
    store = write_chain(net, tmp_path / "s.db", blocks=3, txs_per_block=3)
    stored = [tid for h in range(1, 4) for tid in store.raw_rows(h)[1]]
    absent = [bytes([i]) * 32 for i in range(4)]
    asked = [stored[0], absent[0], *stored[4:], *absent[1:], stored[0]]
    assert store.stored_tx_ids(asked) == {stored[0], *stored[4:]}
    assert store.stored_tx_ids([]) == set()


def test_duplicates_are_judged_alike_when_blocks_are_applied_together(
        net, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tx stored in an earlier batch and one repeated within the batch (one lookup of
    stored ids per block, chunked small here) are duplicates, as one block at a time."""
    monkeypatch.setattr("exchange.ledger.store.TX_IDS_PER_QUERY", 2)
    now = int(time.time() * 1000)
    first, second, third = (probe(net, "tax") for _ in range(3))
    store = BlockStore.create(tmp_path / "s.db", net.signed_genesis)
    applier = LedgerApplier(store)
    assert applier.apply(applier.cut([first], now, net.nodes["tax"], "tax")).codes == ("OK",)
    cutter = LedgerApplier(BlockStore.create(tmp_path / "c.db", net.signed_genesis))
    cutter.apply(cutter.cut([first], now, net.nodes["tax"], "tax"))
    a = cutter.cut([second, first, third], now + 1, net.nodes["tax"], "tax")
    cutter.apply(a)
    b = cutter.cut([third, second], now + 2, net.nodes["tax"], "tax")
    applied = applier.apply_many([(a, None), (b, None)])
    assert [x.codes for x in applied] == [("OK", CODE_DUPLICATE, "OK"),
                                          (CODE_DUPLICATE, CODE_DUPLICATE)]


def test_revoked_credential_is_refused_from_the_next_block(net, tmp_path: Path) -> None:
    store = BlockStore.create(tmp_path / "s.db", net.signed_genesis)
    applier = LedgerApplier(store)
    now = int(time.time() * 1000)
    revoke = new_body(net.chain_id, "tax", now)
    revoke.credential_revoke.key_id = net.analysts["tax"].key_id
    revoke.credential_revoke.reason = "left the bureau"
    same_block = probe(net, "tax")
    refused = seal_envelope(revoke, net.analysts["tax"])  # an analyst may not revoke
    applied = applier.apply(applier.cut([refused], now, net.nodes["tax"], "tax"))
    assert applied.codes == ("REJECTED",)
    revoke.nonce = b"n" * 16
    root = CachedSigner(net.roots["tax"])
    applied = applier.apply(applier.cut([seal_envelope(revoke, root), same_block],
                                        now, net.nodes["tax"], "tax"))
    assert applied.codes == ("OK", "OK")
    later = applier.apply(applier.cut([probe(net, "tax")], now + 1, net.nodes["tax"], "tax"))
    assert later.codes == (CODE_SIGNER,)
    # a restarted node rebuilds the same registry from its store
    assert LedgerApplier(store).apply(
        LedgerApplier(store).cut([probe(net, "tax")], now + 2, net.nodes["tax"], "tax")
    ).codes == (CODE_SIGNER,)
    assert verify_store(store).ok


def test_another_agency_cannot_revoke_a_credential(net, tmp_path: Path) -> None:
    applier = LedgerApplier(BlockStore.create(tmp_path / "s.db", net.signed_genesis))
    now = int(time.time() * 1000)
    revoke = new_body(net.chain_id, "police", now)
    revoke.credential_revoke.key_id = net.analysts["tax"].key_id
    applied = applier.apply(applier.cut([seal_envelope(revoke, net.supervisors["police"])], now,
                                        net.nodes["tax"], "tax"))
    assert applied.codes == ("REJECTED",)
    assert applier.apply(applier.cut([probe(net, "tax")], now + 1, net.nodes["tax"],
                                     "tax")).codes == ("OK",)


# -- tampering ----------------------------------------------------------------------
_BLOB_COLUMNS = {
    "blocks": ("height", ["hash", "header", "proposer_signature"]),
    "txs": ("pos", ["tx_id", "envelope", "result"]),
    "attestations": ("height, agency, signer_key_id",
                     ["agency", "signer_key_id", "block_hash", "results_root", "signature"]),
}


def _flip_everywhere(path: Path):  # type: ignore[no-untyped-def]
    """Flip each byte of each stored blob, one at a time, yielding after each flip and
    restoring the value once the consumer has checked."""
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    for table, (key, columns) in _BLOB_COLUMNS.items():
        keys = key.split(", ")
        where = " AND ".join(f"{k}=?" for k in keys)
        for column in columns:
            for row in db.execute(f"SELECT {key}, {column} FROM {table}").fetchall():
                ident, value = row[:len(keys)], row[len(keys)]
                raw = value.encode() if isinstance(value, str) else bytes(value)
                for offset in range(len(raw)):
                    bad = bytearray(raw)
                    bad[offset] ^= 0x01
                    new = bytes(bad).decode("latin-1") if isinstance(value, str) else bytes(bad)
                    db.execute(f"UPDATE {table} SET {column}=? WHERE {where}", (new, *ident))
                    db.commit()
                    yield table, column, ident, offset
                    now_ident = tuple(new if k == column else v
                                      for k, v in zip(keys, ident, strict=True))
                    db.execute(f"UPDATE {table} SET {column}=? WHERE {where}",
                               (value, *now_ident))
                    db.commit()
    db.close()


def test_flipping_any_stored_byte_fails_verification_naming_the_height(
        net, tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write_chain(net, path, blocks=2, txs_per_block=2, payload_size=8).close()
    assert verify_store(BlockStore.open(path)).ok
    checked = 0
    for table, column, ident, offset in _flip_everywhere(path):
        with BlockStore.open(path) as store:
            report = verify_store(store)
        assert not report.ok, f"flip in {table}.{column} {ident} @{offset} went unnoticed"
        assert report.bad_height in (1, 2), report
        assert f"height {report.bad_height}" in (report.error or "")
        checked += 1
    assert checked > 1000
    assert verify_store(BlockStore.open(path)).ok  # everything was restored


@pytest.mark.parametrize("column", ["tx_count", "timestamp_ms", "raft_index"])
def test_altered_block_index_columns_fail_verification(net, tmp_path: Path, column: str) -> None:
    path = tmp_path / "s.db"
    write_chain(net, path, blocks=3, txs_per_block=1).close()
    db = sqlite3.connect(path)
    db.execute(f"UPDATE blocks SET {column}={column}+1 WHERE height=2")
    db.commit()
    db.close()
    report = verify_store(BlockStore.open(path))
    assert not report.ok and report.bad_height == 2 and column.split("_")[0] in report.error


def test_moved_transaction_fails_verification(net, tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    write_chain(net, path, blocks=3, txs_per_block=2).close()
    db = sqlite3.connect(path)
    db.execute("DELETE FROM txs WHERE pos=?", ((2 << POS_BITS) | 1,))
    db.commit()
    db.close()
    report = verify_store(BlockStore.open(path))
    assert not report.ok and report.bad_height == 2


def test_a_credential_put_on_the_ledger_by_another_agency_registers_nothing(
        net, tmp_path: Path) -> None:
    from exchange.identity.genesis import issue_credential

    store = BlockStore.create(tmp_path / "s.db", net.signed_genesis)
    applier = LedgerApplier(store)
    now = int(time.time() * 1000)
    newcomer = CachedSigner(SigningKey.generate())
    cred = issue_credential(net.chain_id, "tax", "analyst-9", newcomer.public_key,
                            ["analyst"], now - 1000, now + 86_400_000, net.roots["tax"])
    hijack = new_body(net.chain_id, "pboc", now)
    hijack.credential_issue.signed_credential = cred.SerializeToString(deterministic=True)
    applied = applier.apply(applier.cut([seal_envelope(hijack, net.supervisors["pboc"])],
                                        now, net.nodes["tax"], "tax"))
    assert applied.codes == ("REJECTED",)
    # the key is not registered (as a restarted node, replaying, would also find)
    from exchange.errors import UnknownSigner

    with pytest.raises(UnknownSigner):
        applier.registry.resolve(newcomer.key_id)
    assert LedgerApplier(store).registry.credentials() == applier.registry.credentials()


def test_only_the_opening_agency_closes_a_case_and_references_must_be_real(
        net, tmp_path: Path) -> None:
    from exchange.v1 import ledger_pb2

    applier = LedgerApplier(BlockStore.create(tmp_path / "s.db", net.signed_genesis))
    now = int(time.time() * 1000)

    def event(agency: str, action: str, ref: bytes = b"") -> bytes:
        body = new_body(net.chain_id, agency, now)
        body.case_event.CopyFrom(ledger_pb2.CaseEvent(case_id="CASE-T-1", action=action,
                                                      ref_tx_id=ref))
        return seal_envelope(body, net.analysts[agency])

    applied = applier.apply(applier.cut(
        [event("tax", "open"), event("pboc", "add", b"\x01" * 32), event("pboc", "close"),
         event("tax", "add", b"\x02" * 32), event("tax", "close")],
        now, net.nodes["tax"], "tax"))
    assert applied.codes == ("OK", "CASE_INVALID", "CASE_INVALID", "CASE_INVALID", "OK")
    assert LedgerApplier(applier.store).state.cases.cases["CASE-T-1"].status == "closed"
