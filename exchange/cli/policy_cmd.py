"""`exchange policy show/propose`: the data owners' policies in force on the ledger, and
putting a new version of one in force."""

from __future__ import annotations

import json
from pathlib import Path

import click

from exchange.cli.output import console, emit_json, table
from exchange.cli.status_cmd import connect, json_option, node_options
from exchange.client import Signer, chain_id_for
from exchange.errors import MalformedInput, PermissionDenied
from exchange.ledger.policy import describe, policy_from_dict


def next_version(in_file: int, in_force: int, bump: bool) -> int:
    """The version a proposal takes: the next one for a file without a version, for one
    read from the ledger (its version is the one in force) and with --bump; a newer one
    as it is; an older one is a stale copy and refused."""
    if bump or in_file in (0, in_force):
        return in_force + 1
    if in_file < in_force:
        raise MalformedInput(f"the file is of version {in_file} but version {in_force} is "
                             "in force: the policy changed since the file was read (show "
                             "it again, or --bump to replace it anyway)")
    return in_file


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
    """List the policies in force as of the node's last applied block. With --owner,
    --dataset and --json it prints the one policy in the form `policy propose` reads
    (save it, edit it, propose it)."""
    _, client = connect(profile_option, timeout_s)
    with client:
        listing = client.list_policies(owner, dataset)
    policies = [describe(p) for p in listing.policies]
    if as_json:
        if owner and dataset:
            if not policies:
                raise MalformedInput(f"no policy of {owner} for {dataset!r} is in force")
            emit_json(policies[0])
        else:
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
@click.option("--bump", is_flag=True,
              help="Take the version after the one in force, whatever the file says.")
@node_options
@json_option
def propose(file: Path, dry_run: bool, bump: bool, profile_option: str | None,
            timeout_s: float, as_json: bool) -> None:
    """Put a new version of one of your agency's policies in force. FILE is JSON as
    `policy show --owner O --dataset D --json` prints it (or a listing holding exactly
    one policy). Its version: none, or the one in force (the file was read from the
    ledger and edited), takes the next one; a newer one is taken as it is; an older one
    is refused (the policy changed since the file was read), unless --bump. Sign with a
    supervisor's profile: a policy takes effect only from its owner's supervisor or
    root."""
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedInput(f"{file}: not JSON: {exc}") from exc
    if isinstance(obj, dict) and "policies" in obj:
        listed = obj["policies"]
        if not isinstance(listed, list) or len(listed) != 1:
            count = len(listed) if isinstance(listed, list) else "no list of"
            raise MalformedInput(f"{file}: a listing of {count} policies; propose one at a "
                                 "time (`policy show --owner O --dataset D --json` prints one)")
        obj = listed[0]
    proposed = policy_from_dict(obj)
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        if proposed.owner_agency != client.profile.agency:
            raise PermissionDenied(f"{client.profile.agency} may not set the policy of "
                                   f"{proposed.owner_agency}'s {proposed.dataset}")
        current = client.list_policies(proposed.owner_agency, proposed.dataset).policies
        in_force = current[0].version if current else 0
        proposed.version = next_version(proposed.version, in_force, bump)
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
