"""Registered playbooks, and each playbook step accepted once, as ledger state.

A playbook is registered like a rule (decision 9): by a supervisor or the root of its
owner, with its canonical bytes and their SHA-256, which must match. The canonical bytes
are a JSON object whose id, version and owner must be the registration's; the ledger
reads its steps (the kind and name of each, and a follow-up's agency and dataset).

Every step a playbook takes is a transaction signed by an automation of the owner that
names the step by a reference,

    playbook:<playbook digest hex>:<findings run tx hex>:<finding id>:<step key>

in `Query.on_behalf_of` (a follow-up query) or `CaseEvent.playbook_id` (the case step,
a notification, or a finding a rule step adds to the case). Such a transaction is valid
only when the playbook is registered by the signer's agency, the finding is in that run
and the agency may read it (it owns it or gave data to it), the step key names a step of
that playbook of the transaction's kind (a follow-up asks that step's agency for that
step's dataset), every step after the case step names the open case that took the
finding, and it is the first: the same step for the same finding and playbook version
again is PLAYBOOK_STEP_DONE, deterministically on every node. So a playbook acts exactly
once per finding whatever its runner does, crashes included.

A follow-up on behalf of a playbook counts as co-signed by a supervisor of its agency
(decision 7): the playbook's registration, which only a supervisor or the root can sign,
approved exactly that question (that agency, that dataset) for every finding the
playbook takes.

Pure: nothing here does I/O.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from exchange.identity.registry import ROLE_ROOT, KeyInfo
from exchange.ledger.block import OpenedEnvelope
from exchange.ledger.findings import CaseBook
from exchange.ledger.queries import Rejected
from exchange.v1 import ledger_pb2

CODE_PLAYBOOK_INVALID = "PLAYBOOK_INVALID"
CODE_STEP_DONE = "PLAYBOOK_STEP_DONE"
STEP_PREFIX = "playbook"
PLAYBOOK_BYTES_MAX = 64 * 1024
STEPS_MAX = 64
REGISTER_ROLES = frozenset({"supervisor"})
STEP_ROLES = frozenset({"automation"})
CASE_STEP_ACTIONS = ("open", "add")
STEP_KINDS = ("case", "query", "rule", "notify")

_HEX64 = re.compile(r"[0-9a-f]{64}")
_STEP_KEY = re.compile(r"(0|[1-9][0-9]{0,2})-([a-z0-9][a-z0-9_-]{0,63})")
_FINDING_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}/[0-9a-z-]{1,16}/[1-9][0-9]{0,8}")


@dataclass(frozen=True)
class StepRef:
    """A parsed step reference."""

    digest: bytes
    run_tx_id: bytes
    finding_id: str
    step_key: str

    @property
    def index(self) -> int:
        return int(self.step_key.split("-", 1)[0])

    @property
    def name(self) -> str:
        return self.step_key.split("-", 1)[1]

    @property
    def finding(self) -> tuple[bytes, bytes, str]:
        return (self.digest, self.run_tx_id, self.finding_id)

    def text(self) -> str:
        return step_ref(self.digest, self.run_tx_id, self.finding_id, self.step_key)


def step_ref(digest: bytes, run_tx_id: bytes, finding_id: str, step_key: str) -> str:
    return f"{STEP_PREFIX}:{digest.hex()}:{run_tx_id.hex()}:{finding_id}:{step_key}"


def parse_step_ref(text: str) -> StepRef | None:
    """The reference in `text`, None if it is not one (a rule's digest, "")."""
    parts = text.split(":")
    if len(parts) != 5 or parts[0] != STEP_PREFIX:
        return None
    _, digest, run, finding_id, key = parts
    if not (_HEX64.fullmatch(digest) and _HEX64.fullmatch(run)
            and _FINDING_ID.fullmatch(finding_id) and _STEP_KEY.fullmatch(key)):
        return None
    return StepRef(bytes.fromhex(digest), bytes.fromhex(run), finding_id, key)


@dataclass(frozen=True)
class PlaybookStepSpec:
    """What the ledger knows of one step of a registered playbook."""

    kind: str
    name: str
    agency: str = ""
    dataset: str = ""


@dataclass
class PlaybookRecord:
    owner: str
    playbook_id: str
    version: int
    digest: bytes
    canonical: bytes
    tx_id: bytes
    height: int
    steps: tuple[PlaybookStepSpec, ...]


@dataclass
class StepRecord:
    """A playbook step on the ledger."""

    ref: StepRef
    tx_id: bytes
    height: int
    kind: str  # "case", "query", "rule" (a finding added), "notify"
    case_id: str
    added_run: bytes = b""  # a rule step: the finding it added
    added_finding: str = ""


@dataclass
class PendingStep:
    """A step judged acceptable, to be recorded once the rest of its judgement passes."""

    ref: StepRef
    key: tuple[bytes, bytes, str, str, bytes, str]
    kind: str
    case_id: str
    added_run: bytes = b""
    added_finding: str = ""


def parse_canonical(canonical: bytes, playbook_id: str, version: int, owner: str
                    ) -> tuple[PlaybookStepSpec, ...]:
    """The steps of a playbook's canonical JSON; ValueError says why it is not one."""
    try:
        doc = json.loads(canonical)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"canonical bytes are not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError("canonical bytes are not a JSON object")
    if (doc.get("id"), doc.get("version"), doc.get("owner")) != (playbook_id, version, owner):
        raise ValueError("the canonical playbook's id, version and owner are not the "
                         "registration's")
    steps = doc.get("steps")
    if not isinstance(steps, list) or not 1 <= len(steps) <= STEPS_MAX:
        raise ValueError(f"a playbook has 1..{STEPS_MAX} steps")
    out: list[PlaybookStepSpec] = []
    for i, step in enumerate(steps):
        kinds = [k for k in STEP_KINDS if isinstance(step, dict) and k in step]
        if len(kinds) != 1:
            raise ValueError(f"step {i} names no single kind")
        kind = kinds[0]
        value = step[kind]
        if kind == "case":
            spec = PlaybookStepSpec("case", "case")
        elif kind == "notify":
            spec = PlaybookStepSpec("notify", "notify")
        elif kind == "rule":
            if not isinstance(value, str):
                raise ValueError(f"step {i}: a rule step names its rule")
            spec = PlaybookStepSpec("rule", value)
        else:
            agency, dataset = step.get("agency"), step.get("dataset")
            if not all(isinstance(v, str) and v for v in (value, agency, dataset)):
                raise ValueError(f"step {i}: a query step names itself, an agency and a "
                                 "dataset")
            spec = PlaybookStepSpec("query", value, agency, dataset)
        if (i == 0) != (kind == "case"):
            raise ValueError("the case step is the first step, and the only one")
        if not _STEP_KEY.fullmatch(f"{i}-{spec.name}"):
            raise ValueError(f"step {i}: name {spec.name!r} is not a step name")
        out.append(spec)
    return tuple(out)


@dataclass
class PlaybookBook:
    """Registered playbooks by digest, and the steps taken."""

    cases: CaseBook
    playbooks: dict[bytes, PlaybookRecord] = field(default_factory=dict)
    # (digest, run, finding id, step key, added run, added finding) -> the step
    steps: dict[tuple[bytes, bytes, str, str, bytes, str], StepRecord] = \
        field(default_factory=dict)
    # (digest, run, finding id) -> the case its case step opened or added it to
    _case_of: dict[tuple[bytes, bytes, str], str] = field(default_factory=dict)
    _by_digest: dict[bytes, list[StepRecord]] = field(default_factory=dict)

    def playbook(self, digest: bytes) -> PlaybookRecord | None:
        return self.playbooks.get(bytes(digest))

    def steps_of(self, digest: bytes) -> list[StepRecord]:
        return list(self._by_digest.get(bytes(digest), ()))

    def case_of(self, digest: bytes, run_tx_id: bytes, finding_id: str) -> str | None:
        return self._case_of.get((bytes(digest), bytes(run_tx_id), finding_id))

    # -- registration ------------------------------------------------------------------
    def register(self, env: OpenedEnvelope, signer: KeyInfo, height: int) -> None:
        reg = env.body.playbook_registration
        agency = env.body.agency
        if not (signer.subject == ROLE_ROOT or REGISTER_ROLES & set(signer.roles)):
            raise Rejected(CODE_PLAYBOOK_INVALID, "a playbook is registered by a supervisor "
                                                  "or the root of its owner")
        if not reg.playbook_id or not reg.canonical or \
                len(reg.canonical) > PLAYBOOK_BYTES_MAX:
            raise Rejected(CODE_PLAYBOOK_INVALID, "a playbook has an id and canonical bytes "
                                                  f"(at most {PLAYBOOK_BYTES_MAX})")
        digest = hashlib.sha256(bytes(reg.canonical)).digest()
        if bytes(reg.digest) != digest:
            raise Rejected(CODE_PLAYBOOK_INVALID, "digest is not SHA-256 of the canonical "
                                                  "bytes")
        if digest in self.playbooks:
            raise Rejected(CODE_PLAYBOOK_INVALID, "this playbook is already registered")
        for other in self.playbooks.values():
            if (other.owner, other.playbook_id, other.version) == (agency, reg.playbook_id,
                                                                   reg.version):
                raise Rejected(CODE_PLAYBOOK_INVALID, f"{reg.playbook_id} version "
                                                      f"{reg.version} is registered with "
                                                      "other content")
        try:
            steps = parse_canonical(bytes(reg.canonical), reg.playbook_id, reg.version, agency)
        except ValueError as exc:
            raise Rejected(CODE_PLAYBOOK_INVALID, str(exc)) from None
        self.playbooks[digest] = PlaybookRecord(agency, reg.playbook_id, reg.version, digest,
                                                bytes(reg.canonical), env.tx_id, height, steps)

    # -- steps -------------------------------------------------------------------------
    def _common(self, ref: StepRef, agency: str, signer: KeyInfo, kind: str
                ) -> PlaybookRecord:
        if not STEP_ROLES & set(signer.roles):
            raise Rejected(CODE_PLAYBOOK_INVALID, "playbook steps are signed by an "
                                                  "automation of the playbook's owner")
        playbook = self.playbooks.get(ref.digest)
        if playbook is None or playbook.owner != agency:
            raise Rejected(CODE_PLAYBOOK_INVALID, f"{agency} registered no playbook with "
                                                  f"digest {ref.digest.hex()[:16]}")
        if ref.index >= len(playbook.steps):
            raise Rejected(CODE_PLAYBOOK_INVALID, f"playbook {playbook.playbook_id} has no "
                                                  f"step {ref.step_key}")
        spec = playbook.steps[ref.index]
        if spec.name != ref.name or spec.kind != kind:
            raise Rejected(CODE_PLAYBOOK_INVALID, f"step {ref.step_key} of playbook "
                                                  f"{playbook.playbook_id} is not a {kind} "
                                                  "step")
        findings = self.cases.findings
        run = findings.runs.get(ref.run_tx_id)
        if run is None or ref.finding_id not in {f for f, _, _ in run.summaries}:
            raise Rejected(CODE_PLAYBOOK_INVALID, f"no finding {ref.finding_id} in run "
                                                  f"{ref.run_tx_id.hex()[:16]}")
        readers = {run.owner} | {findings.queries.queries[q].target for q in run.input_tx_ids}
        if agency not in readers:
            raise Rejected(CODE_PLAYBOOK_INVALID, f"{agency} neither owns finding "
                                                  f"{ref.finding_id} nor gave data to it")
        return playbook

    def _taken_case(self, ref: StepRef, case_id: str, agency: str) -> None:
        """A step after the case step names the open case that took the finding."""
        taken = self._case_of.get(ref.finding)
        if taken is None:
            raise Rejected(CODE_PLAYBOOK_INVALID, "the playbook's case step for this finding "
                                                  "is not on the ledger")
        case = self.cases.cases.get(taken)
        if case_id != taken or case is None or case.status != "open" or case.agency != agency:
            raise Rejected(CODE_PLAYBOOK_INVALID, f"the step names case {case_id!r}, not the "
                                                  f"open case {taken} that took the finding")

    def _first(self, key: tuple[bytes, bytes, str, str, bytes, str]) -> None:
        if key in self.steps:
            raise Rejected(CODE_STEP_DONE, f"step {key[3]} of this playbook for finding "
                                           f"{key[2]} is already on the ledger")

    def check_query(self, env: OpenedEnvelope, signer: KeyInfo) -> PendingStep | None:
        """None for a query on nobody's behalf or a rule's; the step a playbook's
        follow-up takes (Rejected if it may not)."""
        q = env.body.query
        if not q.on_behalf_of.startswith(STEP_PREFIX + ":"):
            return None
        ref = parse_step_ref(q.on_behalf_of)
        if ref is None:
            raise Rejected(CODE_PLAYBOOK_INVALID, "on_behalf_of is not a playbook step "
                                                  "reference")
        key = (*ref.finding, ref.step_key, b"", "")
        self._first(key)
        playbook = self._common(ref, env.body.agency, signer, "query")
        spec = playbook.steps[ref.index]
        if (q.target_agency, q.dataset) != (spec.agency, spec.dataset):
            raise Rejected(CODE_PLAYBOOK_INVALID, f"step {ref.step_key} asks {spec.agency} "
                                                  f"for {spec.dataset}, not "
                                                  f"{q.target_agency} for {q.dataset}")
        self._taken_case(ref, q.case_id, env.body.agency)
        return PendingStep(ref, key, "query", q.case_id)

    def check_case_event(self, env: OpenedEnvelope, signer: KeyInfo) -> PendingStep | None:
        """None for a case event of no playbook; else the step it takes (Rejected if it
        may not). CaseBook judges the event itself afterwards."""
        ev = env.body.case_event
        if not ev.playbook_id:
            return None
        ref = parse_step_ref(ev.playbook_id)
        if ref is None:
            raise Rejected(CODE_PLAYBOOK_INVALID, "playbook_id is not a playbook step "
                                                  "reference")
        agency = env.body.agency
        if ref.index == 0:
            key = (*ref.finding, ref.step_key, b"", "")
            self._first(key)
            self._common(ref, agency, signer, "case")
            if ev.action not in CASE_STEP_ACTIONS or bytes(ev.ref_tx_id) != ref.run_tx_id \
                    or ev.finding_id != ref.finding_id:
                raise Rejected(CODE_PLAYBOOK_INVALID, "a playbook's case step opens a case "
                                                      "with its finding, or adds it to one")
            case = self.cases.cases.get(ev.case_id)
            if ev.action == "add" and (case is None or case.agency != agency):
                raise Rejected(CODE_PLAYBOOK_INVALID, "a playbook adds findings to cases "
                                                      "its own agency opened")
            return PendingStep(ref, key, "case", ev.case_id)
        if ev.action == "notify":
            key = (*ref.finding, ref.step_key, b"", "")
            self._first(key)
            self._common(ref, agency, signer, "notify")
            if ev.ref_tx_id or ev.finding_id:
                raise Rejected(CODE_PLAYBOOK_INVALID, "a notification refers to no "
                                                      "transaction")
            self._taken_case(ref, ev.case_id, agency)
            return PendingStep(ref, key, "notify", ev.case_id)
        if ev.action == "add" and ev.finding_id:
            added = (bytes(ev.ref_tx_id), ev.finding_id)
            key = (*ref.finding, ref.step_key, *added)
            self._first(key)
            self._common(ref, agency, signer, "rule")
            self._taken_case(ref, ev.case_id, agency)
            run = self.cases.findings.runs.get(added[0])
            if run is None or run.case_id != ev.case_id:
                raise Rejected(CODE_PLAYBOOK_INVALID, "a rule step adds findings of its run "
                                                      "restricted to the case")
            return PendingStep(ref, key, "rule", ev.case_id, *added)
        raise Rejected(CODE_PLAYBOOK_INVALID, "a playbook's case event opens or adds to the "
                                              "case, adds a finding of a rule step, or "
                                              "notifies")

    def done(self, pending: PendingStep, tx_id: bytes, height: int) -> None:
        """Record a step whose transaction was judged valid."""
        rec = StepRecord(pending.ref, tx_id, height, pending.kind, pending.case_id,
                         pending.added_run, pending.added_finding)
        self.steps[pending.key] = rec
        self._by_digest.setdefault(pending.ref.digest, []).append(rec)
        if pending.kind == "case":
            self._case_of[pending.ref.finding] = pending.case_id

    def approves(self, body: ledger_pb2.TxBody, signer: KeyInfo) -> bool:
        """Whether a query is a follow-up a supervisor approved by registering its
        playbook (standing for the co-signature the owner's policy may ask for)."""
        q = body.query
        ref = parse_step_ref(q.on_behalf_of)
        if ref is None or not STEP_ROLES & set(signer.roles):
            return False
        playbook = self.playbooks.get(ref.digest)
        if playbook is None or playbook.owner != body.agency or \
                ref.index >= len(playbook.steps):
            return False
        spec = playbook.steps[ref.index]
        return (spec.kind, spec.name, spec.agency, spec.dataset) == (
            "query", ref.name, q.target_agency, q.dataset)
