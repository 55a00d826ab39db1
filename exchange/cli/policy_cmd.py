"""`exchange policy show/propose`: the data owners' policies in force on the ledger, and
putting a new version of one in force."""

from __future__ import annotations

import json
from pathlib import Path

import click

from exchange.cli.node_cmds import connect, json_option, node_options
from exchange.cli.output import console, emit_json, table
from exchange.client import Signer, chain_id_for
from exchange.errors import MalformedInput, PermissionDenied
from exchange.ledger.policy import describe, policy_from_dict


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


@policy.command("propose")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Check and print the policy; submit nothing.")
@node_options
@json_option
def propose(file: Path, dry_run: bool, profile_option: str | None, timeout_s: float,
            as_json: bool) -> None:
    """Put a new version of one of your agency's policies in force. FILE is JSON in the
    form `policy show --json` prints one policy; without a version, the next one. Sign
    with a supervisor's profile: a policy takes effect only from its owner's supervisor
    or root."""
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedInput(f"{file}: not JSON: {exc}") from exc
    proposed = policy_from_dict(obj)
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        if proposed.owner_agency != client.profile.agency:
            raise PermissionDenied(f"{client.profile.agency} may not set the policy of "
                                   f"{proposed.owner_agency}'s {proposed.dataset}")
        current = client.list_policies(proposed.owner_agency, proposed.dataset).policies
        in_force = current[0].version if current else 0
        if proposed.version == 0:
            proposed.version = in_force + 1
        elif proposed.version <= in_force:
            raise MalformedInput(f"version {proposed.version} is not newer than version "
                                 f"{in_force} in force")
        if dry_run:
            emit_json(describe(proposed))
            return
        signer = Signer.load(client.profile, chain_id_for(profile_path, client))
        envelope = signer.make_envelope(lambda body: body.policy.CopyFrom(proposed))
        result = client.submit(envelope, wait=True)
    if result.result != "OK":
        raise MalformedInput(f"policy committed at height {result.height} but judged "
                             f"{result.result} (a policy takes effect only when signed by "
                             "a supervisor or the root of the owner agency)")
    if as_json:
        emit_json({"policy_id": proposed.policy_id, "version": proposed.version,
                   "height": result.height, "result": result.result})
    else:
        console.print(f"{proposed.policy_id} version {proposed.version} in force from "
                      f"height {result.height}")
