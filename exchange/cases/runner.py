"""Running an agency's playbooks: every finding a registered playbook's trigger takes is
worked through the playbook's steps once, each step a transaction signed by the agency's
automation.

Exactly once, across crashes, in two layers:
- the ledger: a playbook step names itself (ledger/playbooks.py), and the same step for
  the same finding and playbook version is judged PLAYBOOK_STEP_DONE, so however often a
  runner submits, one transaction per step is valid;
- the runner: before it submits a step it writes the signed envelope to a local SQLite
  spool (fsynced), and after a restart it first asks the ledger which steps are on it,
  then re-sends the spooled envelope of any step that is not (an identical envelope
  returns its original outcome). An envelope too old for the admission window never
  committed (the ledger would hold it) and can no longer commit, so it is replaced.

Bounded: at most `follow_ups_per_finding_max` follow-up queries per finding (over all of
the agency's playbooks), and at most `follow_ups_per_hour_per_agency` per target agency
in any hour (counted from the ledger, so a restart does not reset it); a job that meets
the hourly bound waits for the next round. A follow-up the target refuses is on the
ledger as a refusal; the playbook goes on with its other steps.

Over 600 lines on purpose: one `PlaybookRunner` whose step methods share the round's
state (the spool, the hourly budget, the open cases); split apart they would pass it
all around.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import structlog

from agents.common.checks import is_valid_person_id, is_valid_uscc, shift_period
from exchange.cases.playbooks import (
    CaseStep,
    NotifyStep,
    Playbook,
    QueryStep,
    RuleStep,
    load_playbooks,
)
from exchange.client import ExchangeClient, Signer
from exchange.client.crossquery import QuerySpec, build_query, read_answer
from exchange.compare.duck import RuleLimits
from exchange.compare.jobs import Runner as JobsRunner
from exchange.errors import (
    Conflict,
    ExchangeError,
    MalformedInput,
    NotAvailable,
    NotFound,
    TimeOutOfWindow,
)
from exchange.identity.default_policies import LEGAL_BASIS_TAX_CRIME
from exchange.ledger.block import tx_id
from exchange.ledger.playbooks import CODE_STEP_DONE, parse_step_ref, step_ref
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2

log = structlog.get_logger("exchange.playbooks")
SHAPE = ledger_pb2.QueryShape
HOUR_MS = 3_600_000
ANSWER_WAIT_MS_MAX = 60_000
SUBJECTS_PER_FOLLOW_UP_MAX = 10_000
CASE_HASH_CHARS = 12
Progress = Callable[[str], None]


class Deferred(NotAvailable):
    """A job that cannot go on now (a bound reached, an answer not in yet, no leader):
    it resumes in a later round, from the ledger and the spool."""


class CaseClosed(Conflict):
    """The case a job works on was closed (by its agency's people): the job ends there."""


@dataclass(frozen=True)
class PlaybookSettings:
    spool: Path
    follow_ups_per_finding_max: int = 8
    follow_ups_per_hour_per_agency: int = 500
    workers: int = 4
    follow_up_deadline_s: int = 600
    answer_wait_s: float = 60.0
    rule_limits: RuleLimits = field(default_factory=RuleLimits)  # a rule step's run


# -- the spool ---------------------------------------------------------------------------

class StepSpool:
    """Signed envelopes of steps about to be submitted, durable before submission; and
    the jobs finished, so a round does not walk them again."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS envelopes (
                job TEXT NOT NULL, slot TEXT NOT NULL, envelope BLOB NOT NULL,
                created_ms INTEGER NOT NULL, PRIMARY KEY (job, slot));
            CREATE TABLE IF NOT EXISTS finished (
                job TEXT PRIMARY KEY, outcome TEXT NOT NULL, finished_ms INTEGER NOT NULL);
        """)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, job: str, slot: str) -> bytes | None:
        with self._lock:
            row = self._db.execute("SELECT envelope FROM envelopes WHERE job=? AND slot=?",
                                   (job, slot)).fetchone()
        return bytes(row[0]) if row else None

    def put(self, job: str, slot: str, envelope: bytes) -> None:
        """Keep `envelope` (fsynced) before it is submitted."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO envelopes VALUES (?, ?, ?, ?)",
                             (job, slot, envelope, int(time.time() * 1000)))

    def discard(self, job: str, slot: str) -> None:
        """Forget an envelope the ledger judged invalid: the step is built anew."""
        with self._lock:
            self._db.execute("DELETE FROM envelopes WHERE job=? AND slot=?", (job, slot))

    def finish(self, job: str, outcome: str) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.execute("DELETE FROM envelopes WHERE job=?", (job,))
            self._db.execute("INSERT OR REPLACE INTO finished VALUES (?, ?, ?)",
                             (job, outcome, int(time.time() * 1000)))
            self._db.execute("COMMIT")

    def finished(self) -> set[str]:
        with self._lock:
            return {str(r[0]) for r in self._db.execute("SELECT job FROM finished")}

    def pending(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT COUNT(*) FROM envelopes").fetchone()
        return int(row[0])


# -- what a round sees -------------------------------------------------------------------

@dataclass(frozen=True)
class Finding:
    """A finding this agency can read."""

    run_tx_id: bytes
    finding_id: str
    rule_id: str
    period: str
    severity: str
    owner: str
    height: int
    time_ms: int
    subject: str
    amount: Decimal | None
    in_force: bool
    # companies the finding links its subject to (its `linked_uscc` column: for
    # invoice-ring, the companies that follow it on its rings)
    linked: tuple[str, ...] = ()

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(p for p in self.subject.split("/") if p)

    @property
    def reach(self) -> set[str]:
        """Its subjects and the companies it links them to: a case holding any of them
        takes it."""
        return {*self.parts, *self.linked}

    @property
    def uscc(self) -> str:
        return next((p for p in self.parts if is_valid_uscc(p)), "")

    @property
    def person_id(self) -> str:
        return next((p for p in self.parts if is_valid_person_id(p)), "")

    @property
    def key(self) -> tuple[bytes, str]:
        return (self.run_tx_id, self.finding_id)


@dataclass
class OpenCase:
    case_id: str
    opened_height: int
    subjects: set[str] = field(default_factory=set)
    holds: set[tuple[bytes, str]] = field(default_factory=set)


@dataclass
class RoundReport:
    jobs: int = 0
    finished: int = 0
    deferred: int = 0
    failed: int = 0
    steps: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    skipped: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    refused: int = 0
    cases: set[str] = field(default_factory=set)

    def as_dict(self) -> dict[str, object]:
        return {"jobs": self.jobs, "finished": self.finished, "deferred": self.deferred,
                "failed": self.failed, "steps": dict(self.steps),
                "skipped": dict(self.skipped), "refused": self.refused,
                "cases": sorted(self.cases)}


@dataclass
class _Group:
    """What the jobs of one group (one subject, or findings linking their subjects)
    share as they run one after the other: the case each case prefix put them in."""

    cases: dict[str, str] = field(default_factory=dict)


@dataclass
class _Job:
    playbook: Playbook
    finding: Finding

    @property
    def key(self) -> str:
        return f"{self.playbook.digest_hex}:{self.finding.run_tx_id.hex()}:" \
               f"{self.finding.finding_id}"

    def ref(self, index: int) -> str:
        return step_ref(self.playbook.digest, self.finding.run_tx_id,
                        self.finding.finding_id, self.playbook.step_key(index))


LINKED_COLUMN = "linked_uscc"
LINKED_MAX = 64


def _linked(line: dict[str, Any]) -> tuple[str, ...]:
    """The valid usccs of a finding's `linked_uscc` column (space-separated), bounded."""
    value = line.get(LINKED_COLUMN)
    if not isinstance(value, str):
        return ()
    return tuple(u for u in value.split()[:LINKED_MAX] if is_valid_uscc(u))


def _amount(line: dict[str, Any]) -> Decimal | None:
    try:
        return Decimal(str(line.get("amount")))
    except (InvalidOperation, ValueError):
        return None


def case_id_for(prefix: str, ref: str) -> str:
    """The id of the case a playbook opens for a finding: the same on every attempt."""
    return f"{prefix}-{hashlib.sha256(ref.encode()).hexdigest()[:CASE_HASH_CHARS].upper()}"


class PlaybookRunner:
    """Runs `playbooks` (the agency's files) that are registered on the ledger."""

    def __init__(self, client: ExchangeClient, signer: Signer, genesis: identity_pb2.Genesis,
                 playbooks: Sequence[Playbook], settings: PlaybookSettings,
                 progress: Progress | None = None) -> None:
        self.client = client
        self.signer = signer
        self.genesis = genesis
        self.agency = signer.agency
        self.playbooks = [p for p in playbooks if p.owner == self.agency]
        self.settings = settings
        self.progress = progress or (lambda _msg: None)
        self.spool = StepSpool(settings.spool)
        self._lock = threading.Lock()
        self._steps: dict[str, node_pb2.PlaybookStepView] = {}
        self._rule_adds: set[tuple[str, bytes, str]] = set()
        self._follow_ups: dict[tuple[bytes, str], int] = defaultdict(int)
        self._hour: dict[str, list[int]] = defaultdict(list)
        self._cases: dict[str, OpenCase] = {}
        self._rule_files: dict[str, Any] | None = None

    def close(self) -> None:
        self.spool.close()

    # -- a round -----------------------------------------------------------------------
    def one_round(self, stopping: threading.Event | None = None) -> RoundReport:
        report = RoundReport()
        registered = self._registered()
        if not registered:
            return report
        findings = self._findings()
        self._load_cases(findings)
        self._load_hour()
        finished = self.spool.finished()
        jobs: list[_Job] = []
        for playbook in registered:
            for finding in findings:
                job = _Job(playbook, finding)
                if job.key in finished or not self._takes(playbook, finding, job):
                    continue
                jobs.append(job)
        report.jobs = len(jobs)
        if not jobs:
            return report
        # one subject's jobs run one after the other (the second finding about a company
        # joins the case the first opened), and so do the jobs of findings that link
        # their subjects (a ring's members: one case holds them all); the others run
        # side by side
        parent: dict[str, str] = {}

        def root(key: str) -> str:
            while parent.setdefault(key, key) != key:
                parent[key] = parent[parent[key]]
                key = parent[key]
            return key

        for job in jobs:
            key = job.finding.uscc or job.finding.subject
            for other in job.finding.linked:
                a, b = root(key), root(other)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        groups: dict[str, list[_Job]] = defaultdict(list)
        for job in sorted(jobs, key=lambda j: (j.finding.height, j.finding.finding_id)):
            groups[root(job.finding.uscc or job.finding.subject)].append(job)
        self.progress(f"playbooks: {len(jobs)} jobs on {len(groups)} subjects")
        with ThreadPoolExecutor(self.settings.workers, thread_name_prefix="playbook") as pool:
            list(pool.map(lambda g: self._run_group(g, report, stopping), groups.values()))
        return report

    def _registered(self) -> list[Playbook]:
        listing = self.client.list_playbooks(self.agency, with_steps=True)
        digests = {bytes(p.digest) for p in listing.playbooks}
        self._steps = {s.ref: s for s in listing.steps if s.kind != "rule"}
        self._rule_adds = {(s.ref, bytes(s.added_run_tx_id), s.added_finding_id)
                           for s in listing.steps if s.kind == "rule"}
        self._follow_ups = defaultdict(int)
        for s in listing.steps:
            ref = parse_step_ref(s.ref)
            if ref is not None and s.kind == "query":
                self._follow_ups[(ref.run_tx_id, ref.finding_id)] += 1
        chosen = []
        for p in self.playbooks:
            if p.digest in digests:
                chosen.append(p)
            else:
                log.warning("playbook not registered; not run", playbook=p.id,
                            version=p.version, digest=p.digest_hex[:16])
        return chosen

    def _findings(self) -> list[Finding]:
        listing = self.client.list_findings(node_pb2.ListFindingsRequest(
            open=True, all_runs=True))
        out = []
        for run in listing.runs:
            if not run.opened or run.case_id:
                continue  # not ours to read; or a rule step's run (its findings join a case)
            lines = {int(i): json.loads(line) for i, line in zip(run.line_index, run.lines,
                                                                 strict=True)}
            for index, summary in enumerate(run.findings):
                line = lines.get(index)
                if line is None:
                    continue
                out.append(Finding(
                    bytes(run.tx_id), summary.finding_id, run.rule_id, run.period,
                    summary.severity, run.owner_agency, run.height, run.time_ms,
                    str(line.get("subject", "")), _amount(line),
                    in_force=not run.superseded_by, linked=_linked(line)))
        return out

    def _load_cases(self, findings: Iterable[Finding]) -> None:
        """The agency's open cases and the subjects each holds: its findings' subjects and
        what its queries asked about."""
        by_key = {f.key: f for f in findings}
        cases: dict[str, OpenCase] = {}
        for c in self.client.list_cases().cases:
            if c.agency != self.agency or c.status != "open":
                continue
            case = cases[c.case_id] = OpenCase(c.case_id, c.opened_height)
            for ref_tx, finding_id in zip(c.ref_tx_ids, c.ref_finding_ids, strict=True):
                if finding_id:
                    case.holds.add((bytes(ref_tx), finding_id))
                    f = by_key.get((bytes(ref_tx), finding_id))
                    if f is not None:
                        case.subjects.update(f.reach)
        if cases:
            trail = self.client.audit(node_pb2.AuditRequest(agency=self.agency,
                                                            limit=100_000))
            for entry in trail.entries:
                q = entry.query
                if entry.kind == "query" and q.case_id in cases and \
                        q.requester_agency == self.agency:
                    for text in q.subjects:
                        key, _, value = text.partition("=")
                        if key in ("uscc", "person_id") or is_valid_uscc(value) or \
                                is_valid_person_id(value):
                            cases[q.case_id].subjects.add(value)
        with self._lock:
            self._cases = cases

    def _load_hour(self) -> None:
        since = int(time.time() * 1000) - HOUR_MS
        trail = self.client.audit(node_pb2.AuditRequest(agency=self.agency, since_ms=since,
                                                        limit=100_000))
        hour: dict[str, list[int]] = defaultdict(list)
        for entry in trail.entries:
            q = entry.query
            if entry.kind == "query" and q.requester_agency == self.agency and \
                    parse_step_ref(q.on_behalf_of) is not None and q.time_ms >= since:
                hour[q.target_agency].append(q.time_ms)
        with self._lock:
            self._hour = hour

    def _holder(self, finding: Finding) -> OpenCase | None:
        """The oldest open case of the agency that holds a subject of `finding` or a
        company it links them to."""
        reach = finding.reach
        with self._lock:
            holders = [c for c in self._cases.values() if c.subjects & reach]
        return min(holders, key=lambda c: (c.opened_height, c.case_id)) if holders else None

    def _takes(self, playbook: Playbook, finding: Finding, job: _Job) -> bool:
        if job.ref(0) in self._steps:
            return True  # begun: carried through whatever happened to the finding since
        if not finding.in_force:
            return False
        holder = self._holder(finding)
        new_on_case = holder is not None and finding.key not in holder.holds and \
            finding.height >= holder.opened_height
        return playbook.trigger.matches(finding.rule_id, finding.severity, finding.amount,
                                        new_on_case)

    # -- a job ---------------------------------------------------------------------------
    def _run_group(self, jobs: list[_Job], report: RoundReport,
                   stopping: threading.Event | None) -> None:
        group = _Group()
        for job in jobs:
            if stopping is not None and stopping.is_set():
                return
            try:
                outcome = self._run_job(job, report, group)
            except CaseClosed as exc:
                self.spool.finish(job.key, "case closed")
                with self._lock:
                    report.finished += 1
                log.info("playbook job ends: its case is closed", playbook=job.playbook.id,
                         finding=job.finding.finding_id, detail=str(exc))
                continue
            except Deferred as exc:
                with self._lock:
                    report.deferred += 1
                log.info("playbook job deferred", playbook=job.playbook.id,
                         finding=job.finding.finding_id, reason=str(exc))
                continue
            except ExchangeError as exc:
                with self._lock:
                    report.failed += 1
                log.warning("playbook job failed; retried next round",
                            playbook=job.playbook.id, finding=job.finding.finding_id,
                            error=str(exc))
                continue
            if outcome:
                self.spool.finish(job.key, outcome)
                with self._lock:
                    report.finished += 1

    def _run_job(self, job: _Job, report: RoundReport, group: _Group | None = None) -> str:
        playbook, finding = job.playbook, job.finding
        answers: dict[str, list[dict[str, Any]]] = {}
        case_id = ""
        for index, step in enumerate(playbook.steps):
            ref = job.ref(index)
            if isinstance(step, CaseStep):
                case_id = self._case_step(job, step, ref, report, group)
                if not case_id:
                    return ""  # mode add and no case holds the subject (yet)
                with self._lock:
                    report.cases.add(case_id)
            elif isinstance(step, QueryStep):
                answers[step.name] = self._query_step(job, step, ref, case_id, answers,
                                                      report)
            elif isinstance(step, RuleStep):
                self._rule_step(job, step, ref, case_id, report)
            else:
                self._notify_step(job, step, ref, case_id, report)
        log.info("playbook done for finding", playbook=playbook.id, finding=finding.finding_id,
                 case=case_id)
        self.progress(f"{playbook.id}: {finding.finding_id} -> case {case_id}")
        return case_id

    def _submit(self, job: _Job, slot: str, build: Callable[[], bytes]) -> tuple[bytes, str]:
        """Submit a step's envelope: the spooled one if any (the same transaction again),
        else a new one, spooled first. (tx id, result code)."""
        envelope = self.spool.get(job.key, slot)
        if envelope is None:
            envelope = build()
            self.spool.put(job.key, slot, envelope)
        txid = tx_id(ledger_pb2.Envelope.FromString(envelope).body)
        try:
            result = self.client.submit(envelope, wait=True)
        except TimeOutOfWindow:
            # too old to be admitted: committed long ago, or never and never will be
            try:
                info = self.client.get_transaction(txid)
                return txid, info.result
            except NotFound:
                pass
            envelope = build()
            self.spool.put(job.key, slot, envelope)
            txid = tx_id(ledger_pb2.Envelope.FromString(envelope).body)
            result = self.client.submit(envelope, wait=True)
        except (ExchangeError, OSError) as exc:
            raise Deferred(f"not committed yet: {exc}") from exc
        return txid, result.result

    def _step_on_ledger(self, ref: str) -> node_pb2.PlaybookStepView:
        """A step the ledger says is done (after a PLAYBOOK_STEP_DONE): ask again."""
        parsed = parse_step_ref(ref)
        assert parsed is not None
        listing = self.client.list_playbooks(self.agency, with_steps=True,
                                             digest=parsed.digest)
        for s in listing.steps:
            if s.ref == ref:
                with self._lock:
                    self._steps[ref] = s
                return s
        raise Deferred(f"step {ref} is done on the ledger but not listed yet")

    def _case_step(self, job: _Job, step: CaseStep, ref: str, report: RoundReport,
                   group: _Group | None = None) -> str:
        done = self._steps.get(ref)
        if done is not None:
            if group is not None:
                group.cases.setdefault(step.prefix, done.case_id)
            return done.case_id
        holder = self._holder(job.finding)
        if holder is None and group is not None and step.prefix in group.cases:
            # a linked finding of the same group (a ring's member) opened the case
            with self._lock:
                holder = self._cases.get(group.cases[step.prefix])
        if holder is None and step.mode == "add":
            with self._lock:
                report.skipped["no open case holds the subject"] += 1
            return ""
        case_id = holder.case_id if holder is not None else case_id_for(step.prefix, ref)
        action = "add" if holder is not None else "open"
        event = ledger_pb2.CaseEvent(case_id=case_id, action=action,
                                     ref_tx_id=job.finding.run_tx_id,
                                     finding_id=job.finding.finding_id,
                                     reason=step.reason, playbook_id=ref)
        txid, result = self._submit(job, "case", self._case_event_builder(event))
        if result == CODE_STEP_DONE:
            return self._step_on_ledger(ref).case_id
        if result != "OK":
            self.spool.discard(job.key, "case")  # never resend what the ledger refused
            raise Deferred(f"case step judged {result}")
        with self._lock:
            self._steps[ref] = node_pb2.PlaybookStepView(ref=ref, tx_id=txid, kind="case",
                                                         case_id=case_id)
            case = self._cases.setdefault(case_id, OpenCase(case_id, 0))
            case.subjects.update(job.finding.reach)
            if group is not None:
                group.cases.setdefault(step.prefix, case_id)
            case.holds.add(job.finding.key)
            report.steps["case " + action] += 1
        return case_id

    def _subjects(self, job: _Job, step: QueryStep,
                  answers: dict[str, list[dict[str, Any]]]) -> tuple[tuple[str, str], ...]:
        out: dict[tuple[str, str], None] = {}
        for ref in step.subjects:
            values: list[object]
            if ref.source == "finding":
                values = [job.finding.uscc if ref.column == "uscc" else job.finding.person_id]
            else:
                values = [row.get(ref.column) for row in answers.get(ref.source, [])]
            for value in values:
                if isinstance(value, str) and value:
                    out[(ref.key, value)] = None
        return tuple(out)[:SUBJECTS_PER_FOLLOW_UP_MAX]

    def _reserve_hour(self, target: str) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            sent = [t for t in self._hour[target] if t > now - HOUR_MS]
            if len(sent) >= self.settings.follow_ups_per_hour_per_agency:
                raise Deferred(f"{len(sent)} follow-ups to {target} in the last hour: the "
                               "bound is reached")
            sent.append(now)
            self._hour[target] = sent

    def _query_step(self, job: _Job, step: QueryStep, ref: str, case_id: str,
                    answers: dict[str, list[dict[str, Any]]],
                    report: RoundReport) -> list[dict[str, Any]]:
        done = self._steps.get(ref)
        if done is not None:
            qid = bytes(done.tx_id)
        else:
            with self._lock:
                asked = self._follow_ups[job.finding.key]
            if asked >= self.settings.follow_ups_per_finding_max:
                with self._lock:
                    report.skipped["follow-up bound per finding"] += 1
                log.info("follow-up not asked: bound per finding reached",
                         playbook=job.playbook.id, finding=job.finding.finding_id,
                         step=step.name, bound=self.settings.follow_ups_per_finding_max)
                return []
            subjects = self._subjects(job, step, answers)
            if not subjects:
                with self._lock:
                    report.skipped["no subject to ask about"] += 1
                return []
            period = (job.finding.period or None) if step.period == "finding" else None
            if period is None and step.month_required:
                with self._lock:
                    report.skipped["no month to ask for"] += 1
                return []
            spec = QuerySpec(
                target=step.agency, dataset=step.dataset, subjects=subjects, period=period,
                case_id=case_id, legal_basis=LEGAL_BASIS_TAX_CRIME, fields=step.fields,
                purpose=f"playbook {job.playbook.id} v{job.playbook.version}: {step.name} "
                        f"for finding {job.finding.finding_id}",
                shape=int(SHAPE.QUERY_SHAPE_SUBJECT if len(subjects) == 1
                          else SHAPE.QUERY_SHAPE_SUBJECT_SET),
                deadline_s=self.settings.follow_up_deadline_s, on_behalf_of=ref)
            if self.spool.get(job.key, ref) is None:
                self._reserve_hour(step.agency)
            # the members (their data keys) as the ledger has them now
            members = list(self.client.status().member_entries)
            qid, result = self._submit(job, ref, lambda: build_query(
                spec, self.signer, self.genesis, members=members)[0])
            if result == CODE_STEP_DONE:
                qid = bytes(self._step_on_ledger(ref).tx_id)
            elif result != "OK":
                self.spool.discard(job.key, ref)
                self._unless_closed(case_id)
                raise Deferred(f"follow-up {step.name} judged {result}")
            else:
                with self._lock:
                    self._steps[ref] = node_pb2.PlaybookStepView(ref=ref, tx_id=qid,
                                                                 kind="query", case_id=case_id)
                    self._follow_ups[job.finding.key] += 1
                    report.steps["follow-up"] += 1
        view = self.client.get_answer(qid, wait_ms=min(
            ANSWER_WAIT_MS_MAX, int(self.settings.answer_wait_s * 1000)))
        answer = read_answer(view)
        if answer.status == "answered":
            return answer.rows
        if answer.status in ("refused", "expired"):
            with self._lock:
                report.refused += answer.status == "refused"
            log.info("follow-up not answered", playbook=job.playbook.id, step=step.name,
                     status=answer.status, code=answer.query.refusal_code)
            return []
        raise Deferred(f"follow-up {step.name}: no answer yet")

    def _rule_step(self, job: _Job, step: RuleStep, ref: str, case_id: str,
                   report: RoundReport) -> None:
        from exchange.compare.network import NetworkRun, RunScope

        rule = self._rules().get(step.rule)
        if rule is None:
            raise ExchangeError(f"{self.agency} has no rule {step.rule}")
        with self._lock:
            subjects = sorted(self._cases.get(case_id, OpenCase(case_id, 0)).subjects
                              | set(job.finding.parts))
        scope = RunScope(case_id, tuple(
            ("uscc" if is_valid_uscc(s) else "person_id", s) for s in subjects
            if is_valid_uscc(s) or is_valid_person_id(s)))
        periods = [shift_period(job.finding.period, m) for m in step.months] \
            if rule.period_bound and job.finding.period else ([""] if not rule.period_bound
                                                              else [])
        for period in periods:
            runs = self.client.list_findings(node_pb2.ListFindingsRequest(
                owner_agency=self.agency, rule_id=rule.id, period=period)).runs
            run = next((r for r in runs if r.case_id == case_id
                        and bytes(r.rule_digest) == rule.digest), None)
            if run is None:
                result = NetworkRun(self.client, self.signer, self.genesis, rule,
                                    limits=self.settings.rule_limits).run(
                    {"period": period} if period else {}, scope)
                if result.result != "OK":
                    raise Deferred(f"rule {rule.id} for the case judged {result.result}")
                with self._lock:
                    report.steps["rule run"] += 1
                run_tx, summaries = result.findings_tx_id, result.finding_ids
            else:
                run_tx, summaries = bytes(run.tx_id), [f.finding_id for f in run.findings]
            for finding_id in summaries:
                if (ref, run_tx, finding_id) in self._rule_adds:
                    continue
                event = ledger_pb2.CaseEvent(case_id=case_id, action="add", ref_tx_id=run_tx,
                                             finding_id=finding_id, playbook_id=ref,
                                             reason=f"rule {rule.id} on the case's subjects")
                _, code = self._submit(job, f"{ref}/{run_tx.hex()}/{finding_id}",
                                       self._case_event_builder(event))
                if code not in ("OK", CODE_STEP_DONE):
                    self._unless_closed(case_id)
                    raise Deferred(f"adding {finding_id} to the case judged {code}")
                with self._lock:
                    self._rule_adds.add((ref, run_tx, finding_id))
                    report.steps["finding added"] += 1

    def _unless_closed(self, case_id: str) -> None:
        """After a step was refused: CaseClosed if that is because its case is closed."""
        cases = self.client.list_cases(case_id).cases
        if cases and cases[0].status != "open":
            raise CaseClosed(f"case {case_id} is {cases[0].status}")

    def _case_event_builder(self, event: ledger_pb2.CaseEvent) -> Callable[[], bytes]:
        def fill(body: ledger_pb2.TxBody) -> None:
            body.case_event.CopyFrom(event)

        return lambda: self.signer.make_envelope(fill)

    def _rules(self) -> dict[str, Any]:
        """The owner's rule files, read once per runner."""
        with self._lock:
            if self._rule_files is None:
                from exchange.compare.rule_file import load_rules

                self._rule_files = {r.id: r for r in load_rules(self.agency)}
            return self._rule_files

    def _notify_step(self, job: _Job, step: NotifyStep, ref: str, case_id: str,
                     report: RoundReport) -> None:
        if ref in self._steps:
            return
        f = job.finding
        text = step.render({"case": case_id, "finding": f.finding_id, "rule": f.rule_id,
                            "severity": f.severity, "period": f.period or "-",
                            "playbook": f"{job.playbook.id} v{job.playbook.version}"})
        event = ledger_pb2.CaseEvent(case_id=case_id, action="notify", reason=text,
                                     playbook_id=ref)
        txid, result = self._submit(job, ref, self._case_event_builder(event))
        if result not in ("OK", CODE_STEP_DONE):
            self.spool.discard(job.key, ref)
            self._unless_closed(case_id)
            raise Deferred(f"notification judged {result}")
        with self._lock:
            self._steps[ref] = node_pb2.PlaybookStepView(ref=ref, tx_id=txid, kind="notify",
                                                         case_id=case_id)
            report.steps["notify"] += 1


def playbooks_for_jobs(jobs: JobsRunner, base: Path) -> PlaybookRunner | None:
    """The playbook runner of a jobs runner (exchange.compare.jobs), with its client,
    signer and settings: its agency's playbooks, those the jobs config names if it
    names any (None when there are none to run). Passed to the jobs Runner by whoever
    builds it, since cases builds on compare and not the other way round."""
    config = jobs.config
    playbooks = load_playbooks(jobs.agency)
    if config.playbooks:
        missing = set(config.playbooks) - {p.id for p in playbooks}
        if missing:
            raise MalformedInput(f"{jobs.agency} has no playbook(s) "
                                 f"{', '.join(sorted(missing))}")
        playbooks = [p for p in playbooks if p.id in config.playbooks]
    if not playbooks:
        return None
    settings = PlaybookSettings(
        spool=config.spool_path(base, jobs.agency),
        follow_ups_per_finding_max=config.follow_ups_per_finding_max,
        follow_ups_per_hour_per_agency=config.follow_ups_per_hour_per_agency,
        workers=config.playbook_workers, rule_limits=config.rule_limits)
    return PlaybookRunner(jobs.client, jobs.signer, jobs.genesis, playbooks, settings,
                          jobs.progress)
