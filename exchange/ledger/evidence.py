"""Evidence bundles: export a set of transactions with everything needed to check them
offline, and the verifier a third party runs. The format is specified in
docs/evidence-bundle.md; this module is its reference implementation.

The verifier is pure: bytes in, a report out. Every byte of a bundle is accounted for:
the encoding must be canonical with no unknown fields, and every signature, proof,
attestation, credential and reveal in it must check, so a single changed byte anywhere
is detected and the report names where.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from exchange.errors import ExchangeError, MalformedInput, ProofInvalid
from exchange.identity.genesis import genesis_hash, verify_genesis
from exchange.identity.registry import REGISTRY_KINDS, KeyInfo, KeyRegistry
from exchange.ledger import merkle
from exchange.ledger.block import (
    RESULT_OK,
    BlockInvalid,
    OpenedEnvelope,
    check_header,
    open_envelope,
    verify_envelope,
)
from exchange.ledger.store import BlockStore
from exchange.ledger.verify import check_attestations, proposer_key_lookup
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
                 reveals: Sequence[evidence_pb2.Reveal] = ()) -> evidence_pb2.EvidenceBundle:
    """Bundle the given transactions from `store` (which must hold them in final blocks)."""
    from exchange.ledger.apply import LedgerApplier  # the registry as of the tip

    registry = LedgerApplier(store).registry
    wanted = list(dict.fromkeys(bytes(t) for t in tx_ids))
    bundled: list[evidence_pb2.BundledTransaction] = []
    for tid in wanted:
        stored = store.tx(tid)
        if stored is None:
            raise MalformedInput(f"no transaction {tid.hex()} in the store")
        bundled.append(_bundle_tx(store, stored.height, stored.index))
    top = max((b.height for b in bundled), default=0)
    history = [_bundle_tx(store, h, i) for h, i in _key_history(store, top)]
    heights_with_tx = {b.height for b in bundled} | {b.height for b in history}
    headers = []
    for height in range(1, top + 1):
        header, sig = store.header(height)
        atts = store.attestations(height) if height in heights_with_tx else []
        headers.append(evidence_pb2.BundledHeader(header=header, proposer_signature=sig,
                                                  attestations=atts))
    signers = {_opened(store, b).signer_key_id for b in bundled}
    creds = []
    for kid in sorted(signers):
        info = registry.resolve(kid)
        if info.credential:
            creds.append(identity_pb2.SignedCredential.FromString(info.credential))
    return evidence_pb2.EvidenceBundle(
        version=FORMAT_VERSION, genesis=store.signed_genesis, credentials=creds,
        headers=headers, transactions=bundled, reveals=list(reveals), key_history=history)


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


# -- verification -------------------------------------------------------------------
@dataclass
class VerifiedTx:
    """One verified transaction, as the report shows it."""

    tx_id: str
    height: int
    index: int
    kind: str
    agency: str
    signer: str
    roles: list[str]
    created_at_ms: int
    block_timestamp_ms: int
    result: str
    attested_by: list[str]
    summary: dict[str, object]
    revealed: bool = False


@dataclass
class BundleReport:
    chain_id: str
    members: list[str]
    quorum: int
    headers: int
    transactions: list[VerifiedTx] = field(default_factory=list)
    reveals: int = 0
    # For a case export with statements: what a quorum of members stated, and that the
    # bundle holds exactly the case's transactions up to that height.
    case: dict[str, object] | None = None

    def as_dict(self) -> dict[str, object]:
        from dataclasses import asdict
        return asdict(self)


def decode_bundle(data: bytes) -> evidence_pb2.EvidenceBundle:
    if not data.startswith(MAGIC):
        raise BundleInvalid("file", "not an evidence bundle (bad magic)")
    body = data[len(MAGIC):]
    bundle = evidence_pb2.EvidenceBundle()
    try:
        bundle.ParseFromString(body)
    except DecodeError as exc:
        raise BundleInvalid("file", f"does not parse: {exc}") from exc
    where = _unknown_fields(bundle, "bundle")
    if where:
        raise BundleInvalid(where, "unknown field (altered or foreign encoding)")
    if bundle.SerializeToString(deterministic=True) != body:
        raise BundleInvalid("file", "encoding is not canonical (altered bytes)")
    if bundle.version != FORMAT_VERSION:
        raise BundleInvalid("bundle", f"unsupported format version {bundle.version}")
    return bundle


def _unknown_fields(msg: Message, path: str) -> str | None:
    if len(UnknownFieldSet(msg)):
        return path
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        items = value if fd.is_repeated else [value]
        for i, item in enumerate(items):
            found = _unknown_fields(item, f"{path}.{fd.name}[{i}]")
            if found:
                return found
    return None


def verify_bundle(data: bytes) -> BundleReport:
    """Verify a bundle completely; raise BundleInvalid naming the first bad part."""
    bundle = decode_bundle(data)
    try:
        verify_genesis(bundle.genesis)
        registry = KeyRegistry(bundle.genesis)
    except ExchangeError as exc:
        raise BundleInvalid("genesis", str(exc)) from exc
    chain_id = registry.chain_id
    report = BundleReport(chain_id, sorted(registry.members), registry.quorum,
                          len(bundle.headers))

    by_height: dict[int, list[tuple[str, evidence_pb2.BundledTransaction]]] = {}
    for i, b in enumerate(bundle.key_history):
        by_height.setdefault(b.height, []).append((f"key_history[{i}]", b))
    for i, b in enumerate(bundle.transactions):
        by_height.setdefault(b.height, []).append((f"transactions[{i}]", b))

    # Walk the header chain from genesis, applying key history as it comes.
    prev_hash, prev_ts = genesis_hash(bundle.genesis), 0
    proposer_key = proposer_key_lookup(registry)
    verified: dict[str, VerifiedTx] = {}
    for pos, bh in enumerate(bundle.headers):
        height = pos + 1
        where = f"headers[{pos}] (height {height})"
        try:
            header = check_header(bh.header, bh.proposer_signature, chain_id, height,
                                  prev_hash, prev_ts, proposer_key)
        except BlockInvalid as exc:
            raise BundleInvalid(where, exc.what) from exc
        hash_ = hashlib.sha256(bh.header).digest()
        roots = {bytes(a.results_root) for a in bh.attestations}
        if len(roots) > 1:
            raise BundleInvalid(where, "attestations disagree on the transaction results")
        root = roots.pop() if roots else None
        try:
            attested = check_attestations(registry, height, hash_, root or b"",
                                          list(bh.attestations))
        except BlockInvalid as exc:
            raise BundleInvalid(where, exc.what) from exc
        if len(attested) != len(bh.attestations):
            raise BundleInvalid(where, "an agency attests twice")
        for name, b in sorted(by_height.get(height, []), key=lambda x: x[1].index):
            vtx = _verify_tx(registry, name, b, header, attested, root)
            if name.startswith("key_history") and vtx.result == RESULT_OK:
                opened = open_envelope(b.envelope, chain_id)
                try:
                    registry.apply(opened.body, registry.resolve(opened.signer_key_id), height)
                except ExchangeError as exc:
                    raise BundleInvalid(name, f"key history does not apply: {exc}") from exc
            elif name.startswith("transactions"):
                verified[name] = vtx
        prev_hash, prev_ts = hash_, header.timestamp_ms

    for name, items in ((n, b) for n, b in
                        ((f"transactions[{i}]", t) for i, t in enumerate(bundle.transactions))):
        if name not in verified:
            raise BundleInvalid(name, f"its block (height {items.height}) is not in the bundle")
    report.transactions = [verified[f"transactions[{i}]"]
                           for i in range(len(bundle.transactions))]
    _check_credentials(bundle, registry)
    _check_reveals(bundle, report, chain_id)
    if len(bundle.case_statements):
        report.case = _check_case_statements(bundle, registry, chain_id)
    return report


def _check_case_statements(bundle: evidence_pb2.EvidenceBundle, registry: KeyRegistry,
                           chain_id: str) -> dict[str, object]:
    """A quorum of members' identical, signed statements of the case's count and running
    hash at a height, and the bundle's own transactions of the case give the same."""
    from exchange.identity.keys import Domain, verify
    from exchange.ledger.casechain import EMPTY, case_named, extend

    raw = bytes(bundle.case_statements[0].statement)
    try:
        statement_height = evidence_pb2.CaseStatement.FromString(raw).height
    except DecodeError as exc:
        raise BundleInvalid("case_statements[0]", f"does not parse: {exc}") from exc
    agencies: list[str] = []
    for i, signed in enumerate(bundle.case_statements):
        where = f"case_statements[{i}]"
        if bytes(signed.statement) != raw:
            raise BundleInvalid(where, "the members' statements differ")
        if signed.agency in agencies:
            raise BundleInvalid(where, f"{signed.agency} states twice")
        try:
            node = registry.node_key_at(signed.agency, bytes(signed.signer_key_id),
                                        statement_height)
            verify(node.public_key, Domain.CASE_STATEMENT, chain_id, raw,
                   bytes(signed.signature))
        except BundleInvalid:
            raise
        except ExchangeError as exc:
            raise BundleInvalid(where, str(exc)) from exc
        agencies.append(signed.agency)
    if len(agencies) < registry.quorum:
        raise BundleInvalid("case_statements", f"{len(agencies)} members state the case; "
                                               f"{registry.quorum} are needed")
    st = evidence_pb2.CaseStatement.FromString(raw)
    if st.height > len(bundle.headers):
        raise BundleInvalid("case_statements", f"stated at height {st.height}, beyond the "
                                               "bundle's headers")
    ordered = sorted(bundle.transactions, key=lambda t: (t.height, t.index))
    opened = [(t, open_envelope(t.envelope, chain_id)) for t in ordered
              if t.result_code == RESULT_OK and t.height <= st.height]
    query_case = {o.tx_id: o.body.query.case_id for _, o in opened if o.kind == "query"}
    count, running = 0, EMPTY
    for _, o in opened:
        if case_named(o.body, query_case.get) == st.case_id:
            count += 1
            running = extend(running, o.tx_id)
    if (count, running) != (st.count, bytes(st.running_hash)):
        raise BundleInvalid("case_statements", f"case {st.case_id}: the bundle holds {count} "
                                               f"of its transactions up to height "
                                               f"{st.height}, the members state {st.count}; "
                                               "a transaction of the case is missing, or "
                                               "one was swapped")
    return {"case_id": st.case_id, "height": st.height, "count": st.count,
            "complete": True, "stated_by": sorted(agencies)}


def _verify_tx(registry: KeyRegistry, name: str, b: evidence_pb2.BundledTransaction,
               header: ledger_pb2.BlockHeader, attested: set[str],
               root: bytes | None) -> VerifiedTx:
    if b.index >= header.tx_count:
        raise BundleInvalid(name, f"index {b.index} outside block {b.height}")
    try:
        opened = open_envelope(b.envelope, registry.chain_id)
    except ExchangeError as exc:
        raise BundleInvalid(name, f"envelope: {exc}") from exc
    tid = opened.tx_id.hex()
    where = f"{name} (tx {tid[:16]})"
    if not merkle.verify_inclusion(b.envelope, b.index, header.tx_count,
                                   list(b.inclusion_proof), bytes(header.tx_root)):
        raise BundleInvalid(where, f"inclusion proof does not lead to the Merkle root of "
                                   f"block {b.height}")
    try:
        signer: KeyInfo = registry.resolve(opened.signer_key_id)
        verify_envelope(opened, signer.public_key)
    except ExchangeError as exc:
        raise BundleInvalid(where, f"signature: {exc}") from exc
    if signer.agency != opened.body.agency:
        raise BundleInvalid(where, f"signed by {signer.agency} but claims {opened.body.agency}")
    if len(attested) < registry.quorum or root is None:
        raise BundleInvalid(where, f"block {b.height} is attested by {len(attested)} "
                                   f"members, {registry.quorum} needed")
    if not merkle.verify_inclusion(b.result_code.encode(), b.index, header.tx_count,
                                   list(b.result_proof), root):
        raise BundleInvalid(where, "result code is not the one the attestations sign")
    result = b.result_code
    if result == RESULT_OK:
        try:
            registry.check_signer(opened.signer_key_id, b.height, header.timestamp_ms)
        except ExchangeError as exc:
            raise BundleInvalid(where, f"signer: {exc}") from exc
    return VerifiedTx(
        tx_id=tid, height=b.height, index=b.index, kind=opened.kind, agency=signer.agency,
        signer=f"{signer.agency}/{signer.subject}", roles=list(signer.roles),
        created_at_ms=opened.body.created_at_ms, block_timestamp_ms=header.timestamp_ms,
        result=result, attested_by=sorted(attested), summary=summarize(opened.body))


def _check_credentials(bundle: evidence_pb2.EvidenceBundle, registry: KeyRegistry) -> None:
    for i, signed in enumerate(bundle.credentials):
        raw = signed.SerializeToString(deterministic=True)
        if not any(info.credential == raw for info in registry.credentials()):
            raise BundleInvalid(f"credentials[{i}]", "not a credential issued on this chain")


def _commitments(body: ledger_pb2.TxBody) -> dict[str, bytes]:
    kind = body.WhichOneof("kind")
    out: dict[str, bytes] = {}
    if kind == "query":
        out[""] = bytes(body.query.sealed_request.commitment)
    elif kind == "answer_manifest":
        out[""] = bytes(body.answer_manifest.commitment)
    elif kind == "answer_chunk":
        out[""] = bytes(body.answer_chunk.sealed.commitment)
    elif kind == "findings":
        out[""] = bytes(body.findings.sealed_output.commitment)
    elif kind == "findings_chunk":
        out[""] = bytes(body.findings_chunk.sealed_output.commitment)
    return {k: v for k, v in out.items() if v}


def _check_reveals(bundle: evidence_pb2.EvidenceBundle, report: BundleReport,
                   chain_id: str) -> None:
    by_id = {t.tx_id: t for t in report.transactions}
    envs = {open_envelope(t.envelope, chain_id).tx_id.hex(): t for t in bundle.transactions}
    for i, rev in enumerate(bundle.reveals):
        where = f"reveals[{i}]"
        tid = bytes(rev.tx_id).hex()
        if tid not in envs:
            raise BundleInvalid(where, "reveals a transaction that is not in the bundle")
        body = open_envelope(envs[tid].envelope, chain_id).body
        commitment = _commitments(body).get(rev.part)
        if commitment is None:
            raise BundleInvalid(where, f"transaction has no commitment {rev.part!r}")
        if len(rev.salt) != 32:
            raise BundleInvalid(where, "salt must be 32 bytes")
        if hashlib.sha256(bytes(rev.salt) + bytes(rev.plaintext)).digest() != commitment:
            raise BundleInvalid(where, "plaintext does not match the committed digest")
        by_id[tid].revealed = True
        report.reveals += 1


def summarize(body: ledger_pb2.TxBody) -> dict[str, object]:
    """The clear metadata of a body, for reports (never sealed contents)."""
    kind = body.WhichOneof("kind")
    if kind is None:
        return {}
    sub = getattr(body, kind)
    out: dict[str, object] = {}
    for fd, value in sub.ListFields():
        if fd.message_type is not None:
            continue
        if fd.type == fd.TYPE_BYTES:
            out[fd.name] = [_short_hex(v) for v in value] if fd.is_repeated \
                else _short_hex(value)
        elif fd.is_repeated:
            out[fd.name] = list(value)
        else:
            out[fd.name] = value
    return out


def _short_hex(value: bytes, limit: int = 32) -> str:
    raw = bytes(value)
    text = raw[:limit].hex()
    return text + (f"... ({len(raw)} bytes)" if len(raw) > limit else "")
