"""Keys, key ids and domain-separated signatures.

Every signature in the system covers ``b"exchange/v1/" + domain + b"\\0" + chain_id +
b"\\0" + payload`` (design decision 1), so a signature made for one purpose or one chain
can never be replayed as another. Ed25519 signing and verification go through PyNaCl
(libsodium), the fastest binding available here; key files are PKCS#8 PEM written with
``cryptography`` so standard tools can read them.
"""

from __future__ import annotations

import enum
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.public
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from exchange.errors import InvalidSignature, MalformedInput

KEY_ID_BYTES = 16
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 32


class Domain(enum.Enum):
    """What a signature is for. The value is part of the signed bytes."""

    ENVELOPE = "envelope"
    BLOCK = "block"
    ATTESTATION = "attestation"
    GENESIS = "genesis"
    CREDENTIAL = "credential"
    MEMBERSHIP_REQUEST = "membership-request"
    MEMBERSHIP_CHANGE = "membership-change"
    CASE_STATEMENT = "case-statement"
    COSIGNATURE = "cosignature"


def signing_message(domain: Domain, chain_id: str, payload: bytes) -> bytes:
    """The exact bytes a signature of `domain` on `chain_id` covers."""
    chain = chain_id.encode()
    if not chain or b"\0" in chain:
        raise MalformedInput(f"invalid chain id {chain_id!r}")
    return b"exchange/v1/" + domain.value.encode() + b"\0" + chain + b"\0" + payload


def key_id(algorithm: str, public_key: bytes) -> bytes:
    """Stable 16-byte identifier of a public key."""
    if algorithm not in ("ed25519", "x25519"):
        raise ValueError(f"unknown algorithm {algorithm}")
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise MalformedInput("public key must be 32 bytes")
    digest = hashlib.sha256(b"exchange/v1/key\0" + algorithm.encode() + b"\0" + public_key)
    return digest.digest()[:KEY_ID_BYTES]


# Signatures this process has verified, so that the same bytes arriving again (an
# envelope admitted here and later in a block, an attestation gossiped and then recorded
# in a block) are not verified twice. Only successes are kept; the key covers the key,
# the signature and a digest of the exact message, so a hit means these very bytes
# verified before. Bounded: cleared when full.
_VERIFIED: dict[bytes, None] = {}
VERIFIED_CACHE_MAX = 100_000


def verify(public_key: bytes, domain: Domain, chain_id: str, payload: bytes,
           signature: bytes) -> None:
    """Raise InvalidSignature unless `signature` is `public_key`'s over the message."""
    if len(signature) != SIGNATURE_BYTES or len(public_key) != PUBLIC_KEY_BYTES:
        raise InvalidSignature("signature or key has the wrong length")
    message = signing_message(domain, chain_id, payload)
    seen = bytes(public_key) + bytes(signature) + hashlib.sha256(message).digest()
    if seen in _VERIFIED:
        return
    try:
        nacl.signing.VerifyKey(public_key).verify(message, signature)
    except nacl.exceptions.BadSignatureError as exc:
        raise InvalidSignature(f"{domain.value} signature does not verify") from exc
    if len(_VERIFIED) >= VERIFIED_CACHE_MAX:
        _VERIFIED.clear()
    _VERIFIED[seen] = None


def is_valid(public_key: bytes, domain: Domain, chain_id: str, payload: bytes,
             signature: bytes) -> bool:
    """verify() as a boolean."""
    try:
        verify(public_key, domain, chain_id, payload, signature)
    except (InvalidSignature, MalformedInput):
        return False
    return True


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key."""

    seed: bytes

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(os.urandom(32))

    @property
    def _nacl(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self._nacl.verify_key)

    @property
    def key_id(self) -> bytes:
        return key_id("ed25519", self.public_key)

    def sign(self, domain: Domain, chain_id: str, payload: bytes) -> bytes:
        return self._nacl.sign(signing_message(domain, chain_id, payload)).signature

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        key = ed25519.Ed25519PrivateKey.from_private_bytes(self.seed)
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 _encryption(passphrase))

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None) -> SigningKey:
        key = _load_private(data, passphrase)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise MalformedInput("not an Ed25519 private key")
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        return cls(raw)


class CachedSigner:
    """A SigningKey with its libsodium key object built once, for hot paths."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key
        self._nacl = nacl.signing.SigningKey(key.seed)
        self.public_key = bytes(self._nacl.verify_key)
        self.key_id = key_id("ed25519", self.public_key)

    def sign(self, domain: Domain, chain_id: str, payload: bytes) -> bytes:
        return self._nacl.sign(signing_message(domain, chain_id, payload)).signature


@dataclass(frozen=True)
class DataKey:
    """An X25519 private key that answers to an agency are sealed to."""

    secret: bytes

    @classmethod
    def generate(cls) -> DataKey:
        return cls(bytes(nacl.public.PrivateKey.generate()))

    @property
    def public_key(self) -> bytes:
        return bytes(nacl.public.PrivateKey(self.secret).public_key)

    @property
    def key_id(self) -> bytes:
        return key_id("x25519", self.public_key)

    def to_pem(self, passphrase: bytes | None = None) -> bytes:
        key = x25519.X25519PrivateKey.from_private_bytes(self.secret)
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 _encryption(passphrase))

    @classmethod
    def from_pem(cls, data: bytes, passphrase: bytes | None = None) -> DataKey:
        key = _load_private(data, passphrase)
        if not isinstance(key, x25519.X25519PrivateKey):
            raise MalformedInput("not an X25519 private key")
        raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                serialization.NoEncryption())
        return cls(raw)


class DataKeyring:
    """An agency's data keys: the current one, which new payloads are sealed to, and
    every earlier one, kept so what was sealed to it stays readable (decision 5). Shared
    by the node's reader and responder; a data key rotation replaces the current key in
    place."""

    def __init__(self, current: DataKey, earlier: Iterable[DataKey] = ()) -> None:
        self.current = current
        self._keys = {k.key_id: k for k in earlier}
        self._keys[current.key_id] = current

    @property
    def public_key(self) -> bytes:
        return self.current.public_key

    @property
    def key_id(self) -> bytes:
        return self.current.key_id

    @property
    def key_ids(self) -> frozenset[bytes]:
        return frozenset(self._keys)

    def get(self, kid: bytes) -> DataKey | None:
        return self._keys.get(bytes(kid))

    def key_for(self, recipient_key_ids: Iterable[bytes]) -> DataKey:
        """The key of ours a payload with these recipients was sealed to (the current
        key when none is: opening then says it is not a recipient)."""
        for kid in recipient_key_ids:
            key = self._keys.get(bytes(kid))
            if key is not None:
                return key
        return self.current

    def replace_current(self, key: DataKey) -> None:
        self._keys[key.key_id] = key
        self.current = key


def retired_data_keys_dir(data_key_path: Path) -> Path:
    """Where a node keeps its rotated-out data keys, one file per key id, mode 0600 as
    its current keys: keys/data.key -> keys/data.retired/<key id>.key."""
    return data_key_path.with_name(data_key_path.stem + ".retired")


def read_data_keyring(path: Path, passphrase: bytes | None = None) -> DataKeyring:
    """The current data key at `path` and every retired one beside it."""
    earlier: list[DataKey] = []
    retired = retired_data_keys_dir(path)
    if retired.is_dir():
        earlier = [read_data_key(p, passphrase) for p in sorted(retired.glob("*.key"))]
    return DataKeyring(read_data_key(path, passphrase), earlier)


def retire_data_key(path: Path, key: DataKey) -> None:
    """Keep `key` among the retired data keys beside `path` (idempotent)."""
    retired = retired_data_keys_dir(path)
    retired.mkdir(mode=0o700, exist_ok=True)
    target = retired / f"{key.key_id.hex()}.key"
    if not target.exists():
        write_private(target, key.to_pem())


def _encryption(passphrase: bytes | None) -> serialization.KeySerializationEncryption:
    if passphrase:
        return serialization.BestAvailableEncryption(passphrase)
    return serialization.NoEncryption()


def _load_private(data: bytes, passphrase: bytes | None) -> object:
    try:
        return serialization.load_pem_private_key(data, password=passphrase or None)
    except (ValueError, TypeError) as exc:
        raise MalformedInput(f"cannot read private key: {exc}") from exc


def write_private(path: Path, pem: bytes, overwrite: bool = False) -> None:
    """Write a private key file with mode 0600 from the first byte on."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def read_signing_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    return SigningKey.from_pem(path.read_bytes(), passphrase)


def read_data_key(path: Path, passphrase: bytes | None = None) -> DataKey:
    return DataKey.from_pem(path.read_bytes(), passphrase)
