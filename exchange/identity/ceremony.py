"""The key ceremony: founding a network with no shared secret.

Each agency runs `agency_init` on its own machine: it makes its keys and TLS CA there
and publishes only a membership request (its genesis Member entry and first
credentials), signed by its root. A coordinator assembles the requests into a draft
genesis (`propose_genesis`); each agency checks that the draft carries its own entry
unchanged and signs it with its root (`sign_draft`); `finalize_genesis` accepts the
draft only with every member's signature. `configure_agency` then writes the node's
config from the final genesis, after checking genesis names this agency with exactly
the keys in its folder. The all-in-one `init_network` (exchange.identity.local_network)
runs the same steps on one machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

from exchange.errors import AlreadyExists, InvalidSignature, MalformedInput
from exchange.identity import tls
from exchange.identity.config import RAFT_PORT_OFFSET, NodeConfig, format_address, parse_address
from exchange.identity.default_policies import default_policies
from exchange.identity.genesis import (
    DEFAULT_PARAMS,
    build_genesis,
    genesis_hash,
    parse_credential,
    parse_genesis,
    sign_genesis,
    verify_genesis,
)
from exchange.identity.keys import (
    Domain,
    key_id,
    read_data_key,
    read_signing_key,
)
from exchange.identity.network import (
    DEFAULT_IDENTITIES,
    DIR_MODE,
    GENESIS_FILE,
    GENESIS_JSON_FILE,
    METRICS_PORT_OFFSET,
    AgencyMaterial,
    AgencyPaths,
    IdentitySpec,
    genesis_description,
    issue_identities,
    make_agency,
    validate_chain_id,
    validate_host,
    write_agency_configs,
    write_public,
)
from exchange.identity.registry import open_member_entry, verify_credential_of
from exchange.v1 import identity_pb2, ledger_pb2

REQUEST_FILE = "request.pb"
REQUEST_JSON_FILE = "request.json"
SETTINGS_FILE = "agency.toml"
REQUEST_BYTES_MAX = 64 * 1024
DRAFT_BYTES_MAX = 16 << 20
SIGNATURE_FILE_BYTES_MAX = 4096
_SUBJECT_FILE = re.compile(r"^([a-z0-9][a-z0-9._-]{0,62})\.cred$")


@dataclass(frozen=True)
class AgencySettings:
    """What `agency init` decided that `agency configure` needs again (public)."""

    agency: str
    chain_id: str
    address: str  # where peers dial this node
    listen_grpc: str
    listen_metrics: str
    passphrase_env: str | None = None


# -- files ------------------------------------------------------------------------------

def read_limited(path: Path, limit: int, what: str) -> bytes:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise MalformedInput(f"{path}: cannot read {what}: {exc.strerror}") from exc
    if size > limit:
        raise MalformedInput(f"{path}: {what} is {size} bytes, more than {limit}")
    return path.read_bytes()


M = TypeVar("M", bound=Message)


def read_message(path: Path, message: M, bytes_max: int, what: str) -> M:
    """`message` parsed from the file at `path`, refused (naming the file) when larger
    than `bytes_max` or not such a message."""
    try:
        message.ParseFromString(read_limited(path, bytes_max, what))
    except DecodeError as exc:
        raise MalformedInput(f"{path}: not a {what}: {exc}") from exc
    return message


def write_settings(paths: AgencyPaths, settings: AgencySettings) -> None:
    lines = [
        "# Written by `exchange agency init`; read by `exchange agency configure`.",
        f'agency = "{settings.agency}"',
        f'chain_id = "{settings.chain_id}"',
        f'address = "{settings.address}"',
        f'listen_grpc = "{settings.listen_grpc}"',
        f'listen_metrics = "{settings.listen_metrics}"',
    ]
    if settings.passphrase_env:
        lines.append(f'passphrase_env = "{settings.passphrase_env}"')
    write_public(paths.dir / SETTINGS_FILE, ("\n".join(lines) + "\n").encode())


def read_settings(agency_dir: Path) -> AgencySettings:
    path = agency_dir / SETTINGS_FILE
    try:
        data = tomllib.loads(read_limited(path, 64 * 1024, "agency settings").decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MalformedInput(f"{path}: {exc}") from exc
    try:
        settings = AgencySettings(
            agency=str(data["agency"]), chain_id=str(data["chain_id"]),
            address=str(data["address"]), listen_grpc=str(data["listen_grpc"]),
            listen_metrics=str(data["listen_metrics"]),
            passphrase_env=(str(data["passphrase_env"]) if "passphrase_env" in data
                            else None))
    except KeyError as exc:
        raise MalformedInput(f"{path}: missing key {exc.args[0]!r}") from exc
    for address in (settings.address, settings.listen_grpc, settings.listen_metrics):
        parse_address(address)
    return settings


# -- membership requests ----------------------------------------------------------------

def make_request(material: AgencyMaterial, chain_id: str,
                 credentials: Iterable[identity_pb2.SignedCredential] = ()
                 ) -> identity_pb2.MembershipRequest:
    """The agency's public membership request, signed by its root."""
    member = material.member.SerializeToString(deterministic=True)
    return identity_pb2.MembershipRequest(
        chain_id=chain_id, member=member,
        signature=material.root.sign(Domain.MEMBERSHIP_REQUEST, chain_id, member),
        credentials=list(credentials))


def open_request(request: identity_pb2.MembershipRequest, chain_id: str | None = None
                 ) -> tuple[identity_pb2.Member, list[identity_pb2.SignedCredential]]:
    """The member entry and credentials of a request whose root signature, CA
    certificate and credentials check; InvalidSignature or MalformedInput otherwise."""
    if chain_id is not None and request.chain_id != chain_id:
        raise MalformedInput(f"request is for chain {request.chain_id!r}, not {chain_id!r}")
    validate_chain_id(request.chain_id)
    member = open_member_entry(request.member, request.signature, request.chain_id)
    for signed in request.credentials:
        verify_credential_of(member, request.chain_id, signed)
    return member, list(request.credentials)


def read_request(path: Path, chain_id: str | None = None) -> identity_pb2.MembershipRequest:
    """A membership request file, checked as `open_request` checks it."""
    request = read_message(path, identity_pb2.MembershipRequest(), REQUEST_BYTES_MAX,
                           "membership request")
    try:
        open_request(request, chain_id)
    except (MalformedInput, InvalidSignature) as exc:
        raise type(exc)(f"{path}: {exc}") from exc
    return request


def request_description(member: identity_pb2.Member,
                        credentials: Sequence[identity_pb2.SignedCredential],
                        chain_id: str) -> dict[str, Any]:
    ca = tls.load_certificate(bytes(member.tls_ca_certificate))
    return {
        "note": "description only; request.pb is the signed request",
        "chain_id": chain_id,
        "agency": member.agency,
        "display_name": member.display_name,
        "address": member.address,
        "root_public_key": bytes(member.root_public_key).hex(),
        "node_public_key": bytes(member.node_public_key).hex(),
        "data_public_key": bytes(member.data_public_key).hex(),
        "tls_ca_sha256": tls.fingerprint_sha256(ca),
        "credentials": [{"subject": c.subject, "roles": list(c.roles)}
                        for c in map(parse_credential, credentials)],
    }


# -- one agency's machine ---------------------------------------------------------------

def _listen_host(host: str) -> str:
    """An address to listen on: an IP address or name, or 0.0.0.0 / :: for every
    interface (which peers cannot dial, but a node in a container or pod listens on)."""
    tls.general_name(host)
    return host


def agency_init(out_dir: Path, agency: str, host: str, chain_id: str, *,
                port: int = 7100, metrics_port: int | None = None,
                listen_host: str | None = None, display_name: str | None = None,
                passphrase: bytes | None = None, passphrase_env: str | None = None,
                now_ms: int, specs: Sequence[IdentitySpec] = DEFAULT_IDENTITIES,
                root_passphrase: bytes | None = None,
                ) -> tuple[AgencyMaterial, identity_pb2.MembershipRequest]:
    """Make one agency's keys, TLS CA and certificates, first identities and signed
    membership request under `out_dir` (which must not exist). Written into a temporary
    folder beside it and renamed into place only when complete."""
    validate_chain_id(chain_id)
    validate_host(host)
    metrics = port + METRICS_PORT_OFFSET if metrics_port is None else metrics_port
    if not 1 <= metrics <= 65535:
        raise MalformedInput(f"metrics port {metrics} out of range")
    if metrics == port + RAFT_PORT_OFFSET or port + RAFT_PORT_OFFSET > 65535:
        raise MalformedInput(f"port {port} + {RAFT_PORT_OFFSET} is the Raft peer link's: "
                             "it must be free and not the metrics port")
    bind = host if listen_host is None else _listen_host(listen_host)
    out_dir = Path(os.path.normpath(out_dir.absolute()))
    if out_dir.exists():
        raise AlreadyExists(f"{out_dir} already exists")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    holder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.init-", dir=out_dir.parent))
    try:
        os.chmod(holder, DIR_MODE)
        work = holder / "agency"
        material = make_agency(work, agency, host, port, display_name=display_name,
                               now_ms=now_ms, root_passphrase=root_passphrase)
        identities = issue_identities(material, chain_id, now_ms, specs,
                                      passphrase=passphrase)
        request = make_request(material, chain_id, [i.credential for i in identities])
        paths = material.paths
        write_public(paths.dir / REQUEST_FILE, request.SerializeToString(deterministic=True))
        member, creds = open_request(request, chain_id)
        write_public(paths.dir / REQUEST_JSON_FILE, (json.dumps(
            request_description(member, creds, chain_id), indent=2) + "\n").encode())
        write_settings(paths, AgencySettings(
            agency=agency, chain_id=chain_id, address=material.member.address,
            listen_grpc=format_address(bind, port),
            listen_metrics=format_address(bind, metrics), passphrase_env=passphrase_env))
        os.rename(work, out_dir)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    moved = AgencyPaths(out_dir)
    return (AgencyMaterial(material.agency, moved, material.root, material.node_key,
                           material.data_key, material.tls_ca, material.node_tls,
                           material.member), request)


def check_own_member(agency_dir: Path, member: identity_pb2.Member,
                     passphrase: bytes | None = None) -> None:
    """Raise InvalidSignature unless `member` carries exactly the public keys and CA of
    the agency whose folder this is (a coordinator cannot substitute its own)."""
    paths = AgencyPaths(agency_dir)
    node = read_signing_key(paths.node_key)
    data = read_data_key(paths.data_key)
    ca = tls.load_certificate(paths.ca_cert.read_bytes())
    from cryptography.hazmat.primitives.serialization import Encoding

    expected = {
        "node key": (bytes(member.node_public_key), node.public_key),
        "data key": (bytes(member.data_public_key), data.public_key),
        "TLS CA": (bytes(member.tls_ca_certificate), ca.public_bytes(Encoding.DER)),
    }
    # the root key itself may be encrypted or already offline: its public half is in
    # the agency's own signed request
    request_path = agency_dir / REQUEST_FILE
    if request_path.exists():
        requested, _ = open_request(read_request(request_path))
        expected["root key"] = (bytes(member.root_public_key),
                                bytes(requested.root_public_key))
    elif paths.root_key.exists():
        root = read_signing_key(paths.root_key, passphrase)
        expected["root key"] = (bytes(member.root_public_key), root.public_key)
    for what, (named, own) in expected.items():
        if named != own:
            raise InvalidSignature(f"genesis names {member.agency} with another {what} "
                                   f"than the one in {agency_dir}")


def _own_member(genesis: identity_pb2.Genesis, agency: str) -> identity_pb2.Member:
    for member in genesis.members:
        if member.agency == agency:
            return member
    raise MalformedInput(f"genesis of chain {genesis.chain_id} does not name {agency!r}")


def sign_draft(draft: identity_pb2.SignedGenesis, agency_dir: Path,
               passphrase: bytes | None = None) -> ledger_pb2.MemberSignature:
    """This agency's root signature over the draft genesis, given only after checking
    that the draft names this agency with its own keys, on the chain it asked for."""
    settings = read_settings(agency_dir)
    genesis = parse_genesis(draft)
    if genesis.chain_id != settings.chain_id:
        raise MalformedInput(f"draft is for chain {genesis.chain_id!r}; this agency asked "
                             f"to join {settings.chain_id!r}")
    member = _own_member(genesis, settings.agency)
    check_own_member(agency_dir, member, passphrase)
    if member.address != settings.address:
        raise MalformedInput(f"draft gives {settings.agency} the address {member.address}, "
                             f"not {settings.address}")
    root = read_signing_key(AgencyPaths(agency_dir).root_key, passphrase)
    return sign_genesis(draft.genesis, genesis.chain_id, settings.agency, root)


# -- the coordinator --------------------------------------------------------------------

def propose_genesis(requests: Sequence[identity_pb2.MembershipRequest], created_at_ms: int,
                    params: identity_pb2.ChainParams | None = None
                    ) -> identity_pb2.SignedGenesis:
    """A draft genesis (no signatures yet) from the founding members' requests."""
    if not requests:
        raise MalformedInput("a genesis needs at least one membership request")
    chain_ids = {r.chain_id for r in requests}
    if len(chain_ids) != 1:
        raise MalformedInput(f"requests name different chains: {sorted(chain_ids)}")
    chain_id = chain_ids.pop()
    members: list[identity_pb2.Member] = []
    credentials: list[identity_pb2.SignedCredential] = []
    for request in requests:
        member, creds = open_request(request, chain_id)
        members.append(member)
        credentials.extend(creds)
    names = [m.agency for m in members]
    if len(set(names)) != len(names):
        raise MalformedInput(f"two requests for one agency: {sorted(names)}")
    addresses = [m.address for m in members]
    if len(set(addresses)) != len(addresses):
        raise MalformedInput("two members give the same address")
    genesis_bytes = build_genesis(chain_id, created_at_ms, members, credentials,
                                  params=params if params is not None else DEFAULT_PARAMS,
                                  policies=default_policies(names))
    draft = identity_pb2.SignedGenesis(genesis=genesis_bytes)
    parse_genesis(draft)
    return draft


def finalize_genesis(draft: identity_pb2.SignedGenesis,
                     signatures: Iterable[ledger_pb2.MemberSignature]
                     ) -> identity_pb2.SignedGenesis:
    """The draft with its members' signatures; refused unless every member signed."""
    by_agency: dict[str, ledger_pb2.MemberSignature] = {}
    for sig in signatures:
        if sig.agency in by_agency and by_agency[sig.agency] != sig:
            raise MalformedInput(f"two different signatures of {sig.agency}")
        by_agency[sig.agency] = sig
    signed = identity_pb2.SignedGenesis(
        genesis=draft.genesis, signatures=[by_agency[a] for a in sorted(by_agency)])
    verify_genesis(signed)
    return signed


def read_draft(path: Path) -> identity_pb2.SignedGenesis:
    """A genesis file, signed or not yet, whose genesis parses."""
    draft = read_message(path, identity_pb2.SignedGenesis(), DRAFT_BYTES_MAX, "genesis")
    try:
        parse_genesis(draft)
    except MalformedInput as exc:
        raise MalformedInput(f"{path}: {exc}") from exc
    return draft


def read_signature(path: Path) -> ledger_pb2.MemberSignature:
    sig = read_message(path, ledger_pb2.MemberSignature(), SIGNATURE_FILE_BYTES_MAX,
                       "member signature")
    if not sig.agency or len(sig.signature) != 64:
        raise MalformedInput(f"{path}: not a member signature")
    return sig


def write_genesis(path: Path, signed: identity_pb2.SignedGenesis,
                  overwrite: bool = False) -> Path:
    """Write genesis.pb and, beside it, genesis.json for people; returns the JSON path."""
    write_public(path, signed.SerializeToString(deterministic=True), overwrite)
    described = path.with_suffix(".json")
    write_public(described, (json.dumps(genesis_description(signed), indent=2) + "\n").encode(),
               overwrite)
    return described


# -- after genesis ----------------------------------------------------------------------

def identity_subjects(paths: AgencyPaths) -> list[str]:
    if not paths.analysts_dir.is_dir():
        return []
    return sorted(m.group(1) for p in paths.analysts_dir.iterdir()
                  if (m := _SUBJECT_FILE.match(p.name)))


def configure_agency(agency_dir: Path, genesis_path: Path, overwrite: bool = False,
                     log_level: str = "info", join: bool = False) -> NodeConfig:
    """Put the final genesis in the agency's folder and write its node.toml and profiles,
    after checking genesis is fully signed and names this agency with its own keys.
    With `join`, the agency joins a running network: genesis must not name it, and the
    node follows the chain until a membership change adds it."""
    agency_dir = Path(os.path.normpath(agency_dir.absolute()))
    settings = read_settings(agency_dir)
    signed = read_draft(genesis_path)
    genesis = verify_genesis(signed)
    if genesis.chain_id != settings.chain_id:
        raise MalformedInput(f"genesis is of chain {genesis.chain_id!r}; this agency was "
                             f"made for {settings.chain_id!r}")
    if join:
        if any(m.agency == settings.agency for m in genesis.members):
            raise MalformedInput(f"{settings.agency} is a founding member of chain "
                                 f"{genesis.chain_id}; it does not join")
        address = settings.address
    else:
        member = _own_member(genesis, settings.agency)
        check_own_member(agency_dir, member)
        address = member.address
    paths = AgencyPaths(agency_dir)
    target = agency_dir / GENESIS_FILE
    if genesis_path.absolute() != target:
        write_public(target, signed.SerializeToString(deterministic=True), overwrite)
        write_public(agency_dir / GENESIS_JSON_FILE,
                   (json.dumps(genesis_description(signed), indent=2) + "\n").encode(),
                   overwrite)
    return write_agency_configs(paths, settings.agency, address,
                                identity_subjects(paths), genesis, target,
                                settings.listen_grpc, settings.listen_metrics,
                                log_level=log_level, passphrase_env=settings.passphrase_env,
                                overwrite=overwrite, join=join)


def describe_draft(draft: identity_pb2.SignedGenesis) -> dict[str, Any]:
    """What an agency reads before signing: the chain, members and their key ids."""
    genesis = parse_genesis(draft)
    return {
        "chain_id": genesis.chain_id,
        "genesis_hash": genesis_hash(draft).hex(),
        "members": [{
            "agency": m.agency, "address": m.address,
            "root_key_id": key_id("ed25519", bytes(m.root_public_key)).hex(),
            "node_key_id": key_id("ed25519", bytes(m.node_public_key)).hex(),
            "tls_ca_sha256": tls.fingerprint_sha256(
                tls.load_certificate(bytes(m.tls_ca_certificate))),
        } for m in genesis.members],
        "credentials": len(genesis.credentials),
        "policies": len(genesis.policies),
        "rate_limits": json_format.MessageToDict(
            genesis.params.rate_limits, preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True)
        if genesis.params.HasField("rate_limits") else None,
        "signed_by": sorted(s.agency for s in draft.signatures),
    }


__all__ = [
    "AgencySettings", "agency_init", "check_own_member",
    "configure_agency", "describe_draft", "finalize_genesis", "make_request",
    "open_request", "propose_genesis", "read_draft", "read_request", "read_settings",
    "read_signature", "sign_draft", "write_genesis", "write_public",
]
