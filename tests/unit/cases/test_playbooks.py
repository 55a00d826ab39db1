"""Playbooks (issue 10): the file format, checked as strictly as rule files (a bad file is
named by its line); the ledger's rules for registering playbooks and accepting each of
their steps once per finding and playbook version; the case graph built from answers;
and the events a block makes for `exchange watch` and webhooks."""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from agents import AGENCIES
from agents.common import checks
from exchange.cases.graph import COUNTERPARTY, HOLDS, INVOICED, LEGAL_REP, build_graph
from exchange.cases.playbooks import (
    CaseStep,
    NotifyStep,
    PlaybookError,
    QueryStep,
    RuleStep,
    load_playbook,
    load_playbook_bytes,
    load_playbooks,
)
from exchange.client import Signer
from exchange.client.crossquery import QuerySpec, build_query
from exchange.errors import MalformedInput
from exchange.identity.default_policies import default_policies
from exchange.identity.genesis import verify_genesis
from exchange.identity.keys import CachedSigner
from exchange.ledger import playbooks as pb
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import RESULT_OK, new_body, seal_envelope, tx_id
from exchange.ledger.case_export import case_tx_ids
from exchange.ledger.findings import inputs_digest, summary_of
from exchange.ledger.policy import COSIGNATURE_REQUIRED
from exchange.ledger.sealing import canonical_json, canonical_json_lines, seal
from exchange.ledger.store import BlockStore
from exchange.v1 import identity_pb2, ledger_pb2
from tests.support.ledger_net import Net, make_net

SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


def _uscc(n: int) -> str:
    body = f"91440300{n:08d}0"
    return body + checks.uscc_check_char(body)


def _person(n: int) -> str:
    body = f"44030519800101{n:03d}"
    return next(body + c for c in "0123456789X" if checks.is_valid_person_id(body + c))


USCC = _uscc(42)
PERSON = _person(7)

# -- the file format ----------------------------------------------------------------------

BASE = """\
# A playbook for the tests.
id: test-follow-up
version: 3
owner: tax
description: >
  Open a case for a rebate finding and ask around.
trigger:
  rules: [export-rebate-without-exports]
  severity_min: high
  amount_min: 100000
steps:
  - case: open
    prefix: TAX-T
    reason: rebates without exports
  - query: company
    agency: tax
    dataset: taxpayers
    subjects: [finding.uscc]
    fields: [uscc, name, legal_rep_id]
  - query: officer_records
    agency: police
    dataset: records
    subjects: [company.legal_rep_id]
  - query: accounts
    agency: pboc
    dataset: accounts
    subjects: [finding.uscc, company.legal_rep_id]
  - query: payments
    agency: pboc
    dataset: transactions
    subjects: [accounts.account_no]
    period: finding
  - rule: revenue-below-bank-inflows
    months: [0, -1]
  - notify: "Case {case} took {finding} ({severity})."
"""


def write(tmp: Path, text: str, name: str = "test-follow-up") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    for number, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in the text")


def test_the_base_playbook_reads_as_written(tmp_path: Path) -> None:
    p = load_playbook(write(tmp_path, BASE))
    assert (p.id, p.version, p.owner) == ("test-follow-up", 3, "tax")
    assert p.trigger.rules == ("export-rebate-without-exports",)
    assert p.trigger.amount_min == Decimal("100000.00") and not p.trigger.open_cases
    assert [type(s) for s in p.steps] == [CaseStep, QueryStep, QueryStep, QueryStep,
                                          QueryStep, RuleStep, NotifyStep]
    assert [p.step_key(i) for i in range(len(p.steps))] == [
        "0-case", "1-company", "2-officer_records", "3-accounts", "4-payments",
        "5-revenue-below-bank-inflows", "6-notify"]
    company, records, accounts, payments = (s for s in p.steps if isinstance(s, QueryStep))
    # keys: a column's own name where the target is looked up by it, else its kind
    assert [(r.key, r.text) for r in records.subjects] == [("person_id",
                                                             "company.legal_rep_id")]
    assert [(r.key, r.text) for r in accounts.subjects] == [
        ("uscc", "finding.uscc"), ("person_id", "company.legal_rep_id")]
    assert [(r.key, r.text) for r in payments.subjects] == [("account_no",
                                                              "accounts.account_no")]
    assert payments.period == "finding" and company.fields == ("uscc", "name", "legal_rep_id")
    rule = p.steps[5]
    assert isinstance(rule, RuleStep) and rule.months == (0, -1)
    # layout and comments change nothing; the canonical bytes are a playbook file too
    relaid = BASE.replace("# A playbook for the tests.\n", "").replace(
        "rules: [export-rebate-without-exports]",
        "rules:\n    - export-rebate-without-exports")
    assert load_playbook(write(tmp_path, relaid)).digest == p.digest
    again = load_playbook_bytes(p.canonical_bytes)
    assert again.canonical_bytes == p.canonical_bytes and again.digest == p.digest
    assert p.digest == hashlib.sha256(p.canonical_bytes).digest()


def test_the_reference_pack_has_a_playbook_for_each_reference_rule() -> None:
    taken = {}
    for agency in AGENCIES:
        for p in load_playbooks(agency):
            assert p.owner == agency
            assert load_playbook_bytes(p.canonical_bytes).digest == p.digest
            for rule in p.trigger.rules:
                taken[rule] = agency
            assert isinstance(p.steps[0], CaseStep)
            assert any(isinstance(s, QueryStep) for s in p.steps)
    assert taken == {"export-rebate-without-exports": "tax",
                     "revenue-below-bank-inflows": "tax", "import-undervaluation": "customs",
                     "payments-without-imports": "pboc",
                     "officer-with-police-record": "police", "invoice-ring": "tax",
                     "invoices-beyond-inflows": "tax",
                     "invoices-from-abnormal-issuers": "tax"}


@pytest.mark.parametrize(("old", "new", "needle", "message"), [
    ("version: 3", "version: 0", "version: 0", "between 1 and"),
    ("owner: tax", "owner: fbi", "owner: fbi", "not one of"),
    ("  severity_min: high", "  severity_min: urgent", "urgent", "not one of high"),
    ("  amount_min: 100000", "  amount_min: 12.345", "12.345", "at most two decimals"),
    ("  amount_min: 100000", "  amount_min: lots", "lots", "not an amount"),
    ("  rules: [export-rebate-without-exports]\n  severity_min: high\n  amount_min: 100000",
     "  severity_min: high", "severity_min", "name rules, or set open_cases"),
    ("  - case: open\n    prefix: TAX-T", "  - case: open\n    prefix: tax-t", "tax-t",
     "not upper-case"),
    ("  - case: open\n    prefix: TAX-T\n", "  - case: open\n", "- case: open", "needs a prefix"),
    ("    prefix: TAX-T", "    prefix: TAX-T\n    colour: red", "colour", "unknown key 'colour'"),
    ("  - query: officer_records", "  - query: company  # twice", "company  # twice",
     "the name is taken"),
    ("    agency: police", "    agency: interpol", "interpol", "not one of"),
    ("    dataset: records", "    dataset: mugshots", "mugshots", "offers no dataset"),
    ("    fields: [uscc, name, legal_rep_id]", "    fields: [uscc, name, shoe_size]",
     "shoe_size", "no column 'shoe_size'"),
    ("    subjects: [company.legal_rep_id]", "    subjects: [company.colour]",
     "company.colour", "has no column 'colour'"),
    ("    subjects: [company.legal_rep_id]", "    subjects: [payments.account_no]",
     "payments.account_no", "neither the finding nor an earlier query"),
    ("    subjects: [company.legal_rep_id]", "    subjects: [finding.amount]",
     "finding.amount", "a finding gives uscc and person_id"),
    ("    subjects: [company.legal_rep_id]", "    subjects: [company.name]",
     "company.name", "holds text values"),
    ("    subjects: [company.legal_rep_id]", "    subjects: [uscc=company.legal_rep_id]",
     "uscc=company", "not looked up by 'uscc'"),
    ("    subjects: [company.legal_rep_id]", "    subjects: []", "subjects: []",
     "subjects is empty"),
    ("    subjects: [company.legal_rep_id]", "    subjects: [just-text]", "just-text",
     "is not <source>.<column>"),
    ("    subjects: [accounts.account_no]\n    period: finding",
     "    subjects: [accounts.account_no]\n    period: always", "always", "not one of finding"),
    ("  - query: payments\n    agency: pboc\n    dataset: transactions\n"
     "    subjects: [accounts.account_no]\n    period: finding",
     "  - query: payments\n    agency: pboc\n    dataset: company_flows\n"
     "    subjects: [finding.uscc]", "- query: payments", "is per month"),
    ("  - rule: revenue-below-bank-inflows", "  - rule: no-such-rule", "no-such-rule",
     "has no rule 'no-such-rule'"),
    ("    months: [0, -1]", "    months: [0, 1]", "months: [0, 1]", "a month offset is 0"),
    ("  - notify: \"Case {case} took {finding} ({severity}).\"",
     "  - notify: \"Case {case} about {subject}\"", "- notify", "{subject} is not one of"),
    ("  - case: open\n    prefix: TAX-T\n    reason: rebates without exports\n",
     "", "  - query: company", "the first step is the case step"),
    ("  - notify: \"Case", "  - case: add\n  - notify: \"Case", "- case: add",
     "one case step, the first"),
    ("  - notify: \"Case", "  - query: x\n    notify: hi\n  - notify: \"Case", "- query: x",
     "exactly one of"),
    ("id: test-follow-up", "id: Test_Follow_Up", "Test_Follow_Up", "not a playbook id"),
])
def test_a_malformed_playbook_file_names_file_and_line(tmp_path: Path, old: str, new: str,
                                                        needle: str, message: str) -> None:
    assert old in BASE, old
    text = BASE.replace(old, new, 1)
    path = write(tmp_path, text)
    with pytest.raises(PlaybookError) as caught:
        load_playbook(path)
    error = caught.value
    assert message in error.message, str(error)
    assert error.source == str(path)
    first = needle.split("\n")[0]
    assert error.line == line_of(text, first), (error.line, str(error))
    assert str(error).startswith(f"{path}:{error.line}: ")
    assert isinstance(error, MalformedInput)


def test_yaml_errors_missing_keys_and_misplaced_files_are_named(tmp_path: Path) -> None:
    broken = BASE.replace("    fields: [uscc, name, legal_rep_id]", "    fields: [uscc, name", 1)
    with pytest.raises(PlaybookError) as caught:
        load_playbook(write(tmp_path, broken))
    assert "not valid YAML" in caught.value.message and caught.value.line is not None
    no_trigger = BASE.replace("trigger:\n  rules: [export-rebate-without-exports]\n"
                              "  severity_min: high\n  amount_min: 100000\n", "")
    with pytest.raises(PlaybookError, match="missing trigger"):
        load_playbook(write(tmp_path, no_trigger))
    with pytest.raises(PlaybookError, match="differs from the file name"):
        load_playbook(write(tmp_path, BASE, name="other-name"))
    folder = tmp_path / "police"
    folder.mkdir()
    write(folder, BASE)
    with pytest.raises(PlaybookError, match="owned by tax, but it is in police's"):
        load_playbooks("police", folder)
    with pytest.raises(PlaybookError, match="empty file"):
        load_playbook(write(tmp_path, ""))


# -- the ledger -------------------------------------------------------------------------

RULE_ID = "export-rebate-without-exports"
PERIOD = "2026-09"
FINDING_ID = f"{RULE_ID}/{PERIOD}/1"
CASE = "TAX-T-0001"


@dataclass
class Chain:
    net: Net
    genesis: identity_pb2.Genesis
    applier: LedgerApplier
    now_ms: int

    def block(self, *envelopes: bytes) -> tuple[str, ...]:
        self.now_ms += 1_000
        block = self.applier.cut(list(envelopes), self.now_ms, self.net.nodes["tax"], "tax")
        return self.applier.apply(block).codes

    def one(self, envelope: bytes) -> str:
        (code,) = self.block(envelope)
        return code

    def signed(self, agency: str, key: CachedSigner, fill: str, message: object) -> bytes:
        body = new_body(self.net.chain_id, agency, self.now_ms)
        getattr(body, fill).CopyFrom(message)
        return seal_envelope(body, key)

    @property
    def state(self) -> Any:
        return self.applier.state


def _txid(envelope: bytes) -> bytes:
    return tx_id(ledger_pb2.Envelope.FromString(envelope).body)


@dataclass
class World:
    chain: Chain
    run_tx: bytes
    playbook: Any
    reg_tx: bytes

    def ref(self, key: str, finding: str = FINDING_ID, digest: bytes | None = None) -> str:
        return pb.step_ref(digest or self.playbook.digest, self.run_tx, finding, key)

    def case_event(self, ref: str, *, action: str = "open", case_id: str = CASE,
                   key: CachedSigner | None = None, finding: str = FINDING_ID,
                   reason: str = "rebates without exports", run: bytes | None = None) -> bytes:
        net = self.chain.net
        event = ledger_pb2.CaseEvent(case_id=case_id, action=action, reason=reason,
                                     playbook_id=ref)
        if action in ("open", "add"):
            event.ref_tx_id = run if run is not None else self.run_tx
            event.finding_id = finding
        return self.chain.signed("tax", key or net.automations["tax"], "case_event", event)

    def follow_up(self, ref: str, *, target: str = "police", dataset: str = "records",
                  case_id: str = CASE, key: CachedSigner | None = None,
                  subject: tuple[str, str] = ("person_id", PERSON)) -> bytes:
        net = self.chain.net
        signer = Signer("tax", "automation", net.chain_id, key or net.automations["tax"])
        spec = QuerySpec(target=target, dataset=dataset, subjects=(subject,), case_id=case_id,
                         purpose="playbook test", on_behalf_of=ref)
        envelope, _ = build_query(spec, signer, self.chain.genesis, now_ms=self.chain.now_ms)
        return envelope


def _world(tmp: Path) -> World:
    """A ledger holding a findings run of tax's (one finding, fed by an answered query to
    customs) and tax's playbook BASE registered by its supervisor."""
    net = make_net(policies=default_policies(AGENCIES))
    store = BlockStore.create(tmp / "store.db", net.signed_genesis)
    chain = Chain(net, verify_genesis(net.signed_genesis), LedgerApplier(store),
                  int(time.time() * 1000) - 600_000)
    canonical = f"id: {RULE_ID}\nversion: 1\nowner: tax\n".encode()
    digest = hashlib.sha256(canonical).digest()
    reg = chain.signed("tax", net.supervisors["tax"], "rule_registration",
                       ledger_pb2.RuleRegistration(rule_id=RULE_ID, version=1, digest=digest,
                                                   canonical=canonical))
    automation = Signer("tax", "automation", net.chain_id, net.automations["tax"])
    q, qid = build_query(QuerySpec(target="customs", dataset="company_trade", period=PERIOD,
                                   purpose="rule input", on_behalf_of=digest.hex()),
                         automation, chain.genesis, now_ms=chain.now_ms)
    assert chain.block(reg, q) == (RESULT_OK, RESULT_OK)
    rows = [{"uscc": USCC, "period": PERIOD, "export_value_cny": "0.00"}]
    sealed, _ = seal(canonical_json_lines(rows), [net.data_keys["tax"].public_key],
                     chain_id=net.chain_id, context_tx_id=qid, chunk=0)
    answer = chain.signed("customs", net.nodes["customs"], "answer_manifest",
                          ledger_pb2.AnswerManifest(query_tx_id=qid, chunk_count=1, row_count=1,
                                                    commitment=sealed.commitment,
                                                    inline_chunk=sealed))
    assert chain.one(answer) == RESULT_OK
    line = canonical_json({"subject": USCC, "amount": "500000.00", "period": PERIOD}) + b"\n"
    out, salt = seal(line, [net.data_keys["tax"].public_key, net.data_keys["customs"].public_key],
                     chain_id=net.chain_id, context_tx_id=inputs_digest([qid]), chunk=0)
    findings = chain.signed("tax", net.automations["tax"], "findings", ledger_pb2.Findings(
        rule_digest=digest, rule_id=RULE_ID, period=PERIOD, parameters=b'{"period":"2026-09"}',
        input_tx_ids=[qid], output_digest=hashlib.sha256(line).digest(), finding_count=1,
        findings=[summary_of(FINDING_ID, "high", line, salt)], sealed_output=out,
        engine_version="duckdb test"))
    assert chain.one(findings) == RESULT_OK
    with tempfile.TemporaryDirectory() as folder:
        playbook = load_playbook(write(Path(folder), BASE))
    registration = chain.signed("tax", net.supervisors["tax"], "playbook_registration",
                                ledger_pb2.PlaybookRegistration(
                                    playbook_id=playbook.id, version=playbook.version,
                                    digest=playbook.digest, canonical=playbook.canonical_bytes))
    assert chain.one(registration) == RESULT_OK
    return World(chain, _txid(findings), playbook, _txid(registration))


@pytest.fixture
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        w = _world(Path(tmp))
        yield w
        w.chain.applier.store.close()


def test_a_playbook_is_registered_once_by_a_supervisor_of_its_owner(world: World) -> None:
    chain, net, p = world.chain, world.chain.net, world.playbook
    assert chain.state.playbooks.playbook(p.digest).steps[2] == pb.PlaybookStepSpec(
        "query", "officer_records", "police", "records")

    def registration(key: CachedSigner, canonical: bytes, digest: bytes | None = None,
                     playbook_id: str = p.id, version: int = p.version) -> bytes:
        return chain.signed("tax", key, "playbook_registration", ledger_pb2.PlaybookRegistration(
            playbook_id=playbook_id, version=version, canonical=canonical,
            digest=digest if digest is not None else hashlib.sha256(canonical).digest()))

    other = load_playbook_bytes(p.canonical_bytes.replace(b'"version":3', b'"version":4'))
    assert chain.one(registration(net.supervisors["tax"], p.canonical_bytes)) == \
        pb.CODE_PLAYBOOK_INVALID  # already registered
    assert chain.one(registration(net.analysts["tax"], other.canonical_bytes, version=4)) == \
        pb.CODE_PLAYBOOK_INVALID  # an analyst does not register
    assert chain.one(registration(net.supervisors["tax"], other.canonical_bytes,
                                  digest=p.digest, version=4)) == pb.CODE_PLAYBOOK_INVALID
    assert chain.one(registration(net.supervisors["tax"], other.canonical_bytes)) == \
        pb.CODE_PLAYBOOK_INVALID  # the canonical says version 4, the registration 3
    assert chain.one(registration(net.supervisors["tax"], b"not json", version=4)) == \
        pb.CODE_PLAYBOOK_INVALID
    police = chain.signed("police", net.supervisors["police"], "playbook_registration",
                          ledger_pb2.PlaybookRegistration(
                              playbook_id=other.id, version=4, canonical=other.canonical_bytes,
                              digest=other.digest))
    assert chain.one(police) == pb.CODE_PLAYBOOK_INVALID  # tax's playbook, police's signature
    assert chain.one(registration(net.supervisors["tax"], other.canonical_bytes,
                                  version=4)) == RESULT_OK
    assert len(chain.state.playbooks.playbooks) == 2


def test_each_step_is_accepted_once_per_finding_and_playbook_version(world: World) -> None:
    chain = world.chain
    case_step = world.case_event(world.ref("0-case"))
    assert chain.one(case_step) == RESULT_OK
    # a second case step for the same finding and playbook, even into another case
    assert chain.one(world.case_event(world.ref("0-case"), case_id="TAX-T-0002")) == \
        pb.CODE_STEP_DONE
    assert "TAX-T-0002" not in chain.state.cases.cases
    follow_up = world.follow_up(world.ref("2-officer_records"))
    assert chain.one(follow_up) == RESULT_OK
    assert chain.one(world.follow_up(world.ref("2-officer_records"))) == pb.CODE_STEP_DONE
    notify = world.case_event(world.ref("6-notify"), action="notify", reason="took it")
    assert chain.one(notify) == RESULT_OK
    assert chain.one(world.case_event(world.ref("6-notify"), action="notify")) == \
        pb.CODE_STEP_DONE
    steps = chain.state.playbooks.steps_of(world.playbook.digest)
    assert [(s.ref.step_key, s.kind, s.case_id) for s in steps] == [
        ("0-case", "case", CASE), ("2-officer_records", "query", CASE),
        ("6-notify", "notify", CASE)]
    assert [s.tx_id for s in steps] == [_txid(case_step), _txid(follow_up), _txid(notify)]
    case = chain.state.cases.cases[CASE]
    assert case.events == [_txid(case_step), _txid(notify)]
    # the same chain replayed gives the same steps (every node, every verifier)
    again = LedgerApplier(chain.applier.store).state.playbooks
    assert [(s.ref, s.tx_id) for s in again.steps_of(world.playbook.digest)] == \
        [(s.ref, s.tx_id) for s in steps]
    # the case's evidence holds the playbook's registration
    assert world.reg_tx in case_tx_ids(chain.applier.store, CASE)


def test_a_step_must_be_the_registered_playbooks_for_a_finding_it_may_read(
        world: World) -> None:
    chain, net = world.chain, world.chain.net
    # nothing before the case step
    assert chain.one(world.follow_up(world.ref("2-officer_records"))) == \
        pb.CODE_PLAYBOOK_INVALID
    # the case step: by the automation, about the finding it names
    assert chain.one(world.case_event(world.ref("0-case"), key=net.analysts["tax"])) == \
        pb.CODE_PLAYBOOK_INVALID
    assert chain.one(world.case_event(world.ref("0-case", finding=f"{RULE_ID}/{PERIOD}/9"),
                                      finding=f"{RULE_ID}/{PERIOD}/9")) == \
        pb.CODE_PLAYBOOK_INVALID  # no such finding in the run
    assert chain.one(world.case_event(world.ref("0-case", digest=bytes(32)))) == \
        pb.CODE_PLAYBOOK_INVALID  # no such playbook
    assert chain.one(world.case_event(world.ref("1-case"))) == pb.CODE_PLAYBOOK_INVALID
    assert chain.one(world.case_event("playbook:not-a-reference")) == pb.CODE_PLAYBOOK_INVALID
    assert chain.one(world.case_event(world.ref("0-case"))) == RESULT_OK
    # a follow-up asks what its step says, in the case that took the finding
    assert chain.one(world.follow_up(world.ref("2-officer_records"), target="pboc",
                                     dataset="accounts")) == pb.CODE_PLAYBOOK_INVALID
    assert chain.one(world.follow_up(world.ref("3-accounts"), target="pboc",
                                     dataset="accounts", case_id="TAX-OTHER")) == \
        pb.CODE_PLAYBOOK_INVALID
    assert chain.one(world.follow_up(world.ref("6-notify"))) == pb.CODE_PLAYBOOK_INVALID
    assert chain.one(world.follow_up(world.ref("3-accounts"), target="pboc",
                                     dataset="accounts", key=net.analysts["tax"])) == \
        pb.CODE_PLAYBOOK_INVALID  # an analyst does not take a playbook's steps
    assert chain.one(world.case_event(world.ref("6-notify"), action="notify",
                                      case_id="TAX-OTHER")) == pb.CODE_PLAYBOOK_INVALID
    assert chain.one(world.follow_up(world.ref("3-accounts"), target="pboc",
                                     dataset="accounts")) == RESULT_OK
    # a rule step adds only findings of its run restricted to the case
    assert chain.one(world.case_event(world.ref("5-revenue-below-bank-inflows"),
                                      action="add")) == pb.CODE_PLAYBOOK_INVALID
    # once the case is closed, no more steps
    close = chain.signed("tax", net.analysts["tax"], "case_event",
                         ledger_pb2.CaseEvent(case_id=CASE, action="close", reason="done"))
    assert chain.one(close) == RESULT_OK
    assert chain.one(world.case_event(world.ref("6-notify"), action="notify")) == \
        pb.CODE_PLAYBOOK_INVALID


def test_a_follow_up_counts_as_supervisor_approved_only_for_its_playbook(world: World) -> None:
    chain, net = world.chain, world.chain.net
    assert chain.one(world.case_event(world.ref("0-case"))) == RESULT_OK
    by_playbook = world.follow_up(world.ref("2-officer_records"))
    assert chain.one(by_playbook) == RESULT_OK
    rec = chain.state.queries.get(_txid(by_playbook))
    assert rec.allowed and rec.cosigners == ()
    # the same question from the automation on nobody's behalf needs the co-signature
    signer = Signer("tax", "automation", net.chain_id, net.automations["tax"])
    plain, plain_id = build_query(QuerySpec(target="police", dataset="records",
                                            subjects=(("person_id", PERSON),), case_id=CASE,
                                            purpose="curious"), signer, chain.genesis,
                                  now_ms=chain.now_ms)
    assert chain.one(plain) == RESULT_OK
    rec = chain.state.queries.get(plain_id)
    assert not rec.allowed and rec.decision_code == COSIGNATURE_REQUIRED, rec.decision_code
    # record-level data is the automation's only within a case (and a playbook's case)
    no_case, no_case_id = build_query(QuerySpec(target="pboc", dataset="accounts",
                                                subjects=(("uscc", USCC),), purpose="x"),
                                      signer, chain.genesis, now_ms=chain.now_ms)
    assert chain.one(no_case) == RESULT_OK
    assert not chain.state.queries.get(no_case_id).allowed


# -- the case graph ----------------------------------------------------------------------

def test_the_graph_links_companies_persons_and_accounts_from_the_answers() -> None:
    other = _uscc(43)
    answers: list[tuple[str, list[dict[str, Any]]]] = [
        ("taxpayers", [{"uscc": USCC, "name": "Shenzhen Trading", "legal_rep_id": PERSON,
                        "status": "active"}]),
        ("accounts", [{"account_no": "A1", "holder_kind": "company", "holder_id": USCC,
                       "bank": "ICBC"},
                      {"account_no": "A2", "holder_kind": "person", "holder_id": PERSON,
                       "bank": "BOC"},
                      {"account_no": "A9", "holder_kind": "company", "holder_id": other}]),
        ("transactions", [{"account_no": "A1", "counterparty_account": "X7",
                           "amount_cny": Decimal("100.00"), "direction": "in"},
                          {"account_no": "A1", "counterparty_account": "X7",
                           "amount_cny": Decimal("50.50"), "direction": "in"},
                          {"account_no": "A1", "counterparty_account": "A9",
                           "amount_cny": Decimal("7.00"), "direction": "out"}]),
        ("records", [{"person_id": PERSON, "kind": "fraud_conviction"}]),
        ("declarations", [{"uscc": USCC, "direction": "export",
                           "declared_value_cny": Decimal("10.00")}]),
    ]
    g = build_graph([USCC], answers)
    assert g.roots == [f"company:{USCC}"]
    edges = {(e.source, e.relation, e.target) for e in g.edges.values()}
    assert (f"company:{USCC}", LEGAL_REP, f"person:{PERSON}") in edges
    assert (f"company:{USCC}", HOLDS, "account:A1") in edges
    assert (f"person:{PERSON}", HOLDS, "account:A2") in edges
    assert (f"company:{other}", HOLDS, "account:A9") in edges
    assert ("account:A1", COUNTERPARTY, "account:X7") in edges
    assert ("account:A1", COUNTERPARTY, "account:A9") in edges
    flow = g.edges[("account:A1", COUNTERPARTY, "account:X7")]
    assert flow.notes == {"in": "150.50 CNY"}
    assert g.nodes[f"person:{PERSON}"].notes["police records"] == "fraud_conviction"
    assert "1 declarations" in g.nodes[f"company:{USCC}"].notes["customs"]
    assert len(g.as_dict()["nodes"]) == 7
    from rich.console import Console

    from exchange.cases.graph import render_tree

    console = Console(width=200, record=True)
    console.print(render_tree(g, "case"))
    text = console.export_text()
    assert "legal representative person" in text and "(above)" in text


def test_the_graph_links_companies_by_the_invoices_on_record() -> None:
    a, b, c = _uscc(41), _uscc(42), _uscc(43)
    invoices = [
        {"invoice_no": "1", "issuer_uscc": a, "buyer_uscc": b, "amount_cny": Decimal("60000.00"),
         "kind": "domestic"},
        {"invoice_no": "2", "issuer_uscc": a, "buyer_uscc": b, "amount_cny": Decimal("40000.00"),
         "kind": "domestic"},
        {"invoice_no": "3", "issuer_uscc": a, "buyer_uscc": b, "amount_cny": Decimal("5.00"),
         "kind": "export"},
        {"invoice_no": "4", "issuer_uscc": b, "buyer_uscc": a, "amount_cny": Decimal("1.00"),
         "kind": "domestic"},
        {"invoice_no": "5", "issuer_uscc": c, "buyer_uscc": c, "amount_cny": Decimal("9.00"),
         "kind": "domestic"},  # a self-invoice links nothing
    ]
    # the same invoice in two answers (the issuer's and the buyer's) counts once
    g = build_graph([a, b], [("vat_invoices", invoices), ("vat_invoices", invoices[:2])])
    edges = {(e.source, e.relation, e.target): e for e in g.edges.values()}
    ab = edges[(f"company:{a}", INVOICED, f"company:{b}")]
    assert ab.notes == {"invoices": "3", "domestic": "100000.00 CNY", "export": "5.00 CNY"}
    assert edges[(f"company:{b}", INVOICED, f"company:{a}")].notes["domestic"] == "1.00 CNY"
    assert f"company:{c}" not in g.nodes


# -- events -----------------------------------------------------------------------------

