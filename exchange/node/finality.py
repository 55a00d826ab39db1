"""Finality: this node's attestations out, its peers' in, and the final height (the
highest block a quorum of members has attested, decision 4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from exchange.errors import ExchangeError
from exchange.identity.registry import KeyRegistry
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import block_hash
from exchange.ledger.store import BlockStore
from exchange.ledger.verify import check_attestations
from exchange.node import metrics as m
from exchange.v1 import ledger_pb2

log = structlog.get_logger("exchange.node")

ATTEST_FLUSH_S = 0.05  # received attestations are stored in batches this far apart
EARLY_HEIGHTS_MAX = 1_000  # attestations of blocks this far ahead are kept for later
ATTESTED_KEPT_BELOW_FINAL = 64  # heights below the final one whose attesters are cached
RECORD_HEIGHTS_MAX = 64  # how far back a leader's attestation record reaches

Attestation = ledger_pb2.Attestation


class Finality:
    """Attestations and the final height of one node's chain."""

    def __init__(self, agency: str, store: BlockStore, applier: LedgerApplier,
                 registry: KeyRegistry, send: Callable[[list[Attestation]], bool]) -> None:
        """`send(batch)`: hand this node's attestations to every peer (False: no links
        yet, keep them)."""
        self.agency = agency
        self.store = store
        self.applier = applier
        self.registry = registry
        self._send = send
        self.final_height = 0
        self._out: list[Attestation] = []
        self._early: dict[int, list[Attestation]] = {}
        self._in: list[Attestation] = []
        self._in_event = asyncio.Event()
        self._attested: dict[int, set[str]] = {}
        self._recorded_to = 0

    # -- this node's own ------------------------------------------------------------
    def own(self, attestation: Attestation, height: int) -> None:
        """This node attested the block it applied at `height`."""
        self._out.append(attestation)
        self._attested.setdefault(height, set()).add(self.agency)

    def send_own(self) -> None:
        if self._out and self._send(self._out):
            self._out = []

    # -- peers' ---------------------------------------------------------------------
    def receive(self, attestations: Sequence[Attestation]) -> None:
        """Queue peers' attestations; they are verified and stored in batches."""
        self._in.extend(attestations)
        self._in_event.set()

    def block_applied(self, height: int) -> None:
        """Take the attestations of `height` that arrived before its block."""
        early = self._early.pop(height, [])
        if early:
            self.receive(early)
        self.refresh()

    async def run(self) -> None:
        """Verify and store received attestations, one store transaction per batch."""
        while True:
            await self._in_event.wait()
            self._in_event.clear()
            batch, self._in = self._in, []
            top = self.store.height
            for a in batch:
                if top < a.height <= top + EARLY_HEIGHTS_MAX:
                    self._early.setdefault(a.height, []).append(a)
            batch = [a for a in batch if a.height <= top
                     and a.agency not in self._attested.get(a.height, ())]
            if batch:
                await asyncio.to_thread(self._store, batch)
            self.refresh()
            m.FINAL_HEIGHT.set(self.final_height)
            await asyncio.sleep(ATTEST_FLUSH_S)

    def _store(self, batch: Sequence[Attestation]) -> None:
        good = []
        for att in batch:
            try:
                good.extend(self.applier.verify_attestations([att]))
            except ExchangeError as exc:
                log.warning("attestation refused", agency=att.agency, height=att.height,
                            error=str(exc))
        self.store.add_attestations(good)
        for att in good:
            self._attested.setdefault(att.height, set()).add(att.agency)

    # -- the final height -------------------------------------------------------------
    def _attested_agencies(self, height: int) -> set[str]:
        held = self._attested.get(height)
        if held is None:
            held = self._attested[height] = {a.agency for a in self.store.attestations(height)}
        return held

    def refresh(self) -> None:
        quorum = self.registry.quorum
        height = self.store.height
        while height > self.final_height:
            if len(self._attested_agencies(height)) >= quorum:
                self.final_height = height
                break
            height -= 1
        for h in [h for h in self._attested
                  if h < self.final_height - ATTESTED_KEPT_BELOW_FINAL]:
            del self._attested[h]

    def final_raft_index(self) -> int:
        """The Raft index of the final block (0: none yet)."""
        if 0 < self.final_height <= self.store.height:
            return self.store.index_columns(self.final_height)[2]
        return 0

    def check_final(self, block: ledger_pb2.Block, height: int) -> None:
        """A block from catch-up must carry a quorum of valid attestations of its hash."""
        hash_ = block_hash(block.header)
        roots = {bytes(a.results_root) for a in block.attestations}
        for root in roots:
            atts = [a for a in block.attestations if bytes(a.results_root) == root]
            if len(check_attestations(self.registry, height, hash_, root, atts)) >= \
                    self.registry.quorum:
                return
        raise ExchangeError(f"block {height} from catch-up is not final")

    def record(self) -> list[Attestation]:
        """The attestations a leader records in its next block (decision 4): those of
        the recent blocks a quorum has attested, from where the last record stopped."""
        top = self.store.height
        atts: list[Attestation] = []
        for height in range(max(self._recorded_to + 1, top - RECORD_HEIGHTS_MAX), top + 1):
            held = self.store.attestations(height)
            if len({a.agency for a in held}) >= self.registry.quorum:
                atts.extend(held)
                self._recorded_to = height
            else:
                break
        return atts
