"""Cross-queries as ledger state (decisions 3, 6 to 8): who may ask whom, who may answer,
exactly once and before the deadline, sealed to the requester alone; and every node,
restarted or verifying offline, reaching the same records from the same blocks."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.lookup import LookupRequest, request_to_json
from exchange.client import Signer
from exchange.client.crossquery import QuerySpec, build_query, read_answer
from exchange.errors import NotARecipient, ProofInvalid
from exchange.identity.default_policies import ROW_LIMIT_RECORDS, default_policies
from exchange.identity.genesis import verify_genesis
from exchange.identity.keys import CachedSigner, Domain, key_id
from exchange.ledger import queries as qb
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import RESULT_OK, new_body, open_envelope, seal_envelope, tx_id
from exchange.ledger.policy import CASE_REQUIRED, COSIGNATURE_REQUIRED, RATE_LIMITED
from exchange.ledger.sealing import (
    canonical_json,
    canonical_json_lines,
    open_sealed,
    seal,
    verify_reveal,
)
from exchange.ledger.store import BlockStore
from exchange.ledger.verify import verify_store
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2
from tests.support.ledger_net import AGENCIES, Net, body_of, make_net, probe

CASE = "CASE-2024-0042"
USCC = "91440300MA5F000001"
HOUR_MS = 3_600_000
# Stores live in memory where the system offers it: the tests cut hundreds of blocks and
# the durability of each (an fsync) is not what they are about.
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None
ACCOUNT_ROWS = [
    {"account_no": f"6222-{i:04d}", "bank": "ICBC Shenzhen", "holder_id": USCC,
     "holder_kind": "company", "opened_on": "2021-03-0" + str(i + 1)}
    for i in range(5)
]


# -- a network and a ledger it writes to --------------------------------------------

@pytest.fixture(scope="module")
def net() -> Net:
    return make_net(policies=default_policies(AGENCIES))


@dataclass
class Ledger:
    """One node's store and applier, cutting blocks at times the test chooses."""

    net: Net
    genesis: identity_pb2.Genesis
    applier: LedgerApplier
    now_ms: int

    def block(self, *envelopes: bytes, at_ms: int | None = None) -> tuple[str, ...]:
        """Cut and apply one block stamped `at_ms` (default: the current time)."""
        if at_ms is not None:
            self.now_ms = at_ms
        block = self.applier.cut(list(envelopes), self.now_ms, self.net.nodes["tax"], "tax")
        return self.applier.apply(block).codes

    def one(self, envelope: bytes, at_ms: int | None = None) -> str:
        (code,) = self.block(envelope, at_ms=at_ms)
        return code

    def record(self, query_tx: bytes) -> qb.QueryRecord:
        rec = self.applier.queries.get(query_tx)
        assert rec is not None, "query not recorded"
        return rec

    def reason(self, envelope: bytes) -> str:
        """Why the query book rejects `envelope` now (the ledger keeps only the code)."""
        env = open_envelope(envelope, self.net.chain_id)
        signer = self.applier.registry.resolve(env.signer_key_id)
        with pytest.raises(qb.Rejected) as exc:
            self.applier.queries.apply(env, signer, self.applier.store.height + 1,
                                       self.now_ms)
        return str(exc.value)


def _ledger(net: Net, path: Path) -> Ledger:
    store = BlockStore.create(path, net.signed_genesis)
    return Ledger(net, verify_genesis(net.signed_genesis), LedgerApplier(store),
                  int(time.time() * 1000))


@pytest.fixture
def ledger(net: Net) -> Iterator[Ledger]:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        led = _ledger(net, Path(tmp) / "store.db")
        yield led
        led.applier.store.close()


# -- building transactions ----------------------------------------------------------

def query(led: Ledger, *, requester: str = "tax", target: str = "pboc",
          dataset: str = "accounts", case_id: str = CASE, key: CachedSigner | None = None,
          subject: str = "analyst-1", cosigners: Sequence[CachedSigner] = (),
          deadline_s: int = 300, at_ms: int | None = None,
          mutate: Callable[[ledger_pb2.TxBody], None] | None = None) -> tuple[bytes, bytes]:
    """A signed query envelope and its tx id, built as `exchange query` builds it;
    `mutate` edits the body before it is (co-)signed."""
    net = led.net
    key = key or net.analysts[requester]
    signer = Signer(requester, subject, net.chain_id, key)
    spec = QuerySpec(target=target, dataset=dataset, subjects=(("uscc", USCC),),
                     case_id=case_id, purpose="export rebate check", deadline_s=deadline_s)
    now = led.now_ms if at_ms is None else at_ms
    if mutate is None:
        envelope, txid = build_query(spec, signer, led.genesis, cosigners, now_ms=now)
        return envelope, txid
    envelope, _ = build_query(spec, signer, led.genesis, now_ms=now)
    body = body_of(envelope)
    mutate(body)
    for cosigner in cosigners:
        body.query.cosignatures.append(qb.sign_cosignature(body, cosigner))
    return signed(body, key)


def signed(body: ledger_pb2.TxBody, key: CachedSigner) -> tuple[bytes, bytes]:
    envelope = seal_envelope(body, key)
    return envelope, tx_id(ledger_pb2.Envelope.FromString(envelope).body)


def data_public(net: Net, agencies: Sequence[str]) -> list[bytes]:
    return [net.data_keys[a].public_key for a in agencies]


def sealed_answer(net: Net, query_tx: bytes, plaintext: bytes, index: int = 0,
                  to: Sequence[str] = ("tax",)) -> tuple[ledger_pb2.SealedPayload, bytes]:
    return seal(plaintext, data_public(net, to), chain_id=net.chain_id,
                context_tx_id=query_tx, chunk=index)


def _answerer(net: Net, by: str, key: CachedSigner | None) -> tuple[str, CachedSigner]:
    return by, key or net.nodes[by]


def inline_answer(led: Ledger, query_tx: bytes, rows: Sequence[object] = ACCOUNT_ROWS[:2], *,
                  by: str = "pboc", key: CachedSigner | None = None,
                  to: Sequence[str] = ("tax",), row_count: int | None = None,
                  commitment: bytes | None = None, at_ms: int | None = None) -> bytes:
    """A one-chunk answer manifest carrying the rows inline."""
    agency, key = _answerer(led.net, by, key)
    sealed, _ = sealed_answer(led.net, query_tx, canonical_json_lines(rows), to=to)
    body = new_body(led.net.chain_id, agency, led.now_ms if at_ms is None else at_ms)
    body.answer_manifest.CopyFrom(ledger_pb2.AnswerManifest(
        query_tx_id=query_tx, chunk_count=1,
        row_count=len(rows) if row_count is None else row_count,
        commitment=sealed.commitment if commitment is None else commitment,
        inline_chunk=sealed))
    return signed(body, key)[0]


@dataclass
class Chunk:
    envelope: bytes
    tx_id: bytes
    sealed: ledger_pb2.SealedPayload
    plaintext: bytes


def chunk(led: Ledger, query_tx: bytes, index: int, rows: Sequence[object], *,
          by: str = "pboc", to: Sequence[str] = ("tax",), at_ms: int | None = None) -> Chunk:
    plaintext = canonical_json_lines(rows)
    sealed, _ = sealed_answer(led.net, query_tx, plaintext, index, to)
    body = new_body(led.net.chain_id, by, led.now_ms if at_ms is None else at_ms)
    body.answer_chunk.CopyFrom(ledger_pb2.AnswerChunk(query_tx_id=query_tx, index=index,
                                                      sealed=sealed))
    envelope, txid = signed(body, led.net.nodes[by])
    return Chunk(envelope, txid, sealed, plaintext)


def chunked_manifest(led: Ledger, query_tx: bytes, chunk_tx_ids: Sequence[bytes],
                     commitments: Sequence[bytes], row_count: int, *, by: str = "pboc",
                     at_ms: int | None = None) -> bytes:
    body = new_body(led.net.chain_id, by, led.now_ms if at_ms is None else at_ms)
    body.answer_manifest.CopyFrom(ledger_pb2.AnswerManifest(
        query_tx_id=query_tx, chunk_count=len(chunk_tx_ids), row_count=row_count,
        commitment=qb.chunks_commitment(commitments), chunk_digests=list(chunk_tx_ids)))
    return signed(body, led.net.nodes[by])[0]


def manifest_for(led: Ledger, query_tx: bytes, chunks: Sequence[Chunk], row_count: int,
                 **kw: object) -> bytes:
    return chunked_manifest(led, query_tx, [c.tx_id for c in chunks],
                            [bytes(c.sealed.commitment) for c in chunks], row_count,
                            **kw)  # type: ignore[arg-type]


def refusal(led: Ledger, query_tx: bytes, *, by: str = "pboc", key: CachedSigner | None = None,
            code: str = "NO_RECORDS", at_ms: int | None = None) -> bytes:
    agency, key = _answerer(led.net, by, key)
    body = new_body(led.net.chain_id, agency, led.now_ms if at_ms is None else at_ms)
    body.refusal.CopyFrom(ledger_pb2.Refusal(query_tx_id=query_tx, code=code,
                                             reason="nothing to say"))
    return signed(body, key)[0]


def committed_query(led: Ledger, at_ms: int | None = None, **kw: object) -> bytes:
    """A query committed alone in a block stamped `at_ms` (default: the current time)."""
    if at_ms is not None:
        led.now_ms = at_ms
    envelope, txid = query(led, **kw)  # type: ignore[arg-type]
    assert led.one(envelope) == RESULT_OK
    return txid


# -- queries -------------------------------------------------------------------------

def test_valid_analyst_query_is_recorded_with_the_policy_decision(ledger: Ledger) -> None:
    envelope, txid = query(ledger)
    assert ledger.one(envelope) == RESULT_OK
    rec = ledger.record(txid)
    assert (rec.requester, rec.analyst, rec.roles, rec.target, rec.dataset, rec.case_id) == (
        "tax", "analyst-1", ("analyst",), "pboc", "accounts", CASE)
    assert rec.allowed and rec.decision_code == ""
    assert (rec.policy_id, rec.policy_version, rec.row_limit) == ("pboc/accounts", 1,
                                                                 ROW_LIMIT_RECORDS)
    assert rec.fields == ("account_no", "holder_kind", "holder_id", "bank", "opened_on")
    assert (rec.height, rec.time_ms, rec.deadline_ms) == (1, ledger.now_ms,
                                                         ledger.now_ms + 300_000)
    assert rec.reply_key_id == ledger.net.data_keys["tax"].key_id
    assert rec.status_at(ledger.now_ms) == qb.STATUS_OPEN
    assert [r.tx_id for r in ledger.applier.queries.open_for("pboc", ledger.now_ms)] == [txid]


def test_query_request_is_readable_by_requester_and_target_only(ledger: Ledger) -> None:
    envelope, _ = query(ledger)
    sealed = body_of(envelope).query.sealed_request
    context = dict(chain_id=ledger.net.chain_id, context_tx_id=b"", chunk=0,
                   requester_agency="tax", target_agency="pboc")
    expected = canonical_json(request_to_json(LookupRequest("accounts", (("uscc", USCC),))))
    for agency in ("tax", "pboc"):
        plaintext, _ = open_sealed(sealed, ledger.net.data_keys[agency], **context)  # type: ignore[arg-type]
        assert plaintext == expected
    with pytest.raises(NotARecipient):
        open_sealed(sealed, ledger.net.data_keys["customs"], **context)  # type: ignore[arg-type]


@pytest.mark.parametrize(("target", "dataset", "case_id", "code"), [
    ("police", "records", CASE, COSIGNATURE_REQUIRED),
    ("pboc", "accounts", "", CASE_REQUIRED),
], ids=["police_records_without_cosignature", "record_dataset_without_case"])
def test_policy_denied_query_is_recorded_as_not_allowed_with_its_code(
        ledger: Ledger, target: str, dataset: str, case_id: str, code: str) -> None:
    envelope, txid = query(ledger, target=target, dataset=dataset, case_id=case_id)
    assert ledger.one(envelope) == RESULT_OK
    rec = ledger.record(txid)
    assert not rec.allowed and rec.decision_code == code and rec.decision_reason
    assert rec.status == qb.STATUS_OPEN  # waiting for the target's signed refusal


def _set(field: str, value: object) -> Callable[[ledger_pb2.TxBody], None]:
    def mutate(body: ledger_pb2.TxBody) -> None:
        setattr(body.query, field, value)
    return mutate


def _reseal_request(*agencies: str) -> Callable[[Ledger], Callable[[ledger_pb2.TxBody], None]]:
    def make(led: Ledger) -> Callable[[ledger_pb2.TxBody], None]:
        def mutate(body: ledger_pb2.TxBody) -> None:
            sealed, _ = seal(b"{}", data_public(led.net, agencies), chain_id=led.net.chain_id,
                             context_tx_id=b"", chunk=0, requester_agency="tax",
                             target_agency="pboc")
            body.query.sealed_request.CopyFrom(sealed)
        return mutate
    return make


def _forged_cosignature(led: Ledger) -> Callable[[ledger_pb2.TxBody], None]:
    def mutate(body: ledger_pb2.TxBody) -> None:
        supervisor = led.net.supervisors["tax"]
        body.query.cosignatures.append(ledger_pb2.CoSignature(
            signer_key_id=supervisor.key_id,
            signature=supervisor.sign(Domain.COSIGNATURE, led.net.chain_id, b"something else")))
    return mutate


def _deadline(offset_ms: int) -> Callable[[Ledger], Callable[[ledger_pb2.TxBody], None]]:
    return lambda led: _set("deadline_ms", led.now_ms + offset_ms)


# Each case: query() keyword arguments (callables of the ledger), and the reason given.
INVALID_QUERIES: dict[str, tuple[Callable[[Ledger], dict[str, object]], str]] = {
    "signed_by_a_node_key": (lambda led: dict(key=led.net.nodes["tax"], subject="node"),
                             "holds no role that may query"),
    "signed_by_a_root_key": (lambda led: dict(key=CachedSigner(led.net.roots["tax"]),
                                              subject="root"),
                             "holds no role that may query"),
    "target_not_a_member": (lambda led: dict(mutate=_set("target_agency", "interpol")),
                            "is not a member"),
    "target_is_own_agency": (lambda led: dict(mutate=_set("target_agency", "tax")),
                             "asks itself only for a rule"),
    "deadline_in_the_past": (lambda led: dict(mutate=_deadline(-1)(led)), "deadline"),
    "deadline_at_the_block_time": (lambda led: dict(mutate=_deadline(0)(led)), "deadline"),
    "deadline_beyond_seven_days": (
        lambda led: dict(mutate=_deadline(qb.DEADLINE_MS_MAX + 1)(led)), "deadline"),
    "reply_key_not_the_requesters_data_key": (
        lambda led: dict(mutate=_set("reply_key_id",
                                     key_id("x25519", led.net.data_keys["customs"].public_key))),
        "reply key"),
    "request_sealed_to_the_requester_only": (
        lambda led: dict(mutate=_reseal_request("tax")(led)), "sealed to exactly"),
    "request_sealed_to_a_third_agency_too": (
        lambda led: dict(mutate=_reseal_request("tax", "pboc", "customs")(led)),
        "sealed to exactly"),
    "request_sealed_to_another_agency_instead_of_the_target": (
        lambda led: dict(mutate=_reseal_request("tax", "customs")(led)), "sealed to exactly"),
    "forged_cosignature": (lambda led: dict(target="police", dataset="records",
                                            mutate=_forged_cosignature(led)),
                           "co-signature"),
    "cosignature_by_another_agencys_supervisor": (
        lambda led: dict(target="police", dataset="records",
                         cosigners=[led.net.supervisors["customs"]]),
        "is not a supervisor of tax"),
    "cosignature_by_a_non_supervisor_of_the_agency": (
        lambda led: dict(target="police", dataset="records", key=led.net.automations["tax"],
                         subject="automation", cosigners=[led.net.analysts["tax"]]),
        "is not a supervisor of tax"),
    "cosignature_by_the_querys_own_signer": (
        lambda led: dict(target="police", dataset="records", key=led.net.supervisors["tax"],
                         subject="supervisor-1", cosigners=[led.net.supervisors["tax"]]),
        "four eyes"),
}


@pytest.mark.parametrize("case", list(INVALID_QUERIES))
def test_query_is_invalid_when(ledger: Ledger, case: str) -> None:
    make_kw, reason = INVALID_QUERIES[case]
    envelope, txid = query(ledger, **make_kw(ledger))  # type: ignore[arg-type]
    assert reason in ledger.reason(envelope)
    assert ledger.one(envelope) == qb.CODE_QUERY_INVALID
    assert ledger.applier.queries.get(txid) is None
    # nothing can answer what was never a valid query
    assert ledger.one(inline_answer(ledger, txid)) == qb.CODE_NO_SUCH_QUERY


def _shape(shape: int, cosigned: bool) -> Callable[[Ledger], Callable[[ledger_pb2.TxBody], None]]:
    def make(led: Ledger) -> Callable[[ledger_pb2.TxBody], None]:
        def mutate(body: ledger_pb2.TxBody) -> None:
            body.query.shape = shape  # type: ignore[assignment]
            if cosigned:  # the judge must read the body before it can tell a bad signature
                body.query.cosignatures.append(ledger_pb2.CoSignature(
                    signer_key_id=led.net.supervisors["tax"].key_id, signature=bytes(64)))
        return mutate
    return make


@pytest.mark.parametrize(("shape", "cosigned"), [(99, False), (-1, False), (-1, True)],
                         ids=["shape_99", "shape_minus_1", "shape_minus_1_cosigned"])
def test_query_with_a_shape_outside_the_enum_is_query_invalid(
        ledger: Ledger, shape: int, cosigned: bool) -> None:
    envelope, txid = query(ledger, mutate=_shape(shape, cosigned)(ledger))
    assert ledger.one(envelope) == qb.CODE_QUERY_INVALID
    assert ledger.applier.queries.get(txid) is None
    assert ledger.one(probe(ledger.net, "tax", at_ms=ledger.now_ms)) == RESULT_OK  # not stuck


def test_deadline_of_exactly_seven_days_is_valid(ledger: Ledger) -> None:
    envelope, txid = query(ledger, mutate=_deadline(qb.DEADLINE_MS_MAX)(ledger))
    assert ledger.one(envelope) == RESULT_OK
    assert ledger.record(txid).deadline_ms == ledger.now_ms + qb.DEADLINE_MS_MAX


def test_supervisor_cosignature_makes_a_police_records_query_allowed(ledger: Ledger) -> None:
    envelope, txid = query(ledger, target="police", dataset="records",
                           cosigners=[ledger.net.supervisors["tax"]])
    assert ledger.one(envelope) == RESULT_OK
    rec = ledger.record(txid)
    assert rec.allowed and rec.cosigners == ("supervisor-1",)
    assert ledger.one(inline_answer(ledger, txid, [{"record_id": "R-1"}], by="police")) == "OK"


# -- answers ------------------------------------------------------------------------

def test_target_node_answers_inline_and_the_query_is_answered(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    ledger.now_ms += 1_000
    answer = inline_answer(ledger, txid, ACCOUNT_ROWS[:2])
    assert ledger.one(answer) == RESULT_OK
    rec = ledger.record(txid)
    assert rec.status == qb.STATUS_ANSWERED
    assert (rec.outcome_tx_id, rec.outcome_height, rec.outcome_time_ms) == (
        tx_id(ledger_pb2.Envelope.FromString(answer).body), 2, ledger.now_ms)
    assert (rec.row_count, rec.chunk_count) == (2, 1)
    assert list(ledger.applier.queries.open_for("pboc", ledger.now_ms)) == []


def test_answer_may_also_be_sealed_to_the_answering_agency(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    assert ledger.one(inline_answer(ledger, txid, to=("tax", "pboc"))) == RESULT_OK


def test_empty_answer_is_valid(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    assert ledger.one(inline_answer(ledger, txid, [])) == RESULT_OK
    assert ledger.record(txid).row_count == 0


@pytest.mark.parametrize("who", ["another_agencys_node", "the_targets_analyst",
                                 "the_requesters_node", "the_targets_root"])
@pytest.mark.parametrize("kind", ["answer", "refusal", "chunk"])
def test_outcome_not_signed_by_the_targets_node_is_not_answerer(
        ledger: Ledger, who: str, kind: str) -> None:
    net = ledger.net
    by, key = {"another_agencys_node": ("customs", net.nodes["customs"]),
               "the_targets_analyst": ("pboc", net.analysts["pboc"]),
               "the_requesters_node": ("tax", net.nodes["tax"]),
               "the_targets_root": ("pboc", CachedSigner(net.roots["pboc"]))}[who]
    txid = committed_query(ledger)
    if kind == "answer":
        envelope = inline_answer(ledger, txid, by=by, key=key)
    elif kind == "refusal":
        envelope = refusal(ledger, txid, by=by, key=key)
    else:
        sealed, _ = sealed_answer(net, txid, b"{}\n")
        body = new_body(net.chain_id, by, ledger.now_ms)
        body.answer_chunk.CopyFrom(ledger_pb2.AnswerChunk(query_tx_id=txid, index=0,
                                                          sealed=sealed))
        envelope = signed(body, key)[0]
    assert ledger.one(envelope) == qb.CODE_NOT_ANSWERER
    assert ledger.record(txid).status == qb.STATUS_OPEN
    assert ledger.one(inline_answer(ledger, txid)) == RESULT_OK


@pytest.mark.parametrize("kind", ["answer", "refusal", "chunk"])
def test_outcome_for_an_unknown_query_is_no_such_query(ledger: Ledger, kind: str) -> None:
    unknown = b"\x07" * 32
    envelope = {"answer": lambda: inline_answer(ledger, unknown),
                "refusal": lambda: refusal(ledger, unknown),
                "chunk": lambda: chunk(ledger, unknown, 0, ACCOUNT_ROWS).envelope}[kind]()
    assert ledger.one(envelope) == qb.CODE_NO_SUCH_QUERY


def test_second_answer_to_a_query_is_already_answered(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    first = inline_answer(ledger, txid)
    assert ledger.one(first) == RESULT_OK
    assert ledger.one(inline_answer(ledger, txid, ACCOUNT_ROWS[2:])) == qb.CODE_ALREADY_ANSWERED
    assert ledger.one(refusal(ledger, txid)) == qb.CODE_ALREADY_ANSWERED
    assert ledger.record(txid).outcome_tx_id == tx_id(ledger_pb2.Envelope.FromString(first).body)


def test_second_answer_in_the_same_block_is_already_answered(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    assert ledger.block(inline_answer(ledger, txid), refusal(ledger, txid),
                        inline_answer(ledger, txid)) == (
        RESULT_OK, qb.CODE_ALREADY_ANSWERED, qb.CODE_ALREADY_ANSWERED)


def test_answer_or_second_refusal_after_a_refusal_is_already_answered(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    assert ledger.one(refusal(ledger, txid, code="NO_RECORDS")) == RESULT_OK
    assert ledger.one(refusal(ledger, txid, code="OTHER")) == qb.CODE_ALREADY_ANSWERED
    assert ledger.one(inline_answer(ledger, txid)) == qb.CODE_ALREADY_ANSWERED
    rec = ledger.record(txid)
    assert (rec.status, rec.refusal_code) == (qb.STATUS_REFUSED, "NO_RECORDS")


def test_refusal_without_a_code_is_answer_invalid(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    assert ledger.one(refusal(ledger, txid, code="")) == qb.CODE_ANSWER_INVALID
    assert ledger.record(txid).status == qb.STATUS_OPEN


@pytest.mark.parametrize("kind", ["answer", "refusal", "chunk"])
def test_outcome_in_a_block_after_the_deadline_is_query_expired(ledger: Ledger,
                                                                kind: str) -> None:
    txid = committed_query(ledger, deadline_s=60)
    deadline = ledger.record(txid).deadline_ms
    late = deadline + 1
    envelope = {"answer": lambda: inline_answer(ledger, txid, at_ms=late),
                "refusal": lambda: refusal(ledger, txid, at_ms=late),
                "chunk": lambda: chunk(ledger, txid, 0, ACCOUNT_ROWS, at_ms=late).envelope}[kind]()
    assert ledger.one(envelope, at_ms=late) == qb.CODE_QUERY_EXPIRED
    rec = ledger.record(txid)
    assert rec.status == qb.STATUS_OPEN and rec.status_at(late) == qb.STATUS_EXPIRED
    assert rec.chunks == {}
    assert list(ledger.applier.queries.open_for("pboc", late)) == []


def test_answer_in_a_block_stamped_at_the_deadline_is_in_time(ledger: Ledger) -> None:
    txid = committed_query(ledger, deadline_s=60)
    deadline = ledger.record(txid).deadline_ms
    assert ledger.one(inline_answer(ledger, txid, at_ms=deadline), at_ms=deadline) == RESULT_OK


def test_answer_body_time_does_not_matter_only_the_blocks(ledger: Ledger) -> None:
    """An answer created before the deadline but committed after it is late."""
    txid = committed_query(ledger, deadline_s=60)
    deadline = ledger.record(txid).deadline_ms
    answer = inline_answer(ledger, txid, at_ms=deadline - 1)
    assert ledger.one(answer, at_ms=deadline + 1) == qb.CODE_QUERY_EXPIRED


def test_policy_denied_query_cannot_be_answered_but_can_be_refused(ledger: Ledger) -> None:
    txid = committed_query(ledger, target="police", dataset="records")
    assert not ledger.record(txid).allowed
    rows = [{"record_id": "R-1"}]
    assert ledger.one(inline_answer(ledger, txid, rows, by="police")) == \
        qb.CODE_ANSWER_NOT_ALLOWED
    assert ledger.one(chunk(ledger, txid, 0, rows, by="police").envelope) == \
        qb.CODE_ANSWER_NOT_ALLOWED
    assert ledger.one(refusal(ledger, txid, by="police", code=COSIGNATURE_REQUIRED)) == "OK"
    rec = ledger.record(txid)
    assert (rec.status, rec.refusal_code) == (qb.STATUS_REFUSED, COSIGNATURE_REQUIRED)


INVALID_ANSWERS: dict[str, Callable[[Ledger, bytes], bytes]] = {
    "sealed_to_another_agency_instead_of_the_requester":
        lambda led, q: inline_answer(led, q, to=("customs",)),
    "sealed_to_the_answerer_only": lambda led, q: inline_answer(led, q, to=("pboc",)),
    "sealed_to_the_requester_and_a_third_agency":
        lambda led, q: inline_answer(led, q, to=("tax", "customs")),
    "row_count_above_the_row_limit":
        lambda led, q: inline_answer(led, q, row_count=ROW_LIMIT_RECORDS + 1),
    "inline_commitment_differs_from_the_inline_chunks":
        lambda led, q: inline_answer(led, q, commitment=b"\x01" * 32),
    "sealed_to_the_requester_for_another_query":
        lambda led, q: _answer_sealed_for(led, q, b"\x09" * 32),
}


def _answer_sealed_for(led: Ledger, query_tx: bytes, other_tx: bytes) -> bytes:
    """An answer to `query_tx` whose inline chunk is sealed in `other_tx`'s context: the
    ledger cannot tell (the binding is checked by whoever opens it)."""
    sealed, _ = sealed_answer(led.net, other_tx, b"{}\n")
    body = new_body(led.net.chain_id, "pboc", led.now_ms)
    body.answer_manifest.CopyFrom(ledger_pb2.AnswerManifest(
        query_tx_id=query_tx, chunk_count=1, row_count=1, commitment=sealed.commitment,
        inline_chunk=sealed))
    return signed(body, led.net.nodes["pboc"])[0]


@pytest.mark.parametrize("case", [c for c in INVALID_ANSWERS
                                  if c != "sealed_to_the_requester_for_another_query"])
def test_answer_is_invalid_when(ledger: Ledger, case: str) -> None:
    txid = committed_query(ledger)
    assert ledger.one(INVALID_ANSWERS[case](ledger, txid)) == qb.CODE_ANSWER_INVALID
    assert ledger.record(txid).status == qb.STATUS_OPEN
    assert ledger.one(inline_answer(ledger, txid)) == RESULT_OK  # a correct one still may


def test_answer_sealed_in_another_querys_context_fails_to_open_for_the_requester(
        ledger: Ledger) -> None:
    txid = committed_query(ledger)
    answer = INVALID_ANSWERS["sealed_to_the_requester_for_another_query"](ledger, txid)
    assert ledger.one(answer) == RESULT_OK  # the ledger sees only recipients, not context
    sealed = body_of(answer).answer_manifest.inline_chunk
    with pytest.raises(ProofInvalid, match="authenticate"):
        open_sealed(sealed, ledger.net.data_keys["tax"], chain_id=ledger.net.chain_id,
                    context_tx_id=txid, chunk=0)


def test_inline_manifest_listing_chunks_is_answer_invalid(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    body = body_of(inline_answer(ledger, txid))
    body.answer_manifest.chunk_digests.append(b"\x02" * 32)
    assert ledger.one(signed(body, ledger.net.nodes["pboc"])[0]) == qb.CODE_ANSWER_INVALID


# -- answers in chunks --------------------------------------------------------------

def _three_chunks(led: Ledger, query_tx: bytes) -> list[Chunk]:
    parts = [ACCOUNT_ROWS[0:2], ACCOUNT_ROWS[2:4], ACCOUNT_ROWS[4:]]
    return [chunk(led, query_tx, i, rows) for i, rows in enumerate(parts)]


def test_chunked_answer_is_answered_and_opens_to_the_rows_for_the_requester(
        ledger: Ledger) -> None:
    txid = committed_query(ledger)
    chunks = _three_chunks(ledger, txid)
    assert ledger.block(chunks[0].envelope, chunks[1].envelope) == ("OK", "OK")
    assert ledger.one(chunks[2].envelope) == "OK"
    assert ledger.record(txid).status == qb.STATUS_OPEN  # no answer before its manifest
    manifest = manifest_for(ledger, txid, chunks, len(ACCOUNT_ROWS))
    assert ledger.one(manifest) == RESULT_OK
    rec = ledger.record(txid)
    assert (rec.status, rec.chunk_count, rec.row_count) == (qb.STATUS_ANSWERED, 3, 5)
    assert rec.chunks == {i: (c.tx_id, bytes(c.sealed.commitment))
                          for i, c in enumerate(chunks)}
    # the requester opens every chunk as committed in the store
    store = ledger.applier.store
    opened_envs = [open_envelope(raw, ledger.net.chain_id)
                   for h in range(1, store.height + 1) for raw in store.envelopes(h)]
    stored = {env.tx_id: env for env in opened_envs}
    opened = []
    for i, c in enumerate(chunks):
        sealed = stored[c.tx_id].body.answer_chunk.sealed
        plaintext, salt = open_sealed(sealed, ledger.net.data_keys["tax"],
                                      chain_id=ledger.net.chain_id, context_tx_id=txid, chunk=i)
        assert verify_reveal(sealed, salt, plaintext)
        opened.append(plaintext)
    assert b"".join(opened) == canonical_json_lines(ACCOUNT_ROWS)
    committed = stored[tx_id(ledger_pb2.Envelope.FromString(manifest).body)]
    assert bytes(committed.body.answer_manifest.commitment) == qb.chunks_commitment(
        bytes(stored[c.tx_id].body.answer_chunk.sealed.commitment) for c in chunks)


def _unknown_chunk(led: Ledger, query_tx: bytes, chunks: list[Chunk]) -> bytes:
    ids = [c.tx_id for c in chunks]
    ids[1] = b"\x05" * 32
    return chunked_manifest(led, query_tx, ids, [bytes(c.sealed.commitment) for c in chunks], 5)


def _wrong_order(led: Ledger, query_tx: bytes, chunks: list[Chunk]) -> bytes:
    swapped = [chunks[1], chunks[0], chunks[2]]
    return manifest_for(led, query_tx, swapped, 5)


def _wrong_commitment(led: Ledger, query_tx: bytes, chunks: list[Chunk]) -> bytes:
    return chunked_manifest(led, query_tx, [c.tx_id for c in chunks],
                            [bytes(c.sealed.commitment) for c in reversed(chunks)], 5)


def _missing_last_chunk(led: Ledger, query_tx: bytes, chunks: list[Chunk]) -> bytes:
    extra = chunk(led, query_tx, 3, [{"account_no": "x"}])  # sealed, never committed
    return manifest_for(led, query_tx, [*chunks, extra], 6)


def _count_differs_from_digests(led: Ledger, query_tx: bytes, chunks: list[Chunk]) -> bytes:
    body = body_of(manifest_for(led, query_tx, chunks, 5))
    body.answer_manifest.chunk_count = 4
    return signed(body, led.net.nodes["pboc"])[0]


def _row_limit(led: Ledger, query_tx: bytes, chunks: list[Chunk]) -> bytes:
    return manifest_for(led, query_tx, chunks, ROW_LIMIT_RECORDS + 1)


@pytest.mark.parametrize("bad_manifest", [_unknown_chunk, _wrong_order, _wrong_commitment,
                                          _missing_last_chunk, _count_differs_from_digests,
                                          _row_limit],
                         ids=lambda f: f.__name__.strip("_"))
def test_manifest_not_matching_the_committed_chunks_is_answer_invalid(
        ledger: Ledger, bad_manifest: Callable[[Ledger, bytes, list[Chunk]], bytes]) -> None:
    txid = committed_query(ledger)
    chunks = _three_chunks(ledger, txid)
    assert ledger.block(*(c.envelope for c in chunks)) == ("OK", "OK", "OK")
    assert ledger.one(bad_manifest(ledger, txid, chunks)) == qb.CODE_ANSWER_INVALID
    assert ledger.record(txid).status == qb.STATUS_OPEN
    assert ledger.one(manifest_for(ledger, txid, chunks, 5)) == RESULT_OK


def test_one_chunk_manifest_the_ledger_accepts_is_readable_by_the_requester(
        ledger: Ledger) -> None:
    txid = committed_query(ledger)
    only = chunk(ledger, txid, 0, ACCOUNT_ROWS)
    assert ledger.one(only.envelope) == RESULT_OK
    code = ledger.one(manifest_for(ledger, txid, [only], len(ACCOUNT_ROWS)))
    if code != RESULT_OK:
        return  # the ledger refusing it is as good as the reader accepting it
    plaintext, salt = open_sealed(only.sealed, ledger.net.data_keys["tax"],
                                  chain_id=ledger.net.chain_id, context_tx_id=txid, chunk=0)
    manifest = body_of(ledger.applier.store.envelopes(ledger.applier.store.height)[0])
    view = node_pb2.AnswerView(
        query=node_pb2.QueryView(row_count=len(ACCOUNT_ROWS)),
        commitment=manifest.answer_manifest.commitment,
        chunks=[node_pb2.OpenedChunk(tx_id=only.tx_id, index=0, plaintext=plaintext, salt=salt,
                                     commitment=only.sealed.commitment)])
    assert len(read_answer(view).rows) == len(ACCOUNT_ROWS)


def test_duplicate_chunk_index_is_answer_invalid(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    first = chunk(ledger, txid, 0, ACCOUNT_ROWS[:2])
    again = chunk(ledger, txid, 0, ACCOUNT_ROWS[2:])
    assert ledger.one(first.envelope) == RESULT_OK
    assert ledger.one(again.envelope) == qb.CODE_ANSWER_INVALID
    same_block = chunk(ledger, txid, 1, ACCOUNT_ROWS[2:])
    other = chunk(ledger, txid, 1, ACCOUNT_ROWS[3:])
    assert ledger.block(same_block.envelope, other.envelope) == ("OK", qb.CODE_ANSWER_INVALID)
    assert ledger.record(txid).chunks == {0: (first.tx_id, bytes(first.sealed.commitment)),
                                          1: (same_block.tx_id,
                                              bytes(same_block.sealed.commitment))}


@pytest.mark.parametrize("to", [("customs",), ("tax", "customs")])
def test_chunk_sealed_to_anyone_but_the_requester_is_answer_invalid(
        ledger: Ledger, to: tuple[str, ...]) -> None:
    txid = committed_query(ledger)
    assert ledger.one(chunk(ledger, txid, 0, ACCOUNT_ROWS, to=to).envelope) == \
        qb.CODE_ANSWER_INVALID
    assert ledger.record(txid).chunks == {}


def test_chunk_index_beyond_the_chunk_limit_is_answer_invalid(ledger: Ledger) -> None:
    txid = committed_query(ledger)
    assert ledger.one(chunk(ledger, txid, qb.CHUNKS_MAX, ACCOUNT_ROWS).envelope) == \
        qb.CODE_ANSWER_INVALID


@pytest.mark.parametrize("outcome", ["chunked", "inline", "refusal"])
def test_chunk_after_the_outcome_is_already_answered(ledger: Ledger, outcome: str) -> None:
    txid = committed_query(ledger)
    if outcome == "chunked":
        chunks = _three_chunks(ledger, txid)
        assert ledger.block(*(c.envelope for c in chunks)) == ("OK",) * 3
        assert ledger.one(manifest_for(ledger, txid, chunks, 5)) == RESULT_OK
    elif outcome == "inline":
        assert ledger.one(inline_answer(ledger, txid)) == RESULT_OK
    else:
        assert ledger.one(refusal(ledger, txid)) == RESULT_OK
    late = chunk(ledger, txid, 3, ACCOUNT_ROWS)
    assert ledger.one(late.envelope) == qb.CODE_ALREADY_ANSWERED
    assert 3 not in ledger.record(txid).chunks


# -- need to know -------------------------------------------------------------------

def test_only_the_requester_opens_the_answer_and_can_reveal_it(ledger: Ledger) -> None:
    net = ledger.net
    txid = committed_query(ledger)
    answer = inline_answer(ledger, txid, ACCOUNT_ROWS)
    assert ledger.one(answer) == RESULT_OK
    (raw,) = ledger.applier.store.envelopes(ledger.applier.store.height)
    manifest = open_envelope(raw, net.chain_id).body.answer_manifest
    context = dict(chain_id=net.chain_id, context_tx_id=txid, chunk=0)
    for other in ("customs", "police", "pboc"):
        with pytest.raises(NotARecipient):
            open_sealed(manifest.inline_chunk, net.data_keys[other], **context)  # type: ignore[arg-type]
    plaintext, salt = open_sealed(manifest.inline_chunk, net.data_keys["tax"], **context)  # type: ignore[arg-type]
    assert plaintext == canonical_json_lines(ACCOUNT_ROWS)
    committed = bytes(manifest.commitment)
    assert verify_reveal(committed, salt, plaintext)
    assert not verify_reveal(committed, salt, plaintext.replace(b"ICBC", b"BOC!"))
    assert not verify_reveal(committed, bytes(32), plaintext)  # the salt is part of it
    # the commitment of a short answer cannot be guessed without the salt
    assert committed != hashlib.sha256(plaintext).digest()


# -- rate limit ---------------------------------------------------------------------

def _rate_policy(led: Ledger, rate_per_hour: int) -> bytes:
    """pboc/accounts version 2: tax's analysts may ask `rate_per_hour` queries an hour."""
    current = led.applier.policies.get("pboc", "accounts")
    assert current is not None
    policy = ledger_pb2.Policy()
    policy.CopyFrom(current)
    policy.version += 1
    for grant in policy.grants:
        if grant.requester_agency == "tax":
            grant.rate_per_hour = rate_per_hour
    body = new_body(led.net.chain_id, "pboc", led.now_ms)
    body.policy.CopyFrom(policy)
    return signed(body, led.net.supervisors["pboc"])[0]


def test_third_query_within_an_hour_is_rate_limited_and_allowed_an_hour_later(
        ledger: Ledger) -> None:
    assert ledger.one(_rate_policy(ledger, 2)) == RESULT_OK
    start = ledger.now_ms
    txs = [committed_query(ledger, at_ms=start + i * 60_000) for i in range(3)]
    decisions = [(ledger.record(t).allowed, ledger.record(t).decision_code) for t in txs]
    assert decisions == [(True, ""), (True, ""), (False, RATE_LIMITED)]
    assert ledger.record(txs[0]).policy_version == 2
    # another analyst of tax, or the same one asking another agency, is not counted
    other = committed_query(ledger, key=ledger.net.supervisors["tax"], subject="supervisor-1")
    assert ledger.record(other).allowed
    customs = committed_query(ledger, target="customs", dataset="declarations")
    assert ledger.record(customs).allowed
    # the rate-limited query is recorded, and its refusal is the target's to sign
    assert ledger.one(inline_answer(ledger, txs[2])) == qb.CODE_ANSWER_NOT_ALLOWED
    assert ledger.one(refusal(ledger, txs[2], code=RATE_LIMITED)) == RESULT_OK
    # an hour after the first two, the window has room again
    later = committed_query(ledger, at_ms=start + 60_000 + HOUR_MS)
    assert ledger.record(later).allowed


def test_an_analyst_with_two_credentials_has_one_quota(ledger: Ledger) -> None:
    from exchange.identity.genesis import issue_credential
    from exchange.identity.keys import SigningKey

    net = ledger.net
    second = CachedSigner(SigningKey.generate())
    cred = issue_credential(net.chain_id, "tax", "analyst-1", second.public_key, ["analyst"],
                            ledger.now_ms - 1000, ledger.now_ms + HOUR_MS * 24,
                            net.roots["tax"])
    issue = new_body(net.chain_id, "tax", ledger.now_ms)
    issue.credential_issue.signed_credential = cred.SerializeToString(deterministic=True)
    assert ledger.one(signed(issue, net.supervisors["tax"])[0]) == RESULT_OK
    assert ledger.one(_rate_policy(ledger, 2)) == RESULT_OK
    first = committed_query(ledger)
    renewed = committed_query(ledger, key=second)
    third = committed_query(ledger, key=second)
    assert [ledger.record(t).decision_code for t in (first, renewed, third)] == [
        "", "", RATE_LIMITED]


def test_rate_limited_queries_count_toward_the_window(ledger: Ledger) -> None:
    assert ledger.one(_rate_policy(ledger, 1)) == RESULT_OK
    start = ledger.now_ms
    first = committed_query(ledger, at_ms=start)
    assert ledger.record(first).allowed
    ledger.now_ms = start + HOUR_MS - 1
    just_before = committed_query(ledger)
    assert ledger.record(just_before).decision_code == RATE_LIMITED
    ledger.now_ms = start + HOUR_MS
    # the first has left the window, the rate-limited one at HOUR_MS - 1 has not
    exactly = committed_query(ledger)
    assert ledger.record(exactly).decision_code == RATE_LIMITED


# -- determinism --------------------------------------------------------------------

def _mixed_history(led: Ledger) -> None:
    """A chain holding every kind of valid and invalid query, answer, chunk and refusal."""
    net = led.net
    assert led.one(_rate_policy(led, 2)) == RESULT_OK
    start = led.now_ms
    q_inline, q_chunked, q_refused, q_limited = (committed_query(led) for _ in range(4))
    # tax's analyst's third and fourth queries to pboc within the hour
    assert [led.record(q).decision_code for q in (q_inline, q_chunked, q_refused, q_limited)
            ] == ["", "", RATE_LIMITED, RATE_LIMITED]
    q_police = committed_query(led, target="police", dataset="records",
                               cosigners=[net.supervisors["tax"]])
    q_denied = committed_query(led, target="police", dataset="records")
    q_expiring = committed_query(led, target="customs", dataset="declarations",
                                 deadline_s=60)
    q_open = committed_query(led, target="customs", dataset="declarations",
                             key=net.supervisors["tax"], subject="supervisor-1",
                             deadline_s=7 * 86_400)
    bad_query, _ = query(led, mutate=_set("target_agency", "tax"))
    chunks = _three_chunks(led, q_chunked)
    codes = led.block(
        bad_query, inline_answer(led, q_inline), inline_answer(led, q_inline),
        chunks[0].envelope, chunks[1].envelope, chunk(led, q_chunked, 1, [{}]).envelope,
        refusal(led, q_refused), inline_answer(led, q_refused),
        inline_answer(led, q_police, [{"record_id": "R-7"}], by="police"),
        inline_answer(led, q_denied, [{"record_id": "R-7"}], by="police"),
        refusal(led, q_denied, by="police", code=COSIGNATURE_REQUIRED),
        refusal(led, q_limited, code=RATE_LIMITED),
        inline_answer(led, q_open, by="pboc"),
        inline_answer(led, q_open, by="customs", to=("customs",)),
        inline_answer(led, b"\x07" * 32),
    )
    assert codes == (qb.CODE_QUERY_INVALID, "OK", qb.CODE_ALREADY_ANSWERED, "OK", "OK",
                     qb.CODE_ANSWER_INVALID, "OK", qb.CODE_ALREADY_ANSWERED, "OK",
                     qb.CODE_ANSWER_NOT_ALLOWED, "OK", "OK", qb.CODE_NOT_ANSWERER,
                     qb.CODE_ANSWER_INVALID, qb.CODE_NO_SUCH_QUERY)
    assert led.one(_wrong_order(led, q_chunked, chunks)) == qb.CODE_ANSWER_INVALID
    assert led.one(chunks[2].envelope) == RESULT_OK
    assert led.one(manifest_for(led, q_chunked, chunks, 5)) == RESULT_OK
    assert led.one(chunk(led, q_chunked, 3, [{}]).envelope) == qb.CODE_ALREADY_ANSWERED
    late = start + 61_000
    assert led.one(inline_answer(led, q_expiring, by="customs", at_ms=late),
                   at_ms=late) == qb.CODE_QUERY_EXPIRED
    # an hour on: allowed again
    later = committed_query(led, at_ms=start + HOUR_MS + 1)
    assert led.record(later).allowed


def test_restart_replay_and_verify_reproduce_every_query_record(ledger: Ledger) -> None:
    led = ledger
    _mixed_history(led)
    store = led.applier.store
    restarted = LedgerApplier(store)
    assert restarted.queries.queries == led.applier.queries.queries
    assert list(restarted.queries.queries) == list(led.applier.queries.queries)  # same order
    statuses = {r.status_at(led.now_ms) for r in led.applier.queries.queries.values()}
    assert statuses == {qb.STATUS_ANSWERED, qb.STATUS_REFUSED, qb.STATUS_EXPIRED,
                        qb.STATUS_OPEN}
    invalid = sum(1 for h in range(1, store.height + 1) for c in store.results(h) if c != "OK")
    assert invalid == 11  # every code of _mixed_history that is not OK
    report = verify_store(store)
    assert report.ok, report.error
    assert report.invalid_transactions == invalid
    # the restarted node carries the rate window on: within the hour of `later`, one
    # more query is allowed and the next one is not
    led.applier = restarted
    assert led.record(committed_query(led)).allowed
    assert led.record(committed_query(led)).decision_code == RATE_LIMITED
    assert verify_store(store).ok


# -- property: exactly one outcome ---------------------------------------------------

@dataclass
class Pool:
    """A query and every outcome transaction its target's node (or others) might send."""

    led: Ledger
    query: bytes
    query_tx: bytes
    deadline_ms: int
    outcomes: dict[str, bytes]  # name -> envelope
    chunk_names: tuple[str, ...]


OUTCOME_NAMES = ("answer_a", "answer_b", "refusal_a", "refusal_b", "chunk_0", "chunk_1",
                 "chunk_0_again", "manifest", "foreign_answer", "bad_answer")
ANSWERS = ("answer_a", "answer_b", "manifest")
REFUSALS = ("refusal_a", "refusal_b")


@pytest.fixture(scope="module")
def pool(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    led = _ledger(net, tmp_path_factory.mktemp("pool") / "unused.db")
    envelope, txid = query(led, deadline_s=60)
    chunks = [chunk(led, txid, i, rows) for i, rows in enumerate(
        (ACCOUNT_ROWS[:3], ACCOUNT_ROWS[3:]))]
    outcomes = {
        "answer_a": inline_answer(led, txid, ACCOUNT_ROWS[:1]),
        "answer_b": inline_answer(led, txid, ACCOUNT_ROWS[1:]),
        "refusal_a": refusal(led, txid, code="NO_RECORDS"),
        "refusal_b": refusal(led, txid, code="UNAVAILABLE"),
        "chunk_0": chunks[0].envelope,
        "chunk_1": chunks[1].envelope,
        "chunk_0_again": chunk(led, txid, 0, ACCOUNT_ROWS[:2]).envelope,
        "manifest": manifest_for(led, txid, chunks, 5),
        "foreign_answer": inline_answer(led, txid, by="customs"),
        "bad_answer": inline_answer(led, txid, to=("customs",)),
    }
    led.applier.store.close()
    yield Pool(led, envelope, txid, led.now_ms + 60_000, outcomes, ("chunk_0", "chunk_1"))


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(OUTCOME_NAMES).flatmap(
           lambda names: st.tuples(st.just(names), st.integers(0, len(names)))),
       cuts=st.lists(st.booleans(), min_size=len(OUTCOME_NAMES), max_size=len(OUTCOME_NAMES)),
       late_at=st.integers(0, len(OUTCOME_NAMES)))
def test_any_order_of_outcomes_leaves_exactly_one_outcome(
        pool: Pool, order: tuple[Sequence[str], int], cuts: list[bool], late_at: int) -> None:
    names, count = order
    names = list(names[:count])
    led = pool.led
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        store = BlockStore.create(Path(tmp) / "s.db", led.net.signed_genesis)
        led.applier = LedgerApplier(store)
        start = pool.deadline_ms - 60_000
        assert led.one(pool.query, at_ms=start) == RESULT_OK
        # split into blocks where `cuts` says; blocks from `late_at` on are past the deadline
        blocks: list[list[str]] = []
        for i, name in enumerate(names):
            if not blocks or cuts[i]:
                blocks.append([])
            blocks[-1].append(name)
        code_of: dict[str, str] = {}
        for b, group in enumerate(blocks):
            at = pool.deadline_ms + 1 + b if b >= late_at else start + 1 + b
            codes = led.block(*(pool.outcomes[n] for n in group), at_ms=at)
            code_of.update(zip(group, codes, strict=True))
        rec = led.record(pool.query_tx)
        ok = [n for n in names if code_of[n] == RESULT_OK]
        outcomes_ok = [n for n in ok if n in ANSWERS + REFUSALS]
        assert len(outcomes_ok) <= 1
        status = rec.status_at(led.now_ms)
        if not outcomes_ok:
            assert status in (qb.STATUS_OPEN, qb.STATUS_EXPIRED)
            assert rec.outcome_tx_id == b""
        else:
            (winner,) = outcomes_ok
            assert status == (qb.STATUS_ANSWERED if winner in ANSWERS else qb.STATUS_REFUSED)
            assert rec.outcome_tx_id == tx_id(
                ledger_pb2.Envelope.FromString(pool.outcomes[winner]).body)
            # nothing of the query is valid after its outcome
            assert all(code_of[n] != RESULT_OK for n in names[names.index(winner) + 1:])
        if "manifest" in outcomes_ok:
            before = names[:names.index("manifest")]
            assert all(code_of.get(c) == RESULT_OK for c in pool.chunk_names)
            assert all(c in before for c in pool.chunk_names)
        assert code_of.get("foreign_answer", qb.CODE_NOT_ANSWERER) == qb.CODE_NOT_ANSWERER
        assert code_of.get("bad_answer") != RESULT_OK
        assert not ("chunk_0" in ok and "chunk_0_again" in ok)
        # a restarted node and the offline verifier agree
        assert LedgerApplier(store).queries.queries == led.applier.queries.queries
        assert verify_store(store).ok
        store.close()
