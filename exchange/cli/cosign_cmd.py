"""`exchange cosign`: four eyes through the agency's own node. An analyst leaves a query
for a supervisor (`request`), a supervisor lists what waits (`list`), looks at one
(`show`) and co-signs it with their own profile (`approve`) or declines it, and the
analyst then signs and submits the co-signed query (`submit`). No profile file of
anybody else is ever needed."""

from __future__ import annotations

import click

from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.cli.query_cmd import SHAPES, _fields
from exchange.cli.status_cmd import connect, json_option, node_options
from exchange.client import Signer, load_genesis
from exchange.client.cosign import FourEyesClient, cosign_view, finalize, unsigned_query_body
from exchange.client.crossquery import QuerySpec
from exchange.errors import MalformedInput
from exchange.identity.default_policies import LEGAL_BASIS_AML, LEGAL_BASIS_TAX_CRIME
from exchange.ledger.queries import parse_subject_text
from exchange.v1 import cosign_pb2


def view_dict(v: cosign_pb2.CosignRequestView) -> dict[str, object]:
    """A request as JSON (the body as hex: what the co-signature covers)."""
    return {"request": v.request_id, "analyst": f"{v.agency}/{v.analyst}",
            "status": v.status, "created_ms": v.created_ms, "deadline_ms": v.deadline_ms,
            "subjects": list(v.subjects), "period": v.period,
            "policy": f"{v.policy_id} v{v.policy_version}" if v.policy_id else "",
            "decision": v.decision_code, "decision_reason": v.decision_reason,
            "allowed_when_cosigned": v.allowed_when_cosigned, "supervisor": v.supervisor,
            "decline_reason": v.decline_reason, "body": bytes(v.body).hex()}


def _show(v: cosign_pb2.CosignRequestView) -> None:
    from exchange.client.cosign import parse_body

    q = parse_body(v).query
    console.print(f"request {v.request_id}: {v.status}")
    console.print(f"  {v.agency}/{v.analyst} asks {q.target_agency} {q.dataset} "
                  f"{', '.join(v.subjects) or '(period-wide)'}"
                  + (f" period {v.period}" if v.period else "")
                  + (f" case {q.case_id}" if q.case_id else ""))
    console.print(f"  purpose: {q.purpose or '-'}; legal basis: {q.legal_basis}; "
                  f"fields: {', '.join(q.fields) or 'all granted'}")
    console.print(f"  policy {v.policy_id} v{v.policy_version}: {v.decision_code} "
                  f"{v.decision_reason}; with a co-signature: "
                  + ("allowed" if v.allowed_when_cosigned else "still refused"))
    console.print(f"  deadline {fmt_ms(v.deadline_ms)}")
    if v.supervisor:
        console.print(f"  {v.status} by {v.agency}/{v.supervisor}"
                      + (f": {v.decline_reason}" if v.decline_reason else ""))


@click.group("cosign")
def cosign() -> None:
    """Four eyes: queries waiting for a supervisor's co-signature at the agency's node."""


@cosign.command("request")
@click.option("--to", "target", required=True, help="The agency asked.")
@click.option("--dataset", required=True, help="A dataset or view in its catalog.")
@click.option("--subject", "subjects", multiple=True, help="KEY=VALUE (repeat for a set).")
@click.option("--period", default=None, help="Month YYYY-MM.")
@click.option("--case", "case_id", default="", help="The case the query belongs to.")
@click.option("--purpose", default="", help="Why (the supervisor reads it).")
@click.option("--legal-basis", type=click.Choice([LEGAL_BASIS_TAX_CRIME, LEGAL_BASIS_AML]),
              default=LEGAL_BASIS_TAX_CRIME, show_default=True)
@click.option("--fields", default="", help="Comma-separated fields (default: all granted).")
@click.option("--shape", type=click.Choice(list(SHAPES)), default="auto", show_default=True)
@click.option("--deadline", "deadline_s", type=click.IntRange(60, 7 * 86_400), default=3_600,
              show_default=True, help="Seconds the query (and so the request) stays valid.")
@node_options
@json_option
def cosign_request(target: str, dataset: str, subjects: tuple[str, ...], period: str | None,
                   case_id: str, purpose: str, legal_basis: str, fields: str, shape: str,
                   deadline_s: int, profile_option: str | None, timeout_s: float,
                   as_json: bool) -> None:
    """Leave a query at your node for a supervisor to co-sign (nothing is signed by you
    yet: `exchange cosign submit ID` does that once it is co-signed)."""
    profile_path, client = connect(profile_option, timeout_s)
    _, _, genesis = load_genesis(profile_path)
    spec = QuerySpec(target=target, dataset=dataset,
                     subjects=tuple(parse_subject_text(s) for s in subjects), period=period,
                     case_id=case_id, purpose=purpose, legal_basis=legal_basis,
                     fields=_fields(fields), shape=int(SHAPES[shape]), deadline_s=deadline_s)
    with client:
        signer = Signer.load(client.profile, genesis.chain_id)
        body = unsigned_query_body(spec, signer, genesis, list(client.status().member_entries))
        view = FourEyesClient(client).submit(body)
    if as_json:
        emit_json(view_dict(view))
    else:
        _show(view)


@cosign.command("list")
@click.option("--mine", is_flag=True, help="Your own requests instead of those waiting for "
                                           "you (a supervisor).")
@node_options
@json_option
def cosign_list(mine: bool, profile_option: str | None, timeout_s: float,
                as_json: bool) -> None:
    """The requests waiting for a supervisor of your agency (or, --mine, yours)."""
    _, client = connect(profile_option, timeout_s)
    with client:
        views = FourEyesClient(client).listing(mine)
    if as_json:
        emit_json({"requests": [view_dict(v) for v in views]})
        return
    from exchange.client.cosign import parse_body

    rows = []
    for v in views:
        q = parse_body(v).query
        rows.append([v.request_id, f"{v.agency}/{v.analyst}", v.status, q.target_agency,
                     q.dataset, ", ".join(v.subjects), q.case_id or "-", q.purpose,
                     v.decision_code])
    table("co-signature requests", ["request", "analyst", "status", "to", "dataset",
                                    "subjects", "case", "purpose", "policy"], rows)


@cosign.command("show")
@click.argument("request_id")
@node_options
@json_option
def cosign_show(request_id: str, profile_option: str | None, timeout_s: float,
                as_json: bool) -> None:
    """One request: what the query asks and what the owner's policy decides."""
    _, client = connect(profile_option, timeout_s)
    with client:
        view = FourEyesClient(client).get(request_id)
    emit_json(view_dict(view)) if as_json else _show(view)


@cosign.command("approve")
@click.argument("request_id")
@node_options
@json_option
def cosign_approve(request_id: str, profile_option: str | None, timeout_s: float,
                   as_json: bool) -> None:
    """Co-sign a request as the profile's supervisor: signed here, only the co-signature
    is sent."""
    profile_path, client = connect(profile_option, timeout_s)
    _, _, genesis = load_genesis(profile_path)
    with client:
        four_eyes = FourEyesClient(client)
        view = four_eyes.get(request_id)
        signer = Signer.load(client.profile, genesis.chain_id)
        if view.analyst == signer.subject:
            raise MalformedInput("four eyes: you do not co-sign your own query")
        view = four_eyes.cosign(request_id, cosign_view(view, signer.key))
    emit_json(view_dict(view)) if as_json else _show(view)


@cosign.command("decline")
@click.argument("request_id")
@click.option("--reason", required=True, help="Why (the analyst reads it).")
@node_options
@json_option
def cosign_decline(request_id: str, reason: str, profile_option: str | None,
                   timeout_s: float, as_json: bool) -> None:
    """Decline a request, with a reason."""
    _, client = connect(profile_option, timeout_s)
    with client:
        view = FourEyesClient(client).decline(request_id, reason)
    emit_json(view_dict(view)) if as_json else _show(view)


@cosign.command("submit")
@click.argument("request_id")
@node_options
@json_option
def cosign_submit(request_id: str, profile_option: str | None, timeout_s: float,
                  as_json: bool) -> None:
    """Sign your co-signed query and submit it (`exchange answer QUERY` then shows it)."""
    profile_path, client = connect(profile_option, timeout_s)
    _, _, genesis = load_genesis(profile_path)
    with client:
        view = FourEyesClient(client).get(request_id)
        signer = Signer.load(client.profile, genesis.chain_id)
        envelope, qid = finalize(view, signer)
        result = client.submit(envelope, wait=True)
    if result.result != "OK":
        raise MalformedInput(f"query {qid.hex()} committed at height {result.height} but "
                             f"judged invalid: {result.result}")
    if as_json:
        emit_json({"query": qid.hex(), "height": result.height, "result": result.result})
    else:
        click.echo(f"query {qid.hex()} committed at height {result.height}; "
                   f"`exchange answer {qid.hex()}` shows the answer")
