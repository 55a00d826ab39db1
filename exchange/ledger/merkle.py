"""The Merkle tree of RFC 9162 section 2 (the tree of RFC 6962): hashes and proofs.

Pure functions, bytes in and values out. The tree over n leaves is the one RFC 9162
defines with MTH, split at the largest power of two below n. It is computed level by
level instead, which gives the same tree: an odd node at the right edge of a level is
carried up unchanged, exactly where MTH would have put it. Nothing recurses, so large
trees cost no stack and little call overhead.

Proof builders raise ValueError on invalid arguments; they are called by our own code.
Verifiers take what peers send, follow the RFC's algorithms step by step, and answer
False on any malformed input instead of raising.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

HASH_SIZE_BYTES = 32
# RFC 9162 tree sizes and indices are uint64.
TREE_SIZE_MAX = 2**64 - 1
# The longest proof for a tree of at most TREE_SIZE_MAX leaves: an inclusion path has at
# most 64 nodes, a consistency proof at most 64 plus the old subtree's own hash.
PROOF_LENGTH_MAX = 65

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"

EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH({}): the root of the empty tree is the hash of the empty string."""


def leaf_hash(data: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d): the hash of one leaf's data."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right): the hash of an interior node."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def root(leaves: Sequence[bytes]) -> bytes:
    """MTH(leaves): the root of the tree over the raw leaf data."""
    return _root_of_valid_hashes(_leaf_hashes(leaves))


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The root of the tree whose leaves have these (already computed) leaf hashes."""
    _check_leaf_hashes(hashes)
    return _root_of_valid_hashes(hashes)


def inclusion_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, leaves): the audit path for leaf `index`, bottom-up (RFC 9162 2.1.3.1)."""
    return MerkleTree.from_leaves(leaves).inclusion_proof(index)


def inclusion_proof_from_leaf_hashes(hashes: Sequence[bytes], index: int) -> list[bytes]:
    """PATH(index, ...) for a tree given by its leaf hashes."""
    return MerkleTree(hashes).inclusion_proof(index)


def consistency_proof(leaves: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(old_size, leaves) (RFC 9162 2.1.4.1); [] when old_size is 0 or len(leaves)."""
    return MerkleTree.from_leaves(leaves).consistency_proof(old_size)


def consistency_proof_from_leaf_hashes(hashes: Sequence[bytes], old_size: int) -> list[bytes]:
    """PROOF(old_size, ...) for a tree given by its leaf hashes."""
    return MerkleTree(hashes).consistency_proof(old_size)


class MerkleTree:
    """An immutable tree over leaf hashes that keeps every level.

    Building it costs one pass over the leaves; after that the root is free and each
    proof costs O(log n), so a block store can serve many proofs from one build.
    """

    __slots__ = ("_levels",)

    _levels: tuple[tuple[bytes, ...], ...]

    def __init__(self, leaf_hashes: Sequence[bytes]) -> None:
        _check_leaf_hashes(leaf_hashes)
        level = tuple(leaf_hashes)
        levels = [level]
        while len(level) > 1:
            level = tuple(_parent_level(level))
            levels.append(level)
        self._levels = tuple(levels)

    @classmethod
    def from_leaves(cls, leaves: Sequence[bytes]) -> MerkleTree:
        """The tree over raw leaf data."""
        return cls(_leaf_hashes(leaves))

    @property
    def size(self) -> int:
        """The number of leaves."""
        return len(self._levels[0])

    @property
    def root(self) -> bytes:
        """MTH of all leaves."""
        top = self._levels[-1]
        return top[0] if top else EMPTY_ROOT

    def leaf_hash(self, index: int) -> bytes:
        """The hash of leaf `index`."""
        _check_int_in_range("index", index, 0, self.size - 1)
        return self._levels[0][index]

    def inclusion_proof(self, index: int) -> list[bytes]:
        """PATH(index, D[n]): the sibling at each level, bottom-up.

        A node without a sibling is the carried-up right edge; PATH has no entry for it.
        """
        _check_int_in_range("index", index, 0, self.size - 1)
        path: list[bytes] = []
        position = index
        for level in self._levels[:-1]:
            sibling = position ^ 1
            if sibling < len(level):
                path.append(level[sibling])
            position >>= 1
        return path

    def consistency_proof(self, old_size: int) -> list[bytes]:
        """PROOF(old_size, D[n]): SUBPROOF unrolled into a loop.

        SUBPROOF appends one subtree hash after descending, so the hashes are gathered
        top-down and reversed at the end.
        """
        size_new = self.size
        _check_int_in_range("old_size", old_size, 0, size_new)
        if old_size in (0, size_new):
            return []
        proof_reversed: list[bytes] = []
        start, size, m, is_old_root = 0, size_new, old_size, True
        while m != size:
            k = _split(size)
            if m <= k:
                proof_reversed.append(self._subtree_hash(start + k, size - k))
                size = k
            else:
                proof_reversed.append(self._subtree_hash(start, k))
                start, size, m, is_old_root = start + k, size - k, m - k, False
        if not is_old_root:
            proof_reversed.append(self._subtree_hash(start, size))
        proof_reversed.reverse()
        return proof_reversed

    def _subtree_hash(self, start: int, size: int) -> bytes:
        """MTH(D[start:start+size]) for a range the RFC recursion visits.

        Such a range is either a perfect subtree or runs to the right edge of the tree,
        and starts at a multiple of its height's width, so it is one stored node.
        """
        assert size >= 1
        height = (size - 1).bit_length()
        assert start % (1 << height) == 0
        assert size == 1 << height or start + size == self.size
        return self._levels[height][start >> height]


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether `proof` shows leaf data `leaf` at `index` in the tree of `size` with `root`."""
    if not isinstance(leaf, bytes):
        return False
    return verify_inclusion_by_hash(leaf_hash(leaf), index, size, proof, root)


def verify_inclusion_by_hash(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """verify_inclusion for a caller that already holds the leaf hash (RFC 9162 2.1.3.2)."""
    if not (_is_hash(leaf_hash) and _is_hash(root) and _is_proof(proof)):
        return False
    if not (_is_int(index) and _is_int(size) and 0 <= index < size <= TREE_SIZE_MAX):
        return False
    fn, sn = index, size - 1
    r = leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and r == root


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether `proof` shows the tree (old_size, old_root) is a prefix of (new_size, new_root).

    RFC 9162 2.1.4.2 covers 0 < old_size < new_size. Equal sizes need an empty proof and
    equal roots. Size 0 needs an empty proof and, since MTH({}) is defined, the empty
    tree's root as old_root; it is then a prefix of every tree.
    """
    if not (_is_hash(old_root) and _is_hash(new_root) and _is_proof(proof)):
        return False
    if not (_is_int(old_size) and _is_int(new_size)):
        return False
    if not 0 <= old_size <= new_size <= TREE_SIZE_MAX:
        return False
    if old_size == 0 and old_root != EMPTY_ROOT:
        return False
    if old_size == new_size:
        return len(proof) == 0 and old_root == new_root
    if old_size == 0:
        return len(proof) == 0
    if len(proof) == 0:
        return False

    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return fr == old_root and sr == new_root and sn == 0


def _leaf_hashes(leaves: Sequence[bytes]) -> list[bytes]:
    sha256 = hashlib.sha256
    return [sha256(_LEAF_PREFIX + data).digest() for data in leaves]


def _root_of_valid_hashes(hashes: Sequence[bytes]) -> bytes:
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        level = _parent_level(level)
    return level[0]


def _parent_level(level: Sequence[bytes]) -> list[bytes]:
    """Hash pairs left to right; an odd last node is carried up unchanged."""
    sha256 = hashlib.sha256
    parents = [
        sha256(_NODE_PREFIX + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)
    ]
    if len(level) % 2:
        parents.append(level[-1])
    return parents


def _split(size: int) -> int:
    """The largest power of two smaller than size (size >= 2): the k of MTH."""
    assert size >= 2
    return 1 << ((size - 1).bit_length() - 1)


def _check_leaf_hashes(hashes: Sequence[bytes]) -> None:
    if len(hashes) > TREE_SIZE_MAX:
        raise ValueError(f"tree has {len(hashes)} leaves, more than {TREE_SIZE_MAX}")
    for position, h in enumerate(hashes):
        if not _is_hash(h):
            raise ValueError(f"leaf hash {position} is not {HASH_SIZE_BYTES} bytes")


def _check_int_in_range(name: str, value: int, low: int, high: int) -> None:
    if not _is_int(value):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside [{low}, {high}]")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_hash(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == HASH_SIZE_BYTES


def _is_proof(proof: object) -> bool:
    if not isinstance(proof, Sequence) or isinstance(proof, (bytes, bytearray, str)):
        return False
    if len(proof) > PROOF_LENGTH_MAX:
        return False
    return all(_is_hash(p) for p in proof)
