"""The agency node: the composition root that wires its parts together and runs them.

    RaftDriver  (driver.py)      the Raft core run against Storage, Transport, Applier
      Storage   = WalStorage     (raft_io.py) the write-ahead log
      Transport = LinksTransport (raft_io.py) the peer links (peers.py, raftlink.py: TLS
                                 frames on the gRPC port + 2)
      Applier   = this Node      committed blocks into the ledger, then to the parts below
    Mempool     (mempool.py)     admit, forward, resubmit, cut and propose blocks
    Finality    (finality.py)    attestations out and in, the final height
    Membership  (membership.py)  members, voters, links and trust; keys.py rotates keys;
                                 clock.py stops a node whose clock is off from leading
    CatchUp     (catchup.py)     fetch final blocks when the log is compacted past us
    BlockChecks (blockcheck.py)  a follower's checks before it acknowledges a block
    Reads       (reads.py)       answers, case statements, audits
    Responder, Webhook           answer queries, post events (narrow host protocols)

One asyncio loop owns the Raft core. The write-ahead log's fsyncs and the block store's
writes run in worker threads, so the loop keeps ticking and stepping messages while the
disk works. The flow of a transaction:

    Submit -> admission checks -> (follower: forward to the leader) -> mempool
    -> leader cuts a block (interval or size) -> Raft entry -> followers check the block
    before they append it -> commit -> every node applies it (ledger checks, judge,
    store, attest) -> waiters answered with height and index.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import structlog

from exchange.errors import ExchangeError, Unavailable
from exchange.identity.config import NodeConfig, read_signed_genesis
from exchange.identity.keys import CachedSigner
from exchange.identity.registry import KeyRegistry
from exchange.ledger.apply import Applied, LedgerApplier
from exchange.ledger.block import (
    CheckedBlock,
    OpenedEnvelope,
    block_hash,
    new_body,
    parse_header,
    seal_envelope,
)
from exchange.ledger.queries import QueryBook
from exchange.ledger.state import LedgerState
from exchange.ledger.store import BlockStore
from exchange.node import metrics as m
from exchange.node.answers import QueryReader
from exchange.node.blockcheck import BlockChecks
from exchange.node.catchup import CatchUp, applied_raft_index
from exchange.node.channels import PeerChannels
from exchange.node.clock import ClockCheck
from exchange.node.driver import CompactionSettings, RaftDriver
from exchange.node.finality import Finality
from exchange.node.keys import NodeKeys
from exchange.node.membership import Membership
from exchange.node.mempool import SUBMIT_TIMEOUT_S, Mempool, refusal
from exchange.node.peers import PeerLinks
from exchange.node.raft_io import LinksTransport, WalStorage
from exchange.node.raftlink import MemberCerts, RaftLinkServer
from exchange.node.reads import Reads
from exchange.node.responder import Responder, close_quietly
from exchange.node.tls_state import NodeTls
from exchange.node.webhook import Webhook
from exchange.raft.core import RaftConfig, RaftError, RaftNode, Role
from exchange.raft.messages import Message, MessageType
from exchange.raft.types import Entry, EntryKind, SnapshotMeta
from exchange.raft.wal import WriteAheadLog
from exchange.v1 import evidence_pb2, ledger_pb2, node_pb2, peer_pb2

log = structlog.get_logger("exchange.node")
T = TypeVar("T")

ENTRIES_PER_MSG_MAX = 16
FORWARDS_IN_FLIGHT_MAX = 64  # forwards from followers admitted at once, as a leader
BYTES_PER_MSG_MAX = 32 << 20
FOLLOWER_QUEUE_BLOCKS_MAX = 1024
CATALOG_RETRY_S = 1.0
CATALOG_SUBMIT_TIMEOUT_S = 10.0
MS_PER_S = 1000


class Node:
    """One agency's node: its parts, wired."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.agency = config.agency
        self.tick_s = config.raft.tick_ms / MS_PER_S
        self._open_ledger()
        self._open_raft()
        self._wire_parts()

    def _open_ledger(self) -> None:
        """The block store and the ledger state; this node's membership and keys."""
        config = self.config
        genesis = read_signed_genesis(config.paths.genesis)
        config.paths.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.keys = NodeKeys(config.paths)
        self.store = BlockStore.create(config.paths.data_dir / "blocks.db", genesis)
        self.applier = LedgerApplier(self.store, self.agency, self.keys.signer)
        if self.applier.checkpoint_refused:
            log.warning("stored state not used; rebuilt from the blocks",
                        reason=self.applier.checkpoint_refused)
        log.info("ledger state loaded", height=self.store.height,
                 replayed_blocks=self.applier.replayed_blocks)
        self.registry: KeyRegistry = self.applier.registry
        self.chain_id = self.registry.chain_id
        member = self.registry.members.get(self.agency)
        # An agency joining a running network is not in genesis: until the membership
        # change naming it commits, it only follows the chain.
        self._joining = member is None and config.join
        if member is None and not self._joining:
            if self.agency in self.registry.former_members:
                raise ExchangeError(f"{self.agency} was removed from {self.chain_id}")
            raise ExchangeError(f"{self.agency} is not a member of {self.chain_id}")
        if member is not None:
            self.keys.check(self.agency, member)
            self.applier.node_signer = self.keys.signer

    def _open_raft(self) -> None:
        """The Raft core from the write-ahead log, and its driver."""
        config = self.config
        self.wal, recovered = WriteAheadLog.open(config.paths.data_dir / "raft")
        if recovered.repaired:
            log.warning("raft log tail repaired", detail=recovered.repaired)
        applied = applied_raft_index(self.store)
        last = recovered.entries[-1].index if recovered.entries else recovered.snapshot.index
        self.core = RaftNode(
            RaftConfig(node_id=self.agency, initial_voters=tuple(sorted(self.registry.members)),
                       election_tick=config.raft.election_ticks,
                       heartbeat_tick=config.raft.heartbeat_ticks,
                       max_entries_per_msg=ENTRIES_PER_MSG_MAX,
                       max_bytes_per_msg=BYTES_PER_MSG_MAX),
            recovered.hard_state, recovered.snapshot, recovered.entries, random.Random(),
            applied=min(max(applied, recovered.snapshot.index), last))
        self._kick = asyncio.Event()
        self.transport = LinksTransport()
        # The Raft log's writes, the block applies and the block checks each have a
        # thread of their own, so that reads, admissions and answers never queue the
        # critical path behind them.
        self._wal_thread = ThreadPoolExecutor(1, thread_name_prefix="raft-log")
        self._apply_thread = ThreadPoolExecutor(1, thread_name_prefix="apply")
        self._check_thread = ThreadPoolExecutor(1, thread_name_prefix="block-check")
        settings = config.raft
        self.driver = RaftDriver(
            self.core, WalStorage(self.wal), self.transport, self,
            CompactionSettings(settings.compact_every_entries, settings.compact_log_bytes_max,
                               settings.compact_keep_entries, settings.compact_keep_bytes),
            on_input=self._kick.set,
            on_disk=lambda fn, *args: self._on(self._wal_thread, fn, *args))

    def _wire_parts(self) -> None:
        config = self.config
        self.tls = NodeTls(config, self.registry.members.values())
        pinned = self.registry.node_certs.get(self.agency)
        if pinned is not None and pinned != self.tls.cert_der:
            self.tls.switch_to(pinned)
        self.channels = PeerChannels(
            self.agency, {a: mb.address for a, mb in self.registry.members.items()})
        self.checks = BlockChecks(self.chain_id, self.registry)
        self.finality = Finality(self.agency, self.store, self.applier, self.registry,
                                 self._send_attestations)
        self.clock = ClockCheck(self.agency, self.driver,
                                self.registry.genesis.params.admission_window_ms)
        self.mempool = Mempool(self.agency, self.chain_id, self.driver, self.store,
                               self.registry, self.applier.queries, config.block,
                               lambda: self.keys.signer, self.channels, self.checks,
                               self.finality, lambda: self.clock.ok)
        self.membership = Membership(self.agency, self.registry, self.keys, self.applier,
                                     self.tls, self.channels, self.transport, self.driver,
                                     self.clock, self._joining, self._spawn, self._fail)
        self.catch_up = CatchUp(self.agency, self.store, self.applier, self.channels,
                                self.finality, self.driver, self._apply_block,
                                self._block_applied)
        self.reader = QueryReader(self.agency, self.chain_id, self.store, self.applier.queries,
                                  self.keys.data_keys)
        self.reads = Reads(self.agency, self.store, self.applier.state, self.registry,
                           self.reader, lambda: self.keys.signer, self.transport)
        self.responder = Responder(self, self.keys.data_keys)
        self.webhook: Webhook | None = None  # with a [webhook] table
        if config.webhook is not None:
            self.webhook = Webhook(self, config.webhook)
        self._tasks: list[asyncio.Task[None]] = []
        self.raft_server: RaftLinkServer | None = None  # from start()
        self._forwards: set[asyncio.Task[None]] = set()  # forwarded to us, being admitted
        self._followers: list[asyncio.Queue[ledger_pb2.Block]] = []
        self.fatal_error = ""
        self.fatal = asyncio.Event()

    # -- what the parts and the server read --------------------------------------------
    @property
    def signer(self) -> CachedSigner:
        """The node's current signing key (a rotation replaces it)."""
        return self.keys.signer

    @property
    def queries(self) -> QueryBook:
        return self.applier.queries

    @property
    def state(self) -> LedgerState:
        return self.applier.state

    @property
    def final_height(self) -> int:
        return self.finality.final_height

    @property
    def links(self) -> PeerLinks | None:
        return self.transport.links

    @property
    def joining(self) -> bool:
        return self.membership.joining

    @property
    def clock_off_ms(self) -> int | None:
        """How far this node's clock is off from its peers' (ms), when they agree it is."""
        return self.clock.off_ms

    @staticmethod
    async def _on(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        self.channels.credentials = client_credentials = self.tls.client_credentials()
        certs = MemberCerts(self.registry)
        self.transport.links = links = PeerLinks(self.agency, self.channels.addresses,
                                                 client_credentials, self.tls, certs)
        self.raft_server = RaftLinkServer(self.agency, certs, self.tls.ssl_server_context,
                                          self.receive, self.receive_attestations, self)
        await self.raft_server.start(self.config.listen_grpc)
        self.mempool.link_forward = links.forward
        links.start()
        for coro, name in ((self.driver.run(self._kick), "raft"), (self._ticker(), "tick"),
                           (self.mempool.run_cutter(), "cutter"),
                           (self.mempool.run_forwarder(), "forward"),
                           (self.membership.run_peer_watch(), "peer-watch"),
                           (self._publish_catalog(), "catalog"),
                           (self.finality.run(), "attest-in"),
                           (self.responder.run(), "responder"),
                           (self.mempool.run_resubmitter(), "resubmit")):
            self._spawn(coro, name)
        self.driver.start()
        if self.webhook is not None:
            self.webhook.start()
        self.finality.refresh()
        log.info("node started", chain=self.chain_id, height=self.store.height,
                 term=self.core.term, applied=self.core.applied_index)

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._supervised(coro, name), name=name))

    def _fail(self, reason: str) -> None:
        self.fatal_error = reason
        self.fatal.set()

    async def _supervised(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Fail-stop: a part of the node that dies (a committed block that does not
        apply, a disk that fails) stops the whole node, loudly, rather than leaving it
        half alive."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - reported and turned into a stop
            log.critical("node part failed; stopping", part=name, error=repr(exc),
                         exc_info=True)
            self._fail(f"{name}: {exc!r}")

    async def stop(self) -> None:
        catching_up = self.catch_up.task
        for task in self._tasks + ([catching_up] if catching_up else []) + list(self._forwards):
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.raft_server is not None:
            await self.raft_server.close()
        if self.transport.links is not None:
            await self.transport.links.close()
        await self.channels.close()
        self.mempool.stop()
        close_quietly(self.responder)
        if self.webhook is not None:
            self.webhook.close()
        self._wal_thread.shutdown(wait=True)
        self._apply_thread.shutdown(wait=True)
        self._check_thread.shutdown(wait=True)
        if not self.fatal_error:
            # a clean stop stores the state as of the tip: the next start replays nothing
            # (after a failed apply the state may be ahead of the blocks: not stored)
            try:
                self.applier.write_checkpoint()
            except (ExchangeError, OSError, sqlite3.Error) as exc:
                log.error("state checkpoint not written at stop", error=str(exc))
        self.wal.close()
        self.store.close()

    # -- Raft inputs -------------------------------------------------------------------
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if not self.clock.ok and self.core.role is not Role.LEADER:
                continue  # a node whose clock is off never campaigns (see clock.py)
            self.driver.tick()

    def kick(self) -> None:
        self._kick.set()

    async def receive(self, m: Message) -> None:
        """A message from a peer. APPENDs are checked before Raft may append them."""
        if m.type is MessageType.APPEND and m.entries:
            good = await self._on(self._check_thread, self.checks.valid_prefix, m.entries)
            if len(good) < len(m.entries):
                if not good:
                    return
                m = Message(type=m.type, from_id=m.from_id, to_id=m.to_id, term=m.term,
                            log_term=m.log_term, index=m.index, entries=tuple(good),
                            commit=m.commit)
        try:
            self.driver.step(m)
        except RaftError as exc:
            log.warning("raft message refused", peer=m.from_id, error=str(exc))

    # -- the driver's Applier --------------------------------------------------------
    def role_changed(self, role: Role, leader_id: str) -> None:
        m.LEADER_CHANGES.inc()
        m.IS_LEADER.set(1 if role is Role.LEADER else 0)
        m.RAFT_TERM.set(self.core.term)
        log.info("raft role", role=role.value, leader=leader_id, term=self.core.term)
        self.mempool.role_changed(role)
        if role is Role.LEADER:
            self.membership.reconcile_voters()

    async def apply(self, entries: Sequence[Entry]) -> None:
        """Apply the committed blocks not applied yet (a replay after a restart skips
        the rest), in the apply thread, then follow each."""
        batch: list[tuple[ledger_pb2.Block, CheckedBlock | None]] = []
        hashes: list[bytes] = []
        for entry in entries:
            if entry.kind is not EntryKind.NORMAL:
                continue
            block = ledger_pb2.Block.FromString(entry.data)
            if parse_header(block.header).height <= self.store.height:
                continue  # already applied (replay after restart)
            hash_ = block_hash(block.header)
            batch.append((block, self.checks.take(hash_)))
            hashes.append(hash_)
        if batch:
            started = time.perf_counter()
            applied = await self._on(self._apply_thread, self.applier.apply_many, batch)
            m.APPLY_SECONDS.observe(time.perf_counter() - started)
            for one in applied:
                self._block_applied(one)
            self.mempool.blocks_applied(hashes)
        self.finality.send_own()

    def install(self, meta: SnapshotMeta) -> None:
        self.catch_up.start(meta)

    def compact_index_max(self) -> int:
        """Only below the final height: a node behind the compaction point catches up
        by streaming final blocks, and a block not yet final (attested by too few
        members while some were cut off) becomes final only once a lagging member
        applies it through Raft, which needs it still in the log."""
        return self.finality.final_raft_index()

    async def _apply_block(self, block: ledger_pb2.Block) -> Applied:
        return await self._on(self._apply_thread, self.applier.apply, block)

    def _block_applied(self, applied: Applied) -> None:
        """Hand a block just applied to every part that follows the chain."""
        height = applied.checked.header.height
        m.BLOCKS.inc()
        m.COMMIT_HEIGHT.set(height)
        m.RAFT_COMMIT_INDEX.set(self.core.commit_index)
        for code, count in Counter(applied.codes).items():
            m.TXS.labels(code).inc(count)
        self.mempool.block_applied(applied)
        if applied.attestation is not None:
            self.finality.own(applied.attestation, height)
        ok = [env for env, code in zip(applied.checked.envelopes, applied.codes, strict=True)
              if code == "OK"]
        for env in ok:
            self._follow_query(env)
        self.membership.block_applied()
        recorded = [att for env in ok if env.kind == "attestation_record"
                    for att in env.body.attestation_record.attestations]
        if recorded:
            self.finality.receive(recorded)
        self.finality.block_applied(height)
        if self._followers:  # read back only for whoever follows the chain
            block = self.store.block(height, with_attestations=False)
            for q in self._followers:
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(block)
        if self.webhook is not None:
            self.webhook.wake()
        log.debug("block applied", height=height, txs=len(applied.codes))

    def _follow_query(self, env: OpenedEnvelope) -> None:
        """Hand a committed query to this agency to the responder; wake whoever waits
        for the answer to a query that has just been answered or refused."""
        if env.kind == "query":
            if env.body.query.target_agency == self.agency:
                self.responder.notify(env.tx_id)
        elif env.kind in ("answer_manifest", "refusal"):
            self.reads.answer_committed(bytes(getattr(env.body, env.kind).query_tx_id))

    # -- attestations ----------------------------------------------------------------
    def _send_attestations(self, batch: list[ledger_pb2.Attestation]) -> bool:
        links = self.transport.links
        if links is None:
            return False
        links.send_attestations(batch)
        return True

    def receive_attestations(self, attestations: Sequence[ledger_pb2.Attestation]) -> None:
        """Queue peers' attestations; they are verified and stored in batches."""
        self.finality.receive(attestations)

    # -- forwards on the Raft link (raftlink.Forwarding) ------------------------------
    def forwarded(self, agency: str, forward: peer_pb2.Forward) -> None:
        """A member forwards envelopes here (as its leader): admitted as a member
        node's SubmitBatch with no_wait, the answer sent back on the link."""
        if len(self._forwards) >= FORWARDS_IN_FLIGHT_MAX:
            self._answer_forward(agency, forward.id, Unavailable(
                "too many forwards in flight; retry shortly"), len(forward.envelopes))
            return
        task = asyncio.get_running_loop().create_task(self._admit_forward(agency, forward))
        self._forwards.add(task)
        task.add_done_callback(self._forwards.discard)

    async def _admit_forward(self, agency: str, forward: peer_pb2.Forward) -> None:
        try:
            results = await self.mempool.take_forwarded(list(forward.envelopes))
        except ExchangeError as exc:
            self._answer_forward(agency, forward.id, exc, len(forward.envelopes))
            return
        links = self.transport.links
        if links is not None:
            links.reply_forward(agency, peer_pb2.ForwardReply(id=forward.id, results=results))

    def _answer_forward(self, agency: str, forward_id: int, exc: ExchangeError,
                        count: int) -> None:
        links = self.transport.links
        if links is not None:
            links.reply_forward(agency, peer_pb2.ForwardReply(
                id=forward_id, results=[refusal(exc)] * count))

    def forward_replied(self, agency: str, replies: Sequence[peer_pb2.ForwardReply]
                        ) -> None:
        links = self.transport.links
        if links is not None:
            links.forward_replied(agency, replies)

    # -- submissions -------------------------------------------------------------------
    def admit(self, raw: bytes) -> OpenedEnvelope:
        return self.mempool.admit(raw)

    async def submit(self, raw: bytes, wait: bool, timeout_s: float = SUBMIT_TIMEOUT_S,
                     limited: bool = False) -> node_pb2.SubmitResponse:
        return await self.mempool.submit(raw, wait, timeout_s, limited)

    async def submit_frame(self, raws: Sequence[bytes], waits: Sequence[bool], limited: bool,
                           answer: Callable[[int, node_pb2.SubmitResponse], None]) -> None:
        await self.mempool.submit_frame(raws, waits, limited, answer)

    async def submit_batch(self, raws: Sequence[bytes], wait: bool,
                           timeout_s: float = SUBMIT_TIMEOUT_S, limited: bool = False
                           ) -> list[node_pb2.SubmitResponse]:
        return await self.mempool.submit_batch(raws, wait, timeout_s, limited)

    async def _publish_catalog(self) -> None:
        """Publish this agency's catalog on the ledger (signed by its node) wherever the
        ledger does not already say exactly that, then stop."""
        from agents import AGENCIES, JOINING_AGENCIES
        from agents.catalog import catalog_entries

        if self.agency not in AGENCIES + JOINING_AGENCIES:
            return  # a member without known datasets publishes nothing
        wanted = catalog_entries(self.agency)
        while True:
            await asyncio.sleep(CATALOG_RETRY_S)
            if self.joining:
                continue  # its node key signs nothing the ledger takes before it joins
            missing = [e for e in wanted
                       if self.applier.catalog.get((self.agency, e.dataset)) != e]
            if not missing:
                log.info("catalog published", entries=len(wanted))
                return
            if not self.core.leader_id:
                continue
            envelopes = []
            for entry in missing:
                body = new_body(self.chain_id, self.agency, int(time.time() * MS_PER_S))
                body.catalog_entry.CopyFrom(entry)
                envelopes.append(seal_envelope(body, self.keys.signer))
            try:
                results = await self.submit_batch(envelopes, wait=True,
                                                  timeout_s=CATALOG_SUBMIT_TIMEOUT_S)
            except ExchangeError as exc:  # no leader yet, a leader change: try again
                log.info("catalog not published yet", error=str(exc))
                continue
            errors = [r.error for r in results if r.error_code]
            if errors:
                log.warning("catalog not published yet", error=errors[0])

    # -- reads ---------------------------------------------------------------------
    async def get_answer(self, query_tx_id: bytes, wait_ms: int,
                         reader: str) -> node_pb2.AnswerView:
        return await self.reads.get_answer(query_tx_id, wait_ms, reader)

    def stream_answer(self, query_tx_id: bytes, wait_ms: int,
                      reader: str) -> AsyncIterator[node_pb2.AnswerPart]:
        return self.reads.stream_answer(query_tx_id, wait_ms, reader)

    def case_statement(self, case_id: str, height: int) -> evidence_pb2.SignedCaseStatement:
        return self.reads.case_statement(case_id, height)

    async def case_statements(self, case_id: str, height: int,
                              timeout_s: float = 10.0) -> node_pb2.CaseStatementSet:
        return await self.reads.case_statements(case_id, height, timeout_s)

    async def audit(self, request: node_pb2.AuditRequest) -> node_pb2.AuditReply:
        return await self.reads.audit(request)

    def follow(self) -> asyncio.Queue[ledger_pb2.Block]:
        q: asyncio.Queue[ledger_pb2.Block] = asyncio.Queue(FOLLOWER_QUEUE_BLOCKS_MAX)
        self._followers.append(q)
        return q

    def unfollow(self, q: asyncio.Queue[ledger_pb2.Block]) -> None:
        with contextlib.suppress(ValueError):
            self._followers.remove(q)

    def status(self) -> node_pb2.NodeStatus:
        progress = self.core.progress()
        links = self.transport.links
        peers = []
        for agency, address in sorted(self.channels.addresses.items()):
            if agency == self.agency:
                continue
            link = links.links.get(agency) if links else None
            pr = progress.get(agency)
            peers.append(node_pb2.PeerView(
                agency=agency, address=address, match_index=pr.match if pr else 0,
                height=self.membership.peer_heights.get(agency, 0),
                reachable=bool(link and link.connected)))
        return node_pb2.NodeStatus(
            agency=self.agency, chain_id=self.chain_id, role=self.core.role.value,
            term=self.core.term, leader=self.core.leader_id,
            commit_index=self.core.commit_index, applied_index=self.core.applied_index,
            height=self.store.height, tip_hash=self.store.tip_hash,
            final_height=self.final_height, peers=peers, mempool_size=len(self.mempool),
            members=sorted(self.registry.members), quorum=self.registry.quorum,
            member_entries=[self.registry.members[a] for a in sorted(self.registry.members)],
            rate_limits=self.registry.rate_limits)
