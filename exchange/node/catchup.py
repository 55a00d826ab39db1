"""Catch-up by streaming blocks: a node whose Raft log is behind a peer's compaction
point fetches the final blocks up to the snapshot's index from its peers, checks each
carries a quorum of attestations, and applies them; then Raft goes on from there."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
import structlog

from exchange.errors import ExchangeError
from exchange.ledger.apply import Applied, LedgerApplier
from exchange.ledger.block import parse_header
from exchange.ledger.store import BlockStore
from exchange.node.channels import PeerChannels
from exchange.node.driver import RaftDriver
from exchange.node.finality import Finality
from exchange.raft.types import SnapshotMeta
from exchange.v1 import ledger_pb2, peer_pb2, peer_pb2_grpc

log = structlog.get_logger("exchange.node")

RETRY_DELAY_S_MIN = 0.1
RETRY_DELAY_S_MAX = 2.0


def applied_raft_index(store: BlockStore) -> int:
    """The Raft index of the last block in the store (0: none)."""
    if store.height == 0:
        return 0
    return store.index_columns(store.height)[2]


class CatchUp:
    """At most one catch-up at a time."""

    def __init__(self, agency: str, store: BlockStore, applier: LedgerApplier,
                 channels: PeerChannels, finality: Finality, driver: RaftDriver,
                 apply_block: Callable[[ledger_pb2.Block], Awaitable[Applied]],
                 block_applied: Callable[[Applied], None]) -> None:
        """`apply_block`: the ledger's apply (in the node's apply thread);
        `block_applied`: what the node does after each block applies."""
        self.agency = agency
        self.store = store
        self.applier = applier
        self.channels = channels
        self.finality = finality
        self.driver = driver
        self._apply_block = apply_block
        self._block_applied = block_applied
        self.task: asyncio.Task[None] | None = None

    def start(self, meta: SnapshotMeta) -> None:
        if self.task is not None and not self.task.done():
            return
        self.task = asyncio.get_running_loop().create_task(self._run(meta))

    async def _run(self, meta: SnapshotMeta) -> None:
        """Fetch and verify final blocks from peers until the store holds every block
        up to the snapshot's Raft index, then tell Raft the snapshot is installed."""
        log.info("catching up by streaming blocks", to_raft_index=meta.index,
                 height=self.store.height)
        delay = RETRY_DELAY_S_MIN
        # done once the store holds the block at the snapshot's index, or a peer's next
        # final block lies beyond it: the entries in between are no blocks (a membership
        # change, a new leader's empty entry), and a compaction point may be one of them
        held_all = applied_raft_index(self.store) >= meta.index
        while not held_all:
            for peer in self._peer_order():
                try:
                    held_all = await self._fetch_from(peer, meta.index)
                except grpc.aio.AioRpcError as exc:
                    log.info("catch-up from peer failed", peer=peer, code=exc.code().name)
                except ExchangeError as exc:
                    log.error("peer sent a block that fails verification", peer=peer,
                              error=str(exc))
                held_all = held_all or applied_raft_index(self.store) >= meta.index
                if held_all:
                    break
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_S_MAX)
        log.info("caught up", height=self.store.height)
        self.driver.installed(meta)

    def _peer_order(self) -> list[str]:
        leader = self.driver.core.leader_id
        addresses = self.channels.addresses
        others = [a for a in sorted(addresses) if a not in (self.agency, leader)]
        return ([leader] if leader and leader != self.agency and leader in addresses
                else []) + others

    async def _fetch_from(self, peer: str, raft_index: int) -> bool:
        """Apply the peer's final blocks up to `raft_index`; True when it showed one
        beyond (so every block up to `raft_index` is held now)."""
        stub = peer_pb2_grpc.PeerStub(self.channels.channel(peer))
        stream = stub.FetchBlocks(peer_pb2.FetchBlocksRequest(
            from_height=self.store.height + 1, final_only=True))
        async for block in stream:
            header = parse_header(block.header)
            if header.raft_index > raft_index:
                stream.cancel()
                return True
            self.finality.check_final(block, header.height)
            applied = await self._apply_block(block)
            self._block_applied(applied)
            self.finality.send_own()
            self.finality.receive(list(block.attestations))
        return False
