"""`exchange credential list/revoke`: the analysts' credentials on the ledger, and
withdrawing one (signed by a supervisor or the root of the analyst's own agency)."""

from __future__ import annotations

from typing import Any

import click

from exchange.cli.node_cmds import connect, json_option, node_options
from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.client import Signer, load_genesis
from exchange.errors import MalformedInput
from exchange.identity.registry import KeyRegistry
from exchange.v1 import ledger_pb2


@click.group("credential")
def credential() -> None:
    """Analysts' credentials: list them, revoke one."""


def _registry(profile_path: object) -> KeyRegistry:
    _, signed, _ = load_genesis(profile_path)  # type: ignore[arg-type]
    return KeyRegistry(signed)


@credential.command("list")
@click.option("--agency", default="", help="Only this agency's credentials.")
@node_options
@json_option
def list_(agency: str, profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """The credentials genesis issued (key id, agency, subject, roles, validity)."""
    profile_path, client = connect(profile_option, timeout_s)
    client.close()
    rows: list[dict[str, Any]] = [{"key_id": k.key_id.hex(), "agency": k.agency, "subject": k.subject,
             "roles": list(k.roles), "not_after_ms": k.not_after_ms,
             "tls_key_sha256": k.tls_key_sha256.hex()}
            for k in _registry(profile_path).credentials()
            if not agency or k.agency == agency]
    if as_json:
        emit_json({"credentials": rows})
        return
    table("credentials in genesis", ["key id", "agency", "subject", "roles", "valid until"],
          [[r["key_id"], r["agency"], r["subject"], ",".join(r["roles"]),
            fmt_ms(r["not_after_ms"])] for r in rows])


@credential.command("revoke")
@click.option("--subject", default="", help="The analyst's subject, e.g. analyst-1.")
@click.option("--key-id", "key_hex", default="", help="Or the credential's key id (hex).")
@click.option("--reason", required=True, help="Why (on the ledger).")
@node_options
@json_option
def revoke(subject: str, key_hex: str, reason: str, profile_option: str | None,
           timeout_s: float, as_json: bool) -> None:
    """Revoke a credential of your own agency; from the next block on, everything it
    signs is refused. Sign with a supervisor's profile (--profile)."""
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        registry = _registry(profile_path)
        signer = Signer.load(client.profile, registry.chain_id)
        if bool(subject) == bool(key_hex):
            raise click.UsageError("give exactly one of --subject and --key-id")
        if subject:
            matches = [k for k in registry.credentials()
                       if k.agency == signer.agency and k.subject == subject]
            if not matches:
                raise MalformedInput(f"{signer.agency} has no credential for {subject!r}")
            kid = matches[0].key_id
        else:
            try:
                kid = bytes.fromhex(key_hex)
            except ValueError as exc:
                raise MalformedInput(f"--key-id {key_hex!r} is not hex") from exc
        envelope = signer.make_envelope(lambda body: body.credential_revoke.CopyFrom(
            ledger_pb2.CredentialRevoke(key_id=kid, reason=reason)))
        result = client.submit(envelope, wait=True)
    if result.result != "OK":
        raise MalformedInput(f"revocation committed at height {result.height} but judged "
                             f"{result.result} (only a supervisor or the root of the key's "
                             "own agency may revoke it)")
    if as_json:
        emit_json({"key_id": kid.hex(), "height": result.height, "result": result.result})
    else:
        console.print(f"revoked {kid.hex()} at height {result.height}: refused from "
                      f"height {result.height + 1} on")
