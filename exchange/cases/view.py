"""What a case holds, as one agency's node shows it: the case events, the findings that
opened or joined it, every query naming it with its answer (the rows decrypted where
this agency may read them) or refusal, and the subjects linked so far. `exchange case
show` prints it as a timeline and `exchange case graph` draws it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agents.common.checks import is_valid_person_id, is_valid_uscc
from exchange.client import ExchangeClient
from exchange.client.crossquery import read_answer
from exchange.errors import ExchangeError, MalformedInput
from exchange.ledger.block import parse_header
from exchange.ledger.playbooks import parse_step_ref
from exchange.lines import Msg
from exchange.v1 import ledger_pb2, node_pb2

# Columns of answers whose values are subjects a case links: companies, persons, accounts.
LINK_COLUMNS = ("uscc", "person_id", "legal_rep_id", "holder_id", "account_no",
                "counterparty_account", "issuer_uscc", "buyer_uscc")
ACCOUNT_COLUMNS = ("account_no", "counterparty_account")


@dataclass
class CaseFile:
    case_id: str
    status: str
    opened_by: str = ""
    opened_height: int = 0
    transactions: int = 0
    running_hash: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)
    findings: list[dict[str, Any]] = field(default_factory=list)
    queries: list[dict[str, Any]] = field(default_factory=list)

    def subjects(self) -> list[str]:
        """Every subject linked so far, as kind=value: the findings' subjects, what the
        queries asked about, and the companies, persons and accounts the answers name."""
        out: dict[str, None] = {}
        for f in self.findings:
            for part in str(f.get("subject") or "").split("/"):
                kind = _kind(part)
                if kind:
                    out[f"{kind}={part}"] = None
        for q in self.queries:
            for text in q["subjects"]:
                key, _, value = text.partition("=")
                kind = _kind(value) or ("account_no" if key in ACCOUNT_COLUMNS else "")
                if kind:
                    out[f"{kind}={value}"] = None
            for row in q.get("rows") or []:
                for column in LINK_COLUMNS:
                    value = row.get(column)
                    if not isinstance(value, str) or not value:
                        continue
                    kind = "account_no" if column in ACCOUNT_COLUMNS else _kind(value)
                    if kind:
                        out[f"{kind}={value}"] = None
        return sorted(out)

    def timeline(self, messages: bool = False) -> list[dict[str, Any]]:
        """Events, findings, queries, answers and refusals in commit order. With
        `messages`, each item also has "what_msg": its "what" as a message (or data)
        the console shows in the reader's language."""
        items: list[dict[str, Any]] = []
        for e in self.events:
            what: str | Msg = e["reason"]
            if e["finding"]:
                what = Msg("finding %(finding)s: %(reason)s", finding=e["finding"],
                           reason=e["reason"]) if e["reason"] else \
                    Msg("finding %(finding)s", finding=e["finding"])
            items.append({"height": e["height"], "time_ms": e["time_ms"],
                          "kind": f"case {e['action']}", "tx": e["tx"],
                          "who": e["agency"] + ("/automation" if e["playbook"] else ""),
                          "to": "", "dataset": "", "subjects": [], "what": what,
                          "playbook": e["playbook"]})
        for q in self.queries:
            items.append({"height": q["height"], "time_ms": q["time_ms"], "kind": "query",
                          "tx": q["tx"], "who": f"{q['from']}/{q['analyst']}", "to": q["to"],
                          "dataset": q["dataset"], "subjects": q["subjects"],
                          "what": q["purpose"], "playbook": q["playbook"]})
            if q["status"] in ("answered", "refused"):
                kind = "answer" if q["status"] == "answered" else "refusal"
                what = (Msg("%(n)s rows", n=q["row_count"]) if kind == "answer"
                        else f"{q['refusal_code']}: {q['refusal_reason']}")
                items.append({"height": q["outcome_height"], "time_ms": q["outcome_time_ms"],
                              "kind": kind, "tx": q["outcome_tx"], "who": q["to"],
                              "to": q["from"], "dataset": q["dataset"],
                              "subjects": q["subjects"], "what": what,
                              "playbook": q["playbook"],
                              **({"rows": q["rows"]} if q.get("rows") is not None else {})})
        for item in items:
            if messages:
                item["what_msg"] = item["what"]
            item["what"] = str(item["what"])
        return sorted(items, key=lambda i: (i["height"], i["kind"] != "case open"))

    def as_dict(self) -> dict[str, Any]:
        return {"case": self.case_id, "status": self.status, "opened_by": self.opened_by,
                "opened_height": self.opened_height, "transactions": self.transactions,
                "running_hash": self.running_hash, "events": self.events,
                "findings": self.findings, "queries": self.queries,
                "subjects": self.subjects(), "timeline": self.timeline()}


def _kind(value: str) -> str:
    if is_valid_uscc(value):
        return "uscc"
    if is_valid_person_id(value):
        return "person_id"
    return ""


def _playbook_of(ref_text: str) -> str:
    ref = parse_step_ref(ref_text)
    return f"{ref.digest.hex()[:16]} step {ref.step_key}" if ref is not None else ""


def gather(client: ExchangeClient, case_id: str, with_rows: bool = True) -> CaseFile:
    """Everything the node shows this agency of `case_id`. MalformedInput if the ledger
    knows no such case and no query names it."""
    listing = client.list_cases(case_id)
    trail = client.audit(node_pb2.AuditRequest(case_id=case_id, limit=100_000))
    if not listing.cases and not trail.entries:
        raise MalformedInput(f"the ledger knows no case {case_id!r}")
    out = CaseFile(case_id, "not opened")
    held: list[tuple[bytes, str]] = []
    if listing.cases:
        c = listing.cases[0]
        out.status, out.opened_by, out.opened_height = c.status, c.agency, c.opened_height
        out.transactions, out.running_hash = c.count, bytes(c.running_hash).hex()
        held = [(bytes(t), f) for t, f in zip(c.ref_tx_ids, c.ref_finding_ids, strict=True)
                if f]
        for tx in c.event_tx_ids:
            info = client.get_transaction(bytes(tx))
            body = ledger_pb2.TxBody.FromString(ledger_pb2.Envelope.FromString(
                info.envelope).body)
            ev = body.case_event
            out.events.append({
                "height": info.height, "time_ms": parse_header(info.header).timestamp_ms,
                "tx": bytes(tx).hex(), "action": ev.action, "agency": body.agency,
                "reason": ev.reason, "finding": ev.finding_id,
                "run": bytes(ev.ref_tx_id).hex() if ev.finding_id else "",
                "playbook": _playbook_of(ev.playbook_id), "step": ev.playbook_id})
    if held:
        out.findings = _findings(client, held)
    for entry in trail.entries:
        if entry.kind != "query":
            continue
        q = entry.query
        item: dict[str, Any] = {
            "tx": bytes(q.tx_id).hex(), "height": q.height, "time_ms": q.time_ms,
            "from": q.requester_agency, "analyst": q.analyst, "to": q.target_agency,
            "dataset": q.dataset, "purpose": q.purpose, "on_behalf_of": q.on_behalf_of,
            "playbook": _playbook_of(q.on_behalf_of), "subjects": list(q.subjects),
            "period": q.period, "status": q.status, "decision": q.decision_code,
            "outcome_tx": bytes(q.outcome_tx_id).hex(), "outcome_height": q.outcome_height,
            "outcome_time_ms": q.outcome_time_ms, "row_count": q.row_count,
            "refusal_code": q.refusal_code, "refusal_reason": q.refusal_reason, "rows": None}
        if with_rows and q.status == "answered" and client.profile.agency in (
                q.requester_agency, q.target_agency):
            try:
                item["rows"] = read_answer(client.get_answer(bytes(q.tx_id))).rows
            except ExchangeError:
                item["rows"] = None  # sealed to others, or not readable here
        out.queries.append(item)
    return out


def _findings(client: ExchangeClient, held: list[tuple[bytes, str]]) -> list[dict[str, Any]]:
    runs = {bytes(r.tx_id): r for r in client.list_findings(node_pb2.ListFindingsRequest(
        all_runs=True, open=True)).runs}
    out = []
    for run_tx, finding_id in held:
        run = runs.get(run_tx)
        if run is None:
            continue
        index = next((i for i, f in enumerate(run.findings) if f.finding_id == finding_id), -1)
        if index < 0:
            continue
        lines = {int(i): line for i, line in zip(run.line_index, run.lines, strict=True)}
        item: dict[str, Any] = {
            "finding": finding_id, "run": run_tx.hex(), "rule": run.rule_id,
            "period": run.period, "owner": run.owner_agency,
            "severity": run.findings[index].severity, "height": run.height,
            "time_ms": run.time_ms, "case_scope": run.case_id, "subject": None,
            "amount": None}
        if index in lines:
            detail = json.loads(lines[index])
            item.update(subject=detail.get("subject"), amount=detail.get("amount"),
                        detail=detail)
        out.append(item)
    return out
