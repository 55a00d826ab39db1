"""The checks a follower makes on a block before Raft may append it (decision 3), and
the blocks so checked, kept for the apply."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence

import structlog

from exchange.errors import ExchangeError
from exchange.identity.registry import KeyRegistry
from exchange.ledger.block import CheckedBlock, block_hash, check_block, parse_header
from exchange.ledger.verify import proposer_key_lookup
from exchange.node import metrics as m
from exchange.raft.types import Entry, EntryKind
from exchange.v1 import ledger_pb2

log = structlog.get_logger("exchange.node")

CHECKED_BLOCKS_MAX = 256
CHECKED_BYTES_MAX = 64 << 20  # checked blocks kept for apply, by size too
MS_PER_S = 1000


def _checked_bytes(checked: CheckedBlock) -> int:
    return len(checked.block.header) + sum(len(e.raw) for e in checked.envelopes)


class BlockChecks:
    """Checked blocks by hash, bounded by count and size; the apply takes them."""

    def __init__(self, chain_id: str, registry: KeyRegistry) -> None:
        self.chain_id = chain_id
        self.registry = registry
        self._checked: OrderedDict[bytes, CheckedBlock] = OrderedDict()
        self._checked_bytes = 0

    def valid_prefix(self, entries: Sequence[Entry]) -> list[Entry]:
        """The entries up to the first block that fails the checks a follower makes
        before acknowledging (decision 3): proposer signature, Merkle root, every
        envelope's form and signature. The leader is reported for a bad one."""
        good: list[Entry] = []
        for entry in entries:
            if entry.kind is EntryKind.NORMAL:
                try:
                    self._check_entry(entry)
                except Exception as exc:  # noqa: BLE001 - any failure refuses the entry
                    m.INVALID_BLOCKS.inc()
                    log.error("leader sent an invalid block; refusing it", index=entry.index,
                              term=entry.term, error=str(exc))
                    break
            good.append(entry)
        return good

    def _check_entry(self, entry: Entry) -> None:
        block = ledger_pb2.Block.FromString(entry.data)
        hash_ = block_hash(block.header)
        if hash_ in self._checked:
            return
        header = parse_header(block.header)
        # Not an apply-time rule (those must not read the clock): this node only refuses
        # to acknowledge a block dated in its future, so a leader whose clock runs ahead
        # cannot commit blocks that would drag every later block's time forward.
        ahead_ms = header.timestamp_ms - int(time.time() * MS_PER_S)
        if ahead_ms > self.registry.genesis.params.admission_window_ms:
            raise ExchangeError(f"block {header.height} of {header.proposer} is dated "
                                f"{ahead_ms // MS_PER_S} s ahead of this node's clock")
        # Link and height are checked at apply time against the stored chain; here the
        # header is checked against itself (its claimed parent) and the signatures.
        checked = check_block(block, self.chain_id, header.height, bytes(header.prev_hash), 0,
                              proposer_key_lookup(self.registry),
                              lambda kid: self.registry.resolve(kid).public_key)
        if header.raft_index != entry.index or header.raft_term != entry.term:
            raise ExchangeError("block's Raft position does not match its entry")
        self.remember(checked)

    def remember(self, checked: CheckedBlock) -> None:
        if checked.hash in self._checked:
            return
        self._checked[checked.hash] = checked
        self._checked_bytes += _checked_bytes(checked)
        while len(self._checked) > CHECKED_BLOCKS_MAX or \
                self._checked_bytes > CHECKED_BYTES_MAX:
            self._checked_bytes -= _checked_bytes(self._checked.popitem(last=False)[1])

    def take(self, hash_: bytes) -> CheckedBlock | None:
        checked = self._checked.pop(hash_, None)
        if checked is not None:
            self._checked_bytes -= _checked_bytes(checked)
        return checked
