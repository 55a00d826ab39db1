"""Reading queries and answers at a node: the answer view an analyst of the requesting
agency gets (decrypted by the node with its agency's data key), and the audit trail.

Every query's metadata is in clear on the ledger, so any node lists every query; the
subjects and the rows are sealed, so only the requester's and the target's nodes can
show them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from exchange.errors import ExchangeError, MalformedInput, Oversize, PermissionDenied
from exchange.identity.keys import DataKey, DataKeyring
from exchange.ledger.block import open_envelope
from exchange.ledger.queries import STATUS_ANSWERED, QueryBook, QueryRecord, parse_subject_text
from exchange.ledger.sealing import open_sealed
from exchange.ledger.store import BlockStore
from exchange.v1 import ledger_pb2, node_pb2

AUDIT_LIMIT_DEFAULT = 1_000
AUDIT_LIMIT_MAX = 100_000
SUBJECT_CACHE_MAX = 100_000
# Chunks one GetAnswer reply may carry (each at most a node's answer_chunk_bytes, 512 KiB
# by default, so a reply stays far below the gRPC message limit); more: StreamAnswer.
ANSWER_VIEW_CHUNKS_MAX = 32


@dataclass(frozen=True)
class ChunkPlace:
    """Where one chunk of an answer is: its transaction (the manifest for an inline
    chunk) and its index."""

    tx_id: bytes
    index: int
    inline: bool = False


class AnswerPending(Exception):  # noqa: N818 - a state, not a failure
    """The ledger state already shows the answer; its block is still being written."""


class QueryReader:
    """One node's view of the queries on its ledger."""

    def __init__(self, agency: str, chain_id: str, store: BlockStore, queries: QueryBook,
                 data_key: DataKey | DataKeyring) -> None:
        self.agency = agency
        self.chain_id = chain_id
        self.store = store
        self.queries = queries
        self.data_key = data_key
        self._requests: OrderedDict[bytes, tuple[tuple[tuple[str, str], ...], str]] = \
            OrderedDict()

    def can_open(self, rec: QueryRecord) -> bool:
        return self.agency in (rec.requester, rec.target)

    def open_request(self, rec: QueryRecord) -> Any:
        """The LookupRequest sealed in a query this agency can open. Raises for one that
        is not in the store, not sealed to this agency, or not a request (which a
        hostile requester can make it be: callers must catch any exception)."""
        from agents.lookup import request_from_json

        stored = self.store.tx(rec.tx_id)
        if stored is None:
            raise MalformedInput(f"query {rec.tx_id.hex()} is not in the store")
        query = open_envelope(stored.envelope, self.chain_id).body.query
        plaintext, _ = open_sealed(query.sealed_request, self.data_key,
                                   chain_id=self.chain_id, context_tx_id=b"", chunk=0,
                                   requester_agency=rec.requester, target_agency=rec.target)
        return request_from_json(json.loads(plaintext))

    def request_of(self, rec: QueryRecord) -> tuple[tuple[tuple[str, str], ...], str]:
        """The subjects ((key, value), ...) and the period of a query this agency can
        open; ((), "") for the others."""
        if not self.can_open(rec):
            return (("sealed", "not readable by " + self.agency),), ""
        cached = self._requests.get(rec.tx_id)
        if cached is not None:
            return cached
        if self.store.tx(rec.tx_id) is None:
            return (), ""
        try:
            request = self.open_request(rec)
            subjects = tuple((str(k), str(v)) for k, v in request.subjects)
            period = request.period or ""
        except Exception:  # noqa: BLE001 - a hostile request must not break reads
            subjects, period = (("?", "unreadable request"),), ""
        self._requests[rec.tx_id] = (subjects, period)
        while len(self._requests) > SUBJECT_CACHE_MAX:
            self._requests.popitem(last=False)
        return subjects, period

    def view(self, rec: QueryRecord, time_ms: int) -> node_pb2.QueryView:
        subjects, period = self.request_of(rec)
        return node_pb2.QueryView(
            tx_id=rec.tx_id, height=rec.height, time_ms=rec.time_ms,
            requester_agency=rec.requester, analyst=rec.analyst, target_agency=rec.target,
            dataset=rec.dataset, case_id=rec.case_id, purpose=rec.purpose,
            legal_basis=rec.legal_basis, fields=list(rec.fields),
            shape=ledger_pb2.QueryShape.Name(rec.shape), deadline_ms=rec.deadline_ms,
            on_behalf_of=rec.on_behalf_of, cosigners=list(rec.cosigners),
            status=rec.status_at(time_ms), decision_code=rec.decision_code,
            decision_reason=rec.decision_reason, policy_id=rec.policy_id,
            policy_version=rec.policy_version, outcome_tx_id=rec.outcome_tx_id,
            outcome_height=rec.outcome_height, outcome_time_ms=rec.outcome_time_ms,
            refusal_code=rec.refusal_code, refusal_reason=rec.refusal_reason,
            row_count=rec.row_count, chunk_count=rec.chunk_count,
            subjects=[f"{k}={v}" if k != "sealed" else "(sealed)" for k, v in subjects],
            period=period)

    # -- answers ------------------------------------------------------------------------
    def answer(self, query_tx_id: bytes, time_ms: int) -> node_pb2.AnswerView:
        """The query's view and every chunk opened, in one message: refused (Oversize)
        for an answer of more than ANSWER_VIEW_CHUNKS_MAX chunks, which is read with
        StreamAnswer, one chunk a message."""
        out, places = self.answer_head(query_tx_id, time_ms)
        if len(places) > ANSWER_VIEW_CHUNKS_MAX:
            raise Oversize(f"the answer has {len(places)} chunks, more than the "
                           f"{ANSWER_VIEW_CHUNKS_MAX} one reply carries: read it streamed "
                           "(StreamAnswer; `exchange answer` does)")
        for place in places:
            out.chunks.append(self.open_chunk(query_tx_id, place))
        return out

    def answer_head(self, query_tx_id: bytes, time_ms: int
                    ) -> tuple[node_pb2.AnswerView, list[ChunkPlace]]:
        """The query's view with the manifest's commitment (no chunk yet), and where each
        chunk of the answer is, in index order (none before it is answered)."""
        rec = self.queries.get(query_tx_id)
        if rec is None:
            raise MalformedInput(f"no valid query {query_tx_id.hex()} on the ledger")
        if not self.can_open(rec):
            raise PermissionDenied(f"the answer to this query is sealed to {rec.requester}, "
                                   f"not {self.agency}")
        out = node_pb2.AnswerView(query=self.view(rec, time_ms))
        if rec.status != STATUS_ANSWERED:
            return out, []
        stored = self.store.tx(rec.outcome_tx_id)
        if stored is None:
            raise AnswerPending("the answer's block is being stored")
        manifest = open_envelope(stored.envelope, self.chain_id).body.answer_manifest
        out.commitment = manifest.commitment
        if manifest.HasField("inline_chunk"):
            return out, [ChunkPlace(rec.outcome_tx_id, 0, inline=True)]
        return out, [ChunkPlace(bytes(digest), index)
                     for index, digest in enumerate(manifest.chunk_digests)]

    def open_chunk(self, query_tx_id: bytes, place: ChunkPlace) -> node_pb2.OpenedChunk:
        """One chunk of an answer, read from the store and opened with the data key."""
        stored = self.store.tx(place.tx_id)
        assert stored is not None, "a manifest's chunks are stored"
        body = open_envelope(stored.envelope, self.chain_id).body
        sealed = (body.answer_manifest.inline_chunk if place.inline
                  else body.answer_chunk.sealed)
        plaintext, salt = open_sealed(sealed, self.data_key, chain_id=self.chain_id,
                                      context_tx_id=query_tx_id, chunk=place.index)
        return node_pb2.OpenedChunk(tx_id=place.tx_id, index=place.index,
                                    plaintext=plaintext, salt=salt,
                                    commitment=sealed.commitment)

    # -- findings -------------------------------------------------------------------------
    def open_findings(self, listing: node_pb2.FindingsList, subject: str = "") -> None:
        """Fill in the finding lines of each run whose output is sealed to this agency,
        keeping only those about `subject` when given."""
        from exchange.ledger.findings import findings_chunk_reader, open_output

        chunk_of = findings_chunk_reader(self.store, self.chain_id)
        for run in listing.runs:
            stored = self.store.tx(bytes(run.tx_id))
            if stored is None:
                continue
            f = open_envelope(stored.envelope, self.chain_id).body.findings
            index = 0
            try:
                for _chunk, plaintext, _salt in open_output(f, self.data_key, self.chain_id,
                                                            chunk_of):
                    run.opened = True
                    for line in plaintext.splitlines(keepends=True):
                        if not subject or _about(line, subject):
                            run.lines.append(line)
                            run.line_index.append(index)
                        index += 1
            except ExchangeError:
                continue  # not a recipient (or not readable): ids and severities only

    # -- the audit trail ----------------------------------------------------------------
    def audit(self, request: node_pb2.AuditRequest, time_ms: int) -> node_pb2.AuditReply:
        limit = request.limit or AUDIT_LIMIT_DEFAULT
        if limit > AUDIT_LIMIT_MAX:
            raise MalformedInput(f"at most {AUDIT_LIMIT_MAX} queries per audit")
        subject = parse_subject_text(request.subject) if request.subject else None
        chosen: list[QueryRecord] = []
        for rec in self._matching(request, subject):
            chosen.append(rec)
        chosen = chosen[-limit:]
        reply = node_pb2.AuditReply(height=self.store.height)
        for rec in chosen:
            view = self.view(rec, time_ms)
            reply.entries.append(node_pb2.AuditEntry(kind="query", tx_id=rec.tx_id,
                                                     height=rec.height, time_ms=rec.time_ms,
                                                     query=view))
            if rec.outcome_tx_id:
                kind = "answer" if rec.status == STATUS_ANSWERED else "refusal"
                reply.entries.append(node_pb2.AuditEntry(
                    kind=kind, tx_id=rec.outcome_tx_id, height=rec.outcome_height,
                    time_ms=rec.outcome_time_ms, query=view))
        return reply

    def _matching(self, request: node_pb2.AuditRequest,
                  subject: tuple[str, str] | None) -> Iterable[QueryRecord]:
        for rec in list(self.queries.queries.values()):  # a copy: applies run meanwhile
            if request.since_ms and rec.time_ms < request.since_ms and not (
                    rec.outcome_time_ms >= request.since_ms):
                continue
            if request.case_id and rec.case_id != request.case_id:
                continue
            if request.agency and request.agency not in (rec.requester, rec.target):
                continue
            if request.analyst and rec.analyst != request.analyst:
                continue
            if subject is not None and not any(
                    _same_subject(subject, asked) for asked in self.request_of(rec)[0]):
                continue
            yield rec


def _about(line: bytes, subject: str) -> bool:
    """Whether a finding line is about `subject` (its whole subject, or one part of a
    pair subject "uscc/person_id")."""
    try:
        value = str(json.loads(line).get("subject", ""))
    except (ValueError, AttributeError):
        return False
    return subject == value or subject in value.split("/")


def _same_subject(wanted: tuple[str, str], asked: tuple[str, str]) -> bool:
    """`uscc=X` matches a query about `uscc=X`, `issuer_uscc=X` or `holder_id=X`: the
    same value under the same key, a key of that kind, or a holder id."""
    if wanted[1] != asked[1]:
        return False
    a, b = wanted[0], asked[0]
    return a == b or a.endswith("_" + b) or b.endswith("_" + a) or "holder_id" in (a, b)
