"""The in-memory Raft log is bounded by bytes as well as entries (issue 16, item 3)."""

from __future__ import annotations

from exchange.raft.raft_log import ENTRY_OVERHEAD_BYTES, RaftLog
from exchange.raft.types import ConfState, Entry, SnapshotMeta

MIB = 1 << 20


def _log_of(sizes: list[int]) -> RaftLog:
    log = RaftLog(SnapshotMeta(), [], ConfState(voters=("a",)))
    log.append([Entry(term=1, index=i + 1, data=b"x" * size) for i, size in enumerate(sizes)])
    return log


def test_log_counts_the_bytes_it_holds_through_append_truncate_and_compact() -> None:
    log = _log_of([MIB] * 10)
    assert log.bytes_held == 10 * (MIB + ENTRY_OVERHEAD_BYTES)
    log.append([Entry(term=2, index=6, data=b"y")])  # a conflict drops entries 6..10
    assert log.bytes_held == 5 * (MIB + ENTRY_OVERHEAD_BYTES) + 1 + ENTRY_OVERHEAD_BYTES
    log.commit_to(6)
    log.applied = 6
    log.compact(4)
    assert log.bytes_held == MIB + 1 + 2 * ENTRY_OVERHEAD_BYTES


def test_compaction_point_keeps_no_more_applied_bytes_than_asked() -> None:
    log = _log_of([MIB] * 100)
    log.commit_to(100)
    log.applied = 100
    # entries alone would keep 50 (50 MiB); the byte bound keeps only 4
    index = log.index_keeping(entries_keep=50, bytes_keep=4 * MIB + 4 * ENTRY_OVERHEAD_BYTES)
    assert index == 96
    log.compact(index)
    assert log.bytes_held <= 4 * MIB + 4 * ENTRY_OVERHEAD_BYTES
    # small entries: the entry count bounds what is kept
    small = _log_of([10] * 100)
    small.commit_to(100)
    small.applied = 100
    assert small.index_keeping(entries_keep=50, bytes_keep=MIB) == 50
