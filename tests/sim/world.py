"""The simulated world's values: the seed's parameters, a run's result, a violation,
a node's disk (writes volatile until fsync) and a node's simulated state."""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from exchange.node.driver import RaftDriver
from exchange.node.peers import AttestationQueue
from exchange.raft.core import RaftConfig, RaftNode, Ready
from exchange.raft.types import Entry, HardState, SnapshotMeta

DEFAULT_STEPS = 4000
UNIVERSE = ("n1", "n2", "n3", "n4", "n5")
MEMBERS_MIN, MEMBERS_MAX = 3, 5
LOG_BYTES_MAX = 1 << 20  # the in-memory log's byte bound for compaction (entries are small)
ATTESTATIONS_QUEUED_MAX = 1 << 16  # a link's queue; the runs never fill it
Attestation = tuple[str, int]  # (attesting node, Raft index)

NodeFactory = Callable[
    [RaftConfig, HardState, SnapshotMeta, Sequence[Entry], random.Random, int], RaftNode
]


def default_node_factory(
    config: RaftConfig,
    hard_state: HardState,
    snapshot: SnapshotMeta,
    entries: Sequence[Entry],
    rng: random.Random,
    applied: int,
) -> RaftNode:
    return RaftNode(config, hard_state, snapshot, entries, rng, applied=applied)


def run_now(coro: Coroutine[Any, Any, None]) -> None:
    """Run a driver phase to its end in this event: the fakes never suspend."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
    raise AssertionError("a driver phase waited on something the simulation never does")


def replay_command(seed: int, steps: int) -> str:
    return f".venv/bin/python -m tests.sim --seed {seed} --steps {steps}"


class Violation(Exception):
    """A safety or liveness property failed (or the core's own assertion fired)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class SimParams:
    """Everything about a run that the seed chooses."""

    members_initial: int
    election_tick: int
    heartbeat_tick: int
    pre_vote: bool
    check_quorum: bool
    max_inflight_msgs: int
    max_entries_per_msg: int
    max_uncommitted_entries: int
    drop_rate: float
    dup_rate: float
    long_delay_rate: float
    compact_keep: int  # entries kept in memory behind the applied index
    p_propose: float
    p_fault: float
    p_crash_new_leader: float  # chance a fresh leader crashes within a few ticks
    p_isolate_new_leader: float  # chance a fresh leader is cut off within a few ticks
    downtime_ticks_max: int  # a crashed node restarts by itself after at most this
    p_crash_after_fsync: float  # crash between making a Ready durable and sending it
    p_crash_before_fsync: float  # crash with a Ready written but not yet durable
    clock_skew: float  # each node's clock runs at 1 +- up to this

    @staticmethod
    def from_rng(rng: random.Random) -> SimParams:
        both = rng.random() < 0.7
        return SimParams(
            members_initial=rng.choice((3, 3, 4, 5)),
            election_tick=rng.randint(5, 10),
            heartbeat_tick=rng.randint(1, 2),
            pre_vote=True if both else rng.random() < 0.5,
            check_quorum=True if both else rng.random() < 0.5,
            max_inflight_msgs=rng.choice((1, 1, 2, 4, 8)),
            max_entries_per_msg=rng.choice((1, 1, 2, 4, 8)),
            max_uncommitted_entries=rng.randint(8, 64),
            drop_rate=rng.choice((0.0, 0.02, 0.1, 0.25)),
            dup_rate=rng.choice((0.0, 0.02, 0.1)),
            long_delay_rate=rng.choice((0.0, 0.02, 0.1)),
            compact_keep=rng.randint(2, 40),
            p_propose=rng.uniform(0.02, 0.15),
            p_fault=rng.uniform(0.002, 0.02),
            p_crash_new_leader=rng.choice((0.0, 0.05, 0.2, 0.5)),
            p_isolate_new_leader=rng.choice((0.0, 0.05, 0.2, 0.5)),
            downtime_ticks_max=rng.randint(5, 60),
            p_crash_after_fsync=rng.choice((0.0, 0.0, 0.002, 0.01, 0.02)),
            p_crash_before_fsync=rng.choice((0.0, 0.0, 0.002, 0.01, 0.02)),
            clock_skew=rng.choice((0.0, 0.0, 0.1, 0.3)),
        )


@dataclass
class SimResult:
    seed: int
    steps: int
    violation: Violation | None
    trace: str = ""
    proposals: int = 0
    acknowledged: int = 0
    terms_max: int = 0
    crashes: int = 0
    snapshots_installed: int = 0
    conf_changes: int = 0
    transfers: int = 0
    sim_ticks: int = 0
    events: int = 0

    @property
    def ok(self) -> bool:
        return self.violation is None

    @property
    def replay(self) -> str:
        return replay_command(self.seed, self.steps)


# ------------------------------------------------------------------------------ disk


@dataclass
class SimDisk:
    """A node's durable log. Writes are pending until `fsync`; a crash keeps a random
    prefix of the pending writes (possibly cutting a batch of entries)."""

    snapshot: SnapshotMeta = field(default_factory=SnapshotMeta)
    hard_state: HardState = field(default_factory=HardState)
    entries: list[Entry] = field(default_factory=list)
    pending: list[tuple[str, object]] = field(default_factory=list)

    def write(self, rd: Ready) -> None:
        if rd.snapshot is not None:
            self.pending.append(("snapshot", rd.snapshot))
        for entry in rd.entries_to_persist:
            self.pending.append(("entry", entry))
        if rd.hard_state is not None:
            self.pending.append(("hard_state", rd.hard_state))

    def fsync(self) -> None:
        for op in self.pending:
            self._apply(op)
        self.pending.clear()

    def sync(self) -> None:  # the driver's Storage
        self.fsync()

    @property
    def last_index(self) -> int:
        """The last index durable on this disk."""
        return self.entries[-1].index if self.entries else self.snapshot.index

    def crash(self, rng: random.Random) -> None:
        keep = rng.randint(0, len(self.pending))
        for op in self.pending[:keep]:
            self._apply(op)
        self.pending.clear()

    def compact(self, meta: SnapshotMeta) -> None:
        assert not self.pending
        if meta.index <= self.snapshot.index:
            return
        drop = meta.index - self.snapshot.index
        assert len(self.entries) >= drop and self.entries[drop - 1].term == meta.term
        del self.entries[:drop]
        self.snapshot = meta

    def _apply(self, op: tuple[str, object]) -> None:
        kind, value = op
        if kind == "snapshot":
            assert isinstance(value, SnapshotMeta)
            self.snapshot = value
            self.entries = []
        elif kind == "entry":
            assert isinstance(value, Entry)
            position = value.index - self.snapshot.index - 1
            assert 0 <= position <= len(self.entries), (value.index, self.snapshot.index)
            del self.entries[position:]
            self.entries.append(value)
        else:
            assert isinstance(value, HardState)
            self.hard_state = value


# ------------------------------------------------------------------------------ nodes


@dataclass
class SimNode:
    node_id: str
    disk: SimDisk
    rng_seed: int
    node: RaftNode | None = None
    driver: RaftDriver | None = None
    # attestations held (durable, like a node's block store): index -> attesting nodes
    attested: dict[int, set[str]] = field(default_factory=dict)
    final_index: int = 0
    links: dict[str, AttestationQueue[Attestation]] = field(default_factory=dict)
    incarnation: int = 0
    state_machine: list[Entry] = field(default_factory=list)  # durable, index i at i - 1
    outstanding: Ready | None = None
    ready_scheduled: bool = False
    proposals: dict[int, tuple[int, bytes]] = field(default_factory=dict)  # index: term, data
    seen_term: int = 0
    seen_commit: int = 0
    leader_checked_term: int = 0
    restart_at: float = 0.0
    log_signature: tuple[int, int, Entry | None] = (0, 0, None)
    clock: float = 0.0
    clock_rate: float = 1.0
