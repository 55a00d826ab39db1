"""Running a rule on the network: its queries (recorded like any other, on behalf of the
rule), its owner's own inputs (asked of the owner's own node, so that they are committed
too, decision 9), the SQL, and the signed findings transaction; and replaying a run from
the ledger to check its output digest.
"""

from __future__ import annotations

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
from exchange.ledger.sealing import seal
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2

SHAPE = ledger_pb2.QueryShape
ANSWER_WAIT_S = 120.0
Progress = Callable[[str], None]


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

    def _ask(self, specs: Sequence[QuerySpec]) -> list[bytes]:
        self._asked_agencies.update(spec.target for spec in specs)
        envs, ids = [], []
        for spec in specs:
            env, qid = build_query(spec, self.signer, self.genesis)
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
              period: str | None, fields: tuple[str, ...], name: str) -> QuerySpec:
        shape = SHAPE.QUERY_SHAPE_SUBJECT_SET if subjects else SHAPE.QUERY_SHAPE_AGGREGATE
        return QuerySpec(target=target, dataset=dataset, subjects=subjects, period=period,
                         purpose=f"rule {self.rule.id} v{self.rule.version}: input {name}",
                         legal_basis=LEGAL_BASIS_TAX_CRIME, fields=fields, shape=int(shape),
                         deadline_s=600, on_behalf_of=self.rule.digest_hex)

    def run(self, params: Mapping[str, str]) -> RunResult:
        started = time.perf_counter()
        self.ensure_registered()
        plan = self.rule.plan(params)
        inputs: dict[str, list[dict[str, Any]]] = {}
        input_ids: list[bytes] = []
        # the owner's own inputs, as answers its own node gives it
        own_ids = self._ask([self._spec(plan.owner, o.dataset, (), o.period, o.fields, o.name)
                             for o in plan.own])
        input_ids += own_ids
        for o, qid in zip(plan.own, own_ids, strict=True):
            inputs[o.name] = self._rows(qid, o.name)
            self.progress(f"own {o.dataset}: {len(inputs[o.name])} rows")
        for q in plan.queries:
            requests = q.requests(inputs)
            specs = [self._spec(q.agency, q.dataset, tuple(r.subjects), r.period,
                                tuple(r.fields), q.name) for r in requests]
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
        supersedes = [bytes(r.tx_id) for r in earlier]
        envelope = self._findings_envelope(plan.period, plan.parameters_json, input_ids,
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

        members = {m.agency: bytes(m.data_public_key) for m in self.genesis.members}
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
