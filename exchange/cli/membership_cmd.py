"""`exchange membership` and `exchange agency rotate`: changing who is in the network and
which keys they use, on the ledger.

    exchange membership propose --add market/request.pb --out change.pb   (any member)
    exchange membership propose --rate-limits limits.json --out change.pb  (parameters)
    exchange membership approve change.pb --agency-dir DIR --out tax.approval   (each root)
    exchange membership submit change.pb *.approval --agency-dir DIR
    exchange agency rotate --kind node|tls|data [--compromised] --agency-dir DIR
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from cryptography import x509

from exchange.cli.agency_cmd import _DIR, _PATH, agency
from exchange.cli.output import emit_json
from exchange.cli.status_cmd import connect, json_option, node_options
from exchange.client import ExchangeClient, Signer
from exchange.errors import MalformedInput
from exchange.identity import ceremony, tls
from exchange.identity.config import next_path
from exchange.identity.keys import (
    CachedSigner,
    DataKey,
    Domain,
    SigningKey,
    read_signing_key,
    write_private,
)
from exchange.identity.network import AgencyPaths, passphrase_from_env, write_public
from exchange.identity.registry import membership_change_statement
from exchange.v1 import ledger_pb2

CHANGE_BYTES_MAX = 64 * 1024


def _read_change(path: Path) -> ledger_pb2.MembershipChange:
    change = ceremony.read_message(path, ledger_pb2.MembershipChange(), CHANGE_BYTES_MAX,
                                   "membership change")
    if sum(1 for part in (change.member, change.remove_agency, change.rate_limits)
           if part) != 1 or not change.members_before:
        raise MalformedInput(f"{path}: not a membership change")
    return change


def _read_rate_limits(path: Path) -> bytes:
    """A JSON object of RateLimits fields (every limit; 0 means none), canonical bytes."""
    from google.protobuf import json_format

    from exchange.identity.registry import parse_rate_limits
    from exchange.v1 import identity_pb2

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MalformedInput(f"{path}: {exc}") from exc
    if len(text) > CHANGE_BYTES_MAX:
        raise MalformedInput(f"{path}: larger than {CHANGE_BYTES_MAX} bytes")
    limits = identity_pb2.RateLimits()
    try:
        json_format.Parse(text, limits)
    except json_format.ParseError as exc:
        raise MalformedInput(f"{path}: not rate limits: {' '.join(str(exc).split())}") from exc
    raw = limits.SerializeToString(deterministic=True)
    parse_rate_limits(raw)
    return raw


def _limits_text(raw: bytes) -> str:
    from google.protobuf import json_format

    from exchange.v1 import identity_pb2

    limits = identity_pb2.RateLimits.FromString(raw)
    return ", ".join(f"{k} {v}" for k, v in json_format.MessageToDict(
        limits, preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True).items())


def _describe(change: ledger_pb2.MembershipChange) -> str:
    if change.rate_limits:
        what = f"set the rate limits to: {_limits_text(bytes(change.rate_limits))}"
    elif change.remove_agency:
        what = f"remove {change.remove_agency}"
    else:
        from exchange.v1 import identity_pb2

        member = identity_pb2.Member.FromString(change.member)
        what = f"add {member.agency} at {member.address}"
    return f"{what} (members now: {', '.join(change.members_before)})"


def _root_signer(agency_dir: Path, chain_id: str,
                 passphrase_env: str | None) -> Signer:
    settings = ceremony.read_settings(agency_dir)
    if settings.chain_id != chain_id:
        raise MalformedInput(f"{agency_dir} is of chain {settings.chain_id!r}; the node "
                             f"serves {chain_id!r}")
    root = read_signing_key(AgencyPaths(agency_dir).root_key, passphrase_from_env(passphrase_env))
    return Signer(settings.agency, "root", chain_id, CachedSigner(root))


def _submit(client: ExchangeClient, signer: Signer, what: str,
            setter: Callable[[ledger_pb2.TxBody], None], quiet: bool = False) -> dict[str, Any]:
    envelope = signer.make_envelope(setter)
    result = client.submit(envelope, wait=True)
    if result.result != "OK":
        raise MalformedInput(f"{what} committed at height {result.height} but was judged "
                             f"{result.result}: the ledger did not take it")
    if not quiet:
        click.echo(f"{what}: committed at height {result.height} "
                   f"(tx {result.tx_id.hex()[:16]})")
    return {"tx_id": result.tx_id.hex(), "height": result.height, "result": result.result}


@click.group("membership")
def membership() -> None:
    """Add an agency to the running network, remove one, or change the admission rate
    limits (a quorum of roots approves)."""


@membership.command("propose")
@click.option("--add", "request_path", type=_PATH, default=None,
              help="The joining agency's membership request (request.pb).")
@click.option("--remove", "remove_agency", default=None, help="The member to remove.")
@click.option("--rate-limits", "limits_path", type=_PATH, default=None,
              help="A parameters change instead: a JSON file of the new admission rate "
                   "limits (the fields of `exchange status --json`'s rate_limits).")
@click.option("--out", "out_path", required=True,
              type=click.Path(path_type=Path, dir_okay=False), help="Change file to write.")
@node_options
@json_option
def propose(request_path: Path | None, remove_agency: str | None, limits_path: Path | None,
            out_path: Path, profile_option: str | None, timeout_s: float,
            as_json: bool) -> None:
    """Write a membership change (or a change of the rate limits) against the network's
    current members, for the members' roots to approve."""
    if sum(1 for o in (request_path, remove_agency, limits_path) if o is not None) != 1:
        raise click.UsageError("give exactly one of --add, --remove and --rate-limits")
    limits = _read_rate_limits(limits_path) if limits_path is not None else b""
    _, client = connect(profile_option, timeout_s)
    with client:
        status = client.status()
    members = sorted(status.members)
    change = ledger_pb2.MembershipChange(members_before=members)
    if request_path is not None:
        request = ceremony.read_request(request_path, status.chain_id)
        member, _ = ceremony.open_request(request)
        if member.agency in members:
            raise MalformedInput(f"{member.agency} is already a member")
        change.member = request.member
        change.request_signature = request.signature
        change.credentials.extend(c.SerializeToString(deterministic=True)
                                  for c in request.credentials)
    elif limits:
        change.rate_limits = limits
    else:
        assert remove_agency is not None
        if remove_agency not in members:
            raise MalformedInput(f"{remove_agency!r} is not a member ({', '.join(members)})")
        change.remove_agency = remove_agency
    write_public(out_path, change.SerializeToString(deterministic=True))
    if as_json:
        emit_json({"change": _describe(change), "members_before": members,
                   "out": str(out_path)})
        return
    click.echo(f"change        {_describe(change)}")
    click.echo(f"written to    {out_path}  (each member's root approves it: "
               "exchange membership approve)")


@membership.command("approve")
@click.argument("change_path", metavar="CHANGE", type=_PATH)
@click.option("--agency-dir", required=True, type=_DIR, help="This agency's folder.")
@click.option("--out", "out_path", required=True,
              type=click.Path(path_type=Path, dir_okay=False), help="Approval file to write.")
@click.option("--root-passphrase-env", default=None, metavar="VAR")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def approve(change_path: Path, agency_dir: Path, out_path: Path,
            root_passphrase_env: str | None, as_json: bool) -> None:
    """Sign a membership change with this agency's root key."""
    change = _read_change(change_path)
    settings = ceremony.read_settings(agency_dir)
    root = read_signing_key(AgencyPaths(agency_dir).root_key,
                            passphrase_from_env(root_passphrase_env))
    approval = ledger_pb2.MemberSignature(
        agency=settings.agency, key_id=root.key_id,
        signature=root.sign(Domain.MEMBERSHIP_CHANGE, settings.chain_id,
                            membership_change_statement(change)))
    write_public(out_path, approval.SerializeToString(deterministic=True))
    if as_json:
        emit_json({"change": _describe(change), "approved_by": settings.agency,
                   "out": str(out_path)})
        return
    click.echo(f"approved      {_describe(change)}")
    click.echo(f"by            {settings.agency}  ->  {out_path}")


@membership.command("submit")
@click.argument("change_path", metavar="CHANGE", type=_PATH)
@click.argument("approvals", nargs=-1, required=True, type=_PATH)
@click.option("--agency-dir", required=True, type=_DIR,
              help="A current member's folder: its root signs the transaction.")
@click.option("--root-passphrase-env", default=None, metavar="VAR")
@node_options
@json_option
def submit(change_path: Path, approvals: tuple[Path, ...], agency_dir: Path,
           root_passphrase_env: str | None, profile_option: str | None,
           timeout_s: float, as_json: bool) -> None:
    """Put the approved change on the ledger; it takes effect when its block commits."""
    change = _read_change(change_path)
    for path in approvals:
        change.approvals.append(ceremony.read_signature(path))
    _, client = connect(profile_option, timeout_s)
    with client:
        signer = _root_signer(agency_dir, client.status().chain_id, root_passphrase_env)
        done = _submit(client, signer, f"membership change ({_describe(change)})",
                       lambda body: body.membership_change.CopyFrom(change), quiet=as_json)
    if as_json:
        emit_json({"change": _describe(change), **done})


@agency.command("rotate")
@click.option("--kind", type=click.Choice(["node", "tls", "data"]), required=True,
              help="node: the node's signing key; tls: the node's TLS certificate (every "
                   "other node certificate of the agency is revoked); data: the data key "
                   "queries, answers and findings are sealed to (the node keeps the old "
                   "one to read what was sealed to it).")
@click.option("--compromised", is_flag=True,
              help="With --kind data: the data key replaced is compromised; no node seals "
                   "anything to it again, and any transaction sealed to it is invalid.")
@click.option("--agency-dir", required=True, type=_DIR, help="This agency's folder.")
@click.option("--root-passphrase-env", default=None, metavar="VAR")
@node_options
@json_option
def rotate(kind: str, compromised: bool, agency_dir: Path, root_passphrase_env: str | None,
           profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Replace the node's signing key or TLS certificate with no downtime: the new one is
    prepared beside the current one (.next), the rotation signed by the root goes on the
    ledger, and the running node switches when it applies it."""
    paths = AgencyPaths(agency_dir)
    if compromised and kind != "data":
        raise click.UsageError("--compromised marks a data key; use it with --kind data")
    _, client = connect(profile_option, timeout_s)
    with client:
        signer = _root_signer(agency_dir, client.status().chain_id, root_passphrase_env)
        if kind == "data":
            data_key = DataKey.generate()
            write_private(next_path(paths.data_key), data_key.to_pem(), overwrite=True)
            rotation = ledger_pb2.KeyRotation(key_kind="data", new_public_key=data_key.public_key,
                                              compromised=compromised)
            detail = f"new data key {data_key.key_id.hex()}" + (
                ", the old one compromised" if compromised else "")
        elif kind == "node":
            key = SigningKey.generate()
            write_private(next_path(paths.node_key), key.to_pem(), overwrite=True)
            rotation = ledger_pb2.KeyRotation(key_kind="node", new_public_key=key.public_key)
            detail = f"new node key {key.key_id.hex()}"
        else:
            ca = tls.read_identity(paths.ca_cert, paths.ca_key)
            current = tls.load_certificate(paths.node_cert.read_bytes())
            sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            hosts = [str(n.value) for n in sans.value]
            fresh = tls.issue_node_certificate(ca, signer.agency, hosts,
                                               datetime.datetime.now(datetime.UTC))
            tls.write_identity(fresh, next_path(paths.node_cert), next_path(paths.node_tls_key),
                               overwrite=True)
            rotation = ledger_pb2.KeyRotation(key_kind="tls", new_certificate=fresh.cert_der)
            detail = f"new node certificate sha256 {tls.fingerprint_sha256(fresh.certificate)[:16]}"
        done = _submit(client, signer, f"{kind} rotation of {signer.agency} ({detail})",
                       lambda body: body.key_rotation.CopyFrom(rotation), quiet=as_json)
    if as_json:
        emit_json({"agency": signer.agency, "kind": kind, "detail": detail,
                   "compromised": compromised, **done})


__all__ = ["membership"]
