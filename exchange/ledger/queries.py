"""Queries and their answers as ledger state (design decisions 6 to 8).

`QueryBook` follows every valid query, answer manifest, answer chunk and refusal in
commit order and judges each against the state before it, deterministically, so every
node and every offline verifier marks the same transactions invalid for the same
reasons:

- a query is valid when it is signed by a credential that may ask (analyst, supervisor
  or automation), names another member, carries a sealed request to exactly the
  requester's and the target's data keys, asks for the answer sealed to the requester's
  data key, and has a deadline after its block's time and within `DEADLINE_MS_MAX`. The
  owner's policy in force at that point decides whether it may be answered; a query
  the policy refuses is still recorded (the refusal must be on the ledger too);
- only the target agency's node may answer or refuse, exactly once, before the
  deadline, and only answer a query the policy allows, within the row limit, sealed to
  the requester (and optionally to itself, nobody else);
- a large answer is chunks first (each its own transaction, keyed by query and index),
  then the manifest naming the chunks' tx ids in order: an answer exists only once its
  manifest is committed, and it is then complete.

Pure: nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import struct
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from exchange.errors import Conflict, CredentialInvalid, ExchangeError, MalformedInput
from exchange.identity.keys import Domain, verify
from exchange.identity.registry import ROLE_NODE, ROLE_ROOT, KeyInfo, KeyRegistry
from exchange.ledger.block import RESULT_OK, OpenedEnvelope
from exchange.ledger.policy import Decision, PolicyBook, QueryFacts
from exchange.ledger.sealing import check_sealed_form
from exchange.v1 import ledger_pb2

QUERY_KINDS = frozenset({"query", "answer_manifest", "answer_chunk", "refusal"})

# Result codes of the transactions judged here (stable: they are on the ledger).
CODE_QUERY_INVALID = "QUERY_INVALID"
CODE_NOT_ANSWERER = "NOT_ANSWERER"
CODE_NO_SUCH_QUERY = "NO_SUCH_QUERY"
CODE_ALREADY_ANSWERED = "ALREADY_ANSWERED"
CODE_QUERY_EXPIRED = "QUERY_EXPIRED"
CODE_ANSWER_NOT_ALLOWED = "ANSWER_NOT_ALLOWED"
CODE_ANSWER_INVALID = "ANSWER_INVALID"

QUERY_SHAPES = frozenset({ledger_pb2.QUERY_SHAPE_SUBJECT, ledger_pb2.QUERY_SHAPE_SUBJECT_SET,
                          ledger_pb2.QUERY_SHAPE_AGGREGATE})
QUERY_ROLES = frozenset({"analyst", "supervisor", "automation"})
SUPERVISOR_ROLE = "supervisor"
AUTOMATION_ROLE = "automation"
OWN_DATA = "(own data)"
DEADLINE_MS_MAX = 7 * 24 * 3600 * 1000
CHUNKS_MAX = 4096
RATE_WINDOW_MS = 3600 * 1000
ANSWER_CHUNKS_LABEL = b"exchange/v1/answer-chunks\0"

STATUS_OPEN = "open"
STATUS_ANSWERED = "answered"
STATUS_REFUSED = "refused"
STATUS_EXPIRED = "expired"


class Rejected(Conflict):
    """A transaction that is well formed and signed but invalid in the ledger state."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.result_code = code


def parse_subject_text(text: str) -> tuple[str, str]:
    """A query's subject as people type it, KEY=VALUE (spaces around either trimmed):
    the CLI's --subject and the audit's subject filter."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise MalformedInput(f"subject {text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def chunks_commitment(chunk_commitments: Iterable[bytes]) -> bytes:
    """The manifest commitment of an answer in several chunks: a hash over the chunks'
    own salted commitments, in order (each chunk is revealed with its own salt)."""
    h = hashlib.sha256(ANSWER_CHUNKS_LABEL)
    for c in chunk_commitments:
        h.update(bytes(c))
    return h.digest()


def _lp(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def cosign_message(body: ledger_pb2.TxBody) -> bytes:
    """What a supervisor's co-signature of a query covers: every field of the body and
    the query except the co-signatures, in a fixed length-prefixed layout (protobuf
    serialization is not canonical, so it is not used here)."""
    q = body.query
    parts = [body.chain_id.encode(), bytes(body.nonce), struct.pack(">q", body.created_at_ms),
             body.agency.encode(), q.target_agency.encode(), q.dataset.encode(),
             q.case_id.encode(), q.purpose.encode(), q.legal_basis.encode(),
             _lp(b"".join(_lp(f.encode()) for f in q.fields)),
             bytes(q.sealed_request.commitment), struct.pack(">q", q.deadline_ms),
             struct.pack(">I", q.shape), bytes(q.reply_key_id), q.on_behalf_of.encode()]
    return b"".join(_lp(p) for p in parts)


def sign_cosignature(body: ledger_pb2.TxBody, signer: object) -> ledger_pb2.CoSignature:
    """A supervisor's co-signature of the query in `body` (a SigningKey or CachedSigner)."""
    sig = signer.sign(Domain.COSIGNATURE, body.chain_id, cosign_message(body))  # type: ignore[attr-defined]
    return ledger_pb2.CoSignature(signer_key_id=signer.key_id, signature=sig)  # type: ignore[attr-defined]


@dataclass
class QueryRecord:
    """A valid query and what has happened to it."""

    tx_id: bytes
    height: int
    time_ms: int  # its block's timestamp
    requester: str
    signer_key_id: bytes
    analyst: str  # the signing credential's subject
    roles: tuple[str, ...]
    target: str
    dataset: str
    case_id: str
    purpose: str
    legal_basis: str
    fields: tuple[str, ...]
    shape: int
    deadline_ms: int
    reply_key_id: bytes
    on_behalf_of: str
    cosigners: tuple[str, ...]
    allowed: bool
    decision_code: str
    decision_reason: str
    row_limit: int
    policy_id: str
    policy_version: int
    status: str = STATUS_OPEN
    outcome_tx_id: bytes = b""  # the manifest or refusal
    outcome_height: int = 0
    outcome_time_ms: int = 0
    row_count: int = 0
    chunk_count: int = 0
    refusal_code: str = ""
    refusal_reason: str = ""
    # index -> (tx id, commitment) of chunks committed so far
    chunks: dict[int, tuple[bytes, bytes]] = field(default_factory=dict)

    def status_at(self, time_ms: int) -> str:
        """Its status as of a block stamped `time_ms` (open turns expired)."""
        if self.status == STATUS_OPEN and time_ms > self.deadline_ms:
            return STATUS_EXPIRED
        return self.status


@dataclass
class QueryBook:
    """Every valid query by tx id, and the index the answering nodes need."""

    registry: KeyRegistry
    policies: PolicyBook
    queries: dict[bytes, QueryRecord] = field(default_factory=dict)
    # Whether a query carries a standing approval that counts as a supervisor's
    # co-signature (a follow-up of a playbook a supervisor registered, LedgerState).
    standing_approval: Callable[[ledger_pb2.TxBody, KeyInfo], bool] | None = None
    # (agency, analyst subject, target) -> block times of the analyst's recent valid
    # queries: one quota per person, however many credentials they hold
    _recent: dict[tuple[str, str, str], deque[int]] = field(default_factory=dict)

    def get(self, query_tx_id: bytes) -> QueryRecord | None:
        return self.queries.get(bytes(query_tx_id))

    def open_for(self, target: str, time_ms: int) -> Iterator[QueryRecord]:
        """Queries to `target` still waiting for an answer at `time_ms`, oldest first."""
        for rec in list(self.queries.values()):  # a copy: applies may run meanwhile
            if rec.target == target and rec.status_at(time_ms) == STATUS_OPEN:
                yield rec

    # -- judging ---------------------------------------------------------------------
    def judge(self, env: OpenedEnvelope, signer: KeyInfo, height: int, time_ms: int) -> str:
        """Result code of `env` at this point of the chain; applies it if valid."""
        try:
            self.apply(env, signer, height, time_ms)
        except Rejected as exc:
            return exc.result_code
        return RESULT_OK

    def apply(self, env: OpenedEnvelope, signer: KeyInfo, height: int, time_ms: int) -> None:
        """Check and follow one transaction; raise Rejected (state unchanged) if invalid.
        Replaying the valid transactions of a chain through here rebuilds the state."""
        kind = env.kind
        if kind == "query":
            self._query(env, signer, height, time_ms)
        elif kind == "answer_chunk":
            self._chunk(env, signer, time_ms)
        elif kind == "answer_manifest":
            self._manifest(env, signer, height, time_ms)
        elif kind == "refusal":
            self._refusal(env, signer, height, time_ms)
        else:
            raise AssertionError(f"not a query kind: {kind}")

    def _query(self, env: OpenedEnvelope, signer: KeyInfo, height: int, time_ms: int) -> None:
        body = env.body
        q = body.query
        try:
            self.check_query_form(body, signer, time_ms)
        except MalformedInput as exc:
            raise Rejected(CODE_QUERY_INVALID, str(exc)) from exc
        cosigners = self._cosigners(body, env.signer_key_id, height, time_ms)
        approved = bool(cosigners) or (self.standing_approval is not None
                                       and self.standing_approval(body, signer))
        recent = self._recent.setdefault((body.agency, signer.subject, q.target_agency),
                                         deque())
        while recent and recent[0] <= time_ms - RATE_WINDOW_MS:
            recent.popleft()
        if q.target_agency == body.agency:  # a rule's own inputs: the owner's own data
            decision = Decision(True, fields=tuple(q.fields), policy_id=OWN_DATA)
        else:
            decision = self.policies.evaluate(QueryFacts(
                requester_agency=body.agency, requester_roles=frozenset(signer.roles),
                target_agency=q.target_agency, dataset=q.dataset, fields=tuple(q.fields),
                case_id=q.case_id, legal_basis=q.legal_basis, shape=q.shape,
                supervisor_cosigned=approved, queries_last_hour=len(recent)))
        recent.append(time_ms)
        self.queries[env.tx_id] = QueryRecord(
            tx_id=env.tx_id, height=height, time_ms=time_ms, requester=body.agency,
            signer_key_id=env.signer_key_id, analyst=signer.subject, roles=signer.roles,
            target=q.target_agency, dataset=q.dataset, case_id=q.case_id,
            purpose=q.purpose, legal_basis=q.legal_basis, fields=decision.fields or
            tuple(q.fields), shape=q.shape, deadline_ms=q.deadline_ms,
            reply_key_id=bytes(q.reply_key_id), on_behalf_of=q.on_behalf_of,
            cosigners=cosigners, allowed=decision.allowed, decision_code=decision.code,
            decision_reason=decision.reason, row_limit=decision.row_limit,
            policy_id=decision.policy_id, policy_version=decision.policy_version)

    def check_query_form(self, body: ledger_pb2.TxBody, signer: KeyInfo,
                         time_ms: int) -> None:
        """What makes a query valid apart from the policy; MalformedInput says why not.
        Admission runs it too, so a client hears the reason before anything commits."""
        q = body.query
        if signer.subject in (ROLE_ROOT, ROLE_NODE) or not QUERY_ROLES & set(signer.roles):
            raise MalformedInput(f"{signer.agency}/{signer.subject} holds no role that may "
                                 f"query ({', '.join(sorted(QUERY_ROLES))})")
        if q.target_agency not in self.registry.members:
            raise MalformedInput(f"{q.target_agency!r} is not a member")
        if q.target_agency == body.agency and not (
                AUTOMATION_ROLE in signer.roles and q.on_behalf_of):
            raise MalformedInput("an agency asks itself only for a rule's own inputs (an "
                                 "automation, on behalf of a rule)")
        if not q.dataset:
            raise MalformedInput("a query names a dataset")
        if q.shape not in QUERY_SHAPES:
            raise MalformedInput(f"a query names its shape (one of {sorted(QUERY_SHAPES)}, "
                                 f"not {q.shape})")
        if not time_ms < q.deadline_ms <= time_ms + DEADLINE_MS_MAX:
            raise MalformedInput(f"deadline {q.deadline_ms} is not within "
                                 f"{DEADLINE_MS_MAX // 3_600_000} h after {time_ms}")
        requester_key = self.data_key_id(body.agency)
        if bytes(q.reply_key_id) != requester_key:
            raise MalformedInput("the reply key is not the requester's data key")
        check_sealed_form(q.sealed_request)
        recipients = {bytes(w.recipient_key_id) for w in q.sealed_request.recipients}
        try:
            self.registry.check_recipients(recipients, "the request")
        except CredentialInvalid as exc:
            raise MalformedInput(str(exc)) from exc
        if recipients != {requester_key, self.data_key_id(q.target_agency)}:
            raise MalformedInput("the request must be sealed to exactly the requester "
                                 "and the target")

    def data_key_id(self, agency: str) -> bytes:
        return self.registry.data_key_id(agency)

    def _cosigners(self, body: ledger_pb2.TxBody, signer_key_id: bytes, height: int,
                   time_ms: int) -> tuple[str, ...]:
        """Subjects of the valid supervisor co-signatures (of the requester's agency)."""
        q = body.query
        if not q.cosignatures:
            return ()
        message = cosign_message(body)
        out: list[str] = []
        for co in q.cosignatures:
            try:
                info = self.registry.check_signer(bytes(co.signer_key_id), height, time_ms)
            except ExchangeError as exc:
                raise Rejected(CODE_QUERY_INVALID, f"co-signer: {exc}") from exc
            if info.agency != body.agency or SUPERVISOR_ROLE not in info.roles:
                raise Rejected(CODE_QUERY_INVALID, f"{info.agency}/{info.subject} is not a "
                                                   f"supervisor of {body.agency}")
            try:
                verify(info.public_key, Domain.COSIGNATURE, body.chain_id, message,
                       bytes(co.signature))
            except ExchangeError as exc:
                raise Rejected(CODE_QUERY_INVALID, f"co-signature: {exc}") from exc
            if bytes(co.signer_key_id) == signer_key_id or \
                    info.subject == self.registry.resolve(signer_key_id).subject:
                raise Rejected(CODE_QUERY_INVALID, "four eyes: the co-signer is not the "
                                                   "query's own signer")
            out.append(info.subject)
        return tuple(out)

    def _open_query(self, query_tx_id: bytes, signer: KeyInfo, time_ms: int) -> QueryRecord:
        """The open query an answer, chunk or refusal by `signer` may belong to."""
        rec = self.queries.get(bytes(query_tx_id))
        if rec is None:
            raise Rejected(CODE_NO_SUCH_QUERY, f"no valid query {bytes(query_tx_id).hex()}")
        if signer.agency != rec.target or signer.subject != ROLE_NODE:
            raise Rejected(CODE_NOT_ANSWERER, f"only {rec.target}'s node answers this query")
        status = rec.status_at(time_ms)
        if status == STATUS_EXPIRED:
            raise Rejected(CODE_QUERY_EXPIRED, "the query's deadline has passed")
        if status != STATUS_OPEN:
            raise Rejected(CODE_ALREADY_ANSWERED, f"the query is already {status}")
        return rec

    def _check_sealed_to(self, rec: QueryRecord, sealed: ledger_pb2.SealedPayload) -> None:
        try:
            check_sealed_form(sealed)
        except MalformedInput as exc:
            raise Rejected(CODE_ANSWER_INVALID, str(exc)) from exc
        recipients = {bytes(w.recipient_key_id) for w in sealed.recipients}
        try:
            self.registry.check_recipients(recipients, "the answer")
        except CredentialInvalid as exc:
            raise Rejected(CODE_ANSWER_INVALID, str(exc)) from exc
        # the requester's reply key, or its data key now (it may have rotated since)
        requester = {rec.reply_key_id, self.data_key_id(rec.requester)}
        allowed = requester | self.registry.agency_data_key_ids(rec.target)
        if not recipients & requester or not recipients <= allowed:
            raise Rejected(CODE_ANSWER_INVALID, "an answer is sealed to the requester (and "
                                                "at most the answering agency)")

    def _chunk(self, env: OpenedEnvelope, signer: KeyInfo, time_ms: int) -> None:
        chunk = env.body.answer_chunk
        rec = self._open_query(chunk.query_tx_id, signer, time_ms)
        if not rec.allowed:
            raise Rejected(CODE_ANSWER_NOT_ALLOWED, rec.decision_reason)
        if chunk.index >= CHUNKS_MAX:
            raise Rejected(CODE_ANSWER_INVALID, f"chunk index {chunk.index} >= {CHUNKS_MAX}")
        if chunk.index in rec.chunks:
            raise Rejected(CODE_ANSWER_INVALID, f"chunk {chunk.index} is already committed")
        self._check_sealed_to(rec, chunk.sealed)
        rec.chunks[chunk.index] = (env.tx_id, bytes(chunk.sealed.commitment))

    def _manifest(self, env: OpenedEnvelope, signer: KeyInfo, height: int,
                  time_ms: int) -> None:
        m = env.body.answer_manifest
        rec = self._open_query(m.query_tx_id, signer, time_ms)
        if not rec.allowed:
            raise Rejected(CODE_ANSWER_NOT_ALLOWED, rec.decision_reason)
        if rec.row_limit and m.row_count > rec.row_limit:
            raise Rejected(CODE_ANSWER_INVALID, f"{m.row_count} rows exceed the policy's "
                                                f"limit of {rec.row_limit}")
        if not 1 <= m.chunk_count <= CHUNKS_MAX:
            raise Rejected(CODE_ANSWER_INVALID, f"chunk count {m.chunk_count}")
        if m.chunk_count == 1:
            if not m.HasField("inline_chunk"):
                raise Rejected(CODE_ANSWER_INVALID, "an answer in one chunk carries it inline")
            if m.chunk_digests:
                raise Rejected(CODE_ANSWER_INVALID, "an inline answer lists no chunks")
            self._check_sealed_to(rec, m.inline_chunk)
            if bytes(m.commitment) != bytes(m.inline_chunk.commitment):
                raise Rejected(CODE_ANSWER_INVALID, "commitment differs from the inline chunk's")
        else:
            if m.HasField("inline_chunk") or len(m.chunk_digests) != m.chunk_count:
                raise Rejected(CODE_ANSWER_INVALID, "a chunked answer lists every chunk "
                                                    "and has no inline chunk")
            commitments = []
            for index, digest in enumerate(m.chunk_digests):
                have = rec.chunks.get(index)
                if have is None or have[0] != bytes(digest):
                    raise Rejected(CODE_ANSWER_INVALID, f"chunk {index} is not the "
                                                        "committed one")
                commitments.append(have[1])
            if bytes(m.commitment) != chunks_commitment(commitments):
                raise Rejected(CODE_ANSWER_INVALID, "commitment does not match the chunks")
        rec.status = STATUS_ANSWERED
        rec.outcome_tx_id, rec.outcome_height, rec.outcome_time_ms = env.tx_id, height, time_ms
        rec.row_count, rec.chunk_count = m.row_count, m.chunk_count

    def _refusal(self, env: OpenedEnvelope, signer: KeyInfo, height: int,
                 time_ms: int) -> None:
        r = env.body.refusal
        rec = self._open_query(r.query_tx_id, signer, time_ms)
        if not r.code:
            raise Rejected(CODE_ANSWER_INVALID, "a refusal gives a reason code")
        rec.status = STATUS_REFUSED
        rec.outcome_tx_id, rec.outcome_height, rec.outcome_time_ms = env.tx_id, height, time_ms
        rec.refusal_code, rec.refusal_reason = r.code, r.reason
