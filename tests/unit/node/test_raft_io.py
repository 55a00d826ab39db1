"""The node's Raft Storage over the write-ahead log (exchange.node.raft_io): which
Readies need an fsync before their messages go out (etcd's rule), and that a Ready
written without one is still in the log."""

from __future__ import annotations

from pathlib import Path

from exchange.node.raft_io import WalStorage
from exchange.raft.core import Ready
from exchange.raft.types import Entry, HardState
from exchange.raft.wal import WriteAheadLog


def _ready(hard_state: HardState | None, entries: tuple[Entry, ...] = ()) -> Ready:
    return Ready(soft_state=None, hard_state=hard_state, snapshot=None,
                 entries_to_persist=entries, committed_entries=(), messages=())


def test_entries_a_new_term_or_a_vote_need_an_fsync_a_commit_alone_does_not(
        tmp_path: Path) -> None:
    wal, _ = WriteAheadLog.open(tmp_path / "raft")
    storage = WalStorage(wal)
    first = (Entry(term=2, index=1, data=b"block"),)
    assert storage.needs_sync(_ready(HardState(term=2, vote="tax"), first))
    storage.write(_ready(HardState(term=2, vote="tax"), first))
    assert storage.needs_sync(_ready(None, (Entry(term=2, index=2),)))
    assert storage.needs_sync(_ready(HardState(term=3, vote="", commit=0)))
    assert storage.needs_sync(_ready(HardState(term=2, vote="police", commit=0)))
    assert not storage.needs_sync(_ready(HardState(term=2, vote="tax", commit=1)))
    assert not storage.needs_sync(_ready(None))
    wal.close()


def test_a_commit_written_without_fsync_is_in_the_log_after_a_clean_reopen(
        tmp_path: Path) -> None:
    wal, _ = WriteAheadLog.open(tmp_path / "raft")
    storage = WalStorage(wal)
    storage.write(_ready(HardState(term=2, vote="tax"), (Entry(term=2, index=1),)))
    storage.write(_ready(HardState(term=2, vote="tax", commit=1)))
    wal.close()
    _, recovered = WriteAheadLog.open(tmp_path / "raft")
    assert recovered.hard_state == HardState(term=2, vote="tax", commit=1)
    assert [e.index for e in recovered.entries] == [1]
