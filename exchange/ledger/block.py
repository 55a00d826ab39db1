"""Envelopes, blocks and attestations: building them and the checks that need no state.

Design decisions 1 to 4: signed things travel as bytes and are hashed and verified as
those bytes; tx_id = SHA-256(body); block hash = SHA-256(header bytes); the header
commits to its envelopes through an RFC 6962 root; attestations countersign the block
hash together with the root of the per-transaction result codes.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from google.protobuf.message import DecodeError

from exchange.errors import ChainBroken, InvalidSignature, MalformedInput, WrongChain
from exchange.identity.keys import SIGNATURE_BYTES, CachedSigner, Domain, verify
from exchange.ledger import merkle
from exchange.v1 import ledger_pb2

RESULT_OK = "OK"
NONCE_BYTES = 16

PublicKeyLookup = Callable[[bytes], bytes]


class BlockInvalid(ChainBroken):
    """A block that fails a check, with the height and place that failed."""

    def __init__(self, height: int, what: str) -> None:
        super().__init__(f"height {height}: {what}")
        self.height = height
        self.what = what


def tx_id(body: bytes) -> bytes:
    return hashlib.sha256(body).digest()


def block_hash(header: bytes) -> bytes:
    return hashlib.sha256(header).digest()


# -- envelopes ----------------------------------------------------------------------
def new_body(chain_id: str, agency: str, created_at_ms: int,
             nonce: bytes | None = None) -> ledger_pb2.TxBody:
    """A TxBody with its common fields set; the caller fills in one kind."""
    return ledger_pb2.TxBody(chain_id=chain_id, agency=agency, created_at_ms=created_at_ms,
                             nonce=nonce if nonce is not None else os.urandom(NONCE_BYTES))


def seal_envelope(body: ledger_pb2.TxBody, signer: CachedSigner) -> bytes:
    """Serialize `body` once, sign those bytes and return the serialized Envelope."""
    body_bytes = body.SerializeToString(deterministic=True)
    return ledger_pb2.Envelope(
        body=body_bytes, signer_key_id=signer.key_id,
        signature=signer.sign(Domain.ENVELOPE, body.chain_id, body_bytes),
    ).SerializeToString(deterministic=True)


@dataclass(frozen=True, slots=True)
class OpenedEnvelope:
    """An envelope parsed from its exact bytes, and its body."""

    raw: bytes
    envelope: ledger_pb2.Envelope
    body: ledger_pb2.TxBody
    tx_id: bytes
    kind: str  # the body's transaction kind (read several times per transaction)

    @property
    def signer_key_id(self) -> bytes:
        return bytes(self.envelope.signer_key_id)


def open_envelope(raw: bytes, chain_id: str) -> OpenedEnvelope:
    """Parse an envelope and check its form (not its signature)."""
    envelope = ledger_pb2.Envelope()
    body = ledger_pb2.TxBody()
    try:
        envelope.ParseFromString(raw)
        body.ParseFromString(envelope.body)
    except DecodeError as exc:
        raise MalformedInput(f"envelope does not parse: {exc}") from exc
    if len(envelope.signature) != SIGNATURE_BYTES:
        raise MalformedInput("envelope signature must be 64 bytes")
    if body.chain_id != chain_id:
        raise WrongChain(f"body is for chain {body.chain_id!r}, not {chain_id!r}")
    if len(body.nonce) != NONCE_BYTES:
        raise MalformedInput(f"body nonce must be {NONCE_BYTES} bytes")
    kind = body.WhichOneof("kind")
    if kind is None:
        raise MalformedInput("body has no transaction kind")
    return OpenedEnvelope(raw, envelope, body, tx_id(envelope.body), kind)


def verify_envelope(opened: OpenedEnvelope, public_key: bytes) -> None:
    verify(public_key, Domain.ENVELOPE, opened.body.chain_id, opened.envelope.body,
           opened.envelope.signature)


# -- blocks -------------------------------------------------------------------------
def build_block(chain_id: str, height: int, prev_hash: bytes, envelopes: Sequence[bytes],
                timestamp_ms: int, proposer: str, signer: CachedSigner,
                raft_term: int = 0, raft_index: int = 0) -> ledger_pb2.Block:
    """Cut and sign a block over already-serialized envelopes."""
    assert height >= 1 and len(prev_hash) == 32
    header = ledger_pb2.BlockHeader(
        chain_id=chain_id, height=height, prev_hash=prev_hash,
        tx_root=merkle.root(envelopes), tx_count=len(envelopes), timestamp_ms=timestamp_ms,
        proposer=proposer, proposer_key_id=signer.key_id, raft_term=raft_term,
        raft_index=raft_index,
    ).SerializeToString(deterministic=True)
    return ledger_pb2.Block(
        header=header, proposer_signature=signer.sign(Domain.BLOCK, chain_id, header),
        envelopes=list(envelopes))


def parse_header(raw: bytes, height_hint: int = 0) -> ledger_pb2.BlockHeader:
    header = ledger_pb2.BlockHeader()
    try:
        header.ParseFromString(raw)
    except DecodeError as exc:
        raise BlockInvalid(height_hint, f"header does not parse: {exc}") from exc
    return header


@dataclass(frozen=True, slots=True)
class CheckedBlock:
    """A block whose form, chain link, Merkle root and every signature checked."""

    block: ledger_pb2.Block
    header: ledger_pb2.BlockHeader
    hash: bytes
    envelopes: tuple[OpenedEnvelope, ...]


def check_header(header_bytes: bytes, signature: bytes, chain_id: str, height: int,
                 prev_hash: bytes, prev_timestamp_ms: int,
                 proposer_key: Callable[[str, bytes, int], bytes]) -> ledger_pb2.BlockHeader:
    """Check a header's link to its parent and its proposer signature."""
    header = parse_header(header_bytes, height)
    _check_header_link(header, chain_id, height, prev_hash, prev_timestamp_ms)
    try:
        key = proposer_key(header.proposer, bytes(header.proposer_key_id), height)
        verify(key, Domain.BLOCK, chain_id, header_bytes, signature)
    except (InvalidSignature, MalformedInput, ChainBroken) as exc:
        raise BlockInvalid(height, f"proposer signature: {exc}") from exc
    except Exception as exc:  # unknown proposer from the lookup
        raise BlockInvalid(height, f"proposer {header.proposer!r}: {exc}") from exc
    return header


def check_link(checked: CheckedBlock, chain_id: str, height: int, prev_hash: bytes,
               prev_timestamp_ms: int) -> None:
    """The link of an already checked block to the chain it is applied to."""
    _check_header_link(checked.header, chain_id, height, prev_hash, prev_timestamp_ms)


def _check_header_link(header: ledger_pb2.BlockHeader, chain_id: str, height: int,
                       prev_hash: bytes, prev_timestamp_ms: int) -> None:
    if header.chain_id != chain_id:
        raise BlockInvalid(height, f"header names chain {header.chain_id!r}")
    if header.height != height:
        raise BlockInvalid(height, f"header says height {header.height}")
    if bytes(header.prev_hash) != prev_hash:
        raise BlockInvalid(height, "previous block hash does not match the chain")
    if header.timestamp_ms < prev_timestamp_ms:
        raise BlockInvalid(height, "block timestamp goes back in time")


def check_block(block: ledger_pb2.Block, chain_id: str, height: int, prev_hash: bytes,
                prev_timestamp_ms: int, proposer_key: Callable[[str, bytes, int], bytes],
                signer_key: PublicKeyLookup) -> CheckedBlock:
    """Everything about a block that needs no ledger state beyond the signers' keys:
    header link and signature, Merkle root, count, each envelope's form and signature."""
    header = check_header(block.header, block.proposer_signature, chain_id, height, prev_hash,
                          prev_timestamp_ms, proposer_key)
    leaves = list(block.envelopes)
    if header.tx_count != len(leaves):
        raise BlockInvalid(height, f"header counts {header.tx_count} transactions, "
                                   f"block holds {len(leaves)}")
    if not leaves:
        raise BlockInvalid(height, "block is empty")
    if merkle.root(leaves) != bytes(header.tx_root):
        raise BlockInvalid(height, "Merkle root does not match the envelopes")
    opened: list[OpenedEnvelope] = []
    for index, raw in enumerate(leaves):
        try:
            env = open_envelope(raw, chain_id)
            verify_envelope(env, signer_key(env.signer_key_id))
        except Exception as exc:
            raise BlockInvalid(height, f"envelope {index}: {exc}") from exc
        opened.append(env)
    return CheckedBlock(block, header, block_hash(block.header), tuple(opened))


# -- results and attestations -------------------------------------------------------
def results_root(codes: Sequence[str]) -> bytes:
    return merkle.root([c.encode() for c in codes])


def _attestation_payload(height: int, hash_: bytes, root: bytes) -> bytes:
    return struct.pack(">Q", height) + hash_ + root


def attest(chain_id: str, agency: str, height: int, hash_: bytes, codes: Sequence[str],
           signer: CachedSigner) -> ledger_pb2.Attestation:
    root = results_root(codes)
    return ledger_pb2.Attestation(
        agency=agency, signer_key_id=signer.key_id, height=height, block_hash=hash_,
        results_root=root,
        signature=signer.sign(Domain.ATTESTATION, chain_id, _attestation_payload(height, hash_, root)))


def verify_attestation(att: ledger_pb2.Attestation, chain_id: str, public_key: bytes) -> None:
    verify(public_key, Domain.ATTESTATION, chain_id,
           _attestation_payload(att.height, bytes(att.block_hash), bytes(att.results_root)),
           att.signature)
