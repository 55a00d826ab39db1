"""Reads a node serves from its own state: answers to its agency's queries (waiting for
them to commit), signed case statements (its own and a quorum of its peers'), audits."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import structlog

from exchange.errors import MalformedInput, Unavailable
from exchange.identity.keys import CachedSigner, Domain
from exchange.identity.registry import KeyRegistry
from exchange.ledger.casechain import statement
from exchange.ledger.state import LedgerState
from exchange.ledger.store import BlockStore
from exchange.node import metrics as m
from exchange.node.answers import AnswerPending, QueryReader
from exchange.node.raft_io import LinksTransport
from exchange.v1 import evidence_pb2, node_pb2, peer_pb2

log = structlog.get_logger("exchange.node")

ANSWER_PENDING_RETRIES = 200
ANSWER_PENDING_WAIT_S = 0.01
CASE_STATEMENTS_TIMEOUT_S = 10.0
CASE_STATEMENT_PEER_TIMEOUT_S = 2.0
CASE_STATEMENTS_RETRY_S = 0.2
MS_PER_S = 1000


class Reads:
    """What a node answers from its state."""

    def __init__(self, agency: str, store: BlockStore, state: LedgerState,
                 registry: KeyRegistry, reader: QueryReader,
                 signer: Callable[[], CachedSigner], transport: LinksTransport) -> None:
        self.agency = agency
        self.chain_id = registry.chain_id
        self.store = store
        self.state = state
        self.registry = registry
        self.reader = reader
        self._signer = signer
        self.transport = transport
        self._answer_waiters: dict[bytes, list[asyncio.Future[None]]] = {}

    def answer_committed(self, query_tx_id: bytes) -> None:
        """A query's answer or refusal has committed: wake whoever waits for it."""
        for fut in self._answer_waiters.pop(query_tx_id, []):
            if not fut.done():
                fut.set_result(None)

    async def _wait_answer(self, query_tx_id: bytes, wait_ms: int) -> None:
        """Wait up to `wait_ms` for an open query's answer or refusal to commit."""
        rec = self.state.queries.get(query_tx_id)
        if rec is None or rec.status != "open" or wait_ms <= 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._answer_waiters.setdefault(bytes(query_tx_id), [])
        waiters.append(fut)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, wait_ms / MS_PER_S)
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
                await asyncio.sleep(ANSWER_PENDING_WAIT_S)
        raise Unavailable("the answer is being stored; ask again")

    @staticmethod
    def _log_answer_read(view: node_pb2.AnswerView, reader: str, streamed: bool) -> None:
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
        count, running = self.state.case_chains.as_of(case_id, height)
        raw = statement(case_id, height, count, running)
        signer = self._signer()
        return evidence_pb2.SignedCaseStatement(
            statement=raw, agency=self.agency, signer_key_id=signer.key_id,
            signature=signer.sign(Domain.CASE_STATEMENT, self.chain_id, raw))

    async def case_statements(self, case_id: str, height: int,
                              timeout_s: float = CASE_STATEMENTS_TIMEOUT_S
                              ) -> node_pb2.CaseStatementSet:
        """A quorum of members' statements of a case as of `height` (default: this
        node's): its own and its peers', asking again while peers catch up."""
        height = height or self.store.height
        own = self.case_statement(case_id, height)
        got = {self.agency: own}
        deadline = time.monotonic() + timeout_s
        while len(got) < self.registry.quorum and time.monotonic() < deadline:
            links = self.transport.links
            for agency, link in (links.links.items() if links else []):
                if agency in got:
                    continue
                try:
                    got[agency] = await link.stub.CaseStatement(
                        peer_pb2.CaseStatementRequest(case_id=case_id, height=height),
                        timeout=CASE_STATEMENT_PEER_TIMEOUT_S)
                except grpc.aio.AioRpcError:
                    continue
            if len(got) < self.registry.quorum:
                await asyncio.sleep(CASE_STATEMENTS_RETRY_S)
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
