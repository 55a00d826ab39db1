"""Evidence bundles: export a set of transactions from a node's block store with
everything needed to check them offline. The format is specified in
docs/evidence-bundle.md; this module and the verifier a third party runs
(exchange.ledger.evidence_verify, which needs no store) are its reference
implementation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from exchange.errors import MalformedInput, ProofInvalid
from exchange.identity.registry import REGISTRY_KINDS
from exchange.ledger import merkle
from exchange.ledger.block import (
    RESULT_OK,
    OpenedEnvelope,
    open_envelope,
)
from exchange.ledger.store import BlockStore
from exchange.v1 import evidence_pb2, identity_pb2, ledger_pb2

MAGIC = b"EXCHANGE-EVIDENCE/1\n"
FORMAT_VERSION = 1


class BundleInvalid(ProofInvalid):
    """A bundle that fails verification; `where` names the part."""

    def __init__(self, where: str, what: str) -> None:
        super().__init__(f"{where}: {what}")
        self.where = where


# -- export -------------------------------------------------------------------------
def build_bundle(store: BlockStore, tx_ids: Iterable[bytes],
                 reveals: Sequence[evidence_pb2.Reveal] = (),
                 through_height: int = 0) -> evidence_pb2.EvidenceBundle:
    """Bundle the given transactions from `store` (which must hold them in final blocks),
    in the canonical form the verifier requires: every list in its defined order, each
    entry once (docs/evidence-bundle.md section 3). Headers and key history run to the
    highest transaction, or to `through_height` if higher: the height case statements
    will be asked at, so that the keys the members sign them with are in the bundle."""
    from exchange.ledger.apply import LedgerApplier  # the registry as of the tip

    registry = LedgerApplier(store).registry
    places = set()
    for tid in dict.fromkeys(bytes(t) for t in tx_ids):
        stored = store.tx(tid)
        if stored is None:
            raise MalformedInput(f"no transaction {tid.hex()} in the store")
        places.add((stored.height, stored.index))
    bundled = [_bundle_tx(store, h, i) for h, i in sorted(places)]
    top = max([b.height for b in bundled] + [through_height])
    if top > store.height:
        raise MalformedInput(f"height {top} is beyond the store's {store.height}")
    history = [_bundle_tx(store, h, i) for h, i in _key_history(store, top)]
    heights_with_tx = {b.height for b in bundled} | {b.height for b in history}
    headers = []
    for height in range(1, top + 1):
        header, sig = store.header(height)
        atts = _one_per_agency(store.attestations(height)) if height in heights_with_tx \
            else []
        headers.append(evidence_pb2.BundledHeader(header=header, proposer_signature=sig,
                                                  attestations=atts))
    signers = {_opened(store, b).signer_key_id for b in bundled}
    creds = []
    for kid in sorted(signers):
        info = registry.resolve(kid)
        if info.credential:
            creds.append(identity_pb2.SignedCredential.FromString(info.credential))
    genesis = identity_pb2.SignedGenesis()
    genesis.CopyFrom(store.signed_genesis)
    ordered = sorted(genesis.signatures, key=lambda sig: sig.agency)
    del genesis.signatures[:]
    genesis.signatures.extend(ordered)
    return evidence_pb2.EvidenceBundle(
        version=FORMAT_VERSION, genesis=genesis, credentials=creds, headers=headers,
        transactions=bundled, reveals=_reveals_in_order(store, reveals), key_history=history)


def _one_per_agency(atts: Sequence[ledger_pb2.Attestation]) -> list[ledger_pb2.Attestation]:
    """One attestation per agency, in ascending agency order (a store may keep two of
    one agency: the old and the new node key around a rotation)."""
    chosen: dict[str, ledger_pb2.Attestation] = {}
    for att in atts:
        chosen.setdefault(att.agency, att)
    return [chosen[a] for a in sorted(chosen)]


def _reveals_in_order(store: BlockStore, reveals: Sequence[evidence_pb2.Reveal]
                      ) -> list[evidence_pb2.Reveal]:
    """Each reveal once, in the chain order of the transaction it reveals, then part."""
    keyed: dict[tuple[int, int, str], evidence_pb2.Reveal] = {}
    for rev in reveals:
        stored = store.tx(bytes(rev.tx_id))
        if stored is None:
            raise MalformedInput(f"a reveal of {bytes(rev.tx_id).hex()}, which is not in "
                                 "the store")
        keyed.setdefault((stored.height, stored.index, rev.part), rev)
    return [keyed[k] for k in sorted(keyed)]


def add_case_statements(bundle: evidence_pb2.EvidenceBundle,
                        statements: Iterable[evidence_pb2.SignedCaseStatement]) -> None:
    """Add members' statements of a case, one per agency in ascending agency order."""
    chosen: dict[str, evidence_pb2.SignedCaseStatement] = {}
    for st in statements:
        chosen.setdefault(st.agency, st)
    bundle.case_statements.extend(chosen[a] for a in sorted(chosen))


def _opened(store: BlockStore, b: evidence_pb2.BundledTransaction) -> OpenedEnvelope:
    return open_envelope(b.envelope, store.signed_genesis_chain_id())


def _bundle_tx(store: BlockStore, height: int, index: int) -> evidence_pb2.BundledTransaction:
    leaves = store.envelopes(height)
    codes = store.results(height)
    return evidence_pb2.BundledTransaction(
        envelope=leaves[index], height=height, index=index,
        inclusion_proof=merkle.inclusion_proof(leaves, index),
        result_code=codes[index],
        result_proof=merkle.inclusion_proof([c.encode() for c in codes], index))


def _key_history(store: BlockStore, top: int) -> list[tuple[int, int]]:
    chain_id = store.signed_genesis_chain_id()
    out = []
    for height in range(1, top + 1):
        for index, (raw, code) in enumerate(zip(store.envelopes(height), store.results(height),
                                                strict=True)):
            if code == RESULT_OK and open_envelope(raw, chain_id).kind in REGISTRY_KINDS:
                out.append((height, index))
    return out


def encode_bundle(bundle: evidence_pb2.EvidenceBundle) -> bytes:
    return MAGIC + bundle.SerializeToString(deterministic=True)
