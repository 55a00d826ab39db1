"""`exchange case list/show/close`: cases on the ledger, what they hold, and closing one."""

from __future__ import annotations

import sys
from typing import Any

import click

from exchange.cli.node_cmds import connect, json_option, node_options
from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.client import Signer, load_genesis
from exchange.errors import MalformedInput
from exchange.v1 import ledger_pb2, node_pb2


def _case_dict(c: node_pb2.CaseView) -> dict[str, Any]:
    return {"case": c.case_id, "opened_by": c.agency, "opened_height": c.opened_height,
            "status": c.status, "transactions": c.count,
            "running_hash": bytes(c.running_hash).hex(),
            "holds": [{"tx": bytes(t).hex(), "finding": f}
                      for t, f in zip(c.ref_tx_ids, c.ref_finding_ids, strict=True)],
            "events": [bytes(t).hex() for t in c.event_tx_ids]}


@click.group("case")
def case() -> None:
    """Cases opened on the ledger (from findings, `exchange findings open`)."""


@case.command("list")
@node_options
@json_option
def case_list(profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Every case: who opened it, its status and how many transactions name it."""
    _, client = connect(profile_option, timeout_s)
    with client:
        listing = client.list_cases()
    rows = [_case_dict(c) for c in listing.cases]
    if as_json:
        emit_json({"height": listing.height, "cases": rows})
        return
    table(f"cases at height {listing.height}",
          ["case", "opened by", "at height", "status", "findings", "transactions"],
          [[r["case"], r["opened_by"], r["opened_height"], r["status"],
            sum(1 for h in r["holds"] if h["finding"]), r["transactions"]] for r in rows])


@case.command("show")
@click.argument("case_id")
@node_options
@json_option
def case_show(case_id: str, profile_option: str | None, timeout_s: float,
              as_json: bool) -> None:
    """A case's timeline: its events and findings, and every query naming it with its
    answer or refusal (subjects where this agency may read them)."""
    _, client = connect(profile_option, timeout_s)
    with client:
        listing = client.list_cases(case_id)
        trail = client.audit(node_pb2.AuditRequest(case_id=case_id, limit=100_000))
    if not listing.cases and not trail.entries:
        raise MalformedInput(f"the ledger knows no case {case_id!r}")
    view: dict[str, Any] = (_case_dict(listing.cases[0]) if listing.cases
                            else {"case": case_id, "status": "not opened"})
    timeline: list[dict[str, Any]] = [{"height": e.height, "time_ms": e.time_ms, "kind": e.kind,
                 "tx": bytes(e.tx_id).hex(),
                 "who": f"{e.query.requester_agency}/{e.query.analyst}",
                 "to": e.query.target_agency, "dataset": e.query.dataset,
                 "subjects": list(e.query.subjects),
                 "what": (e.query.purpose if e.kind == "query" else
                          f"{e.query.row_count} rows" if e.kind == "answer" else
                          f"{e.query.refusal_code}: {e.query.refusal_reason}")}
                for e in trail.entries]
    if as_json:
        emit_json({**view, "timeline": timeline})
        return
    console.print(f"case [bold]{case_id}[/bold]: {view['status']}"
                  + (f", opened by {view['opened_by']} at height {view['opened_height']}; "
                     f"{view['transactions']} transactions name it" if listing.cases else ""))
    for held in view.get("holds", []):
        console.print(f"  holds {'finding ' + held['finding'] if held['finding'] else 'query'}"
                      f" ({held['tx'][:16]})")
    table("timeline", ["height", "time", "kind", "who", "to", "dataset", "subjects", "what"],
          [[t["height"], fmt_ms(t["time_ms"]), t["kind"], t["who"], t["to"], t["dataset"],
            ", ".join(t["subjects"]), t["what"]] for t in timeline])


@case.command("close")
@click.argument("case_id")
@click.option("--reason", required=True, help="Why (on the ledger).")
@node_options
@json_option
def case_close(case_id: str, reason: str, profile_option: str | None, timeout_s: float,
               as_json: bool) -> None:
    """Close a case your agency opened."""
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        _, _, genesis = load_genesis(profile_path)
        signer = Signer.load(client.profile, genesis.chain_id)
        event = ledger_pb2.CaseEvent(case_id=case_id, action="close", reason=reason)

        def fill(body: ledger_pb2.TxBody) -> None:
            body.case_event.CopyFrom(event)

        result = client.submit(signer.make_envelope(fill), wait=True)
    if result.result != "OK":
        click.echo(f"error: closing case {case_id} judged {result.result} (only the agency "
                   "that opened an open case closes it)", err=True)
        sys.exit(1)
    if as_json:
        emit_json({"case": case_id, "closed_at": result.height})
    else:
        console.print(f"case {case_id} closed at height {result.height}")
