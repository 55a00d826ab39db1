"""A leader's view of one follower's log, and the flow control of APPENDs to it.

As in etcd-io/raft's tracker package:

- PROBE: the leader does not know where the follower's log ends; it sends at most one
  APPEND per heartbeat interval and waits for the answer (a rejection moves `next` back).
- REPLICATE: the follower is known to match up to `match`; APPENDs are pipelined
  optimistically (`next` advances as they are sent), at most `inflight_max` unanswered.
- SNAPSHOT: the follower needs entries the leader has compacted; nothing is sent until
  the follower reports an index at or beyond the snapshot, or the attempt times out.
"""

from __future__ import annotations

import enum
from collections import deque

__all__ = ["Inflights", "Progress", "ProgressState"]


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"
    SNAPSHOT = "snapshot"


class Inflights:
    """The last index of each APPEND sent but not yet acknowledged, oldest first."""

    __slots__ = ("_capacity", "_last_indexes")

    def __init__(self, capacity: int) -> None:
        assert capacity >= 1
        self._capacity = capacity
        self._last_indexes: deque[int] = deque()

    def add(self, last_index: int) -> None:
        assert not self.full(), "inflight window overflow"
        assert not self._last_indexes or self._last_indexes[-1] < last_index
        self._last_indexes.append(last_index)

    def free_le(self, index: int) -> None:
        """Forget every message whose last index is <= index (they were acknowledged)."""
        while self._last_indexes and self._last_indexes[0] <= index:
            self._last_indexes.popleft()

    def full(self) -> bool:
        return len(self._last_indexes) >= self._capacity

    def reset(self) -> None:
        self._last_indexes.clear()

    def __len__(self) -> int:
        return len(self._last_indexes)


class Progress:
    """Replication state of one follower, as seen by the leader."""

    __slots__ = (
        "match",
        "next",
        "state",
        "paused",
        "pending_snapshot",
        "snapshot_elapsed_ticks",
        "recent_active",
        "inflights",
    )

    def __init__(self, next_index: int, inflight_max: int, recent_active: bool) -> None:
        assert next_index >= 1
        self.match = 0
        self.next = next_index
        self.state = ProgressState.PROBE
        # PROBE: an APPEND is unanswered; REPLICATE: the inflight window is full. Either
        # way wait for an answer or a heartbeat response before sending again.
        self.paused = False
        self.pending_snapshot = 0  # SNAPSHOT: the index of the snapshot sent
        self.snapshot_elapsed_ticks = 0
        self.recent_active = recent_active  # heard from within this election timeout
        self.inflights = Inflights(inflight_max)

    def _reset_state(self, state: ProgressState) -> None:
        self.paused = False
        self.pending_snapshot = 0
        self.snapshot_elapsed_ticks = 0
        self.state = state
        self.inflights.reset()

    def become_probe(self) -> None:
        if self.state is ProgressState.SNAPSHOT:
            pending = self.pending_snapshot
            self._reset_state(ProgressState.PROBE)
            self.next = max(self.match + 1, pending + 1)
        else:
            self._reset_state(ProgressState.PROBE)
            self.next = self.match + 1

    def lost_log(self, last_index: int) -> None:
        """The follower says its log ends at `last_index`, below what it had
        acknowledged: it lost its data (restored from an old backup, or wiped). Probe it
        again from there, so it is sent what it lacks (entries or a snapshot)."""
        assert last_index < self.match
        self._reset_state(ProgressState.PROBE)
        self.match = last_index
        self.next = last_index + 1

    def become_replicate(self) -> None:
        self._reset_state(ProgressState.REPLICATE)
        self.next = self.match + 1

    def become_snapshot(self, snapshot_index: int) -> None:
        self._reset_state(ProgressState.SNAPSHOT)
        self.pending_snapshot = snapshot_index
        self.next = snapshot_index + 1

    def abandon_snapshot(self) -> None:
        """The snapshot was not acknowledged in time: probe again from `match`."""
        assert self.state is ProgressState.SNAPSHOT
        self._reset_state(ProgressState.PROBE)
        self.next = self.match + 1

    def maybe_update(self, index: int) -> bool:
        """The follower holds the leader's log up to `index`; True if `match` moved."""
        updated = False
        if self.match < index:
            self.match = index
            updated = True
            self.paused = False
        self.next = max(self.next, index + 1)
        return updated

    def maybe_decrease_to(self, rejected: int, match_hint: int) -> bool:
        """The follower rejected an APPEND whose previous index was `rejected`.

        False if the rejection is stale (answers an APPEND sent before a later one).
        """
        if self.state is ProgressState.REPLICATE:
            if rejected <= self.match:
                return False
            self.next = self.match + 1
            return True
        if self.next - 1 != rejected:
            return False
        self.next = max(min(rejected, match_hint + 1), self.match + 1)
        self.paused = False
        return True

    def sent_entries(self, count: int, last_index: int) -> None:
        """Flow-control bookkeeping after an APPEND carrying `count` entries was sent."""
        if self.state is ProgressState.REPLICATE:
            if count > 0:
                assert last_index == self.next + count - 1
                self.next = last_index + 1
                self.inflights.add(last_index)
            self.paused = self.inflights.full()
        elif self.state is ProgressState.PROBE:
            if count > 0:
                self.paused = True
        else:
            raise AssertionError("APPEND sent to a follower awaiting a snapshot")

    def is_paused(self) -> bool:
        if self.state is ProgressState.SNAPSHOT:
            return True
        return self.paused

    def __repr__(self) -> str:
        return (
            f"Progress(state={self.state.value}, match={self.match}, next={self.next}, "
            f"paused={self.paused}, inflight={len(self.inflights)}, "
            f"pending_snapshot={self.pending_snapshot}, active={self.recent_active})"
        )
