"""Running a rule on the network: its queries (recorded like any other, on behalf of the
rule), its owner's own inputs (asked of the owner's own node, so that they are committed
too, decision 9), the SQL, and the signed findings transaction; and replaying a run from
the ledger to check its output digest.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from exchange.client import ExchangeClient, Signer
from exchange.compare.engine import RuleOutput, run_rule
from exchange.compare.rules import Rule, load_rule_bytes
from exchange.crossquery import QuerySpec, build_query, read_answer
from exchange.errors import ExchangeError, MalformedInput, ProofInvalid, Unavailable
from exchange.ledger.findings import summary_of
from exchange.ledger.policy import LEGAL_BASIS_TAX_CRIME
from exchange.ledger.sealing import canonical_json, seal
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2

SHAPE = ledger_pb2.QueryShape
ANSWER_WAIT_S = 120.0
Progress = Callable[[str], None]


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


def _typed(rule: Rule, name: str, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the engine takes them: the input's declared columns, amounts as Decimal."""
    columns = rule.input_columns[name]
    out = []
    for row in rows:
        typed: dict[str, Any] = {}
        for col in columns:
            value = row.get(col.name)
            if col.sql_type.startswith("DECIMAL") and value is not None:
                value = Decimal(str(value))
            typed[col.name] = value
        out.append(typed)
    return out


class NetworkRun:
    """One run of `rule` by the owner's automation, through its node."""

    def __init__(self, client: ExchangeClient, signer: Signer, genesis: identity_pb2.Genesis,
                 rule: Rule, progress: Progress | None = None) -> None:
        if signer.agency != rule.owner:
            raise MalformedInput(f"rule {rule.id} is {rule.owner}'s; the profile is "
                                 f"{signer.agency}'s")
        self.client = client
        self.signer = signer
        self.genesis = genesis
        self.rule = rule
        self.progress = progress or (lambda _msg: None)
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
        for start in range(0, len(envs), 500):
            results = self.client.submit_batch(envs[start:start + 500], wait=True)
            for r in results:
                if r.error_code:
                    raise ExchangeError(f"query refused: {r.error_code}: {r.error}")
                if r.result != "OK":
                    raise MalformedInput(f"query judged {r.result}")
        return ids

    def _rows(self, qid: bytes, name: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + ANSWER_WAIT_S
        while True:
            left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
            answer = read_answer(self.client.get_answer(qid, wait_ms=min(left_ms, 60_000)))
            if answer.status == "answered":
                return answer.rows
            if answer.status == "refused":
                q = answer.query
                raise MalformedInput(f"input {name}: {q.target_agency} refused: "
                                     f"{q.refusal_code}: {q.refusal_reason}")
            if answer.status == "expired" or time.monotonic() >= deadline:
                raise Unavailable(f"input {name}: no answer from "
                                  f"{answer.query.target_agency} in time")

    def _spec(self, target: str, dataset: str, subjects: tuple[tuple[str, str], ...],
              period: str | None, fields: tuple[str, ...], name: str,
              case_id: str = "") -> QuerySpec:
        shape = SHAPE.QUERY_SHAPE_SUBJECT_SET if subjects else SHAPE.QUERY_SHAPE_AGGREGATE
        return QuerySpec(target=target, dataset=dataset, subjects=subjects, period=period,
                         purpose=f"rule {self.rule.id} v{self.rule.version}: input {name}",
                         legal_basis=LEGAL_BASIS_TAX_CRIME, fields=fields, shape=int(shape),
                         deadline_s=600, on_behalf_of=self.rule.digest_hex, case_id=case_id)

    def run(self, params: Mapping[str, str], scope: RunScope | None = None) -> RunResult:
        """Run the rule with `params`; with a scope, on the case's subjects only."""
        started = time.perf_counter()
        self.ensure_registered()
        plan = self.rule.plan(params)
        case_id = scope.case_id if scope is not None else ""
        inputs: dict[str, list[dict[str, Any]]] = {}
        input_ids: list[bytes] = []
        # the owner's own inputs, as answers its own node gives it
        own_specs: list[tuple[Any, QuerySpec | None]] = []
        for o in plan.own:
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
            if spec is None:
                inputs[o.name] = []
                continue
            qid = next(own_ids)
            input_ids.append(qid)
            inputs[o.name] = self._rows(qid, o.name)
            self.progress(f"own {o.dataset}: {len(inputs[o.name])} rows")
        for q in plan.queries:
            requests = q.requests(inputs)
            if scope is not None and q.shape == "aggregate":
                subjects = scope.for_keys(_subject_kinds(q.agency, q.dataset))
                requests = [dataclasses.replace(r, subjects=subjects)
                            for r in requests] if subjects else []
            specs = [self._spec(q.agency, q.dataset, tuple(r.subjects), r.period,
                                tuple(r.fields), q.name, case_id) for r in requests]
            ids = self._ask(specs)
            input_ids += ids
            rows: list[dict[str, Any]] = []
            for qid in ids:
                rows += self._rows(qid, q.name)
            inputs[q.name] = rows
            self.progress(f"{q.agency} {q.dataset}: {len(rows)} rows")
        typed = {name: _typed(self.rule, name, rows) for name, rows in inputs.items()}
        output = run_rule(self.rule, typed, params)
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
                         result.result, output, input_ids,
                         sum(len(r) for r in inputs.values()),
                         time.perf_counter() - started, superseded=supersedes,
                         own_rows=sum(len(inputs[o.name]) for o in plan.own))

    def _findings_envelope(self, period: str, parameters: bytes, input_ids: list[bytes],
                           output: RuleOutput, supersedes: list[bytes]) -> bytes:
        from exchange.ledger.findings import inputs_digest

        # the data keys as the ledger has them now (an agency may have rotated its own)
        members = {m.agency: bytes(m.data_public_key) for m in self._current_members()}
        used = [self.rule.owner] + sorted(set(self._asked_agencies) - {self.rule.owner})
        sealed, salt = seal(output.canonical_bytes, [members[a] for a in used],
                         chain_id=self.signer.chain_id,
                         context_tx_id=inputs_digest(input_ids), chunk=0)
        lines = output.lines
        findings = ledger_pb2.Findings(
            rule_digest=self.rule.digest, rule_id=self.rule.id, period=period,
            parameters=parameters, input_tx_ids=input_ids, output_digest=output.digest,
            finding_count=len(lines), sealed_output=sealed, supersedes=supersedes,
            engine_version=f"duckdb {output.duckdb_version}",
            findings=[summary_of(finding_id(self.rule.id, period, n),
                                 str(row.get("severity", self.rule.severity)), line, salt)
                      for n, (row, line) in enumerate(zip(output.rows, lines, strict=True))])
        return self.signer.make_envelope(lambda body: body.findings.CopyFrom(findings))


def finding_id(rule_id: str, period: str, index: int) -> str:
    """A finding's id in clear on the ledger: rule, period and its place in the run's
    output (sorted by subject). It names no subject: subjects and amounts are sealed."""
    return f"{rule_id}/{period or '-'}/{index + 1}"


def _tx_id(envelope: bytes) -> bytes:
    from exchange.ledger.block import tx_id

    return tx_id(ledger_pb2.Envelope.FromString(envelope).body)


def replay(client: ExchangeClient, run_tx_id: bytes) -> tuple[node_pb2.FindingsRun, RuleOutput]:
    """Re-run a findings run from the ledger: the registered rule's canonical bytes, the
    answers it names (opened by the caller's node), the same parameters; ProofInvalid
    unless the output digest is the one committed."""
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
    inputs: dict[str, list[dict[str, Any]]] = {n: [] for n in rule.input_names}
    ids = [bytes(t) for t in run.input_tx_ids]
    by_query: dict[bytes, str] = {}
    for qid in ids:
        view = client.get_answer(qid)
        q = view.query
        name = _input_name(rule, q, names)
        by_query[qid] = name
        inputs[name] += read_answer(view).rows
    typed = {name: _typed(rule, name, rows) for name, rows in inputs.items()}
    output = run_rule(rule, typed, params)
    if output.digest != bytes(run.output_digest):
        raise ProofInvalid(f"replayed output digest {output.digest.hex()} differs from the "
                           f"committed {bytes(run.output_digest).hex()}")
    return run, output


def _input_name(rule: Rule, q: node_pb2.QueryView, own_names: list[str]) -> str:
    """Which input of the rule an answered query was: its purpose names it."""
    marker = ": input "
    if marker not in q.purpose:
        raise ProofInvalid(f"query {q.tx_id.hex()} does not name a rule input")
    name = q.purpose.rsplit(marker, 1)[1]
    if name not in rule.input_names:
        raise ProofInvalid(f"query {q.tx_id.hex()} names unknown input {name!r}")
    return name
