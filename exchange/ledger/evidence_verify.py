"""The evidence bundle verifier a third party runs (docs/evidence-bundle.md section 4);
exporting bundles is exchange.ledger.evidence's.

The verifier is pure: bytes in, a report out, no store or network. Every byte of a
bundle is accounted for: the encoding must be canonical with no unknown fields, and
every signature, proof, attestation, credential and reveal in it must check, so a single
changed byte anywhere is detected and the report names where.

Over 600 lines on purpose: `_Verifier` runs the specification's checks in its order,
one method per section, and reads best beside it in one place.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message
from google.protobuf.unknown_fields import UnknownFieldSet

from exchange.errors import ExchangeError
from exchange.identity.genesis import genesis_hash
from exchange.identity.keys import Domain, verify
from exchange.identity.registry import REGISTRY_KINDS, KeyInfo, KeyRegistry
from exchange.ledger import merkle
from exchange.ledger.block import (
    RESULT_OK,
    BlockInvalid,
    OpenedEnvelope,
    check_header,
    open_envelope,
    parse_header,
    verify_attestation,
    verify_envelope,
)
from exchange.ledger.evidence import FORMAT_VERSION, MAGIC, BundleInvalid
from exchange.ledger.judge import CODE_DUPLICATE, STANDING_CODES, standing_code
from exchange.ledger.queries import chunks_commitment
from exchange.ledger.verify import proposer_key_lookup
from exchange.v1 import evidence_pb2, identity_pb2, ledger_pb2


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
    quorum: int = 0  # members that had to attest its block


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
        raise BundleInvalid(_encoding_fault(body), f"does not parse: {exc}") from exc
    where = _unknown_fields(bundle, "")
    if where is not None:
        raise BundleInvalid(where, "unknown field (altered or foreign encoding)")
    if bundle.SerializeToString(deterministic=True) != body:
        raise BundleInvalid(_encoding_fault(body), "encoding is not canonical (altered "
                                                   "bytes)")
    if bundle.version != FORMAT_VERSION:
        raise BundleInvalid("version", f"unsupported format version {bundle.version}")
    return bundle


def _encoding_fault(body: bytes) -> str:
    """The top-level part (e.g. "transactions[3]") whose own bytes do not parse or are
    not canonical; "file" when the framing between the parts is what is wrong."""
    fields = {fd.number: fd for fd in evidence_pb2.EvidenceBundle.DESCRIPTOR.fields}
    seen: dict[int, int] = {}
    at = 0
    try:
        while at < len(body):
            key, at = _varint(body, at)
            fd = fields.get(key >> 3)
            if fd is None or key & 7 not in (0, 2):
                return "file"
            if key & 7 == 0:
                value, at = _varint(body, at)
                if value == 0:  # a default value written out
                    return fd.name
                continue
            length, at = _varint(body, at)
            end = at + length
            if end > len(body) or fd.message_type is None:
                return "file"
            index = seen.get(fd.number, 0)
            seen[fd.number] = index + 1
            part = message_factory.GetMessageClass(fd.message_type)()  # type: ignore[arg-type]
            try:
                part.ParseFromString(body[at:end])
            except DecodeError:
                return f"{fd.name}[{index}]" if fd.is_repeated else fd.name
            if part.SerializeToString(deterministic=True) != body[at:end]:
                return f"{fd.name}[{index}]" if fd.is_repeated else fd.name
            at = end
    except IndexError:
        return "file"
    return "file"


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


def _unknown_fields(msg: Message, path: str) -> str | None:
    """The path of the first message holding an unknown field ("file" for the bundle
    itself, else e.g. "headers[2].attestations[0]"), or None."""
    if len(UnknownFieldSet(msg)):
        return path or "file"
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        items = value if fd.is_repeated else [value]
        for i, item in enumerate(items):
            step = f"{fd.name}[{i}]" if fd.is_repeated else fd.name
            found = _unknown_fields(item, f"{path}.{step}" if path else step)
            if found:
                return found
    return None


def verify_bundle(data: bytes) -> BundleReport:
    """Verify a bundle completely; raise BundleInvalid naming the first bad part.

    The checks run in the order of docs/evidence-bundle.md section 4. Each refusal names
    the part whose bytes are wrong (`genesis`, `headers[i]`, `headers[i].attestations[j]`,
    `transactions[i]`, `key_history[i]`, `credentials[i]`, `reveals[i]`,
    `case_statements[i]`, `version` or `file`), not a later part that merely fails
    because of it."""
    bundle = decode_bundle(data)
    return _Verifier(bundle, _open_genesis(bundle.genesis)).run()


def _open_genesis(signed: identity_pb2.SignedGenesis) -> KeyRegistry:
    try:
        registry = KeyRegistry(signed)
    except ExchangeError as exc:
        raise BundleInvalid("genesis", str(exc)) from exc
    agencies = [s.agency for s in signed.signatures]
    if agencies != sorted(set(agencies)):
        raise BundleInvalid("genesis", f"signatures must be one per member in ascending "
                                       f"agency order, found {agencies}")
    return registry


@dataclass(frozen=True, slots=True)
class _Entry:
    """A bundled transaction or key history entry, with the name a refusal gives it."""

    name: str
    tx: evidence_pb2.BundledTransaction
    history: bool

    @property
    def position(self) -> tuple[int, int]:
        return self.tx.height, self.tx.index


class _Verifier:
    """One verification of one decoded bundle (docs/evidence-bundle.md section 4)."""

    def __init__(self, bundle: evidence_pb2.EvidenceBundle, registry: KeyRegistry) -> None:
        self.bundle = bundle
        self.registry = registry
        self.chain_id = registry.chain_id
        self.headers_count = len(bundle.headers)
        self.entries = ([_Entry(f"key_history[{i}]", b, True)
                         for i, b in enumerate(bundle.key_history)]
                        + [_Entry(f"transactions[{i}]", b, False)
                           for i, b in enumerate(bundle.transactions)])
        self.verified: dict[str, VerifiedTx] = {}
        self.opened: dict[str, OpenedEnvelope] = {}
        self._parsed: dict[int, ledger_pb2.BlockHeader | None] = {}
        self.statement_height = self._statement_height()
        # members and quorum as of the case statement's height (after that block)
        self.stated_members: list[str] = sorted(registry.members)
        self.stated_quorum = registry.quorum

    def run(self) -> BundleReport:
        self._place_entries()
        self._walk()
        for e in self.entries:
            if not 1 <= e.tx.height <= self.headers_count:
                raise BundleInvalid(e.name, f"at height {e.tx.height}, outside the bundled "
                                            f"headers (1 to {self.headers_count})")
        self._check_order("transactions", self.bundle.transactions)
        self._check_order("key_history", self.bundle.key_history)
        self._check_credentials()
        report = BundleReport(self.chain_id, sorted(self.registry.members),
                              self.registry.quorum, self.headers_count)
        report.transactions = [self.verified[f"transactions[{i}]"]
                               for i in range(len(self.bundle.transactions))]
        self._check_reveals(report)
        self._check_chunks(report)
        self._check_findings_chunks()
        if len(self.bundle.case_statements):
            report.case = self._check_case_statements()
        self._check_header_span()
        return report

    # -- placement -----------------------------------------------------------------
    def _header(self, height: int) -> ledger_pb2.BlockHeader | None:
        """The bundled header at `height` as it claims to be (not yet verified)."""
        if not 1 <= height <= self.headers_count:
            return None
        if height not in self._parsed:
            try:
                self._parsed[height] = parse_header(bytes(self.bundle.headers[height - 1].header))
            except BlockInvalid:
                self._parsed[height] = None
        return self._parsed[height]

    def _included(self, b: evidence_pb2.BundledTransaction, height: int, index: int) -> bool:
        header = self._header(height)
        return header is not None and index < header.tx_count and merkle.verify_inclusion(
            b.envelope, index, header.tx_count, list(b.inclusion_proof),
            bytes(header.tx_root))

    def _place_entries(self) -> None:
        """An entry whose envelope provably sits in another bundled block than it says is
        refused before anything else, so its wrong height is blamed on it and not on
        what fails later for want of it (a key it adds, a node key it rotates). Only the
        first entry that is not where it says is looked for elsewhere: one search of
        the headers, however many entries a hostile bundle holds (the walk refuses the
        bundle at that entry anyway)."""
        misplaced = next((e for e in self.entries
                          if not self._included(e.tx, e.tx.height, e.tx.index)), None)
        if misplaced is None:
            return
        height, index = misplaced.position
        # Only other heights: at its own height, a header whose tx_count was altered can
        # make a genuine proof fit another index.
        for h in range(1, self.headers_count + 1):
            found = self._header(h)  # a header in its place: it says its height
            if h != height and found is not None and found.height == h and \
                    self._included(misplaced.tx, h, index):
                raise BundleInvalid(misplaced.name, f"says height {height}, index {index}; "
                                                    f"its envelope is at height {h}, "
                                                    f"index {index}")

    # -- the chain ------------------------------------------------------------------
    def _walk(self) -> None:
        """Headers from genesis, each block's attestations, and the entries in chain
        order, the key history applied to the registry as it comes."""
        at: dict[int, dict[int, list[_Entry]]] = {}
        for e in self.entries:
            at.setdefault(e.tx.height, {}).setdefault(e.tx.index, []).append(e)
        prev_hash, prev_ts = genesis_hash(self.bundle.genesis), 0
        proposer_key = proposer_key_lookup(self.registry)
        if self.statement_height == 0:
            self._state_members()
        for pos, bh in enumerate(self.bundle.headers):
            height = pos + 1
            if height == 1:
                self._check_genesis_link(bh, prev_hash)
            try:
                header = check_header(bh.header, bh.proposer_signature, self.chain_id, height,
                                      prev_hash, prev_ts, proposer_key)
            except BlockInvalid as exc:
                raise BundleInvalid(f"headers[{pos}]", f"height {height}: {exc.what}") from exc
            hash_ = hashlib.sha256(bh.header).digest()
            quorum = self.registry.quorum
            attested, root = self._attestations(pos, height, hash_, list(bh.attestations))
            entries = at.get(height, {})
            for index in sorted(entries):
                for e in entries[index]:
                    self._verify_entry(e, header, attested, root, quorum)
                self._check_history_holds(entries[index])
                for e in entries[index]:
                    if e.history:
                        self._apply(e, height)
                        break
            if height == self.statement_height:
                self._state_members()
            prev_hash, prev_ts = hash_, header.timestamp_ms

    def _state_members(self) -> None:
        self.stated_members = sorted(self.registry.members)
        self.stated_quorum = self.registry.quorum

    def _check_genesis_link(self, bh: evidence_pb2.BundledHeader, expected: bytes) -> None:
        """A first header that is genuine but not of this genesis (another chain's, or
        another genesis made with the same keys) means the genesis was swapped."""
        header = self._header(1)
        if header is None or bytes(header.prev_hash) == expected:
            return
        foreign = header.chain_id != self.chain_id
        if not foreign:
            try:
                key = self.registry.node_key_at(header.proposer,
                                                bytes(header.proposer_key_id), 1)
            except ExchangeError:
                foreign = True  # a proposer key this genesis does not have
            else:
                try:
                    verify(key.public_key, Domain.BLOCK, self.chain_id, bytes(bh.header),
                           bytes(bh.proposer_signature))
                    foreign = True  # signed, so the header is genuine: the genesis is not
                except ExchangeError:
                    foreign = False
        if foreign:
            raise BundleInvalid("genesis", f"the bundled headers continue chain "
                                           f"{header.chain_id!r} from a genesis with hash "
                                           f"{bytes(header.prev_hash).hex()}; this genesis "
                                           f"is of chain {self.chain_id!r} with hash "
                                           f"{expected.hex()}")

    def _attestations(self, pos: int, height: int, hash_: bytes,
                      atts: list[ledger_pb2.Attestation]) -> tuple[set[str], bytes | None]:
        """Each attestation checked on its own, then their agreement: the agencies that
        attested the block and the results root they sign."""
        members = set(self.registry.members)
        for j, att in enumerate(atts):
            where = f"headers[{pos}].attestations[{j}]"
            if att.height != height or bytes(att.block_hash) != hash_:
                raise BundleInvalid(where, f"attestation of another block (height "
                                           f"{att.height}, hash {bytes(att.block_hash).hex()}"
                                           f"), not of block {height}")
            if att.agency not in members:
                raise BundleInvalid(where, f"{att.agency!r} is not a member at block {height}")
            try:
                node = self.registry.node_key_at(att.agency, bytes(att.signer_key_id), height)
                verify_attestation(att, self.chain_id, node.public_key)
            except ExchangeError as exc:
                raise BundleInvalid(where, f"attestation of {att.agency}: {exc}") from exc
            if j and att.agency <= atts[j - 1].agency:
                raise BundleInvalid(where, f"{att.agency} attests twice" if att.agency ==
                                    atts[j - 1].agency else "attestations are in ascending "
                                                            "agency order")
        roots = [bytes(a.results_root) for a in atts]
        if not roots:
            return set(), None
        common = Counter(roots).most_common(1)[0][0]
        for j, r in enumerate(roots):
            if r != common:
                raise BundleInvalid(f"headers[{pos}].attestations[{j}]",
                                    "signs other transaction results than the other "
                                    "attestations of the block")
        return {a.agency for a in atts}, common

    def _verify_entry(self, e: _Entry, header: ledger_pb2.BlockHeader, attested: set[str],
                      root: bytes | None, quorum: int) -> None:
        b, name = e.tx, e.name
        if b.index >= header.tx_count:
            raise BundleInvalid(name, f"index {b.index} outside block {b.height} "
                                      f"({header.tx_count} transactions)")
        try:
            opened = open_envelope(b.envelope, self.chain_id)
        except ExchangeError as exc:
            raise BundleInvalid(name, f"envelope: {exc}") from exc
        tid = opened.tx_id.hex()
        tx = f"tx {tid[:16]}"
        if e.history and opened.kind not in REGISTRY_KINDS:
            raise BundleInvalid(name, f"{tx}: a {opened.kind} transaction is not a key change")
        if not merkle.verify_inclusion(b.envelope, b.index, header.tx_count,
                                       list(b.inclusion_proof), bytes(header.tx_root)):
            raise BundleInvalid(name, f"{tx}: inclusion proof does not lead to the Merkle "
                                      f"root of block {b.height}")
        try:
            signer: KeyInfo = self.registry.resolve(opened.signer_key_id)
            verify_envelope(opened, signer.public_key)
        except ExchangeError as exc:
            raise BundleInvalid(name, f"{tx}: signature: {exc}") from exc
        if len(attested) < quorum or root is None:
            raise BundleInvalid(name, f"{tx}: block {b.height} is attested by "
                                      f"{len(attested)} members, {quorum} needed")
        if not merkle.verify_inclusion(b.result_code.encode(), b.index, header.tx_count,
                                       list(b.result_proof), root):
            raise BundleInvalid(name, f"{tx}: result code is not the one the attestations "
                                      "sign")
        result = b.result_code
        if e.history and result != RESULT_OK:
            raise BundleInvalid(name, f"{tx}: key history holds only transactions judged "
                                      f"OK; this one was judged {result}")
        if result != CODE_DUPLICATE:
            standing, _ = standing_code(self.registry, opened, b.height, header.timestamp_ms)
            if standing != RESULT_OK and result != standing:
                raise BundleInvalid(name, f"{tx}: judged {result} by a quorum, but the key "
                                          f"history makes it {standing}: the key history is "
                                          "incomplete or altered")
            if standing == RESULT_OK and result in STANDING_CODES:
                raise BundleInvalid(name, f"{tx}: judged {result} by a quorum, but its "
                                          "signer, agency and time are valid as of its "
                                          "block: the key history is incomplete or altered")
        self.opened[name] = opened
        self.verified[name] = VerifiedTx(
            tx_id=tid, height=b.height, index=b.index, kind=opened.kind,
            agency=signer.agency, signer=f"{signer.agency}/{signer.subject}",
            roles=list(signer.roles), created_at_ms=opened.body.created_at_ms,
            block_timestamp_ms=header.timestamp_ms, result=result,
            attested_by=sorted(attested), summary=summarize(opened.body), quorum=quorum)

    def _apply(self, e: _Entry, height: int) -> None:
        opened = self.opened[e.name]
        try:
            self.registry.apply(opened.body, self.registry.resolve(opened.signer_key_id),
                                height)
        except ExchangeError as exc:
            raise BundleInvalid(e.name, f"does not apply to the key registry: {exc}") from exc

    # -- canonical lists ----------------------------------------------------------
    @staticmethod
    def _check_order(field_name: str,
                     items: Sequence[evidence_pb2.BundledTransaction]) -> None:
        for i in range(1, len(items)):
            before, here = (items[i - 1].height, items[i - 1].index), \
                (items[i].height, items[i].index)
            if here == before:
                raise BundleInvalid(f"{field_name}[{i}]", f"the same transaction as "
                                                          f"{field_name}[{i - 1}]")
            if here < before:
                raise BundleInvalid(f"{field_name}[{i}]",
                                    f"out of chain order: {here[0]}.{here[1]} after "
                                    f"{before[0]}.{before[1]}")

    def _check_history_holds(self, at_one_place: list[_Entry]) -> None:
        """A bundled key change judged OK is in the key history too (which holds every
        one up to the highest bundled height)."""
        if any(e.history for e in at_one_place):
            return
        for e in at_one_place:
            if e.tx.result_code == RESULT_OK and self.opened[e.name].kind in REGISTRY_KINDS:
                raise BundleInvalid("key_history", f"leaves out the key change {e.name} "
                                                   f"(judged OK at {e.tx.height}."
                                                   f"{e.tx.index})")

    def _check_credentials(self) -> None:
        """`credentials` holds exactly the credentials of the bundled transactions'
        signers, each once, in ascending key id order."""
        wanted: dict[bytes, KeyInfo] = {}
        for name, opened in self.opened.items():
            if name.startswith("transactions"):
                info = self.registry.resolve(opened.signer_key_id)
                if info.credential:
                    wanted[info.key_id] = info
        expected = [wanted[k] for k in sorted(wanted)]
        given = [c.SerializeToString(deterministic=True) for c in self.bundle.credentials]
        for i, raw in enumerate(given):
            where = f"credentials[{i}]"
            if i < len(expected) and raw == expected[i].credential:
                continue
            if not any(info.credential == raw for info in self.registry.credentials()):
                raise BundleInvalid(where, "not a credential issued on this chain")
            if not any(info.credential == raw for info in expected):
                raise BundleInvalid(where, "not the credential of a bundled transaction's "
                                           "signer")
            raise BundleInvalid(where, "credentials are listed once each, in ascending key "
                                       "id order")
        if len(given) < len(expected):
            missing = expected[len(given)]
            raise BundleInvalid("credentials", f"lacks the credential of {missing.agency}/"
                                               f"{missing.subject} (key "
                                               f"{missing.key_id.hex()}), a bundled "
                                               "transaction's signer")

    # -- reveals and answers in chunks ------------------------------------------------
    def _tx_items(self) -> list[tuple[str, evidence_pb2.BundledTransaction, OpenedEnvelope]]:
        return [(f"transactions[{i}]", b, self.opened[f"transactions[{i}]"])
                for i, b in enumerate(self.bundle.transactions)]

    def _check_reveals(self, report: BundleReport) -> None:
        place: dict[bytes, tuple[int, int, str]] = {}
        for name, b, opened in self._tx_items():
            place.setdefault(opened.tx_id, (b.height, b.index, name))
        previous: tuple[int, int, str] | None = None
        for i, rev in enumerate(self.bundle.reveals):
            where = f"reveals[{i}]"
            tid = bytes(rev.tx_id)
            if tid not in place:
                raise BundleInvalid(where, f"reveals tx {tid.hex()[:16]}, which is not in the "
                                           "bundle")
            height, index, name = place[tid]
            if rev.part != "":
                raise BundleInvalid(where, f"part {rev.part!r} is not defined: version 1 "
                                           "reveals a transaction's own commitment (part "
                                           "\"\"); a chunk is revealed as its answer_chunk "
                                           "transaction")
            body = self.opened[name].body
            commitment = _commitments(body).get(rev.part)
            if commitment is None:
                what = ("an answer in several chunks is revealed chunk by chunk"
                        if body.WhichOneof("kind") == "answer_manifest" else
                        "the transaction commits to no payload")
                raise BundleInvalid(where, f"tx {tid.hex()[:16]} has no commitment to "
                                           f"reveal: {what}")
            if len(rev.salt) != 32:
                raise BundleInvalid(where, f"the salt is {len(rev.salt)} bytes, not 32")
            if hashlib.sha256(bytes(rev.salt) + bytes(rev.plaintext)).digest() != commitment:
                raise BundleInvalid(where, "SHA-256(salt + plaintext) is not the committed "
                                           "digest: the salt or the plaintext is not the "
                                           "committed one")
            key = (height, index, rev.part)
            if previous is not None and key <= previous:
                raise BundleInvalid(where, "reveals are listed once each, in the chain order "
                                           "of the transactions they reveal")
            previous = key
            self.verified[name].revealed = True
            report.reveals += 1
        for name, _, opened in self._tx_items():  # every copy of a revealed tx id
            self.verified[name].revealed = self.verified[place[opened.tx_id][2]].revealed

    def _check_chunks(self, report: BundleReport) -> None:
        """Chunks of an answer bundled with its manifest are the ones it lists, and when
        all are bundled their commitments hash to the manifest's commitment."""
        ok = [(n, b, o) for n, b, o in self._tx_items() if b.result_code == RESULT_OK]
        chunks: dict[bytes, dict[int, tuple[str, OpenedEnvelope]]] = {}
        for name, _, o in ok:
            if o.kind == "answer_chunk":
                c = o.body.answer_chunk
                chunks.setdefault(bytes(c.query_tx_id), {}).setdefault(c.index, (name, o))
        for name, _, o in ok:
            if o.kind != "answer_manifest" or o.body.answer_manifest.chunk_count <= 1:
                continue
            m = o.body.answer_manifest
            listed = [bytes(d) for d in m.chunk_digests]
            have = chunks.get(bytes(m.query_tx_id), {})
            for index, (chunk_name, chunk) in sorted(have.items()):
                if index >= len(listed) or listed[index] != chunk.tx_id:
                    raise BundleInvalid(chunk_name, f"chunk {index} of the answer is not the "
                                                    f"chunk the manifest {name} lists")
            if len(have) == len(listed):
                commitments = [bytes(have[i][1].body.answer_chunk.sealed.commitment)
                               for i in range(len(listed))]
                if chunks_commitment(commitments) != bytes(m.commitment):
                    raise BundleInvalid(name, "commitment is not the hash of its chunks' "
                                              "commitments")
                self.verified[name].revealed = all(self.verified[have[i][0]].revealed
                                                   for i in range(len(listed)))

    def _check_findings_chunks(self) -> None:
        """A findings chunk bundled with its run (the run of the same agency, rule,
        period and inputs) is one the run names, at the chunk's place. (The run's output
        digest is over all its chunks' plaintexts: a reader with every chunk revealed can
        check it; docs/evidence-bundle.md.)"""
        from exchange.ledger.findings import inputs_digest

        ok = [(n, b, o) for n, b, o in self._tx_items() if b.result_code == RESULT_OK]
        runs: dict[tuple[str, bytes, str, bytes], tuple[str, list[bytes]]] = {}
        for name, _, o in ok:
            if o.kind == "findings":
                f = o.body.findings
                key = (o.body.agency, bytes(f.rule_digest), f.period,
                       inputs_digest([bytes(t) for t in f.input_tx_ids]))
                runs[key] = (name, [bytes(t) for t in f.chunk_tx_ids])
        for name, _, o in ok:
            if o.kind != "findings_chunk":
                continue
            c = o.body.findings_chunk
            run = runs.get((o.body.agency, bytes(c.rule_digest), c.period,
                            bytes(c.run_inputs_digest)))
            if run is None:
                continue  # its run is not bundled: nothing to hold it against
            listed = run[1]
            if c.index >= len(listed) or listed[c.index] != o.tx_id:
                raise BundleInvalid(name, f"findings chunk {c.index} is not the chunk "
                                          f"{run[0]} names at that place")

    # -- case statements and the headers' span ------------------------------------------
    def _statement_height(self) -> int | None:
        if not len(self.bundle.case_statements):
            return None
        try:
            return evidence_pb2.CaseStatement.FromString(
                self.bundle.case_statements[0].statement).height
        except DecodeError:
            return None  # refused, naming the statement, by _check_case_statements

    def _check_case_statements(self) -> dict[str, object]:
        """A quorum of members' identical, signed statements of the case's count and
        running hash at a height, and the bundle's own transactions of the case give the
        same."""
        from exchange.ledger.casechain import EMPTY, case_named, extend

        raw = bytes(self.bundle.case_statements[0].statement)
        try:
            st = evidence_pb2.CaseStatement.FromString(raw)
        except DecodeError as exc:
            raise BundleInvalid("case_statements[0]", f"does not parse: {exc}") from exc
        if st.height > self.headers_count:
            raise BundleInvalid("case_statements[0]", f"stated at height {st.height}, beyond "
                                                      "the bundle's headers")
        agencies: list[str] = []
        for i, signed in enumerate(self.bundle.case_statements):
            where = f"case_statements[{i}]"
            if bytes(signed.statement) != raw:
                raise BundleInvalid(where, "the members' statements differ")
            if signed.agency not in self.stated_members:
                raise BundleInvalid(where, f"{signed.agency!r} is not a member at height "
                                           f"{st.height}")
            try:
                node = self.registry.node_key_at(signed.agency, bytes(signed.signer_key_id),
                                                 st.height)
                verify(node.public_key, Domain.CASE_STATEMENT, self.chain_id, raw,
                       bytes(signed.signature))
            except ExchangeError as exc:
                raise BundleInvalid(where, str(exc)) from exc
            if agencies and signed.agency <= agencies[-1]:
                raise BundleInvalid(where, f"{signed.agency} states twice" if signed.agency
                                    == agencies[-1] else "statements are in ascending agency "
                                                         "order")
            agencies.append(signed.agency)
        if len(agencies) < self.stated_quorum:
            raise BundleInvalid("case_statements", f"{len(agencies)} members state the case; "
                                                   f"{self.stated_quorum} are needed")
        ordered = [(b, o) for _, b, o in self._tx_items()
                   if b.result_code == RESULT_OK and b.height <= st.height]
        query_case = {o.tx_id: o.body.query.case_id for _, o in ordered if o.kind == "query"}
        count, running = 0, EMPTY
        for _, o in ordered:
            if case_named(o.body, query_case.get) == st.case_id:
                count += 1
                running = extend(running, o.tx_id)
        if (count, running) != (st.count, bytes(st.running_hash)):
            raise BundleInvalid("case_statements", f"case {st.case_id}: the bundle holds "
                                                   f"{count} of its transactions up to height "
                                                   f"{st.height}, the members state {st.count}; "
                                                   "a transaction of the case is missing, or "
                                                   "one was swapped")
        return {"case_id": st.case_id, "height": st.height, "count": st.count,
                "complete": True, "stated_by": agencies}

    def _check_header_span(self) -> None:
        """Headers run from 1 to the highest bundled transaction (or the case
        statement's height, if higher), and no further; only blocks that hold a bundled
        transaction or key history entry carry attestations."""
        holding = {e.tx.height for e in self.entries}
        for pos, bh in enumerate(self.bundle.headers):
            if len(bh.attestations) and pos + 1 not in holding:
                raise BundleInvalid(f"headers[{pos}].attestations[0]",
                                    f"block {pos + 1} holds no bundled transaction or key "
                                    "history entry, so it carries no attestations")
        top = max([b.height for b in self.bundle.transactions]
                  + [self.statement_height or 0], default=0)
        if self.headers_count > top:
            raise BundleInvalid(f"headers[{top}]", f"height {top + 1} is beyond every bundled "
                                                   f"transaction (the highest is at {top})")


def _commitments(body: ledger_pb2.TxBody) -> dict[str, bytes]:
    """The salted commitments a reveal may name, by part: a transaction's own payload."""
    kind = body.WhichOneof("kind")
    out: dict[str, bytes] = {}
    if kind == "query":
        out[""] = bytes(body.query.sealed_request.commitment)
    elif kind == "answer_manifest" and body.answer_manifest.chunk_count <= 1:
        out[""] = bytes(body.answer_manifest.commitment)
    elif kind == "answer_chunk":
        out[""] = bytes(body.answer_chunk.sealed.commitment)
    elif kind == "findings":
        out[""] = bytes(body.findings.sealed_output.commitment)
    elif kind == "findings_chunk":
        out[""] = bytes(body.findings_chunk.sealed_output.commitment)
    return {k: v for k, v in out.items() if v}


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
