"""Registered rules and the findings of their runs, as ledger state (design decision 9).

A rule is registered by its owner (a supervisor or the root of the agency): the
registration carries the rule's canonical bytes and their digest, which must match. A
findings transaction is valid when it is signed by the owner's automation or node,
names a rule the owner registered, and every input it names is a query of the owner's,
made on behalf of that rule and answered, before the findings. A run is keyed by (rule
digest, period, digest of the inputs): the same run twice is invalid; a later run of the
same rule and period supersedes the earlier ones, by name. A run restricted to the
subjects of a case (a playbook's rule step: its parameters name the case) is named by
its case too, so it supersedes only earlier runs for that case, and there is one such run
per (rule version, period, case).

Pure: nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from exchange.errors import CredentialInvalid, StoreCorrupted
from exchange.identity.keys import DataKey, DataKeyring
from exchange.identity.registry import ROLE_NODE, ROLE_ROOT, KeyInfo
from exchange.ledger.block import OpenedEnvelope
from exchange.ledger.queries import CHUNKS_MAX, STATUS_ANSWERED, QueryBook, Rejected
from exchange.ledger.sealing import check_sealed_form, open_sealed
from exchange.v1 import ledger_pb2

if TYPE_CHECKING:
    from exchange.ledger.store import BlockStore

CODE_RULE_INVALID = "RULE_INVALID"
CODE_FINDINGS_INVALID = "FINDINGS_INVALID"
RULE_BYTES_MAX = 256 * 1024
FINDING_LABEL = b"exchange/v1/finding\0"
INPUTS_MAX = 1_000
FINDINGS_MAX = 1_000_000
REGISTER_ROLES = frozenset({"supervisor"})
RUN_ROLES = frozenset({"automation"})


def run_case(parameters: bytes) -> str:
    """The case a run is restricted to: the "case" of its parameters' JSON ("" for an
    ordinary run)."""
    try:
        doc = json.loads(parameters or b"{}")
    except (ValueError, UnicodeDecodeError):
        return ""
    case = doc.get("case") if isinstance(doc, dict) else None
    return case if isinstance(case, str) else ""


# An own input several of an owner's rules read (same dataset, period, fields, subjects)
# is committed once, on behalf of all of them: its Query.on_behalf_of lists their rule
# digests, hex, sorted, joined by this separator (a single digest as before).
RULE_DIGESTS_SEPARATOR = ","


def rule_digests_of(on_behalf_of: str) -> frozenset[str]:
    """The rule digests (hex) a query was asked on behalf of."""
    return frozenset(on_behalf_of.split(RULE_DIGESTS_SEPARATOR)) if on_behalf_of else frozenset()


def inputs_digest(input_tx_ids: list[bytes]) -> bytes:
    """The digest a run is keyed by: its inputs' tx ids, in the order named."""
    h = hashlib.sha256(b"exchange/v1/run-inputs\0")
    for tx in input_tx_ids:
        h.update(tx)
    return h.digest()


@dataclass
class RuleRecord:
    owner: str
    rule_id: str
    version: int
    digest: bytes
    canonical: bytes
    tx_id: bytes
    height: int


@dataclass
class FindingsRecord:
    tx_id: bytes
    height: int
    time_ms: int
    owner: str
    rule_id: str
    rule_digest: bytes
    period: str
    output_digest: bytes
    finding_count: int
    input_tx_ids: tuple[bytes, ...]
    summaries: tuple[tuple[str, str, bytes], ...]  # (finding id, severity, digest)
    superseded_by: bytes = b""
    case_id: str = ""  # a run restricted to a case's subjects
    chunk_tx_ids: tuple[bytes, ...] = ()  # a large run's output, in these chunks


@dataclass
class FindingsChunkRecord:
    """A committed part of a large run's output, waiting for (or used by) its run."""

    tx_id: bytes
    owner: str
    rule_digest: bytes
    period: str
    run_inputs_digest: bytes
    index: int
    summaries: tuple[tuple[str, str, bytes], ...]
    recipients: frozenset[bytes]
    used_by: bytes = b""  # the run that named it


@dataclass
class FindingsBook:
    queries: QueryBook
    rules: dict[bytes, RuleRecord] = field(default_factory=dict)  # by digest
    runs: dict[bytes, FindingsRecord] = field(default_factory=dict)  # by tx id
    chunks: dict[bytes, FindingsChunkRecord] = field(default_factory=dict)  # by tx id
    _keys: set[tuple[bytes, str, bytes]] = field(default_factory=set)
    _latest: dict[tuple[str, str, str, str], bytes] = field(default_factory=dict)

    def rule(self, digest: bytes) -> RuleRecord | None:
        return self.rules.get(bytes(digest))

    def register(self, env: OpenedEnvelope, signer: KeyInfo, height: int) -> None:
        reg = env.body.rule_registration
        if not (signer.subject == ROLE_ROOT or REGISTER_ROLES & set(signer.roles)):
            raise Rejected(CODE_RULE_INVALID, "a rule is registered by a supervisor or the "
                                              "root of its owner")
        if not reg.rule_id or not reg.canonical or len(reg.canonical) > RULE_BYTES_MAX:
            raise Rejected(CODE_RULE_INVALID, "a rule has an id and canonical bytes "
                                              f"(at most {RULE_BYTES_MAX})")
        digest = hashlib.sha256(bytes(reg.canonical)).digest()
        if bytes(reg.digest) != digest:
            raise Rejected(CODE_RULE_INVALID, "digest is not SHA-256 of the canonical bytes")
        if digest in self.rules:
            raise Rejected(CODE_RULE_INVALID, "this rule is already registered")
        for other in self.rules.values():
            if (other.owner, other.rule_id, other.version) == (env.body.agency, reg.rule_id,
                                                               reg.version):
                raise Rejected(CODE_RULE_INVALID, f"{reg.rule_id} version {reg.version} is "
                                                  "registered with other content")
        self.rules[digest] = RuleRecord(env.body.agency, reg.rule_id, reg.version, digest,
                                        bytes(reg.canonical), env.tx_id, height)

    def _check_runner(self, signer: KeyInfo, owner: str, rule_digest: bytes,
                      rule_id: str | None) -> None:
        if not (signer.subject == ROLE_NODE or RUN_ROLES & set(signer.roles)):
            raise Rejected(CODE_FINDINGS_INVALID, "findings are signed by the owner's "
                                                  "automation or node")
        rule = self.rules.get(bytes(rule_digest))
        if rule is None or rule.owner != owner or rule_id not in (None, rule.rule_id):
            raise Rejected(CODE_FINDINGS_INVALID, f"{owner} registered no rule "
                                                  f"{rule_id or ''} with that digest")

    def record_chunk(self, env: OpenedEnvelope, signer: KeyInfo) -> None:
        """A part of a large run's output, committed before the run names it."""
        c = env.body.findings_chunk
        owner = env.body.agency
        self._check_runner(signer, owner, bytes(c.rule_digest), None)
        if len(c.run_inputs_digest) != 32 or c.index >= CHUNKS_MAX or \
                len(c.findings) > FINDINGS_MAX:
            raise Rejected(CODE_FINDINGS_INVALID, "findings chunk: inputs digest, index or "
                                                  "size malformed")
        if not c.HasField("sealed_output"):
            raise Rejected(CODE_FINDINGS_INVALID, "a findings chunk carries its sealed output")
        try:
            check_sealed_form(c.sealed_output)
        except Exception as exc:  # noqa: BLE001 - any malformation is a rejection
            raise Rejected(CODE_FINDINGS_INVALID, f"sealed output: {exc}") from exc
        recipients = frozenset(bytes(w.recipient_key_id) for w in c.sealed_output.recipients)
        registry = self.queries.registry
        try:
            registry.check_recipients(set(recipients), "the findings")
        except CredentialInvalid as exc:
            raise Rejected(CODE_FINDINGS_INVALID, str(exc)) from exc
        if not recipients & registry.agency_data_key_ids(owner):
            raise Rejected(CODE_FINDINGS_INVALID, "findings are sealed to their owner")
        self.chunks[env.tx_id] = FindingsChunkRecord(
            env.tx_id, owner, bytes(c.rule_digest), c.period, bytes(c.run_inputs_digest),
            c.index, tuple((s.finding_id, s.severity, bytes(s.digest)) for s in c.findings),
            recipients)

    def record(self, env: OpenedEnvelope, signer: KeyInfo, height: int, time_ms: int) -> None:
        f = env.body.findings
        owner = env.body.agency
        self._check_runner(signer, owner, bytes(f.rule_digest), f.rule_id)
        if len(f.output_digest) != 32 or len(f.input_tx_ids) > INPUTS_MAX:
            raise Rejected(CODE_FINDINGS_INVALID, "output digest or inputs malformed")
        inputs = [bytes(t) for t in f.input_tx_ids]
        for qid in inputs:
            rec = self.queries.get(qid)
            if rec is None or rec.requester != owner or rec.status != STATUS_ANSWERED or \
                    f.rule_digest.hex() not in rule_digests_of(rec.on_behalf_of):
                raise Rejected(CODE_FINDINGS_INVALID, f"input {qid.hex()} is not an answered "
                                                      f"query of {owner} for this rule")
        parties = {owner} | {self.queries.queries[q].target for q in inputs}
        registry = self.queries.registry
        # any data key of the parties not compromised (one may rotate while a run is in
        # flight), the owner's among them
        allowed = set().union(*(registry.agency_data_key_ids(a) for a in parties))
        chunks = self._chunks_of(f, owner, inputs, allowed)
        if chunks:
            summaries = tuple(s for c in chunks for s in c.summaries)
        else:
            summaries = tuple((s.finding_id, s.severity, bytes(s.digest)) for s in f.findings)
            self._check_inline_output(f, owner, allowed)
        if f.finding_count != len(summaries) or f.finding_count > FINDINGS_MAX:
            raise Rejected(CODE_FINDINGS_INVALID, "finding count differs from the summaries")
        key = (bytes(f.rule_digest), f.period, inputs_digest(inputs))
        if key in self._keys:
            raise Rejected(CODE_FINDINGS_INVALID, "this run (rule, period, inputs) is "
                                                  "already on the ledger")
        case_id = run_case(bytes(f.parameters))
        scoped = (bytes(f.rule_digest), f.period, b"case\0" + case_id.encode())
        if case_id and scoped in self._keys:
            raise Rejected(CODE_FINDINGS_INVALID, f"this rule already ran for case {case_id} "
                                                  "and this period")
        self._keys.add(key)
        if case_id:
            self._keys.add(scoped)
        run = FindingsRecord(env.tx_id, height, time_ms, owner, f.rule_id,
                             bytes(f.rule_digest), f.period, bytes(f.output_digest),
                             f.finding_count, tuple(inputs), summaries, case_id=case_id,
                             chunk_tx_ids=tuple(c.tx_id for c in chunks))
        for c in chunks:
            c.used_by = env.tx_id
        named = (owner, f.rule_id, f.period, case_id)
        self.runs[env.tx_id] = run  # before _latest: readers on other threads use both
        earlier = self._latest.get(named)
        if earlier is not None:
            self.runs[earlier].superseded_by = env.tx_id
        self._latest[named] = env.tx_id

    def _check_inline_output(self, f: ledger_pb2.Findings, owner: str,
                             allowed: set[bytes]) -> None:
        if not f.HasField("sealed_output"):
            raise Rejected(CODE_FINDINGS_INVALID, "findings carry their sealed output")
        try:
            check_sealed_form(f.sealed_output)
        except Exception as exc:  # noqa: BLE001 - any malformation is a rejection
            raise Rejected(CODE_FINDINGS_INVALID, f"sealed output: {exc}") from exc
        recipients = {bytes(w.recipient_key_id) for w in f.sealed_output.recipients}
        self._check_recipients(frozenset(recipients), owner, allowed)

    def _check_recipients(self, recipients: frozenset[bytes], owner: str,
                          allowed: set[bytes]) -> None:
        """Sealed to the owner (a data key of it) and to no one but the run's parties, and
        to no compromised key."""
        registry = self.queries.registry
        try:
            registry.check_recipients(set(recipients), "the findings")
        except CredentialInvalid as exc:
            raise Rejected(CODE_FINDINGS_INVALID, str(exc)) from exc
        if not recipients & registry.agency_data_key_ids(owner) or not recipients <= allowed:
            raise Rejected(CODE_FINDINGS_INVALID, "findings are sealed to their owner and at "
                                                  "most the agencies whose data they used")

    def _chunks_of(self, f: ledger_pb2.Findings, owner: str, inputs: list[bytes],
                   allowed: set[bytes]) -> list[FindingsChunkRecord]:
        """The committed chunks a run names, each checked to be this run's, in order and
        not named by another run ([] for a run with its output inline)."""
        named = [bytes(t) for t in f.chunk_tx_ids]
        if not named:
            return []
        if f.findings or f.HasField("sealed_output") or len(named) > CHUNKS_MAX:
            raise Rejected(CODE_FINDINGS_INVALID, "a run with chunks carries its output in "
                                                  f"them alone (at most {CHUNKS_MAX})")
        digest = inputs_digest(inputs)
        chunks = []
        for index, tx in enumerate(named):
            c = self.chunks.get(tx)
            if c is None or c.used_by or c.index != index or c.owner != owner or \
                    c.rule_digest != bytes(f.rule_digest) or c.period != f.period or \
                    c.run_inputs_digest != digest:
                raise Rejected(CODE_FINDINGS_INVALID, f"chunk {index} ({tx.hex()}) is not an "
                                                      "unused chunk of this run at its place")
            self._check_recipients(c.recipients, owner, allowed)
            chunks.append(c)
        return chunks

    def latest(self) -> list[FindingsRecord]:
        """The runs in force (not superseded), oldest first."""
        return [self.runs[tx] for tx in list(self._latest.values())]


def summary_of(finding_id: str, severity: str, line: bytes,
               salt: bytes = b"") -> ledger_pb2.FindingSummary:
    """A finding's clear summary. Its digest is salted with the sealed output's salt
    (revealed with the output), so a finding about a guessable subject cannot be
    confirmed from its digest by agencies that may not read it."""
    return ledger_pb2.FindingSummary(
        finding_id=finding_id, severity=severity,
        digest=hashlib.sha256(FINDING_LABEL + salt + line).digest())


CODE_CASE_INVALID = "CASE_INVALID"
CASE_ID_CHARS_MAX = 64
# notify: a note to the case's followers (watch, webhooks), by the agency that opened it
CASE_ACTIONS = ("open", "add", "close", "notify")
CASE_ROLES = frozenset({"analyst", "supervisor", "automation"})


@dataclass
class CaseRecord:
    case_id: str
    agency: str  # the agency that opened it
    opened_height: int
    status: str = "open"
    # (findings run tx id, finding id) or (tx id, "") for another transaction
    refs: list[tuple[bytes, str]] = field(default_factory=list)
    events: list[bytes] = field(default_factory=list)


@dataclass
class CaseBook:
    """Cases opened on the ledger, and the findings and transactions added to them."""

    findings: FindingsBook
    cases: dict[str, CaseRecord] = field(default_factory=dict)

    def judge_event(self, env: OpenedEnvelope, signer: KeyInfo, height: int) -> None:
        ev = env.body.case_event
        agency = env.body.agency
        if not (CASE_ROLES & set(signer.roles) or signer.subject == ROLE_NODE):
            raise Rejected(CODE_CASE_INVALID, "cases are opened by analysts, supervisors, "
                                              "automations or nodes")
        if not ev.case_id or len(ev.case_id) > CASE_ID_CHARS_MAX:
            raise Rejected(CODE_CASE_INVALID, f"a case id has 1..{CASE_ID_CHARS_MAX} chars")
        if ev.action not in CASE_ACTIONS:
            raise Rejected(CODE_CASE_INVALID, f"action is one of {', '.join(CASE_ACTIONS)}")
        case = self.cases.get(ev.case_id)
        if ev.action == "open" and case is not None:
            raise Rejected(CODE_CASE_INVALID, f"case {ev.case_id} is already open")
        if ev.action != "open" and (case is None or case.status != "open"):
            raise Rejected(CODE_CASE_INVALID, f"case {ev.case_id} is not open")
        if ev.action in ("close", "notify") and case is not None and case.agency != agency:
            raise Rejected(CODE_CASE_INVALID, f"only {case.agency}, which opened case "
                                              f"{ev.case_id}, {ev.action}s on it")
        if ev.action == "add" and case is not None and case.agency != agency and \
                not ev.finding_id:
            raise Rejected(CODE_CASE_INVALID, f"only {case.agency} adds transactions to case "
                                              f"{ev.case_id}; other agencies add findings "
                                              "they gave data to")
        ref: tuple[bytes, str] | None = None
        if ev.finding_id:
            run = self.findings.runs.get(bytes(ev.ref_tx_id))
            if run is None or ev.finding_id not in {f for f, _, _ in run.summaries}:
                raise Rejected(CODE_CASE_INVALID, f"no finding {ev.finding_id} in run "
                                                  f"{bytes(ev.ref_tx_id).hex()}")
            readers = {run.owner} | {self.findings.queries.queries[q].target
                                     for q in run.input_tx_ids}
            if agency not in readers:
                raise Rejected(CODE_CASE_INVALID, f"{agency} neither owns the finding nor "
                                                  "gave data to it")
            ref = (run.tx_id, ev.finding_id)
        elif ev.ref_tx_id:
            rec = self.findings.queries.get(bytes(ev.ref_tx_id))
            if rec is None or agency not in (rec.requester, rec.target):
                raise Rejected(CODE_CASE_INVALID, "a case refers to a finding, or to a query "
                                                  "of the agency's own")
            ref = (bytes(ev.ref_tx_id), "")
        if ev.action == "open":
            case = self.cases[ev.case_id] = CaseRecord(ev.case_id, agency, height)
        assert case is not None
        if ev.action == "close":
            case.status = "closed"
        if ref is not None:
            case.refs.append(ref)
        case.events.append(env.tx_id)


def output_parts(f: ledger_pb2.Findings,
                 chunk_of: Callable[[bytes], ledger_pb2.FindingsChunk | None]
                 ) -> Iterator[tuple[int, ledger_pb2.SealedPayload]]:
    """A run's sealed output, part by part: (chunk index, sealed payload), the inline
    output as chunk 0 or each named chunk's (`chunk_of` reads a FindingsChunk by tx id;
    StoreCorrupted if one is missing)."""
    if not f.chunk_tx_ids:
        yield 0, f.sealed_output
        return
    for index, tx in enumerate(f.chunk_tx_ids):
        chunk = chunk_of(bytes(tx))
        if chunk is None:
            raise StoreCorrupted(f"findings chunk {bytes(tx).hex()} is not in the store")
        yield index, chunk.sealed_output


def open_output(f: ledger_pb2.Findings, data_key: DataKey | DataKeyring, chain_id: str,
                chunk_of: Callable[[bytes], ledger_pb2.FindingsChunk | None]
                ) -> Iterator[tuple[int, bytes, bytes]]:
    """Each part of a run's output opened with `data_key`: (chunk index, plaintext,
    salt). An ExchangeError from the first part means the key is not a recipient."""
    context = inputs_digest([bytes(t) for t in f.input_tx_ids])
    for index, sealed in output_parts(f, chunk_of):
        plaintext, salt = open_sealed(sealed, data_key, chain_id=chain_id,
                                      context_tx_id=context, chunk=index)
        yield index, plaintext, salt


def findings_chunk_reader(store: BlockStore, chain_id: str
                          ) -> Callable[[bytes], ledger_pb2.FindingsChunk | None]:
    """`chunk_of` for output_parts, reading a store's transactions."""
    from exchange.ledger.block import open_envelope

    def chunk_of(tx: bytes) -> ledger_pb2.FindingsChunk | None:
        stored = store.tx(tx)
        if stored is None:
            return None
        body = open_envelope(stored.envelope, chain_id).body
        return body.findings_chunk if body.WhichOneof("kind") == "findings_chunk" else None

    return chunk_of
