"""Deterministic judgement of each transaction of a checked block (decision 3).

A block that passed `check_block` is well formed and every envelope is signed by the
key it names. What depends on ledger state is judged here, identically on every node
and in every offline verifier: is the signer's credential valid at this height and
time, does the body's agency match its signer, is the body's time within the window
of the block's timestamp, has this tx id been seen before. A transaction that fails
stays in the block with its reason code; the codes' Merkle root is what attestations
sign.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from exchange.errors import ExchangeError
from exchange.identity.registry import ROLE_NODE, KeyInfo, KeyRegistry
from exchange.ledger.block import RESULT_OK, CheckedBlock, OpenedEnvelope, verify_attestation
from exchange.v1 import ledger_pb2

CODE_DUPLICATE = "DUPLICATE_TX"
CODE_SIGNER = "SIGNER_NOT_VALID"
CODE_AGENCY = "AGENCY_MISMATCH"
CODE_TIME = "TIME_OUT_OF_WINDOW"
CODE_REJECTED = "REJECTED"


class StateJudge(Protocol):
    """The ledger state a block's transactions are judged against (LedgerState)."""

    registry: KeyRegistry

    def judge(self, env: OpenedEnvelope, signer: KeyInfo, height: int,
              time_ms: int) -> str: ...


def judge_block(state: StateJudge, checked: CheckedBlock,
                seen: Callable[[bytes], bool]) -> list[str]:
    """Result code of every transaction of `checked`, advancing `state` by the valid
    ones. `seen(tx_id)` says whether an earlier block holds the tx id."""
    registry = state.registry
    height = checked.header.height
    timestamp_ms = checked.header.timestamp_ms
    in_block: set[bytes] = set()
    codes: list[str] = []
    for env in checked.envelopes:
        if env.tx_id in in_block or seen(env.tx_id):
            code = CODE_DUPLICATE
        else:
            code, signer = standing_code(registry, env, height, timestamp_ms)
            if signer is not None:
                code = state.judge(env, signer, height, timestamp_ms)
        in_block.add(env.tx_id)
        codes.append(code)
    return codes


STANDING_CODES = frozenset({CODE_SIGNER, CODE_AGENCY, CODE_TIME})


def standing_code(registry: KeyRegistry, env: OpenedEnvelope, height: int,
                  timestamp_ms: int) -> tuple[str, KeyInfo | None]:
    """The judgement that needs only the key registry (and no other state): the signer's
    key valid at `height` and `timestamp_ms`, the body's agency the signer's, the body's
    time within the admission window of the block's. Returns (a code of STANDING_CODES,
    None) or (RESULT_OK, the signer). An offline verifier holding the key history
    recomputes it for every bundled transaction."""
    try:
        signer = registry.check_signer(env.signer_key_id, height, timestamp_ms)
    except ExchangeError:
        return CODE_SIGNER, None
    if signer.agency != env.body.agency:
        return CODE_AGENCY, None
    window_ms = registry.genesis.params.admission_window_ms
    if window_ms and abs(env.body.created_at_ms - timestamp_ms) > window_ms:
        return CODE_TIME, None
    return RESULT_OK, signer


def valid_attestation_record(registry: KeyRegistry, body: ledger_pb2.TxBody, signer: KeyInfo,
                  height: int) -> bool:
    """An attestation record is put in by a member node and holds only valid
    attestations of earlier blocks, each by the attesting member's node key."""
    if signer.subject != ROLE_NODE:
        return False
    return all(1 <= att.height < height and signed_by_its_node(registry, att)
               for att in body.attestation_record.attestations)


def signed_by_its_node(registry: KeyRegistry, att: ledger_pb2.Attestation) -> bool:
    """Whether `att` carries a valid signature of its agency's node key as of the
    attested height."""
    try:
        node = registry.node_key_at(att.agency, bytes(att.signer_key_id), att.height)
        verify_attestation(att, registry.chain_id, node.public_key)
    except ExchangeError:
        return False
    return True
