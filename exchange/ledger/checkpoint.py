"""The applied ledger state as bytes, so a restart need not replay the chain (decision 16).

A checkpoint is the whole `LedgerState` serialized with pickle and stored in the block
store, in the same SQLite transaction as the block it reflects (see `BlockStore.
append_many`), so the two never disagree. Loading accepts only the ledger's own classes
and a few plain containers: the bytes come from the node's own data directory, but a
checkpoint that names anything else (a function, a module) is refused rather than run.

`state_digest` is a canonical digest of a state, independent of the process (set and
dict order, hash seeds) and of how the state was reached, so a state loaded from a
checkpoint and one rebuilt from the blocks can be checked equal.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import hashlib
import io
import pickle
import struct
from collections import OrderedDict, deque
from decimal import Decimal
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

from exchange.errors import StoreCorrupted
from exchange.ledger.state import LedgerState

# The packages whose classes a checkpoint may hold; their code makes the format.
_STATE_PACKAGES = ("exchange.ledger.", "exchange.identity.", "exchange.v1.")


def _code_fingerprint() -> str:
    """A digest of the code that defines what a checkpoint holds (the ledger, identity
    and wire-format modules): a node upgraded past any change there rebuilds its state
    from the blocks once instead of loading objects of another shape."""
    digest = hashlib.sha256()
    root = Path(__file__).parent.parent
    for folder in (root / p.split(".")[1] for p in _STATE_PACKAGES):
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


STATE_FORMAT = f"ledger-state/1/{_code_fingerprint()}"

_ALLOWED_GLOBALS = frozenset({("collections", "OrderedDict"), ("collections", "deque"),
                              ("decimal", "Decimal"), ("builtins", "set"),
                              ("builtins", "frozenset"), ("builtins", "bytearray")})


class _LedgerUnpickler(pickle.Unpickler):
    """Resolves only classes of the packages the format's code digest covers (and plain
    containers)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_STATE_PACKAGES) and "." not in name and not name.startswith("_"):
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"a ledger state checkpoint may not name {module}.{name}")


def dump_state(state: LedgerState) -> bytes:
    """The state as checkpoint bytes. The one callback inside it (the playbooks' standing
    approval the query book consults) is left out and reconnected by `load_state`."""
    approval = state.queries.standing_approval
    state.queries.standing_approval = None
    try:
        return pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL)
    finally:
        state.queries.standing_approval = approval


def load_state(blob: bytes) -> LedgerState:
    """A state from checkpoint bytes; StoreCorrupted if they are not one."""
    collecting = gc.isenabled()
    gc.disable()  # millions of new objects, none of them garbage: no collection passes
    try:
        state = _LedgerUnpickler(io.BytesIO(blob)).load()
    except Exception as exc:  # noqa: BLE001 - any failure means the checkpoint is unusable
        raise StoreCorrupted(f"the state checkpoint does not load: {exc}") from exc
    finally:
        if collecting:
            gc.enable()
    if not isinstance(state, LedgerState):
        raise StoreCorrupted(f"the state checkpoint holds a {type(state).__name__}")
    state.queries.standing_approval = state.playbooks.approves
    return state


def blob_digest(blob: bytes) -> bytes:
    """Integrity check of the stored bytes (not canonical: see `state_digest`)."""
    return hashlib.sha256(blob).digest()


def state_digest(state: LedgerState) -> bytes:
    """SHA-256 over a canonical encoding of everything the state holds."""
    return _Canonical().digest(state)


class _Canonical:
    """Encodes values canonically: dicts and sets sorted, objects by class and fields,
    protobuf messages by their deterministic bytes; callables (bound methods) skipped.
    An object reached twice is walked once (the registry the books all hold)."""

    def __init__(self) -> None:
        self._memo: dict[int, bytes] = {}
        self._keep: list[object] = []  # keeps memoized objects alive (ids stay unique)

    def digest(self, value: object) -> bytes:
        return hashlib.sha256(self._encode(value)).digest()

    def _encode(self, v: object) -> bytes:  # noqa: PLR0911 - one branch per kind of value
        if v is None:
            return b"N"
        if isinstance(v, bool):
            return b"T" if v else b"F"
        if isinstance(v, enum.Enum):
            return b"E" + self._encode(type(v).__qualname__) + self._encode(v.value)
        if isinstance(v, int):
            return b"I" + _framed(str(v).encode())
        if isinstance(v, str):
            return b"S" + _framed(v.encode())
        if isinstance(v, bytes | bytearray | memoryview):
            return b"B" + _framed(bytes(v))
        if isinstance(v, float | Decimal):
            return b"D" + _framed(repr(v).encode())
        if isinstance(v, Message):
            return b"P" + _framed(v.DESCRIPTOR.full_name.encode()) + _framed(
                v.SerializeToString(deterministic=True))
        if isinstance(v, OrderedDict):
            return b"O" + _framed(b"".join(self._encode(k) + self._encode(x)
                                           for k, x in v.items()))
        if isinstance(v, dict):
            return b"M" + _framed(b"".join(sorted(self._encode(k) + self._encode(x)
                                                  for k, x in v.items())))
        if isinstance(v, set | frozenset):
            return b"U" + _framed(b"".join(sorted(self._encode(x) for x in v)))
        if isinstance(v, list | tuple | deque):
            return b"L" + _framed(b"".join(self._encode(x) for x in v))
        if callable(v):
            return b"C"  # a callback wired in at construction, not state
        return self._object(v)

    def _object(self, v: object) -> bytes:
        known = self._memo.get(id(v))
        if known is not None:
            return known
        if dataclasses.is_dataclass(v):
            names = sorted(f.name for f in dataclasses.fields(v))
        elif hasattr(v, "__dict__"):
            names = sorted(vars(v))
        else:
            raise TypeError(f"cannot encode a {type(v).__qualname__} in a state digest")
        parts = [self._encode(type(v).__module__ + "." + type(v).__qualname__)]
        for name in names:
            parts.append(self._encode(name) + self._encode(getattr(v, name)))
        encoded = b"X" + _framed(b"".join(parts))
        self._memo[id(v)] = encoded
        self._keep.append(v)
        return encoded


def _framed(raw: bytes) -> bytes:
    return struct.pack(">Q", len(raw)) + raw
