"""`exchange init`: every key, certificate, credential and config of a local network.

The steps are the ones a multi-machine key ceremony takes, each on its own agency's
machine: `make_agency` makes one agency's keys and TLS CA and its genesis Member entry;
`issue_identities` certifies its analysts and automation under its root once the chain
id is known; genesis is built from the members and credentials and signed by every root;
`write_agency_configs` writes the node config and profiles. The ceremony's steps
(exchange.identity.ceremony) are made of these; `init_network`
(exchange.identity.local_network) runs them all on one machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exchange.errors import AlreadyExists, MalformedInput
from exchange.identity import tls
from exchange.identity.config import (
    AGENCY_PATTERN,
    ENV_VAR_PATTERN,
    BlockCutting,
    NodeConfig,
    NodePaths,
    Profile,
    format_address,
    write_node_config,
    write_profile,
)
from exchange.identity.genesis import (
    genesis_hash,
    issue_credential,
    parse_credential,
    verify_genesis,
)
from exchange.identity.keys import DataKey, SigningKey, write_private
from exchange.v1 import identity_pb2

DEFAULT_AGENCIES = ("tax", "police", "customs", "pboc")
DISPLAY_NAMES = {
    "tax": "State Taxation Administration, Shenzhen Tax Service",
    "police": "Shenzhen Municipal Public Security Bureau",
    "customs": "Shenzhen Customs",
    "pboc": "People's Bank of China, Shenzhen Central Sub-branch",
}
AGENCIES_MAX = 64
PORT_STRIDE = 10
METRICS_PORT_OFFSET = 1
CREDENTIAL_VALIDITY_MS = 365 * 24 * 3600 * 1000
CHAIN_ID_PREFIX = "shenzhen-exchange-"
CHAIN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
GENESIS_FILE = "genesis.pb"
GENESIS_JSON_FILE = "genesis.json"
PROFILE_SUBJECT = "analyst-1"
DIR_MODE = 0o700


@dataclass(frozen=True)
class IdentitySpec:
    """An analyst or automation identity to certify, and its roles."""

    subject: str
    roles: tuple[str, ...]


DEFAULT_IDENTITIES = (
    IdentitySpec("analyst-1", ("analyst",)),
    IdentitySpec("supervisor-1", ("analyst", "supervisor")),
    IdentitySpec("automation", ("automation",)),
)


@dataclass(frozen=True)
class AgencyPaths:
    """The file layout of one agency's folder."""

    dir: Path

    @property
    def keys_dir(self) -> Path:
        return self.dir / "keys"

    @property
    def root_key(self) -> Path:
        return self.keys_dir / "root.key"

    @property
    def node_key(self) -> Path:
        return self.keys_dir / "node.key"

    @property
    def data_key(self) -> Path:
        return self.keys_dir / "data.key"

    @property
    def tls_dir(self) -> Path:
        return self.dir / "tls"

    @property
    def ca_cert(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.tls_dir / "ca.key"

    @property
    def node_cert(self) -> Path:
        return self.tls_dir / "node.pem"

    @property
    def node_tls_key(self) -> Path:
        return self.tls_dir / "node.key"

    @property
    def analysts_dir(self) -> Path:
        return self.dir / "analysts"

    @property
    def data_dir(self) -> Path:
        return self.dir / "data"

    @property
    def node_config(self) -> Path:
        return self.dir / "node.toml"

    @property
    def profile(self) -> Path:
        return self.dir / "profile.toml"

    def signing_key(self, subject: str) -> Path:
        return self.analysts_dir / f"{subject}.key"

    def credential(self, subject: str) -> Path:
        return self.analysts_dir / f"{subject}.cred"

    def client_cert(self, subject: str) -> Path:
        return self.analysts_dir / f"{subject}.tls.pem"

    def client_key(self, subject: str) -> Path:
        return self.analysts_dir / f"{subject}.tls.key"

    def subject_profile(self, subject: str) -> Path:
        return self.analysts_dir / f"{subject}.toml"


@dataclass(frozen=True)
class AgencyMaterial:
    """One agency's keys as made by `make_agency`, and its genesis Member entry."""

    agency: str
    paths: AgencyPaths
    root: SigningKey
    node_key: SigningKey
    data_key: DataKey
    tls_ca: tls.TlsIdentity
    node_tls: tls.TlsIdentity
    member: identity_pb2.Member


@dataclass(frozen=True)
class IdentityMaterial:
    """An analyst's or automation's key, credential and TLS client certificate."""

    subject: str
    roles: tuple[str, ...]
    key: SigningKey
    credential: identity_pb2.SignedCredential
    tls: tls.TlsIdentity


@dataclass(frozen=True)
class AgencyLayout:
    agency: str
    dir: Path
    node_config: Path
    profile: Path
    grpc_address: str
    metrics_address: str


@dataclass(frozen=True)
class NetworkLayout:
    """What `init_network` wrote, with paths under the final out_dir."""

    out_dir: Path
    chain_id: str
    genesis: Path
    genesis_json: Path
    genesis_hash: bytes
    agencies: tuple[AgencyLayout, ...]


# -- validation ------------------------------------------------------------------------

def validate_agencies(agencies: Sequence[str]) -> tuple[str, ...]:
    names = tuple(agencies)
    if not names:
        raise MalformedInput("at least one agency is needed")
    if len(names) > AGENCIES_MAX:
        raise MalformedInput(f"at most {AGENCIES_MAX} agencies")
    for name in names:
        if not AGENCY_PATTERN.match(name):
            raise MalformedInput(
                f"invalid agency name {name!r}: lowercase letter, then 1-30 of a-z, 0-9, '-'")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MalformedInput(f"agency named twice: {', '.join(dupes)}")
    return names


def validate_chain_id(chain_id: str) -> str:
    if not CHAIN_ID_PATTERN.match(chain_id):
        raise MalformedInput(
            f"invalid chain id {chain_id!r}: 1-64 of A-Z, a-z, 0-9, '.', '_', '-'")
    return chain_id


def validate_host(host: str) -> str:
    """A host peers can dial: a DNS name or a specific IP address."""
    tls.general_name(host)
    try:
        if ipaddress.ip_address(host).is_unspecified:
            raise MalformedInput(f"host {host!r} is not an address peers can dial")
    except ValueError:
        pass
    return host


def new_chain_id() -> str:
    return CHAIN_ID_PREFIX + secrets.token_hex(4)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _datetime(ms: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)


def _mkdir(path: Path) -> None:
    path.mkdir(mode=DIR_MODE)
    os.chmod(path, DIR_MODE)


def write_public(path: Path, data: bytes, overwrite: bool = False) -> None:
    """Write a public file (mode 0644), fsynced; refuse to replace one unless
    `overwrite`."""
    if path.exists() and not overwrite:
        raise AlreadyExists(f"{path} already exists")
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# -- the steps -------------------------------------------------------------------------

def make_agency(dir: Path, agency: str, host: str, port: int, *,
                display_name: str | None = None, now_ms: int | None = None,
                root_passphrase: bytes | None = None) -> AgencyMaterial:
    """Make one agency's root, node and data keys, TLS CA and node certificate under
    `dir` (created; must not exist), and its genesis Member entry at host:port."""
    validate_agencies([agency])
    validate_host(host)
    if not 1 <= port <= 65535:
        raise MalformedInput(f"port {port} out of range")
    now = _datetime(_now_ms() if now_ms is None else now_ms)
    paths = AgencyPaths(dir)
    if dir.exists():
        raise AlreadyExists(f"{dir} already exists")
    _mkdir(dir)
    _mkdir(paths.keys_dir)
    _mkdir(paths.tls_dir)

    root, node_key, data_key = SigningKey.generate(), SigningKey.generate(), DataKey.generate()
    write_private(paths.root_key, root.to_pem(root_passphrase))
    write_private(paths.node_key, node_key.to_pem())
    write_private(paths.data_key, data_key.to_pem())

    ca = tls.create_ca(agency, now)
    node_tls = tls.issue_node_certificate(ca, agency, [host], now)
    tls.write_identity(ca, paths.ca_cert, paths.ca_key)
    tls.write_identity(node_tls, paths.node_cert, paths.node_tls_key)

    member = identity_pb2.Member(
        agency=agency,
        display_name=display_name or DISPLAY_NAMES.get(agency, agency),
        root_public_key=root.public_key,
        node_public_key=node_key.public_key,
        data_public_key=data_key.public_key,
        tls_ca_certificate=ca.cert_der,
        address=format_address(host, port),
    )
    return AgencyMaterial(agency, paths, root, node_key, data_key, ca, node_tls, member)


def issue_identities(material: AgencyMaterial, chain_id: str, now_ms: int,
                     specs: Sequence[IdentitySpec] = DEFAULT_IDENTITIES,
                     validity_ms: int = CREDENTIAL_VALIDITY_MS,
                     passphrase: bytes | None = None) -> tuple[IdentityMaterial, ...]:
    """Make each identity's signing key (encrypted with `passphrase` when given), its TLS
    client certificate and its credential (signed by the agency root, valid `validity_ms`
    from `now_ms`, naming the certificate's key), under analysts/."""
    paths = material.paths
    if not paths.analysts_dir.exists():
        _mkdir(paths.analysts_dir)
    validity_days = max(1, validity_ms // (24 * 3600 * 1000))
    out: list[IdentityMaterial] = []
    for spec in specs:
        key = SigningKey.generate()
        client = tls.issue_client_certificate(material.tls_ca, material.agency, spec.subject,
                                              _datetime(now_ms), validity_days)
        credential = issue_credential(
            chain_id, material.agency, spec.subject, key.public_key, spec.roles, now_ms,
            now_ms + validity_ms, material.root,
            tls_key_sha256=tls.public_key_sha256(client.certificate))
        write_private(paths.signing_key(spec.subject), key.to_pem(passphrase))
        write_public(paths.credential(spec.subject),
                      credential.SerializeToString(deterministic=True))
        tls.write_identity(client, paths.client_cert(spec.subject),
                           paths.client_key(spec.subject))
        out.append(IdentityMaterial(spec.subject, spec.roles, key, credential, client))
    return tuple(out)


def write_agency_configs(paths: AgencyPaths, agency: str, address: str,
                         subjects: Sequence[str], genesis: identity_pb2.Genesis,
                         genesis_path: Path, listen_grpc: str, listen_metrics: str,
                         log_level: str = "info",
                         passphrase_env: str | None = None,
                         overwrite: bool = False, join: bool = False) -> NodeConfig:
    """Write node.toml, profile.toml (for analyst-1, or the first subject) and a profile
    per identity under analysts/, and create the empty data folder. `address` is where
    this agency's node is dialled (its genesis Member address)."""
    if not paths.data_dir.exists():
        _mkdir(paths.data_dir)
    params = genesis.params
    config = NodeConfig(
        agency=agency,
        node_id=agency,
        paths=NodePaths(data_dir=paths.data_dir, genesis=genesis_path,
                        node_key=paths.node_key, data_key=paths.data_key,
                        tls_cert=paths.node_cert, tls_key=paths.node_tls_key,
                        trust_bundle=None),
        listen_grpc=listen_grpc,
        listen_metrics=listen_metrics,
        block=BlockCutting(tx_max=params.block_tx_max, bytes_max=params.block_bytes_max,
                           interval_ms=params.block_interval_ms),
        peers={m.agency: m.address for m in genesis.members if m.agency != agency},
        log_level=log_level,
        join=join,
    )
    config.check_against(genesis)
    write_node_config(paths.node_config, config, overwrite=overwrite)

    default_subject = (PROFILE_SUBJECT if PROFILE_SUBJECT in subjects
                       else subjects[0] if subjects else None)
    for subject in subjects:
        profile = Profile(
            agency=agency, subject=subject, node=address,
            tls_cert=paths.client_cert(subject),
            tls_key=paths.client_key(subject),
            ca_bundle=paths.ca_cert, signing_key=paths.signing_key(subject),
            credential=paths.credential(subject), passphrase_env=passphrase_env)
        write_profile(paths.subject_profile(subject), profile, overwrite=overwrite)
        if subject == default_subject:
            write_profile(paths.profile, profile, overwrite=overwrite)
    return config


def genesis_description(signed: identity_pb2.SignedGenesis) -> dict[str, Any]:
    """A human-readable account of genesis, for people; genesis.pb is what is trusted."""
    genesis = verify_genesis(signed)
    p = genesis.params
    members = []
    for m in genesis.members:
        ca = tls.load_certificate(bytes(m.tls_ca_certificate))
        members.append({
            "agency": m.agency,
            "display_name": m.display_name,
            "address": m.address,
            "root_public_key": bytes(m.root_public_key).hex(),
            "node_public_key": bytes(m.node_public_key).hex(),
            "data_public_key": bytes(m.data_public_key).hex(),
            "tls_ca_sha256": tls.fingerprint_sha256(ca),
            "tls_ca_subject": ca.subject.rfc4514_string(),
        })
    credentials = []
    for signed_cred in genesis.credentials:
        cred = parse_credential(signed_cred)
        credentials.append({
            "agency": cred.agency,
            "subject": cred.subject,
            "roles": list(cred.roles),
            "public_key": bytes(cred.public_key).hex(),
            "not_before_ms": cred.not_before_ms,
            "not_after_ms": cred.not_after_ms,
            "issuer_key_id": bytes(cred.issuer_key_id).hex(),
            "tls_key_sha256": bytes(cred.tls_key_sha256).hex(),
        })
    return {
        "note": "description only; genesis.pb is the signed, authoritative genesis",
        "chain_id": genesis.chain_id,
        "created_at_ms": genesis.created_at_ms,
        "genesis_hash": genesis_hash(signed).hex(),
        "params": {
            "admission_window_ms": p.admission_window_ms,
            "envelope_bytes_max": p.envelope_bytes_max,
            "block_tx_max": p.block_tx_max,
            "block_bytes_max": p.block_bytes_max,
            "block_interval_ms": p.block_interval_ms,
            "query_deadline_ms": p.query_deadline_ms,
        },
        "members": members,
        "credentials": credentials,
        "policies": len(genesis.policies),
        "signatures": [{"agency": s.agency, "key_id": bytes(s.key_id).hex()}
                       for s in signed.signatures],
    }


def passphrase_from_env(env_var: str | None) -> bytes | None:
    """A key passphrase from the environment variable named, if any."""
    if env_var is None:
        return None
    if not ENV_VAR_PATTERN.match(env_var):
        raise MalformedInput(f"{env_var!r} is not an environment variable name")
    value = os.environ.get(env_var, "")
    if len(value) < 8:
        raise MalformedInput(f"environment variable {env_var} must hold the key passphrase "
                             "(8 characters at least)")
    return value.encode()
