"""`exchange policy show`: the data owners' policies in force on the ledger."""

from __future__ import annotations

import click

from exchange.cli.node_cmds import connect, json_option, node_options
from exchange.cli.output import console, emit_json, table
from exchange.ledger.policy import describe


@click.group("policy")
def policy() -> None:
    """Who may ask which agency for which data (the data owners' policies)."""


@policy.command("show")
@click.option("--owner", default="", help="Only this owner agency's datasets.")
@click.option("--dataset", default="", help="Only this dataset.")
@node_options
@json_option
def show(owner: str, dataset: str, profile_option: str | None, timeout_s: float,
         as_json: bool) -> None:
    """List the policies in force as of the node's last applied block."""
    _, client = connect(profile_option, timeout_s)
    with client:
        listing = client.list_policies(owner, dataset)
    policies = [describe(p) for p in listing.policies]
    if as_json:
        emit_json({"height": listing.height, "policies": policies})
        return
    for p in policies:
        grants = p["grants"]
        assert isinstance(grants, list)
        table(f"{p['policy_id']} (owner {p['owner']}, version {p['version']})",
              ["to", "roles", "case", "legal bases", "shapes", "rows", "per hour",
               "supervisor"],
              [[g["to"], ",".join(g["roles"]), "required" if g["case_required"] else "-",
                ",".join(g["legal_bases"]),
                ",".join(s.removeprefix("QUERY_SHAPE_").lower() for s in g["shapes"]),
                g["row_limit"] or "-", g["rate_per_hour"] or "-",
                "co-sign" if g["supervisor_cosign"] else "-"] for g in grants])
    console.print(f"{len(policies)} policies in force at height {listing.height}")
