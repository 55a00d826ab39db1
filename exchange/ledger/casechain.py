"""The running hash of each case (design decision 10): every valid transaction that
names a case extends it, in commit order, identically on every node and in the offline
verifier, so a bundle that leaves one out cannot match the members' signed statements.

A transaction names case C when it is a query with case id C, a case event of C, or an
answer manifest, answer chunk or refusal of a query that names C.

    H_0 = 32 zero bytes;  H_n = SHA-256("exchange/v1/case\\0" || H_{n-1} || tx_id_n)
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from exchange.v1 import evidence_pb2, ledger_pb2

EMPTY = bytes(32)
LABEL = b"exchange/v1/case\0"


def extend(running: bytes, tx_id: bytes) -> bytes:
    return hashlib.sha256(LABEL + running + tx_id).digest()


def case_named(body: ledger_pb2.TxBody, case_of_query: Callable[[bytes], str | None]) -> str:
    """The case a transaction names ("" for none)."""
    kind = body.WhichOneof("kind")
    if kind == "query":
        return body.query.case_id
    if kind == "case_event":
        return body.case_event.case_id
    if kind in ("answer_manifest", "answer_chunk", "refusal"):
        return case_of_query(bytes(getattr(body, kind).query_tx_id)) or ""
    return ""


@dataclass
class CaseChains:
    """Per case, its checkpoints (height, count, running hash) after each block that
    extended it, so a statement can be made as of any height."""

    chains: dict[str, list[tuple[int, int, bytes]]] = field(default_factory=dict)

    def follow(self, case_id: str, tx_id: bytes, height: int) -> None:
        points = self.chains.setdefault(case_id, [])
        count, running = (points[-1][1], points[-1][2]) if points else (0, EMPTY)
        point = (height, count + 1, extend(running, tx_id))
        if points and points[-1][0] == height:
            points[-1] = point
        else:
            points.append(point)

    def as_of(self, case_id: str, height: int) -> tuple[int, bytes]:
        """(count, running hash) of the case after block `height`."""
        count, running = 0, EMPTY
        for h, c, r in self.chains.get(case_id, []):
            if h > height:
                break
            count, running = c, r
        return count, running


def statement(case_id: str, height: int, count: int, running: bytes) -> bytes:
    return evidence_pb2.CaseStatement(case_id=case_id, height=height, count=count,
                                      running_hash=running).SerializeToString(
                                          deterministic=True)
