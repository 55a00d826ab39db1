"""Admission: what a node checks before an envelope may enter a block (decision 3).

Everything that can be checked without ordering is checked here, against the node's
wall clock and ledger state, so that invalid input is refused with a precise reason and
changes nothing: size, form, chain, signer known and valid, agency matches signer,
signature, creation time within the genesis window.
"""

from __future__ import annotations

import time

from exchange.errors import (
    AgencyMismatch,
    Oversize,
    PermissionDenied,
    TimeOutOfWindow,
)
from exchange.identity.registry import ROLE_NODE, KeyRegistry
from exchange.ledger.block import OpenedEnvelope, open_envelope, verify_envelope
from exchange.ledger.queries import QueryBook

ANSWER_KINDS = frozenset({"answer_manifest", "answer_chunk", "refusal"})


def admit(raw: bytes, registry: KeyRegistry, next_height: int,
          now_ms: int | None = None, queries: QueryBook | None = None) -> OpenedEnvelope:
    """Check an envelope for admission; raise an ExchangeError saying why not."""
    params = registry.genesis.params
    if params.envelope_bytes_max and len(raw) > params.envelope_bytes_max:
        raise Oversize(f"envelope of {len(raw)} bytes exceeds {params.envelope_bytes_max}")
    opened = open_envelope(raw, registry.chain_id)
    now = int(time.time() * 1000) if now_ms is None else now_ms
    signer = registry.check_signer(opened.signer_key_id, next_height, now)
    if signer.agency != opened.body.agency:
        raise AgencyMismatch(f"signed by {signer.agency}/{signer.subject} but the body "
                             f"claims agency {opened.body.agency!r}")
    verify_envelope(opened, signer.public_key)
    window = params.admission_window_ms
    skew = opened.body.created_at_ms - now
    if window and abs(skew) > window:
        when = "in the future" if skew > 0 else "old"
        raise TimeOutOfWindow(f"body created {abs(skew) / 1000:.1f} s {when}; the window "
                              f"is {window / 1000:.0f} s (check the signer's clock)")
    if opened.kind in ANSWER_KINDS and signer.subject != ROLE_NODE:
        raise PermissionDenied(f"only a node answers queries, not {signer.agency}/"
                               f"{signer.subject}")
    if opened.kind == "query" and queries is not None:
        queries.check_query_form(opened.body, signer, now)
    return opened
