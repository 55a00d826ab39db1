"""The notification events of a committed block: each new finding, each case event (open,
add, close, notify) and each step of a case (a query naming it, its answer or refusal).
`exchange watch` shows them as they commit and a node posts those concerning its agency
to its webhook. Each event has a stable id (the transaction's id, and the finding's for a
finding), so a receiver that is sent one twice (after a crash) can tell.

Building them needs the ledger's state for what a transaction does not say itself (the
case of an answered query) and a data key for what is sealed (a finding's subject and
amount): an `EventSource` gives both, through a node's API (watch) or from the node's
own state (webhooks). Only what the source may read is included.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from exchange.cases.playbooks import severity_rank
from exchange.ledger.findings import run_case
from exchange.ledger.playbooks import parse_step_ref
from exchange.v1 import ledger_pb2

KINDS = ("finding", "case", "query", "answer", "refusal")


@dataclass(frozen=True)
class QueryFacts:
    """What the ledger holds about a query, for the events of its outcome."""

    case_id: str
    requester: str
    target: str
    dataset: str


class EventSource(Protocol):
    """What building events needs beyond the block."""

    def query_facts(self, query_tx_id: bytes) -> QueryFacts | None:
        """The query's case, requester, target and dataset (None if unknown)."""

    def finding_lines(self, run_tx_id: bytes,
                      findings: ledger_pb2.Findings) -> Mapping[int, Mapping[str, Any]]:
        """The finding lines of a run this source may read, by index ({} if none)."""

    def finding_parties(self, run_tx_id: bytes, findings: ledger_pb2.Findings) -> set[str]:
        """The run's owner and the agencies whose data it used."""

    def finding_summaries(self, run_tx_id: bytes, findings: ledger_pb2.Findings
                          ) -> list[tuple[str, str]]:
        """(finding id, severity) of each finding of a run whose output is in chunks."""

    def case_opener(self, case_id: str) -> str:
        """The agency that opened the case ("" if unknown)."""


@dataclass
class Event:
    id: str
    kind: str
    height: int
    time_ms: int
    tx: str
    data: dict[str, Any] = field(default_factory=dict)
    parties: frozenset[str] = frozenset()  # the agencies it concerns

    @property
    def case_id(self) -> str:
        return str(self.data.get("case", ""))

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, "event": self.kind, "height": self.height,
                "time_ms": self.time_ms, "tx": self.tx, **self.data}

    def to_json(self) -> bytes:
        return json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"),
                          ensure_ascii=False, default=str).encode()

    def concerns(self, agency: str) -> bool:
        return agency in self.parties


def block_events(height: int, time_ms: int,
                 transactions: Iterable[tuple[bytes, ledger_pb2.TxBody, str]],
                 source: EventSource) -> list[Event]:
    """The events of one block: (tx id, body, result code) of each transaction, in
    order; only valid ones make events."""
    out: list[Event] = []
    for txid, body, code in transactions:
        if code != "OK":
            continue
        kind = body.WhichOneof("kind")
        at = (height, time_ms, txid.hex())
        if kind == "findings":
            out.extend(_finding_events(at, txid, body, source))
        elif kind == "case_event":
            out.append(_case_event(at, body, source))
        elif kind == "query" and body.query.case_id:
            out.append(_query_event(at, body))
        elif kind in ("answer_manifest", "refusal"):
            event = _outcome_event(at, body, kind, source)
            if event is not None:
                out.append(event)
    return out


# Where an event happened: (height, block time in ms, tx id in hex).
_At = tuple[int, int, str]


def _finding_events(at: _At, txid: bytes, body: ledger_pb2.TxBody,
                    source: EventSource) -> list[Event]:
    """One event per finding of a run, with its subject and amount where the run's
    lines are open to this node."""
    height, time_ms, tx = at
    f = body.findings
    lines = source.finding_lines(txid, f)
    parties = frozenset(source.finding_parties(txid, f))
    scope = run_case(bytes(f.parameters))
    summaries = (source.finding_summaries(txid, f) if f.chunk_tx_ids
                 else [(s.finding_id, s.severity) for s in f.findings])
    out = []
    for index, (finding_id, severity) in enumerate(summaries):
        data: dict[str, Any] = {
            "finding": finding_id, "severity": severity,
            "rule": f.rule_id, "period": f.period, "owner": body.agency, "run": tx}
        if scope:
            data["case"] = scope
        line = lines.get(index)
        if line is not None:
            data["subject"] = line.get("subject")
            data["amount"] = line.get("amount")
        out.append(Event(f"{tx}/{finding_id}", "finding", height, time_ms, tx, data,
                         parties))
    return out


def _case_event(at: _At, body: ledger_pb2.TxBody, source: EventSource) -> Event:
    height, time_ms, tx = at
    ev = body.case_event
    opener = source.case_opener(ev.case_id) or body.agency
    data: dict[str, Any] = {"case": ev.case_id, "action": ev.action, "agency": body.agency,
                            "reason": ev.reason}
    if ev.finding_id:
        data.update(finding=ev.finding_id, run=bytes(ev.ref_tx_id).hex())
    elif ev.ref_tx_id:
        data["ref"] = bytes(ev.ref_tx_id).hex()
    step = parse_step_ref(ev.playbook_id)
    if step is not None:
        data.update(playbook=step.digest.hex(), step=step.step_key,
                    for_finding=step.finding_id)
    return Event(tx, "case", height, time_ms, tx, data, frozenset({opener, body.agency}))


def _query_event(at: _At, body: ledger_pb2.TxBody) -> Event:
    height, time_ms, tx = at
    q = body.query
    data: dict[str, Any] = {"case": q.case_id, "from": body.agency, "to": q.target_agency,
                            "dataset": q.dataset, "purpose": q.purpose}
    step = parse_step_ref(q.on_behalf_of)
    if step is not None:
        data.update(playbook=step.digest.hex(), step=step.step_key,
                    for_finding=step.finding_id)
    elif q.on_behalf_of:
        data["rule"] = q.on_behalf_of
    return Event(tx, "query", height, time_ms, tx, data,
                 frozenset({body.agency, q.target_agency}))


def _outcome_event(at: _At, body: ledger_pb2.TxBody, kind: str,
                   source: EventSource) -> Event | None:
    """An answer or refusal of a query asked within a case (None for one without)."""
    height, time_ms, tx = at
    outcome = getattr(body, kind)
    facts = source.query_facts(bytes(outcome.query_tx_id))
    if facts is None or not facts.case_id:
        return None
    data: dict[str, Any] = {"case": facts.case_id,
                            "query": bytes(outcome.query_tx_id).hex(),
                            "from": facts.target, "to": facts.requester,
                            "dataset": facts.dataset}
    if kind == "answer_manifest":
        data["rows"] = int(outcome.row_count)
    else:
        data.update(code=outcome.code, reason=outcome.reason)
    return Event(tx, "answer" if kind == "answer_manifest" else "refusal", height, time_ms,
                 tx, data, frozenset({facts.requester, facts.target}))


def wanted(event: Event, case_id: str = "", severity: str = "") -> bool:
    """The filters of `exchange watch`: one case's events; findings of a severity or
    higher (other events pass)."""
    if case_id and event.case_id != case_id:
        return False
    return not (severity and event.kind == "finding" and
                severity_rank(str(event.data.get("severity"))) < severity_rank(severity))


def line_of(event: Event) -> str:
    """One line for people."""
    d = event.data
    head = f"h{event.height:<6} {event.kind:<8}"
    if event.kind == "finding":
        about = f" {d['subject']} {d.get('amount') or ''}".rstrip() if d.get("subject") \
            else " (sealed)"
        scope = f" [case {d['case']}]" if d.get("case") else ""
        return f"{head} {d['finding']} {d['severity']} ({d['owner']}){about}{scope}"
    if event.kind == "case":
        what = f" finding {d['finding']}" if d.get("finding") else ""
        by = f" by playbook {d['playbook'][:16]} step {d['step']}" if d.get("playbook") \
            else ""
        reason = f": {d['reason']}" if d.get("reason") else ""
        return f"{head} {d['case']} {d['action']} by {d['agency']}{by}{what}{reason}"
    if event.kind == "query":
        by = f" (playbook step {d['step']})" if d.get("step") else ""
        return f"{head} {d['case']} {d['from']} -> {d['to']} {d['dataset']}{by}: " \
               f"{d['purpose']}"
    if event.kind == "answer":
        return f"{head} {d['case']} {d['from']} -> {d['to']} {d['dataset']}: {d['rows']} rows"
    return f"{head} {d['case']} {d['from']} refused {d['to']} {d['dataset']}: " \
           f"{d['code']} {d['reason']}"
