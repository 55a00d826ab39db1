"""Running a rule on the network: its queries (recorded like any other, on behalf of the
rule), its owner's own inputs (asked of the owner's own node, so that they are committed
too, decision 9), the SQL, and the signed findings transaction; and replaying a run from
the ledger to check its output digest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agents.lookup import SUBJECTS_MAX
from exchange.client import ExchangeClient, Signer
from exchange.client.crossquery import CheckedAnswer, QuerySpec, build_query
from exchange.compare.duck import RuleLimits
from exchange.compare.engine import RuleOutput
from exchange.compare.own_inputs import input_name_in, input_purpose
from exchange.compare.rule_file import load_rule_bytes
from exchange.compare.rules import PlannedQuery, Rule
from exchange.compare.session import RunSession
from exchange.errors import ExchangeError, MalformedInput, ProofInvalid, Unavailable
from exchange.identity.default_policies import LEGAL_BASIS_TAX_CRIME
from exchange.ledger.findings import summary_of
from exchange.ledger.sealing import canonical_json, seal
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2

SHAPE = ledger_pb2.QueryShape
# A rule's queries may wait this long for their answers: a period-wide view of the
# city's register takes its owner minutes to compute and seal, behind other answers.
QUERY_DEADLINE_S = 900
# A run waits for an answer until just after its query's deadline, when the ledger
# expires an unanswered query.
ANSWER_WAIT_S = QUERY_DEADLINE_S + 30.0
SUBMIT_BATCH_MAX = 500
# Subjects one query of a subject set names: its sealed request (about 30 bytes a
# subject) stays far below the genesis's envelope limit (1 MiB by default).
SUBJECTS_PER_QUERY_MAX_DEFAULT = 20_000
# Output bytes a Findings transaction carries inline; a larger output goes in chunks of
# at most this many bytes of lines, whose summaries (about 40 % more) and sealing
# overhead keep each envelope below the 1 MiB default limit.
FINDINGS_CHUNK_BYTES_DEFAULT = 384 * 1024
FINDINGS_CHUNK_BYTES_MAX = 512 * 1024
Progress = Callable[[str], None]


@dataclass(frozen=True)
class RunBounds:
    """What bounds one run's use of messages and disk (jobs config)."""

    subjects_per_query_max: int = SUBJECTS_PER_QUERY_MAX_DEFAULT
    spool_dir: Path | None = None  # where streamed inputs are spooled (default: $TMPDIR)
    # A run's output larger than this goes in FindingsChunk transactions.
    findings_chunk_bytes: int = FINDINGS_CHUNK_BYTES_DEFAULT

    @classmethod
    def with_overrides(cls, **given: Any) -> RunBounds:
        """The defaults, with each bound given (not None) instead."""
        return cls(**{k: v for k, v in given.items() if v is not None})

    def __post_init__(self) -> None:
        if not 1 <= self.subjects_per_query_max <= SUBJECTS_MAX:
            raise MalformedInput(f"subjects_per_query_max is 1..{SUBJECTS_MAX}, got "
                                 f"{self.subjects_per_query_max}")
        if not 256 <= self.findings_chunk_bytes <= FINDINGS_CHUNK_BYTES_MAX:
            raise MalformedInput(f"findings_chunk_bytes is 256..{FINDINGS_CHUNK_BYTES_MAX}, "
                                 f"got {self.findings_chunk_bytes}")


@dataclass(frozen=True)
class RunScope:
    """A run restricted to a case's subjects (a playbook's rule step): every input is
    asked about those subjects only (an own read or a period-wide view becomes a lookup of
    them), every query names the case, and the run's parameters name it, so that it
    supersedes only earlier runs for the case (ledger/findings.py)."""

    case_id: str
    subjects: tuple[tuple[str, str], ...]  # (uscc or person_id, value)

    def for_keys(self, keys: Sequence[str]) -> tuple[tuple[str, str], ...]:
        """The subjects an input looked up by `keys` can take."""
        return tuple(s for s in self.subjects if s[0] in keys)


def _subject_kinds(agency: str, dataset: str) -> tuple[str, ...]:
    """The subject kinds (uscc, person_id) an agency's dataset or view is looked up by."""
    from agents import datasets_of, views_of
    from agents.common.schema import Kind

    datasets = {d.name: d for d in datasets_of(agency)}
    if dataset in datasets:
        kinds = {c.kind for c in datasets[dataset].columns}
        return tuple(k for k in ("uscc", "person_id")
                     if Kind(k) in kinds or Kind.HOLDER_ID in kinds)
    view = views_of(agency)[dataset]
    return tuple(k for k in ("uscc", "person_id") if any(c.type == k for c in view.columns))


@dataclass
class RunResult:
    rule_id: str
    period: str
    findings_tx_id: bytes
    height: int
    result: str
    output: RuleOutput
    input_tx_ids: list[bytes]
    rows_in: int
    seconds: float
    own_rows: int = 0
    superseded: list[bytes] = field(default_factory=list)
    answer_chunks: int = 0  # chunks of the inputs' answers streamed in
    findings_chunks: int = 0  # FindingsChunk transactions of the output (0: inline)

    @property
    def finding_ids(self) -> list[str]:
        """The ids of the run's findings, in output order."""
        return [finding_id(self.rule_id, self.period, n) for n in range(len(self.output.rows))]


class NetworkRun:
    """One run of `rule` by the owner's automation, through its node."""

    def __init__(self, client: ExchangeClient, signer: Signer, genesis: identity_pb2.Genesis,
                 rule: Rule, progress: Progress | None = None,
                 bounds: RunBounds | None = None,
                 limits: RuleLimits | None = None) -> None:
        if signer.agency != rule.owner:
            raise MalformedInput(f"rule {rule.id} is {rule.owner}'s; the profile is "
                                 f"{signer.agency}'s")
        self.client = client
        self.signer = signer
        self.genesis = genesis
        self.rule = rule
        self.progress = progress or (lambda _msg: None)
        self.bounds = bounds or RunBounds()
        self._answer_chunks = 0
        self._findings_chunks = 0
        self.limits = limits or RuleLimits()
        self._asked_agencies: set[str] = set()

    def ensure_registered(self) -> None:
        rules = self.client.list_rules(self.rule.owner).rules
        if not any(bytes(r.digest) == self.rule.digest for r in rules):
            raise MalformedInput(
                f"rule {self.rule.id} version {self.rule.version} (digest "
                f"{self.rule.digest_hex[:16]}) is not registered; a supervisor of "
                f"{self.rule.owner} registers it with `exchange rules register`")

    def _current_members(self) -> list[identity_pb2.Member]:
        """The members as the ledger has them now (data keys rotate, agencies join), from
        the runner's own node, which verified every block that changed them."""
        return list(self.client.status().member_entries) or list(self.genesis.members)

    def _ask(self, specs: Sequence[QuerySpec]) -> list[bytes]:
        self._asked_agencies.update(spec.target for spec in specs)
        envs, ids = [], []
        members = self._current_members()
        for spec in specs:
            env, qid = build_query(spec, self.signer, self.genesis, members=members)
            envs.append(env)
            ids.append(qid)
        for start in range(0, len(envs), SUBMIT_BATCH_MAX):
            results = self.client.submit_batch(envs[start:start + SUBMIT_BATCH_MAX],
                                               wait=True)
            for r in results:
                if r.error_code:
                    raise ExchangeError(f"query refused: {r.error_code}: {r.error}")
                if r.result != "OK":
                    raise MalformedInput(f"query judged {r.result}")
        return ids

    def _stream_into(self, session: RunSession, qid: bytes, name: str) -> int:
        """Stream one answer's chunks into input `name` of the run; its row count.
        Waits for the answer up to ANSWER_WAIT_S."""
        deadline = time.monotonic() + ANSWER_WAIT_S
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            answer = CheckedAnswer.of_stream(
                self.client.stream_answer(qid, wait_ms=min(left_ms, 60_000)))
            if answer.status == "answered":
                for plaintext in answer:
                    session.append_jsonl(name, plaintext)
                    self._answer_chunks += 1
                return answer.rows
            q = answer.query
            if answer.status == "refused":
                raise MalformedInput(f"input {name}: {q.target_agency} refused: "
                                     f"{q.refusal_code}: {q.refusal_reason}")
            if answer.status == "expired" or time.monotonic() >= deadline:
                raise Unavailable(f"input {name}: no answer from {q.target_agency} in time")

    def _spec(self, target: str, dataset: str, subjects: tuple[tuple[str, str], ...],
              period: str | None, fields: tuple[str, ...], name: str,
              case_id: str = "") -> QuerySpec:
        shape = SHAPE.QUERY_SHAPE_SUBJECT_SET if subjects else SHAPE.QUERY_SHAPE_AGGREGATE
        return QuerySpec(target=target, dataset=dataset, subjects=subjects, period=period,
                         purpose=input_purpose(self.rule.id, self.rule.version, name),
                         legal_basis=LEGAL_BASIS_TAX_CRIME, fields=fields, shape=int(shape),
                         deadline_s=QUERY_DEADLINE_S, on_behalf_of=self.rule.digest_hex,
                         case_id=case_id)

    def run(self, params: Mapping[str, str], scope: RunScope | None = None,
            own_inputs: Mapping[str, bytes] | None = None) -> RunResult:
        """Run the rule with `params`; with a scope, on the case's subjects only. Every
        answer streams chunk by chunk into the run's DuckDB (spooled on disk), so the
        size of the inputs is bounded by neither a message nor this process's memory.
        `own_inputs`: inputs asked whole (own reads, period-wide views) already committed
        for several rules at once (input name -> query id, exchange.compare.own_inputs),
        referenced instead of asked anew."""
        shared = dict(own_inputs or {}) if scope is None else {}
        started = time.perf_counter()
        self.ensure_registered()
        plan = self.rule.plan(params)
        case_id = scope.case_id if scope is not None else ""
        input_ids: list[bytes] = []
        rows_in = own_rows = 0
        with RunSession(self.rule, self.bounds.spool_dir, self.limits) as session:
            # the owner's own inputs, as answers its own node gives it
            own_specs: list[tuple[Any, QuerySpec | None]] = []
            for o in plan.own:
                if o.name in shared:
                    own_specs.append((o, None))
                    continue
                subjects: tuple[tuple[str, str], ...] = ()
                if scope is not None:
                    subjects = scope.for_keys(_subject_kinds(plan.owner, o.dataset))
                    if not subjects:  # nothing about the case's subjects: an empty input
                        own_specs.append((o, None))
                        continue
                own_specs.append((o, self._spec(plan.owner, o.dataset, subjects, o.period,
                                                o.fields, o.name, case_id)))
            own_ids = iter(self._ask([s for _, s in own_specs if s is not None]))
            for o, spec in own_specs:
                if o.name in shared:
                    input_ids.append(shared[o.name])
                    self._stream_into(session, shared[o.name], o.name)
                elif spec is not None:
                    qid = next(own_ids)
                    input_ids.append(qid)
                    self._stream_into(session, qid, o.name)
                n = session.finish(o.name)
                own_rows += n
                self.progress(f"own {o.dataset}: {n} rows")
            for q in plan.queries:
                if q.name in shared:  # asked for several rules: the findings go to q.agency
                    self._asked_agencies.add(q.agency)
                    ids = [shared[q.name]]
                else:
                    ids = self._ask_input(session, q, scope, case_id)
                input_ids += ids
                for qid in ids:
                    self._stream_into(session, qid, q.name)
                n = session.finish(q.name)
                rows_in += n
                self.progress(f"{q.agency} {q.dataset}: {n} rows")
            output = session.run(params)
        self.progress(f"{len(output.rows)} findings")
        earlier = self.client.list_findings(node_pb2.ListFindingsRequest(
            owner_agency=plan.owner, rule_id=self.rule.id, period=plan.period)).runs
        supersedes = [bytes(r.tx_id) for r in earlier if r.case_id == case_id]
        parameters = plan.parameters_json if scope is None else canonical_json(
            {**dict(plan.parameters), "case": case_id})
        envelope = self._findings_envelope(plan.period, parameters, input_ids,
                                           output, supersedes)
        result = self.client.submit(envelope, wait=True)
        return RunResult(self.rule.id, plan.period, _tx_id(envelope), result.height,
                         result.result, output, input_ids, rows_in + own_rows,
                         time.perf_counter() - started, superseded=supersedes,
                         own_rows=own_rows, answer_chunks=self._answer_chunks,
                         findings_chunks=self._findings_chunks)

    def _ask_input(self, session: RunSession, q: PlannedQuery, scope: RunScope | None,
                   case_id: str) -> list[bytes]:
        """Ask the queries answering input `q`: one for a period-wide view; for a subject
        set, one per `subjects_per_query_max` of the source column's distinct values
        (read back from the run's DuckDB in sorted batches), none for no subject."""
        if scope is not None and q.shape == "aggregate":
            subjects = scope.for_keys(_subject_kinds(q.agency, q.dataset))
            if not subjects:
                return []
            return self._ask([self._spec(q.agency, q.dataset, subjects, q.period, q.fields,
                                         q.name, case_id)])
        if q.shape == "aggregate":
            return self._ask([self._spec(q.agency, q.dataset, (), q.period, q.fields,
                                         q.name, case_id)])
        assert q.subjects_from is not None and q.subject_key is not None, q.name
        source, column = q.subjects_from
        ids: list[bytes] = []
        specs: list[QuerySpec] = []
        for values in session.distinct(source, column, self.bounds.subjects_per_query_max):
            subjects = tuple((q.subject_key, v) for v in values)
            specs.append(self._spec(q.agency, q.dataset, subjects, q.period, q.fields,
                                    q.name, case_id))
            if len(specs) == SUBMIT_BATCH_MAX:
                ids += self._ask(specs)
                specs = []
        return ids + (self._ask(specs) if specs else [])

    def _findings_envelope(self, period: str, parameters: bytes, input_ids: list[bytes],
                           output: RuleOutput, supersedes: list[bytes]) -> bytes:
        """The run's Findings envelope. An output larger than `findings_chunk_bytes`
        goes first, in FindingsChunk transactions (committed here), which it names."""
        from exchange.ledger.findings import inputs_digest

        # the data keys as the ledger has them now (an agency may have rotated its own)
        members = {m.agency: bytes(m.data_public_key) for m in self._current_members()}
        used = [self.rule.owner] + sorted(set(self._asked_agencies) - {self.rule.owner})
        recipients = [members[a] for a in used]
        context = inputs_digest(input_ids)
        lines = output.lines
        groups = _line_groups(lines, self.bounds.findings_chunk_bytes)
        findings = ledger_pb2.Findings(
            rule_digest=self.rule.digest, rule_id=self.rule.id, period=period,
            parameters=parameters, input_tx_ids=input_ids, output_digest=output.digest,
            finding_count=len(lines), supersedes=supersedes,
            engine_version=f"duckdb {output.duckdb_version}")
        parts = []
        for index, (start, end) in enumerate(groups):
            sealed, salt = seal(b"".join(lines[start:end]), recipients,
                                chain_id=self.signer.chain_id, context_tx_id=context,
                                chunk=index)
            summaries = [summary_of(finding_id(self.rule.id, period, n),
                                    str(output.rows[n].get("severity", self.rule.severity)),
                                    lines[n], salt) for n in range(start, end)]
            parts.append((sealed, summaries))
        if len(parts) == 1:
            sealed, summaries = parts[0]
            findings.sealed_output.CopyFrom(sealed)
            findings.findings.extend(summaries)
        else:
            chunk_envs = []
            for index, (sealed, summaries) in enumerate(parts):
                chunk = ledger_pb2.FindingsChunk(
                    rule_digest=self.rule.digest, period=period, run_inputs_digest=context,
                    index=index, findings=summaries, sealed_output=sealed)
                chunk_envs.append(self.signer.make_envelope(_setting_chunk(chunk)))
            for start in range(0, len(chunk_envs), SUBMIT_BATCH_MAX):
                batch = chunk_envs[start:start + SUBMIT_BATCH_MAX]
                for r in self.client.submit_batch(batch, wait=True):
                    if r.error_code or r.result != "OK":
                        raise ExchangeError(f"findings chunk refused: {r.error_code or r.result}"
                                            f": {r.error}")
            findings.chunk_tx_ids.extend(_tx_id(e) for e in chunk_envs)
            self._findings_chunks = len(chunk_envs)
            self.progress(f"findings in {len(chunk_envs)} chunks")
        return self.signer.make_envelope(lambda body: body.findings.CopyFrom(findings))


def _setting_chunk(chunk: ledger_pb2.FindingsChunk) -> Callable[[ledger_pb2.TxBody], None]:
    def fill(body: ledger_pb2.TxBody) -> None:
        body.findings_chunk.CopyFrom(chunk)
    return fill


def _line_groups(lines: Sequence[bytes], chunk_bytes: int) -> list[tuple[int, int]]:
    """Consecutive ranges of lines of at most `chunk_bytes` each (a longer line alone);
    no lines: one empty range."""
    groups: list[tuple[int, int]] = []
    start = size = 0
    for n, line in enumerate(lines):
        if n > start and size + len(line) > chunk_bytes:
            groups.append((start, n))
            start, size = n, 0
        size += len(line)
    groups.append((start, len(lines)))
    return groups


def finding_id(rule_id: str, period: str, index: int) -> str:
    """A finding's id in clear on the ledger: rule, period and its place in the run's
    output (sorted by subject). It names no subject: subjects and amounts are sealed."""
    return f"{rule_id}/{period or '-'}/{index + 1}"


def _tx_id(envelope: bytes) -> bytes:
    from exchange.ledger.block import tx_id

    return tx_id(ledger_pb2.Envelope.FromString(envelope).body)


def replay(client: ExchangeClient, run_tx_id: bytes, limits: RuleLimits | None = None,
           spool_dir: Path | None = None) -> tuple[node_pb2.FindingsRun, RuleOutput]:
    """Re-run a findings run from the ledger: the registered rule's canonical bytes, the
    answers it names (opened by the caller's node, streamed into the run's DuckDB), the
    same parameters, within `limits`; ProofInvalid unless the output digest is the one
    committed."""
    runs = client.list_findings(node_pb2.ListFindingsRequest(all_runs=True)).runs
    run = next((r for r in runs if bytes(r.tx_id) == run_tx_id), None)
    if run is None:
        raise MalformedInput(f"no findings run {run_tx_id.hex()} on the ledger")
    registered = next((r for r in client.list_rules(run.owner_agency).rules
                       if bytes(r.digest) == bytes(run.rule_digest)), None)
    if registered is None:
        raise ProofInvalid("the run names a rule that is not registered")
    rule = load_rule_bytes(bytes(registered.canonical), f"ledger:{run.rule_id}")
    if rule.digest != bytes(run.rule_digest):
        raise ProofInvalid("the registered rule's canonical bytes do not load to its digest")
    stored = client.get_transaction(bytes(run.tx_id))
    body = ledger_pb2.TxBody.FromString(ledger_pb2.Envelope.FromString(stored.envelope).body)
    import json

    params = json.loads(body.findings.parameters or b"{}")
    params.pop("case", None)  # a run restricted to a case's subjects: its inputs say which
    plan = rule.plan(params)
    names = [o.name for o in plan.own]
    with RunSession(rule, spool_dir, limits) as session:
        for qid in [bytes(t) for t in run.input_tx_ids]:
            answer = CheckedAnswer.of_stream(client.stream_answer(qid))
            name = _input_name(rule, answer.query, names)
            if answer.status != "answered":
                raise ProofInvalid(f"input {qid.hex()} of the run is {answer.status}")
            for plaintext in answer:
                session.append_jsonl(name, plaintext)
        for name in rule.input_names:
            session.finish(name)
        output = session.run(params)
    if output.digest != bytes(run.output_digest):
        raise ProofInvalid(f"replayed output digest {output.digest.hex()} differs from the "
                           f"committed {bytes(run.output_digest).hex()}")
    return run, output


def _input_name(rule: Rule, q: node_pb2.QueryView, own_names: list[str]) -> str:
    """Which input of the rule an answered query was: its purpose names it (for an own
    input asked once for several rules, in the part naming this rule)."""
    name = input_name_in(q.purpose, rule.id, rule.version)
    if name is None:
        raise ProofInvalid(f"query {q.tx_id.hex()} does not name a rule input")
    if name not in rule.input_names:
        raise ProofInvalid(f"query {q.tx_id.hex()} names unknown input {name!r}")
    return name
