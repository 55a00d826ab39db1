"""Sealed payloads: agency data on the ledger, readable only by the parties that need it.

Design decision 6. A payload is encrypted once under a fresh content key
(ChaCha20-Poly1305), and the content key is wrapped for each recipient's X25519 data key
(ephemeral X25519, HKDF-SHA256, ChaCha20-Poly1305). What is encrypted is
``salt || plaintext`` with a fresh 32-byte salt, and the clear ``commitment`` is
``SHA-256(salt || plaintext)``: a reveal for a court gives the plaintext and the salt,
and a short plaintext ("no records") cannot be guessed from its commitment.

Both AEADs' associated data bind the chain id, the payload's context and the chunk
number; the wrapped key's also binds the recipient key id. The context of an answer (its
manifest's inline chunk and its chunks) is the query's tx id. A query's own sealed
request cannot name its tx id (the tx id is the hash of the body that holds the
payload), so it is bound instead to the requester's and the target's agency names,
which the query body carries in clear: a request copied into another agency's query
does not open. The exact layout is in docs/evidence-bundle.md, "Sealed payloads".

Opening checks the commitment after decrypting. Besides catching a corrupted body, this
is what makes the multi-recipient scheme committing: ChaCha20-Poly1305 alone is not, so
a dishonest sender could otherwise wrap different content keys for different recipients
of one ciphertext and show each a different plaintext. With the check, every recipient
that opens a payload gets the one (salt, plaintext) the signed body commits to.

Retention: the ledger is never rewritten. Destroying the data keys a payload was sealed
to (every recipient's) makes it unreadable for good, salt included, while every hash,
signature and commitment on the ledger still verifies; only a reveal made before stays
checkable.

Pure: bytes in, values out. The only thing taken from the world is randomness.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from json.encoder import encode_basestring

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from exchange.errors import MalformedInput, NotARecipient, Oversize, ProofInvalid
from exchange.identity.keys import KEY_ID_BYTES, PUBLIC_KEY_BYTES, DataKey, DataKeyring, key_id
from exchange.v1 import ledger_pb2

SALT_BYTES = 32
CONTENT_KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
COMMITMENT_BYTES = 32
TX_ID_BYTES = 32
WRAPPED_KEY_BYTES = CONTENT_KEY_BYTES + TAG_BYTES
# As many recipients as a network may have agencies (identity.network.AGENCIES_MAX).
RECIPIENTS_MAX = 64
# One sealed chunk; well under the 64 MiB gRPC message limit.
PLAINTEXT_BYTES_MAX = 16 << 20
# AnswerChunk.index is a uint32.
CHUNK_MAX = (1 << 32) - 1

HKDF_INFO_PREFIX = b"exchange/v1/seal\0"
AD_LABEL_CONTENT = b"exchange/v1/seal/content"
AD_LABEL_KEY = b"exchange/v1/seal/key"
PURPOSE_QUERY_REQUEST = b"query-request"
PURPOSE_ANSWER = b"answer"

# canonical_json limits: I-JSON's exact integers, bounded nesting and decimals.
JSON_INT_ABS_MAX = (1 << 53) - 1
JSON_DEPTH_MAX = 32
DECIMAL_DIGITS_MAX = 64


# -- sealing ------------------------------------------------------------------------
def seal(plaintext: bytes, recipients: Sequence[bytes], *, chain_id: str,
         context_tx_id: bytes, chunk: int, salt: bytes | None = None,
         requester_agency: str = "", target_agency: str = "",
         ) -> tuple[ledger_pb2.SealedPayload, bytes]:
    """Seal `plaintext` to the X25519 public keys `recipients`; return it and its salt.

    `context_tx_id` is the query's tx id for an answer or answer chunk. For a query's
    own request pass ``b""``, chunk 0, and the requester's and target's agency names.
    `salt` is fresh unless given; give one only to make the commitment equal one
    computed elsewhere, never to reuse it for another plaintext.
    """
    context = _context(chain_id, context_tx_id, chunk, requester_agency, target_agency)
    plaintext = bytes(plaintext)
    if len(plaintext) > PLAINTEXT_BYTES_MAX:
        raise Oversize(f"sealed plaintext is {len(plaintext)} bytes, "
                       f"more than {PLAINTEXT_BYTES_MAX}")
    keys = _recipient_keys(recipients)
    if salt is None:
        salt = os.urandom(SALT_BYTES)
    salt = bytes(salt)
    if len(salt) != SALT_BYTES:
        raise MalformedInput(f"salt must be {SALT_BYTES} bytes")
    content_key = os.urandom(CONTENT_KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = ChaCha20Poly1305(content_key).encrypt(
        nonce, salt + plaintext, content_associated_data(context))
    wrapped = [_wrap(content_key, pub, chain_id.encode(), context) for pub in keys]
    payload = ledger_pb2.SealedPayload(recipients=wrapped, nonce=nonce, ciphertext=ciphertext,
                                       commitment=commit(salt, plaintext))
    assert len(payload.ciphertext) == SALT_BYTES + len(plaintext) + TAG_BYTES
    return payload, salt


def _recipient_keys(recipients: Sequence[bytes]) -> list[bytes]:
    """The recipients' keys, checked, each once, in the order given."""
    keys = list(dict.fromkeys(bytes(pub) for pub in recipients))
    if not keys:
        raise MalformedInput("a sealed payload needs at least one recipient")
    if len(keys) > RECIPIENTS_MAX:
        raise MalformedInput(f"at most {RECIPIENTS_MAX} recipients")
    for pub in keys:
        if len(pub) != PUBLIC_KEY_BYTES:
            raise MalformedInput(f"recipient key must be {PUBLIC_KEY_BYTES} bytes")
    return keys


def _wrap(content_key: bytes, recipient_public: bytes, chain: bytes,
          context: bytes) -> ledger_pb2.WrappedKey:
    ephemeral = x25519.X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    try:
        shared = ephemeral.exchange(x25519.X25519PublicKey.from_public_bytes(recipient_public))
    except ValueError as exc:  # a low-order point: no shared secret
        raise MalformedInput(f"recipient key {recipient_public.hex()} is not a usable "
                             "X25519 public key") from exc
    recipient_id = key_id("x25519", recipient_public)
    wrapping_key = _wrapping_key(shared, chain, ephemeral_public, recipient_public)
    nonce = os.urandom(NONCE_BYTES)
    wrapped = ChaCha20Poly1305(wrapping_key).encrypt(
        nonce, content_key, key_associated_data(context, recipient_id))
    return ledger_pb2.WrappedKey(recipient_key_id=recipient_id,
                                 ephemeral_public_key=ephemeral_public, nonce=nonce,
                                 wrapped_key=wrapped)


# -- opening ------------------------------------------------------------------------
def open_sealed(payload: ledger_pb2.SealedPayload, data_key: DataKey | DataKeyring, *,
                chain_id: str, context_tx_id: bytes, chunk: int, requester_agency: str = "",
                target_agency: str = "") -> tuple[bytes, bytes]:
    """The (plaintext, salt) sealed in `payload` for `data_key` (of a keyring: the key
    it was sealed to, current or rotated out), authenticated.

    The context arguments must be the ones it was sealed with. Raises MalformedInput
    for a payload of the wrong form, NotARecipient if it is not sealed to `data_key`,
    and ProofInvalid if anything fails to authenticate or match the commitment.
    """
    context = _context(chain_id, context_tx_id, chunk, requester_agency, target_agency)
    check_sealed_form(payload)
    if isinstance(data_key, DataKeyring):
        data_key = data_key.key_for(bytes(w.recipient_key_id) for w in payload.recipients)
    try:
        private = x25519.X25519PrivateKey.from_private_bytes(data_key.secret)
    except ValueError as exc:
        raise MalformedInput("data key must be a 32-byte X25519 private key") from exc
    own_public = private.public_key().public_bytes_raw()
    own_id = key_id("x25519", own_public)
    mine = [w for w in payload.recipients if bytes(w.recipient_key_id) == own_id]
    if not mine:
        raise NotARecipient(f"the payload is not sealed to data key {own_id.hex()}")
    wrapped = mine[0]
    ephemeral_public = bytes(wrapped.ephemeral_public_key)
    try:
        shared = private.exchange(x25519.X25519PublicKey.from_public_bytes(ephemeral_public))
    except ValueError as exc:
        raise ProofInvalid("the wrapped key's ephemeral key is a low-order point") from exc
    wrapping_key = _wrapping_key(shared, chain_id.encode(), ephemeral_public, own_public)
    try:
        content_key = ChaCha20Poly1305(wrapping_key).decrypt(
            bytes(wrapped.nonce), bytes(wrapped.wrapped_key),
            key_associated_data(context, own_id))
    except InvalidTag as exc:
        raise ProofInvalid("the wrapped key does not authenticate for this chain, context, "
                           "chunk and recipient") from exc
    try:
        inner = ChaCha20Poly1305(content_key).decrypt(
            bytes(payload.nonce), bytes(payload.ciphertext), content_associated_data(context))
    except InvalidTag as exc:
        raise ProofInvalid("the ciphertext does not authenticate for this chain, context "
                           "and chunk") from exc
    salt, plaintext = inner[:SALT_BYTES], inner[SALT_BYTES:]
    if not hmac.compare_digest(commit(salt, plaintext), bytes(payload.commitment)):
        raise ProofInvalid("the decrypted content does not match the payload's commitment")
    return plaintext, salt


def check_sealed_form(payload: ledger_pb2.SealedPayload) -> None:
    """Raise MalformedInput unless every field of `payload` has its fixed form.

    Needs no key, so any node can run it before acknowledging a block.
    """
    count = len(payload.recipients)
    if not 1 <= count <= RECIPIENTS_MAX:
        raise MalformedInput(f"sealed payload has {count} recipients, "
                             f"needs 1 to {RECIPIENTS_MAX}")
    _check_length("nonce", payload.nonce, NONCE_BYTES)
    _check_length("commitment", payload.commitment, COMMITMENT_BYTES)
    size = len(payload.ciphertext)
    overhead = SALT_BYTES + TAG_BYTES
    if not overhead <= size <= PLAINTEXT_BYTES_MAX + overhead:
        raise MalformedInput(f"sealed payload ciphertext is {size} bytes, "
                             f"needs {overhead} to {PLAINTEXT_BYTES_MAX + overhead}")
    seen: set[bytes] = set()
    for i, wrapped in enumerate(payload.recipients):
        where = f"recipients[{i}]"
        _check_length(f"{where}.recipient_key_id", wrapped.recipient_key_id, KEY_ID_BYTES)
        _check_length(f"{where}.ephemeral_public_key", wrapped.ephemeral_public_key,
                      PUBLIC_KEY_BYTES)
        _check_length(f"{where}.nonce", wrapped.nonce, NONCE_BYTES)
        _check_length(f"{where}.wrapped_key", wrapped.wrapped_key, WRAPPED_KEY_BYTES)
        if bytes(wrapped.recipient_key_id) in seen:
            raise MalformedInput(f"sealed payload {where}: recipient key id appears twice")
        seen.add(bytes(wrapped.recipient_key_id))


def _check_length(name: str, value: bytes, expected: int) -> None:
    if len(value) != expected:
        raise MalformedInput(f"sealed payload {name} is {len(value)} bytes, "
                             f"must be {expected}")


# -- commitments --------------------------------------------------------------------
def commit(salt: bytes, plaintext: bytes) -> bytes:
    """The salted commitment SHA-256(salt || plaintext)."""
    if len(salt) != SALT_BYTES:
        raise MalformedInput(f"salt must be {SALT_BYTES} bytes")
    return hashlib.sha256(bytes(salt) + bytes(plaintext)).digest()


def verify_reveal(payload_or_commitment: ledger_pb2.SealedPayload | bytes, salt: bytes,
                  plaintext: bytes) -> bool:
    """Whether (salt, plaintext) is what the payload (or bare commitment) commits to."""
    if isinstance(payload_or_commitment, ledger_pb2.SealedPayload):
        commitment = bytes(payload_or_commitment.commitment)
    else:
        commitment = bytes(payload_or_commitment)
    if len(salt) != SALT_BYTES or len(commitment) != COMMITMENT_BYTES:
        return False
    return hmac.compare_digest(commit(salt, plaintext), commitment)


# -- associated data and key derivation ----------------------------------------------
def _field(value: bytes) -> bytes:
    return struct.pack(">I", len(value)) + value


def _context(chain_id: str, context_tx_id: bytes, chunk: int, requester_agency: str,
             target_agency: str) -> bytes:
    """The length-prefixed context fields both associated data share."""
    chain = chain_id.encode()
    if not chain or b"\0" in chain:
        raise MalformedInput(f"invalid chain id {chain_id!r}")
    if isinstance(chunk, bool) or not 0 <= chunk <= CHUNK_MAX:
        raise MalformedInput(f"chunk number {chunk!r} is not a uint32")
    tx = bytes(context_tx_id)
    requester, target = requester_agency.encode(), target_agency.encode()
    if len(tx) == TX_ID_BYTES:
        if requester or target:
            raise MalformedInput("an answer's context is its query tx id alone: "
                                 "give no agency names")
        purpose = PURPOSE_ANSWER
    elif not tx:
        if not requester or not target:
            raise MalformedInput("a query's own request is bound to the requester's and "
                                 "the target's agency names: give both")
        if chunk != 0:
            raise MalformedInput("a query's own request is one payload: chunk must be 0")
        purpose = PURPOSE_QUERY_REQUEST
    else:
        raise MalformedInput(f"context tx id must be {TX_ID_BYTES} bytes, or empty for a "
                             "query's own request")
    return (_field(chain) + _field(purpose) + _field(tx) + _field(requester)
            + _field(target) + _field(struct.pack(">I", chunk)))


def content_associated_data(context: bytes) -> bytes:
    """Associated data of the content AEAD."""
    return _field(AD_LABEL_CONTENT) + context


def key_associated_data(context: bytes, recipient_key_id: bytes) -> bytes:
    """Associated data of one recipient's key-wrapping AEAD."""
    return _field(AD_LABEL_KEY) + context + _field(recipient_key_id)


def _wrapping_key(shared: bytes, chain: bytes, ephemeral_public: bytes,
                  recipient_public: bytes) -> bytes:
    info = HKDF_INFO_PREFIX + chain + b"\0" + ephemeral_public + recipient_public
    return HKDF(algorithm=hashes.SHA256(), length=CONTENT_KEY_BYTES, salt=None,
                info=info).derive(shared)


# -- canonical plaintext ------------------------------------------------------------
def canonical_json(obj: object) -> bytes:
    """The canonical UTF-8 JSON of `obj`, the plaintext a row or request is sealed as.

    No whitespace; object keys sorted (by UTF-16 code units, as RFC 8785 sorts them);
    strings escaped only where JSON requires (RFC 8785's rules); Decimals written as
    strings in plain notation with the digits they carry ("1.10", never "1.1E0"; -0 as
    "0"). For the types accepted (dict with str keys, list, tuple, str, int within
    ±(2**53 - 1), bool, None, finite Decimal) the output is RFC 8785 JCS output. Floats
    are refused: their decimal form is not the value they hold.
    """
    value = _canonical_value(obj, 0)
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MalformedInput("a string is not valid Unicode (lone surrogate)") from exc


def canonical_json_lines(rows: Iterable[object]) -> bytes:
    """Rows as canonical JSON Lines (each line ending in "\\n"); no rows gives b"".

    Chunks of an answer concatenate to the whole answer's plaintext.
    """
    return b"".join(canonical_json(row) + b"\n" for row in rows)


def _canonical_value(value: object, depth: int) -> object:
    if depth > JSON_DEPTH_MAX:
        raise MalformedInput(f"JSON nested deeper than {JSON_DEPTH_MAX}")
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > JSON_INT_ABS_MAX:
            raise MalformedInput(f"integer {value} is not exact in JSON: use a Decimal")
        return int(value)
    if isinstance(value, Decimal):
        return _decimal_text(value)
    if isinstance(value, float):
        raise MalformedInput("floats have no canonical form: use a Decimal")
    if isinstance(value, Mapping):
        items: list[tuple[str, object]] = []
        for key, item in value.items():
            if not isinstance(key, str):
                raise MalformedInput(f"JSON object key {key!r} is not a string")
            items.append((str(key), _canonical_value(item, depth + 1)))
        items.sort(key=lambda kv: kv[0].encode("utf-16-be", "surrogatepass"))
        return dict(items)
    if isinstance(value, list | tuple):
        return [_canonical_value(item, depth + 1) for item in value]
    raise MalformedInput(f"{type(value).__name__} has no canonical JSON form")


def _decimal_text(value: Decimal) -> str:
    # the common case first: a plain text no longer than DECIMAL_DIGITS_MAX holds at
    # most that many digits and an exponent of at most that size, so it passes the
    # checks below (`adjusted` bounds the text before it is made)
    if value.is_finite() and -DECIMAL_DIGITS_MAX <= value.adjusted() <= DECIMAL_DIGITS_MAX:
        text = format(value, "f")
        if len(text) <= DECIMAL_DIGITS_MAX:
            return text[1:] if text[0] == "-" and value.is_zero() else text
    if not value.is_finite():
        raise MalformedInput(f"decimal {value} is not finite")
    _, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    if len(digits) > DECIMAL_DIGITS_MAX or abs(exponent) > DECIMAL_DIGITS_MAX:
        raise MalformedInput(f"decimal {value} has more than {DECIMAL_DIGITS_MAX} digits "
                             "or too large an exponent")
    if value.is_zero():
        value = value.copy_abs()
    return format(value, "f")


class RowLines:
    """`canonical_json(row) + b"\\n"` for rows that all have the same keys, several times
    faster: the key order is worked out once, and each value is written by its type
    exactly as canonical_json writes it (a row of other keys or another value type takes
    the general path). What an answer of millions of rows is written with."""

    def __init__(self, keys: Iterable[str]) -> None:
        ordered = sorted(keys, key=lambda k: k.encode("utf-16-be", "surrogatepass"))
        self._keys = tuple(ordered)
        self._prefixes = tuple(("{" if i == 0 else ",") + encode_basestring(k) + ":"
                               for i, k in enumerate(ordered))

    def line(self, row: Mapping[str, object]) -> bytes:
        if len(row) != len(self._keys):
            return canonical_json(row) + b"\n"
        parts = []
        for prefix, key in zip(self._prefixes, self._keys, strict=True):
            if key not in row:
                return canonical_json(row) + b"\n"
            value = row[key]
            kind = type(value)
            if isinstance(value, str) and kind is str:
                parts.append(prefix + encode_basestring(value))
            elif isinstance(value, Decimal) and kind is Decimal:
                parts.append(prefix + '"' + _decimal_text(value) + '"')
            elif isinstance(value, int) and kind is int and abs(value) <= JSON_INT_ABS_MAX:
                parts.append(prefix + str(value))
            elif value is None:
                parts.append(prefix + "null")
            else:  # bool, a large int, anything nested: the general path
                return canonical_json(row) + b"\n"
        parts.append("}\n")
        try:
            return "".join(parts).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise MalformedInput("a string is not valid Unicode (lone surrogate)") from exc
