"""The conformance vectors of docs/evidence-vectors/: the reference verifier judges every
vector as vectors.json says (verdict and the part named), the genuine ones hold what the
format document promises they hold, and any changed byte of a genuine one is refused,
naming the part that holds it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.ledger.block import RESULT_OK, open_envelope
from exchange.ledger.evidence import BundleInvalid
from exchange.ledger.evidence_verify import decode_bundle, verify_bundle
from tests.unit.ledger.test_evidence import _assert_refused_naming, part_map

VECTORS = Path(__file__).resolve().parents[3] / "docs" / "evidence-vectors"
MANIFEST = json.loads((VECTORS / "vectors.json").read_text())["vectors"]
GENUINE = [v["file"] for v in MANIFEST if v["verdict"] == "valid"]
FLIPS_PER_BUNDLE = 1000


def _data(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def test_every_file_is_in_the_manifest_and_both_verdicts_occur() -> None:
    assert sorted(p.name for p in VECTORS.glob("*.evidence")) == sorted(
        v["file"] for v in MANIFEST)
    assert {v["verdict"] for v in MANIFEST} == {"valid", "invalid"}


@pytest.mark.parametrize("vector", MANIFEST, ids=[v["file"] for v in MANIFEST])
def test_the_verifier_judges_each_vector_as_the_manifest_says(vector: dict[str, str]) -> None:
    data = _data(vector["file"])
    if vector["verdict"] == "valid":
        verify_bundle(data)
        return
    with pytest.raises(BundleInvalid) as err:
        verify_bundle(data)
    assert err.value.where == vector["part"], str(err.value)
    assert vector["error_contains"] in str(err.value)


def _kinds(name: str, field: str) -> list[str]:
    bundle = decode_bundle(_data(name))
    chain_id = verify_bundle(_data(name)).chain_id
    return [open_envelope(t.envelope, chain_id).kind for t in getattr(bundle, field)]


def test_genuine_vectors_hold_a_rotation_a_membership_change_and_a_chunked_answer() -> None:
    assert "key_rotation" in _kinds("key-rotation.evidence", "key_history")
    history = _kinds("membership-change.evidence", "key_history")
    assert "key_rotation" in history and "membership_change" in history
    report = verify_bundle(_data("membership-change.evidence"))
    assert report.members == ["customs", "market", "pboc", "police", "tax"]
    assert report.transactions[-1].signer.startswith("market/")
    assert report.transactions[-1].quorum == 4  # 4 of the 5 members attest its block

    case = verify_bundle(_data("answer-in-chunks.evidence"))
    assert case.case is not None and case.case["complete"] is True
    manifest = next(t for t in case.transactions if t.kind == "answer_manifest")
    chunks = [t for t in case.transactions if t.kind == "answer_chunk"]
    assert manifest.summary["chunk_count"] == len(chunks) > 1
    assert manifest.result == RESULT_OK and manifest.revealed
    assert all(c.revealed for c in chunks)


@pytest.mark.parametrize("name", GENUINE)
def test_any_changed_byte_of_a_genuine_vector_is_refused_naming_its_part(name: str) -> None:
    data = _data(name)
    parts = part_map(data)

    @settings(max_examples=FLIPS_PER_BUNDLE, deadline=None, derandomize=True)
    @given(st.integers(0, len(data) - 1), st.integers(1, 255))
    def changed(offset: int, mask: int) -> None:
        _assert_refused_naming(data, offset, mask, parts)

    changed()
