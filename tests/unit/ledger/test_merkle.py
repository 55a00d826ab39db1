"""The RFC 9162 Merkle tree: published vectors, a reference built from the RFC, properties."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exchange.ledger import merkle
from exchange.ledger.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    consistency_proof,
    consistency_proof_from_leaf_hashes,
    inclusion_proof,
    inclusion_proof_from_leaf_hashes,
    leaf_hash,
    node_hash,
    root,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
    verify_inclusion_by_hash,
)

# ---------------------------------------------------------------------------------------
# Published vectors.
#
# Data (hex strings only) copied from google/certificate-transparency,
# cpp/merkletree/merkle_tree_test.cc (kInputs, kSHA256EmptyTreeHash, kSHA256Roots,
# kSHA256Paths, kSHA256Proofs), which agree with transparency-dev/merkle,
# proof/verify_test.go (leaves, roots, inclusionProofs, consistencyProofs); the 6 -> 7
# consistency proof is only in the latter. Both number leaves from 1 in their path
# vectors; the indices below are 0-based. The hasher vectors are from
# transparency-dev/merkle, rfc6962/rfc6962_test.go.
# ---------------------------------------------------------------------------------------

CT_LEAVES_HEX = [
    "",
    "00",
    "10",
    "2021",
    "3031",
    "40414243",
    "5051525354555657",
    "606162636465666768696a6b6c6d6e6f",
]
CT_LEAVES = [bytes.fromhex(h) for h in CT_LEAVES_HEX]

# CT_ROOTS_HEX[n] is the root of the tree over the first n leaves.
CT_ROOTS_HEX = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
CT_ROOTS = [bytes.fromhex(h) for h in CT_ROOTS_HEX]

# (index, tree size, audit path)
CT_INCLUSION_PROOFS_HEX: list[tuple[int, int, list[str]]] = [
    (0, 1, []),
    (
        0,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        5,
        8,
        [
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        3,
        ["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
    ),
    (
        1,
        5,
        [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
]

# (old size, new size, consistency proof)
CT_CONSISTENCY_PROOFS_HEX: list[tuple[int, int, list[str]]] = [
    (1, 1, []),
    (
        1,
        8,
        [
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
    ),
    (
        6,
        8,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
    (
        2,
        5,
        [
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        ],
    ),
    (
        6,
        7,
        [
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        ],
    ),
]

HASHER_LEAF_L123456_HEX = "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
HASHER_NODE_N123_N456_HEX = "aa217fe888e47007fa15edab33c2b492a722cb106c64667fc2b044444de66bbb"


def _hexes(hexes: Sequence[str]) -> list[bytes]:
    return [bytes.fromhex(h) for h in hexes]


# ---------------------------------------------------------------------------------------
# A reference written straight from RFC 9162 2.1.1, 2.1.3.1 and 2.1.4.1: recursive and
# slicing, deliberately naive, sharing nothing with the module under test.
# ---------------------------------------------------------------------------------------


def _ref_k(n: int) -> int:
    """The largest power of two smaller than n."""
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: Sequence[bytes]) -> bytes:
    n = len(d)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _ref_k(n)
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: Sequence[bytes]) -> list[bytes]:
    n = len(d)
    if n == 1:
        return []
    k = _ref_k(n)
    if m < k:
        return ref_path(m, d[:k]) + [ref_mth(d[k:])]
    return ref_path(m - k, d[k:]) + [ref_mth(d[:k])]


def ref_subproof(m: int, d: Sequence[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _ref_k(n)
    if m <= k:
        return ref_subproof(m, d[:k], b) + [ref_mth(d[k:])]
    return ref_subproof(m - k, d[k:], False) + [ref_mth(d[:k])]


def ref_proof(m: int, d: Sequence[bytes]) -> list[bytes]:
    return ref_subproof(m, d, True)


# ---------------------------------------------------------------------------------------
# Helpers for negative checks.
# ---------------------------------------------------------------------------------------


def _flip_bit(proof: Sequence[bytes], element: int, bit: int) -> list[bytes]:
    flipped = bytearray(proof[element])
    flipped[bit // 8] ^= 1 << (bit % 8)
    out = list(proof)
    out[element] = bytes(flipped)
    return out


def _unique_leaves(rng: random.Random, count: int) -> list[bytes]:
    """Distinct leaves of random length and content (the index prefix keeps them distinct)."""
    return [i.to_bytes(4, "big") + rng.randbytes(rng.randrange(0, 24)) for i in range(count)]


SOME_HASH = bytes.fromhex("abacaba000000000000000000000000000000000000000000060061e00123456")


def _inclusion_corruptions(
    index: int, size: int, proof: list[bytes], root_hash: bytes
) -> list[tuple[str, int, int, list[bytes], bytes]]:
    """Variants of a valid inclusion claim that must each fail (same leaf)."""
    out: list[tuple[str, int, int, list[bytes], bytes]] = [
        ("index - 1", index - 1, size, proof, root_hash),
        ("index + 1", index + 1, size, proof, root_hash),
        ("size * 2", index, size * 2, proof, root_hash),
        ("size 0", index, 0, proof, root_hash),
        ("empty-tree root", index, size, proof, EMPTY_ROOT),
        ("other root", index, size, proof, SOME_HASH),
        ("trailing element", index, size, [*proof, SOME_HASH], root_hash),
        ("trailing root", index, size, [*proof, root_hash], root_hash),
        ("trailing empty", index, size, [*proof, b""], root_hash),
        ("preceding element", index, size, [SOME_HASH, *proof], root_hash),
        ("preceding root", index, size, [root_hash, *proof], root_hash),
    ]
    if proof:
        out.append(("truncated", index, size, proof[:-1], root_hash))
        out.append(("first removed", index, size, proof[1:], root_hash))
        out.append(("short element", index, size, [proof[0][:31], *proof[1:]], root_hash))
        out.append(("long element", index, size, [proof[0] + b"\x00", *proof[1:]], root_hash))
    if len(proof) > 1:
        out.append(("inserted", index, size, [proof[0], SOME_HASH, *proof[1:]], root_hash))
        out.append(("swapped", index, size, [proof[1], proof[0], *proof[2:]], root_hash))
    return out


def _consistency_corruptions(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> list[tuple[str, int, int, bytes, bytes, list[bytes]]]:
    """Variants of a valid non-trivial consistency claim that must each fail."""
    out: list[tuple[str, int, int, bytes, bytes, list[bytes]]] = [
        ("old_size - 1", old_size - 1, new_size, old_root, new_root, proof),
        ("old_size + 1", old_size + 1, new_size, old_root, new_root, proof),
        ("new_size * 2", old_size, new_size * 2, old_root, new_root, proof),
        ("new_size < old_size", old_size, old_size - 1, old_root, new_root, proof),
        ("other old root", old_size, new_size, SOME_HASH, new_root, proof),
        ("other new root", old_size, new_size, old_root, SOME_HASH, proof),
        ("swapped roots", old_size, new_size, new_root, old_root, proof),
        ("empty proof", old_size, new_size, old_root, new_root, []),
        ("trailing element", old_size, new_size, old_root, new_root, [*proof, SOME_HASH]),
        ("trailing old root", old_size, new_size, old_root, new_root, [*proof, old_root]),
        ("trailing new root", old_size, new_size, old_root, new_root, [*proof, new_root]),
        ("trailing empty", old_size, new_size, old_root, new_root, [*proof, b""]),
        ("preceding old root", old_size, new_size, old_root, new_root, [old_root, *proof]),
        ("preceding new root", old_size, new_size, old_root, new_root, [new_root, *proof]),
        ("preceding proof[0]", old_size, new_size, old_root, new_root, [proof[0], *proof]),
        ("truncated", old_size, new_size, old_root, new_root, proof[:-1]),
        ("first removed", old_size, new_size, old_root, new_root, proof[1:]),
    ]
    if len(proof) > 1:
        swapped = [proof[1], proof[0], *proof[2:]]
        if swapped != proof:
            out.append(("swapped", old_size, new_size, old_root, new_root, swapped))
    return out


def _assert_inclusion_sound(
    leaf: bytes, index: int, size: int, proof: list[bytes], root_hash: bytes
) -> None:
    assert verify_inclusion(leaf, index, size, proof, root_hash)
    assert not verify_inclusion(leaf + b"x", index, size, proof, root_hash)
    for desc, i, n, p, r in _inclusion_corruptions(index, size, proof, root_hash):
        assert not verify_inclusion(leaf, i, n, p, r), desc


def _assert_consistency_sound(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: list[bytes]
) -> None:
    assert verify_consistency(old_size, new_size, old_root, new_root, proof)
    if not proof:
        return
    for desc, m, n, r1, r2, p in _consistency_corruptions(
        old_size, new_size, old_root, new_root, proof
    ):
        assert not verify_consistency(m, n, r1, r2, p), desc


# ---------------------------------------------------------------------------------------
# Published vectors.
# ---------------------------------------------------------------------------------------


def test_hashes_match_published_rfc6962_hasher_vectors() -> None:
    assert EMPTY_ROOT.hex() == CT_ROOTS_HEX[0]
    assert leaf_hash(b"").hex() == CT_ROOTS_HEX[1]
    assert leaf_hash(b"L123456").hex() == HASHER_LEAF_L123456_HEX
    assert node_hash(b"N123", b"N456").hex() == HASHER_NODE_N123_N456_HEX


@pytest.mark.parametrize("size", range(9))
def test_root_matches_published_vector_for_every_size_0_to_8(size: int) -> None:
    leaves = CT_LEAVES[:size]
    assert root(leaves) == CT_ROOTS[size]
    assert root_from_leaf_hashes([leaf_hash(x) for x in leaves]) == CT_ROOTS[size]
    assert MerkleTree.from_leaves(leaves).root == CT_ROOTS[size]
    assert ref_mth(leaves) == CT_ROOTS[size]


@pytest.mark.parametrize(("index", "size", "path_hex"), CT_INCLUSION_PROOFS_HEX)
def test_inclusion_proof_matches_published_vector(
    index: int, size: int, path_hex: list[str]
) -> None:
    expected = _hexes(path_hex)
    leaves = CT_LEAVES[:size]
    assert inclusion_proof(leaves, index) == expected
    assert inclusion_proof_from_leaf_hashes([leaf_hash(x) for x in leaves], index) == expected
    assert ref_path(index, leaves) == expected
    _assert_inclusion_sound(CT_LEAVES[index], index, size, expected, CT_ROOTS[size])


@pytest.mark.parametrize(("old_size", "new_size", "proof_hex"), CT_CONSISTENCY_PROOFS_HEX)
def test_consistency_proof_matches_published_vector(
    old_size: int, new_size: int, proof_hex: list[str]
) -> None:
    expected = _hexes(proof_hex)
    leaves = CT_LEAVES[:new_size]
    assert consistency_proof(leaves, old_size) == expected
    assert consistency_proof_from_leaf_hashes([leaf_hash(x) for x in leaves], old_size) == expected
    if old_size < new_size:
        assert ref_proof(old_size, leaves) == expected
    _assert_consistency_sound(old_size, new_size, CT_ROOTS[old_size], CT_ROOTS[new_size], expected)


@pytest.mark.parametrize(("index", "size", "path_hex"), CT_INCLUSION_PROOFS_HEX)
def test_flipping_any_bit_of_a_published_inclusion_proof_fails(
    index: int, size: int, path_hex: list[str]
) -> None:
    proof = _hexes(path_hex)
    for element in range(len(proof)):
        for bit in range(256):
            bad = _flip_bit(proof, element, bit)
            assert not verify_inclusion(CT_LEAVES[index], index, size, bad, CT_ROOTS[size])


@pytest.mark.parametrize(("old_size", "new_size", "proof_hex"), CT_CONSISTENCY_PROOFS_HEX)
def test_flipping_any_bit_of_a_published_consistency_proof_fails(
    old_size: int, new_size: int, proof_hex: list[str]
) -> None:
    proof = _hexes(proof_hex)
    old_root, new_root = CT_ROOTS[old_size], CT_ROOTS[new_size]
    for element in range(len(proof)):
        for bit in range(256):
            bad = _flip_bit(proof, element, bit)
            assert not verify_consistency(old_size, new_size, old_root, new_root, bad)


# ---------------------------------------------------------------------------------------
# Edge cases of the API.
# ---------------------------------------------------------------------------------------


def test_trivial_consistency_claims() -> None:
    r1 = CT_ROOTS[1]
    assert verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    assert verify_consistency(0, 1, EMPTY_ROOT, r1, [])
    assert verify_consistency(0, 8, EMPTY_ROOT, CT_ROOTS[8], [])
    assert verify_consistency(1, 1, r1, r1, [])
    assert consistency_proof(CT_LEAVES, 0) == []
    assert consistency_proof(CT_LEAVES, 8) == []
    assert consistency_proof([], 0) == []


def test_trivial_consistency_claims_reject_wrong_roots_and_nonempty_proofs() -> None:
    r1, r2 = CT_ROOTS[1], CT_ROOTS[2]
    assert not verify_consistency(1, 1, r1, r2, [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, r1, [])
    assert not verify_consistency(0, 0, r1, r1, [])  # size 0 has exactly one root
    assert not verify_consistency(0, 1, r1, r1, [])
    assert not verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [EMPTY_ROOT])
    assert not verify_consistency(0, 1, EMPTY_ROOT, r1, [EMPTY_ROOT])
    assert not verify_consistency(1, 1, r1, r1, [EMPTY_ROOT])
    assert not verify_consistency(1, 0, r1, EMPTY_ROOT, [])
    assert not verify_consistency(2, 1, r2, r1, [])
    assert not verify_consistency(1, 2, r1, r2, [])


def test_single_leaf_tree_has_empty_path_and_its_leaf_hash_as_root() -> None:
    data = b"data"
    h = leaf_hash(data)
    assert root([data]) == h
    assert inclusion_proof([data], 0) == []
    assert verify_inclusion(data, 0, 1, [], h)
    assert verify_inclusion_by_hash(h, 0, 1, [], h)
    assert not verify_inclusion_by_hash(h, 0, 1, [], b"")
    assert not verify_inclusion_by_hash(b"", 0, 1, [], h)
    for index, size in [(0, 0), (1, 0), (1, 1), (2, 1), (-1, 1)]:
        assert not verify_inclusion(data, index, size, [], h)


def test_proof_builders_reject_invalid_arguments() -> None:
    leaves = CT_LEAVES[:5]
    hashes = [leaf_hash(x) for x in leaves]
    for index in (-1, 5, 6):
        with pytest.raises(ValueError):
            inclusion_proof(leaves, index)
        with pytest.raises(ValueError):
            inclusion_proof_from_leaf_hashes(hashes, index)
    with pytest.raises(ValueError):
        inclusion_proof([], 0)
    with pytest.raises(ValueError):
        inclusion_proof(leaves, True)
    for old_size in (-1, 6):
        with pytest.raises(ValueError):
            consistency_proof(leaves, old_size)
        with pytest.raises(ValueError):
            consistency_proof_from_leaf_hashes(hashes, old_size)
    with pytest.raises(ValueError):
        consistency_proof(leaves, 2.0)  # type: ignore[arg-type]
    for bad_hashes in ([b"short"], [*hashes, hashes[0] + b"\x00"], [hashes[0].hex()]):
        with pytest.raises(ValueError):
            root_from_leaf_hashes(bad_hashes)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            MerkleTree(bad_hashes)  # type: ignore[arg-type]


def test_tree_object_agrees_with_functions() -> None:
    rng = random.Random(7)
    leaves = _unique_leaves(rng, 37)
    tree = MerkleTree.from_leaves(leaves)
    assert tree.size == 37
    assert tree.root == root(leaves)
    assert MerkleTree([]).root == EMPTY_ROOT and MerkleTree([]).size == 0
    for i in range(37):
        assert tree.leaf_hash(i) == leaf_hash(leaves[i])
        assert tree.inclusion_proof(i) == inclusion_proof(leaves, i)
    for m in range(38):
        assert tree.consistency_proof(m) == consistency_proof(leaves, m)


def test_leaf_and_node_hashes_are_domain_separated() -> None:
    a, b = leaf_hash(b"a"), leaf_hash(b"b")
    assert leaf_hash(a + b) != node_hash(a, b)
    assert node_hash(a, b) != node_hash(b, a)


# ---------------------------------------------------------------------------------------
# Exhaustive small trees: every index and every old size for sizes 1..300.
# ---------------------------------------------------------------------------------------

SIZE_EXHAUSTIVE_MAX = 300


def test_every_proof_verifies_for_every_size_up_to_300() -> None:
    rng = random.Random(20240601)
    leaves = _unique_leaves(rng, SIZE_EXHAUSTIVE_MAX)
    hashes = [leaf_hash(x) for x in leaves]
    roots = [root_from_leaf_hashes(hashes[:n]) for n in range(SIZE_EXHAUSTIVE_MAX + 1)]
    for size in range(1, SIZE_EXHAUSTIVE_MAX + 1):
        tree = MerkleTree(hashes[:size])
        assert tree.root == roots[size]
        for index in range(size):
            proof = tree.inclusion_proof(index)
            assert verify_inclusion_by_hash(hashes[index], index, size, proof, roots[size])
        for old_size in range(size + 1):
            proof = tree.consistency_proof(old_size)
            assert verify_consistency(old_size, size, roots[old_size], roots[size], proof)


def test_every_corrupted_proof_fails_for_every_size_up_to_48() -> None:
    rng = random.Random(48)
    size_max = 48
    leaves = _unique_leaves(rng, size_max)
    roots = [root(leaves[:n]) for n in range(size_max + 1)]
    for size in range(1, size_max + 1):
        tree = MerkleTree.from_leaves(leaves[:size])
        for index in range(size):
            proof = tree.inclusion_proof(index)
            _assert_inclusion_sound(leaves[index], index, size, proof, roots[size])
            if proof:
                element = rng.randrange(len(proof))
                bad = _flip_bit(proof, element, rng.randrange(256))
                assert not verify_inclusion(leaves[index], index, size, bad, roots[size])
            for other in range(size):
                if other != index:
                    assert not verify_inclusion(leaves[other], other, size, proof, roots[size])
            for other_size in range(index + 1, size_max + 1):
                if other_size != size:
                    assert not verify_inclusion(
                        leaves[index], index, other_size, proof, roots[other_size]
                    )
        for old_size in range(1, size):
            proof = tree.consistency_proof(old_size)
            _assert_consistency_sound(old_size, size, roots[old_size], roots[size], proof)
            for other_old in range(1, size):
                if other_old != old_size:
                    assert not verify_consistency(
                        other_old, size, roots[other_old], roots[size], proof
                    )


# ---------------------------------------------------------------------------------------
# Against the reference implementation.
# ---------------------------------------------------------------------------------------


def test_matches_reference_for_every_proof_of_every_size_up_to_40() -> None:
    rng = random.Random(40)
    leaves = _unique_leaves(rng, 40)
    for size in range(41):
        d = leaves[:size]
        assert root(d) == ref_mth(d)
        for index in range(size):
            assert inclusion_proof(d, index) == ref_path(index, d)
        for old_size in range(1, size):
            assert consistency_proof(d, old_size) == ref_proof(old_size, d)


@st.composite
def _tree_and_positions(draw: st.DrawFn) -> tuple[list[bytes], int, int]:
    leaves = draw(st.lists(st.binary(max_size=12), min_size=1, max_size=200, unique=True))
    index = draw(st.integers(0, len(leaves) - 1))
    old_size = draw(st.integers(0, len(leaves)))
    return leaves, index, old_size


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(_tree_and_positions())
def test_random_trees_match_reference(case: tuple[list[bytes], int, int]) -> None:
    leaves, index, old_size = case
    assert root(leaves) == ref_mth(leaves)
    assert inclusion_proof(leaves, index) == ref_path(index, leaves)
    expected = ref_proof(old_size, leaves) if 0 < old_size < len(leaves) else []
    assert consistency_proof(leaves, old_size) == expected


@SETTINGS
@given(_tree_and_positions(), st.data())
def test_random_inclusion_proofs_verify_and_any_corruption_fails(
    case: tuple[list[bytes], int, int], data: st.DataObject
) -> None:
    leaves, index, _ = case
    size = len(leaves)
    tree = MerkleTree.from_leaves(leaves)
    proof = tree.inclusion_proof(index)
    _assert_inclusion_sound(leaves[index], index, size, proof, tree.root)
    if proof:
        element = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        assert not verify_inclusion(
            leaves[index], index, size, _flip_bit(proof, element, bit), tree.root
        )
    other = data.draw(st.integers(0, size - 1))
    if other != index:
        assert not verify_inclusion(leaves[other], other, size, proof, tree.root)
    other_size = data.draw(st.integers(index + 1, size + 64))
    if other_size != size:
        extra = [b"extra %d" % i for i in range(max(0, other_size - size))]
        other_root = root((leaves + extra)[:other_size])
        assert not verify_inclusion(leaves[index], index, other_size, proof, other_root)


@SETTINGS
@given(_tree_and_positions(), st.data())
def test_random_consistency_proofs_verify_and_any_corruption_fails(
    case: tuple[list[bytes], int, int], data: st.DataObject
) -> None:
    leaves, _, old_size = case
    size = len(leaves)
    tree = MerkleTree.from_leaves(leaves)
    old_root = root(leaves[:old_size])
    proof = tree.consistency_proof(old_size)
    _assert_consistency_sound(old_size, size, old_root, tree.root, proof)
    if proof:
        element = data.draw(st.integers(0, len(proof) - 1))
        bit = data.draw(st.integers(0, 255))
        bad = _flip_bit(proof, element, bit)
        assert not verify_consistency(old_size, size, old_root, tree.root, bad)
    # A tree that shares no prefix with this one is not consistent with it.
    if old_size > 0:
        forked = [*leaves[: old_size - 1], leaves[old_size - 1] + b"fork"]
        assert not verify_consistency(old_size, size, root(forked), tree.root, proof)


# ---------------------------------------------------------------------------------------
# Garbage in, False out.
# ---------------------------------------------------------------------------------------

_garbage = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=2**64 - 2, max_value=2**70),
    st.floats(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.binary(min_size=32, max_size=32),
    st.lists(st.binary(min_size=31, max_size=33), max_size=4),
    st.lists(st.one_of(st.none(), st.integers(), st.text()), max_size=4),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(_garbage, _garbage, _garbage, _garbage, _garbage)
def test_verifiers_never_raise_on_garbage(
    a: object, b: object, c: object, d: object, e: object
) -> None:
    calls = [
        merkle.verify_inclusion(a, b, c, d, e),  # type: ignore[arg-type]
        merkle.verify_inclusion_by_hash(a, b, c, d, e),  # type: ignore[arg-type]
        merkle.verify_consistency(a, b, c, d, e),  # type: ignore[arg-type]
    ]
    assert all(result is False for result in calls)


def test_verifiers_reject_malformed_values_of_the_right_shape() -> None:
    leaf = CT_LEAVES[0]
    proof = inclusion_proof(CT_LEAVES, 0)
    good_root = CT_ROOTS[8]
    assert verify_inclusion(leaf, 0, 8, proof, good_root)
    assert not verify_inclusion(leaf, 0, 8, tuple(proof[:2]), good_root)
    assert verify_inclusion(leaf, 0, 8, tuple(proof), good_root)
    assert not verify_inclusion(leaf, 0, 8, b"".join(proof), good_root)  # type: ignore[arg-type]
    assert not verify_inclusion(leaf, 0, 8, [bytearray(p) for p in proof], good_root)  # type: ignore[misc]
    assert not verify_inclusion(leaf, 0, 8, proof, good_root.hex().encode())
    assert not verify_inclusion(leaf, False, 8, proof, good_root)
    assert not verify_inclusion(leaf, 0, 2**64, proof, good_root)
    assert not verify_inclusion(leaf, 0, 8, [EMPTY_ROOT] * 100, good_root)
    cproof = consistency_proof(CT_LEAVES, 6)
    assert verify_consistency(6, 8, CT_ROOTS[6], good_root, cproof)
    assert not verify_consistency(6, 8, CT_ROOTS[6], good_root, [*cproof[:2], None])  # type: ignore[list-item]
    assert not verify_consistency(6.0, 8, CT_ROOTS[6], good_root, cproof)  # type: ignore[arg-type]
    assert not verify_consistency(6, 8, CT_ROOTS[6][:31], good_root, cproof)
    assert not verify_consistency(6, 2**64, CT_ROOTS[6], good_root, cproof)
