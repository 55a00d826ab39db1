"""The Raft write-ahead log: round trips, overwrite semantics, torn tails, corruption,
rollover and compaction, and kill -9 of a real writer process."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.wal import bench_wal
from exchange.raft import wal as wal_module
from exchange.raft.types import ConfState, Entry, EntryKind, HardState, SnapshotMeta
from exchange.raft.wal import (
    RecoveredState,
    WalBatchTooLarge,
    WalCorrupted,
    WalError,
    WriteAheadLog,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
SEGMENT_HEADER_BYTES = 32
FRAME_HEADER_BYTES = 9


def _data(index: int) -> bytes:
    return hashlib.blake2b(str(index).encode(), digest_size=16).digest() * (1 + index % 3)


def _entries(first: int, count: int, term: int = 1) -> list[Entry]:
    return [Entry(term=term, index=i, data=_data(i)) for i in range(first, first + count)]


def _segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wal"))


def _reopen(directory: Path, **kwargs: int) -> RecoveredState:
    wal, state = WriteAheadLog.open(directory, **kwargs)
    wal.close()
    return state


@dataclass
class _Written:
    """A log written with one save per batch and the segment size after each save."""

    directory: Path
    states: list[list[Entry]] = field(default_factory=list)  # entries after each save
    sizes: list[int] = field(default_factory=list)  # last segment's size after each save


def _write_batches(directory: Path, batches: int, segment_bytes_max: int = 1 << 20) -> _Written:
    written = _Written(directory)
    wal, _ = WriteAheadLog.open(directory, segment_bytes_max=segment_bytes_max)
    with wal:
        log: list[Entry] = []
        for number in range(batches):
            batch = _entries(len(log) + 1, 3)
            wal.save(HardState(term=1, vote="n1", commit=number), batch)
            log = log + batch
            written.states.append(log)
            written.sizes.append(_segments(directory)[-1].stat().st_size)
    return written


# ----------------------------------------------------------------------------- round trips


def test_empty_directory_opens_to_empty_state(tmp_path: Path) -> None:
    wal, state = WriteAheadLog.open(tmp_path / "wal")
    with wal:
        assert state == RecoveredState(HardState(), SnapshotMeta(), [], None)
        assert wal.last_index == 0
    assert _reopen(tmp_path / "wal") == state


def test_reopen_returns_saved_entries_and_hard_state(tmp_path: Path) -> None:
    entries = [
        Entry(term=1, index=1, kind=EntryKind.NOOP),
        Entry(term=1, index=2, kind=EntryKind.NORMAL, data=b"block"),
        Entry(term=2, index=3, kind=EntryKind.CONFIG, data=bytes(range(256)) * 4),
    ]
    hard_state = HardState(term=2, vote="agency-é", commit=2)
    with WriteAheadLog.open(tmp_path)[0] as wal:
        wal.save(None, entries[:1])
        wal.save(hard_state, entries[1:])
        assert wal.last_index == 3
    state = _reopen(tmp_path)
    assert state.entries == entries
    assert state.hard_state == hard_state
    assert state.repaired is None


def test_save_is_one_write_and_one_fsync(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wal, _ = WriteAheadLog.open(tmp_path)
    calls: list[str] = []
    real_write, real_fdatasync = os.write, os.fdatasync

    def write(fd: int, data: bytes) -> int:
        calls.append("write")
        return real_write(fd, data)

    def fdatasync(fd: int) -> None:
        calls.append("fsync")
        real_fdatasync(fd)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    with wal:
        wal.save(HardState(term=1, commit=500), _entries(1, 500))
        assert calls == ["write", "fsync"]
        calls.clear()
        wal.save(None, _entries(501, 10), sync=False)
        wal.save(HardState(term=1, commit=510), [], sync=False)
        assert calls == ["write", "write"]
        wal.save(None, [])  # flushes what sync=False left
        assert calls == ["write", "write", "fsync"]
        calls.clear()
        wal.save(None, [])
        assert calls == []
    monkeypatch.undo()
    assert _reopen(tmp_path).hard_state.commit == 510


def test_unsynced_saves_are_flushed_by_close(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path)[0] as wal:
        wal.save(HardState(term=3), _entries(1, 5, term=3), sync=False)
    state = _reopen(tmp_path)
    assert state.entries == _entries(1, 5, term=3)
    assert state.hard_state.term == 3


def test_overwrite_discards_entries_from_the_conflict_index_across_reopen(
    tmp_path: Path,
) -> None:
    with WriteAheadLog.open(tmp_path)[0] as wal:
        wal.save(None, _entries(1, 10, term=1))
    with WriteAheadLog.open(tmp_path)[0] as wal:
        wal.save(None, _entries(6, 2, term=2))  # a new leader's entries replace 6..10
        assert wal.last_index == 7
    assert _reopen(tmp_path).entries == _entries(1, 5, term=1) + _entries(6, 2, term=2)


def test_second_open_of_the_same_directory_is_refused(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path)[0], pytest.raises(WalError, match="another process"):
        WriteAheadLog.open(tmp_path)
    _reopen(tmp_path)  # released by close


def test_closed_log_refuses_writes(tmp_path: Path) -> None:
    wal, _ = WriteAheadLog.open(tmp_path)
    wal.close()
    wal.close()
    with pytest.raises(WalError, match="closed"):
        wal.save(None, _entries(1, 1))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([Entry(term=1, index=1), Entry(term=1, index=3)], "contiguous"),
        ([Entry(term=1, index=3)], "outside"),
        ([Entry(term=2, index=1), Entry(term=1, index=2)], "term decreases"),
    ],
)
def test_save_rejects_entries_that_break_the_log(
    tmp_path: Path, entries: list[Entry], message: str
) -> None:
    with WriteAheadLog.open(tmp_path)[0] as wal, pytest.raises(AssertionError, match=message):
        wal.save(None, entries)


def test_save_rejects_hard_state_moving_back_or_overwriting_committed_entries(
    tmp_path: Path,
) -> None:
    with WriteAheadLog.open(tmp_path)[0] as wal:
        wal.save(HardState(term=2, vote="n1", commit=3), _entries(1, 3, term=2))
        with pytest.raises(AssertionError, match="term moves back"):
            wal.save(HardState(term=1), [])
        with pytest.raises(AssertionError, match="commit index moves back"):
            wal.save(HardState(term=2, vote="n1", commit=2), [])
        with pytest.raises(AssertionError, match="vote changed"):
            wal.save(HardState(term=2, vote="n2", commit=3), [])
        with pytest.raises(AssertionError, match="committed entry"):
            wal.save(None, _entries(3, 1, term=3))
        with pytest.raises(AssertionError, match="conflicts with committed"):
            wal.save_snapshot(SnapshotMeta(index=2, term=1))
        wal.save_snapshot(SnapshotMeta(index=2, term=2))
        with pytest.raises(AssertionError, match="snapshot moves back"):
            wal.save_snapshot(SnapshotMeta(index=1, term=2))
        wal.save(None, _entries(3, 1, term=2))  # the same committed entry again is fine
    state = _reopen(tmp_path)
    assert state.snapshot == SnapshotMeta(index=2, term=2)
    assert state.entries == _entries(3, 1, term=2)


def test_oversized_batch_is_refused_and_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wal_module, "FRAME_PAYLOAD_BYTES_MAX", 1000)
    with WriteAheadLog.open(tmp_path)[0] as wal:
        with pytest.raises(WalBatchTooLarge):
            wal.save(None, _entries(1, 100))
        assert wal.last_index == 0
        wal.save(None, _entries(1, 2))
    assert _reopen(tmp_path).entries == _entries(1, 2)


# ----------------------------------------------------------------------------- model


@dataclass
class _Model:
    """The log as Raft sees it, with no files."""

    snapshot: SnapshotMeta = field(default_factory=SnapshotMeta)
    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)

    @property
    def last_index(self) -> int:
        return self.entries[-1].index if self.entries else self.snapshot.index

    def term_at(self, index: int) -> int | None:
        if index == self.snapshot.index:
            return self.snapshot.term
        if self.snapshot.index < index <= self.last_index:
            return self.entries[index - self.snapshot.index - 1].term
        return None

    def save(self, hard_state: HardState | None, entries: list[Entry]) -> None:
        if entries:
            self.entries = self.entries[: entries[0].index - self.snapshot.index - 1] + entries
        if hard_state is not None:
            self.hard_state = hard_state

    def save_snapshot(self, meta: SnapshotMeta) -> None:
        keep = self.term_at(meta.index) == meta.term
        self.entries = [e for e in self.entries if e.index > meta.index] if keep else []
        self.snapshot = meta


def _assert_matches(state: RecoveredState, model: _Model) -> None:
    assert state.snapshot == model.snapshot
    assert state.hard_state == model.hard_state
    assert state.entries == model.entries
    assert state.repaired is None


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_replay_matches_an_in_memory_model_through_overwrites_snapshots_and_reopens(
    data: st.DataObject,
) -> None:
    segment_bytes_max = data.draw(st.sampled_from([200, 600, 1 << 20]), label="segment")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model = _Model()
        wal, state = WriteAheadLog.open(directory, segment_bytes_max=segment_bytes_max)
        try:
            for _ in range(data.draw(st.integers(1, 40), label="steps")):
                operation = data.draw(st.sampled_from(["save", "save", "save", "snap", "reopen"]))
                if operation == "reopen":
                    wal.close()
                    wal, state = WriteAheadLog.open(directory, segment_bytes_max=segment_bytes_max)
                    _assert_matches(state, model)
                elif operation == "save":
                    entries, hard_state = _draw_save(data, model)
                    wal.save(hard_state, entries, sync=data.draw(st.booleans(), label="sync"))
                    model.save(hard_state, entries)
                else:
                    meta = _draw_snapshot(data, model)
                    wal.save_snapshot(meta)
                    model.save_snapshot(meta)
                assert wal.last_index == model.last_index
        finally:
            wal.close()
        _assert_matches(_reopen(directory, segment_bytes_max=segment_bytes_max), model)


def _draw_save(data: st.DataObject, model: _Model) -> tuple[list[Entry], HardState | None]:
    low = max(model.snapshot.index, model.hard_state.commit) + 1
    first = data.draw(st.integers(low, model.last_index + 1), label="first")
    term = model.term_at(first - 1)
    assert term is not None
    entries = []
    for index in range(first, first + data.draw(st.integers(0, 4), label="count")):
        term += data.draw(st.integers(0, 1), label="term step")
        payload = data.draw(st.binary(max_size=40), label="data")
        entries.append(Entry(term=term, index=index, kind=EntryKind(index % 3), data=payload))
    if data.draw(st.booleans(), label="with hard state"):
        old = model.hard_state
        new_term = max(old.term, term) + data.draw(st.integers(0, 1), label="hs term")
        vote = old.vote
        if new_term != old.term or not old.vote:
            vote = data.draw(st.sampled_from(["", "n1", "n2"]), label="vote")
        last = entries[-1].index if entries else model.last_index
        commit = data.draw(st.integers(old.commit, max(last, model.snapshot.index)))
        return entries, HardState(term=new_term, vote=vote, commit=commit)
    return entries, None


def _draw_snapshot(data: st.DataObject, model: _Model) -> SnapshotMeta:
    index = data.draw(st.integers(model.snapshot.index, model.last_index + 2), label="snap")
    term = model.term_at(index)
    if term is None:  # beyond the log: a snapshot received from the leader
        term = (model.term_at(model.last_index) or 0) + data.draw(st.integers(0, 1))
    elif index > max(model.snapshot.index, model.hard_state.commit) and (
        data.draw(st.integers(0, 3), label="mismatch") == 0
    ):
        term += 1  # a leader's snapshot conflicting with uncommitted entries
    voters = tuple(data.draw(st.lists(st.sampled_from(["n1", "n2", "n3", "n4"]), max_size=4)))
    return SnapshotMeta(index=index, term=term, conf=ConfState(voters=voters, learners=("l",)))


# ----------------------------------------------------------------------------- torn tails


@pytest.mark.parametrize("trailer", ["none", "zeros", "garbage"])
def test_cut_anywhere_in_the_last_frame_is_repaired_to_the_previous_save(
    tmp_path: Path, trailer: str
) -> None:
    written = _write_batches(tmp_path / "wal", batches=4)
    segment = _segments(written.directory)[-1]
    pristine = segment.read_bytes()
    frame_start, frame_end = written.sizes[-2], written.sizes[-1]
    rng = random.Random(trailer)
    for cut in range(frame_start, frame_end + 1):
        if trailer == "zeros":
            tail = bytes(rng.randint(1, 5000))
        elif trailer == "garbage":
            tail = rng.randbytes(rng.randint(1, 300))
        else:
            tail = b""
        segment.write_bytes(pristine[:cut] + tail)
        state = _reopen(written.directory)
        complete = cut == frame_end
        assert state.entries == written.states[-1 if complete else -2], cut
        assert state.hard_state.commit == (3 if complete else 2)
        if cut in (frame_start, frame_end) and not tail:
            assert state.repaired is None
        else:
            assert state.repaired is not None
            assert f"at byte offset {frame_end if complete else frame_start}" in state.repaired
            assert segment.name in state.repaired
        assert segment.stat().st_size == (frame_end if complete else frame_start)


def test_log_repaired_from_a_torn_tail_accepts_new_saves(tmp_path: Path) -> None:
    written = _write_batches(tmp_path, batches=3)
    segment = _segments(tmp_path)[-1]
    with segment.open("r+b") as file:
        file.truncate(written.sizes[-1] - 5)
    wal, state = WriteAheadLog.open(tmp_path)
    with wal:
        assert state.repaired is not None
        assert state.entries == written.states[-2]
        wal.save(None, _entries(wal.last_index + 1, 2))
    again = _reopen(tmp_path)
    assert again.repaired is None
    assert again.entries == written.states[-2] + _entries(len(written.states[-2]) + 1, 2)


def test_flipped_byte_in_the_last_frame_is_treated_as_a_torn_write(tmp_path: Path) -> None:
    # A damaged last frame cannot be told from a torn write of it: the batch is dropped.
    written = _write_batches(tmp_path, batches=3)
    segment = _segments(tmp_path)[-1]
    pristine = segment.read_bytes()
    for position in range(written.sizes[-2], written.sizes[-1]):
        damaged = bytearray(pristine)
        damaged[position] ^= 0xFF
        segment.write_bytes(bytes(damaged))
        state = _reopen(tmp_path)
        assert state.entries == written.states[-2]
        assert state.repaired is not None


def test_torn_tail_scan_reports_corruption_rather_than_truncate_past_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = _write_batches(tmp_path, batches=2)
    segment = _segments(tmp_path)[-1]
    # a bad frame, then something shaped like a frame (type byte, fitting length) whose
    # checksum the scan must compute to rule it out
    lookalike = struct.pack("<IIB", 10, 0, 0xB1) + b"x" * 10 + bytes(9)
    with segment.open("ab") as file:
        file.write(b"\xff" * 5 + lookalike)
    monkeypatch.setattr(wal_module, "SCAN_CHECKSUM_BYTES_MAX", 5)
    with pytest.raises(WalCorrupted, match="too much data") as caught:
        _reopen(tmp_path)
    assert caught.value.offset == written.sizes[-1]
    monkeypatch.undo()
    state = _reopen(tmp_path)
    assert state.repaired is not None
    assert state.entries == written.states[-1]


# ----------------------------------------------------------------------------- corruption


def test_flipped_byte_in_a_non_tail_frame_raises_corrupted_naming_file_and_offset(
    tmp_path: Path,
) -> None:
    written = _write_batches(tmp_path, batches=4)
    segment = _segments(tmp_path)[-1]
    pristine = segment.read_bytes()
    frame_start, frame_end = written.sizes[1], written.sizes[2]  # the third of four saves
    for position in range(frame_start, frame_end):
        damaged = bytearray(pristine)
        damaged[position] ^= 0x01 << (position % 8)
        segment.write_bytes(bytes(damaged))
        with pytest.raises(WalCorrupted) as caught:
            _reopen(tmp_path)
        assert caught.value.path == segment
        assert caught.value.offset == frame_start, position
        assert f"{segment}: corrupted at byte offset {frame_start}" in str(caught.value)
    segment.write_bytes(pristine)
    assert _reopen(tmp_path).entries == written.states[-1]


def test_damage_to_the_last_frame_of_an_older_segment_is_corruption(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes_max=300)[0] as wal:
        for first in range(1, 40, 3):
            wal.save(HardState(term=1, commit=first - 1), _entries(first, 3))
    segments = _segments(tmp_path)
    assert len(segments) >= 3
    older = segments[-2]
    pristine = older.read_bytes()
    for cut in (len(pristine) - 1, len(pristine) - FRAME_HEADER_BYTES - 20):
        older.write_bytes(pristine[:cut])
        with pytest.raises(WalCorrupted) as caught:
            _reopen(tmp_path, segment_bytes_max=300)
        assert caught.value.path == older
    damaged = bytearray(pristine)
    damaged[-1] ^= 0xFF
    older.write_bytes(bytes(damaged))
    with pytest.raises(WalCorrupted, match=older.name):
        _reopen(tmp_path, segment_bytes_max=300)


@pytest.mark.parametrize("position", [0, 9, 20, SEGMENT_HEADER_BYTES, SEGMENT_HEADER_BYTES + 12])
def test_damaged_segment_header_or_head_frame_is_corruption(tmp_path: Path, position: int) -> None:
    _write_batches(tmp_path, batches=1)
    segment = _segments(tmp_path)[-1]
    damaged = bytearray(segment.read_bytes())
    damaged[position] ^= 0xFF
    segment.write_bytes(bytes(damaged))
    with pytest.raises(WalCorrupted) as caught:
        _reopen(tmp_path)
    assert caught.value.path == segment
    assert caught.value.offset == (0 if position < SEGMENT_HEADER_BYTES else SEGMENT_HEADER_BYTES)


def test_missing_segment_is_corruption(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes_max=300)[0] as wal:
        for first in range(1, 40, 3):
            wal.save(None, _entries(first, 3))
    segments = _segments(tmp_path)
    segments[1].unlink()
    with pytest.raises(WalCorrupted, match="is missing"):
        _reopen(tmp_path)
    segments[0].unlink()  # now the oldest kept segment starts after entries never snapshotted
    with pytest.raises(WalCorrupted, match="missing"):
        _reopen(tmp_path)


# ----------------------------------------------------------------------------- segments


def test_segments_roll_over_and_compaction_deletes_only_covered_segments(tmp_path: Path) -> None:
    entries = _entries(1, 200)
    with WriteAheadLog.open(tmp_path, segment_bytes_max=600)[0] as wal:
        for first in range(1, 201, 5):
            wal.save(HardState(term=1, vote="n1", commit=first + 4), entries[first - 1 : first + 4])
        before = _segments(tmp_path)
        assert len(before) > 10
        assert all(path.stat().st_size < 600 + 400 for path in before)
        wal.save_snapshot(SnapshotMeta(index=150, term=1, conf=ConfState(voters=("n1", "n2"))))
        after = _segments(tmp_path)
        deleted = [path for path in before if path not in after]
        assert deleted == before[: len(deleted)]  # the oldest go first
        assert len(deleted) > len(before) / 2
        # the oldest kept segment still holds entries above the snapshot
        assert int(after[0].name.split("-")[1].removesuffix(".wal"), 16) <= 151
    state = _reopen(tmp_path, segment_bytes_max=600)
    assert state.snapshot == SnapshotMeta(index=150, term=1, conf=ConfState(voters=("n1", "n2")))
    assert state.entries == entries[150:]
    assert state.hard_state == HardState(term=1, vote="n1", commit=200)


def test_snapshot_covering_every_segment_leaves_state_in_the_newest_head(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path, segment_bytes_max=400)[0] as wal:
        for first in range(1, 60, 3):
            wal.save(HardState(term=2, vote="n3", commit=first + 2), _entries(first, 3, term=2))
        wal.save_snapshot(SnapshotMeta(index=60, term=2))
        wal.save(None, _entries(61, 3, term=2))  # rolls: the new HEAD carries the snapshot
        wal.save_snapshot(SnapshotMeta(index=61, term=2))
        assert len(_segments(tmp_path)) == 1
    state = _reopen(tmp_path, segment_bytes_max=400)
    assert state.snapshot == SnapshotMeta(index=61, term=2)
    assert state.hard_state == HardState(term=2, vote="n3", commit=60)
    assert state.entries == _entries(62, 2, term=2)


def test_snapshot_beyond_the_last_index_discards_all_entries(tmp_path: Path) -> None:
    with WriteAheadLog.open(tmp_path)[0] as wal:
        wal.save(HardState(term=1, commit=2), _entries(1, 5))
        wal.save_snapshot(SnapshotMeta(index=100, term=3))
        assert wal.last_index == 100
        wal.save(HardState(term=3, commit=100), _entries(101, 2, term=3))
    state = _reopen(tmp_path)
    assert state.snapshot.index == 100
    assert state.entries == _entries(101, 2, term=3)


def test_snapshot_whose_term_differs_from_the_log_discards_the_entries_after_it(
    tmp_path: Path,
) -> None:
    with WriteAheadLog.open(tmp_path)[0] as wal:
        wal.save(None, _entries(1, 10, term=1))
        wal.save_snapshot(SnapshotMeta(index=4, term=1))  # matches: 5..10 stay
        wal.save_snapshot(SnapshotMeta(index=6, term=2))  # conflicts: 7..10 go
        assert wal.last_index == 6
    state = _reopen(tmp_path)
    assert state.snapshot == SnapshotMeta(index=6, term=2)
    assert state.entries == []


# ----------------------------------------------------------------------------- kill -9

_WRITER = textwrap.dedent(
    """
    import hashlib, random, sys
    from pathlib import Path
    from exchange.raft.types import Entry, HardState, SnapshotMeta
    from exchange.raft.wal import WriteAheadLog

    def data(index):
        return hashlib.blake2b(str(index).encode(), digest_size=16).digest() * (1 + index % 3)

    rng = random.Random(int(sys.argv[2]))
    wal, state = WriteAheadLog.open(Path(sys.argv[1]), segment_bytes_max=32 * 1024)
    last = wal.last_index
    print("ready", flush=True)
    while True:
        count = rng.choice([1, 5, 50, 400])
        entries = [Entry(term=1, index=i, data=data(i)) for i in range(last + 1, last + 1 + count)]
        last += count
        wal.save(HardState(term=1, vote="n1", commit=last), entries)
        print(last, flush=True)
        if rng.random() < 0.05 and last > 300:
            wal.save_snapshot(SnapshotMeta(index=last - 300, term=1))
    """
)


def _acknowledged(output: Path) -> int:
    lines = output.read_text().split("\n")[:-1]  # only complete lines
    return max((int(line) for line in lines if line.isdigit()), default=0)


def test_every_acknowledged_entry_survives_kill_9_of_the_writer(tmp_path: Path) -> None:
    rng = random.Random(1105)
    directory = tmp_path / "wal"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    acknowledged_max = 0
    deadline = time.monotonic() + 15
    for round_number in range(5):
        output = tmp_path / f"acks-{round_number}.txt"
        with output.open("w") as stdout:
            child = subprocess.Popen(
                [sys.executable, "-c", _WRITER, str(directory), str(round_number)],
                stdout=stdout,
                env=env,
            )
        try:
            while "ready" not in output.read_text():
                assert child.poll() is None, "writer exited"
                assert time.monotonic() < deadline, "writer did not start"
                time.sleep(0.005)
            time.sleep(rng.uniform(0.02, 0.3))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        # acknowledgements from every earlier writer must survive too
        acknowledged_max = max(acknowledged_max, _acknowledged(output))
        state = _reopen(directory, segment_bytes_max=32 * 1024)
        assert state.hard_state.commit >= acknowledged_max
        last = state.entries[-1].index if state.entries else state.snapshot.index
        assert last >= acknowledged_max
        assert [entry.index for entry in state.entries] == list(
            range(state.snapshot.index + 1, last + 1)
        )
        for entry in state.entries:
            assert entry.term == 1
            assert entry.data == _data(entry.index), entry.index
    assert acknowledged_max > 0


# ----------------------------------------------------------------------------- bench


def test_bench_wal_reports_rates(tmp_path: Path) -> None:
    result = bench_wal(tmp_path / "bench", entries=300, batch=100)
    assert result["entries"] == 300
    assert result["entries_per_s"] > 0
    assert result["fsyncs_per_s"] == pytest.approx(result["saves_per_s"])
    assert _reopen(tmp_path / "bench").entries[-1].index == 300
