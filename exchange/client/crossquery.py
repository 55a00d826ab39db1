"""Cross-queries from the requester's side: building a signed query with its sealed
request, and checking and decoding the answer a node opens for its analysts.

Used by `exchange query` / `exchange answer` and by automations (the comparison jobs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from exchange.client import Signer
from exchange.errors import MalformedInput, ProofInvalid
from exchange.identity.default_policies import LEGAL_BASIS_TAX_CRIME
from exchange.identity.keys import CachedSigner, key_id
from exchange.ledger.block import new_body, seal_envelope, tx_id
from exchange.ledger.queries import chunks_commitment, sign_cosignature
from exchange.ledger.sealing import canonical_json, commit, seal
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2

SHAPE = ledger_pb2.QueryShape
DEADLINE_S_DEFAULT = 300


@dataclass(frozen=True)
class QuerySpec:
    """What an analyst asks."""

    target: str
    dataset: str
    subjects: tuple[tuple[str, str], ...] = ()
    period: str | None = None
    case_id: str = ""
    purpose: str = ""
    legal_basis: str = LEGAL_BASIS_TAX_CRIME
    fields: tuple[str, ...] = ()
    shape: int = 0  # 0: from the subjects (none: aggregate, one: subject, more: set)
    deadline_s: int = DEADLINE_S_DEFAULT
    on_behalf_of: str = ""

    def resolved_shape(self) -> int:
        if self.shape:
            return self.shape
        if not self.subjects:
            return int(SHAPE.QUERY_SHAPE_AGGREGATE)
        if len(self.subjects) == 1:
            return int(SHAPE.QUERY_SHAPE_SUBJECT)
        return int(SHAPE.QUERY_SHAPE_SUBJECT_SET)


def _member(members: Sequence[identity_pb2.Member], chain_id: str,
            agency: str) -> identity_pb2.Member:
    for member in members:
        if member.agency == agency:
            return member
    raise MalformedInput(f"{agency!r} is not a member of {chain_id} "
                         f"({', '.join(m.agency for m in members)})")


def build_query(spec: QuerySpec, signer: Signer, genesis: identity_pb2.Genesis,
                cosigners: Sequence[CachedSigner] = (),
                now_ms: int | None = None,
                members: Sequence[identity_pb2.Member] | None = None
                ) -> tuple[bytes, bytes]:
    """The signed query envelope and its tx id. The subjects and period travel sealed
    to the requester and the target; everything else is clear metadata. `members` are
    the members as the ledger has them now (a node's status gives them); default: the
    founding members of genesis."""
    from agents.lookup import LookupRequest, request_to_json

    current = list(members) if members else list(genesis.members)
    requester = _member(current, genesis.chain_id, signer.agency)
    target = _member(current, genesis.chain_id, spec.target)
    request = LookupRequest(dataset=spec.dataset, subjects=tuple(spec.subjects),
                            period=spec.period, fields=tuple(spec.fields))
    recipients = list(dict.fromkeys([bytes(requester.data_public_key),
                                     bytes(target.data_public_key)]))
    sealed, _ = seal(canonical_json(request_to_json(request)), recipients,
                     chain_id=signer.chain_id, context_tx_id=b"", chunk=0,
                     requester_agency=signer.agency, target_agency=spec.target)
    created = int(time.time() * 1000) if now_ms is None else now_ms
    body = new_body(signer.chain_id, signer.agency, created)
    body.query.CopyFrom(ledger_pb2.Query(
        target_agency=spec.target, dataset=spec.dataset, case_id=spec.case_id,
        purpose=spec.purpose, legal_basis=spec.legal_basis, fields=list(spec.fields),
        sealed_request=sealed, deadline_ms=created + spec.deadline_s * 1000,
        shape=spec.resolved_shape(),  # type: ignore[arg-type]
        reply_key_id=key_id("x25519", bytes(requester.data_public_key)),
        on_behalf_of=spec.on_behalf_of))
    for cosigner in cosigners:
        body.query.cosignatures.append(sign_cosignature(body, cosigner))
    envelope = seal_envelope(body, signer.key)
    return envelope, tx_id(ledger_pb2.Envelope.FromString(envelope).body)


@dataclass
class Answer:
    """A query's outcome as the requester sees it, its commitments checked."""

    query: node_pb2.QueryView
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return self.query.status


def read_answer(view: node_pb2.AnswerView) -> Answer:
    """Check every opened chunk against its commitment and the manifest's commitment,
    then decode the rows (amounts as Decimal). ProofInvalid if anything differs."""
    answer = Answer(view.query)
    if not view.chunks:
        return answer
    chunks = sorted(view.chunks, key=lambda c: c.index)
    checked = CheckedAnswer(view.query, bytes(view.commitment), iter(chunks))
    for plaintext in checked:
        for line in plaintext.splitlines():
            answer.rows.append(json.loads(line, parse_float=Decimal))
    return answer


class CheckedAnswer:
    """A streamed answer's chunk plaintexts, in order, each checked against its
    commitment as it arrives; once the last has come, the chunks' commitments against
    the manifest's and the rows against its row count (ProofInvalid for any
    difference). Only the chunk commitments are kept, never the rows. Use the rows of a
    chunk freely, but trust none of them until the iteration has ended without error."""

    def __init__(self, query: node_pb2.QueryView, commitment: bytes,
                 chunks: Iterator[node_pb2.OpenedChunk]) -> None:
        self.query = query
        self.commitment = commitment
        self._chunks = chunks
        self.rows = 0

    @classmethod
    def of_stream(cls, parts: Iterator[node_pb2.AnswerPart]) -> CheckedAnswer:
        """From `ExchangeClient.stream_answer`: the head, then the chunks."""
        head = next(parts)
        return cls(head.query, bytes(head.commitment), (p.chunk for p in parts))

    @property
    def status(self) -> str:
        return str(self.query.status)

    def __iter__(self) -> Iterator[bytes]:
        commitments: list[bytes] = []
        rows = 0
        for c in self._chunks:
            if c.index != len(commitments):
                raise ProofInvalid(f"chunk {c.index} arrived where chunk {len(commitments)} "
                                   "belongs: the answer's chunks are not numbered 0..n-1")
            plaintext = bytes(c.plaintext)
            if commit(bytes(c.salt), plaintext) != bytes(c.commitment):
                raise ProofInvalid(f"chunk {c.index} does not match its commitment")
            if plaintext and not plaintext.endswith(b"\n"):
                raise ProofInvalid(f"chunk {c.index} does not end with a whole row")
            commitments.append(bytes(c.commitment))
            rows += plaintext.count(b"\n")
            yield plaintext
        if self.query.status != "answered":
            if commitments:
                raise ProofInvalid(f"chunks for a query that is {self.query.status}")
            return
        if len(commitments) != self.query.chunk_count:
            raise ProofInvalid(f"{len(commitments)} chunks, the manifest says "
                               f"{self.query.chunk_count}")
        whole = (commitments[0] if len(commitments) == 1
                 else chunks_commitment(commitments))
        if whole != self.commitment:
            raise ProofInvalid("the chunks do not make the manifest's commitment")
        if rows != self.query.row_count:
            raise ProofInvalid(f"{rows} rows, the manifest says {self.query.row_count}")
        self.rows = rows
