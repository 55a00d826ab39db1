"""`exchange credential list/issue/revoke`: the analysts' credentials on the ledger (as
the node's key registry holds them, revocations included), putting a new one on the
ledger (signed by the agency root), and withdrawing one (signed by a supervisor or the
root of the analyst's own agency)."""

from __future__ import annotations

import datetime
import re
import time
from pathlib import Path
from typing import Any

import click

from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.cli.status_cmd import connect, json_option, node_options
from exchange.client import Signer, chain_id_for
from exchange.errors import AlreadyExists, MalformedInput
from exchange.identity import tls
from exchange.identity.config import Profile, write_profile
from exchange.identity.genesis import issue_credential
from exchange.identity.keys import CachedSigner, SigningKey, read_signing_key, write_private
from exchange.identity.network import AgencyPaths, passphrase_from_env, write_public
from exchange.ids import choose, parse_id_prefix
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2

KEY_ID_BYTES = 16
VALID_DAYS_MAX = 3 * 366
SUBJECT_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
ROLES = ("analyst", "supervisor", "automation")
DAY_MS = 24 * 3600 * 1000


@click.group("credential")
def credential() -> None:
    """Analysts' credentials: list them, issue one, revoke one."""


def state_of(c: node_pb2.CredentialView, height: int, now_ms: int) -> str:
    """What a credential is worth now: valid, revoked (and since when), expired, or not
    valid yet."""
    if c.revoked_at_height:
        return f"revoked at height {c.revoked_at_height}"
    if c.not_after_ms and now_ms >= c.not_after_ms:
        return "expired"
    if now_ms < c.not_before_ms or c.valid_from_height > height + 1:
        return "not valid yet"
    return "valid"


def _row(c: node_pb2.CredentialView, height: int, now_ms: int) -> dict[str, Any]:
    return {"key_id": bytes(c.key_id).hex(), "agency": c.agency, "subject": c.subject,
            "roles": list(c.roles), "not_before_ms": c.not_before_ms,
            "not_after_ms": c.not_after_ms,
            "revoked_at_height": c.revoked_at_height or None,
            "valid_from_height": c.valid_from_height, "state": state_of(c, height, now_ms)}


@credential.command("list")
@click.option("--agency", default="", help="Only this agency's credentials.")
@node_options
@json_option
def list_(agency: str, profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Every credential on the ledger (genesis's and those issued since): key id, agency,
    subject, roles, validity, and whether it is revoked or expired."""
    _, client = connect(profile_option, timeout_s)
    with client:
        listing = client.list_credentials(agency)
    now_ms = int(time.time() * 1000)
    rows = [_row(c, listing.height, now_ms) for c in listing.credentials]
    if as_json:
        emit_json({"height": listing.height, "credentials": rows})
        return
    table(f"credentials at height {listing.height}",
          ["key id", "agency", "subject", "roles", "valid until", "state"],
          [[r["key_id"][:16], r["agency"], r["subject"], ",".join(r["roles"]),
            fmt_ms(r["not_after_ms"]), r["state"]] for r in rows])


@credential.command("issue")
@click.option("--agency-dir", required=True,
              type=click.Path(path_type=Path, file_okay=False, exists=True),
              help="Your agency's folder (its root key, TLS CA and analysts/).")
@click.option("--subject", required=True, help="The new identity's name, e.g. analyst-2.")
@click.option("--roles", default="analyst", show_default=True,
              help=f"Comma-separated, of {', '.join(ROLES)}.")
@click.option("--valid-days", type=click.IntRange(1, VALID_DAYS_MAX), default=365,
              show_default=True)
@click.option("--passphrase-env", default=None, metavar="VAR",
              help="Encrypt the new signing key with the passphrase in $VAR (its profile "
                   "names the variable).")
@click.option("--root-passphrase-env", default=None, metavar="VAR",
              help="The root key's passphrase, when it is encrypted.")
@node_options
@json_option
def issue(agency_dir: Path, subject: str, roles: str, valid_days: int,
          passphrase_env: str | None, root_passphrase_env: str | None,
          profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Make a new identity of your agency (signing key, TLS client certificate, profile
    under analysts/) and put its credential, signed by the agency root, on the ledger;
    it may sign from the next block on. --profile names the node to submit through
    (any identity of the agency, e.g. its supervisor)."""
    paths = AgencyPaths(agency_dir)
    role_list = _new_identity(paths, subject, roles)
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        agency = client.profile.agency
        chain_id = chain_id_for(profile_path, client)
        members = {m.agency: m for m in client.status().member_entries}
        if agency not in members:
            raise MalformedInput(f"{agency} is not a member of chain {chain_id}")
        root = read_signing_key(paths.root_key, passphrase_from_env(root_passphrase_env))
        if root.public_key != bytes(members[agency].root_public_key):
            raise MalformedInput(f"{paths.root_key} is not {agency}'s root key on the ledger")
        taken = [c for c in client.list_credentials(agency).credentials
                 if c.subject == subject and not c.revoked_at_height]
        if taken:
            raise AlreadyExists(f"{agency} already has a credential for {subject!r} "
                                f"(key {bytes(taken[0].key_id).hex()}); revoke it first")
        ca = tls.read_identity(paths.ca_cert, paths.ca_key)
        now_ms = int(time.time() * 1000)
        key = SigningKey.generate()
        client_tls = tls.issue_client_certificate(
            ca, agency, subject, datetime.datetime.fromtimestamp(now_ms / 1000, datetime.UTC),
            valid_days)
        # the credential binds the new TLS client key: reads with it act under it
        signed = issue_credential(chain_id, agency, subject, key.public_key, role_list,
                                  now_ms, now_ms + valid_days * DAY_MS, root,
                                  tls.public_key_sha256(client_tls.certificate))
        _write_identity(paths, subject, key, signed, client_tls, passphrase_env,
                        client.profile)
        signer = Signer(agency, "root", chain_id, CachedSigner(root))
        envelope = signer.make_envelope(lambda body: body.credential_issue.CopyFrom(
            ledger_pb2.CredentialIssue(
                signed_credential=signed.SerializeToString(deterministic=True))))
        result = client.submit(envelope, wait=True)
    if result.result != "OK":
        raise MalformedInput(f"credential of {subject} committed at height {result.height} "
                             f"but judged {result.result}")
    out = {"key_id": key.key_id.hex(), "agency": agency, "subject": subject,
           "roles": role_list, "not_after_ms": now_ms + valid_days * DAY_MS,
           "height": result.height, "profile": str(paths.subject_profile(subject))}
    if as_json:
        emit_json(out)
    else:
        console.print(f"issued {agency}/{subject} ({','.join(role_list)}) key "
                      f"{key.key_id.hex()} at height {result.height}; profile "
                      f"{paths.subject_profile(subject)}")


def _new_identity(paths: AgencyPaths, subject: str, roles: str) -> list[str]:
    """The roles of a new identity `subject`, refused when the subject or a role is not
    valid or the subject has files already."""
    if not SUBJECT_PATTERN.match(subject):
        raise MalformedInput(f"subject {subject!r}: a lowercase letter, then up to 39 of "
                             "a-z, 0-9, '-'")
    role_list = sorted({r.strip() for r in roles.split(",") if r.strip()})
    unknown = [r for r in role_list if r not in ROLES]
    if not role_list or unknown:
        raise MalformedInput(f"--roles {roles!r}: each one of {', '.join(ROLES)}")
    targets = [paths.signing_key(subject), paths.credential(subject),
               paths.client_cert(subject), paths.client_key(subject),
               paths.subject_profile(subject)]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise AlreadyExists(f"{subject} already has files: {', '.join(existing)}")
    return role_list


def _write_identity(paths: AgencyPaths, subject: str, key: SigningKey,
                    signed: identity_pb2.SignedCredential, client_tls: tls.TlsIdentity,
                    passphrase_env: str | None, via: Profile) -> None:
    """The new identity's files: signing key, credential, TLS client certificate and
    key, and a profile that talks to the node `via` does."""
    passphrase = passphrase_from_env(passphrase_env)
    write_private(paths.signing_key(subject), key.to_pem(passphrase))
    write_public(paths.credential(subject), signed.SerializeToString(deterministic=True))
    tls.write_identity(client_tls, paths.client_cert(subject), paths.client_key(subject))
    write_profile(paths.subject_profile(subject), Profile(
        agency=via.agency, subject=subject, node=via.node,
        tls_cert=paths.client_cert(subject), tls_key=paths.client_key(subject),
        ca_bundle=paths.ca_cert, signing_key=paths.signing_key(subject),
        credential=paths.credential(subject), passphrase_env=passphrase_env,
        server_name=via.server_name))


@credential.command("revoke")
@click.option("--subject", default="", help="The analyst's subject, e.g. analyst-1.")
@click.option("--key-id", "key_hex", default="",
              help="Or the credential's key id (hex, or at least 8 digits of it).")
@click.option("--reason", required=True, help="Why (on the ledger).")
@node_options
@json_option
def revoke(subject: str, key_hex: str, reason: str, profile_option: str | None,
           timeout_s: float, as_json: bool) -> None:
    """Revoke a credential of your own agency; from the next block on, everything it
    signs is refused. Sign with a supervisor's profile (--profile)."""
    if bool(subject) == bool(key_hex):
        raise click.UsageError("give exactly one of --subject and --key-id")
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        signer = Signer.load(client.profile, chain_id_for(profile_path, client))
        if subject:
            own = list(client.list_credentials(signer.agency).credentials)
            matches = [c for c in own if c.subject == subject and not c.revoked_at_height]
            if not matches:
                raise MalformedInput(f"{signer.agency} has no unrevoked credential for "
                                     f"{subject!r}")
            if len(matches) > 1:
                raise MalformedInput(f"{signer.agency} has {len(matches)} credentials for "
                                     f"{subject!r}: give --key-id (one of "
                                     f"{', '.join(bytes(c.key_id).hex() for c in matches)})")
            kid = bytes(matches[0].key_id)
        else:
            # a whole key id goes to the ledger as it is (which judges who may revoke
            # it); a beginning is looked up among every credential on the ledger
            prefix = parse_id_prefix(key_hex, "--key-id", KEY_ID_BYTES)
            kid = prefix.low if prefix.complete else choose(
                prefix, [bytes(c.key_id) for c in client.list_credentials().credentials],
                "credential key")
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
