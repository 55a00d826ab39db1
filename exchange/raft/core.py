"""The Raft consensus core: a pure, deterministic state machine.

Like etcd-io/raft, the core implements only the algorithm. It owns no socket, disk,
clock or thread; randomness comes from the `random.Random` it is given. The driver
feeds it time (`tick`), peer messages (`step`) and requests (`propose`,
`propose_conf_change`, `transfer_leadership`), and takes what it is ready to have done
as a `Ready`.

The Ready contract (etcd's), for each `ready()`:

1. If `snapshot` is set: durably record it as the log's new start, discarding every
   stored entry (the log restarts after `snapshot.index`), then begin fetching the
   state machine's state up to `snapshot.index` (from any peer; this may take long
   and runs alongside; call `restore_snapshot_done(meta)` once it is installed).
2. Durably append `entries_to_persist`, first deleting every stored entry with an index
   >= `entries_to_persist[0].index`.
3. Durably write `hard_state` if set. Steps 1-3 must be fsynced before step 4 (a
   `hard_state` whose term and vote are unchanged only moves the commit index, which
   need not survive a crash: it may be written without the fsync, as etcd does).
4. Send `messages` (in any order; they may be lost, duplicated or reordered).
5. Apply `committed_entries` in order, each exactly once. A client may be told that its
   proposal committed only now, never earlier.
6. Call `advance(ready)`.

Between `ready()` and `advance()` the driver may keep calling `tick`, `step` and
`propose`; what they produce goes into the next Ready. `has_ready()` is False until the
outstanding Ready is advanced.

Snapshots carry no data through Raft. The application compacts when it likes:
`compact(index)` (index <= applied_index) drops entries <= index from memory and returns
the SnapshotMeta to record in the durable log. A follower that needs dropped entries is
sent a SNAPSHOT message holding only that metadata; its core resets its log to the
snapshot point, emits `Ready.snapshot` and answers the leader in the same Ready (the
answer claims only the durable log, which is true once step 1 is done). Replication to
it resumes at once; only the application of committed entries after the snapshot waits
until the application has fetched the state (the node streams and verifies blocks from
peers) and called `restore_snapshot_done(meta)`. After a restart whose state machine is
behind the durable snapshot (pass `applied`), `pending_snapshot` names what to fetch.

Beyond the Raft paper's figure 2 the core implements pre-vote, check-quorum with leader
leases, randomized election timeouts in [election_tick, 2 * election_tick), pipelined
and batched APPENDs with per-follower flow control, fast backtracking on conflict,
leadership transfer, a NOOP entry on election, single-server membership changes that
take effect when appended, and snapshots for followers behind the compaction point.

Over 600 lines on purpose: one class is the whole Raft algorithm, as etcd's raft.go is
one file; every handler reads and writes the same term, log and progress state, and
splitting it would spread each invariant over several files.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from exchange.raft.confchange import ConfChange, encode_conf_entry
from exchange.raft.messages import Message, MessageType
from exchange.raft.progress import Progress, ProgressState
from exchange.raft.raft_log import RaftLog, check_contiguous
from exchange.raft.types import ConfState, Entry, EntryKind, HardState, SnapshotMeta

__all__ = [
    "ConfChangeRejected",
    "InvalidMessage",
    "NotLeader",
    "ProgressView",
    "ProposalDropped",
    "RaftConfig",
    "RaftError",
    "RaftNode",
    "Ready",
    "Role",
    "SoftState",
    "TransferInProgress",
]


class RaftError(Exception):
    """Base of the errors the core raises for requests it refuses."""


class NotLeader(RaftError):
    """This node is not the leader; `leader_id` is the leader it knows of ("" if none)."""

    def __init__(self, leader_id: str) -> None:
        super().__init__(f"not the leader (leader: {leader_id or 'unknown'})")
        self.leader_id = leader_id


class ProposalDropped(RaftError):
    """The leader refuses the proposal for now (too large, too much uncommitted)."""


class TransferInProgress(ProposalDropped):
    """Leadership is being handed to `transferee`; retry there shortly."""

    def __init__(self, transferee: str) -> None:
        super().__init__(f"leadership transfer to {transferee} in progress")
        self.transferee = transferee


class ConfChangeRejected(RaftError):
    """The membership change is invalid, or another one is still uncommitted."""


class InvalidMessage(RaftError):
    """A message is malformed or misaddressed; it was ignored."""


class Role(enum.Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class RaftConfig:
    """Parameters of one node. Ticks are the driver's unit of time."""

    node_id: str
    initial_voters: tuple[str, ...]  # used when neither snapshot nor log has a config
    election_tick: int = 10
    heartbeat_tick: int = 1
    pre_vote: bool = True
    check_quorum: bool = True
    max_inflight_msgs: int = 64  # unacknowledged APPENDs per follower while replicating
    max_entries_per_msg: int = 64
    max_bytes_per_msg: int = 1 << 20  # also the largest proposal accepted
    max_uncommitted_entries: int = 4096  # proposals beyond this are dropped
    max_committed_entries_per_ready: int = 1024

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("node_id must not be empty")
        if not self.initial_voters or len(set(self.initial_voters)) != len(self.initial_voters):
            raise ValueError("initial_voters must name distinct voters")
        if not 1 <= self.heartbeat_tick < self.election_tick:
            raise ValueError("need 1 <= heartbeat_tick < election_tick")
        for name in (
            "max_inflight_msgs",
            "max_entries_per_msg",
            "max_bytes_per_msg",
            "max_uncommitted_entries",
            "max_committed_entries_per_ready",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True, slots=True)
class SoftState:
    """Volatile state the driver may want to observe; never persisted."""

    leader_id: str
    role: Role


@dataclass(frozen=True, slots=True)
class Ready:
    """Work the driver must do, in the order the module docstring gives."""

    soft_state: SoftState | None  # set when changed since the previous Ready
    hard_state: HardState | None  # set when changed; persist before sending messages
    snapshot: SnapshotMeta | None  # a snapshot received from the leader, to install
    entries_to_persist: tuple[Entry, ...]
    committed_entries: tuple[Entry, ...]
    messages: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class ProgressView:
    """A leader's view of one follower (for metrics and tests)."""

    state: ProgressState
    match: int
    next: int
    recent_active: bool
    inflight: int


class _VoteResult(enum.Enum):
    PENDING = 0
    WON = 1
    LOST = 2


_LEADER_CONTACT = frozenset({MessageType.APPEND, MessageType.HEARTBEAT, MessageType.SNAPSHOT})


class RaftNode:
    """One Raft peer, restored from its durable state.

    `hard_state`, `snapshot` and `entries` are what the durable log holds (entries after
    the snapshot). `applied` is the last index the state machine holds (default: the
    snapshot index); if it is below the snapshot index the snapshot's state is still to
    be transferred and `pending_snapshot` says so.
    """

    def __init__(
        self,
        config: RaftConfig,
        hard_state: HardState,
        snapshot: SnapshotMeta,
        entries: Sequence[Entry],
        rng: random.Random,
        *,
        applied: int | None = None,
    ) -> None:
        self._cfg = config
        self._id = config.node_id
        self._rng = rng
        self._log = RaftLog(snapshot, entries, ConfState(voters=config.initial_voters))
        log = self._log

        term, vote = hard_state.term, hard_state.vote
        if log.last_term > term:
            # The hard state of the last batch was lost while its entries survived. No
            # vote in the entries' term can have been counted (it was never durable,
            # so never sent): adopting that term with no vote is safe.
            term, vote = log.last_term, ""
        self._term = term
        self._vote = vote

        applied_index = snapshot.index if applied is None else applied
        if not 0 <= applied_index <= log.last_index:
            raise ValueError(f"applied {applied_index} outside [0, {log.last_index}]")
        if hard_state.commit > log.last_index:
            raise ValueError(
                f"hard state commit {hard_state.commit} beyond last index {log.last_index}"
            )
        log.committed = max(hard_state.commit, snapshot.index, applied_index)
        log.applied = applied_index
        log.applying = applied_index

        self._role = Role.FOLLOWER
        self._leader_id = ""
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        self._randomized_election_timeout = config.election_tick
        self._lead_transferee = ""
        self._pending_conf_index = 0
        self._votes: dict[str, bool] = {}
        self._prs: dict[str, Progress] = {}
        self._msgs: list[Message] = []
        # followers sent an APPEND or SNAPSHOT since the last heartbeat: that contact
        # stands in for their next heartbeat (one message and its answer fewer per
        # follower and heartbeat interval while blocks flow)
        self._contacted: set[str] = set()
        self._voters: tuple[str, ...] = log.conf_state.voters
        self._outstanding: Ready | None = None
        self._become_follower(self._term, "")

        self._prev_hard_state = hard_state
        self._prev_soft_state = self._soft_state()

    # ------------------------------------------------------------------ observing

    @property
    def id(self) -> str:
        return self._id

    @property
    def term(self) -> int:
        return self._term

    @property
    def vote(self) -> str:
        return self._vote

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader_id(self) -> str:
        return self._leader_id

    @property
    def commit_index(self) -> int:
        return self._log.committed

    @property
    def applied_index(self) -> int:
        return self._log.applied

    @property
    def first_index(self) -> int:
        return self._log.first_index

    @property
    def last_index(self) -> int:
        return self._log.last_index

    @property
    def last_term(self) -> int:
        return self._log.last_term

    @property
    def log_bytes(self) -> int:
        """Bytes of entries held in memory (those after the compaction point)."""
        return self._log.bytes_held

    def compact_point(self, entries_keep: int, bytes_keep: int) -> int:
        """How far the log may be compacted keeping at most `entries_keep` entries and
        `bytes_keep` bytes of applied entries for lagging followers."""
        return self._log.index_keeping(entries_keep, bytes_keep)

    @property
    def voters(self) -> tuple[str, ...]:
        return self._voters

    @property
    def conf_state(self) -> ConfState:
        return self._log.conf_state

    @property
    def snapshot_meta(self) -> SnapshotMeta:
        """The compaction point: entries <= its index are only in the state machine."""
        return self._log.snapshot

    @property
    def pending_snapshot(self) -> SnapshotMeta | None:
        """The snapshot whose state the application must still install, if any."""
        return self._log.snapshot if self._log.applied < self._log.snapshot.index else None

    @property
    def lead_transferee(self) -> str:
        return self._lead_transferee

    def term_at(self, index: int) -> int | None:
        return self._log.term_at(index)

    def entries(self, lo: int, hi: int) -> tuple[Entry, ...]:
        """Held entries with lo <= index < hi (lo >= first_index, hi <= last_index + 1)."""
        return self._log.slice(lo, hi)

    def progress(self) -> dict[str, ProgressView]:
        """The leader's view of each follower (empty unless leader)."""
        return {
            node_id: ProgressView(pr.state, pr.match, pr.next, pr.recent_active, len(pr.inflights))
            for node_id, pr in self._prs.items()
            if node_id != self._id
        }

    def _soft_state(self) -> SoftState:
        return SoftState(self._leader_id, self._role)

    def _hard_state(self) -> HardState:
        return HardState(term=self._term, vote=self._vote, commit=self._log.committed)

    # ------------------------------------------------------------------ inputs

    def tick(self) -> None:
        """One unit of time passed."""
        term_before, commit_before = self._term, self._log.committed
        if self._role is Role.LEADER:
            self._tick_heartbeat()
        else:
            self._tick_election()
        assert self._term >= term_before, "term moved back"
        assert self._log.committed >= commit_before, "commit index moved back"

    def propose(self, data: bytes) -> tuple[int, int]:
        """Append `data` as a NORMAL entry; returns its (term, index).

        The entry commits iff it later comes out in `committed_entries` at that index
        with that term.
        """
        self._check_can_propose(len(data))
        entry = self._append_entries([(EntryKind.NORMAL, data)])
        return entry.term, entry.index

    def propose_conf_change(self, change: ConfChange) -> tuple[int, int]:
        """Append a CONFIG entry adding or removing one voter; returns its (term, index).

        The new configuration takes effect as soon as it is appended. Refused while an
        earlier change (or, for a new leader, its NOOP) is uncommitted.
        """
        self._check_can_propose(0)
        if self._pending_conf_index > self._log.committed:
            raise ConfChangeRejected(
                f"configuration change at {self._pending_conf_index} is not yet committed"
            )
        try:
            conf_after = change.apply_to(self._log.conf_state)
        except ValueError as exc:
            raise ConfChangeRejected(str(exc)) from exc
        entry = self._append_entries([(EntryKind.CONFIG, encode_conf_entry(change, conf_after))])
        self._pending_conf_index = entry.index
        return entry.term, entry.index

    def transfer_leadership(self, to_id: str, at_once: bool = False) -> None:
        """Hand leadership to voter `to_id` (Raft dissertation 3.10).

        Proposals are refused until the transfer completes or, after an election
        timeout, is abandoned. With `at_once`, `to_id` is told to campaign now even if
        its log is behind this leader's: for a leader that must not go on leading (its
        clock is off) and whose last entries the followers refuse; a quorum holding the
        same committed entries as `to_id` elects it.
        """
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if to_id == self._id:
            return
        if to_id not in self._voters:
            raise RaftError(f"{to_id!r} is not a voter")
        if self._lead_transferee == to_id and not at_once:
            return
        self._lead_transferee = to_id
        self._election_elapsed = 0
        if at_once or self._prs[to_id].match == self._log.last_index:
            self._send_timeout_now(to_id)
        else:
            self._send_append(to_id)

    def compact(self, index: int) -> SnapshotMeta:
        """The state machine holds everything <= index: drop those entries from memory.

        Returns the new compaction point, which the driver records in its durable log.
        Followers that need dropped entries are then sent a SNAPSHOT.
        """
        if index > self._log.applied:
            raise ValueError(f"cannot compact to {index}: only {self._log.applied} applied")
        return self._log.compact(index)

    def restore_snapshot_done(self, meta: SnapshotMeta) -> None:
        """The state machine now holds everything <= meta.index (state transfer done)."""
        snapshot = self._log.snapshot
        if meta.index > snapshot.index:
            raise ValueError(f"snapshot {meta.index} is beyond the log's {snapshot.index}")
        if meta.index == snapshot.index and meta.term != snapshot.term:
            raise ValueError(f"snapshot term {meta.term} != {snapshot.term} at {meta.index}")
        self._log.applied = max(self._log.applied, meta.index)
        self._log.applying = max(self._log.applying, meta.index)

    def step(self, m: Message) -> None:
        """Process a message from a peer. InvalidMessage if malformed (nothing changes)."""
        self._check_message(m)
        term_before, commit_before = self._term, self._log.committed
        self._step(m)
        assert self._term >= term_before, "term moved back"
        assert self._log.committed >= commit_before, "commit index moved back"

    # ------------------------------------------------------------------ Ready

    def has_ready(self) -> bool:
        if self._outstanding is not None:
            return False
        log = self._log
        return bool(
            self._msgs
            or log.snapshot_unpersisted
            or log.has_unstable()
            or log.has_next_committed()
            or self._hard_state() != self._prev_hard_state
            or self._soft_state() != self._prev_soft_state
        )

    def ready(self) -> Ready | None:
        """The work to do now (see the module docstring), or None if there is none."""
        assert self._outstanding is None, "ready() called again before advance()"
        if not self.has_ready():
            return None
        log = self._log
        soft, hard = self._soft_state(), self._hard_state()
        committed = log.next_committed_entries(self._cfg.max_committed_entries_per_ready)
        rd = Ready(
            soft_state=soft if soft != self._prev_soft_state else None,
            hard_state=hard if hard != self._prev_hard_state else None,
            snapshot=log.snapshot if log.snapshot_unpersisted else None,
            entries_to_persist=log.unstable_entries(),
            committed_entries=committed,
            messages=tuple(self._msgs),
        )
        self._msgs = []
        self._prev_soft_state, self._prev_hard_state = soft, hard
        if committed:
            log.applying = committed[-1].index
        self._outstanding = rd
        return rd

    def advance(self, rd: Ready) -> None:
        """The driver has done everything `rd` asked."""
        assert rd is self._outstanding, "advance() with a Ready that is not outstanding"
        self._outstanding = None
        log = self._log
        if rd.snapshot is not None and rd.snapshot == log.snapshot:
            log.snapshot_unpersisted = False
        # Mark durable the longest persisted prefix the log still holds. A persisted
        # entry still held with the same term is the same entry, with the same prefix
        # (Log Matching), so everything up to it is durable.
        for entry in reversed(rd.entries_to_persist):
            if log.term_at(entry.index) == entry.term and entry.index >= log.first_index:
                log.stable_to(entry.index)
                break
        if rd.committed_entries:
            last = rd.committed_entries[-1].index
            log.stable_to(last)  # committed entries are never truncated
            log.applied = max(log.applied, last)
        assert log.applied <= log.committed, (log.applied, log.committed)

    # ------------------------------------------------------------------ hooks

    def _log_is_up_to_date(self, last_index: int, last_term: int) -> bool:
        """Vote restriction (Raft 5.4.1). A method only so tests can plant a bug."""
        return self._log.is_up_to_date(last_index, last_term)

    def _may_commit_by_counting(self, index: int) -> bool:
        """Only entries of the current term commit by counting replicas (Raft 5.4.2).
        A method only so tests can plant a bug."""
        return self._log.term_at(index) == self._term

    # ------------------------------------------------------------------ roles

    def _reset(self, term: int) -> None:
        if self._term != term:
            assert term > self._term, f"term moves back from {self._term} to {term}"
            self._term = term
            self._vote = ""
        self._leader_id = ""
        self._election_elapsed = 0
        self._heartbeat_elapsed = 0
        et = self._cfg.election_tick
        self._randomized_election_timeout = self._rng.randrange(et, 2 * et)
        self._lead_transferee = ""
        self._pending_conf_index = 0
        self._votes = {}
        self._prs = {}

    def _become_follower(self, term: int, leader_id: str) -> None:
        self._reset(term)
        self._leader_id = leader_id
        self._role = Role.FOLLOWER

    def _become_pre_candidate(self) -> None:
        assert self._role is not Role.LEADER
        self._votes = {}
        self._leader_id = ""
        self._role = Role.PRE_CANDIDATE

    def _become_candidate(self) -> None:
        assert self._role is not Role.LEADER
        self._reset(self._term + 1)
        self._vote = self._id
        self._role = Role.CANDIDATE

    def _become_leader(self) -> None:
        assert self._role is Role.CANDIDATE
        self._reset(self._term)
        self._leader_id = self._id
        self._role = Role.LEADER
        next_index = self._log.last_index + 1
        for node_id in self._voters:
            self._prs[node_id] = Progress(next_index, self._cfg.max_inflight_msgs, False)
        own = self._prs[self._id]
        own.match = self._log.last_index
        own.become_replicate()
        own.recent_active = True
        noop = self._append_entries([(EntryKind.NOOP, b"")], broadcast=False)
        # No configuration change until an entry of this term commits (dissertation
        # 4.1 and its 2015 erratum): any older uncommitted change is then settled.
        self._pending_conf_index = noop.index
        self._bcast_append()

    def _promotable(self) -> bool:
        return self._id in self._voters

    def _sync_conf(self) -> None:
        """Adopt the configuration the log now implies."""
        voters = self._log.conf_state.voters
        if voters == self._voters:
            return
        self._voters = voters
        if self._role is not Role.LEADER:
            return
        next_index = self._log.last_index + 1
        for node_id in voters:
            if node_id not in self._prs:
                # Recently active, so check-quorum gives it an election timeout to answer.
                self._prs[node_id] = Progress(next_index, self._cfg.max_inflight_msgs, True)
        for node_id in list(self._prs):
            if node_id not in voters and node_id != self._id:
                del self._prs[node_id]
        if self._lead_transferee and self._lead_transferee not in voters:
            self._lead_transferee = ""

    # ------------------------------------------------------------------ time

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        if self._promotable() and self._election_elapsed >= self._randomized_election_timeout:
            self._election_elapsed = 0
            self._hup(transfer=False)

    def _tick_heartbeat(self) -> None:
        self._heartbeat_elapsed += 1
        self._election_elapsed += 1
        if self._election_elapsed >= self._cfg.election_tick:
            self._election_elapsed = 0
            if self._cfg.check_quorum:
                if not self._quorum_active():
                    self._become_follower(self._term, "")
                    return
                for node_id, pr in self._prs.items():
                    if node_id != self._id:
                        pr.recent_active = False
            self._lead_transferee = ""  # a transfer gets one election timeout
        for node_id, pr in self._prs.items():
            if pr.state is ProgressState.SNAPSHOT:
                pr.snapshot_elapsed_ticks += 1
                if pr.snapshot_elapsed_ticks >= self._cfg.election_tick:
                    pr.abandon_snapshot()  # the SNAPSHOT or its answer was lost: resend
                    self._send_append(node_id)
        if self._heartbeat_elapsed >= self._cfg.heartbeat_tick:
            self._heartbeat_elapsed = 0
            self._bcast_heartbeat()

    def _quorum_active(self) -> bool:
        active = sum(
            1
            for node_id in self._voters
            if node_id == self._id or (node_id in self._prs and self._prs[node_id].recent_active)
        )
        return active >= len(self._voters) // 2 + 1

    # ------------------------------------------------------------------ elections

    def _hup(self, transfer: bool) -> None:
        if self._role is Role.LEADER or not self._promotable():
            return
        if transfer:
            self._campaign(Role.CANDIDATE, force=True)
        elif self._cfg.pre_vote:
            self._campaign(Role.PRE_CANDIDATE, force=False)
        else:
            self._campaign(Role.CANDIDATE, force=False)

    def _campaign(self, role: Role, force: bool) -> None:
        if role is Role.PRE_CANDIDATE:
            self._become_pre_candidate()
            vote_type, term = MessageType.PRE_VOTE, self._term + 1
        else:
            self._become_candidate()
            vote_type, term = MessageType.VOTE, self._term
        if self._poll(self._id, True) is _VoteResult.WON:  # a one-voter cluster
            if role is Role.PRE_CANDIDATE:
                self._campaign(Role.CANDIDATE, force=False)
            else:
                self._become_leader()
            return
        for node_id in self._voters:
            if node_id != self._id:
                self._send(
                    Message(
                        vote_type,
                        self._id,
                        node_id,
                        term,
                        log_term=self._log.last_term,
                        index=self._log.last_index,
                        force=force,
                    )
                )

    def _poll(self, node_id: str, granted: bool) -> _VoteResult:
        if node_id in self._voters:
            self._votes.setdefault(node_id, granted)
        quorum = len(self._voters) // 2 + 1
        yes = sum(1 for v in self._voters if self._votes.get(v) is True)
        no = sum(1 for v in self._voters if self._votes.get(v) is False)
        if yes >= quorum:
            return _VoteResult.WON
        if len(self._voters) - no < quorum:
            return _VoteResult.LOST
        return _VoteResult.PENDING

    def _handle_vote_request(self, m: Message) -> None:
        resp_type = (
            MessageType.PRE_VOTE_RESP if m.type is MessageType.PRE_VOTE else MessageType.VOTE_RESP
        )
        can_vote = (
            self._vote == m.from_id
            or (self._vote == "" and self._leader_id == "")
            or (m.type is MessageType.PRE_VOTE and m.term > self._term)
        )
        if can_vote and self._log_is_up_to_date(m.index, m.log_term):
            self._send(Message(resp_type, self._id, m.from_id, m.term))
            if m.type is MessageType.VOTE:
                self._election_elapsed = 0
                self._vote = m.from_id
        else:
            self._send(Message(resp_type, self._id, m.from_id, self._term, reject=True))

    # ------------------------------------------------------------------ messages

    def _send(self, m: Message) -> None:
        assert m.to_id != self._id
        if (m.type is MessageType.APPEND and not m.quiet) or m.type is MessageType.SNAPSHOT:
            self._contacted.add(m.to_id)  # answered: no heartbeat needed next time
        self._msgs.append(m)

    def _check_message(self, m: Message) -> None:
        if m.to_id != self._id:
            raise InvalidMessage(f"message for {m.to_id!r} delivered to {self._id!r}")
        if not m.from_id or m.from_id == self._id:
            raise InvalidMessage(f"message from {m.from_id!r} to itself or from nobody")
        if min(m.term, m.log_term, m.index, m.commit, m.reject_hint) < 0:
            raise InvalidMessage("negative term or index")
        if m.type is MessageType.APPEND:
            if m.log_term > m.term:
                raise InvalidMessage("APPEND whose previous entry is from a later term")
            try:
                check_contiguous(m.entries, m.index, m.log_term)
            except ValueError as exc:
                raise InvalidMessage(f"APPEND entries malformed: {exc}") from exc
            if m.entries and m.entries[-1].term > m.term:
                raise InvalidMessage("APPEND carries an entry from a later term")
        elif m.entries:
            raise InvalidMessage(f"{m.type.name} must not carry entries")
        if m.quiet and (m.type is not MessageType.APPEND or m.entries):
            raise InvalidMessage("only an APPEND without entries may be quiet")
        if m.type is MessageType.SNAPSHOT:
            meta = m.snapshot
            if meta is None or meta.term > m.term or not meta.conf.voters:
                raise InvalidMessage("SNAPSHOT without a valid snapshot")
        elif m.snapshot is not None:
            raise InvalidMessage(f"{m.type.name} must not carry a snapshot")

    def _step(self, m: Message) -> None:
        if m.term > self._term:
            if m.type in (MessageType.PRE_VOTE, MessageType.VOTE):
                in_lease = (
                    self._cfg.check_quorum
                    and self._leader_id != ""
                    and self._election_elapsed < self._cfg.election_tick
                )
                if in_lease and not m.force:
                    return  # we heard from a live leader within the election timeout
            if m.type is MessageType.PRE_VOTE:
                pass  # pre-votes never change terms
            elif m.type is MessageType.PRE_VOTE_RESP and not m.reject:
                pass  # a grant for the term we would campaign in
            else:
                leader = m.from_id if m.type in _LEADER_CONTACT else ""
                self._become_follower(m.term, leader)
        elif m.term < self._term:
            if (self._cfg.check_quorum or self._cfg.pre_vote) and m.type in (
                MessageType.APPEND,
                MessageType.HEARTBEAT,
            ):
                # A stale leader: tell it our term so it steps down. Without this, a
                # node whose term rose in a partition could never rejoin (pre-vote
                # keeps it from disrupting the leader, and the leader keeps winning).
                self._send(Message(MessageType.APPEND_RESP, self._id, m.from_id, self._term))
            elif m.type is MessageType.PRE_VOTE:
                self._send(
                    Message(MessageType.PRE_VOTE_RESP, self._id, m.from_id, self._term, reject=True)
                )
            return

        if m.type in (MessageType.PRE_VOTE, MessageType.VOTE):
            self._handle_vote_request(m)
        elif self._role is Role.LEADER:
            self._step_leader(m)
        elif self._role is Role.FOLLOWER:
            self._step_follower(m)
        else:
            self._step_candidate(m)

    def _step_follower(self, m: Message) -> None:
        if m.type in _LEADER_CONTACT:
            self._election_elapsed = 0
            self._leader_id = m.from_id
            self._handle_leader_message(m)
        elif m.type is MessageType.TIMEOUT_NOW:
            self._hup(transfer=True)

    def _step_candidate(self, m: Message) -> None:
        if m.type in _LEADER_CONTACT:
            self._become_follower(m.term, m.from_id)
            self._handle_leader_message(m)
            return
        expected = (
            MessageType.PRE_VOTE_RESP if self._role is Role.PRE_CANDIDATE else MessageType.VOTE_RESP
        )
        if m.type is not expected:
            return
        if m.type is MessageType.PRE_VOTE_RESP and not m.reject and m.term != self._term + 1:
            return  # a grant from an earlier pre-campaign
        result = self._poll(m.from_id, not m.reject)
        if result is _VoteResult.WON:
            if self._role is Role.PRE_CANDIDATE:
                self._campaign(Role.CANDIDATE, force=False)
            else:
                self._become_leader()
        elif result is _VoteResult.LOST:
            self._become_follower(self._term, "")

    def _handle_leader_message(self, m: Message) -> None:
        if m.type is MessageType.APPEND:
            self._handle_append(m)
        elif m.type is MessageType.HEARTBEAT:
            last = self._log.last_index
            if m.commit > last:
                # The leader counts entries as ours that our log does not hold: this
                # node lost its data. Say where its log ends, so the leader re-sends.
                self._log.commit_to(last)
                self._send(Message(MessageType.HEARTBEAT_RESP, self._id, m.from_id,
                                   self._term, reject=True, reject_hint=last))
                return
            self._log.commit_to(m.commit)
            self._send(Message(MessageType.HEARTBEAT_RESP, self._id, m.from_id, self._term))
        else:
            self._handle_snapshot(m)

    def _handle_append(self, m: Message) -> None:
        log = self._log
        if m.index < log.committed:
            self._send(
                Message(
                    MessageType.APPEND_RESP, self._id, m.from_id, self._term, index=log.committed
                )
            )
            return
        last_new = log.maybe_append(m.index, m.log_term, m.commit, m.entries)
        if last_new is not None:
            self._sync_conf()
            if m.quiet:
                return  # a commit notice: the leader knows we hold all it names
            self._send(
                Message(MessageType.APPEND_RESP, self._id, m.from_id, self._term, index=last_new)
            )
            return
        hint_index, hint_term = log.find_conflict_by_term(min(m.index, log.last_index), m.log_term)
        self._send(
            Message(
                MessageType.APPEND_RESP,
                self._id,
                m.from_id,
                self._term,
                index=m.index,
                reject=True,
                reject_hint=hint_index,
                log_term=hint_term,
            )
        )

    def _handle_snapshot(self, m: Message) -> None:
        meta = m.snapshot
        assert meta is not None
        log = self._log
        if meta.index <= log.committed:
            index = log.committed
        elif log.match_term(meta.index, meta.term):
            log.commit_to(meta.index)  # we hold that entry: just fast-forward
            index = log.committed
        else:
            log.restore(meta)
            self._sync_conf()
            index = log.last_index
        self._send(Message(MessageType.APPEND_RESP, self._id, m.from_id, self._term, index=index))

    # ------------------------------------------------------------------ leader

    def _check_can_propose(self, size_bytes: int) -> None:
        if self._role is not Role.LEADER:
            raise NotLeader(self._leader_id)
        if self._lead_transferee:
            raise TransferInProgress(self._lead_transferee)
        if size_bytes > self._cfg.max_bytes_per_msg:
            raise ProposalDropped(
                f"proposal of {size_bytes} bytes exceeds {self._cfg.max_bytes_per_msg}"
            )
        if self._log.last_index - self._log.committed >= self._cfg.max_uncommitted_entries:
            raise ProposalDropped(
                f"{self._cfg.max_uncommitted_entries} entries already await commit"
            )

    def _append_entries(
        self, items: Sequence[tuple[EntryKind, bytes]], broadcast: bool = True
    ) -> Entry:
        assert self._role is Role.LEADER
        first = self._log.last_index + 1
        new = [
            Entry(term=self._term, index=first + k, kind=kind, data=data)
            for k, (kind, data) in enumerate(items)
        ]
        self._log.append(new)
        self._sync_conf()
        self._prs[self._id].maybe_update(self._log.last_index)
        if broadcast:
            for node_id in self._prs:
                if node_id != self._id:
                    self._maybe_send_append(node_id, send_if_empty=False)
        self._maybe_commit()
        return new[-1]

    def _maybe_commit(self) -> bool:
        """Advance the commit index to what a quorum of voters holds. True if it moved."""
        matches = sorted((self._prs[v].match for v in self._voters), reverse=True)
        candidate = matches[len(self._voters) // 2]
        if candidate <= self._log.committed or not self._may_commit_by_counting(candidate):
            return False
        self._log.commit_to(candidate)
        if self._id not in self._voters and self._log.conf_index <= self._log.committed:
            self._step_down_after_removal()
        return True

    def _step_down_after_removal(self) -> None:
        """Our removal committed: tell everyone the commit index, hand leadership to an
        up-to-date voter, and stop leading (dissertation 4.2.2)."""
        self._bcast_append()
        for node_id in self._voters:
            if self._prs[node_id].match == self._log.last_index:
                self._send_timeout_now(node_id)
                break
        self._become_follower(self._term, "")

    def _step_leader(self, m: Message) -> None:
        pr = self._prs.get(m.from_id)
        if pr is None:
            return
        if m.type is MessageType.APPEND_RESP:
            self._handle_append_resp(m, pr)
        elif m.type is MessageType.HEARTBEAT_RESP:
            pr.recent_active = True
            pr.paused = False
            if m.reject and m.reject_hint < pr.match:
                pr.lost_log(m.reject_hint)
            if pr.match < self._log.last_index or pr.state is ProgressState.PROBE:
                self._send_append(m.from_id)

    def _handle_append_resp(self, m: Message, pr: Progress) -> None:
        pr.recent_active = True
        if m.reject:
            next_probe = m.reject_hint
            if m.log_term > 0:
                next_probe, _ = self._log.find_conflict_by_term(m.reject_hint, m.log_term)
            if pr.maybe_decrease_to(m.index, next_probe):
                if pr.state is ProgressState.REPLICATE:
                    pr.become_probe()
                self._send_append(m.from_id)
            return
        if m.index > self._log.last_index:
            return  # cannot acknowledge what we never sent; ignore
        was_paused = pr.is_paused()
        if not (
            pr.maybe_update(m.index) or (pr.match == m.index and pr.state is ProgressState.PROBE)
        ):
            return
        if pr.state is ProgressState.PROBE:
            pr.become_replicate()
        elif pr.state is ProgressState.SNAPSHOT and pr.match + 1 >= self._log.first_index:
            pr.become_probe()
            pr.become_replicate()
        elif pr.state is ProgressState.REPLICATE:
            pr.inflights.free_le(m.index)
        if self._maybe_commit():
            if self._role is not Role.LEADER:
                return  # stepped down after its removal committed
            self._bcast_append()
        elif was_paused:
            self._send_append(m.from_id)
        while self._maybe_send_append(m.from_id, send_if_empty=False):
            pass
        if m.from_id == self._lead_transferee and pr.match == self._log.last_index:
            self._send_timeout_now(m.from_id)

    def _send_append(self, to_id: str) -> None:
        self._maybe_send_append(to_id, send_if_empty=True)

    def _maybe_send_append(self, to_id: str, send_if_empty: bool) -> bool:
        pr = self._prs[to_id]
        if pr.is_paused():
            return False
        log = self._log
        assert pr.next <= log.last_index + 1, (to_id, pr)
        prev_index = pr.next - 1
        prev_term = log.term_at(prev_index)
        if prev_term is None:
            return self._maybe_send_snapshot(to_id, pr)
        entries: tuple[Entry, ...] = ()
        if pr.state is not ProgressState.REPLICATE or not pr.inflights.full():
            entries = log.entries_for_append(
                pr.next, self._cfg.max_entries_per_msg, self._cfg.max_bytes_per_msg
            )
        if not entries and not send_if_empty:
            return False
        self._send(
            Message(
                MessageType.APPEND,
                self._id,
                to_id,
                self._term,
                log_term=prev_term,
                index=prev_index,
                entries=entries,
                commit=log.committed,
                # only the commit index moves, for a follower that acknowledged all up
                # to prev_index: its answer would say nothing new, so it sends none
                quiet=not entries and pr.state is ProgressState.REPLICATE
                and pr.match == prev_index,
            )
        )
        pr.sent_entries(len(entries), entries[-1].index if entries else prev_index)
        return True

    def _maybe_send_snapshot(self, to_id: str, pr: Progress) -> bool:
        if not pr.recent_active:
            return False  # wait until it answers a heartbeat
        meta = self._log.snapshot
        pr.become_snapshot(meta.index)
        self._send(Message(MessageType.SNAPSHOT, self._id, to_id, self._term, snapshot=meta))
        return True

    def _bcast_append(self) -> None:
        for node_id in self._prs:
            if node_id != self._id:
                self._send_append(node_id)

    def _bcast_heartbeat(self) -> None:
        """A heartbeat to every follower not sent an APPEND or SNAPSHOT since the last
        one (that message already reset its election timer and will be answered)."""
        contacted, self._contacted = self._contacted, set()
        for node_id, pr in self._prs.items():
            if node_id != self._id and node_id not in contacted:
                commit = min(pr.match, self._log.committed)
                self._send(
                    Message(MessageType.HEARTBEAT, self._id, node_id, self._term, commit=commit)
                )

    def _send_timeout_now(self, to_id: str) -> None:
        self._send(Message(MessageType.TIMEOUT_NOW, self._id, to_id, self._term))
