"""Full verification of a stored chain, from genesis to the tip.

Recomputes everything from the stored bytes: each block's hash and link, Merkle root,
proposer signature, every envelope's form and signature, the signer's standing on the
ledger at that block (so the result code stored for each transaction is recomputed and
compared), the indexed tx ids, and every attestation. Stops at the first bad height
and says what is wrong there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from exchange.errors import ChainBroken, ExchangeError
from exchange.identity.registry import KeyRegistry
from exchange.ledger.block import (
    BlockInvalid,
    CheckedBlock,
    check_block,
    results_root,
    verify_attestation,
)
from exchange.ledger.judge import judge_block
from exchange.ledger.state import LedgerState
from exchange.ledger.store import BlockStore
from exchange.v1 import ledger_pb2


@dataclass
class ChainReport:
    """What a verification found."""

    chain_id: str
    height: int = 0
    transactions: int = 0
    invalid_transactions: int = 0
    attestations: int = 0
    final_height: int = 0  # highest height attested by a quorum
    ok: bool = True
    bad_height: int | None = None
    error: str | None = None
    members: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def proposer_key_lookup(registry: KeyRegistry) -> Callable[[str, bytes, int], bytes]:
    """A lookup that accepts only a member's node key valid at the block's height."""
    def lookup(agency: str, kid: bytes, height: int) -> bytes:
        try:
            return registry.node_key_at(agency, kid, height).public_key
        except ExchangeError as exc:
            raise ChainBroken(f"proposer key {kid.hex()}: {exc}") from exc
    return lookup


def check_attestations(registry: KeyRegistry, height: int, hash_: bytes, results_root: bytes,
                       attestations: list[ledger_pb2.Attestation]) -> set[str]:
    """Verify each attestation of a block; return the agencies that attested it."""
    agencies: set[str] = set()
    for att in attestations:
        where = f"attestation of {att.agency!r}"
        if att.height != height or bytes(att.block_hash) != hash_:
            raise BlockInvalid(height, f"{where} is for another block")
        if bytes(att.results_root) != results_root:
            raise BlockInvalid(height, f"{where} signs other transaction results")
        try:
            node = registry.node_key_at(att.agency, bytes(att.signer_key_id), height)
        except ExchangeError as exc:
            raise BlockInvalid(height, f"{where}: {exc}") from exc
        try:
            verify_attestation(att, registry.chain_id, node.public_key)
        except ExchangeError as exc:
            raise BlockInvalid(height, f"{where}: {exc}") from exc
        agencies.add(att.agency)
    return agencies


def verify_store(store: BlockStore) -> ChainReport:
    """Verify every block of `store`; never raises for a bad chain, reports it."""
    try:
        state = LedgerState(store.signed_genesis)
        registry = state.registry
    except ExchangeError as exc:
        return ChainReport(chain_id="?", ok=False, bad_height=0, error=f"genesis: {exc}")
    report = ChainReport(chain_id=registry.chain_id, members=sorted(registry.members))
    prev_hash, prev_ts = store.genesis_hash, 0
    seen: set[bytes] = set()
    proposer_key = proposer_key_lookup(registry)
    try:
        for height in range(1, store.height + 1):
            block = store.block(height, with_attestations=True)
            stored_hash, stored_ids = store.raw_rows(height)
            checked = check_block(block, registry.chain_id, height, prev_hash, prev_ts,
                                  proposer_key, lambda kid: registry.resolve(kid).public_key)
            if stored_hash != checked.hash:
                raise BlockInvalid(height, "stored block hash does not match the header")
            _check_index_columns(store, height, checked)
            for index, env in enumerate(checked.envelopes):
                if stored_ids[index] != env.tx_id:
                    raise BlockInvalid(height, f"envelope {index}: indexed tx id does not "
                                               "match the envelope")
            codes = judge_block(state, checked, lambda t: t in seen)
            stored_codes = store.results(height)
            if any(stored_codes) and stored_codes != codes:
                bad = next(i for i, (a, b) in enumerate(zip(stored_codes, codes, strict=True))
                           if a != b)
                raise BlockInvalid(height, f"envelope {bad}: stored result "
                                           f"{stored_codes[bad]!r}, recomputed {codes[bad]!r}")
            attested = check_attestations(registry, height, checked.hash, results_root(codes),
                                          list(block.attestations))
            if len(attested) >= registry.quorum:
                report.final_height = height
            seen.update(env.tx_id for env in checked.envelopes)
            report.height = height
            report.transactions += len(codes)
            report.invalid_transactions += sum(1 for c in codes if c != "OK")
            report.attestations += len(block.attestations)
            prev_hash, prev_ts = checked.hash, checked.header.timestamp_ms
    except ExchangeError as exc:
        report.ok = False
        report.bad_height = getattr(exc, "height", report.height + 1)
        report.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - corrupt bytes must never crash the verifier
        report.ok = False
        report.bad_height = report.height + 1
        report.error = f"height {report.height + 1}: unreadable: {exc}"
    return report


def _check_index_columns(store: BlockStore, height: int, checked: CheckedBlock) -> None:
    """The store's index columns must agree with the header they were taken from."""
    tx_count, timestamp_ms, raft_index = store.index_columns(height)
    header = checked.header
    for name, stored, actual in (("tx_count", tx_count, header.tx_count),
                                 ("timestamp_ms", timestamp_ms, header.timestamp_ms),
                                 ("raft_index", raft_index, header.raft_index)):
        if stored != actual:
            raise BlockInvalid(height, f"stored {name} {stored} does not match the header "
                                       f"({actual})")
