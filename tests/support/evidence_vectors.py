"""Conformance vectors of the evidence bundle format (docs/evidence-vectors/).

`python -m tests.support.evidence_vectors --out docs/evidence-vectors` runs a real four-node
cluster (exchange.testing.localnet), drives it through the CLI as people do (a cross-query whose
answer comes in several chunks, a node key rotation, a fifth agency joining by a
quorum's approval), exports genuine bundles from a node's block store, derives tampered
ones from them, and writes vectors.json: each file with the verdict and the part a
verifier must name. Keys are fresh each run, so the bytes differ from run to run while
the manifest keeps its shape; tests/unit/ledger/test_evidence_vectors.py checks the committed files.

No private key is written to the output: bundles hold public keys, signatures, sealed
payloads and the reveals an agency chose to make.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exchange.identity.keys import read_data_key
from exchange.ledger.block import RESULT_OK, open_envelope
from exchange.ledger.case_export import reveals_for
from exchange.ledger.evidence import BundleInvalid, build_bundle, encode_bundle
from exchange.ledger.evidence_verify import decode_bundle, verify_bundle
from exchange.ledger.store import BlockStore
from exchange.testing.localnet import Cluster
from exchange.v1 import evidence_pb2, identity_pb2, ledger_pb2

SEED = 5
COMPANIES = 100
CHUNK_BYTES = 256  # the smallest a node accepts: every answer of two rows is chunked
CASE = "CASE-VECTORS-1"
JOINER = "market"
WAIT_S = 90.0
RANDOM_ENTRY_BYTES = 1024


@dataclass
class Vector:
    file: str
    verdict: str  # "valid" or "invalid"
    part: str  # the `where` a refusal names ("" when valid)
    about: str
    error_contains: str = ""


def _ok(result: object) -> str:
    code = getattr(result, "returncode")  # noqa: B009
    if code != 0:
        raise RuntimeError(getattr(result, "stderr"))  # noqa: B009
    return str(getattr(result, "stdout"))  # noqa: B009


def _wait(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.3)


def _company_with_accounts(data: Path) -> str:
    """A company holding at least two accounts (an answer of several rows)."""
    with open(data / "pboc" / "accounts.csv", encoding="utf-8") as f:
        counts: dict[str, int] = {}
        for row in csv.DictReader(f):
            if row["holder_kind"] == "company":
                counts[row["holder_id"]] = counts.get(row["holder_id"], 0) + 1
    best = max(sorted(counts), key=lambda u: counts[u])
    if counts[best] < 2:
        raise RuntimeError("no company with two accounts in the sample")
    return best


def _members(cluster: Cluster, agency: str) -> list[str]:
    st = cluster.status(agency)
    return sorted(st.members) if st is not None else []


def drive(cluster: Cluster, work: Path) -> dict[str, object]:
    """The network's history the vectors are cut from; the tx ids that matter."""
    data = cluster.load_sample(SEED, COMPANIES)
    cluster.edit_node_config("pboc", "answer_chunk_bytes = 524288",
                             f"answer_chunk_bytes = {CHUNK_BYTES}")
    cluster.start()
    company = _company_with_accounts(data)
    answer = cluster.cli_json("query", "--to", "pboc", "--dataset", "accounts", "--subject",
                              f"uscc={company}", "--case", CASE, "--purpose",
                              "conformance vector: an answer in chunks", "--wait")
    assert isinstance(answer, dict) and answer["status"] == "answered", answer

    customs = cluster.net / "customs"
    old = (customs / "keys" / "node.key").read_bytes()
    _ok(cluster.cli("agency", "rotate", "--kind", "node", "--agency-dir", str(customs),
                    agency="customs"))
    _wait("customs switched its node key",
          lambda: (customs / "keys" / "node.key").read_bytes() != old)
    after_rotation = json.loads(_ok(cluster.cli("submit-probe", "--json", "--timeout", "20",
                                                agency="customs")))

    request = cluster.prepare_joiner(JOINER)
    change = work / "add.pb"
    _ok(cluster.cli("membership", "propose", "--add", str(request), "--out", str(change)))
    approvals = []
    for agency in ("customs", "police", "tax"):
        path = work / f"{agency}.approval"
        _ok(cluster.run_exchange("membership", "approve", str(change), "--agency-dir",
                                 str(cluster.net / agency), "--out", str(path)))
        approvals.append(str(path))
    cluster.start_node(JOINER)
    _ok(cluster.cli("membership", "submit", str(change), *approvals, "--agency-dir",
                    str(cluster.net / "tax")))
    five = sorted(["customs", JOINER, "pboc", "police", "tax"])
    _wait("every node sees five members",
          lambda: all(_members(cluster, a) == five for a in cluster.agencies))
    by_joiner = json.loads(_ok(cluster.cli("submit-probe", "--json", "--timeout", "30",
                                           agency=JOINER)))
    cluster.wait_height(int(by_joiner["height"]), timeout_s=WAIT_S)
    # the case export, with a quorum of members' statements, through the CLI
    case_bundle = work / "case.evidence"
    _ok(cluster.cli("evidence", "export", "--store", str(_store_path(cluster)), "--case",
                    CASE, "--reveal-with", str(cluster.net / "tax" / "keys" / "data.key"),
                    "--out", str(case_bundle)))
    return {"answer": answer, "after_rotation": after_rotation, "by_joiner": by_joiner,
            "case_bundle": case_bundle}


def _store_path(cluster: Cluster) -> Path:
    return cluster.net / "tax" / "data" / "blocks.db"


def _tx_of_kind(store: BlockStore, kind: str) -> bytes:
    chain_id = store.signed_genesis_chain_id()
    for height in range(1, store.height + 1):
        for raw, code in zip(store.envelopes(height), store.results(height), strict=True):
            opened = open_envelope(raw, chain_id)
            if opened.kind == kind and code == RESULT_OK:
                return opened.tx_id
    raise LookupError(f"no {kind} on the chain")


# -- tampering --------------------------------------------------------------------------
def _copy(bundle: evidence_pb2.EvidenceBundle) -> evidence_pb2.EvidenceBundle:
    out = evidence_pb2.EvidenceBundle()
    out.CopyFrom(bundle)
    return out


def _flip(data: bytes, offset: int) -> bytes:
    bad = bytearray(data)
    bad[offset] ^= 0x01
    return bytes(bad)


def _offset_of(data: bytes, needle: bytes) -> int:
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "needle must occur once"
    return at


def tampered(genuine: dict[str, bytes], foreign_genesis: identity_pb2.SignedGenesis
             ) -> list[tuple[str, bytes, str, str]]:
    """(file name, bytes, part the refusal names, what was done)."""
    out: list[tuple[str, bytes, str, str]] = []
    rot = decode_bundle(genuine["key-rotation.evidence"])
    case = decode_bundle(genuine["answer-in-chunks.evidence"])
    joined = decode_bundle(genuine["membership-change.evidence"])

    def add(name: str, bundle: evidence_pb2.EvidenceBundle | bytes, part: str,
            about: str) -> None:
        data = bundle if isinstance(bundle, bytes) else encode_bundle(bundle)
        out.append((name, data, part, about))

    top = len(rot.headers)
    for label, height in (("zero", 0), ("beyond-tip", top + 1), ("2p63", 1 << 63)):
        b = _copy(rot)
        b.key_history.append(evidence_pb2.BundledTransaction(
            envelope=os.urandom(RANDOM_ENTRY_BYTES), height=height, index=0,
            result_code=RESULT_OK))
        add(f"bad-key-history-height-{label}.evidence", b,
            f"key_history[{len(rot.key_history)}]",
            f"a key_history entry of {RANDOM_ENTRY_BYTES} random bytes at height {height}")

    b = _copy(rot)
    entry = b.key_history[-1]
    env = ledger_pb2.Envelope.FromString(entry.envelope)
    body = ledger_pb2.TxBody.FromString(env.body)
    body.key_rotation.new_public_key = os.urandom(32)
    forged = ledger_pb2.Envelope(body=body.SerializeToString(deterministic=True),
                                 signer_key_id=env.signer_key_id, signature=bytes(64))
    entry.envelope = forged.SerializeToString(deterministic=True)
    add("bad-key-history-forged-rotation.evidence", b, f"key_history[{len(b.key_history) - 1}]",
        "the key rotation replaced by an unsigned one for another key, at the same place")

    b = _copy(rot)
    b.key_history.append(b.transactions[-1])
    add("bad-key-history-not-a-key-change.evidence", b, f"key_history[{len(rot.key_history)}]",
        "a probe (not a key change) appended to key_history")

    b = _copy(joined)
    b.key_history.append(b.key_history[-1])
    add("bad-key-history-duplicate.evidence", b, f"key_history[{len(joined.key_history)}]",
        "the last key_history entry twice")

    b = _copy(joined)
    first, last = _copy_tx(b.key_history[0]), _copy_tx(b.key_history[-1])
    b.key_history[0].CopyFrom(last)
    b.key_history[-1].CopyFrom(first)
    add("bad-key-history-order.evidence", b, "key_history[1]",
        "the first and last key_history entries swapped")

    b = _copy(joined)
    rotation = next(i for i, e in enumerate(b.key_history)
                    if open_envelope(e.envelope, _chain(b)).kind == "key_rotation")
    del b.key_history[rotation]
    add("bad-key-history-trimmed.evidence", b, "key_history",
        "the node key rotation left out of key_history")

    b = _copy(case)
    b.transactions.append(b.transactions[-1])
    add("bad-transactions-duplicate.evidence", b, f"transactions[{len(case.transactions)}]",
        "the last transaction twice")

    b = _copy(case)
    first, last = _copy_tx(b.transactions[0]), _copy_tx(b.transactions[-1])
    b.transactions[0].CopyFrom(last)
    b.transactions[-1].CopyFrom(first)
    add("bad-transactions-order.evidence", b, "transactions[1]",
        "the first and last transactions swapped")

    b = _copy(case)
    b.reveals.append(b.reveals[-1])
    add("bad-reveals-duplicate.evidence", b, f"reveals[{len(case.reveals)}]",
        "the last reveal twice")

    b = _copy(case)
    revs = list(b.reveals)
    del b.reveals[:]
    b.reveals.extend(reversed(revs))
    add("bad-reveals-order.evidence", b, "reveals[1]", "the reveals in reverse order")

    b = _copy(case)
    b.reveals[0].part = "chunk:0"
    add("bad-reveal-part.evidence", b, "reveals[0]", "a reveal naming part chunk:0")

    data = genuine["answer-in-chunks.evidence"]
    add("bad-reveal-salt.evidence", _flip(data, _offset_of(data, bytes(case.reveals[0].salt))),
        "reveals[0]", "one bit of the first reveal's salt flipped")
    if case.reveals[0].plaintext:
        add("bad-reveal-plaintext.evidence",
            _flip(data, _offset_of(data, bytes(case.reveals[0].plaintext))), "reveals[0]",
            "one bit of the first reveal's plaintext flipped")

    b = _copy(joined)
    b.credentials.append(b.credentials[-1])
    add("bad-credentials-duplicate.evidence", b, f"credentials[{len(joined.credentials)}]",
        "the last credential twice")

    b = _copy(rot)
    b.genesis.signatures.append(b.genesis.signatures[0])
    add("bad-genesis-signature-duplicate.evidence", b, "genesis",
        "a genesis signature twice")

    b = _copy(rot)
    sigs = list(b.genesis.signatures)
    del b.genesis.signatures[:]
    b.genesis.signatures.extend(reversed(sigs))
    add("bad-genesis-signature-order.evidence", b, "genesis",
        "the genesis signatures in descending agency order")

    b = _copy(rot)
    b.genesis.CopyFrom(foreign_genesis)
    add("bad-genesis-swapped.evidence", b, "genesis",
        "the genesis of another network (chain 'vectors-foreign')")

    b = _copy(rot)
    h = _height_of(b, b.transactions[-1])
    other = _height_of(b, b.key_history[-1])
    att = b.headers[h - 1].attestations[0]
    att.CopyFrom(next(a for a in b.headers[other - 1].attestations if a.agency == att.agency))
    add("bad-attestation-of-another-block.evidence", b,
        f"headers[{h - 1}].attestations[0]",
        "an attestation replaced by the same agency's attestation of another block")

    b = _copy(rot)
    b.headers.append(b.headers[-1])
    add("bad-headers-beyond-transactions.evidence", b, f"headers[{len(rot.headers)}]",
        "a header appended past the highest transaction")

    b = _copy(rot)
    b.version = 2
    add("bad-version.evidence", b, "version", "format version 2")

    data = genuine["key-rotation.evidence"]
    add("bad-file-unknown-field.evidence", data + b"\xf8\x07\x01", "file",
        "an unknown field (127) appended")
    return out


def _copy_tx(t: evidence_pb2.BundledTransaction) -> evidence_pb2.BundledTransaction:
    out = evidence_pb2.BundledTransaction()
    out.CopyFrom(t)
    return out


def _chain(bundle: evidence_pb2.EvidenceBundle) -> str:
    return identity_pb2.Genesis.FromString(bundle.genesis.genesis).chain_id


def _height_of(bundle: evidence_pb2.EvidenceBundle, t: evidence_pb2.BundledTransaction) -> int:
    assert 1 <= t.height <= len(bundle.headers)
    return int(t.height)


# -- the whole run ---------------------------------------------------------------------
def generate(out: Path) -> list[Vector]:
    from tests.support.ledger_net import make_net

    work = Path(tempfile.mkdtemp(prefix="evidence-vectors-"))
    cluster = Cluster(work / "cluster")
    try:
        cluster.init()
        facts = drive(cluster, work)
        genuine: dict[str, bytes] = {}
        tax_key = read_data_key(cluster.net / "tax" / "keys" / "data.key")
        with BlockStore.open(_store_path(cluster)) as store:
            rotation = _tx_of_kind(store, "key_rotation")
            change = _tx_of_kind(store, "membership_change")
            probe = bytes.fromhex(str(facts["after_rotation"]["tx_id"]))  # type: ignore[index]
            joiner = bytes.fromhex(str(facts["by_joiner"]["tx_id"]))  # type: ignore[index]
            genuine["key-rotation.evidence"] = encode_bundle(
                build_bundle(store, [rotation, probe]))
            genuine["membership-change.evidence"] = encode_bundle(
                build_bundle(store, [rotation, change, joiner]))
            answer = facts["answer"]
            ids = [bytes.fromhex(answer["query"]),  # type: ignore[index]
                   bytes.fromhex(answer["outcome_tx"])]  # type: ignore[index]
            bundle = build_bundle(store, ids)
            manifest = open_envelope(bundle.transactions[-1].envelope, _chain(bundle))
            ids += [bytes(d) for d in manifest.body.answer_manifest.chunk_digests]
            genuine["answer-in-chunks-no-statements.evidence"] = encode_bundle(
                build_bundle(store, ids, reveals_for(store, ids, tax_key)))
        genuine["answer-in-chunks.evidence"] = Path(str(facts["case_bundle"])).read_bytes()
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.evidence"):
        old.unlink()
    vectors = []
    about = {
        "key-rotation.evidence": "customs rotates its node key; a probe customs signs after",
        "membership-change.evidence": "the rotation, a fifth agency (market) admitted by a "
                                      "quorum's approvals, and a probe by market's analyst",
        "answer-in-chunks.evidence": "the case export (exchange evidence export --case): a "
                                     "query, its answer in several chunks with every chunk "
                                     "revealed",
        "answer-in-chunks-no-statements.evidence": "the query, the manifest and every chunk, "
                                                   "revealed, without case statements",
    }
    for name, data in genuine.items():
        verify_bundle(data)
        (out / name).write_bytes(data)
        vectors.append(Vector(name, "valid", "", about[name]))
    foreign = make_net(chain_id="vectors-foreign").signed_genesis
    for name, data, part, what in tampered(genuine, foreign):
        try:
            verify_bundle(data)
        except BundleInvalid as exc:
            if exc.where != part:
                raise AssertionError(f"{name}: refused at {exc.where} ({exc}), expected "
                                     f"{part}") from exc
            (out / name).write_bytes(data)
            vectors.append(Vector(name, "invalid", part, what,
                                  error_contains=str(exc).split(": ", 1)[1][:60]))
            continue
        raise AssertionError(f"{name} verified")
    (out / "vectors.json").write_text(json.dumps(
        {"format": "EXCHANGE-EVIDENCE/1",
         "vectors": [v.__dict__ for v in vectors]}, indent=2, ensure_ascii=False) + "\n")
    return vectors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/evidence-vectors"))
    args = parser.parse_args()
    vectors = generate(args.out)
    for v in vectors:
        print(f"{v.verdict:8} {v.part or '-':40} {v.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
