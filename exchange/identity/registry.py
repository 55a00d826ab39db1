"""Who may sign what, as of a point in the chain.

The registry starts from a verified genesis (member root and node keys, initial
credentials) and is advanced, in chain order, by the transactions that change keys:
credential issue and revoke, key rotation, membership change. It is deterministic:
given the same genesis and the same transactions at the same heights, every node and
every offline verifier resolve a key id to the same answer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from google.protobuf.message import DecodeError

from exchange.errors import CredentialInvalid, InvalidSignature, MalformedInput, UnknownSigner
from exchange.identity.genesis import parse_credential, verify_genesis
from exchange.identity.keys import Domain, key_id, verify
from exchange.v1 import identity_pb2, ledger_pb2

# Transaction kinds that change what the registry resolves.
REGISTRY_KINDS = frozenset({"credential_issue", "credential_revoke", "key_rotation",
                            "membership_change"})

ROLE_ROOT = "root"
ROLE_NODE = "node"


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What the ledger says about one signing key."""

    key_id: bytes
    public_key: bytes
    agency: str
    subject: str  # "root", "node" or the credential's subject
    roles: tuple[str, ...]
    not_before_ms: int = 0
    not_after_ms: int = 0  # 0 = no expiry (member keys)
    revoked_at_height: int | None = None  # invalid in blocks above this height
    credential: bytes = b""  # serialized SignedCredential, for credentials


def quorum_size(member_count: int) -> int:
    """q = ceil((n + f + 1) / 2), f = floor((n - 1) / 3): 3 of 4, 4 of 5 (decision 4)."""
    f = (member_count - 1) // 3
    return (member_count + f + 2) // 2


class KeyRegistry:
    """Resolves key ids to keys, agencies and roles as of the last applied height."""

    def __init__(self, signed_genesis: identity_pb2.SignedGenesis) -> None:
        genesis = verify_genesis(signed_genesis)
        self.signed_genesis = signed_genesis
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.members: dict[str, identity_pb2.Member] = {}
        self._keys: dict[bytes, KeyInfo] = {}
        for member in genesis.members:
            self._add_member(member)
        for signed in genesis.credentials:
            self.add_credential(signed)

    # -- queries -------------------------------------------------------------------
    @property
    def quorum(self) -> int:
        return quorum_size(len(self.members))

    def resolve(self, kid: bytes) -> KeyInfo:
        info = self._keys.get(bytes(kid))
        if info is None:
            raise UnknownSigner(f"unknown signer key {bytes(kid).hex()}")
        return info

    def check_signer(self, kid: bytes, height: int, time_ms: int) -> KeyInfo:
        """The key's info if it may sign in a block at `height` stamped `time_ms`."""
        info = self.resolve(kid)
        if info.revoked_at_height is not None and height > info.revoked_at_height:
            raise CredentialInvalid(
                f"key {bytes(kid).hex()} of {info.agency}/{info.subject} was revoked at "
                f"height {info.revoked_at_height}")
        if info.not_after_ms and not info.not_before_ms <= time_ms <= info.not_after_ms:
            raise CredentialInvalid(
                f"credential of {info.agency}/{info.subject} is not valid at {time_ms}")
        return info

    def node_key(self, agency: str) -> KeyInfo:
        member = self.members.get(agency)
        if member is None:
            raise UnknownSigner(f"{agency!r} is not a member")
        return self.resolve(key_id("ed25519", bytes(member.node_public_key)))

    def credentials(self) -> list[KeyInfo]:
        return [k for k in self._keys.values() if k.credential]

    # -- changes -------------------------------------------------------------------
    def _add_member(self, member: identity_pb2.Member) -> None:
        if member.agency in self.members:
            raise MalformedInput(f"member {member.agency} already exists")
        self.members[member.agency] = member
        for role, pub in ((ROLE_ROOT, member.root_public_key), (ROLE_NODE, member.node_public_key)):
            kid = key_id("ed25519", bytes(pub))
            if kid in self._keys:
                raise MalformedInput(f"key of {member.agency}/{role} is already registered")
            self._keys[kid] = KeyInfo(kid, bytes(pub), member.agency, role, (role,))

    def add_credential(self, signed: identity_pb2.SignedCredential) -> KeyInfo:
        """Verify a credential against its agency's root and register its key."""
        cred = parse_credential(signed)
        if cred.chain_id != self.chain_id:
            raise InvalidSignature("credential is for another chain")
        member = self.members.get(cred.agency)
        if member is None:
            raise UnknownSigner(f"credential of non-member {cred.agency!r}")
        root = bytes(member.root_public_key)
        if bytes(cred.issuer_key_id) != key_id("ed25519", root):
            raise InvalidSignature(f"credential of {cred.agency}/{cred.subject} names another issuer")
        verify(root, Domain.CREDENTIAL, self.chain_id, signed.credential, signed.signature)
        kid = key_id("ed25519", bytes(cred.public_key))
        if kid in self._keys:
            raise MalformedInput(f"key {kid.hex()} is already registered")
        info = KeyInfo(kid, bytes(cred.public_key), cred.agency, cred.subject, tuple(cred.roles),
                       cred.not_before_ms, cred.not_after_ms,
                       credential=signed.SerializeToString(deterministic=True))
        self._keys[kid] = info
        return info

    def revoke(self, kid: bytes, by_agency: str, height: int) -> None:
        info = self.resolve(kid)
        if info.agency != by_agency:
            raise CredentialInvalid(f"{by_agency} may not revoke a key of {info.agency}")
        if info.subject in (ROLE_ROOT, ROLE_NODE):
            raise CredentialInvalid("member keys change by rotation, not revocation")
        if info.revoked_at_height is None:
            self._keys[info.key_id] = replace(info, revoked_at_height=height)

    def apply(self, body: ledger_pb2.TxBody, signer: KeyInfo, height: int) -> None:
        """Advance the registry by one valid transaction at `height`."""
        kind = body.WhichOneof("kind")
        if kind == "credential_issue":
            signed = identity_pb2.SignedCredential()
            try:
                signed.ParseFromString(body.credential_issue.signed_credential)
            except DecodeError as exc:
                raise MalformedInput(f"credential does not parse: {exc}") from exc
            if parse_credential(signed).agency != signer.agency:
                raise CredentialInvalid("a credential is put on the ledger by its own agency")
            self.add_credential(signed)
        elif kind == "credential_revoke":
            self.revoke(bytes(body.credential_revoke.key_id), signer.agency, height)
