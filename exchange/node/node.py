"""The agency node: Raft drives the order, the ledger checks and stores every block.

One asyncio loop owns the Raft core. The write-ahead log's fsyncs and the block
store's writes run in worker threads, so the loop keeps ticking and stepping messages
while the disk works. The flow of a transaction:

    Submit -> admission checks -> (follower: forward to the leader) -> mempool
    -> leader cuts a block (interval or size) -> Raft entry -> followers check the block
    before they append it -> commit -> every node applies it (ledger checks, judge,
    store, attest) -> waiters answered with height and index.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import structlog

from exchange.errors import ExchangeError, MalformedInput, Unavailable
from exchange.errors import error_for_code as _error_for_code
from exchange.identity.config import NodeConfig, next_path, read_signed_genesis
from exchange.identity.keys import (
    CachedSigner,
    Domain,
    read_data_key,
    read_data_keyring,
    read_signing_key,
    retire_data_key,
)
from exchange.ledger.apply import Applied, LedgerApplier
from exchange.ledger.block import (
    CheckedBlock,
    OpenedEnvelope,
    block_hash,
    build_block,
    check_block,
    new_body,
    open_envelope,
    parse_header,
    seal_envelope,
    tx_id,
)
from exchange.ledger.casechain import statement
from exchange.ledger.store import BlockStore
from exchange.ledger.verify import check_attestations, proposer_key_lookup
from exchange.node import metrics as m
from exchange.node.admission import admit
from exchange.node.answers import AnswerPending, QueryReader
from exchange.node.peers import CHANNEL_OPTIONS, PeerLinks
from exchange.node.ratelimit import AdmissionLimiter
from exchange.node.responder import Responder, close_quietly
from exchange.node.tls_state import NodeTls
from exchange.raft.confchange import ConfChange, ConfChangeOp
from exchange.raft.core import (
    ConfChangeRejected,
    NotLeader,
    RaftConfig,
    RaftError,
    RaftNode,
    Role,
)
from exchange.raft.messages import Message, MessageType
from exchange.raft.types import Entry, EntryKind, SnapshotMeta
from exchange.raft.wal import WriteAheadLog
from exchange.v1 import evidence_pb2, ledger_pb2, node_pb2, node_pb2_grpc, peer_pb2, peer_pb2_grpc

log = structlog.get_logger("exchange.node")
T = TypeVar("T")

INFLIGHT_BLOCKS_MAX = 2  # proposed but not yet applied, at the leader
MEMPOOL_TX_MAX = 50_000
PENDING_BYTES_MAX = 256 << 20  # admitted envelopes this node waits for, by size
PREVERIFIED_MAX = 256
PREVERIFIED_BYTES_MAX = 64 << 20  # checked blocks kept for apply, by size too
RESUBMIT_AFTER_S = 3.0
LEADER_WATCH_S = 0.05  # how often a forward in flight checks that the leader is the same
SUBMIT_TIMEOUT_S = 30.0
FORWARD_BATCH_MAX = 1_000
PEER_STATUS_EVERY_S = 2.0
ATTEST_FLUSH_S = 0.05
ANSWER_PENDING_RETRIES = 200


def _checked_bytes(checked: CheckedBlock) -> int:
    return len(checked.block.header) + sum(len(e.raw) for e in checked.envelopes)


@dataclass
class Pending:
    """An admitted transaction this node waits to see applied."""

    opened: OpenedEnvelope
    admitted_at: float
    futures: list[asyncio.Future[tuple[int, int, str]]] = field(default_factory=list)
    last_sent: float = 0.0


class Node:
    """One agency's node."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.agency = config.agency
        self.tick_s = config.raft.tick_ms / 1000
        genesis = read_signed_genesis(config.paths.genesis)
        data_dir = config.paths.data_dir
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.signer = CachedSigner(read_signing_key(config.paths.node_key))
        self.store = BlockStore.create(data_dir / "blocks.db", genesis)
        self.applier = LedgerApplier(self.store, self.agency, self.signer)
        if self.applier.checkpoint_refused:
            log.warning("stored state not used; rebuilt from the blocks",
                        reason=self.applier.checkpoint_refused)
        log.info("ledger state loaded", height=self.store.height,
                 replayed_blocks=self.applier.replayed_blocks)
        self.registry = self.applier.registry
        self.chain_id = self.registry.chain_id
        member = self.registry.members.get(self.agency)
        # An agency joining a running network is not in genesis: until the membership
        # change naming it commits, it only follows the chain.
        self.joining = member is None and config.join
        if member is None and not self.joining:
            if self.agency in self.registry.former_members:
                raise ExchangeError(f"{self.agency} was removed from {self.chain_id}")
            raise ExchangeError(f"{self.agency} is not a member of {self.chain_id}")
        if member is not None and bytes(member.node_public_key) != self.signer.public_key:
            self._take_next_node_key(bytes(member.node_public_key))
            if bytes(member.node_public_key) != self.signer.public_key:
                raise ExchangeError(f"the ledger names {self.agency}'s node with another key "
                                    f"than {config.paths.node_key}")
        self.wal, recovered = WriteAheadLog.open(data_dir / "raft")
        if recovered.repaired:
            log.warning("raft log tail repaired", detail=recovered.repaired)
        applied = self._applied_raft_index()
        last = recovered.entries[-1].index if recovered.entries else recovered.snapshot.index
        self.core = RaftNode(
            RaftConfig(node_id=self.agency, initial_voters=tuple(sorted(self.registry.members)),
                       election_tick=config.raft.election_ticks,
                       heartbeat_tick=config.raft.heartbeat_ticks,
                       max_entries_per_msg=16, max_bytes_per_msg=32 << 20),
            recovered.hard_state, recovered.snapshot, recovered.entries, random.Random(),
            applied=min(max(applied, recovered.snapshot.index), last))
        self.peers_addr = {a: m.address for a, m in self.registry.members.items()}
        self.tls = NodeTls(config, self.registry.members.values())
        pinned = self.registry.node_certs.get(self.agency)
        if pinned is not None and pinned != self.tls.cert_der:
            self.tls.switch_to(pinned)
        self._registry_version = self.registry.version
        self.links: PeerLinks | None = None
        self._client_creds: grpc.ChannelCredentials | None = None
        self._kick = asyncio.Event()
        self._mempool_event = asyncio.Event()
        self._applied_event = asyncio.Event()
        self.mempool: OrderedDict[bytes, OpenedEnvelope] = OrderedDict()
        self.pending: dict[bytes, Pending] = {}
        self._pending_bytes = 0
        self._prechecked: OrderedDict[bytes, CheckedBlock] = OrderedDict()
        self._prechecked_bytes = 0
        self._inflight_blocks = 0
        self._proposed_at: dict[bytes, float] = {}
        self._unapplied_txs: set[bytes] = set()
        self._forward_queue: list[tuple[list[bytes], asyncio.Future[None]]] = []
        self._forward_event = asyncio.Event()
        self._proposed_tip: tuple[int, bytes, int] | None = None
        self._attest_out: list[ledger_pb2.Attestation] = []
        self._attest_early: dict[int, list[ledger_pb2.Attestation]] = {}
        self._attest_in: list[ledger_pb2.Attestation] = []
        self._attest_in_event = asyncio.Event()
        self._attested: dict[int, set[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._followers: list[asyncio.Queue[ledger_pb2.Block]] = []
        self._catching_up: asyncio.Task[None] | None = None
        self._leader_stubs: dict[str, tuple[node_pb2_grpc.ExchangeStub, grpc.aio.Channel]] = {}
        self._channels: list[grpc.aio.Channel] = []
        self.final_height = 0
        # how far this node's clock is off from its peers' (ms), when they agree it is
        self.clock_off_ms: int | None = None
        self.peer_heights: dict[str, int] = {}
        self.fatal_error = ""
        self.fatal = asyncio.Event()
        data_key = read_data_keyring(config.paths.data_key)
        self.data_keys = data_key
        if member is not None and bytes(member.data_public_key) != data_key.public_key:
            self._take_next_data_key(bytes(member.data_public_key))
            if bytes(member.data_public_key) != data_key.public_key:
                raise ExchangeError(f"the ledger names {self.agency}'s data key with another "
                                    f"key than {config.paths.data_key}")
        self.reader = QueryReader(self.agency, self.chain_id, self.store, self.applier.queries,
                                  data_key)
        self.responder = Responder(self, data_key)
        self.webhook: Any = None  # exchange.node.webhook.Webhook, with a [webhook] table
        if config.webhook is not None:
            from exchange.node.webhook import Webhook

            self.webhook = Webhook(self, config.webhook)
        # The Raft log's writes and the block applies each have a thread of their own, so
        # that reads, admissions and answers never queue the critical path behind them.
        self._wal_thread = ThreadPoolExecutor(1, thread_name_prefix="raft-log")
        self._apply_thread = ThreadPoolExecutor(1, thread_name_prefix="apply")
        self._check_thread = ThreadPoolExecutor(1, thread_name_prefix="block-check")
        self._answer_waiters: dict[bytes, list[asyncio.Future[None]]] = {}
        self.limiter = AdmissionLimiter()

    @staticmethod
    async def _on(executor: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)

    # -- life cycle ----------------------------------------------------------------
    def _applied_raft_index(self) -> int:
        if self.store.height == 0:
            return 0
        return self.store.index_columns(self.store.height)[2]

    async def start(self) -> None:
        self._client_creds = client_credentials = self.tls.client_credentials()
        self.links = PeerLinks(self.agency, self.peers_addr, client_credentials)
        self.links.start()
        loop = asyncio.get_running_loop()
        for coro, name in ((self._raft_loop(), "raft"), (self._ticker(), "tick"),
                           (self._cutter(), "cutter"), (self._forwarder(), "forward"),
                           (self._peer_watch(), "peer-watch"),
                           (self._publish_catalog(), "catalog"),
                           (self._attest_receiver(), "attest-in"),
                           (self.responder.run(), "responder"),
                           (self._resubmitter(), "resubmit")):
            self._tasks.append(loop.create_task(self._supervised(coro, name), name=name))
        if self.core.pending_snapshot is not None:
            self._start_catch_up(self.core.pending_snapshot)
        if self.webhook is not None:
            self.webhook.start()
        self._refresh_final_height()
        log.info("node started", chain=self.chain_id, height=self.store.height,
                 term=self.core.term, applied=self.core.applied_index)

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
            self.fatal_error = f"{name}: {exc!r}"
            self.fatal.set()

    async def stop(self) -> None:
        for task in self._tasks + ([self._catching_up] if self._catching_up else []):
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.links is not None:
            await self.links.close()
        for ch in self._channels:
            await ch.close()
        for p in self.pending.values():
            for fut in p.futures:
                if not fut.done():
                    fut.set_exception(Unavailable("node is shutting down"))
                    fut.exception()  # a waiter may be gone already: no "never retrieved"
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

    # -- Raft ----------------------------------------------------------------------
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            if self.clock_off_ms is not None and self.core.role is not Role.LEADER:
                continue  # a node whose clock is off never campaigns (see _check_clock)
            self.core.tick()
            self._kick.set()

    def kick(self) -> None:
        self._kick.set()

    async def receive(self, m: Message) -> None:
        """A message from a peer. APPENDs are checked before Raft may append them."""
        if m.type is MessageType.APPEND and m.entries:
            good = await self._on(self._check_thread, self._valid_prefix, m.entries)
            if len(good) < len(m.entries):
                if not good:
                    return
                m = Message(type=m.type, from_id=m.from_id, to_id=m.to_id, term=m.term,
                            log_term=m.log_term, index=m.index, entries=tuple(good),
                            commit=m.commit)
        try:
            self.core.step(m)
        except RaftError as exc:
            log.warning("raft message refused", peer=m.from_id, error=str(exc))
            return
        self._kick.set()

    def _valid_prefix(self, entries: Sequence[Entry]) -> list[Entry]:
        """The entries up to the first block that fails the checks a follower makes
        before acknowledging (decision 3): proposer signature, Merkle root, every
        envelope's form and signature. The leader is reported for a bad one."""
        good: list[Entry] = []
        for entry in entries:
            if entry.kind is EntryKind.NORMAL:
                try:
                    self._check_entry_block(entry)
                except Exception as exc:  # noqa: BLE001 - any failure refuses the entry
                    m.INVALID_BLOCKS.inc()
                    log.error("leader sent an invalid block; refusing it", index=entry.index,
                              term=entry.term, error=str(exc))
                    break
            good.append(entry)
        return good

    def _check_entry_block(self, entry: Entry) -> None:
        block = ledger_pb2.Block.FromString(entry.data)
        hash_ = block_hash(block.header)
        if hash_ in self._prechecked:
            return
        header = parse_header(block.header)
        # Not an apply-time rule (those must not read the clock): this node only refuses
        # to acknowledge a block dated in its future, so a leader whose clock runs ahead
        # cannot commit blocks that would drag every later block's time forward.
        ahead_ms = header.timestamp_ms - int(time.time() * 1000)
        if ahead_ms > self.registry.genesis.params.admission_window_ms:
            raise ExchangeError(f"block {header.height} of {header.proposer} is dated "
                                f"{ahead_ms // 1000} s ahead of this node's clock")
        # Link and height are checked at apply time against the stored chain; here the
        # header is checked against itself (its claimed parent) and the signatures.
        checked = check_block(block, self.chain_id, header.height, bytes(header.prev_hash), 0,
                              proposer_key_lookup(self.registry),
                              lambda kid: self.registry.resolve(kid).public_key)
        if header.raft_index != entry.index or header.raft_term != entry.term:
            raise ExchangeError("block's Raft position does not match its entry")
        self._remember_checked(checked)

    def _remember_checked(self, checked: CheckedBlock) -> None:
        if checked.hash in self._prechecked:
            return
        self._prechecked[checked.hash] = checked
        self._prechecked_bytes += _checked_bytes(checked)
        while len(self._prechecked) > PREVERIFIED_MAX or \
                self._prechecked_bytes > PREVERIFIED_BYTES_MAX:
            self._prechecked_bytes -= _checked_bytes(self._prechecked.popitem(last=False)[1])

    def _take_checked(self, hash_: bytes) -> CheckedBlock | None:
        checked = self._prechecked.pop(hash_, None)
        if checked is not None:
            self._prechecked_bytes -= _checked_bytes(checked)
        return checked

    async def _raft_loop(self) -> None:
        while True:
            await self._kick.wait()
            self._kick.clear()
            while (rd := self.core.ready()) is not None:
                if rd.soft_state is not None:
                    self._on_soft_state(rd.soft_state.role, rd.soft_state.leader_id)
                if rd.snapshot is not None:
                    await self._on(self._wal_thread, self.wal.save_snapshot, rd.snapshot)
                if rd.entries_to_persist or rd.hard_state is not None:
                    with m.WAL_SECONDS.time():
                        await self._on(self._wal_thread, self.wal.save, rd.hard_state,
                                                list(rd.entries_to_persist))
                if self.links is not None:
                    self.links.send(rd.messages)
                if rd.snapshot is not None:
                    self._start_catch_up(rd.snapshot)
                if rd.committed_entries:
                    await self._apply_entries(rd.committed_entries)
                    self._send_own_attestations()
                self.core.advance(rd)
                await self._maybe_compact()

    def _on_soft_state(self, role: Role, leader: str) -> None:
        m.LEADER_CHANGES.inc()
        m.IS_LEADER.set(1 if role is Role.LEADER else 0)
        m.RAFT_TERM.set(self.core.term)
        log.info("raft role", role=role.value, leader=leader, term=self.core.term)
        self._unapplied_txs = self._log_tx_ids() if role is Role.LEADER else set()
        if role is Role.LEADER:
            self._proposed_tip = None
            self._inflight_blocks = 0
            # what this node had forwarded goes into its own blocks now
            for tx, p in self.pending.items():
                if tx not in self.mempool and tx not in self._unapplied_txs:
                    self.mempool[tx] = p.opened
            if self.mempool:
                self._mempool_event.set()
            self._reconcile_voters()

    async def _apply_entries(self, entries: Sequence[Entry]) -> None:
        batch: list[tuple[ledger_pb2.Block, CheckedBlock | None]] = []
        hashes: list[bytes] = []
        for entry in entries:
            if entry.kind is not EntryKind.NORMAL:
                continue
            block = ledger_pb2.Block.FromString(entry.data)
            if parse_header(block.header).height <= self.store.height:
                continue  # already applied (replay after restart)
            hash_ = block_hash(block.header)
            batch.append((block, self._take_checked(hash_)))
            hashes.append(hash_)
        if not batch:
            return
        started = time.perf_counter()
        applied = await self._on(self._apply_thread, self.applier.apply_many, batch)
        elapsed = time.perf_counter() - started
        m.APPLY_SECONDS.observe(elapsed)
        now = time.perf_counter()
        for hash_, one in zip(hashes, applied, strict=True):
            proposed_at = self._proposed_at.pop(hash_, None)
            if proposed_at is not None:
                m.BLOCK_SECONDS.observe(now - proposed_at)
            self._after_apply(one)
        self._applied_event.set()

    def _after_apply(self, applied: Applied) -> None:
        height = applied.checked.header.height
        m.BLOCKS.inc()
        m.COMMIT_HEIGHT.set(height)
        m.RAFT_COMMIT_INDEX.set(self.core.commit_index)
        for code in applied.codes:
            m.TXS.labels(code).inc()
        if self._inflight_blocks > 0 and applied.checked.header.proposer == self.agency:
            self._inflight_blocks -= 1
        for index, env in enumerate(applied.checked.envelopes):
            self.mempool.pop(env.tx_id, None)
            self._unapplied_txs.discard(env.tx_id)
            p = self._pop_pending(env.tx_id)
            if p is not None:
                m.COMMIT_SECONDS.observe(time.monotonic() - p.admitted_at)
                for fut in p.futures:
                    if not fut.done():
                        fut.set_result((height, index, applied.codes[index]))
        if applied.attestation is not None:
            self._attest_out.append(applied.attestation)
            self._attested.setdefault(height, set()).add(self.agency)
        for env, code in zip(applied.checked.envelopes, applied.codes, strict=True):
            if code == "OK":
                self._follow_query(env)
        if self.registry.version != self._registry_version:
            self._registry_version = self.registry.version
            self._registry_changed()
        recorded = [att for env, code in zip(applied.checked.envelopes, applied.codes,
                                             strict=True)
                    if code == "OK" and env.kind == "attestation_record"
                    for att in env.body.attestation_record.attestations]
        if recorded:
            self.receive_attestations(recorded)
        early = self._attest_early.pop(height, [])
        if early:
            self.receive_attestations(early)
        self._refresh_final_height()
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
            qid = bytes(getattr(env.body, env.kind).query_tx_id)
            for fut in self._answer_waiters.pop(qid, []):
                if not fut.done():
                    fut.set_result(None)

    async def _wait_answer(self, query_tx_id: bytes, wait_ms: int) -> None:
        """Wait up to `wait_ms` for an open query's answer or refusal to commit."""
        rec = self.applier.queries.get(query_tx_id)
        if rec is None or rec.status != "open" or wait_ms <= 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._answer_waiters.setdefault(bytes(query_tx_id), [])
        waiters.append(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, wait_ms / 1000)
        finally:  # a query that is never answered leaves no waiter behind
            if fut in waiters:
                waiters.remove(fut)
            if not waiters and self._answer_waiters.get(bytes(query_tx_id)) is waiters:
                del self._answer_waiters[bytes(query_tx_id)]

    async def _answer_read(self, read: Any, query_tx_id: bytes) -> Any:
        """`read(query_tx_id, tip time)` in a thread, retried while the state is a moment
        ahead of the block store."""
        for _ in range(ANSWER_PENDING_RETRIES):
            try:
                return await asyncio.to_thread(read, bytes(query_tx_id),
                                               self.store.tip_timestamp_ms)
            except AnswerPending:  # state is ahead of the store for a moment
                await asyncio.sleep(0.01)
        raise Unavailable("the answer is being stored; ask again")

    def _log_answer_read(self, view: node_pb2.AnswerView, reader: str, streamed: bool) -> None:
        m.ANSWER_READS.inc()
        log.info("answer read", reader=reader, query=view.query.tx_id.hex(),
                 requester=view.query.requester_agency, target=view.query.target_agency,
                 case=view.query.case_id, rows=view.query.row_count,
                 chunks=view.query.chunk_count, streamed=streamed)

    async def get_answer(self, query_tx_id: bytes, wait_ms: int,
                         reader: str) -> node_pb2.AnswerView:
        """A query's status and, once answered, its rows opened with this agency's data
        key, waiting up to `wait_ms` for the outcome to commit. Each read is logged."""
        await self._wait_answer(query_tx_id, wait_ms)
        view: node_pb2.AnswerView = await self._answer_read(self.reader.answer, query_tx_id)
        if view.chunks:
            self._log_answer_read(view, reader, streamed=False)
        return view

    async def stream_answer(self, query_tx_id: bytes, wait_ms: int,
                            reader: str) -> AsyncIterator[node_pb2.AnswerPart]:
        """get_answer one chunk at a time: the view first, then each chunk opened as it
        is sent, so neither this node nor a message holds the whole answer."""
        await self._wait_answer(query_tx_id, wait_ms)
        view, places = await self._answer_read(self.reader.answer_head, query_tx_id)
        if places:
            self._log_answer_read(view, reader, streamed=True)
        yield node_pb2.AnswerPart(query=view.query, commitment=view.commitment)
        for place in places:
            chunk = await asyncio.to_thread(self.reader.open_chunk, bytes(query_tx_id), place)
            yield node_pb2.AnswerPart(chunk=chunk)

    def case_statement(self, case_id: str, height: int) -> evidence_pb2.SignedCaseStatement:
        """This node's signed statement of a case as of `height` (which it has applied)."""
        if not case_id:
            raise MalformedInput("a case statement names a case")
        if height > self.store.height:
            raise Unavailable(f"{self.agency} is at height {self.store.height}, below {height}")
        count, running = self.applier.state.case_chains.as_of(case_id, height)
        raw = statement(case_id, height, count, running)
        return evidence_pb2.SignedCaseStatement(
            statement=raw, agency=self.agency, signer_key_id=self.signer.key_id,
            signature=self.signer.sign(Domain.CASE_STATEMENT, self.chain_id, raw))

    async def case_statements(self, case_id: str, height: int,
                              timeout_s: float = 10.0) -> node_pb2.CaseStatementSet:
        """A quorum of members' statements of a case as of `height` (default: this
        node's): its own and its peers', asking again while peers catch up."""
        height = height or self.store.height
        own = self.case_statement(case_id, height)
        got = {self.agency: own}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.registry.quorum and time.monotonic() < deadline:
            for agency, link in (self.links.links.items() if self.links else []):
                if agency in got:
                    continue
                try:
                    got[agency] = await link.stub.CaseStatement(
                        peer_pb2.CaseStatementRequest(case_id=case_id, height=height),
                        timeout=2.0)
                except grpc.aio.AioRpcError:
                    continue
            if len(got) < self.registry.quorum:
                await asyncio.sleep(0.2)
        wanted = bytes(own.statement)
        agreeing = [st for st in got.values() if bytes(st.statement) == wanted]
        if len(agreeing) < self.registry.quorum:
            raise Unavailable(f"only {len(agreeing)} members stated case {case_id} as of "
                              f"height {height}; {self.registry.quorum} are needed")
        parsed = evidence_pb2.CaseStatement.FromString(wanted)
        return node_pb2.CaseStatementSet(statements=agreeing, height=height,
                                         count=parsed.count, running_hash=parsed.running_hash)

    async def audit(self, request: node_pb2.AuditRequest) -> node_pb2.AuditReply:
        return await asyncio.to_thread(self.reader.audit, request,
                                       self.store.tip_timestamp_ms)

    async def _maybe_compact(self) -> None:
        applied = self.core.applied_index
        first = self.core.snapshot_meta.index
        settings = self.config.raft
        m.RAFT_LOG_BYTES.set(self.core.log_bytes)
        if (applied - first < settings.compact_every_entries
                and self.core.log_bytes <= settings.compact_log_bytes_max) or \
                self.core.pending_snapshot is not None:
            return
        # Only below the final height: a node behind the compaction point catches up by
        # streaming final blocks, and a block not yet final (attested by too few members
        # while some were cut off) becomes final only once a lagging member applies it
        # through Raft, which needs it still in the log.
        final_index = (self.store.index_columns(self.final_height)[2]
                       if 0 < self.final_height <= self.store.height else 0)
        target = min(self.core.compact_point(settings.compact_keep_entries,
                                             settings.compact_keep_bytes), final_index)
        if target <= first:
            return
        meta = self.core.compact(target)
        await self._on(self._wal_thread, self.wal.save_snapshot, meta)

    # -- catch-up by streaming blocks ----------------------------------------------
    def _start_catch_up(self, meta: SnapshotMeta) -> None:
        if self._catching_up is not None and not self._catching_up.done():
            return
        self._catching_up = asyncio.get_running_loop().create_task(self._catch_up(meta))

    async def _catch_up(self, meta: SnapshotMeta) -> None:
        """Fetch and verify final blocks from peers until the store holds every block
        up to the snapshot's Raft index, then tell Raft the snapshot is installed."""
        log.info("catching up by streaming blocks", to_raft_index=meta.index,
                 height=self.store.height)
        delay = 0.1
        while self._applied_raft_index() < meta.index:
            for peer in self._peer_order():
                try:
                    await self._fetch_from(peer, meta.index)
                except grpc.aio.AioRpcError as exc:
                    log.info("catch-up from peer failed", peer=peer, code=exc.code().name)
                except ExchangeError as exc:
                    log.error("peer sent a block that fails verification", peer=peer,
                              error=str(exc))
                if self._applied_raft_index() >= meta.index:
                    break
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.core.restore_snapshot_done(meta)
        log.info("caught up", height=self.store.height)
        self._kick.set()

    def _peer_order(self) -> list[str]:
        leader = self.core.leader_id
        others = [a for a in sorted(self.peers_addr) if a not in (self.agency, leader)]
        return ([leader] if leader and leader != self.agency and leader in self.peers_addr
                else []) + others

    async def _fetch_from(self, peer: str, raft_index: int) -> None:
        stub = peer_pb2_grpc.PeerStub(self._channel(peer))
        stream = stub.FetchBlocks(peer_pb2.FetchBlocksRequest(
            from_height=self.store.height + 1, final_only=True))
        async for block in stream:
            header = parse_header(block.header)
            if header.raft_index > raft_index:
                stream.cancel()
                return
            self._check_final(block, header.height)
            applied = await self._on(self._apply_thread, self.applier.apply, block)
            self._after_apply(applied)
            self._send_own_attestations()
            self.receive_attestations(list(block.attestations))

    def _check_final(self, block: ledger_pb2.Block, height: int) -> None:
        """A block from catch-up must carry a quorum of valid attestations of its hash."""
        hash_ = block_hash(block.header)
        roots = {bytes(a.results_root) for a in block.attestations}
        for root in roots:
            atts = [a for a in block.attestations if bytes(a.results_root) == root]
            if len(check_attestations(self.registry, height, hash_, root, atts)) >= \
                    self.registry.quorum:
                return
        raise ExchangeError(f"block {height} from catch-up is not final")

    def _channel(self, peer: str) -> grpc.aio.Channel:
        assert self._client_creds is not None
        ch = grpc.aio.secure_channel(self.peers_addr[peer], self._client_creds,
                                     options=CHANNEL_OPTIONS)
        self._channels.append(ch)
        if len(self._channels) > 32:
            old = self._channels.pop(0)
            # a cached leader stub on the channel closed goes with it
            for leader, (_, channel) in list(self._leader_stubs.items()):
                if channel is old:
                    del self._leader_stubs[leader]
            asyncio.get_running_loop().create_task(old.close())
        return ch

    # -- membership, rotation ------------------------------------------------------
    def _take_next_node_key(self, public_key: bytes) -> None:
        """Switch to the prepared next node key (keys/node.next.key) if it is the one
        the ledger now names; it replaces the current key file."""
        path = self.config.paths.node_key
        prepared = next_path(path)
        try:
            key = read_signing_key(prepared)
        except (OSError, ExchangeError, ValueError) as exc:
            log.error("the ledger names a node key this node does not hold", error=str(exc))
            return
        if key.public_key != public_key:
            log.error("the prepared next node key is not the one on the ledger",
                      path=str(prepared))
            return
        os.replace(prepared, path)
        self.signer = CachedSigner(key)
        self.applier.node_signer = self.signer
        log.info("node key switched to the one on the ledger", key_id=key.key_id.hex())

    def _take_next_data_key(self, public_key: bytes) -> None:
        """Switch to the prepared next data key (keys/data.next.key) if it is the one the
        ledger now names. The key replaced is kept among the retired data keys
        (keys/data.retired/), so everything sealed to it stays readable."""
        path = self.config.paths.data_key
        prepared = next_path(path)
        try:
            key = read_data_key(prepared)
        except (OSError, ExchangeError, ValueError) as exc:
            log.error("the ledger names a data key this node does not hold", error=str(exc))
            return
        if key.public_key != public_key:
            log.error("the prepared next data key is not the one on the ledger",
                      path=str(prepared))
            return
        try:
            retire_data_key(path, self.data_keys.current)
            os.replace(prepared, path)
        except OSError as exc:  # keys on a read-only volume (a Kubernetes Secret)
            log.error("data key switched in memory only: put the prepared key in place "
                      "and the old one among the retired keys before the next restart",
                      path=str(path), error=str(exc))
        self.data_keys.replace_current(key)
        log.info("data key switched to the one on the ledger", key_id=key.key_id.hex(),
                 retired=len(self.data_keys.key_ids) - 1)

    def _registry_changed(self) -> None:
        """Follow a membership change or rotation that just applied."""
        member = self.registry.members.get(self.agency)
        if member is None:
            if self.agency in self.registry.former_members:
                log.critical("this agency was removed from the network; stopping")
                self.fatal_error = "this agency was removed from the network"
                self.fatal.set()
            return
        if self.joining:
            log.info("joined the network as a member", chain=self.chain_id)
            self.joining = False
        if bytes(member.node_public_key) != self.signer.public_key:
            self._take_next_node_key(bytes(member.node_public_key))
        if bytes(member.data_public_key) != self.data_keys.public_key:
            self._take_next_data_key(bytes(member.data_public_key))
        pinned = self.registry.node_certs.get(self.agency)
        cert_switched = pinned is not None and self.tls.switch_to(pinned)
        trust_changed = self.tls.set_members(self.registry.members.values())
        self.peers_addr = {a: m.address for a, m in self.registry.members.items()}
        self._leader_stubs.clear()
        if cert_switched or trust_changed:
            self._client_creds = self.tls.client_credentials()
        if self.links is not None:
            loop = asyncio.get_running_loop()
            self._tasks.append(loop.create_task(self.links.update(
                self.peers_addr,
                self._client_creds if (cert_switched or trust_changed) else None),
                name="peer-links"))
        self._reconcile_voters()

    def _check_clock(self, peer_offsets_ms: Sequence[int]) -> None:
        """Compare this node's clock with its peers'. When at least two of them agree
        that it is off by more than a quarter of the admission window, this node stops
        leading and campaigning (a leader's clock dates every block); it says so, and
        takes part again once its clock agrees."""
        tolerance_ms = self.registry.genesis.params.admission_window_ms // 4
        if len(peer_offsets_ms) < 2:
            return
        ordered = sorted(peer_offsets_ms)
        median = ordered[len(ordered) // 2]
        off = abs(median) > tolerance_ms and sum(
            1 for o in ordered if abs(o) > tolerance_ms) >= 2
        if off and self.clock_off_ms is None:
            log.critical("this node's clock disagrees with its peers'; it will not lead "
                         "until it is corrected (check NTP)", off_by_ms=-median)
        elif not off and self.clock_off_ms is not None:
            log.warning("this node's clock agrees with its peers' again")
        self.clock_off_ms = -median if off else None
        m.CLOCK_OFF.set(-median / 1000 if off else 0)
        if off and self.core.role is Role.LEADER:
            others = [a for a in self.core.voters if a != self.agency]
            progress = self.core.progress()
            if others:
                target = max(others, key=lambda a: progress[a].match if a in progress else -1)
                with contextlib.suppress(RaftError):
                    # at once: the followers refuse this node's blocks dated in their
                    # future, so the target may never catch up with its log
                    self.core.transfer_leadership(target, at_once=True)
                    self._kick.set()
                    log.warning("handing leadership over: this node's clock is off",
                                to=target)

    def _reconcile_voters(self) -> None:
        """The leader moves Raft's voters toward the ledger's members, one server at a
        time (a member added on the ledger becomes a voter; a removed one stops being)."""
        if self.core.role is not Role.LEADER:
            return
        wanted, voters = set(self.registry.members), set(self.core.voters)
        if wanted == voters:
            return
        added, removed = sorted(wanted - voters), sorted(voters - wanted)
        change = (ConfChange(ConfChangeOp.ADD_VOTER, added[0]) if added
                  else ConfChange(ConfChangeOp.REMOVE_VOTER, removed[0]))
        try:
            self.core.propose_conf_change(change)
        except ConfChangeRejected as exc:
            log.debug("voter change waits", change=change.op.value, node=change.node_id,
                      reason=str(exc))
            return
        log.info("proposed a voter change", change=change.op.value, node=change.node_id)
        self._kick.set()

    # -- attestations --------------------------------------------------------------
    def _send_own_attestations(self) -> None:
        if self._attest_out and self.links is not None:
            batch, self._attest_out = self._attest_out, []
            self.links.send_attestations(batch)

    def receive_attestations(self, attestations: Sequence[ledger_pb2.Attestation]) -> None:
        """Queue peers' attestations; they are verified and stored in batches."""
        self._attest_in.extend(attestations)
        self._attest_in_event.set()

    async def _attest_receiver(self) -> None:
        """Verify and store received attestations, one store transaction per batch."""
        while True:
            await self._attest_in_event.wait()
            self._attest_in_event.clear()
            batch, self._attest_in = self._attest_in, []
            top = self.store.height
            for a in batch:
                if top < a.height <= top + 1_000:
                    self._attest_early.setdefault(a.height, []).append(a)
            batch = [a for a in batch if a.height <= top
                     and a.agency not in self._attested.get(a.height, ())]
            if batch:
                await asyncio.to_thread(self._store_attestations, batch)
            self._refresh_final_height()
            m.FINAL_HEIGHT.set(self.final_height)
            m.MEMPOOL.set(len(self.mempool))
            await asyncio.sleep(ATTEST_FLUSH_S)

    def _store_attestations(self, batch: Sequence[ledger_pb2.Attestation]) -> None:
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

    def _attested_agencies(self, height: int) -> set[str]:
        held = self._attested.get(height)
        if held is None:
            held = self._attested[height] = {a.agency for a in self.store.attestations(height)}
        return held

    def _refresh_final_height(self) -> None:
        quorum = self.registry.quorum
        height = self.store.height
        while height > self.final_height:
            if len(self._attested_agencies(height)) >= quorum:
                self.final_height = height
                break
            height -= 1
        for h in [h for h in self._attested if h < self.final_height - 64]:
            del self._attested[h]

    # -- submissions ---------------------------------------------------------------
    def admit(self, raw: bytes) -> OpenedEnvelope:
        started = time.perf_counter()
        try:
            return admit(raw, self.registry, self.store.height + 1,
                         queries=self.applier.queries)
        except ExchangeError as exc:
            m.REFUSED.labels(exc.code).inc()
            raise
        finally:
            m.ADMISSION_SECONDS.observe(time.perf_counter() - started)

    def admit_limited(self, raw: bytes) -> OpenedEnvelope:
        """Admission of what a person submits: the checks, then the signer's and its
        agency's rate limits (a node's own or forwarded submissions are not limited:
        each person submits only to their own agency's node, which limits them)."""
        opened = self.admit(raw)
        try:
            self.limiter.take(opened, self.registry.resolve(opened.signer_key_id),
                              self.registry.rate_limits)
        except ExchangeError as exc:
            m.REFUSED.labels(exc.code).inc()
            raise
        return opened

    async def submit(self, raw: bytes, wait: bool,
                     timeout_s: float = SUBMIT_TIMEOUT_S,
                     limited: bool = False) -> node_pb2.SubmitResponse:
        """Admit one envelope and (unless `wait` is false) wait for its block;
        `limited`: a person's submission, held to the admission rate limits."""
        opened = await asyncio.to_thread(self.admit_limited if limited else self.admit, raw)
        return (await self._enter([opened], wait, timeout_s))[0]

    async def submit_batch(self, raws: Sequence[bytes], wait: bool,
                           timeout_s: float = SUBMIT_TIMEOUT_S, limited: bool = False
                           ) -> list[node_pb2.SubmitResponse]:
        """Many envelopes: admitted in one pass, each refused or accepted on its own."""
        admit_one = self.admit_limited if limited else self.admit

        def admit_all() -> list[OpenedEnvelope | ExchangeError]:
            out: list[OpenedEnvelope | ExchangeError] = []
            for raw in raws:
                try:
                    out.append(admit_one(raw))
                except ExchangeError as exc:
                    out.append(exc)
            return out

        admitted = await asyncio.to_thread(admit_all)
        good = [a for a in admitted if isinstance(a, OpenedEnvelope)]
        try:
            entered = iter(await self._enter(good, wait, timeout_s))
        except ExchangeError as exc:
            return [node_pb2.SubmitResponse(error_code=exc.code, error=str(exc))
                    for _ in raws]
        return [node_pb2.SubmitResponse(error_code=a.code, error=str(a),
                                        retry_after_ms=getattr(a, "retry_after_ms", 0))
                if isinstance(a, ExchangeError) else next(entered) for a in admitted]

    async def _enter(self, envelopes: Sequence[OpenedEnvelope], wait: bool,
                     timeout_s: float) -> list[node_pb2.SubmitResponse]:
        """Put admitted envelopes on their way into a block (this node's mempool when it
        leads, else the leader's) and, if asked, wait for each to be applied here."""
        loop = asyncio.get_running_loop()
        answers: list[node_pb2.SubmitResponse | asyncio.Future[tuple[int, int, str]]] = []
        to_forward: list[bytes] = []
        leading = self.core.role is Role.LEADER
        for opened in envelopes:
            stored = self.store.tx(opened.tx_id)
            if stored is not None:  # the same envelope again: its original outcome
                answers.append(node_pb2.SubmitResponse(
                    tx_id=opened.tx_id, status="committed", height=stored.height,
                    index=stored.index, result=stored.result, duplicate=True))
                continue
            p = self.pending.get(opened.tx_id)
            if p is None:
                if len(self.pending) >= MEMPOOL_TX_MAX or \
                        self._pending_bytes + len(opened.raw) > PENDING_BYTES_MAX:
                    raise Unavailable("the node's queue is full; retry shortly")
                p = self.pending[opened.tx_id] = Pending(opened, time.monotonic())
                self._pending_bytes += len(opened.raw)
            fut: asyncio.Future[tuple[int, int, str]] = loop.create_future()
            p.futures.append(fut)
            answers.append(fut)
            if leading:
                if opened.tx_id not in self.mempool and opened.tx_id not in self._unapplied_txs:
                    self.mempool[opened.tx_id] = opened
            else:
                to_forward.append(opened.raw)
                p.last_sent = time.monotonic()
        if leading:
            self._mempool_event.set()
        elif to_forward:
            sent: asyncio.Future[None] = loop.create_future()
            self._forward_queue.append((to_forward, sent))
            self._forward_event.set()
            await sent
        results: list[node_pb2.SubmitResponse] = []
        deadline = time.monotonic() + timeout_s
        for opened, answer in zip((o for o in envelopes), answers, strict=True):
            if isinstance(answer, node_pb2.SubmitResponse):
                results.append(answer)
            elif not wait:
                results.append(node_pb2.SubmitResponse(tx_id=opened.tx_id, status="accepted"))
            else:
                try:
                    height, index, result = await asyncio.wait_for(
                        asyncio.shield(answer), max(0.0, deadline - time.monotonic()))
                except TimeoutError as exc:
                    raise Unavailable("not committed in time; the transaction may still "
                                      "commit (query it by id)") from exc
                results.append(node_pb2.SubmitResponse(
                    tx_id=opened.tx_id, status="committed", height=height, index=index,
                    result=result))
        return results

    async def _forwarder(self) -> None:
        """Forward what clients submit here to the leader in batches: whatever arrives
        while one batch is on its way goes in the next."""
        while True:
            await self._forward_event.wait()
            self._forward_event.clear()
            while self._forward_queue:
                batch: list[tuple[list[bytes], asyncio.Future[None]]] = []
                size = 0
                while self._forward_queue and (not batch or size + len(
                        self._forward_queue[0][0]) <= FORWARD_BATCH_MAX):
                    item = self._forward_queue.pop(0)
                    batch.append(item)
                    size += len(item[0])
                try:
                    await self._forward([raw for raws, _ in batch for raw in raws])
                except ExchangeError as exc:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                else:
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_result(None)

    async def _forward(self, raws: Sequence[bytes]) -> None:
        """Hand admitted envelopes to the leader (no wait: this node watches them)."""
        deadline = time.monotonic() + 5.0
        while True:
            leader = self.core.leader_id
            if self.core.role is Role.LEADER:
                for raw in raws:
                    opened = self.admit(raw)
                    if opened.tx_id not in self._unapplied_txs:
                        self.mempool.setdefault(opened.tx_id, opened)
                self._mempool_event.set()
                return
            if leader and leader != self.agency and leader in self.peers_addr:
                # (a leader just removed from the network is no leader to forward to)
                call = self._leader_stub(leader).SubmitBatch(
                    node_pb2.SubmitBatchRequest(envelopes=list(raws), no_wait=True),
                    timeout=5)
                try:
                    reply = await self._unless_leader_changes(call, leader)
                except grpc.aio.AioRpcError as exc:
                    log.info("forward to leader failed", leader=leader, code=exc.code().name)
                else:
                    if reply is not None:
                        self._refused_by_leader(leader, raws, reply.results)
                        return
                    log.info("leader changed while forwarding; forwarding again",
                             leader=leader, now=self.core.leader_id or "-")
                    continue
            if time.monotonic() > deadline:
                raise Unavailable("no leader to forward to; retry shortly")
            await asyncio.sleep(0.1)

    async def _unless_leader_changes(self, call: Any, leader: str) -> Any:
        """The reply to a call made to `leader`, or None (the call cancelled) as soon as
        this node no longer follows it: a leader cut off from the network never answers,
        and waiting out the deadline would hold up every forward queued behind this one
        long after a new leader has been elected."""
        task: asyncio.Future[Any] = asyncio.ensure_future(call)
        while True:
            done, _ = await asyncio.wait({task}, timeout=LEADER_WATCH_S)
            if done:
                return task.result()
            if self.core.role is Role.LEADER or self.core.leader_id != leader:
                call.cancel()
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await task
                return None

    def _refused_by_leader(self, leader: str, raws: Sequence[bytes],
                           results: Sequence[node_pb2.SubmitResponse]) -> None:
        """The leader admits what it is forwarded again, against its own clock and
        state; what it refuses for good (a body outside its time window, a credential
        revoked meanwhile) never commits, so whoever waits for it here is told the
        leader's reason now instead of waiting out the submit timeout."""
        if len(results) != len(raws):
            log.warning("leader answered a forward with the wrong number of results",
                        leader=leader, sent=len(raws), results=len(results))
            return
        for raw, result in zip(raws, results, strict=True):
            if not result.error_code or result.error_code == Unavailable.code:
                continue
            tid = tx_id(ledger_pb2.Envelope.FromString(raw).body)
            p = self._pop_pending(tid)
            if p is None:
                continue
            m.REFUSED.labels(result.error_code).inc()
            log.info("leader refused a forwarded transaction", leader=leader,
                     tx=tid.hex(), code=result.error_code, error=result.error)
            error = _error_for_code(result.error_code,
                                    f"the leader ({leader}) refused it: {result.error}")
            for fut in p.futures:
                if not fut.done():
                    fut.set_exception(error)

    def _pop_pending(self, tx: bytes) -> Pending | None:
        p = self.pending.pop(tx, None)
        if p is not None:
            self._pending_bytes -= len(p.opened.raw)
        return p

    def _leader_stub(self, leader: str) -> node_pb2_grpc.ExchangeStub:
        cached = self._leader_stubs.get(leader)
        if cached is None:
            channel = self._channel(leader)
            cached = self._leader_stubs[leader] = (node_pb2_grpc.ExchangeStub(channel), channel)
        return cached[0]

    async def _resubmitter(self) -> None:
        """Re-forward what this node admitted and has not seen applied (decision 3)."""
        while True:
            await asyncio.sleep(RESUBMIT_AFTER_S / 2)
            now = time.monotonic()
            for tx, p in list(self.pending.items()):
                p.futures = [f for f in p.futures if not f.done()]
                if now - p.admitted_at > SUBMIT_TIMEOUT_S * 4:
                    self._pop_pending(tx)  # long given up by every caller
            stale = [p.opened.raw for p in self.pending.values()
                     if now - p.last_sent > RESUBMIT_AFTER_S]
            if not stale:
                continue
            if self.core.role is Role.LEADER:
                for p in self.pending.values():
                    if now - p.last_sent > RESUBMIT_AFTER_S and not self._in_flight(p) \
                            and p.opened.tx_id not in self._unapplied_txs:
                        self.mempool.setdefault(p.opened.tx_id, p.opened)
                        p.last_sent = now
                self._mempool_event.set()
                continue
            log.warning("re-forwarding transactions the leader has not included",
                        count=len(stale), leader=self.core.leader_id)
            m.RESUBMITTED.inc(len(stale))
            with contextlib.suppress(ExchangeError):
                for i in range(0, len(stale), 500):
                    await self._forward(stale[i:i + 500])
            for p in self.pending.values():
                if now - p.last_sent > RESUBMIT_AFTER_S:
                    p.last_sent = now

    async def _publish_catalog(self) -> None:
        """Publish this agency's catalog on the ledger (signed by its node) wherever the
        ledger does not already say exactly that, then stop."""
        from agents import AGENCIES, JOINING_AGENCIES
        from agents.catalog import catalog_entries

        if self.agency not in AGENCIES + JOINING_AGENCIES:
            return  # a member without known datasets publishes nothing
        wanted = catalog_entries(self.agency)
        while True:
            await asyncio.sleep(1.0)
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
                body = new_body(self.chain_id, self.agency, int(time.time() * 1000))
                body.catalog_entry.CopyFrom(entry)
                envelopes.append(seal_envelope(body, self.signer))
            try:
                results = await self.submit_batch(envelopes, wait=True, timeout_s=10.0)
            except ExchangeError as exc:  # no leader yet, a leader change: try again
                log.info("catalog not published yet", error=str(exc))
                continue
            errors = [r.error for r in results if r.error_code]
            if errors:
                log.warning("catalog not published yet", error=errors[0])

    async def _peer_watch(self) -> None:
        """Ask every peer for its height now and then, for status pages."""
        while True:
            await asyncio.sleep(PEER_STATUS_EVERY_S)
            self._reconcile_voters()
            if self.links is None:
                continue
            offsets: list[int] = []
            for agency, link in list(self.links.links.items()):
                try:
                    sent_ms = time.time() * 1000
                    st = await link.stub.Status(peer_pb2.PeerStatusRequest(), timeout=1.0)
                    received_ms = time.time() * 1000
                    self.peer_heights[agency] = st.height
                    if st.time_ms:
                        offsets.append(int(st.time_ms - (sent_ms + received_ms) / 2))
                except (grpc.aio.AioRpcError, grpc.aio.UsageError):
                    # unreachable, or its link was just replaced (a membership change)
                    self.peer_heights.pop(agency, None)
            self._check_clock(offsets)

    def _in_flight(self, p: Pending) -> bool:
        return p.opened.tx_id in self.mempool or p.last_sent > 0 and \
            time.monotonic() - p.last_sent < RESUBMIT_AFTER_S

    # -- block cutting (leader) ----------------------------------------------------
    async def _cutter(self) -> None:
        """Group commit: a block is cut as soon as the previous one is no longer in
        flight, from whatever has arrived meanwhile; it closes earlier when full and never
        waits longer than the configured interval while blocks are in flight."""
        interval_s = self.config.block.interval_ms / 1000
        tx_max, bytes_max = self.config.block.tx_max, self.config.block.bytes_max
        while True:
            await self._mempool_event.wait()
            if self.core.role is not Role.LEADER or not self.mempool \
                    or self.clock_off_ms is not None:
                self._mempool_event.clear()
                if self.clock_off_ms is not None:
                    await asyncio.sleep(0.1)  # no block dated by a clock that is off
                continue
            if self.core.pending_snapshot is not None:
                # a leader still fetching blocks cannot extend the chain yet
                await asyncio.sleep(0.05)
                continue
            deadline = time.monotonic() + interval_s
            while (self._inflight_blocks >= INFLIGHT_BLOCKS_MAX
                   or (self._inflight_blocks > 0 and len(self.mempool) < tx_max
                       and time.monotonic() < deadline)) and self.core.role is Role.LEADER:
                self._applied_event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._applied_event.wait(),
                                           max(0.0005, deadline - time.monotonic())
                                           if self._inflight_blocks < INFLIGHT_BLOCKS_MAX
                                           else 1.0)
                if self._inflight_blocks >= INFLIGHT_BLOCKS_MAX and \
                        self.core.commit_index == self.core.applied_index and \
                        self.core.applied_index == self.core.last_index:
                    self._inflight_blocks = 0  # nothing really in flight (term changed)
            if self.core.role is not Role.LEADER:
                continue
            chosen: list[OpenedEnvelope] = []
            size = 0
            while self.mempool and len(chosen) < tx_max:
                tx, opened = next(iter(self.mempool.items()))
                if size + len(opened.raw) > bytes_max and chosen:
                    break
                del self.mempool[tx]
                if tx in self._unapplied_txs or self.store.has_tx(tx):
                    continue
                chosen.append(opened)
                size += len(opened.raw)
            if not self.mempool:
                self._mempool_event.clear()
            if chosen:
                self._propose_block(chosen)
            await asyncio.sleep(0)

    def _propose_block(self, chosen: list[OpenedEnvelope]) -> None:
        """Cut the next block from admitted envelopes (each already verified here) and
        propose it as a Raft entry."""
        envelopes = self._with_attestation_record([o.raw for o in chosen])
        height, prev_hash, prev_ts = self._proposed_tip or self._tip_from_log()
        term, index = self.core.term, self.core.last_index + 1
        block = build_block(self.chain_id, height + 1, prev_hash, envelopes,
                            max(int(time.time() * 1000), prev_ts), self.agency, self.signer,
                            term, index)
        try:
            got_term, got_index = self.core.propose(block.SerializeToString())
        except (NotLeader, RaftError) as exc:
            log.info("block not proposed", error=str(exc))
            return
        assert (got_term, got_index) == (term, index)
        hash_ = block_hash(block.header)
        opened = chosen + [open_envelope(raw, self.chain_id)
                           for raw in envelopes[len(chosen):]]
        self._remember_checked(CheckedBlock(block, parse_header(block.header), hash_,
                                            tuple(opened)))
        self._unapplied_txs.update(o.tx_id for o in opened)
        self._proposed_at[hash_] = time.perf_counter()
        if len(self._proposed_at) > 64:
            self._proposed_at.pop(next(iter(self._proposed_at)))
        self._proposed_tip = (height + 1, hash_, parse_header(block.header).timestamp_ms)
        self._inflight_blocks += 1
        self._kick.set()

    def _log_tx_ids(self) -> set[bytes]:
        """Tx ids in blocks of this node's log that are not applied yet. A leader never
        drops entries of its own log, so each of these will commit: never include one
        of them again."""
        ids: set[bytes] = set()
        first = max(self.core.applied_index + 1, self.core.first_index)
        for entry in self.core.entries(first, self.core.last_index + 1):
            if entry.kind is EntryKind.NORMAL:
                block = ledger_pb2.Block.FromString(entry.data)
                ids.update(tx_id(ledger_pb2.Envelope.FromString(raw).body)
                           for raw in block.envelopes)
        return ids

    def _tip_from_log(self) -> tuple[int, bytes, int]:
        """The last block in this leader's log, committed or not (it will commit)."""
        for index in range(self.core.last_index, self.core.applied_index, -1):
            entry = self.core.entries(index, index + 1)[0]
            if entry.kind is EntryKind.NORMAL:
                block = ledger_pb2.Block.FromString(entry.data)
                header = parse_header(block.header)
                return header.height, block_hash(block.header), header.timestamp_ms
        return self.store.height, self.store.tip_hash, self.store.tip_timestamp_ms

    def _with_attestation_record(self, envelopes: list[bytes]) -> list[bytes]:
        """Record the attestations this leader holds for recent blocks (decision 4)."""
        recorded_to = getattr(self, "_recorded_to", 0)
        top = self.store.height
        atts: list[ledger_pb2.Attestation] = []
        for height in range(max(recorded_to + 1, top - 64), top + 1):
            held = self.store.attestations(height)
            if len({a.agency for a in held}) >= self.registry.quorum:
                atts.extend(held)
                self._recorded_to = height
            else:
                break
        if not atts:
            return envelopes
        body = new_body(self.chain_id, self.agency, int(time.time() * 1000))
        body.attestation_record.attestations.extend(atts)
        return envelopes + [seal_envelope(body, self.signer)]

    # -- reads ---------------------------------------------------------------------
    def follow(self) -> asyncio.Queue[ledger_pb2.Block]:
        q: asyncio.Queue[ledger_pb2.Block] = asyncio.Queue(1024)
        self._followers.append(q)
        return q

    def unfollow(self, q: asyncio.Queue[ledger_pb2.Block]) -> None:
        with contextlib.suppress(ValueError):
            self._followers.remove(q)

    def status(self) -> node_pb2.NodeStatus:
        progress = self.core.progress()
        peers = []
        for agency, address in sorted(self.peers_addr.items()):
            if agency == self.agency:
                continue
            link = self.links.links.get(agency) if self.links else None
            pr = progress.get(agency)
            peers.append(node_pb2.PeerView(agency=agency, address=address,
                                           match_index=pr.match if pr else 0,
                                           height=self.peer_heights.get(agency, 0),
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

