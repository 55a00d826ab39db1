"""The in-memory Raft log of one node: entries after the compaction point, what of them
is durable, committed and applied, and the configuration they imply.

Index bookkeeping (all monotonic except `last_index`, which a follower's conflict
truncation can lower, never below `committed`)::

    snapshot.index <= applied <= applying <= committed <= last_index
    (applied < snapshot.index only while a snapshot's state is being transferred)

`unstable_from` is the first index not yet known to be durable; `RaftNode.ready()` hands
out entries from there on and `RaftNode.advance()` moves it forward.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

from exchange.raft.confchange import decode_conf_entry
from exchange.raft.types import ConfState, Entry, EntryKind, SnapshotMeta

__all__ = ["ENTRY_OVERHEAD_BYTES", "RaftLog", "entry_size_bytes"]

# Framing estimate per entry (term, index, kind, length) for message size limits.
ENTRY_OVERHEAD_BYTES = 24


def entry_size_bytes(entry: Entry) -> int:
    return len(entry.data) + ENTRY_OVERHEAD_BYTES


def _term_of(entry: Entry) -> int:
    return entry.term


def check_contiguous(entries: Sequence[Entry], after_index: int, after_term: int) -> None:
    """ValueError unless entries follow (after_index, after_term) without gap and with
    non-decreasing terms (the shape of every Raft log)."""
    previous_term = after_term
    for offset, entry in enumerate(entries):
        if entry.index != after_index + 1 + offset:
            raise ValueError(f"entry index {entry.index}, expected {after_index + 1 + offset}")
        if entry.term < previous_term:
            raise ValueError(f"entry term {entry.term} at index {entry.index} moves back")
        if not isinstance(entry.kind, EntryKind):
            raise ValueError(f"entry {entry.index} has kind {entry.kind!r}")
        if entry.kind is EntryKind.CONFIG:
            decode_conf_entry(entry.data)  # raises InvalidConfEntry (a ValueError)
        previous_term = entry.term


class RaftLog:
    """Entries after the compaction point, plus commit/apply/durability bookkeeping."""

    def __init__(
        self, snapshot: SnapshotMeta, entries: Sequence[Entry], initial_conf: ConfState
    ) -> None:
        check_contiguous(entries, snapshot.index, snapshot.term)
        self._snapshot = snapshot
        self._entries: list[Entry] = list(entries)
        self._bytes = sum(entry_size_bytes(e) for e in self._entries)
        self._base_conf = snapshot.conf if snapshot.conf.voters else initial_conf
        self._conf_entries: list[tuple[int, ConfState]] = []
        self._note_conf_entries(self._entries)
        self.committed = snapshot.index
        self.applied = snapshot.index
        self.applying = snapshot.index
        self.unstable_from = self.last_index + 1
        self.snapshot_unpersisted = False

    # ------------------------------------------------------------------ reading

    @property
    def snapshot(self) -> SnapshotMeta:
        return self._snapshot

    @property
    def first_index(self) -> int:
        return self._snapshot.index + 1

    @property
    def last_index(self) -> int:
        return self._snapshot.index + len(self._entries)

    @property
    def bytes_held(self) -> int:
        """Size of the entries held in memory (data plus framing estimate)."""
        return self._bytes

    def index_keeping(self, entries_keep: int, bytes_keep: int) -> int:
        """The highest index up to which the log may be compacted so that at most
        `entries_keep` applied entries, and no more than `bytes_keep` bytes of them, stay
        held behind the applied index (what a lagging follower may still need)."""
        index = self.applied
        kept_bytes = 0
        base = self._snapshot.index + 1
        while index > self._snapshot.index and self.applied - index < entries_keep:
            size = entry_size_bytes(self._entries[index - base])
            if kept_bytes + size > bytes_keep:
                break
            kept_bytes += size
            index -= 1
        return index

    @property
    def last_term(self) -> int:
        return self._entries[-1].term if self._entries else self._snapshot.term

    def term_at(self, index: int) -> int | None:
        """The term of the entry at `index`, None if compacted away or not (yet) held."""
        if index == self._snapshot.index:
            return self._snapshot.term
        offset = index - self._snapshot.index - 1
        if 0 <= offset < len(self._entries):
            return self._entries[offset].term
        return None

    def match_term(self, index: int, term: int) -> bool:
        return self.term_at(index) == term

    def is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Raft 5.4.1: is a log ending at (last_index, last_term) at least as up to date?"""
        return last_term > self.last_term or (
            last_term == self.last_term and last_index >= self.last_index
        )

    def slice(self, lo: int, hi: int) -> tuple[Entry, ...]:
        """Entries with lo <= index < hi, all of which must be held."""
        assert self.first_index <= lo <= hi <= self.last_index + 1, (lo, hi)
        base = self._snapshot.index + 1
        return tuple(self._entries[lo - base : hi - base])

    def entries_for_append(self, lo: int, count_max: int, bytes_max: int) -> tuple[Entry, ...]:
        """Up to count_max entries from lo whose sizes sum to at most bytes_max (but at
        least one entry, however large, if there is any)."""
        if lo > self.last_index:
            return ()
        base = self._snapshot.index + 1
        start = lo - base
        assert start >= 0, (lo, self.first_index)
        out: list[Entry] = []
        size = 0
        for entry in self._entries[start : start + count_max]:
            size += entry_size_bytes(entry)
            if out and size > bytes_max:
                break
            out.append(entry)
        return tuple(out)

    def find_conflict(self, entries: Sequence[Entry]) -> int:
        """Index of the first entry not matching this log (0 if all match)."""
        for entry in entries:
            if not self.match_term(entry.index, entry.term):
                return entry.index
        return 0

    def find_conflict_by_term(self, index: int, term: int) -> tuple[int, int]:
        """The largest i <= index with term_at(i) <= term, and that term (etcd's
        findConflictByTerm). A compacted or unknown index is returned with term 0: it
        might match."""
        if index > self.last_index or index < self._snapshot.index:
            return index, 0
        if self._snapshot.term > term:
            if self._snapshot.index == 0:
                return 0, 0
            return self._snapshot.index - 1, 0
        # Terms never decrease along a log, so the candidates form a prefix: bisect.
        hi = index - self._snapshot.index  # entries[:hi] hold indexes first..index
        count = bisect_right(self._entries, term, 0, hi, key=_term_of)
        found = self._snapshot.index + count
        return found, self.term_at(found) or 0

    @property
    def conf_state(self) -> ConfState:
        """The configuration in effect: the latest CONFIG entry, committed or not."""
        return self._conf_entries[-1][1] if self._conf_entries else self._base_conf

    @property
    def conf_index(self) -> int:
        """Index of the CONFIG entry in effect (the snapshot index if none is held)."""
        return self._conf_entries[-1][0] if self._conf_entries else self._snapshot.index

    def conf_at(self, index: int) -> ConfState:
        conf = self._base_conf
        for conf_index, state in self._conf_entries:
            if conf_index > index:
                break
            conf = state
        return conf

    def unstable_entries(self) -> tuple[Entry, ...]:
        if self.unstable_from > self.last_index:
            return ()
        return self.slice(max(self.unstable_from, self.first_index), self.last_index + 1)

    def has_unstable(self) -> bool:
        return self.unstable_from <= self.last_index

    def next_committed_entries(self, count_max: int) -> tuple[Entry, ...]:
        """Committed entries not yet handed to the application; none while the state
        machine lags the snapshot (its state is being transferred)."""
        if self.applied < self._snapshot.index:
            return ()
        lo = self.applying + 1
        hi = min(self.committed, self.applying + count_max)
        if hi < lo:
            return ()
        return self.slice(lo, hi + 1)

    def has_next_committed(self) -> bool:
        return self.applied >= self._snapshot.index and self.committed > self.applying

    # ------------------------------------------------------------------ writing

    def _note_conf_entries(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            if entry.kind is EntryKind.CONFIG:
                _, conf = decode_conf_entry(entry.data)
                self._conf_entries.append((entry.index, conf))

    def append(self, entries: Sequence[Entry]) -> None:
        """Append entries, first discarding any held at or after entries[0].index."""
        if not entries:
            return
        first = entries[0].index
        assert self.first_index <= first <= self.last_index + 1, (first, self.last_index)
        assert first > self.committed, f"overwriting committed entry {first}"
        previous_term = self.term_at(first - 1)
        assert previous_term is not None
        check_contiguous(entries, first - 1, previous_term)
        dropped = self._entries[first - self._snapshot.index - 1 :]
        self._bytes -= sum(entry_size_bytes(e) for e in dropped)
        del self._entries[first - self._snapshot.index - 1 :]
        while self._conf_entries and self._conf_entries[-1][0] >= first:
            self._conf_entries.pop()
        self._entries.extend(entries)
        self._bytes += sum(entry_size_bytes(e) for e in entries)
        self._note_conf_entries(entries)
        self.unstable_from = min(self.unstable_from, first)

    def maybe_append(
        self, prev_index: int, prev_term: int, commit: int, entries: Sequence[Entry]
    ) -> int | None:
        """AppendEntries receiver rules 2-5. Returns the last index known to match the
        leader, or None if the log does not hold (prev_index, prev_term)."""
        if not self.match_term(prev_index, prev_term):
            return None
        last_new = prev_index + len(entries)
        conflict = self.find_conflict(entries)
        if conflict:
            assert conflict > self.committed, (
                f"entry {conflict} conflicts with committed prefix (commit {self.committed})"
            )
            self.append(entries[conflict - prev_index - 1 :])
        self.commit_to(min(commit, last_new))
        return last_new

    def commit_to(self, index: int) -> None:
        if index > self.committed:
            assert index <= self.last_index, f"commit {index} beyond last index {self.last_index}"
            self.committed = index

    def stable_to(self, index: int) -> None:
        """Entries up to `index` (as they are now) are durable."""
        self.unstable_from = max(self.unstable_from, index + 1)

    def restore(self, meta: SnapshotMeta) -> None:
        """Replace the whole log by a snapshot point (its state arrives separately)."""
        assert meta.index > self.committed
        assert meta.conf.voters, "snapshot without a configuration"
        self._snapshot = meta
        self._entries = []
        self._bytes = 0
        self._base_conf = meta.conf
        self._conf_entries = []
        self.committed = meta.index
        self.unstable_from = meta.index + 1
        self.snapshot_unpersisted = True

    def compact(self, index: int) -> SnapshotMeta:
        """Discard entries <= index, which the state machine holds."""
        if index <= self._snapshot.index:
            return self._snapshot
        assert index <= self.applied, (index, self.applied)
        term = self.term_at(index)
        assert term is not None
        conf = self.conf_at(index)
        self._bytes -= sum(entry_size_bytes(e)
                           for e in self._entries[: index - self._snapshot.index])
        del self._entries[: index - self._snapshot.index]
        self._conf_entries = [(i, c) for i, c in self._conf_entries if i > index]
        self._base_conf = conf
        self._snapshot = SnapshotMeta(index=index, term=term, conf=conf)
        self.unstable_from = max(self.unstable_from, index + 1)
        return self._snapshot
