"""Genesis and credentials: building, signing and checking them.

Pure functions over bytes: nothing here reads files or clocks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

from google.protobuf.message import DecodeError

from exchange.errors import InvalidSignature, MalformedInput
from exchange.identity.keys import Domain, SigningKey, key_id, verify
from exchange.v1 import identity_pb2, ledger_pb2

# Generous for real work (a comparison job's bulk batches of 500, `exchange check perf`
# from one analyst, the whole test suite) and four to eight times tighter in bytes for
# probes, so that one workstation cannot flood the network with test traffic: the
# issue 16 flood sent 12.7 MiB/s of 1 MiB probes.
DEFAULT_RATE_LIMITS = identity_pb2.RateLimits(
    signer_bytes_per_s=8 << 20,
    signer_tx_per_s=5_000,
    agency_bytes_per_s=16 << 20,
    agency_tx_per_s=10_000,
    burst_s=4,
    probe_bytes_per_s=1 << 20,
    probe_tx_per_s=1_000,
    probes_disabled=False,
)

DEFAULT_PARAMS = identity_pb2.ChainParams(
    admission_window_ms=120_000,
    envelope_bytes_max=1 << 20,
    block_tx_max=2_000,
    block_bytes_max=4 << 20,
    block_interval_ms=20,
    query_deadline_ms=10 * 60_000,
    rate_limits=DEFAULT_RATE_LIMITS,
)
# Credential.tls_key_sha256: SHA-256 of the holder's TLS client key (SubjectPublicKeyInfo).
TLS_KEY_SHA256_BYTES = 32


def genesis_hash(signed: identity_pb2.SignedGenesis) -> bytes:
    """The hash block 1's prev_hash must equal: SHA-256 of the genesis bytes."""
    return hashlib.sha256(signed.genesis).digest()


def sign_genesis(genesis_bytes: bytes, chain_id: str, agency: str,
                 root: SigningKey) -> ledger_pb2.MemberSignature:
    """One founding member's root signature over the exact genesis bytes."""
    return ledger_pb2.MemberSignature(
        agency=agency, key_id=root.key_id,
        signature=root.sign(Domain.GENESIS, chain_id, genesis_bytes))


def parse_genesis(signed: identity_pb2.SignedGenesis) -> identity_pb2.Genesis:
    genesis = identity_pb2.Genesis()
    try:
        genesis.ParseFromString(signed.genesis)
    except DecodeError as exc:
        raise MalformedInput(f"genesis does not parse: {exc}") from exc
    if not genesis.chain_id:
        raise MalformedInput("genesis names no chain id")
    names = [m.agency for m in genesis.members]
    if not names:
        raise MalformedInput("genesis has no members")
    if len(set(names)) != len(names):
        raise MalformedInput("genesis names a member twice")
    return genesis


def verify_genesis(signed: identity_pb2.SignedGenesis) -> identity_pb2.Genesis:
    """Parse genesis and check that every founding member's root signed it."""
    genesis = parse_genesis(signed)
    roots = {m.agency: bytes(m.root_public_key) for m in genesis.members}
    signed_by: set[str] = set()
    for sig in signed.signatures:
        root = roots.get(sig.agency)
        if root is None:
            raise InvalidSignature(f"genesis signed by non-member {sig.agency!r}")
        if bytes(sig.key_id) != key_id("ed25519", root):
            raise InvalidSignature(f"genesis signature of {sig.agency} names another key")
        verify(root, Domain.GENESIS, genesis.chain_id, signed.genesis, sig.signature)
        signed_by.add(sig.agency)
    missing = sorted(set(roots) - signed_by)
    if missing:
        raise InvalidSignature(f"genesis lacks the signature of {', '.join(missing)}")
    return genesis


def build_genesis(chain_id: str, created_at_ms: int, members: Iterable[identity_pb2.Member],
                  credentials: Iterable[identity_pb2.SignedCredential] = (),
                  policies: Iterable[ledger_pb2.Policy] = (),
                  params: identity_pb2.ChainParams | None = None) -> bytes:
    genesis = identity_pb2.Genesis(
        chain_id=chain_id, created_at_ms=created_at_ms,
        params=params if params is not None else DEFAULT_PARAMS,
        members=list(members), credentials=list(credentials), policies=list(policies))
    return genesis.SerializeToString(deterministic=True)


def assemble_genesis(genesis_bytes: bytes, chain_id: str,
                     roots: Mapping[str, SigningKey]) -> identity_pb2.SignedGenesis:
    """Genesis signed by every given root (the all-in-one local network)."""
    return identity_pb2.SignedGenesis(
        genesis=genesis_bytes,
        signatures=[sign_genesis(genesis_bytes, chain_id, agency, root)
                    for agency, root in sorted(roots.items())])


def issue_credential(chain_id: str, agency: str, subject: str, public_key: bytes,
                     roles: Iterable[str], not_before_ms: int, not_after_ms: int,
                     root: SigningKey, tls_key_sha256: bytes = b"",
                     ) -> identity_pb2.SignedCredential:
    """A credential certifying `public_key` for `subject` of `agency`, signed by its root;
    `tls_key_sha256` binds the holder's TLS client certificate (tls.public_key_sha256):
    calls made with it act under this credential (KeyRegistry.check_reader)."""
    if not_after_ms <= not_before_ms:
        raise ValueError("credential must expire after it starts")
    if len(tls_key_sha256) not in (0, TLS_KEY_SHA256_BYTES):
        raise ValueError(f"a TLS key digest is {TLS_KEY_SHA256_BYTES} bytes")
    body = identity_pb2.Credential(
        chain_id=chain_id, agency=agency, subject=subject, public_key=public_key,
        roles=sorted(set(roles)), not_before_ms=not_before_ms, not_after_ms=not_after_ms,
        issuer_key_id=root.key_id, tls_key_sha256=tls_key_sha256,
    ).SerializeToString(deterministic=True)
    return identity_pb2.SignedCredential(
        credential=body, signature=root.sign(Domain.CREDENTIAL, chain_id, body))


def parse_credential(signed: identity_pb2.SignedCredential) -> identity_pb2.Credential:
    cred = identity_pb2.Credential()
    try:
        cred.ParseFromString(signed.credential)
    except DecodeError as exc:
        raise MalformedInput(f"credential does not parse: {exc}") from exc
    if len(cred.public_key) != 32:
        raise MalformedInput("credential public key must be 32 bytes")
    if len(cred.tls_key_sha256) not in (0, TLS_KEY_SHA256_BYTES):
        raise MalformedInput(f"credential TLS key digest must be {TLS_KEY_SHA256_BYTES} "
                             "bytes")
    return cred
