"""Applying blocks to a store: the path every node runs for every committed block.

`LedgerApplier` checks a block completely (form, link, Merkle root, every signature),
judges each transaction against the ledger state, stores the block with its result
codes, and signs this node's attestation. The verification here is the same code
`exchange chain verify` and the evidence verifier run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from exchange.errors import ExchangeError, StoreCorrupted
from exchange.identity.keys import CachedSigner
from exchange.ledger.block import (
    RESULT_OK,
    CheckedBlock,
    attest,
    build_block,
    check_block,
    check_link,
    open_envelope,
    results_root,
)
from exchange.ledger.checkpoint import (
    STATE_FORMAT,
    blob_digest,
    dump_state,
    load_state,
    state_digest,
)
from exchange.ledger.judge import judge_block
from exchange.ledger.state import LedgerState
from exchange.ledger.store import BlockStore, Checkpoint
from exchange.ledger.verify import check_attestations, proposer_key_lookup
from exchange.v1 import ledger_pb2

ROOTS_CACHED_MAX = 4096
# The applied state is stored with the block that crosses each multiple of this height,
# so a restart after a crash replays fewer blocks than this (a clean stop replays none).
CHECKPOINT_EVERY_BLOCKS = 256


@dataclass(frozen=True, slots=True)
class Rebuilt:
    """The outcome of rebuilding the applied state from the blocks."""

    height: int
    rebuilt_digest: bytes
    stored_digest: bytes | None  # the stored state's (checkpoint plus later blocks), if any
    checkpoint_height: int | None
    checkpoint_refused: str

    @property
    def agrees(self) -> bool:
        return self.stored_digest is None or self.stored_digest == self.rebuilt_digest


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of applying one block."""

    checked: CheckedBlock
    codes: tuple[str, ...]
    attestation: ledger_pb2.Attestation | None


class LedgerApplier:
    """Owns a store and the key registry that matches its tip."""

    def __init__(self, store: BlockStore, agency: str | None = None,
                 node_signer: CachedSigner | None = None,
                 checkpoint_every_blocks: int = CHECKPOINT_EVERY_BLOCKS,
                 rebuild: bool = False) -> None:
        """`rebuild`: ignore the stored state checkpoint and replay every block."""
        self.store = store
        self.agency = agency
        self.node_signer = node_signer
        self.checkpoint_every_blocks = checkpoint_every_blocks
        self._roots: OrderedDict[int, bytes] = OrderedDict()
        # blocks replayed to rebuild the state at start (not those read from a checkpoint)
        self.replayed_blocks = 0
        # why a stored checkpoint was not used, if there was one
        self.checkpoint_refused = ""
        # False from the moment a batch starts changing the state until its blocks are
        # stored: a batch that failed midway leaves a state ahead of the blocks
        self._state_matches_store = True
        state, height = (LedgerState(store.signed_genesis), 0) if rebuild \
            else self._from_checkpoint()
        self._set_state(state)
        self._replay(height + 1)

    def _set_state(self, state: LedgerState) -> None:
        self.state = state
        self.registry = state.registry
        self.policies = state.policies
        self.catalog = state.catalog
        self.queries = state.queries
        self.chain_id = self.registry.chain_id
        self._proposer_key = proposer_key_lookup(self.registry)

    def _from_checkpoint(self) -> tuple[LedgerState, int]:
        """The stored state and its height, or genesis' state and 0 when there is none
        usable (none yet, another format, damaged, ahead of the blocks)."""
        cp = self.store.checkpoint()
        fresh = LedgerState(self.store.signed_genesis), 0
        if cp is None:
            return fresh
        if cp.format != STATE_FORMAT:
            self.checkpoint_refused = f"format {cp.format!r}, this code reads {STATE_FORMAT!r}"
        elif cp.height > self.store.height:
            self.checkpoint_refused = (f"it is of height {cp.height}, above the blocks' "
                                       f"{self.store.height}")
        elif blob_digest(cp.state) != cp.digest:
            self.checkpoint_refused = "its bytes do not match their digest"
        else:
            try:
                state = load_state(cp.state)
            except StoreCorrupted as exc:
                self.checkpoint_refused = str(exc)
            else:
                if state.chain_id == fresh[0].chain_id:
                    return state, cp.height
                self.checkpoint_refused = "it is of another chain"
        return fresh

    def _replay(self, start: int) -> None:
        """Advance the ledger state over the store's own (already verified) blocks from
        `start`: every transaction stored as valid is judged again and must still be
        valid."""
        for height in range(start, self.store.height + 1):
            _, timestamp_ms, _ = self.store.index_columns(height)
            for raw, code in zip(self.store.envelopes(height), self.store.results(height),
                                 strict=True):
                if code == RESULT_OK:
                    self.state.replay(open_envelope(raw, self.chain_id), height, timestamp_ms)
            self.replayed_blocks += 1

    def checkpoint(self) -> Checkpoint:
        """The state as of the store's tip, ready to store."""
        blob = dump_state(self.state)
        return Checkpoint(self.store.height, STATE_FORMAT, blob_digest(blob), blob)

    def write_checkpoint(self) -> None:
        """Store the state as of the tip now (at a clean stop, after a rebuild)."""
        if not self._state_matches_store:
            raise StoreCorrupted("a block batch failed while being applied: the state "
                                 "is not the stored blocks' and is not stored")
        self.store.write_checkpoint(self.checkpoint())

    def check(self, block: ledger_pb2.Block, height: int | None = None,
              prev_hash: bytes | None = None, prev_ts: int | None = None) -> CheckedBlock:
        """Stateless checks of the next block (what a follower does before acking)."""
        return check_block(
            block, self.chain_id,
            self.store.height + 1 if height is None else height,
            self.store.tip_hash if prev_hash is None else prev_hash,
            self.store.tip_timestamp_ms if prev_ts is None else prev_ts,
            self._proposer_key, lambda kid: self.registry.resolve(kid).public_key)

    def apply(self, block: ledger_pb2.Block, prechecked: CheckedBlock | None = None) -> Applied:
        """Check, judge, store and attest the next block. `prechecked`: the result of
        `check` on these exact bytes earlier in this process (a follower checks every
        block before it acknowledges it); only the link to the chain is checked again."""
        return self.apply_many([(block, prechecked)])[0]

    def apply_many(self, blocks: Sequence[tuple[ledger_pb2.Block, CheckedBlock | None]]
                   ) -> list[Applied]:
        """Apply consecutive blocks, storing them in one transaction (one fsync)."""
        height, prev_hash, prev_ts = (self.store.height, self.store.tip_hash,
                                      self.store.tip_timestamp_ms)
        in_batch: set[bytes] = set()
        stored: set[bytes] = set()  # of the transactions being applied, those stored before

        def seen(tx: bytes) -> bool:
            return tx in in_batch or tx in stored

        rows: list[tuple[ledger_pb2.Block, Sequence[str] | None]] = []
        ids: list[list[bytes]] = []
        out: list[Applied] = []
        self._state_matches_store = False
        for block, prechecked in blocks:
            if prechecked is not None and prechecked.block.header == block.header:
                check_link(prechecked, self.chain_id, height + 1, prev_hash, prev_ts)
                checked = prechecked
            else:
                checked = self.check(block, height + 1, prev_hash, prev_ts)
            block_ids = [env.tx_id for env in checked.envelopes]
            stored = self.store.stored_tx_ids(block_ids)
            codes = judge_block(self.state, checked, seen)
            in_batch.update(block_ids)
            height = checked.header.height
            attestation = None
            if self._may_attest(height):
                assert self.node_signer is not None and self.agency is not None
                attestation = attest(self.chain_id, self.agency, height, checked.hash, codes,
                                     self.node_signer)
            rows.append((ledger_pb2.Block(header=block.header,
                                          proposer_signature=block.proposer_signature,
                                          envelopes=block.envelopes,
                                          attestations=[attestation] if attestation else []),
                         codes))
            ids.append(block_ids)
            out.append(Applied(checked, tuple(codes), attestation))
            prev_hash, prev_ts = checked.hash, checked.header.timestamp_ms
        every = self.checkpoint_every_blocks
        checkpoint = None
        if every and height // every > self.store.height // every:
            blob = dump_state(self.state)
            checkpoint = Checkpoint(height, STATE_FORMAT, blob_digest(blob), blob)
        self.store.append_many(rows, checkpoint, ids)
        self._state_matches_store = True
        for applied in out:
            self._remember_root(applied.checked.header.height, results_root(applied.codes))
        return out

    def _may_attest(self, height: int) -> bool:
        """Whether this node's key may attest the block at `height` (as the verifiers
        judge it): not a joining agency's blocks from before it became a member, which
        it applies while catching up, nor after its key's validity ended."""
        if self.node_signer is None or self.agency is None:
            return False
        try:
            self.registry.node_key_at(self.agency, self.node_signer.key_id, height)
        except ExchangeError:
            return False
        return True

    def _remember_root(self, height: int, root: bytes) -> None:
        self._roots[height] = root
        while len(self._roots) > ROOTS_CACHED_MAX:
            self._roots.popitem(last=False)

    def results_root_at(self, height: int) -> bytes:
        root = self._roots.get(height)
        if root is None:
            root = results_root(self.store.results(height))
            self._remember_root(height, root)
        return root

    def verify_attestations(self, attestations: Sequence[ledger_pb2.Attestation]
                            ) -> list[ledger_pb2.Attestation]:
        """The attestations that are valid for blocks this store holds; raises for the
        first one that is not (wrong block, wrong results, bad signature)."""
        good: list[ledger_pb2.Attestation] = []
        for att in attestations:
            if not 1 <= att.height <= self.store.height:
                continue
            check_attestations(self.registry, att.height, self.store.block_hash_at(att.height),
                               self.results_root_at(att.height), [att])
            good.append(att)
        return good

    def receive_attestations(self, attestations: Sequence[ledger_pb2.Attestation]) -> int:
        """Verify and keep other members' attestations of blocks this node holds."""
        return self.store.add_attestations(self.verify_attestations(attestations))

    def cut(self, envelopes: Sequence[bytes], timestamp_ms: int, signer: CachedSigner,
            proposer: str, raft_term: int = 0, raft_index: int = 0) -> ledger_pb2.Block:
        """Build the next block on this store's tip (the leader's part)."""
        return build_block(self.chain_id, self.store.height + 1, self.store.tip_hash,
                           envelopes, max(timestamp_ms, self.store.tip_timestamp_ms),
                           proposer, signer, raft_term, raft_index)


def rebuild_state(store: BlockStore) -> Rebuilt:
    """Replay every block of `store` from genesis, compare the state it gives with the
    stored one (its checkpoint advanced over any later blocks) by their canonical
    digests, and store the rebuilt state as the checkpoint: the blocks are the authority."""
    cp = store.checkpoint()
    stored_digest = None
    refused = ""
    if cp is not None:
        stored = LedgerApplier(store)
        refused = stored.checkpoint_refused
        if not refused:
            stored_digest = state_digest(stored.state)
    rebuilt = LedgerApplier(store, rebuild=True)
    rebuilt.write_checkpoint()
    return Rebuilt(store.height, state_digest(rebuilt.state), stored_digest,
                   cp.height if cp is not None else None, refused)
