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
from dataclasses import dataclass, field

from exchange.errors import CredentialInvalid
from exchange.identity.registry import ROLE_NODE, ROLE_ROOT, KeyInfo
from exchange.ledger.block import OpenedEnvelope
from exchange.ledger.queries import STATUS_ANSWERED, QueryBook, Rejected
from exchange.ledger.sealing import check_sealed_form
from exchange.v1 import ledger_pb2

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


@dataclass
class FindingsBook:
    queries: QueryBook
    rules: dict[bytes, RuleRecord] = field(default_factory=dict)  # by digest
    runs: dict[bytes, FindingsRecord] = field(default_factory=dict)  # by tx id
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

    def record(self, env: OpenedEnvelope, signer: KeyInfo, height: int, time_ms: int) -> None:
        f = env.body.findings
        owner = env.body.agency
        if not (signer.subject == ROLE_NODE or RUN_ROLES & set(signer.roles)):
            raise Rejected(CODE_FINDINGS_INVALID, "findings are signed by the owner's "
                                                  "automation or node")
        rule = self.rules.get(bytes(f.rule_digest))
        if rule is None or rule.owner != owner or rule.rule_id != f.rule_id:
            raise Rejected(CODE_FINDINGS_INVALID, f"{owner} registered no rule "
                                                  f"{f.rule_id} with that digest")
        if len(f.output_digest) != 32 or len(f.input_tx_ids) > INPUTS_MAX:
            raise Rejected(CODE_FINDINGS_INVALID, "output digest or inputs malformed")
        if f.finding_count != len(f.findings) or f.finding_count > FINDINGS_MAX:
            raise Rejected(CODE_FINDINGS_INVALID, "finding count differs from the summaries")
        inputs = [bytes(t) for t in f.input_tx_ids]
        for qid in inputs:
            rec = self.queries.get(qid)
            if rec is None or rec.requester != owner or rec.status != STATUS_ANSWERED or \
                    rec.on_behalf_of != f.rule_digest.hex():
                raise Rejected(CODE_FINDINGS_INVALID, f"input {qid.hex()} is not an answered "
                                                      f"query of {owner} for this rule")
        if not f.HasField("sealed_output"):
            raise Rejected(CODE_FINDINGS_INVALID, "findings carry their sealed output")
        try:
            check_sealed_form(f.sealed_output)
        except Exception as exc:  # noqa: BLE001 - any malformation is a rejection
            raise Rejected(CODE_FINDINGS_INVALID, f"sealed output: {exc}") from exc
        parties = {owner} | {self.queries.queries[q].target for q in inputs}
        registry = self.queries.registry
        recipients = {bytes(w.recipient_key_id) for w in f.sealed_output.recipients}
        try:
            registry.check_recipients(recipients, "the findings")
        except CredentialInvalid as exc:
            raise Rejected(CODE_FINDINGS_INVALID, str(exc)) from exc
        # any data key of the parties not compromised (one may rotate while a run is in
        # flight), the owner's among them
        allowed = set().union(*(registry.agency_data_key_ids(a) for a in parties))
        if not recipients & registry.agency_data_key_ids(owner) or not recipients <= allowed:
            raise Rejected(CODE_FINDINGS_INVALID, "findings are sealed to their owner and at "
                                                  "most the agencies whose data they used")
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
                             f.finding_count, tuple(inputs),
                             tuple((s.finding_id, s.severity, bytes(s.digest))
                                   for s in f.findings), case_id=case_id)
        named = (owner, f.rule_id, f.period, case_id)
        self.runs[env.tx_id] = run  # before _latest: readers on other threads use both
        earlier = self._latest.get(named)
        if earlier is not None:
            self.runs[earlier].superseded_by = env.tx_id
        self._latest[named] = env.tx_id

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
