"""`exchange query`, `exchange answer` and `exchange audit`: cross-queries as an analyst
sees them, and the record of every one of them."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.cli.status_cmd import (
    connect,
    json_option,
    node_options,
    optional_registry,
)
from exchange.client import (
    ExchangeClient,
    Signer,
    check_transaction,
    load_client_profile,
    load_genesis,
    resolve_profile_path,
)
from exchange.client.crossquery import Answer, QuerySpec, build_query, read_answer
from exchange.errors import MalformedInput
from exchange.identity.default_policies import LEGAL_BASIS_AML, LEGAL_BASIS_TAX_CRIME
from exchange.identity.keys import CachedSigner, read_signing_key
from exchange.ids import parse_since, resolve_tx_id
from exchange.ledger.queries import parse_subject_text
from exchange.v1 import ledger_pb2, node_pb2

EXIT_REFUSED = 3
EXIT_PENDING = 4
WAIT_S_DEFAULT = 30.0
SHAPES = {"auto": 0, "subject": ledger_pb2.QUERY_SHAPE_SUBJECT,
          "set": ledger_pb2.QUERY_SHAPE_SUBJECT_SET,
          "aggregate": ledger_pb2.QUERY_SHAPE_AGGREGATE}


def _fields(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip()) if text else ()


def _cosigner(profile_text: str, agency: str) -> CachedSigner:
    """A supervisor's key from their own profile (their passphrase, not the analyst's)."""
    profile = load_client_profile(resolve_profile_path(profile_text))
    if profile.agency != agency:
        raise MalformedInput(f"co-signer profile is {profile.agency}'s, the query {agency}'s")
    return CachedSigner(read_signing_key(profile.signing_key, profile.passphrase()))


@click.command("query")
@click.option("--to", "target", required=True, help="The agency asked.")
@click.option("--dataset", required=True, help="A dataset or view in its catalog.")
@click.option("--subject", "subjects", multiple=True,
              help="KEY=VALUE, e.g. uscc=91440300MA5F... (repeat for a set; none asks a "
                   "period-wide view).")
@click.option("--period", default=None, help="Month YYYY-MM.")
@click.option("--case", "case_id", default="", help="The case the query belongs to.")
@click.option("--purpose", default="", help="Why (shown in the audit trail).")
@click.option("--legal-basis", type=click.Choice([LEGAL_BASIS_TAX_CRIME, LEGAL_BASIS_AML]),
              default=LEGAL_BASIS_TAX_CRIME, show_default=True)
@click.option("--fields", default="", help="Comma-separated fields (default: all granted).")
@click.option("--shape", type=click.Choice(list(SHAPES)), default="auto", show_default=True)
@click.option("--deadline", "deadline_s", type=click.IntRange(5, 7 * 86_400), default=300,
              show_default=True, help="Seconds the target has to answer.")
@click.option("--cosign", "cosign_profile", default=None,
              help="A supervisor's profile that co-signs the query (four eyes).")
@click.option("--wait", "wait", is_flag=True, help="Wait for the answer and print its rows.")
@click.option("--wait-s", type=click.FloatRange(1, 60), default=WAIT_S_DEFAULT,
              show_default=True, help="How long --wait waits.")
@node_options
@json_option
def query(target: str, dataset: str, subjects: tuple[str, ...], period: str | None,
          case_id: str, purpose: str, legal_basis: str, fields: str, shape: str,
          deadline_s: int, cosign_profile: str | None, wait: bool, wait_s: float,
          profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Ask another agency: signed by the profile's analyst, committed, and answered by the
    target's node. With --wait, print the rows (exit 3 if refused, 4 if not yet
    answered)."""
    profile_path, client = connect(profile_option, timeout_s)
    _, _, genesis = load_genesis(profile_path)
    spec = QuerySpec(target=target, dataset=dataset,
                     subjects=tuple(parse_subject_text(s) for s in subjects), period=period,
                     case_id=case_id, purpose=purpose, legal_basis=legal_basis,
                     fields=_fields(fields), shape=int(SHAPES[shape]), deadline_s=deadline_s)
    with client:
        signer = Signer.load(client.profile, genesis.chain_id)
        cosigners = [_cosigner(cosign_profile, signer.agency)] if cosign_profile else []
        # the members as the ledger has them now (one may have joined since genesis),
        # from the analyst's own node, which verified every block that changed them
        members = list(client.status().member_entries)
        envelope, qid = build_query(spec, signer, genesis, cosigners, members=members)
        started = time.monotonic()
        result = client.submit(envelope, wait=True)
        if result.result != "OK":
            raise MalformedInput(f"query {qid.hex()} committed at height {result.height} but "
                                 f"judged invalid: {result.result}")
        if not wait:
            out = {"query": qid.hex(), "height": result.height, "result": result.result}
            emit_json(out) if as_json else click.echo(
                f"query {qid.hex()} committed at height {result.height}; "
                f"`exchange answer {qid.hex()}` shows the answer")
            return
        view = client.get_answer(qid, int(wait_s * 1000))
    answer = read_answer(view)
    _show(answer, as_json, (time.monotonic() - started) * 1000)


@click.command("answer")
@click.argument("query_id")
@click.option("--wait", "wait_s", type=click.FloatRange(0, 60), default=0.0,
              help="Seconds to wait for the answer to commit.")
@node_options
@json_option
def answer(query_id: str, wait_s: float, profile_option: str | None, timeout_s: float,
           as_json: bool) -> None:
    """Fetch a query's answer (decrypted by your node for your agency) or its refusal."""
    _, client = connect(profile_option, timeout_s)
    with client:
        view = client.get_answer(resolve_tx_id(query_id, client, "query"),
                                 int(wait_s * 1000))
    _show(read_answer(view), as_json, None)


def _query_dict(q: node_pb2.QueryView) -> dict[str, Any]:
    return {
        "query": q.tx_id.hex(), "height": q.height, "time_ms": q.time_ms,
        "requester": q.requester_agency, "analyst": q.analyst, "target": q.target_agency,
        "dataset": q.dataset, "case": q.case_id, "purpose": q.purpose,
        "legal_basis": q.legal_basis, "fields": list(q.fields), "shape": q.shape,
        "subjects": list(q.subjects), "period": q.period, "deadline_ms": q.deadline_ms,
        "cosigners": list(q.cosigners), "on_behalf_of": q.on_behalf_of, "status": q.status,
        "policy": f"{q.policy_id} v{q.policy_version}" if q.policy_id else "",
        "decision": q.decision_code or "allowed", "outcome_tx": q.outcome_tx_id.hex(),
        "outcome_height": q.outcome_height, "refusal_code": q.refusal_code,
        "refusal_reason": q.refusal_reason, "rows": q.row_count, "chunks": q.chunk_count,
    }


def _show(answer: Answer, as_json: bool, latency_ms: float | None) -> None:
    q = answer.query
    if as_json:
        out = _query_dict(q)
        out["data"] = answer.rows
        if latency_ms is not None:
            out["latency_ms"] = round(latency_ms, 1)
        emit_json(out)
    else:
        subjects = ", ".join(q.subjects) or "(period-wide)"
        # summary lines are printed whole (soft_wrap): a narrow table or terminal must not
        # break them mid-phrase; the rows follow as a table of their own
        say = lambda text: console.print(text, soft_wrap=True)  # noqa: E731
        say(f"query {q.tx_id.hex()}  {q.requester_agency}/{q.analyst} -> "
            f"{q.target_agency} {q.dataset} {subjects}"
            + (f" period {q.period}" if q.period else "")
            + (f"  case {q.case_id}" if q.case_id else ""))
        if q.status == "answered":
            columns = list(answer.rows[0]) if answer.rows else list(q.fields)
            say(f"answered at height {q.outcome_height}: {q.row_count} rows "
                "(commitments checked)")
            if answer.rows:
                table("", columns, [[row.get(c, "") for c in columns]
                                    for row in answer.rows[:200]])
            else:
                say(f"{q.target_agency} holds no {q.dataset} rows for {subjects}"
                    + (f" in {q.period}" if q.period else "")
                    + " (an answer too: it looked and found none)")
            if len(answer.rows) > 200:
                say(f"... {len(answer.rows) - 200} more rows (use --json)")
        elif q.status == "refused":
            say(f"[bold red]refused[/] at height {q.outcome_height}: "
                f"{q.refusal_code}: {q.refusal_reason}")
        else:
            say(f"{q.status}: no answer committed yet (deadline {fmt_ms(q.deadline_ms)})")
        if latency_ms is not None:
            say(f"{latency_ms:.0f} ms from submission")
    if q.status == "refused":
        sys.exit(EXIT_REFUSED)
    if q.status in ("open", "expired"):
        sys.exit(EXIT_PENDING)


@click.command("audit")
@click.option("--case", "case_id", default="", help="Queries of this case.")
@click.option("--subject", default="", help="KEY=VALUE: queries about this subject (only "
                                            "those your agency asked or was asked).")
@click.option("--analyst", default="", help="Queries signed by this analyst (subject).")
@click.option("--agency", default="", help="Queries asked by or of this agency.")
@click.option("--since", default="", help="From this date (YYYY-MM-DD) or ISO time.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=1_000, show_default=True)
@click.option("--verify", is_flag=True,
              help="Check each line's transaction against the ledger: signature, Merkle "
                   "inclusion in its block, result code and the block's attestations.")
@node_options
@json_option
def audit(case_id: str, subject: str, analyst: str, agency: str, since: str, limit: int,
          verify: bool, profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Every query, answer and refusal matching the filters: who, when, why, where."""
    if subject:
        parse_subject_text(subject)
    request = node_pb2.AuditRequest(case_id=case_id, subject=subject, analyst=analyst,
                                    agency=agency, since_ms=parse_since(since) if since else 0,
                                    limit=limit)
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        reply = client.audit(request)
        checks = _verify_lines(client, profile_path, reply) if verify else {}
    rows = []
    for e in reply.entries:
        q = e.query
        row: dict[str, Any] = {"kind": e.kind, "tx": e.tx_id.hex(), "height": e.height,
               "time_ms": e.time_ms,
               "query": q.tx_id.hex(), "requester": q.requester_agency, "analyst": q.analyst,
               "target": q.target_agency, "dataset": q.dataset, "case": q.case_id,
               "purpose": q.purpose, "legal_basis": q.legal_basis,
               "subjects": list(q.subjects), "status": q.status,
               "decision": q.decision_code or "allowed",
               "outcome": (f"{q.row_count} rows" if e.kind == "answer" else
                           f"{q.refusal_code}: {q.refusal_reason}" if e.kind == "refusal"
                           else "")}
        if verify:
            row["verified"] = checks.get(e.tx_id, "not checked")
        rows.append(row)
    if as_json:
        emit_json({"height": reply.height, "entries": rows})
    else:
        columns = ["height", "time", "kind", "who", "to", "dataset", "case", "subjects",
                   "why / outcome"] + (["verified"] if verify else [])
        table(f"audit trail at height {reply.height}", columns, [
            [r["height"], fmt_ms(r["time_ms"]), r["kind"],
             f"{r['requester']}/{r['analyst']}", r["target"], r["dataset"], r["case"] or "-",
             ", ".join(r["subjects"]) or ("-" if r["kind"] == "query" else ""),
             (r["purpose"] if r["kind"] == "query" else r["outcome"]) +
             (f" [policy: {r['decision']}]" if r["kind"] == "query" and
              r["decision"] != "allowed" else "")]
            + ([r["verified"]] if verify else []) for r in rows])
        queries = sum(1 for r in rows if r["kind"] == "query")
        console.print(f"{queries} queries, {len(rows) - queries} answers and refusals")
    if verify and any(v != "ok" for v in checks.values()):
        sys.exit(1)


def _verify_lines(client: ExchangeClient, profile_path: Path,
                  reply: node_pb2.AuditReply) -> dict[bytes, str]:
    registry = optional_registry(profile_path)
    out: dict[bytes, str] = {}
    for e in reply.entries:
        if e.tx_id in out:
            continue
        info = client.get_transaction(bytes(e.tx_id))
        check = check_transaction(info, bytes(e.tx_id), registry)
        if not check.ok:
            out[e.tx_id] = "FAILED: " + "; ".join(check.problems)
        elif info.height != e.height:
            out[e.tx_id] = f"FAILED: at height {info.height}, not {e.height}"
        elif len(check.attested_by) < (registry.quorum if registry else info.quorum):
            out[e.tx_id] = "ok (not final yet)"
        else:
            out[e.tx_id] = "ok"
    return out

