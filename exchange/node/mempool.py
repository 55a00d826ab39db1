"""The mempool: admitted transactions on their way into a block. A follower forwards
what it admits to the leader (and forwards again what the leader has not included); the
leader cuts blocks from its mempool (group commit) and proposes them to Raft. Whoever
submitted waits here until the transaction's block is applied."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog

from exchange.errors import ExchangeError, Unavailable, error_for_code
from exchange.identity.config import BlockCutting
from exchange.identity.keys import CachedSigner
from exchange.identity.registry import KeyRegistry
from exchange.ledger.apply import Applied
from exchange.ledger.block import (
    CheckedBlock,
    OpenedEnvelope,
    block_hash,
    build_block,
    new_body,
    open_envelope,
    parse_header,
    seal_envelope,
    tx_id,
)
from exchange.ledger.queries import QueryBook
from exchange.ledger.store import BlockStore
from exchange.node import metrics as m
from exchange.node.admission import admit
from exchange.node.blockcheck import BlockChecks
from exchange.node.channels import PeerChannels
from exchange.node.driver import RaftDriver
from exchange.node.finality import Finality
from exchange.node.ratelimit import AdmissionLimiter
from exchange.raft.core import NotLeader, RaftError, Role
from exchange.raft.types import EntryKind
from exchange.v1 import ledger_pb2, node_pb2

log = structlog.get_logger("exchange.node")

INFLIGHT_BLOCKS_MAX = 1  # proposed but not yet applied, at the leader (1: larger blocks, BENCHMARKS.md)
MEMPOOL_TX_MAX = 50_000
PENDING_BYTES_MAX = 256 << 20  # admitted envelopes this node waits for, by size
RESUBMIT_AFTER_S = 3.0
RESUBMIT_BATCH_MAX = 500
PENDING_GIVEN_UP_S_FACTOR = 4  # a pending tx is dropped this many submit timeouts later
LEADER_WATCH_S = 0.05  # how often a forward in flight checks that the leader is the same
SUBMIT_TIMEOUT_S = 30.0
FORWARD_TIMEOUT_S = 5.0
FORWARD_RETRY_S = 0.1
FORWARD_BATCH_MAX = 1_000
ADMIT_ON_LOOP_MAX = 8  # envelopes admitted on the loop; more go to a thread
# (leader, envelopes) -> the leader's answer, or None when the link to it is down
LinkForward = Callable[[str, Sequence[bytes]],
                       "asyncio.Task[node_pb2.SubmitBatchResponse] | None"]
RECENT_BLOCKS = 4  # a busy leader waits for the next block to be as full as the largest of these
PROPOSED_KEPT_MAX = 64  # proposal times kept for the block latency metric
CLOCK_OFF_WAIT_S = 0.1
SNAPSHOT_WAIT_S = 0.05
INFLIGHT_WAIT_MIN_S = 0.0005
INFLIGHT_FULL_WAIT_S = 1.0
MS_PER_S = 1000

Outcome = tuple[int, int, str]  # height, index in the block, result code


def refusal(exc: ExchangeError) -> node_pb2.SubmitResponse:
    """The answer to a refused submission: its code, the reason, and when to retry
    (a rate limit's wait; 0 for every other refusal)."""
    return node_pb2.SubmitResponse(error_code=exc.code, error=str(exc),
                                   retry_after_ms=getattr(exc, "retry_after_ms", 0))


@dataclass
class Pending:
    """An admitted transaction this node waits to see applied."""

    opened: OpenedEnvelope
    admitted_at: float
    futures: list[asyncio.Future[Outcome]] = field(default_factory=list)
    last_sent: float = 0.0


class _WaitingFrame:
    """The requests of one SubmitFrames frame that wait for their block: each answered
    when its future is done, those still open when the submit timeout passes answered
    UNAVAILABLE (they may still commit). Kept alive by its futures' callbacks and timer."""

    def __init__(self, answer: Callable[[int, node_pb2.SubmitResponse], None],
                 waiting: Sequence[tuple[int, bytes, asyncio.Future[Outcome]]],
                 timeout_s: float) -> None:
        self._answer = answer
        self._open = {i: tid for i, tid, _ in waiting}
        self._timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)
        for i, _, fut in waiting:
            fut.add_done_callback(functools.partial(self._done, i))

    def _done(self, i: int, fut: asyncio.Future[Outcome]) -> None:
        exc = None if fut.cancelled() else fut.exception()  # (retrieved in any case)
        tid = self._open.pop(i, None)
        if tid is None:
            return  # answered when the timeout passed
        if not self._open:
            self._timer.cancel()
        if fut.cancelled():
            self._answer(i, refusal(Unavailable("the node stopped waiting for it; the "
                                                "transaction may still commit (query it "
                                                "by id)")))
        elif exc is not None:
            self._answer(i, refusal(exc if isinstance(exc, ExchangeError) else
                                    Unavailable(f"not committed: {exc!r}")))
        else:
            height, index, result = fut.result()
            self._answer(i, node_pb2.SubmitResponse(tx_id=tid, status="committed",
                                                    height=height, index=index,
                                                    result=result))

    def _expire(self) -> None:
        expired, self._open = self._open, {}
        for i in expired:
            self._answer(i, refusal(Unavailable("not committed in time; the transaction may "
                                                "still commit (query it by id)")))


class Mempool:
    """Admission, forwarding, resubmission and block cutting for one node."""

    def __init__(self, agency: str, chain_id: str, driver: RaftDriver, store: BlockStore,
                 registry: KeyRegistry, queries: QueryBook, cutting: BlockCutting,
                 signer: Callable[[], CachedSigner], channels: PeerChannels,
                 checks: BlockChecks, finality: Finality,
                 clock_ok: Callable[[], bool]) -> None:
        """`signer()`: the node's current signer (it changes with a key rotation);
        `clock_ok()`: this node's clock agrees with its peers' (else it cuts nothing)."""
        self.agency = agency
        self.chain_id = chain_id
        self.driver = driver
        self.core = driver.core
        self.store = store
        self.registry = registry
        self.queries = queries
        self.cutting = cutting
        self._signer = signer
        self.channels = channels
        # forwards on the Raft link (PeerLinks.forward), once the node has started
        self.link_forward: LinkForward | None = None
        self.checks = checks
        self.finality = finality
        self._clock_ok = clock_ok
        self.limiter = AdmissionLimiter()
        self.txs: OrderedDict[bytes, OpenedEnvelope] = OrderedDict()
        self.pending: dict[bytes, Pending] = {}
        self._pending_bytes = 0
        self._inflight_blocks = 0
        self._proposed_at: dict[bytes, float] = {}
        self._unapplied_txs: set[bytes] = set()
        self._forward_queue: list[tuple[list[bytes], asyncio.Future[None]]] = []
        self._forward_event = asyncio.Event()
        self._proposed_tip: tuple[int, bytes, int] | None = None
        self._txs_event = asyncio.Event()
        self._recent_sizes: deque[int] = deque(maxlen=RECENT_BLOCKS)  # this leader's blocks
        self._applied_event = asyncio.Event()

    def __len__(self) -> int:
        return len(self.txs)

    @property
    def leading(self) -> bool:
        return self.core.role is Role.LEADER

    # -- admission -------------------------------------------------------------------
    def admit(self, raw: bytes) -> OpenedEnvelope:
        started = time.perf_counter()
        try:
            return admit(raw, self.registry, self.store.height + 1, queries=self.queries)
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

    async def submit(self, raw: bytes, wait: bool, timeout_s: float = SUBMIT_TIMEOUT_S,
                     limited: bool = False) -> node_pb2.SubmitResponse:
        """Admit one envelope and (unless `wait` is false) wait for its block;
        `limited`: a person's submission, held to the admission rate limits. One
        envelope is admitted on the loop: its ~0.1 ms of checks cost less than handing
        it to a thread and back (BENCHMARKS.md, issue 20)."""
        opened = (self.admit_limited if limited else self.admit)(raw)
        return (await self._enter([opened], wait, timeout_s))[0]

    async def _admit_all(self, raws: Sequence[bytes], limited: bool
                         ) -> list[OpenedEnvelope | ExchangeError]:
        """Each envelope admitted or the reason it is not: on the loop for a few, in a
        thread for more (the loop is not held up for long)."""
        admit_one = self.admit_limited if limited else self.admit

        def admit_all() -> list[OpenedEnvelope | ExchangeError]:
            out: list[OpenedEnvelope | ExchangeError] = []
            for raw in raws:
                try:
                    out.append(admit_one(raw))
                except ExchangeError as exc:
                    out.append(exc)
            return out

        if len(raws) <= ADMIT_ON_LOOP_MAX:
            return admit_all()
        return await asyncio.to_thread(admit_all)

    async def submit_batch(self, raws: Sequence[bytes], wait: bool,
                           timeout_s: float = SUBMIT_TIMEOUT_S, limited: bool = False
                           ) -> list[node_pb2.SubmitResponse]:
        """Many envelopes: admitted in one pass, each refused or accepted on its own."""
        admitted = await self._admit_all(raws, limited)
        good = [a for a in admitted if isinstance(a, OpenedEnvelope)]
        try:
            entered = iter(await self._enter(good, wait, timeout_s))
        except ExchangeError as exc:
            return [refusal(exc) for _ in raws]
        return [refusal(a) if isinstance(a, ExchangeError) else next(entered)
                for a in admitted]

    async def take_forwarded(self, raws: Sequence[bytes]) -> list[node_pb2.SubmitResponse]:
        """Envelopes a member forwards to this node as its leader: each admitted again
        here (form, signer, signature, time window, against this node's own state) and
        put in the mempool, answered one result each (only a refusal says anything).
        They are not watched here: the member that forwarded them waits for them and
        forwards again what is left out (decision 3). A node that no longer leads takes
        them as any submission, on to its leader."""
        if not self.leading:
            return await self.submit_batch(raws, wait=False)
        admitted = await self._admit_all(raws, limited=False)
        results: list[node_pb2.SubmitResponse] = []
        for a in admitted:
            if isinstance(a, OpenedEnvelope) and not self.leading:
                a = Unavailable("this node stopped leading; forward again")
            elif isinstance(a, OpenedEnvelope) and a.tx_id not in self.txs and \
                    a.tx_id not in self._unapplied_txs:
                if len(self.txs) >= MEMPOOL_TX_MAX:
                    a = Unavailable("the leader's queue is full; retry shortly")
                else:
                    self.txs[a.tx_id] = a
            if isinstance(a, ExchangeError):
                results.append(refusal(a))
            else:
                results.append(node_pb2.SubmitResponse(tx_id=a.tx_id, status="accepted"))
        if self.txs and self.leading:
            self._txs_event.set()
        return results

    async def _enter(self, envelopes: Sequence[OpenedEnvelope], wait: bool,
                     timeout_s: float) -> list[node_pb2.SubmitResponse]:
        """Put admitted envelopes on their way into a block (this node's mempool when it
        leads, else the leader's) and, if asked, wait for each to be applied here."""
        answers = await self._dispatch(envelopes)
        return await self._outcomes(envelopes, answers, wait, timeout_s)

    async def _dispatch(self, envelopes: Sequence[OpenedEnvelope]
                        ) -> list[node_pb2.SubmitResponse | asyncio.Future[Outcome]]:
        """Put admitted envelopes on their way into a block: each one's stored outcome
        (a duplicate) or a future for it."""
        answers, to_forward = self._queue(envelopes)
        if self.leading:
            self._txs_event.set()
        elif to_forward:
            sent: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._forward_queue.append((to_forward, sent))
            self._forward_event.set()
            await sent
        return answers

    async def submit_frame(self, raws: Sequence[bytes], waits: Sequence[bool], limited: bool,
                           answer: Callable[[int, node_pb2.SubmitResponse], None],
                           timeout_s: float = SUBMIT_TIMEOUT_S) -> None:
        """Envelopes a client had ready at once (a SubmitFrames frame): admitted in one
        pass and put on their way together. `answer(i, response)` is called exactly once
        for each, as soon as it is known: a refusal or a duplicate's stored outcome at
        once, an accepted one that does not wait (`waits[i]` false) when it is on its way,
        and one that waits when its block is applied here, or with UNAVAILABLE after
        `timeout_s` (it may still commit)."""
        admitted = await self._admit_all(raws, limited)
        good: list[tuple[int, OpenedEnvelope]] = []
        for i, a in enumerate(admitted):
            if isinstance(a, ExchangeError):
                answer(i, refusal(a))
            else:
                good.append((i, a))
        if not good:
            return
        try:
            answers = await self._dispatch([opened for _, opened in good])
        except ExchangeError as exc:
            for i, _ in good:
                answer(i, refusal(exc))
            return
        waiting: list[tuple[int, bytes, asyncio.Future[Outcome]]] = []
        for (i, opened), outcome in zip(good, answers, strict=True):
            if isinstance(outcome, node_pb2.SubmitResponse):
                answer(i, outcome)
            elif not waits[i]:
                answer(i, node_pb2.SubmitResponse(tx_id=opened.tx_id, status="accepted"))
            else:
                waiting.append((i, opened.tx_id, outcome))
        if waiting:
            _WaitingFrame(answer, waiting, timeout_s)

    def _queue(self, envelopes: Sequence[OpenedEnvelope]
               ) -> tuple[list[node_pb2.SubmitResponse | asyncio.Future[Outcome]], list[bytes]]:
        """Each envelope's stored outcome (a duplicate) or a future for it; what to
        forward to the leader."""
        loop = asyncio.get_running_loop()
        answers: list[node_pb2.SubmitResponse | asyncio.Future[Outcome]] = []
        to_forward: list[bytes] = []
        leading = self.leading
        # those already on the ledger, looked up together (a frame's worth at once)
        known = self.store.stored_tx_ids([o.tx_id for o in envelopes]) \
            if len(envelopes) > 1 else {o.tx_id for o in envelopes}
        for opened in envelopes:
            stored = self.store.tx(opened.tx_id) if opened.tx_id in known else None
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
            fut: asyncio.Future[Outcome] = loop.create_future()
            p.futures.append(fut)
            answers.append(fut)
            if leading:
                if opened.tx_id not in self.txs and opened.tx_id not in self._unapplied_txs:
                    self.txs[opened.tx_id] = opened
            else:
                to_forward.append(opened.raw)
                p.last_sent = time.monotonic()
        return answers, to_forward

    @staticmethod
    async def _outcomes(envelopes: Sequence[OpenedEnvelope],
                        answers: Sequence[node_pb2.SubmitResponse | asyncio.Future[Outcome]],
                        wait: bool, timeout_s: float) -> list[node_pb2.SubmitResponse]:
        results: list[node_pb2.SubmitResponse] = []
        deadline = time.monotonic() + timeout_s
        for opened, answer in zip(envelopes, answers, strict=True):
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

    # -- forwarding (follower) ---------------------------------------------------------
    async def run_forwarder(self) -> None:
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
        deadline = time.monotonic() + FORWARD_TIMEOUT_S
        while True:
            leader = self.core.leader_id
            if self.leading:
                for raw in raws:
                    opened = self.admit(raw)
                    if opened.tx_id not in self._unapplied_txs:
                        self.txs.setdefault(opened.tx_id, opened)
                self._txs_event.set()
                return
            if leader and leader != self.agency and self.channels.knows(leader):
                # (a leader just removed from the network is no leader to forward to)
                # on the Raft link to the leader when it is up, else as a gRPC call
                call: Any = self.link_forward(leader, raws) if self.link_forward else None
                if call is None:
                    call = self.channels.leader_stub(leader).SubmitBatch(
                        node_pb2.SubmitBatchRequest(envelopes=list(raws), no_wait=True),
                        timeout=FORWARD_TIMEOUT_S)
                try:
                    reply = await self._unless_leader_changes(call, leader)
                except grpc.aio.AioRpcError as exc:
                    log.info("forward to leader failed", leader=leader, code=exc.code().name)
                except Unavailable as exc:
                    log.info("forward to leader failed", leader=leader, error=str(exc))
                else:
                    if reply is not None:
                        self._refused_by_leader(leader, raws, reply.results)
                        return
                    log.info("leader changed while forwarding; forwarding again",
                             leader=leader, now=self.core.leader_id or "-")
                    continue
            if time.monotonic() > deadline:
                raise Unavailable("no leader to forward to; retry shortly")
            await asyncio.sleep(FORWARD_RETRY_S)

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
            if self.leading or self.core.leader_id != leader:
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
            error = error_for_code(result.error_code,
                                   f"the leader ({leader}) refused it: {result.error}")
            for fut in p.futures:
                if not fut.done():
                    fut.set_exception(error)

    def _pop_pending(self, tx: bytes) -> Pending | None:
        p = self.pending.pop(tx, None)
        if p is not None:
            self._pending_bytes -= len(p.opened.raw)
        return p

    async def run_resubmitter(self) -> None:
        """Re-forward what this node admitted and has not seen applied (decision 3)."""
        while True:
            await asyncio.sleep(RESUBMIT_AFTER_S / 2)
            now = time.monotonic()
            for tx, p in list(self.pending.items()):
                p.futures = [f for f in p.futures if not f.done()]
                if now - p.admitted_at > SUBMIT_TIMEOUT_S * PENDING_GIVEN_UP_S_FACTOR:
                    self._pop_pending(tx)  # long given up by every caller
            stale = [p.opened.raw for p in self.pending.values()
                     if now - p.last_sent > RESUBMIT_AFTER_S]
            if not stale:
                continue
            if self.leading:
                for p in self.pending.values():
                    if now - p.last_sent > RESUBMIT_AFTER_S and not self._in_flight(p) \
                            and p.opened.tx_id not in self._unapplied_txs:
                        self.txs.setdefault(p.opened.tx_id, p.opened)
                        p.last_sent = now
                self._txs_event.set()
                continue
            log.warning("re-forwarding transactions the leader has not included",
                        count=len(stale), leader=self.core.leader_id)
            m.RESUBMITTED.inc(len(stale))
            with contextlib.suppress(ExchangeError):
                for i in range(0, len(stale), RESUBMIT_BATCH_MAX):
                    await self._forward(stale[i:i + RESUBMIT_BATCH_MAX])
            for p in self.pending.values():
                if now - p.last_sent > RESUBMIT_AFTER_S:
                    p.last_sent = now

    def _in_flight(self, p: Pending) -> bool:
        return p.opened.tx_id in self.txs or p.last_sent > 0 and \
            time.monotonic() - p.last_sent < RESUBMIT_AFTER_S

    # -- following the chain -----------------------------------------------------------
    def role_changed(self, role: Role) -> None:
        """A new leader includes what it had forwarded in its own blocks."""
        self._unapplied_txs = self._log_tx_ids() if role is Role.LEADER else set()
        if role is not Role.LEADER:
            return
        self._proposed_tip = None
        self._inflight_blocks = 0
        self._recent_sizes.clear()
        for tx, p in self.pending.items():
            if tx not in self.txs and tx not in self._unapplied_txs:
                self.txs[tx] = p.opened
        if self.txs:
            self._txs_event.set()

    def block_applied(self, applied: Applied) -> None:
        """Answer whoever waits for the block's transactions here."""
        height = applied.checked.header.height
        if self._inflight_blocks > 0 and applied.checked.header.proposer == self.agency:
            self._inflight_blocks -= 1
        for index, env in enumerate(applied.checked.envelopes):
            self.txs.pop(env.tx_id, None)
            self._unapplied_txs.discard(env.tx_id)
            p = self._pop_pending(env.tx_id)
            if p is not None:
                m.COMMIT_SECONDS.observe(time.monotonic() - p.admitted_at)
                for fut in p.futures:
                    if not fut.done():
                        fut.set_result((height, index, applied.codes[index]))

    def blocks_applied(self, hashes: Sequence[bytes]) -> None:
        """A batch of blocks applied: their latency from proposal, and the cutter wakes."""
        now = time.perf_counter()
        for hash_ in hashes:
            proposed_at = self._proposed_at.pop(hash_, None)
            if proposed_at is not None:
                m.BLOCK_SECONDS.observe(now - proposed_at)
        self._applied_event.set()

    def stop(self) -> None:
        """Whoever still waits is told the node is going."""
        for p in self.pending.values():
            for fut in p.futures:
                if not fut.done():
                    fut.set_exception(Unavailable("node is shutting down"))
                    fut.exception()  # a waiter may be gone already: no "never retrieved"

    # -- block cutting (leader) ----------------------------------------------------------
    async def run_cutter(self) -> None:
        """Group commit: a block is cut once the previous one is no longer in flight,
        from whatever has arrived meanwhile. A busy leader (its recent blocks held more
        than one transaction) first waits, at most the configured interval, until the
        block is as full as the largest of its recent ones: the transactions of clients
        at the followers arrive a forward later than those of its own, and without the
        wait they would go in a block of their own (BENCHMARKS.md, issue 20)."""
        while True:
            await self._txs_event.wait()
            m.MEMPOOL.set(len(self.txs))
            if not self.leading or not self.txs or not self._clock_ok():
                self._txs_event.clear()
                if not self._clock_ok():
                    await asyncio.sleep(CLOCK_OFF_WAIT_S)  # no block dated by a clock that is off
                continue
            if self.core.pending_snapshot is not None:
                # a leader still fetching blocks cannot extend the chain yet
                await asyncio.sleep(SNAPSHOT_WAIT_S)
                continue
            await self._wait_for_room()
            await self._wait_to_fill()
            if not self.leading:
                continue
            chosen = self._choose()
            m.MEMPOOL.set(len(self.txs))
            if not self.txs:
                self._txs_event.clear()
            if chosen:
                self._recent_sizes.append(len(chosen))
                self.propose_block(chosen)
            await asyncio.sleep(0)

    async def _wait_for_room(self) -> None:
        """Wait while INFLIGHT_BLOCKS_MAX blocks are in flight, or while some are and the
        next block is neither full nor due."""
        tx_max = self.cutting.tx_max
        deadline = time.monotonic() + self.cutting.interval_ms / MS_PER_S
        while (self._inflight_blocks >= INFLIGHT_BLOCKS_MAX
               or (self._inflight_blocks > 0 and len(self.txs) < tx_max
                   and time.monotonic() < deadline)) and self.leading:
            self._applied_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._applied_event.wait(),
                                       max(INFLIGHT_WAIT_MIN_S, deadline - time.monotonic())
                                       if self._inflight_blocks < INFLIGHT_BLOCKS_MAX
                                       else INFLIGHT_FULL_WAIT_S)
            if self._inflight_blocks >= INFLIGHT_BLOCKS_MAX and \
                    self.core.commit_index == self.core.applied_index and \
                    self.core.applied_index == self.core.last_index:
                self._inflight_blocks = 0  # nothing really in flight (term changed)

    async def _wait_to_fill(self) -> None:
        """Wait, at most `interval_ms`, until the mempool holds as many transactions as
        the largest of this leader's recent blocks (or a full block). No wait when those
        held one transaction each (a lone client is never held up); a wait that runs out
        forgets them (the load has dropped: the next block does not wait for it)."""
        target = min(max(self._recent_sizes, default=0), self.cutting.tx_max)
        if target < 2 or len(self.txs) >= target:
            return
        deadline = time.monotonic() + self.cutting.interval_ms / MS_PER_S
        try:
            while len(self.txs) < target and self.leading:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._recent_sizes.clear()
                    m.BLOCK_FILL_WAITS.labels("interval").inc()
                    return
                self._txs_event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._txs_event.wait(), left)
            if self.leading:  # (a leader that stepped down filled nothing)
                m.BLOCK_FILL_WAITS.labels("filled").inc()
        finally:
            if self.txs:
                self._txs_event.set()  # what is left after this cut is cut next

    def _choose(self) -> list[OpenedEnvelope]:
        """The next block's transactions, oldest first, up to the block's limits."""
        tx_max, bytes_max = self.cutting.tx_max, self.cutting.bytes_max
        chosen: list[OpenedEnvelope] = []
        size = 0
        while self.txs and len(chosen) < tx_max:
            # the store is asked at once about as many as the block still has room for
            ahead = list(itertools.islice(self.txs.items(), tx_max - len(chosen)))
            stored = self.store.stored_tx_ids([tx for tx, _ in ahead])
            for tx, opened in ahead:
                if size + len(opened.raw) > bytes_max and chosen:
                    return chosen
                del self.txs[tx]
                if tx in self._unapplied_txs or tx in stored:
                    continue
                chosen.append(opened)
                size += len(opened.raw)
        return chosen

    def propose_block(self, chosen: list[OpenedEnvelope]) -> None:
        """Cut the next block from admitted envelopes (each already verified here) and
        propose it as a Raft entry."""
        signer = self._signer()
        envelopes = self._with_attestation_record([o.raw for o in chosen], signer)
        height, prev_hash, prev_ts = self._proposed_tip or self._tip_from_log()
        term, index = self.core.term, self.core.last_index + 1
        block = build_block(self.chain_id, height + 1, prev_hash, envelopes,
                            max(int(time.time() * MS_PER_S), prev_ts), self.agency, signer,
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
        self.checks.remember(CheckedBlock(block, parse_header(block.header), hash_,
                                          tuple(opened)))
        self._unapplied_txs.update(o.tx_id for o in opened)
        self._proposed_at[hash_] = time.perf_counter()
        if len(self._proposed_at) > PROPOSED_KEPT_MAX:
            self._proposed_at.pop(next(iter(self._proposed_at)))
        self._proposed_tip = (height + 1, hash_, parse_header(block.header).timestamp_ms)
        self._inflight_blocks += 1
        self.driver.poke()

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

    def _with_attestation_record(self, envelopes: list[bytes],
                                 signer: CachedSigner) -> list[bytes]:
        """Record the attestations this leader holds for recent blocks (decision 4)."""
        atts = self.finality.record()
        if not atts:
            return envelopes
        body = new_body(self.chain_id, self.agency, int(time.time() * MS_PER_S))
        body.attestation_record.attestations.extend(atts)
        return envelopes + [seal_envelope(body, signer)]
