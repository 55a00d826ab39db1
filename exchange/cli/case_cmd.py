"""`exchange case list/show/graph/close`: cases on the ledger, what they hold (as a
timeline and as a graph), and closing one."""

from __future__ import annotations

import sys
from typing import Any

import click

from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.cli.status_cmd import connect, json_option, node_options
from exchange.client import ExchangeClient, Signer, load_genesis
from exchange.errors import UnknownId
from exchange.ids import choose_text
from exchange.v1 import ledger_pb2, node_pb2


def _case_dict(c: node_pb2.CaseView) -> dict[str, Any]:
    return {"case": c.case_id, "opened_by": c.agency, "opened_height": c.opened_height,
            "status": c.status, "transactions": c.count,
            "running_hash": bytes(c.running_hash).hex(),
            "holds": [{"tx": bytes(t).hex(), "finding": f}
                      for t, f in zip(c.ref_tx_ids, c.ref_finding_ids, strict=True)],
            "events": [bytes(t).hex() for t in c.event_tx_ids]}


def resolve_case_id(client: ExchangeClient, text: str) -> str:
    """A case id typed whole or as the unambiguous beginning of one (case ids are
    compared without regard to case)."""
    if client.list_cases(text).cases:
        return text
    try:
        return choose_text(text, [c.case_id for c in client.list_cases().cases], "case")
    except UnknownId:
        return text  # a case only queries name (none opened it): taken as typed


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


ROWS_SHOWN_MAX = 10


@case.command("show")
@click.argument("case_id")
@click.option("--rows/--no-rows", "with_rows", default=True, show_default=True,
              help="Print the rows of each answer this agency may read.")
@node_options
@json_option
def case_show(case_id: str, with_rows: bool, profile_option: str | None, timeout_s: float,
              as_json: bool) -> None:
    """A case's timeline: the finding that opened it and those added since, its case
    events (a playbook's steps among them), every query naming it with its answer (rows
    decrypted where this agency may read them) or refusal, the subjects linked so far,
    and its status."""
    from exchange.cases.view import gather

    _, client = connect(profile_option, timeout_s)
    with client:
        case_id = resolve_case_id(client, case_id)
        listing = client.list_cases(case_id)
        casefile = gather(client, case_id, with_rows=True)
    view: dict[str, Any] = _case_dict(listing.cases[0]) if listing.cases else {}
    out = {**view, **casefile.as_dict()}
    if as_json:
        emit_json(out)
        return
    console.print(f"case [bold]{case_id}[/bold]: {casefile.status}"
                  + (f", opened by {casefile.opened_by} at height {casefile.opened_height}; "
                     f"{casefile.transactions} transactions name it" if listing.cases else ""))
    if casefile.findings:
        table("findings", ["finding", "rule", "period", "severity", "owner", "subject",
                           "amount"],
              [[f["finding"], f["rule"], f["period"] or "-", f["severity"], f["owner"],
                f["subject"] or "(sealed)", f["amount"] or ""] for f in casefile.findings])
    timeline = casefile.timeline()
    table("timeline", ["height", "time", "kind", "who", "to", "dataset", "subjects", "what"],
          [[t["height"], fmt_ms(t["time_ms"]), t["kind"], t["who"], t["to"], t["dataset"],
            ", ".join(t["subjects"]), t["what"]] for t in timeline])
    if with_rows:
        for q in casefile.queries:
            rows = q.get("rows")
            if not rows:
                continue
            columns = list(rows[0])
            table(f"{q['dataset']} from {q['to']} (query {q['tx'][:16]}): {len(rows)} rows"
                  + (f", first {ROWS_SHOWN_MAX}" if len(rows) > ROWS_SHOWN_MAX else ""),
                  columns, [[r.get(c, "") for c in columns] for r in rows[:ROWS_SHOWN_MAX]])
    subjects = casefile.subjects()
    console.print(f"subjects linked so far ({len(subjects)}): "
                  + (", ".join(subjects) or "none readable here"))


@case.command("graph")
@click.argument("case_id")
@node_options
@json_option
def case_graph(case_id: str, profile_option: str | None, timeout_s: float,
               as_json: bool) -> None:
    """The companies, persons and accounts a case links, through legal representatives,
    account holders and counterparties, from the answers on record that this agency may
    read (a tree from the findings' subjects; --json for nodes and edges)."""
    from exchange.cases.graph import build_graph, render_tree
    from exchange.cases.view import gather

    _, client = connect(profile_option, timeout_s)
    with client:
        case_id = resolve_case_id(client, case_id)
        casefile = gather(client, case_id, with_rows=True)
    graph = build_graph([f["subject"] for f in casefile.findings if f.get("subject")],
                        [(q["dataset"], q["rows"]) for q in casefile.queries if q["rows"]])
    if as_json:
        emit_json({"case": case_id, "status": casefile.status, **graph.as_dict()})
        return
    console.print(render_tree(graph, f"case [bold]{case_id}[/bold] ({casefile.status}): "
                                     f"{len(graph.nodes)} companies, persons and accounts"))


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
        case_id = resolve_case_id(client, case_id)
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
