"""Membership and rotation: the node follows the members and keys the ledger names
(links, trust, its own keys and certificate), the leader moves Raft's voters toward the
ledger's members, and every node watches its peers' heights and clocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc
import structlog

from exchange.identity.registry import KeyRegistry
from exchange.ledger.apply import LedgerApplier
from exchange.node.channels import PeerChannels
from exchange.node.clock import ClockCheck
from exchange.node.driver import RaftDriver
from exchange.node.keys import NodeKeys
from exchange.node.raft_io import LinksTransport
from exchange.node.tls_state import NodeTls
from exchange.raft.confchange import ConfChange, ConfChangeOp
from exchange.raft.core import ConfChangeRejected, Role
from exchange.v1 import peer_pb2

log = structlog.get_logger("exchange.node")

PEER_STATUS_EVERY_S = 2.0
PEER_STATUS_TIMEOUT_S = 1.0
MS_PER_S = 1000

Spawn = Callable[[Coroutine[Any, Any, None], str], None]


class Membership:
    """This node's view of the members, kept in step with the ledger's registry."""

    def __init__(self, agency: str, registry: KeyRegistry, keys: NodeKeys,
                 applier: LedgerApplier, tls: NodeTls, channels: PeerChannels,
                 transport: LinksTransport, driver: RaftDriver, clock: ClockCheck,
                 joining: bool, spawn: Spawn, stop: Callable[[str], None]) -> None:
        """`spawn(coro, name)`: run a task of the node; `stop(reason)`: stop the node."""
        self.agency = agency
        self.registry = registry
        self.keys = keys
        self.applier = applier
        self.tls = tls
        self.channels = channels
        self.transport = transport
        self.driver = driver
        self.clock = clock
        self.joining = joining
        self._spawn = spawn
        self._stop = stop
        self._registry_version = registry.version
        self.peer_heights: dict[str, int] = {}

    def block_applied(self) -> None:
        """Follow the registry if the block just applied changed it."""
        if self.registry.version != self._registry_version:
            self._registry_version = self.registry.version
            self._registry_changed()

    def _registry_changed(self) -> None:
        """Follow a membership change or rotation that just applied."""
        member = self.registry.members.get(self.agency)
        if member is None:
            if self.agency in self.registry.former_members:
                log.critical("this agency was removed from the network; stopping")
                self._stop("this agency was removed from the network")
            return
        if self.joining:
            log.info("joined the network as a member", chain=self.registry.chain_id)
            self.joining = False
        self.keys.follow(member)
        self.applier.node_signer = self.keys.signer
        pinned = self.registry.node_certs.get(self.agency)
        cert_switched = pinned is not None and self.tls.switch_to(pinned)
        trust_changed = self.tls.set_members(self.registry.members.values())
        self.channels.update({a: m.address for a, m in self.registry.members.items()})
        if cert_switched or trust_changed:
            self.channels.credentials = self.tls.client_credentials()
        links = self.transport.links
        if links is not None:
            self._spawn(links.update(
                self.channels.addresses,
                self.channels.credentials if (cert_switched or trust_changed) else None),
                "peer-links")
        self.reconcile_voters()

    def reconcile_voters(self) -> None:
        """The leader moves Raft's voters toward the ledger's members, one server at a
        time (a member added on the ledger becomes a voter; a removed one stops being)."""
        core = self.driver.core
        if core.role is not Role.LEADER:
            return
        wanted, voters = set(self.registry.members), set(core.voters)
        if wanted == voters:
            return
        added, removed = sorted(wanted - voters), sorted(voters - wanted)
        change = (ConfChange(ConfChangeOp.ADD_VOTER, added[0]) if added
                  else ConfChange(ConfChangeOp.REMOVE_VOTER, removed[0]))
        try:
            core.propose_conf_change(change)
        except ConfChangeRejected as exc:
            log.debug("voter change waits", change=change.op.value, node=change.node_id,
                      reason=str(exc))
            return
        log.info("proposed a voter change", change=change.op.value, node=change.node_id)
        self.driver.poke()

    async def run_peer_watch(self) -> None:
        """Ask every peer for its height and time now and then (status pages, the clock
        check), and move the voters toward the members."""
        while True:
            await asyncio.sleep(PEER_STATUS_EVERY_S)
            self.reconcile_voters()
            links = self.transport.links
            if links is None:
                continue
            offsets: list[int] = []
            for agency, link in list(links.links.items()):
                try:
                    sent_ms = time.time() * MS_PER_S
                    st = await link.stub.Status(peer_pb2.PeerStatusRequest(),
                                                timeout=PEER_STATUS_TIMEOUT_S)
                    received_ms = time.time() * MS_PER_S
                    self.peer_heights[agency] = st.height
                    if st.time_ms:
                        offsets.append(int(st.time_ms - (sent_ms + received_ms) / 2))
                except (grpc.aio.AioRpcError, grpc.aio.UsageError):
                    # unreachable, or its link was just replaced (a membership change)
                    self.peer_heights.pop(agency, None)
            self.clock.check(offsets)
