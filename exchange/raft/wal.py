"""The durable Raft log: entries, hard state and snapshot point on append-only segments.

DESIGN.md decision 11, "durable before acknowledged": `save()` returns only after its
records are fsynced, so the caller may then send the messages that depend on them.

On disk
-------
A directory of segment files named ``{seq:016x}-{first_index:016x}.wal`` (etcd's scheme):
``seq`` counts segments, ``first_index`` is the index the log expected next when the
segment was created. Each segment starts with a 32-byte header::

    magic b"EXRAFTWL" | version u16 | reserved u16 | seq u64 | first_index u64 | crc32 u32

followed by frames, all integers little-endian::

    length u32 | crc u32 | type u8 | payload (length bytes)

``crc`` is ``zlib.crc32`` over ``length | type | payload``; it is per frame, not chained
(a frame is checkable on its own, which the torn-tail scan below relies on; order across
frames is pinned by the index continuity checks and the segment headers instead).

Frame types:

- HEAD (0xB3), the first frame of every segment: the snapshot point and hard state at the
  time the segment was created, so that older segments can be deleted.
- SAVE (0xB1), one per `save()` call: ``count u32``, then per entry
  ``term u64 | index u64 | kind u8 | data_len u32 | data``, then ``has_hard_state u8`` and
  the hard state ``term u64 | commit u64 | vote_len u16 | vote``.
- SNAPSHOT (0xB2): ``index u64 | term u64 | keep u8 | conf``, conf being
  ``n u16 | (len u16 | utf8)*n`` for voters and then for learners. ``keep`` records
  whether entries after the snapshot survive (they do iff the log held an entry at that
  index with that term, Raft's InstallSnapshot rule); replay obeys it.

A `save()` call is one frame, one ``write()`` and one fsync (group commit). One frame
per call rather than one per entry makes a batch atomic on recovery (replayed whole or
not at all) and makes a torn batch, whichever of its pages reached the disk, a single
damaged frame at the tail rather than good records interleaved with bad ones.

Replay rule (etcd's): an entry at index ``i`` discards every entry ``>= i`` before it is
appended, so conflict truncation needs no rewriting of old files.

Torn writes and corruption
--------------------------
Only the last segment can hold an unacknowledged write: a segment is fsynced before the
next one is created. When a frame is short, has a bad checksum or an impossible header:

- in any segment but the last, or as the HEAD of a segment: `WalCorrupted`;
- in the last segment, if some valid frame follows it anywhere later in the file, the
  damaged frame was followed by a later write and so had been acknowledged:
  `WalCorrupted`. The search checksums at most SCAN_CHECKSUM_BYTES_MAX bytes of
  candidates; past that (tens of MiB of random bytes after the damage) it cannot rule a
  later frame out and reports `WalCorrupted` too, erring on the side of not truncating;
- otherwise it is a torn tail (a short frame, a partly written frame, zero-filled
  preallocation or garbage after the last complete frame): the file is truncated at the
  frame's start, fsynced, and `RecoveredState.repaired` says so.

A flipped byte in the *last* frame of the last segment cannot be told apart from a torn
write of it, so it is treated as torn and the last batch is dropped. That is safe only
because the last batch is the one that may not have been acknowledged; a disk that
silently corrupts acknowledged data there is outside what this log can detect.

Not thread-safe: one owner thread calls every method. A lock file stops a second
process from opening the same directory.

Over 600 lines on purpose: the frame format, the writer thread, recovery and truncation
share one fsync discipline and are tested together by the kill -9 tests; apart, each
would hide what the others rely on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import struct
import sys
import zlib
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from exchange.raft.types import ConfState, Entry, EntryKind, HardState, SnapshotMeta

__all__ = [
    "SEGMENT_BYTES_MAX_DEFAULT",
    "RecoveredState",
    "WalBatchTooLarge",
    "WalCorrupted",
    "WalError",
    "WriteAheadLog",
]

SEGMENT_BYTES_MAX_DEFAULT = 64 * 1024 * 1024
FRAME_PAYLOAD_BYTES_MAX = 256 * 1024 * 1024
SCAN_CHECKSUM_BYTES_MAX = 1024 * 1024 * 1024  # torn-tail scan budget (~0.3 s of crc32)

_MAGIC = b"EXRAFTWL"
_VERSION = 1
_SEGMENT_HEADER = struct.Struct("<8sHHQQ")  # magic, version, reserved, seq, first_index
_SEGMENT_HEADER_BYTES = _SEGMENT_HEADER.size + 4  # + crc32
_FRAME_HEADER = struct.Struct("<IIB")  # length, crc, type
_FRAME_HEADER_BYTES = _FRAME_HEADER.size
_LEN_TYPE = struct.Struct("<IB")

_FRAME_SAVE = 0xB1
_FRAME_SNAPSHOT = 0xB2
_FRAME_HEAD = 0xB3
_FRAME_TYPES = frozenset({_FRAME_SAVE, _FRAME_SNAPSHOT, _FRAME_HEAD})
_FRAME_TYPE_PATTERN = re.compile(rb"[\xb1-\xb3]")

_COUNT = struct.Struct("<I")
_ENTRY = struct.Struct("<QQBI")  # term, index, kind, data_len
_HARD_STATE = struct.Struct("<QQH")  # term, commit, vote_len
_SNAPSHOT = struct.Struct("<QQB")  # index, term, keep
_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")

_SEGMENT_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.wal$")
_LOCK_NAME = "LOCK"
_TMP_SUFFIX = ".tmp"


class WalError(Exception):
    """The write-ahead log cannot do what was asked."""


class WalBatchTooLarge(WalError):
    """One `save()` call would exceed FRAME_PAYLOAD_BYTES_MAX."""


class WalCorrupted(WalError):
    """Damage that is not a torn tail: acknowledged data is unreadable or missing."""

    def __init__(self, path: Path, offset: int, reason: str) -> None:
        super().__init__(f"{path}: corrupted at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RecoveredState:
    """What `WriteAheadLog.open` found on disk."""

    hard_state: HardState
    snapshot: SnapshotMeta
    entries: list[Entry] = field(default_factory=list)  # index > snapshot.index, in order
    repaired: str | None = None  # a torn tail that was truncated, if any


# ----------------------------------------------------------------------------- encoding


def _crc(length: int, frame_type: int, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(_LEN_TYPE.pack(length, frame_type)))


def _frame(frame_type: int, payload: bytes) -> bytes:
    length = len(payload)
    if length > FRAME_PAYLOAD_BYTES_MAX:
        raise WalBatchTooLarge(f"frame payload {length} bytes > {FRAME_PAYLOAD_BYTES_MAX}")
    return _FRAME_HEADER.pack(length, _crc(length, frame_type, payload), frame_type) + payload


def _encode_str(value: str) -> bytes:
    raw = value.encode()
    assert len(raw) <= 0xFFFF, "string too long for the WAL"
    return _U16.pack(len(raw)) + raw


def _encode_hard_state(hard_state: HardState) -> bytes:
    vote = hard_state.vote.encode()
    assert len(vote) <= 0xFFFF, "vote too long for the WAL"
    return _HARD_STATE.pack(hard_state.term, hard_state.commit, len(vote)) + vote


def _encode_snapshot(meta: SnapshotMeta, keep: bool) -> bytes:
    parts = [_SNAPSHOT.pack(meta.index, meta.term, int(keep))]
    for members in (meta.conf.voters, meta.conf.learners):
        parts.append(_U16.pack(len(members)))
        parts.extend(_encode_str(member) for member in members)
    return b"".join(parts)


def _encode_save(hard_state: HardState | None, entries: Sequence[Entry]) -> bytes:
    parts: list[bytes] = [_COUNT.pack(len(entries))]
    pack = _ENTRY.pack
    for entry in entries:
        parts.append(pack(entry.term, entry.index, entry.kind, len(entry.data)))
        parts.append(entry.data)
    if hard_state is None:
        parts.append(b"\x00")
    else:
        parts.append(b"\x01")
        parts.append(_encode_hard_state(hard_state))
    return b"".join(parts)


def _segment_header(seq: int, first_index: int) -> bytes:
    body = _SEGMENT_HEADER.pack(_MAGIC, _VERSION, 0, seq, first_index)
    return body + struct.pack("<I", zlib.crc32(body))


def _segment_name(seq: int, first_index: int) -> str:
    return f"{seq:016x}-{first_index:016x}.wal"


class _Malformed(Exception):
    """A checksum-valid payload that does not decode (raised inside the decoders)."""


class _Reader:
    """Bounds-checked cursor over one frame's payload."""

    __slots__ = ("_buf", "_pos", "_end")

    def __init__(self, buf: memoryview) -> None:
        self._buf = buf
        self._pos = 0
        self._end = len(buf)

    def take(self, st: struct.Struct) -> tuple[int, ...]:
        if self._pos + st.size > self._end:
            raise _Malformed("payload too short")
        values = st.unpack_from(self._buf, self._pos)
        self._pos += st.size
        return values

    def raw(self, n: int) -> bytes:
        if self._pos + n > self._end:
            raise _Malformed("payload too short")
        value = bytes(self._buf[self._pos : self._pos + n])
        self._pos += n
        return value

    def text(self) -> str:
        (n,) = self.take(_U16)
        try:
            return self.raw(n).decode()
        except UnicodeDecodeError as exc:
            raise _Malformed("bad utf-8") from exc

    def finish(self) -> None:
        if self._pos != self._end:
            raise _Malformed(f"{self._end - self._pos} trailing bytes in payload")


def _decode_hard_state(reader: _Reader) -> HardState:
    term, commit, vote_len = reader.take(_HARD_STATE)
    try:
        vote = reader.raw(vote_len).decode()
    except UnicodeDecodeError as exc:
        raise _Malformed("bad utf-8 in vote") from exc
    return HardState(term=term, vote=vote, commit=commit)


def _decode_snapshot(reader: _Reader) -> tuple[SnapshotMeta, bool]:
    index, term, keep = reader.take(_SNAPSHOT)
    if keep not in (0, 1):
        raise _Malformed(f"bad keep flag {keep}")
    conf: list[tuple[str, ...]] = []
    for _ in range(2):
        (count,) = reader.take(_U16)
        conf.append(tuple(reader.text() for _ in range(count)))
    meta = SnapshotMeta(index=index, term=term, conf=ConfState(voters=conf[0], learners=conf[1]))
    return meta, bool(keep)


def _decode_save(reader: _Reader) -> tuple[list[Entry], HardState | None]:
    (count,) = reader.take(_COUNT)
    entries: list[Entry] = []
    for _ in range(count):
        term, index, kind, data_len = reader.take(_ENTRY)
        try:
            entry_kind = EntryKind(kind)
        except ValueError as exc:
            raise _Malformed(f"bad entry kind {kind}") from exc
        entries.append(Entry(term=term, index=index, kind=entry_kind, data=reader.raw(data_len)))
    (has_hard_state,) = reader.take(_U8)
    if has_hard_state not in (0, 1):
        raise _Malformed(f"bad hard-state flag {has_hard_state}")
    hard_state = _decode_hard_state(reader) if has_hard_state else None
    return entries, hard_state


# ----------------------------------------------------------------------------- scanning


def _frame_at(buf: memoryview, offset: int) -> tuple[int, int] | None:
    """(type, end offset) of a valid frame starting at `offset`, else None."""
    if offset + _FRAME_HEADER_BYTES > len(buf):
        return None
    length, crc, frame_type = _FRAME_HEADER.unpack_from(buf, offset)
    if frame_type not in _FRAME_TYPES or length > FRAME_PAYLOAD_BYTES_MAX:
        return None
    end = offset + _FRAME_HEADER_BYTES + length
    if end > len(buf):
        return None
    if _crc(length, frame_type, buf[offset + _FRAME_HEADER_BYTES : end]) != crc:
        return None
    return frame_type, end


class _ScanBudgetExceeded(Exception):
    """The torn-tail scan would checksum more than SCAN_CHECKSUM_BYTES_MAX."""


def _valid_frame_after(data: bytes, start: int) -> int | None:
    """Offset of the first valid frame that starts after `start`, if any.

    A candidate has a frame type byte, a length that fits in the file, and after its end
    either the end of the file, what could be another frame's header (a frame type byte)
    or a zero byte (a zero-filled torn tail). Only candidates are checksummed, within a
    budget (many MiB of random garbage make many candidates), past which the caller must
    assume the worst.
    """
    buf = memoryview(data)
    size = len(buf)
    type_offset = _FRAME_HEADER.size - 1
    checksum_bytes = 0
    for match in _FRAME_TYPE_PATTERN.finditer(data, start + 1 + type_offset):
        offset = match.start() - type_offset
        (length,) = _COUNT.unpack_from(buf, offset)
        end = offset + _FRAME_HEADER_BYTES + length
        if end > size:
            continue
        followed_by_frame_or_zeros = (
            end + _FRAME_HEADER_BYTES > size
            or data[end] == 0
            or data[end + type_offset] in _FRAME_TYPES
        )
        if not followed_by_frame_or_zeros:
            continue
        checksum_bytes += length
        if checksum_bytes > SCAN_CHECKSUM_BYTES_MAX:
            raise _ScanBudgetExceeded
        if _frame_at(buf, offset) is not None:
            return offset
    return None


# ----------------------------------------------------------------------------- replay


@dataclass(slots=True)
class _SegmentInfo:
    seq: int
    first_index: int
    path: Path
    entry_index_max: int = 0  # highest entry index written in this segment (0: none)


class _Replay:
    """The log as rebuilt from frames, in write order.

    Segments before the oldest kept one may have been deleted; the entries they held
    between the oldest segment's HEAD snapshot and its first_index are unknown
    ("missing") until a later snapshot covers them. A log still missing entries at the
    end is corrupted.
    """

    def __init__(self) -> None:
        self.snapshot = SnapshotMeta()
        self.hard_state = HardState()
        self.entries: list[Entry] = []
        self.missing_upto = 0  # entries in (snapshot.index, missing_upto] are unknown
        self.started = False

    def base_index(self) -> int:
        """Index just before entries[0]."""
        return max(self.snapshot.index, self.missing_upto)

    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.base_index()

    def begin_segment(self, info: _SegmentInfo) -> str | None:
        """Check a segment's first_index against the log so far; None if it fits."""
        if not self.started:
            self.missing_upto = info.first_index - 1
            return None
        if info.first_index != self.last_index() + 1:
            return (
                f"segment first index {info.first_index} does not follow "
                f"last index {self.last_index()} of the previous segment"
            )
        return None

    def head(self, meta: SnapshotMeta, hard_state: HardState) -> str | None:
        if not self.started:
            self.started = True
            self.apply_snapshot(meta, keep=True)
            self.hard_state = hard_state
            return None
        if meta != self.snapshot or hard_state != self.hard_state:
            return "segment head does not match the state replayed so far"
        return None

    def apply_snapshot(self, meta: SnapshotMeta, keep: bool) -> str | None:
        if meta.index < self.snapshot.index:
            return f"snapshot index {meta.index} < earlier snapshot {self.snapshot.index}"
        if keep and meta.index <= self.last_index():
            base = self.base_index()
            if meta.index > base:
                del self.entries[: meta.index - base]
            if meta.index >= self.missing_upto:
                self.missing_upto = 0
        else:
            self.entries = []
            self.missing_upto = 0
        self.snapshot = meta
        return None

    def apply_entries(self, entries: list[Entry]) -> str | None:
        for entry in entries:
            if entry.index <= self.snapshot.index:
                return f"entry {entry.index} at or below snapshot {self.snapshot.index}"
            base = self.base_index()
            if entry.index > base:
                position = entry.index - base - 1
                if position > len(self.entries):
                    return f"entry {entry.index} leaves a gap after {self.last_index()}"
                del self.entries[position:]
                self.entries.append(entry)
            else:  # overwrites inside the missing range: what follows is known again
                self.missing_upto = entry.index - 1
                self.entries = [entry]
        return None


# ----------------------------------------------------------------------------- file system


def _sync_file(fd: int) -> None:
    if sys.platform == "darwin":  # fsync alone does not reach the platter on macOS
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    elif hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:
        os.fsync(fd)


def _sync_directory(fd: int) -> None:
    os.fsync(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# ----------------------------------------------------------------------------- the log


class WriteAheadLog:
    """Append-only, checksummed, segmented Raft log (see the module docstring).

    Not thread-safe: a single owner thread must make all calls.
    """

    def __init__(
        self,
        directory: Path,
        segment_bytes_max: int,
        lock_fd: int,
        dir_fd: int,
        segments: list[_SegmentInfo],
        replay: _Replay,
    ) -> None:
        """Use `WriteAheadLog.open`."""
        assert segments, "a WAL always has at least one segment"
        self._directory = directory
        self._segment_bytes_max = segment_bytes_max
        self._lock_fd = lock_fd
        self._dir_fd = dir_fd
        self._segments = segments
        self._snapshot = replay.snapshot
        self._hard_state = replay.hard_state
        self._terms = array("Q", (entry.term for entry in replay.entries))  # snapshot.index+1..
        self._fd = -1
        self._segment_size_bytes = 0
        self._dirty = False  # written since the last fsync
        self._failed: str | None = None
        self._closed = False
        self._open_tail()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls, directory: Path, segment_bytes_max: int = SEGMENT_BYTES_MAX_DEFAULT
    ) -> tuple[WriteAheadLog, RecoveredState]:
        """Open (creating if needed) the log in `directory`, repairing a torn tail.

        Raises WalCorrupted if acknowledged data is damaged or missing.
        """
        assert segment_bytes_max > _SEGMENT_HEADER_BYTES, "segment_bytes_max too small"
        directory = Path(directory)
        if not directory.is_dir():
            directory.mkdir(parents=True)
            parent_fd = os.open(directory.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                _sync_directory(parent_fd)
            finally:
                os.close(parent_fd)
        lock_fd = os.open(directory / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        dir_fd = -1
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise WalError(f"{directory}: WAL is open in another process") from exc
                raise
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
            segments, replay, repaired = _recover(directory, dir_fd)
            if not segments:
                info = _SegmentInfo(seq=0, first_index=1, path=directory / _segment_name(0, 1))
                _create_segment(dir_fd, info, SnapshotMeta(), HardState())
                segments = [info]
                replay = _Replay()
            wal = cls(directory, segment_bytes_max, lock_fd, dir_fd, segments, replay)
        except BaseException:
            if dir_fd >= 0:
                os.close(dir_fd)
            os.close(lock_fd)
            raise
        try:
            wal.compact()  # finishes a compaction a crash interrupted
        except BaseException:
            wal.close()
            raise
        state = RecoveredState(
            hard_state=replay.hard_state,
            snapshot=replay.snapshot,
            entries=replay.entries,
            repaired=repaired,
        )
        return wal, state

    def _open_tail(self) -> None:
        path = self._segments[-1].path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        self._segment_size_bytes = os.fstat(self._fd).st_size

    # ------------------------------------------------------------------ state

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def snapshot(self) -> SnapshotMeta:
        return self._snapshot

    @property
    def hard_state(self) -> HardState:
        return self._hard_state

    @property
    def last_index(self) -> int:
        return self._snapshot.index + len(self._terms)

    def _term_at(self, index: int) -> int | None:
        if index == self._snapshot.index:
            return self._snapshot.term
        if self._snapshot.index < index <= self.last_index:
            return self._terms[index - self._snapshot.index - 1]
        return None

    # ------------------------------------------------------------------ writing

    def save(
        self, hard_state: HardState | None, entries: Sequence[Entry], sync: bool = True
    ) -> None:
        """Append `entries` (overwriting the log from entries[0].index on) and then
        `hard_state`, as one write and, if `sync`, one fsync.

        With sync=False the records are written but not yet durable; a later call with
        sync=True (even `save(None, [])`) makes them so.
        """
        self._check_usable()
        if entries:
            self._check_entries(entries)
        if hard_state is not None:
            last_after = entries[-1].index if entries else self.last_index
            self._check_hard_state(hard_state, last_after)
        if entries or hard_state is not None:
            frame = _frame(_FRAME_SAVE, _encode_save(hard_state, entries))
            self._append(frame)
            if entries:
                first = entries[0].index
                del self._terms[first - self._snapshot.index - 1 :]
                self._terms.extend(entry.term for entry in entries)
                tail = self._segments[-1]
                tail.entry_index_max = max(tail.entry_index_max, entries[-1].index)
            if hard_state is not None:
                self._hard_state = hard_state
        if sync and self._dirty:
            self._sync()

    def save_snapshot(self, meta: SnapshotMeta) -> None:
        """Record durably that entries <= meta.index are in the state machine.

        Entries after meta.index are kept iff the log holds an entry at meta.index with
        meta.term; otherwise (including a snapshot beyond the last index) all are
        discarded. Then deletes segments that only hold entries the snapshot covers.
        When one step of Raft yields a snapshot, entries and a hard state, call this
        first: the hard state's commit may point into the snapshot.
        """
        self._check_usable()
        assert meta.index >= self._snapshot.index, (
            f"snapshot moves back: {meta.index} < {self._snapshot.index}"
        )
        keep = self._term_at(meta.index) == meta.term
        assert keep or meta.index >= self._hard_state.commit, (
            f"snapshot {meta.index}/{meta.term} conflicts with committed entries"
        )
        self._append(_frame(_FRAME_SNAPSHOT, _encode_snapshot(meta, keep)))
        self._sync()
        if keep:
            del self._terms[: meta.index - self._snapshot.index]
        else:
            self._terms = array("Q")
        self._snapshot = meta
        self.compact()

    def compact(self) -> int:
        """Delete the oldest segments whose entries all lie at or below the snapshot.

        The newest segment is never deleted; every segment starts with a HEAD frame, so
        the oldest one kept is enough to rebuild the state. Returns how many were deleted.
        """
        self._check_usable()
        deleted = 0
        while len(self._segments) > 1 and (
            self._segments[0].entry_index_max <= self._snapshot.index
        ):
            os.unlink(self._segments[0].path)
            _sync_directory(self._dir_fd)  # oldest first, durably: the rest stays a suffix
            self._segments.pop(0)
            deleted += 1
        return deleted

    def _check_entries(self, entries: Sequence[Entry]) -> None:
        first = entries[0].index
        assert self._snapshot.index < first <= self.last_index + 1, (
            f"entries start at {first}, outside ({self._snapshot.index}, {self.last_index + 1}]"
        )
        previous_term = self._term_at(first - 1)
        assert previous_term is not None
        for offset, entry in enumerate(entries):
            assert entry.index == first + offset, "entries in one save() must be contiguous"
            assert entry.term >= previous_term, f"log term decreases at index {entry.index}"
            previous_term = entry.term
            if entry.index > self._hard_state.commit:
                continue
            assert self._term_at(entry.index) == entry.term, (
                f"committed entry {entry.index} overwritten with another term"
            )

    def _check_hard_state(self, hard_state: HardState, last_after: int) -> None:
        current = self._hard_state
        assert hard_state.term >= current.term, "term moves back"
        assert hard_state.commit >= current.commit, "commit index moves back"
        assert hard_state.commit <= max(last_after, self._snapshot.index), (
            f"commit {hard_state.commit} beyond last index {last_after}"
        )
        if hard_state.term == current.term and current.vote:
            assert hard_state.vote == current.vote, "vote changed within a term"

    def _check_usable(self) -> None:
        if self._closed:
            raise WalError(f"{self._directory}: WAL is closed")
        if self._failed is not None:
            raise WalError(f"{self._directory}: WAL failed earlier: {self._failed}")

    def _append(self, frame: bytes) -> None:
        if self._segment_size_bytes >= self._segment_bytes_max:
            self._roll()
        try:
            _write_all(self._fd, frame)
        except OSError as exc:
            # the file may now end in a partial frame: never write after it
            self._failed = f"write: {exc}"
            raise
        self._segment_size_bytes += len(frame)
        self._dirty = True

    def _sync(self) -> None:
        try:
            _sync_file(self._fd)
        except OSError as exc:
            # after a failed fsync the page cache state is unknown; retrying can lie
            self._failed = f"fsync: {exc}"
            raise
        self._dirty = False

    def _roll(self) -> None:
        """Close the full segment (durably) and start the next one."""
        if self._dirty:
            self._sync()
        os.close(self._fd)
        self._fd = -1
        tail = self._segments[-1]
        seq, first_index = tail.seq + 1, self.last_index + 1
        info = _SegmentInfo(seq, first_index, self._directory / _segment_name(seq, first_index))
        try:
            _create_segment(self._dir_fd, info, self._snapshot, self._hard_state)
        except OSError as exc:
            self._failed = f"creating {info.path.name}: {exc}"
            raise
        self._segments.append(info)
        self._open_tail()

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Flush anything written with sync=False and release the directory."""
        if self._closed:
            return
        try:
            if self._dirty and self._failed is None:
                self._sync()
        finally:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
            os.close(self._dir_fd)
            os.close(self._lock_fd)

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


# ----------------------------------------------------------------------------- recovery


def _create_segment(dir_fd: int, info: _SegmentInfo, meta: SnapshotMeta, hs: HardState) -> None:
    """Write header and HEAD to a temporary file, fsync, rename into place, fsync dir."""
    head = _frame(_FRAME_HEAD, _encode_snapshot(meta, keep=True) + _encode_hard_state(hs))
    tmp = info.path.with_name(info.path.name + _TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, _segment_header(info.seq, info.first_index) + head)
        _sync_file(fd)
    finally:
        os.close(fd)
    os.rename(tmp, info.path)
    _sync_directory(dir_fd)


def _list_segments(directory: Path, dir_fd: int) -> list[_SegmentInfo]:
    segments: list[_SegmentInfo] = []
    removed_tmp = False
    for path in directory.iterdir():
        if path.name.endswith(_TMP_SUFFIX):  # a segment creation that never completed
            path.unlink()
            removed_tmp = True
            continue
        match = _SEGMENT_NAME.match(path.name)
        if match:
            segments.append(_SegmentInfo(int(match[1], 16), int(match[2], 16), path))
    if removed_tmp:
        _sync_directory(dir_fd)
    segments.sort(key=lambda info: info.seq)
    for previous, info in zip(segments, segments[1:], strict=False):
        if info.seq != previous.seq + 1:
            raise WalCorrupted(info.path, 0, f"segment {previous.seq + 1:016x} is missing")
    return segments


def _recover(directory: Path, dir_fd: int) -> tuple[list[_SegmentInfo], _Replay, str | None]:
    segments = _list_segments(directory, dir_fd)
    replay = _Replay()
    repaired: str | None = None
    for number, info in enumerate(segments):
        is_last = number == len(segments) - 1
        repaired = _replay_segment(info, replay, is_last)
    if segments and replay.missing_upto > replay.snapshot.index:
        raise WalCorrupted(
            segments[0].path,
            0,
            f"entries {replay.snapshot.index + 1}..{replay.missing_upto} are missing "
            "(an older segment was lost)",
        )
    return segments, replay, repaired


def _replay_segment(info: _SegmentInfo, replay: _Replay, is_last: bool) -> str | None:
    """Apply one segment's frames to `replay`; returns a repair note if its tail was torn."""
    path = info.path
    data = path.read_bytes()
    buf = memoryview(data)
    if len(data) < _SEGMENT_HEADER_BYTES:
        raise WalCorrupted(path, 0, "segment header is short")
    magic, version, _reserved, seq, first_index = _SEGMENT_HEADER.unpack_from(buf, 0)
    (header_crc,) = struct.unpack_from("<I", buf, _SEGMENT_HEADER.size)
    if magic != _MAGIC or zlib.crc32(buf[: _SEGMENT_HEADER.size]) != header_crc:
        raise WalCorrupted(path, 0, "bad segment header")
    if version != _VERSION:
        raise WalCorrupted(path, 0, f"unsupported segment version {version}")
    if (seq, first_index) != (info.seq, info.first_index):
        raise WalCorrupted(path, 0, "segment header does not match the file name")
    problem = replay.begin_segment(info)
    if problem:
        raise WalCorrupted(path, 0, problem)

    offset = _SEGMENT_HEADER_BYTES
    first_frame = True
    while offset < len(data):
        found = _frame_at(buf, offset)
        if found is None:
            if first_frame or not is_last:
                raise WalCorrupted(path, offset, "bad frame (short, checksum or header)")
            try:
                later = _valid_frame_after(data, offset)
            except _ScanBudgetExceeded:
                raise WalCorrupted(
                    path, offset, "bad frame followed by too much data to rule out later frames"
                ) from None
            if later is not None:
                raise WalCorrupted(
                    path, offset, f"bad frame followed by a valid frame at offset {later}"
                )
            return _truncate_torn_tail(path, offset, len(data))
        frame_type, end = found
        payload = _Reader(buf[offset + _FRAME_HEADER_BYTES : end])
        if first_frame != (frame_type == _FRAME_HEAD):
            raise WalCorrupted(path, offset, "HEAD frame missing or misplaced")
        try:
            problem = _apply_frame(frame_type, payload, replay, info)
        except _Malformed as exc:
            raise WalCorrupted(path, offset, f"malformed frame: {exc}") from exc
        if problem:
            raise WalCorrupted(path, offset, problem)
        first_frame = False
        offset = end
    if first_frame:
        raise WalCorrupted(path, offset, "segment has no HEAD frame")
    return None


def _apply_frame(
    frame_type: int, reader: _Reader, replay: _Replay, info: _SegmentInfo
) -> str | None:
    if frame_type == _FRAME_HEAD:
        meta, _keep = _decode_snapshot(reader)
        head_hard_state = _decode_hard_state(reader)
        reader.finish()
        return replay.head(meta, head_hard_state)
    if frame_type == _FRAME_SNAPSHOT:
        meta, keep = _decode_snapshot(reader)
        reader.finish()
        return replay.apply_snapshot(meta, keep)
    entries, hard_state = _decode_save(reader)
    reader.finish()
    if entries:
        problem = replay.apply_entries(entries)
        if problem:
            return problem
        info.entry_index_max = max(info.entry_index_max, entries[-1].index)
    if hard_state is not None:
        replay.hard_state = hard_state
    return None


def _truncate_torn_tail(path: Path, offset: int, size: int) -> str:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return f"{path.name}: truncated a torn tail of {size - offset} bytes at byte offset {offset}"
