"""Who may sign what, as of a point in the chain.

The registry starts from a verified genesis (member root and node keys, initial
credentials) and is advanced, in chain order, by the transactions that change keys:
credential issue and revoke, key rotation, membership change. It is deterministic:
given the same genesis and the same transactions at the same heights, every node and
every offline verifier resolve a key id to the same answer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

from cryptography.exceptions import InvalidSignature as X509InvalidSignature
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from google.protobuf.message import DecodeError

from exchange.errors import CredentialInvalid, InvalidSignature, MalformedInput, UnknownSigner
from exchange.identity.config import AGENCY_PATTERN, parse_address
from exchange.identity.genesis import parse_credential, verify_genesis
from exchange.identity.keys import PUBLIC_KEY_BYTES, Domain, key_id, verify
from exchange.identity.tls import ca_common_name, common_name, load_certificate
from exchange.v1 import identity_pb2, ledger_pb2

# Transaction kinds that change what the registry resolves.
REGISTRY_KINDS = frozenset({"credential_issue", "credential_revoke", "key_rotation",
                            "membership_change"})

ROLE_ROOT = "root"
ROLE_NODE = "node"
# A rotated-out node key still signs blocks and attestations this many blocks past the
# rotation, so blocks its node proposed or attested before it switched keys stay valid.
NODE_KEY_GRACE_BLOCKS = 64
MEMBERS_MAX = 64
ROTATION_KINDS = ("node", "tls", "data")


def membership_change_statement(change: ledger_pb2.MembershipChange) -> bytes:
    """What each approving root signs: the operation, the member set it applies to, and
    the new member entry, the agency removed or the new rate limits."""
    if change.rate_limits:
        op, subject = b"params", bytes(change.rate_limits)
    elif change.remove_agency:
        op, subject = b"remove", change.remove_agency.encode()
    else:
        op, subject = b"add", bytes(change.member)
    return op + b"\0" + "\n".join(change.members_before).encode() + b"\0" + subject


RATE_BURST_S_MAX = 3_600


def parse_rate_limits(raw: bytes) -> identity_pb2.RateLimits:
    """Rate limits from a parameters change: parsed and checked."""
    limits = identity_pb2.RateLimits()
    try:
        limits.ParseFromString(raw)
    except DecodeError as exc:
        raise MalformedInput(f"rate limits do not parse: {exc}") from exc
    if limits.SerializeToString(deterministic=True) != raw:
        raise MalformedInput("rate limits are not in their canonical form")
    if not 1 <= limits.burst_s <= RATE_BURST_S_MAX:
        raise MalformedInput(f"rate limits: burst_s must be 1..{RATE_BURST_S_MAX}")
    return limits


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
    valid_from_height: int = 0  # invalid in blocks below this height (keys added later)
    credential: bytes = b""  # serialized SignedCredential, for credentials
    tls_key_sha256: bytes = b""  # the holder's TLS client key it binds, for credentials


@dataclass(frozen=True, slots=True)
class DataKeyInfo:
    """What the ledger says about one agency data key (X25519)."""

    key_id: bytes
    public_key: bytes
    agency: str
    valid_from_height: int = 0
    retired_at_height: int | None = None  # rotated out in this block
    compromised_at_height: int | None = None  # never sealed to after this block


def quorum_size(member_count: int) -> int:
    """q = ceil((n + f + 1) / 2), f = floor((n - 1) / 3): 3 of 4, 4 of 5 (decision 4)."""
    f = (member_count - 1) // 3
    return (member_count + f + 2) // 2


def open_member_entry(member_bytes: bytes, request_signature: bytes,
                      chain_id: str) -> identity_pb2.Member:
    """A new member's entry (a membership request's, or a membership change's) whose
    agency's own root signed it for `chain_id`: parsed and checked (name, key sizes,
    root signature, CA named for the agency, address). Used by the key ceremony and by
    the ledger's membership change alike."""
    member = identity_pb2.Member()
    try:
        member.ParseFromString(member_bytes)
    except DecodeError as exc:
        raise MalformedInput(f"member entry does not parse: {exc}") from exc
    if not AGENCY_PATTERN.match(member.agency):
        raise MalformedInput(f"invalid agency name {member.agency!r}")
    for name, value in (("root", member.root_public_key), ("node", member.node_public_key),
                        ("data", member.data_public_key)):
        if len(value) != 32:
            raise MalformedInput(f"member entry of {member.agency!r}: {name} key must be "
                                 "32 bytes")
    verify(bytes(member.root_public_key), Domain.MEMBERSHIP_REQUEST, chain_id, member_bytes,
           request_signature)
    named = common_name(load_certificate(bytes(member.tls_ca_certificate)))
    if named != ca_common_name(member.agency):
        raise MalformedInput(f"member entry of {member.agency!r}: its TLS CA is named "
                             f"{named!r}, not {ca_common_name(member.agency)!r}")
    parse_address(member.address)
    return member


def verify_credential_of(member: identity_pb2.Member, chain_id: str,
                         signed: identity_pb2.SignedCredential) -> identity_pb2.Credential:
    """A credential `member`'s root issued for `chain_id`: parsed and checked."""
    cred = parse_credential(signed)
    if cred.chain_id != chain_id:
        raise InvalidSignature("credential is for another chain")
    if cred.agency != member.agency:
        raise MalformedInput(f"credential of {cred.agency} offered as {member.agency}'s")
    root = bytes(member.root_public_key)
    if bytes(cred.issuer_key_id) != key_id("ed25519", root):
        raise InvalidSignature(f"credential of {cred.agency}/{cred.subject} names another issuer")
    verify(root, Domain.CREDENTIAL, chain_id, signed.credential, signed.signature)
    return cred


class KeyRegistry:
    """Resolves key ids to keys, agencies and roles as of the last applied height."""

    def __init__(self, signed_genesis: identity_pb2.SignedGenesis) -> None:
        genesis = verify_genesis(signed_genesis)
        self.signed_genesis = signed_genesis
        self.genesis = genesis
        self.chain_id = genesis.chain_id
        self.members: dict[str, identity_pb2.Member] = {}
        self.former_members: dict[str, identity_pb2.Member] = {}
        # agency -> the one node TLS certificate (DER) peers accept from it, once it has
        # rotated its node certificate on the ledger (before that: any node certificate
        # its CA issued).
        self.node_certs: dict[str, bytes] = {}
        self._keys: dict[bytes, KeyInfo] = {}
        # The admission rate limits in force (genesis', until a parameters change).
        self.rate_limits = identity_pb2.RateLimits()
        self.rate_limits.CopyFrom(genesis.params.rate_limits)
        self.rate_limits_height = 0  # the height of the change that set them
        # x25519 key id -> every data key any member has had (current and rotated out)
        self.data_keys: dict[bytes, DataKeyInfo] = {}
        # SHA-256 of a TLS client key -> the key id of the latest credential naming it
        self._by_tls_key: dict[bytes, bytes] = {}
        # (agency, subject) -> the key id of the latest credential issued for the subject
        self._by_subject: dict[tuple[str, str], bytes] = {}
        # Bumped whenever members, their node keys or their TLS CAs change, so the node
        # knows to refresh its peer links, trust and Raft configuration.
        self.version = 0
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
        if height < info.valid_from_height:
            raise CredentialInvalid(
                f"key {bytes(kid).hex()} of {info.agency}/{info.subject} is valid from "
                f"height {info.valid_from_height}")
        if info.not_after_ms and not info.not_before_ms <= time_ms <= info.not_after_ms:
            raise CredentialInvalid(
                f"credential of {info.agency}/{info.subject} is not valid at {time_ms}")
        return info

    def check_reader(self, tls_key_sha256: bytes, agency: str, subject: str, height: int,
                     now_ms: int) -> KeyInfo:
        """The credential a person calling with the TLS client key `tls_key_sha256`
        (certificate name `agency`/`subject`) acts under, if it is valid now, at applied
        `height`: named by a credential of that very person, not revoked, not expired.
        Design decision 14: reads are a person's, checked like writes."""
        kid = self._by_tls_key.get(bytes(tls_key_sha256))
        if kid is None:
            # a credential issued before credentials bound a TLS key (none names one) is
            # matched by the certificate's name, while it is its subject's latest
            latest = self._by_subject.get((agency, subject))
            if latest is not None and not self._keys[latest].tls_key_sha256:
                kid = latest
        if kid is None:
            raise CredentialInvalid(f"no credential on the ledger binds the TLS client "
                                    f"certificate of {agency}/{subject} (as of height "
                                    f"{height})")
        info = self._keys[kid]
        if (info.agency, info.subject) != (agency, subject):
            raise CredentialInvalid(f"the TLS client certificate named {agency}/{subject} is "
                                    f"bound to the credential of {info.agency}/{info.subject}")
        if info.revoked_at_height is not None:  # applied: the registry is as of `height`
            raise CredentialInvalid(
                f"credential {kid.hex()} of {agency}/{subject} was revoked at height "
                f"{info.revoked_at_height}: it reads nothing from then on")
        if not info.not_before_ms <= now_ms <= info.not_after_ms:
            raise CredentialInvalid(
                f"credential {kid.hex()} of {agency}/{subject} is valid from "
                f"{info.not_before_ms} to {info.not_after_ms} ms, not at {now_ms} (height "
                f"{height})")
        return info

    def data_key_id(self, agency: str) -> bytes:
        """The key id of `agency`'s current data key: what is sealed to it now."""
        member = self.members.get(agency)
        if member is None:
            raise UnknownSigner(f"{agency!r} is not a member")
        return key_id("x25519", bytes(member.data_public_key))

    def agency_data_key_ids(self, agency: str) -> set[bytes]:
        """Every data key id `agency` has had that is not compromised: payloads sealed to
        any of them stay readable by it (a rotation may overtake a payload in flight)."""
        return {k for k, info in self.data_keys.items()
                if info.agency == agency and info.compromised_at_height is None}

    def compromised(self, data_key_id: bytes) -> bool:
        info = self.data_keys.get(bytes(data_key_id))
        return info is not None and info.compromised_at_height is not None

    def sealing_keys(self, agencies: Iterable[str]) -> list[bytes]:
        """The current data keys (public) of `agencies`, each once, in order: what a
        payload for them is sealed to. A compromised key is never among them."""
        out: list[bytes] = []
        for agency in dict.fromkeys(agencies):
            kid = self.data_key_id(agency)
            if self.compromised(kid):  # the registry replaces a key as it is marked
                raise CredentialInvalid(f"{agency}'s data key {kid.hex()} is compromised")
            out.append(bytes(self.members[agency].data_public_key))
        return out

    def check_recipients(self, recipient_key_ids: Iterable[bytes], what: str) -> None:
        """Refuse a payload sealed to a data key marked compromised (decision 5)."""
        for kid in recipient_key_ids:
            info = self.data_keys.get(bytes(kid))
            if info is not None and info.compromised_at_height is not None:
                raise CredentialInvalid(
                    f"{what} is sealed to {info.agency}'s data key {bytes(kid).hex()}, "
                    f"marked compromised at height {info.compromised_at_height}")

    def node_key(self, agency: str) -> KeyInfo:
        member = self.members.get(agency)
        if member is None:
            raise UnknownSigner(f"{agency!r} is not a member")
        return self.resolve(key_id("ed25519", bytes(member.node_public_key)))

    def node_key_at(self, agency: str, kid: bytes, height: int) -> KeyInfo:
        """The node key `kid` of `agency` if it may sign a block or attestation at
        `height`: the current node key, or one rotated out or of a removed member whose
        validity had not ended by then."""
        info = self._keys.get(bytes(kid))
        if info is None or info.agency != agency or info.subject != ROLE_NODE:
            raise UnknownSigner(f"key {bytes(kid).hex()} is not a node key of {agency!r}")
        if info.revoked_at_height is not None and height > info.revoked_at_height:
            raise CredentialInvalid(f"{agency}'s node key {bytes(kid).hex()} is not valid "
                                    f"after height {info.revoked_at_height}")
        if height < info.valid_from_height:
            raise CredentialInvalid(f"{agency}'s node key {bytes(kid).hex()} is not valid "
                                    f"before height {info.valid_from_height}")
        return info

    def credentials(self) -> list[KeyInfo]:
        return [k for k in self._keys.values() if k.credential]

    # -- changes -------------------------------------------------------------------
    def _add_member(self, member: identity_pb2.Member, valid_from_height: int = 0) -> None:
        if member.agency in self.members:
            raise MalformedInput(f"member {member.agency} already exists")
        self.members[member.agency] = member
        for role, pub in ((ROLE_ROOT, member.root_public_key), (ROLE_NODE, member.node_public_key)):
            kid = key_id("ed25519", bytes(pub))
            if kid in self._keys:
                raise MalformedInput(f"key of {member.agency}/{role} is already registered")
            self._keys[kid] = KeyInfo(kid, bytes(pub), member.agency, role, (role,),
                                      valid_from_height=valid_from_height)
        data_kid = key_id("x25519", bytes(member.data_public_key))
        if data_kid in self.data_keys:
            raise MalformedInput(f"data key of {member.agency} is already registered")
        self.data_keys[data_kid] = DataKeyInfo(data_kid, bytes(member.data_public_key),
                                               member.agency, valid_from_height)

    def add_credential(self, signed: identity_pb2.SignedCredential) -> KeyInfo:
        """Verify a credential against its agency's root and register its key."""
        cred = parse_credential(signed)
        if cred.chain_id != self.chain_id:
            raise InvalidSignature("credential is for another chain")
        member = self.members.get(cred.agency)
        if member is None:
            raise UnknownSigner(f"credential of non-member {cred.agency!r}")
        verify_credential_of(member, self.chain_id, signed)
        kid = key_id("ed25519", bytes(cred.public_key))
        if kid in self._keys:
            raise MalformedInput(f"key {kid.hex()} is already registered")
        info = KeyInfo(kid, bytes(cred.public_key), cred.agency, cred.subject, tuple(cred.roles),
                       cred.not_before_ms, cred.not_after_ms,
                       credential=signed.SerializeToString(deterministic=True),
                       tls_key_sha256=bytes(cred.tls_key_sha256))
        self._keys[kid] = info
        if info.tls_key_sha256:
            self._by_tls_key[info.tls_key_sha256] = kid
        self._by_subject[(info.agency, info.subject)] = kid
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
        elif kind == "key_rotation":
            self.rotate(body.key_rotation, signer, height)
        elif kind == "membership_change":
            self.change_membership(body.membership_change, signer, height)

    def rotate(self, rotation: ledger_pb2.KeyRotation, signer: KeyInfo, height: int) -> None:
        """An agency replaces its node signing key or its TLS CA (signed by its root)."""
        if signer.subject != ROLE_ROOT:
            raise CredentialInvalid("an agency's keys are rotated by its root")
        member = self.members.get(signer.agency)
        if member is None:
            raise CredentialInvalid(f"{signer.agency} is not a member")
        if rotation.compromised and rotation.key_kind != "data":
            raise MalformedInput("only a data key rotation marks the key replaced "
                                 "compromised")
        updated = identity_pb2.Member()
        updated.CopyFrom(member)
        if rotation.key_kind == "node":
            new_key = bytes(rotation.new_public_key)
            if len(new_key) != 32:
                raise MalformedInput("a node key is 32 bytes")
            new_kid = key_id("ed25519", new_key)
            if new_kid in self._keys:
                raise MalformedInput(f"key {new_kid.hex()} is already registered")
            old = self.node_key(signer.agency)
            self._keys[old.key_id] = replace(old, revoked_at_height=height + NODE_KEY_GRACE_BLOCKS)
            self._keys[new_kid] = KeyInfo(new_kid, new_key, signer.agency, ROLE_NODE,
                                          (ROLE_NODE,), valid_from_height=height + 1)
            updated.node_public_key = new_key
        elif rotation.key_kind == "data":
            self._rotate_data_key(rotation, signer.agency, height)
            updated.data_public_key = bytes(rotation.new_public_key)
        elif rotation.key_kind == "tls":
            der = bytes(rotation.new_certificate)
            cert = load_certificate(der)
            if common_name(cert) != f"{signer.agency}/node":
                raise MalformedInput(f"the new certificate is named {common_name(cert)!r}, "
                                     f"not {signer.agency + '/node'!r}")
            try:
                cert.verify_directly_issued_by(
                    load_certificate(bytes(member.tls_ca_certificate)))
            except (ValueError, TypeError, X509InvalidSignature) as exc:
                raise InvalidSignature(f"the new certificate is not issued by "
                                       f"{signer.agency}'s CA") from exc
            if self.node_certs.get(signer.agency) == der:
                raise MalformedInput("the new node certificate is the current one")
            self.node_certs[signer.agency] = der
        else:
            raise MalformedInput(f"key kind {rotation.key_kind!r} cannot be rotated "
                                 f"(one of {', '.join(ROTATION_KINDS)})")
        self.members[signer.agency] = updated
        self.version += 1

    def _rotate_data_key(self, rotation: ledger_pb2.KeyRotation, agency: str,
                         height: int) -> None:
        """The agency's data key becomes `rotation.new_public_key` from the next block on;
        the old one stays known (its agency keeps reading with it) and, if the rotation
        says so, is compromised: nothing may be sealed to it from the next block on."""
        new_key = bytes(rotation.new_public_key)
        if len(new_key) != PUBLIC_KEY_BYTES:
            raise MalformedInput(f"a data key is {PUBLIC_KEY_BYTES} bytes")
        try:
            X25519PublicKey.from_public_bytes(new_key)
        except ValueError as exc:
            raise MalformedInput("the new data key is not an X25519 public key") from exc
        new_kid = key_id("x25519", new_key)
        if new_kid in self.data_keys:
            raise MalformedInput(f"data key {new_kid.hex()} was used before; a data key is "
                                 "never reused")
        old = self.data_keys[self.data_key_id(agency)]
        self.data_keys[old.key_id] = replace(
            old, retired_at_height=height,
            compromised_at_height=height if rotation.compromised else None)
        self.data_keys[new_kid] = DataKeyInfo(new_kid, new_key, agency, height + 1)

    def change_membership(self, change: ledger_pb2.MembershipChange, signer: KeyInfo,
                          height: int) -> None:
        """Add or remove a member, approved by the roots of a quorum of current members."""
        if signer.agency not in self.members or signer.subject not in (ROLE_ROOT, ROLE_NODE):
            raise CredentialInvalid("a membership change is submitted by a member's root "
                                    "or node")
        if sum(1 for part in (change.member, change.remove_agency, change.rate_limits)
               if part) != 1:
            raise MalformedInput("a membership change adds a member, removes one or "
                                 "changes the rate limits")
        limits = parse_rate_limits(bytes(change.rate_limits)) if change.rate_limits else None
        current = sorted(self.members)
        if list(change.members_before) != current:
            raise CredentialInvalid(
                f"the change was approved for members {list(change.members_before)}; the "
                f"members are {current}")
        statement = membership_change_statement(change)
        approvers: set[str] = set()
        for approval in change.approvals:
            member = self.members.get(approval.agency)
            if member is None:
                raise CredentialInvalid(f"approval of non-member {approval.agency!r}")
            root = bytes(member.root_public_key)
            if bytes(approval.key_id) != key_id("ed25519", root):
                raise InvalidSignature(f"approval of {approval.agency} names another key")
            verify(root, Domain.MEMBERSHIP_CHANGE, self.chain_id, statement,
                   bytes(approval.signature))
            approvers.add(approval.agency)
        if len(approvers) < self.quorum:
            raise CredentialInvalid(f"approved by {len(approvers)} of {len(current)} "
                                    f"members; {self.quorum} are needed")
        if limits is not None:
            self.rate_limits = limits
            self.rate_limits_height = height
            return  # no member, key or CA changed: peers and Raft stay as they are
        if change.remove_agency:
            self._remove_member(change.remove_agency, height)
        else:
            self._admit_member(change, height)
        self.version += 1

    def _admit_member(self, change: ledger_pb2.MembershipChange, height: int) -> None:
        member = open_member_entry(bytes(change.member), bytes(change.request_signature),
                                   self.chain_id)
        if member.agency in self.former_members:
            raise MalformedInput(f"{member.agency} was a member before; a name is not reused")
        if len(self.members) >= MEMBERS_MAX:
            raise MalformedInput(f"at most {MEMBERS_MAX} members")
        fresh = [key_id("ed25519", bytes(member.root_public_key)),
                 key_id("ed25519", bytes(member.node_public_key))]
        if any(kid in self._keys for kid in fresh) or fresh[0] == fresh[1]:
            raise MalformedInput(f"{member.agency}'s root or node key is already registered")
        if key_id("x25519", bytes(member.data_public_key)) in self.data_keys:
            raise MalformedInput(f"{member.agency}'s data key is already registered")
        if any(m.address == member.address for m in self.members.values()):
            raise MalformedInput(f"address {member.address} is another member's")
        credentials = []
        for raw in change.credentials:
            signed = identity_pb2.SignedCredential()
            try:
                signed.ParseFromString(raw)
            except DecodeError as exc:
                raise MalformedInput(f"credential does not parse: {exc}") from exc
            cred = verify_credential_of(member, self.chain_id, signed)
            cred_kid = key_id("ed25519", bytes(cred.public_key))
            if cred_kid in self._keys or cred_kid in fresh:
                raise MalformedInput("a joining agency's credential key is already registered")
            fresh.append(cred_kid)
            credentials.append(signed)
        # checked in full above: nothing below raises, so a refused change leaves the
        # registry as it was
        self._add_member(member, valid_from_height=height + 1)
        for signed in credentials:
            self.add_credential(signed)

    def _remove_member(self, agency: str, height: int) -> None:
        member = self.members.get(agency)
        if member is None:
            raise MalformedInput(f"{agency!r} is not a member")
        if len(self.members) == 1:
            raise MalformedInput("the last member cannot be removed")
        # Every key of the agency stops at this height: its node, root and people.
        for kid, info in list(self._keys.items()):
            if info.agency == agency and (info.revoked_at_height is None
                                          or info.revoked_at_height > height):
                self._keys[kid] = replace(info, revoked_at_height=height)
        del self.members[agency]
        self.former_members[agency] = member
