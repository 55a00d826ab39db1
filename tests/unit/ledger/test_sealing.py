"""Sealed payloads: who can open them, what they are bound to, and their commitments."""

from __future__ import annotations

import hashlib
import json
import os
import random
import struct
from collections.abc import Callable
from decimal import Decimal
from functools import cache
from typing import NotRequired, TypedDict

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.errors import MalformedInput, NotARecipient, Oversize, ProofInvalid
from exchange.identity.keys import DataKey, key_id
from exchange.ledger.sealing import (
    PLAINTEXT_BYTES_MAX,
    canonical_json,
    canonical_json_lines,
    check_sealed_form,
    commit,
    open_sealed,
    seal,
    verify_reveal,
)
from exchange.v1 import ledger_pb2

CHAIN = "sz-tax-crime-1"
QUERY_TX = hashlib.sha256(b"a query body").digest()


class Context(TypedDict):
    chain_id: str
    context_tx_id: bytes
    chunk: int
    requester_agency: NotRequired[str]
    target_agency: NotRequired[str]


ANSWER: Context = {"chain_id": CHAIN, "context_tx_id": QUERY_TX, "chunk": 3}
REQUEST: Context = {"chain_id": CHAIN, "context_tx_id": b"", "chunk": 0,
                    "requester_agency": "police", "target_agency": "tax"}


def _with(base: Context, **change: object) -> Context:
    return {**base, **change}  # type: ignore[typeddict-item]


@cache
def _keys() -> tuple[DataKey, ...]:
    return tuple(DataKey.generate() for _ in range(5))


@cache
def _sealed_to_two() -> tuple[ledger_pb2.SealedPayload, bytes]:
    tax, police = _keys()[:2]
    return seal(b'{"rows":[]}', [tax.public_key, police.public_key], **ANSWER)


def _copy(payload: ledger_pb2.SealedPayload) -> ledger_pb2.SealedPayload:
    return ledger_pb2.SealedPayload.FromString(payload.SerializeToString())


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_every_recipient_opens_the_same_plaintext_and_salt(count: int) -> None:
    keys = _keys()[:count]
    plaintext = canonical_json({"subject": "91440300MA5XXXXX", "amount": Decimal("12.50")})
    payload, salt = seal(plaintext, [k.public_key for k in keys], **ANSWER)
    assert [w.recipient_key_id for w in payload.recipients] == [k.key_id for k in keys]
    for key in keys:
        assert open_sealed(payload, key, **ANSWER) == (plaintext, salt)
    assert payload.commitment == hashlib.sha256(salt + plaintext).digest()


def test_query_request_round_trips_bound_to_both_agencies() -> None:
    police, tax = _keys()[:2]
    payload, salt = seal(b'{"subject":"x"}', [tax.public_key, police.public_key], **REQUEST)
    assert open_sealed(payload, tax, **REQUEST) == (b'{"subject":"x"}', salt)
    assert open_sealed(payload, police, **REQUEST)[0] == b'{"subject":"x"}'


def test_a_non_recipient_cannot_open() -> None:
    payload, _ = _sealed_to_two()
    with pytest.raises(NotARecipient, match="not sealed to data key"):
        open_sealed(payload, _keys()[4], **ANSWER)


@pytest.mark.parametrize("change", [
    {"chain_id": "sz-tax-crime-2"},
    {"context_tx_id": hashlib.sha256(b"another query").digest()},
    {"chunk": 4},
    {"chunk": 0},
])
def test_opening_in_another_chain_context_or_chunk_fails_authentication(
        change: dict[str, object]) -> None:
    payload, _ = _sealed_to_two()
    with pytest.raises(ProofInvalid, match="does not authenticate"):
        open_sealed(payload, _keys()[0], **_with(ANSWER, **change))


@pytest.mark.parametrize("change", [
    {"requester_agency": "customs"},
    {"target_agency": "pboc"},
    {"requester_agency": "tax", "target_agency": "police"},
    {"requester_agency": "polic", "target_agency": "etax"},
])
def test_a_query_request_does_not_open_under_other_agencies(change: dict[str, str]) -> None:
    police, tax = _keys()[:2]
    payload, _ = seal(b"{}", [tax.public_key, police.public_key], **REQUEST)
    with pytest.raises(ProofInvalid):
        open_sealed(payload, tax, **_with(REQUEST, **change))


def test_a_query_request_does_not_open_as_an_answer_and_back() -> None:
    tax = _keys()[0]
    request, _ = seal(b"{}", [tax.public_key], **REQUEST)
    answer, _ = seal(b"{}", [tax.public_key], **_with(ANSWER, chunk=0))
    with pytest.raises(ProofInvalid):
        open_sealed(request, tax, **_with(ANSWER, chunk=0))
    with pytest.raises(ProofInvalid):
        open_sealed(answer, tax, **REQUEST)


_FIELDS = {
    "ciphertext": (None, "ciphertext"),
    "nonce": (None, "nonce"),
    "commitment": (None, "commitment"),
    "wrapped_key": (0, "wrapped_key"),
    "wrapped_nonce": (0, "nonce"),
    "ephemeral_public_key": (0, "ephemeral_public_key"),
}


@settings(max_examples=300, deadline=None)
@given(field=st.sampled_from(sorted(_FIELDS)), position=st.integers(0, 10_000),
       mask=st.integers(1, 255))
def test_any_flipped_byte_makes_open_fail(field: str, position: int, mask: int) -> None:
    original, _ = _sealed_to_two()
    payload = _copy(original)
    recipient, name = _FIELDS[field]
    holder = payload if recipient is None else payload.recipients[recipient]
    data = bytearray(getattr(holder, name))
    data[position % len(data)] ^= mask
    setattr(holder, name, bytes(data))
    with pytest.raises(ProofInvalid):
        open_sealed(payload, _keys()[0], **ANSWER)


def test_a_wrapped_key_moved_from_another_payload_does_not_open() -> None:
    tax = _keys()[0]
    first, _ = seal(b"first", [tax.public_key], **ANSWER)
    second, _ = seal(b"second", [tax.public_key], **ANSWER)
    first.recipients[0].CopyFrom(second.recipients[0])
    with pytest.raises(ProofInvalid, match="ciphertext does not authenticate"):
        open_sealed(first, tax, **ANSWER)


def test_a_low_order_ephemeral_key_is_refused() -> None:
    payload = _copy(_sealed_to_two()[0])
    payload.recipients[0].ephemeral_public_key = bytes(32)
    with pytest.raises(ProofInvalid, match="low-order"):
        open_sealed(payload, _keys()[0], **ANSWER)


def test_sealing_to_a_low_order_key_or_no_one_is_refused() -> None:
    with pytest.raises(MalformedInput, match="not a usable"):
        seal(b"x", [bytes(32)], **ANSWER)
    with pytest.raises(MalformedInput, match="at least one"):
        seal(b"x", [], **ANSWER)
    with pytest.raises(MalformedInput, match="32 bytes"):
        seal(b"x", [b"short"], **ANSWER)


def test_a_plaintext_over_the_limit_is_refused() -> None:
    with pytest.raises(Oversize):
        seal(bytes(PLAINTEXT_BYTES_MAX + 1), [_keys()[0].public_key], **ANSWER)


def test_a_key_given_twice_is_wrapped_once() -> None:
    tax = _keys()[0]
    payload, _ = seal(b"x", [tax.public_key, tax.public_key], **ANSWER)
    assert len(payload.recipients) == 1


@pytest.mark.parametrize("context", [
    _with(ANSWER, chain_id=""),
    _with(ANSWER, chain_id="a\0b"),
    _with(ANSWER, context_tx_id=b"short"),
    _with(ANSWER, chunk=-1),
    _with(ANSWER, chunk=1 << 32),
    _with(ANSWER, requester_agency="tax"),
    _with(REQUEST, target_agency=""),
    _with(REQUEST, chunk=1),
])
def test_an_ill_formed_context_is_refused(context: Context) -> None:
    with pytest.raises(MalformedInput):
        seal(b"x", [_keys()[0].public_key], **context)


@pytest.mark.parametrize("breaks", [
    lambda p: p.ClearField("recipients"),
    lambda p: setattr(p, "nonce", b"\0" * 11),
    lambda p: setattr(p, "commitment", b""),
    lambda p: setattr(p, "ciphertext", b"\0" * 47),
    lambda p: setattr(p.recipients[0], "recipient_key_id", b"\0" * 15),
    lambda p: setattr(p.recipients[0], "ephemeral_public_key", b"\0" * 33),
    lambda p: setattr(p.recipients[0], "nonce", b""),
    lambda p: setattr(p.recipients[0], "wrapped_key", b"\0" * 32),
    lambda p: p.recipients.add().CopyFrom(p.recipients[0]),
])
def test_a_payload_of_the_wrong_form_is_malformed_input(
        breaks: Callable[[ledger_pb2.SealedPayload], None]) -> None:
    payload = _copy(_sealed_to_two()[0])
    breaks(payload)
    with pytest.raises(MalformedInput):
        check_sealed_form(payload)
    with pytest.raises(MalformedInput):
        open_sealed(payload, _keys()[0], **ANSWER)


def test_reveal_accepts_the_right_salt_and_plaintext_and_rejects_others() -> None:
    payload, salt = _sealed_to_two()
    plaintext = open_sealed(payload, _keys()[1], **ANSWER)[0]
    assert verify_reveal(payload, salt, plaintext)
    assert verify_reveal(bytes(payload.commitment), salt, plaintext)
    assert not verify_reveal(payload, salt, plaintext + b" ")
    assert not verify_reveal(payload, bytes(32), plaintext)
    assert not verify_reveal(payload, salt[:31], plaintext)
    assert not verify_reveal(payload.commitment[:31], salt, plaintext)
    assert not verify_reveal(hashlib.sha256(plaintext).digest(), salt, plaintext)


def test_two_seals_of_one_plaintext_share_nothing() -> None:
    tax = _keys()[0]
    a, salt_a = seal(b"same", [tax.public_key], **ANSWER)
    b, salt_b = seal(b"same", [tax.public_key], **ANSWER)
    assert salt_a != salt_b
    assert a.commitment != b.commitment
    assert a.ciphertext != b.ciphertext and a.nonce != b.nonce
    assert a.recipients[0].wrapped_key != b.recipients[0].wrapped_key
    assert a.recipients[0].ephemeral_public_key != b.recipients[0].ephemeral_public_key


def test_an_empty_answer_cannot_be_guessed_from_its_commitment() -> None:
    no_records = canonical_json_lines([])
    assert no_records == b""
    payload, salt = seal(no_records, [_keys()[0].public_key], **ANSWER)
    guesses = {hashlib.sha256(g).digest() for g in (b"", b"[]", b"{}", bytes(32))}
    assert payload.commitment not in guesses
    assert payload.commitment == commit(salt, b"")
    assert open_sealed(payload, _keys()[0], **ANSWER) == (b"", salt)


def test_a_given_salt_gives_the_commitment_computed_elsewhere() -> None:
    salt = os.urandom(32)
    payload, returned = seal(b"rows", [_keys()[0].public_key], **ANSWER, salt=salt)
    assert returned == salt and payload.commitment == commit(salt, b"rows")
    with pytest.raises(MalformedInput):
        seal(b"rows", [_keys()[0].public_key], **ANSWER, salt=b"short")


def test_the_documented_format_opens_with_primitives_alone() -> None:
    """An independent reading of docs/evidence-bundle.md, "Sealed payloads"."""
    police, tax = _keys()[:2]
    payload, salt = seal(b"hello", [police.public_key, tax.public_key], **REQUEST)

    def lp(value: bytes) -> bytes:
        return struct.pack(">I", len(value)) + value

    context = (lp(CHAIN.encode()) + lp(b"query-request") + lp(b"") + lp(b"police")
               + lp(b"tax") + lp(struct.pack(">I", 0)))
    wrapped = payload.recipients[1]
    assert wrapped.recipient_key_id == key_id("x25519", tax.public_key)
    private = x25519.X25519PrivateKey.from_private_bytes(tax.secret)
    shared = private.exchange(
        x25519.X25519PublicKey.from_public_bytes(wrapped.ephemeral_public_key))
    info = (b"exchange/v1/seal\0" + CHAIN.encode() + b"\0" + wrapped.ephemeral_public_key
            + tax.public_key)
    wrapping_key = HKDF(hashes.SHA256(), 32, None, info).derive(shared)
    content_key = ChaCha20Poly1305(wrapping_key).decrypt(
        wrapped.nonce, wrapped.wrapped_key,
        lp(b"exchange/v1/seal/key") + context + lp(wrapped.recipient_key_id))
    inner = ChaCha20Poly1305(content_key).decrypt(
        payload.nonce, payload.ciphertext, lp(b"exchange/v1/seal/content") + context)
    assert inner == salt + b"hello"
    assert hashlib.sha256(inner).digest() == payload.commitment


# -- canonical JSON -----------------------------------------------------------------
_scalars = (st.none() | st.booleans() | st.text(max_size=8)
            | st.integers(-(2**53) + 1, 2**53 - 1)
            | st.decimals(allow_nan=False, allow_infinity=False, places=2,
                          min_value=-10**12, max_value=10**12))
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None)
@given(row=st.dictionaries(st.text(max_size=6), _values, max_size=6), seed=st.randoms())
def test_canonical_json_ignores_key_order(row: dict[str, object], seed: random.Random) -> None:
    items = list(row.items())
    seed.shuffle(items)
    encoded = canonical_json(row)
    assert canonical_json(dict(items)) == encoded
    assert canonical_json(json.loads(encoded.decode("utf-8"))) == encoded


@pytest.mark.parametrize(("value", "text"), [
    (Decimal("12.50"), '"12.50"'),
    (Decimal("12.5"), '"12.5"'),
    (Decimal("1E+2"), '"100"'),
    (Decimal("-1.5E-3"), '"-0.0015"'),
    (Decimal("-0.00"), '"0.00"'),
    (Decimal("0E-5"), '"0.00000"'),
    (Decimal("12345678901234567890123456789012.34"), '"12345678901234567890123456789012.34"'),
])
def test_canonical_json_writes_decimals_as_plain_strings(value: Decimal, text: str) -> None:
    assert canonical_json({"amount": value}) == b'{"amount":' + text.encode() + b"}"


def test_canonical_json_layout() -> None:
    row = {"z": [1, True, None], "a": "税务 \"q\"\n", "B": {"y": (), "x": {}}}
    assert canonical_json(row) == (
        '{"B":{"x":{},"y":[]},"a":"税务 \\"q\\"\\n","z":[1,true,null]}'.encode())
    # RFC 8785 orders keys by UTF-16 code units: U+1F600 (D83D...) before U+FB33.
    assert canonical_json({"\ufb33": 1, "\U0001f600": 2}) == (
        '{"\U0001f600":2,"\ufb33":1}'.encode())
    assert canonical_json_lines([{"b": 1, "a": 2}, {}]) == b'{"a":2,"b":1}\n{}\n'


@pytest.mark.parametrize("value", [
    1.5, float("nan"), Decimal("NaN"), Decimal("Infinity"), Decimal("1E+999"),
    2**53, {1: "x"}, {"x"}, b"bytes", "\ud800", [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
])
def test_canonical_json_refuses_what_has_no_canonical_form(value: object) -> None:
    with pytest.raises(MalformedInput):
        canonical_json(value)
