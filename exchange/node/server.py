"""The node's gRPC server: the public Exchange API, the Peer service, health and
reflection, all on one mutual-TLS port.

Who may call what: the public API serves the node's own agency's identities (analysts,
automations) and member nodes (forwarded submissions, reads); the Peer service serves
member nodes only. Identities come from the TLS certificate and are checked against the
issuing agency's CA (exchange.identity.peer_auth). A person (not a node) calls on
behalf of the credential on the ledger that binds their certificate's key
(Credential.tls_key_sha256): every call checks it valid at the applied height
(`Auth.caller`), so a revoked or expired credential reads nothing, and every read is
logged with the credential it was checked against. Domain errors are mapped to gRPC
status codes here, once, by one interceptor (`_Edge`, which also logs refusals and times
every call): what a status echoes is cut to DETAILS_CHARS_MAX, so
a huge value in a message never turns the error into RESOURCE_EXHAUSTED; a request body
that does not decode is INVALID_ARGUMENT (`_Decoding`), not UNKNOWN with a traceback.

Over 600 lines on purpose: the gRPC services of the public API, one method per call, and
the interceptor that maps their errors, logs and metrics; the node's logic lives in its
parts (node.py composes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from exchange import errors
from exchange.identity.config import NodeConfig, parse_address
from exchange.ids import find_transactions
from exchange.ledger import merkle
from exchange.ledger.block import parse_header
from exchange.node import metrics
from exchange.node.auth import Auth, Caller
from exchange.node.credentials import list_credentials
from exchange.node.frames import FrameSession
from exchange.node.mempool import refusal
from exchange.node.node import Node
from exchange.node.peers import SERVER_OPTIONS
from exchange.node.peers_wire import BadPeerMessage, message_from_proto
from exchange.v1 import evidence_pb2, ledger_pb2, node_pb2, node_pb2_grpc, peer_pb2, peer_pb2_grpc

log = structlog.get_logger("exchange.server")

# Trailing metadata of a RATE_LIMITED refusal: milliseconds until it would pass.
RETRY_AFTER_KEY = errors.RETRY_AFTER_KEY

# What a status's details may hold: gRPC refuses metadata over 8 KiB (by default), and
# a client would then see RESOURCE_EXHAUSTED instead of the error.
DETAILS_CHARS_MAX = 1_024
# No chain reaches a height past this (heights are signed 64-bit in the stores).
HEIGHT_MAX = 2**63 - 1
# requests of one SubmitStream admitted and not yet answered; reading waits beyond
SUBMIT_STREAM_INFLIGHT_MAX = 1_024


def status_of(exc: errors.ExchangeError) -> grpc.StatusCode:
    """The status a domain error is answered with: the one its catalogue class names."""
    return grpc.StatusCode[exc.status]


def details_of(message: str) -> str:
    """`message`, cut to DETAILS_CHARS_MAX characters (saying how many were cut)."""
    if len(message) <= DETAILS_CHARS_MAX:
        return message
    cut = len(message) - DETAILS_CHARS_MAX
    return f"{message[:DETAILS_CHARS_MAX]}... ({cut} characters cut)"


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode,
                 message: str) -> None:
    """End the call with `code` and `message` (cut); raises, as context.abort does."""
    await context.abort(code, details_of(message))


async def _abort_error(context: grpc.aio.ServicerContext, exc: errors.ExchangeError) -> None:
    await _abort(context, status_of(exc), f"{exc.code}: {exc}")


def _check_height(height: int, what: str = "height") -> int:
    if height > HEIGHT_MAX:
        raise errors.MalformedInput(f"{what} {height} is beyond any chain's reach "
                                    f"(at most {HEIGHT_MAX})")
    return height


class _Undecodable:
    """A request body that is not the message its method takes."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class _Decoding(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Every method's request decoding: bytes that do not decode end the call with
    INVALID_ARGUMENT naming the method, instead of gRPC's UNKNOWN and a logged
    traceback."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer
        method = str(details.method).rsplit("/", 1)[-1]

        def safe_decode(raw: bytes) -> Any:
            try:
                return decode(raw)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the caller's
                return _Undecodable(exc)

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            log.warning("undecodable request", method=method, peer=context.peer(),
                        error=str(request.error)[:200])
            await _abort(context, grpc.StatusCode.INVALID_ARGUMENT,
                         f"{errors.MalformedInput.code}: the request is not a valid "
                         f"{method} request: {request.error}")

        async def checked(requests: AsyncIterator[Any],
                          context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                yield request

        changes: dict[str, Any] = {"request_deserializer": safe_decode}
        if handler.unary_unary is not None:
            unary_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                return await unary_unary(request, context)
            changes["unary_unary"] = unary
        elif handler.unary_stream is not None:
            unary_stream = handler.unary_stream

            async def streaming(request: Any, context: grpc.aio.ServicerContext
                                ) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for item in unary_stream(request, context):
                    yield item
            changes["unary_stream"] = streaming
        elif handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            async def stream_in(requests: AsyncIterator[Any],
                                context: grpc.aio.ServicerContext) -> Any:
                return await stream_unary(checked(requests, context), context)
            changes["stream_unary"] = stream_in
        elif handler.stream_stream is not None:
            stream_stream = handler.stream_stream

            async def stream_both(requests: AsyncIterator[Any],
                                  context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in stream_stream(checked(requests, context), context):
                    yield item
            changes["stream_stream"] = stream_both
        return handler._replace(**changes)


def _method_label(method: str) -> str:
    """"/exchange.v1.Exchange/Submit" as the metrics name it: "Exchange.Submit"."""
    service, _, name = method.rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}.{name}"


class _Edge(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The edge of every method, once: a domain error ends the call with its
    catalogue status and "CODE: message" (cut to DETAILS_CHARS_MAX; a RATE_LIMITED one
    with its retry-after in the trailing metadata), each refusal is logged and counted
    by method and code, and each call is timed by method (streams included). A call
    whose deadline passed (or whose client went away) has its handler cancelled by
    grpc.aio; it is logged and counted here with the time it ran. No handler repeats
    any of this."""

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = _method_label(str(details.method))
        histogram = metrics.GRPC_SECONDS.labels(method)

        async def refuse(context: grpc.aio.ServicerContext,
                         exc: errors.ExchangeError) -> None:
            metrics.GRPC_REFUSED.labels(method, exc.code).inc()
            quiet = isinstance(exc, errors.NotAvailable)  # retried, and frequent under load
            (log.debug if quiet else log.info)(
                "call refused", method=method, peer=context.peer(), code=exc.code,
                error=str(exc)[:200])
            if isinstance(exc, errors.RateLimited):
                context.set_trailing_metadata(((RETRY_AFTER_KEY, str(exc.retry_after_ms)),))
            await _abort_error(context, exc)

        def cancelled(context: grpc.aio.ServicerContext, started: float) -> None:
            metrics.GRPC_CANCELLED.labels(method).inc()
            log.info("call cancelled", method=method, peer=context.peer(),
                     ran_ms=round((time.perf_counter() - started) * 1000))

        def once(call: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
                 ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
            async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
                started = time.perf_counter()
                try:
                    return await call(request, context)
                except errors.ExchangeError as exc:
                    await refuse(context, exc)
                except asyncio.CancelledError:
                    cancelled(context, started)
                    raise
                finally:
                    histogram.observe(time.perf_counter() - started)
            return run

        def streamed(call: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
                     ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
            async def run(request: Any, context: grpc.aio.ServicerContext
                          ) -> AsyncIterator[Any]:
                started = time.perf_counter()
                try:
                    async for item in call(request, context):
                        yield item
                except errors.ExchangeError as exc:
                    await refuse(context, exc)
                except asyncio.CancelledError:
                    cancelled(context, started)
                    raise
                finally:
                    histogram.observe(time.perf_counter() - started)
            return run

        changes: dict[str, Any] = {}
        if handler.unary_unary is not None:
            changes["unary_unary"] = once(handler.unary_unary)
        elif handler.stream_unary is not None:
            changes["stream_unary"] = once(handler.stream_unary)
        elif handler.unary_stream is not None:
            changes["unary_stream"] = streamed(handler.unary_stream)
        elif handler.stream_stream is not None:
            changes["stream_stream"] = streamed(handler.stream_stream)
        return handler._replace(**changes)


def _own_person(auth: Auth, context: grpc.aio.ServicerContext,
                read: str = "read") -> Caller:
    """A person of the node's own agency (not a node), checked and logged as a read."""
    return auth.caller(context, read, person_only=True)


class ExchangeService(node_pb2_grpc.ExchangeServicer):
    """The public API."""

    def __init__(self, node: Node, auth: Auth) -> None:
        self.node = node
        self.auth = auth

    async def GetAnswer(self, request: node_pb2.GetAnswerRequest,
                        context: grpc.aio.ServicerContext) -> node_pb2.AnswerView:
        who = self.auth.caller(context, "GetAnswer", person_only=True)
        if len(request.query_tx_id) != 32:
            raise errors.MalformedInput("a query tx id is 32 bytes")
        if request.wait_ms > 60_000:
            raise errors.MalformedInput("wait_ms is at most 60,000")
        return await self.node.get_answer(bytes(request.query_tx_id), request.wait_ms,
                                          str(who))

    async def StreamAnswer(self, request: node_pb2.GetAnswerRequest,
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[node_pb2.AnswerPart]:
        """GetAnswer one chunk a message, for answers of any size."""
        who = self.auth.caller(context, "StreamAnswer", person_only=True)
        if len(request.query_tx_id) != 32:
            raise errors.MalformedInput("a query tx id is 32 bytes")
        if request.wait_ms > 60_000:
            raise errors.MalformedInput("wait_ms is at most 60,000")
        parts = self.node.stream_answer(bytes(request.query_tx_id), request.wait_ms,
                                        str(who))
        async for part in parts:
            yield part

    async def Audit(self, request: node_pb2.AuditRequest,
                    context: grpc.aio.ServicerContext) -> node_pb2.AuditReply:
        who = self.auth.caller(context, "Audit", person_only=True)
        reply = await self.node.audit(request)
        log.info("audit read", reader=str(who), case=request.case_id,
                 subject_filter=bool(request.subject), analyst=request.analyst,
                 agency=request.agency, entries=len(reply.entries))
        return reply

    async def Submit(self, request: node_pb2.SubmitRequest,
                     context: grpc.aio.ServicerContext) -> node_pb2.SubmitResponse:
        who = self.auth.caller(context)
        return await self.node.submit(request.envelope, wait=not request.no_wait,
                                      limited=not who.who.is_node)

    async def SubmitStream(self, request_iterator: AsyncIterator[node_pb2.SubmitRequest],
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[node_pb2.SubmitResponse]:
        """Submit over one stream: each request admitted and answered on its own (with
        its seq, in commit order), at most SUBMIT_STREAM_INFLIGHT_MAX at once (reading
        waits beyond that); the caller's credential is checked again for each."""
        who = self.auth.caller(context)
        out: asyncio.Queue[node_pb2.SubmitResponse | BaseException | None] = asyncio.Queue()
        room = asyncio.Semaphore(SUBMIT_STREAM_INFLIGHT_MAX)
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: node_pb2.SubmitRequest) -> None:
            try:
                caller = self.auth.recheck(who)
                r = await self.node.submit(request.envelope, wait=not request.no_wait,
                                           limited=not caller.who.is_node)
            except errors.ExchangeError as exc:
                r = refusal(exc)
            finally:
                room.release()
            r.seq = request.seq
            out.put_nowait(r)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await room.acquire()
                    task = asyncio.create_task(one(request))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                while tasks:
                    await asyncio.wait(set(tasks))
                out.put_nowait(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the call below
                out.put_nowait(exc)

        reader = asyncio.create_task(read())
        try:
            while (item := await out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def SubmitFrames(self, request_iterator: AsyncIterator[node_pb2.SubmitFrame],
                           context: grpc.aio.ServicerContext
                           ) -> AsyncIterator[node_pb2.SubmitAnswers]:
        """SubmitStream many requests to a message (frames.py): each frame admitted in
        one pass, the answers ready at once sent as one message."""
        session = FrameSession(self.auth, self.auth.caller(context), self.node.submit_frame)
        async for answers in session.run(request_iterator):
            yield answers

    async def SubmitBatch(self, request: node_pb2.SubmitBatchRequest,
                          context: grpc.aio.ServicerContext) -> node_pb2.SubmitBatchResponse:
        who = self.auth.caller(context)
        if len(request.envelopes) > 10_000:
            raise errors.Oversize("at most 10,000 envelopes per batch")
        results = await self.node.submit_batch(list(request.envelopes),
                                               wait=not request.no_wait,
                                               limited=not who.who.is_node)
        return node_pb2.SubmitBatchResponse(results=results)

    async def GetTransaction(self, request: node_pb2.GetTransactionRequest,
                             context: grpc.aio.ServicerContext) -> node_pb2.TransactionInfo:
        self.auth.caller(context, "GetTransaction")
        if len(request.tx_id) != 32:
            raise errors.MalformedInput("a transaction id is 32 bytes")
        store = self.node.store
        stored = store.tx(bytes(request.tx_id))
        if stored is None:
            raise errors.NotFound(f"no transaction {bytes(request.tx_id).hex()}")
        leaves = store.envelopes(stored.height)
        codes = store.results(stored.height)
        header, sig = store.header(stored.height)
        atts = store.attestations(stored.height)
        return node_pb2.TransactionInfo(
            tx_id=stored.tx_id, envelope=stored.envelope, height=stored.height,
            index=stored.index, result=stored.result,
            inclusion_proof=merkle.inclusion_proof(leaves, stored.index), header=header,
            proposer_signature=sig, attestations=atts,
            attested_by=len({a.agency for a in atts}), quorum=self.node.registry.quorum,
            result_proof=merkle.inclusion_proof([c.encode() for c in codes], stored.index))

    async def FindTransactions(self, request: node_pb2.FindTransactionsRequest,
                               context: grpc.aio.ServicerContext) -> node_pb2.TransactionIdList:
        """Transaction ids by prefix: no more than GetTransaction already shows anyone."""
        self.auth.caller(context, "FindTransactions")
        return find_transactions(self.node.store, request)

    async def ListCredentials(self, request: node_pb2.ListCredentialsRequest,
                              context: grpc.aio.ServicerContext) -> node_pb2.CredentialList:
        self.auth.caller(context, "ListCredentials")
        return list_credentials(self.node.registry, request.agency, self.node.store.height)

    async def GetBlock(self, request: node_pb2.GetBlockRequest,
                       context: grpc.aio.ServicerContext) -> ledger_pb2.Block:
        self.auth.caller(context, "GetBlock")
        height = request.height or self.node.store.height
        if not 1 <= height <= self.node.store.height:
            raise errors.NotFound(f"no block {height}")
        return self.node.store.block(height)

    async def FollowBlocks(self, request: node_pb2.FollowBlocksRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[ledger_pb2.Block]:
        caller = self.auth.caller(context, "FollowBlocks")
        _check_height(request.from_height, "from_height")
        store = self.node.store
        queue = self.node.follow()
        try:
            next_height = request.from_height or store.height + 1
            while True:
                while next_height <= store.height:
                    yield store.block(next_height)
                    next_height += 1
                block = await queue.get()
                self.auth.recheck(caller)  # a reader revoked while following gets no more
                height = parse_header(block.header).height
                if height >= next_height:
                    while next_height < height:  # fell behind the queue: read the store
                        yield store.block(next_height)
                        next_height += 1
                    yield store.block(height)
                    next_height = height + 1
        finally:
            self.node.unfollow(queue)

    async def Status(self, request: node_pb2.StatusRequest,
                     context: grpc.aio.ServicerContext) -> node_pb2.NodeStatus:
        self.auth.caller(context)
        return self.node.status()


    async def ListPolicies(self, request: node_pb2.ListPoliciesRequest,
                           context: grpc.aio.ServicerContext) -> node_pb2.PolicyList:
        self.auth.caller(context, "ListPolicies")
        book = self.node.applier.policies
        chosen = [p for (owner, dataset), p in sorted(book.policies.items())
                  if request.owner_agency in ("", owner) and request.dataset in ("", dataset)]
        return node_pb2.PolicyList(policies=chosen, height=self.node.store.height)


    async def ListCatalog(self, request: node_pb2.ListCatalogRequest,
                          context: grpc.aio.ServicerContext) -> node_pb2.Catalog:
        self.auth.caller(context, "ListCatalog")
        return node_pb2.Catalog(
            entries=[node_pb2.PublishedEntry(agency=agency, entry=entry)
                     for (agency, _), entry in sorted(self.node.applier.catalog.items())
                     if request.agency in ("", agency)],
            height=self.node.store.height)

    async def CaseStatements(self, request: node_pb2.CaseStatementsRequest,
                             context: grpc.aio.ServicerContext) -> node_pb2.CaseStatementSet:
        self.auth.caller(context, "CaseStatements", person_only=True)
        return await self.node.case_statements(request.case_id, _check_height(request.height))

    async def ListCases(self, request: node_pb2.ListCasesRequest,
                        context: grpc.aio.ServicerContext) -> node_pb2.CaseList:
        self.auth.caller(context, "ListCases")
        state = self.node.applier.state
        height = self.node.store.height
        out = node_pb2.CaseList(height=height)
        for case in list(state.cases.cases.values()):
            if request.case_id and case.case_id != request.case_id:
                continue
            count, running = state.case_chains.as_of(case.case_id, height)
            refs = list(case.refs)
            out.cases.append(node_pb2.CaseView(
                case_id=case.case_id, agency=case.agency, opened_height=case.opened_height,
                status=case.status, ref_tx_ids=[t for t, _ in refs],
                ref_finding_ids=[f for _, f in refs], event_tx_ids=list(case.events),
                count=count, running_hash=running))
        return out

    async def ListPlaybooks(self, request: node_pb2.ListPlaybooksRequest,
                            context: grpc.aio.ServicerContext) -> node_pb2.PlaybookList:
        self.auth.caller(context, "ListPlaybooks")
        book = self.node.applier.state.playbooks
        chosen = [p for p in list(book.playbooks.values())
                  if request.owner_agency in ("", p.owner)
                  and (not request.digest or p.digest == bytes(request.digest))]
        out = node_pb2.PlaybookList(height=self.node.store.height)
        for p in chosen:
            out.playbooks.append(node_pb2.RegisteredPlaybook(
                owner_agency=p.owner, playbook_id=p.playbook_id, version=p.version,
                digest=p.digest, canonical=p.canonical, tx_id=p.tx_id, height=p.height))
            if request.with_steps:
                out.steps.extend(node_pb2.PlaybookStepView(
                    ref=s.ref.text(), tx_id=s.tx_id, height=s.height, kind=s.kind,
                    case_id=s.case_id, added_run_tx_id=s.added_run,
                    added_finding_id=s.added_finding) for s in book.steps_of(p.digest))
        return out

    async def ListRules(self, request: node_pb2.ListRulesRequest,
                        context: grpc.aio.ServicerContext) -> node_pb2.RuleList:
        self.auth.caller(context, "ListRules")
        book = self.node.applier.state.findings
        return node_pb2.RuleList(
            rules=[node_pb2.RegisteredRule(owner_agency=r.owner, rule_id=r.rule_id,
                                           version=r.version, digest=r.digest,
                                           canonical=r.canonical, tx_id=r.tx_id,
                                           height=r.height)
                   for r in list(book.rules.values())
                   if request.owner_agency in ("", r.owner)],
            height=self.node.store.height)

    async def ListFindings(self, request: node_pb2.ListFindingsRequest,
                           context: grpc.aio.ServicerContext) -> node_pb2.FindingsList:
        self._findings_reader(request, context)
        listing = node_pb2.FindingsList(runs=self._runs(request),
                                        height=self.node.store.height)
        if request.open or request.subject:
            await asyncio.to_thread(self.node.reader.open_findings, listing, request.subject)
            if request.subject:
                kept = [r for r in listing.runs if r.lines]
                del listing.runs[:]
                listing.runs.extend(kept)
        return listing

    async def StreamFindings(self, request: node_pb2.ListFindingsRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[node_pb2.FindingsRun]:
        """ListFindings one run a message, a run of many findings in slices of
        FINDINGS_PER_MESSAGE (each with the run's fields and those findings' lines)."""
        self._findings_reader(request, context)
        for run in self._runs(request):
            if request.open or request.subject:
                one = node_pb2.FindingsList(runs=[run])  # a copy of the run
                await asyncio.to_thread(self.node.reader.open_findings, one,
                                        request.subject)
                run = one.runs[0]
                if request.subject and not run.lines:
                    continue
            for part in _run_parts(run):
                yield part

    def _findings_reader(self, request: node_pb2.ListFindingsRequest,
                         context: grpc.aio.ServicerContext) -> None:
        """Who may list findings: opened lines and subject filters are a person's read."""
        if request.open or request.subject:
            who = self.auth.caller(context, "ListFindings", person_only=True)
            log.info("findings read", reader=str(who), rule=request.rule_id,
                     period=request.period, subject_filter=bool(request.subject))
        else:
            self.auth.caller(context, "ListFindings")

    def _runs(self, request: node_pb2.ListFindingsRequest) -> list[node_pb2.FindingsRun]:
        book = self.node.applier.state.findings
        runs = list(book.runs.values()) if request.all_runs else book.latest()
        return [node_pb2.FindingsRun(
            tx_id=r.tx_id, height=r.height, time_ms=r.time_ms, owner_agency=r.owner,
            rule_id=r.rule_id, rule_digest=r.rule_digest, period=r.period,
            output_digest=r.output_digest, finding_count=r.finding_count,
            input_tx_ids=list(r.input_tx_ids), superseded_by=r.superseded_by,
            case_id=r.case_id,
            findings=[ledger_pb2.FindingSummary(finding_id=f, severity=sev, digest=d)
                      for f, sev, d in r.summaries])
            for r in runs
            if request.owner_agency in ("", r.owner)
            and request.rule_id in ("", r.rule_id)
            and request.period in ("", r.period)]


# Findings (with their opened lines) one StreamFindings message carries.
FINDINGS_PER_MESSAGE = 2_000


def _run_parts(run: node_pb2.FindingsRun) -> list[node_pb2.FindingsRun]:
    """A run as StreamFindings sends it: one message, or slices of its findings."""
    if len(run.findings) <= FINDINGS_PER_MESSAGE:
        return [run]
    parts = []
    lines = list(zip(run.line_index, run.lines, strict=True))
    for first in range(0, len(run.findings), FINDINGS_PER_MESSAGE):
        part = node_pb2.FindingsRun()
        part.CopyFrom(run)
        del part.findings[:], part.lines[:], part.line_index[:]
        part.first_finding = first
        part.findings.extend(run.findings[first:first + FINDINGS_PER_MESSAGE])
        for index, line in lines:
            if first <= index < first + FINDINGS_PER_MESSAGE:
                part.line_index.append(index)
                part.lines.append(line)
        parts.append(part)
    return parts


class PeerService(peer_pb2_grpc.PeerServicer):
    """What member nodes offer each other."""

    def __init__(self, node: Node, auth: Auth) -> None:
        self.node = node
        self.auth = auth

    async def Raft(self, request_iterator: AsyncIterator[peer_pb2.RaftBatch],
                   context: grpc.aio.ServicerContext) -> peer_pb2.PeerAck:
        who = self.auth.member_node(context)
        async for batch in request_iterator:
            if batch.attestations:
                self.node.receive_attestations(
                    [a for a in batch.attestations if a.agency == who.agency])
            for pm in batch.messages:
                try:
                    m = message_from_proto(pm)
                except BadPeerMessage as exc:
                    raise errors.MalformedInput(f"bad raft message: {exc}") from exc
                if m.from_id != who.agency or m.to_id != self.node.agency:
                    raise errors.PermissionDenied(
                        f"{who} sent a message from {m.from_id!r} to {m.to_id!r}")
                await self.node.receive(m)
        return peer_pb2.PeerAck()

    async def FetchBlocks(self, request: peer_pb2.FetchBlocksRequest,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[ledger_pb2.Block]:
        self.auth.member_node(context)
        store = self.node.store
        top = store.height if request.final_only is False else self.node.final_height
        if request.to_height:
            top = min(top, request.to_height)
        for height in range(max(1, request.from_height), top + 1):
            yield store.block(height)

    async def Attest(self, request: peer_pb2.AttestationBatch,
                     context: grpc.aio.ServicerContext) -> peer_pb2.PeerAck:
        who = self.auth.member_node(context)
        atts = [a for a in request.attestations if a.agency == who.agency]
        self.node.receive_attestations(atts)
        return peer_pb2.PeerAck()

    async def Status(self, request: peer_pb2.PeerStatusRequest,
                     context: grpc.aio.ServicerContext) -> peer_pb2.PeerStatus:
        self.auth.member_node(context)
        st = self.node.status()
        return peer_pb2.PeerStatus(agency=st.agency, role=st.role, term=st.term,
                                   leader=st.leader, commit_index=st.commit_index,
                                   height=st.height, time_ms=int(time.time() * 1000))

    async def CaseStatement(self, request: peer_pb2.CaseStatementRequest,
                            context: grpc.aio.ServicerContext
                            ) -> evidence_pb2.SignedCaseStatement:
        self.auth.member_node(context)
        return self.node.case_statement(request.case_id, _check_height(request.height))


async def serve(config: NodeConfig, ready: Callable[[Node], None] | None = None) -> None:
    """Run a node until SIGTERM or SIGINT."""
    node = Node(config)
    server_creds = node.tls.server_credentials()
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[_Decoding(), _Edge()])
    auth = Auth(node)
    node_pb2_grpc.add_ExchangeServicer_to_server(ExchangeService(node, auth), server)
    peer_pb2_grpc.add_PeerServicer_to_server(PeerService(node, auth), server)
    from exchange.node.cosign import FOUR_EYES_SERVICE, add_four_eyes  # issue 21

    four_eyes = add_four_eyes(server, node, auth)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([
        node_pb2.DESCRIPTOR.services_by_name["Exchange"].full_name,
        peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        FOUR_EYES_SERVICE, reflection.SERVICE_NAME], server)
    if config.listen_metrics:
        metrics.serve_metrics(config.listen_metrics)
    host, port = parse_address(config.listen_grpc)
    server.add_secure_port(f"{host}:{port}", server_creds)
    await server.start()
    await node.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set("exchange.v1.Exchange", health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", address=config.listen_grpc)
    if ready is not None:
        ready(node)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    stopped = loop.create_task(stop.wait())
    failed = loop.create_task(node.fatal.wait())
    await asyncio.wait([stopped, failed], return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    failed.cancel()
    log.info("stopping", fatal=node.fatal_error or None)
    await health.enter_graceful_shutdown()
    await server.stop(grace=1.0)
    await node.stop()
    four_eyes.close()
    if node.fatal_error:
        raise SystemExit(f"node stopped: {node.fatal_error}")
