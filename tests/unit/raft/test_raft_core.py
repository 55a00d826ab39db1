"""Unit tests of the Raft core (exchange/raft/core.py), driven by hand-delivered messages."""

from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.raft.confchange import (
    ConfChange,
    ConfChangeOp,
    InvalidConfEntry,
    decode_conf_entry,
    encode_conf_entry,
)
from exchange.raft.core import (
    ConfChangeRejected,
    InvalidMessage,
    NotLeader,
    ProposalDropped,
    RaftConfig,
    RaftNode,
    Ready,
    Role,
    TransferInProgress,
)
from exchange.raft.messages import Message, MessageType
from exchange.raft.progress import ProgressState
from exchange.raft.raft_log import RaftLog
from exchange.raft.types import ConfState, Entry, EntryKind, HardState, SnapshotMeta

IDS3 = ("n1", "n2", "n3")
ELECTION_TICK = 10


def make_node(
    node_id: str,
    voters: Iterable[str] = IDS3,
    *,
    entries: Iterable[Entry] = (),
    hard_state: HardState | None = None,
    snapshot: SnapshotMeta | None = None,
    seed: int = 0,
    node_class: type[RaftNode] = RaftNode,
    **config: object,
) -> RaftNode:
    cfg = RaftConfig(
        node_id=node_id,
        initial_voters=tuple(voters),
        election_tick=ELECTION_TICK,
        **config,  # type: ignore[arg-type]
    )
    return node_class(
        cfg,
        hard_state or HardState(),
        snapshot or SnapshotMeta(),
        list(entries),
        random.Random(seed),
    )


def log_of(*terms: int, kind: EntryKind = EntryKind.NORMAL) -> list[Entry]:
    """Entries at indexes 1.. with the given terms."""
    return [Entry(term=t, index=i, kind=kind, data=b"%d" % i) for i, t in enumerate(terms, 1)]


def drain(node: RaftNode) -> tuple[list[Message], list[Entry], list[Ready]]:
    """Do what every pending Ready asks (persisting is a no-op here)."""
    messages: list[Message] = []
    applied: list[Entry] = []
    readies: list[Ready] = []
    while (rd := node.ready()) is not None:
        readies.append(rd)
        messages.extend(rd.messages)
        applied.extend(rd.committed_entries)
        node.advance(rd)
    return messages, applied, readies


class Net:
    """Nodes that exchange messages instantly; links can be cut."""

    def __init__(self, ids: Iterable[str] = IDS3, **config: Any) -> None:
        ids = tuple(ids)
        self.nodes = {
            node_id: make_node(node_id, ids, seed=k, **config) for k, node_id in enumerate(ids)
        }
        self.applied: dict[str, list[Entry]] = {node_id: [] for node_id in ids}
        self.blocked: set[tuple[str, str]] = set()
        self.sent: list[Message] = []

    def add(self, node: RaftNode) -> None:
        self.nodes[node.id] = node
        self.applied[node.id] = []

    def isolate(self, node_id: str) -> None:
        for other in self.nodes:
            if other != node_id:
                self.blocked |= {(node_id, other), (other, node_id)}

    def heal(self) -> None:
        self.blocked.clear()

    def run(self, rounds_max: int = 200) -> None:
        for _ in range(rounds_max):
            inflight: list[Message] = []
            for node_id, node in self.nodes.items():
                messages, applied, _ = drain(node)
                self.applied[node_id].extend(applied)
                inflight.extend(messages)
            if not inflight:
                return
            self.sent.extend(inflight)
            for m in inflight:
                if (m.from_id, m.to_id) not in self.blocked and m.to_id in self.nodes:
                    self.nodes[m.to_id].step(m)
        raise AssertionError("network did not go quiet")

    def tick(self, ticks: int = 1, only: Iterable[str] | None = None) -> None:
        ids = tuple(only) if only is not None else tuple(self.nodes)
        for _ in range(ticks):
            for node_id in ids:
                self.nodes[node_id].tick()
            self.run()

    def elect(self, node_id: str) -> RaftNode:
        """Let node_id's election timer fire (others' timers stand still)."""
        node = self.nodes[node_id]
        for _ in range(2 * ELECTION_TICK):
            if node.role is Role.LEADER:
                break
            node.tick()
            self.run()
        assert node.role is Role.LEADER, node.role
        return node

    def leader(self) -> RaftNode:
        leaders = [n for n in self.nodes.values() if n.role is Role.LEADER]
        assert len(leaders) == 1, leaders
        return leaders[0]


def role(node: RaftNode) -> Role:
    """node.role, unnarrowed (mypy would otherwise narrow the property across steps)."""
    return node.role


def voters(node: RaftNode) -> tuple[str, ...]:
    return node.voters


def become_leader_by_hand(node: RaftNode, peers: Iterable[str]) -> list[Message]:
    """Walk `node` through pre-vote and vote with granted responses from `peers`."""
    for _ in range(2 * ELECTION_TICK):
        node.tick()
        if node.role is not Role.FOLLOWER:
            break
    assert role(node) is Role.PRE_CANDIDATE
    for peer in peers:
        node.step(Message(MessageType.PRE_VOTE_RESP, peer, node.id, node.term + 1))
    assert role(node) is Role.CANDIDATE
    for peer in peers:
        node.step(Message(MessageType.VOTE_RESP, peer, node.id, node.term))
    assert role(node) is Role.LEADER
    messages, _, _ = drain(node)
    return messages


# ----------------------------------------------------------------------------- elections


def test_single_voter_elects_itself_and_commits_alone() -> None:
    node = make_node("n1", ("n1",))
    for _ in range(2 * ELECTION_TICK):
        node.tick()
    assert node.role is Role.LEADER
    term, index = node.propose(b"x")
    _, applied, _ = drain(node)
    assert [(e.kind, e.index) for e in applied] == [(EntryKind.NOOP, 1), (EntryKind.NORMAL, 2)]
    assert (term, index) == (1, 2)


def test_randomized_election_timeout_lies_in_one_to_two_election_ticks() -> None:
    for seed in range(40):
        node = make_node("n1", seed=seed)
        ticks = 0
        while node.role is Role.FOLLOWER:
            node.tick()
            ticks += 1
        assert ELECTION_TICK <= ticks < 2 * ELECTION_TICK


def test_noop_appended_on_election() -> None:
    net = Net()
    leader = net.elect("n1")
    last = leader.entries(leader.last_index, leader.last_index + 1)[0]
    assert last.kind is EntryKind.NOOP and last.term == leader.term
    assert leader.commit_index == last.index
    for node_id in ("n2", "n3"):
        assert net.applied[node_id][-1] == last
        assert net.nodes[node_id].leader_id == "n1"


def test_vote_and_its_response_come_out_in_the_same_ready() -> None:
    """The ready contract: the VOTE_RESP may only be sent after the vote is durable."""
    voter = make_node("n2")
    voter.step(Message(MessageType.VOTE, "n1", "n2", 1, index=0, log_term=0))
    rd = voter.ready()
    assert rd is not None and rd.hard_state == HardState(term=1, vote="n1", commit=0)
    assert [m.type for m in rd.messages] == [MessageType.VOTE_RESP]
    assert not rd.messages[0].reject


def test_voter_grants_one_vote_per_term() -> None:
    voter = make_node("n3")
    voter.step(Message(MessageType.VOTE, "n1", "n3", 1))
    voter.step(Message(MessageType.VOTE, "n2", "n3", 1))
    messages, _, _ = drain(voter)
    assert [(m.to_id, m.reject) for m in messages] == [("n1", False), ("n2", True)]


def test_vote_refused_to_candidate_with_less_up_to_date_log() -> None:
    voter = make_node("n3", entries=log_of(1, 2), hard_state=HardState(term=2))
    voter.step(Message(MessageType.VOTE, "n1", "n3", 3, index=5, log_term=1))  # older term
    voter.step(Message(MessageType.VOTE, "n2", "n3", 3, index=1, log_term=2))  # shorter
    messages, _, _ = drain(voter)
    assert [m.reject for m in messages] == [True, True]
    assert voter.vote == ""


def test_prevote_does_not_disrupt_stable_leader() -> None:
    net = Net()
    leader = net.elect("n1")
    term = leader.term
    net.isolate("n3")
    net.tick(5 * ELECTION_TICK)  # n3 pre-campaigns again and again, never winning
    assert net.nodes["n3"].term == term
    net.heal()
    net.tick(3 * ELECTION_TICK)
    assert net.leader() is leader and leader.term == term
    assert all(node.term == term for node in net.nodes.values())


def test_without_prevote_a_rejoining_node_forces_a_new_term() -> None:
    net = Net(pre_vote=False, check_quorum=False)
    leader = net.elect("n1")
    term = leader.term
    net.isolate("n3")
    net.tick(3 * ELECTION_TICK)
    assert net.nodes["n3"].term > term  # its term rose alone in the partition
    net.heal()
    net.tick(3 * ELECTION_TICK)
    assert net.leader().term > term


def test_follower_in_lease_ignores_vote_for_later_term() -> None:
    net = Net()
    net.elect("n1")
    follower = net.nodes["n2"]
    term = follower.term
    follower.step(Message(MessageType.VOTE, "n3", "n2", term + 5, index=99, log_term=term))
    follower.step(Message(MessageType.PRE_VOTE, "n3", "n2", term + 5, index=99, log_term=term))
    messages, _, _ = drain(follower)
    assert messages == [] and follower.term == term and follower.leader_id == "n1"


def test_forced_vote_from_leadership_transfer_ignores_lease() -> None:
    net = Net()
    net.elect("n1")
    follower = net.nodes["n2"]
    term = follower.term
    last = follower.last_index
    follower.step(
        Message(MessageType.VOTE, "n3", "n2", term + 1, index=last, log_term=term, force=True)
    )
    messages, _, _ = drain(follower)
    assert [(m.type, m.reject) for m in messages] == [(MessageType.VOTE_RESP, False)]
    assert follower.term == term + 1 and follower.vote == "n3"


def test_prevote_grant_changes_no_term_or_vote() -> None:
    voter = make_node("n2")
    voter.step(Message(MessageType.PRE_VOTE, "n1", "n2", 1))
    messages, _, _ = drain(voter)
    assert [(m.type, m.term, m.reject) for m in messages] == [(MessageType.PRE_VOTE_RESP, 1, False)]
    assert voter.term == 0 and voter.vote == ""


def test_check_quorum_leader_steps_down() -> None:
    net = Net()
    leader = net.elect("n1")
    net.isolate("n1")
    net.tick(ELECTION_TICK - 1, only=["n1"])
    # Within two election timeouts: the followers were active in the first window.
    net.tick(ELECTION_TICK + 1, only=["n1"])
    assert leader.role is Role.FOLLOWER and leader.leader_id == ""
    with pytest.raises(NotLeader):
        leader.propose(b"x")


def test_leader_with_quorum_keeps_leading() -> None:
    net = Net()
    leader = net.elect("n1")
    net.isolate("n3")
    net.tick(5 * ELECTION_TICK, only=["n1", "n2"])
    assert leader.role is Role.LEADER


def test_stale_leader_steps_down_when_told_a_later_term() -> None:
    leader = make_node("n1")
    become_leader_by_hand(leader, ["n2"])
    leader.step(Message(MessageType.APPEND_RESP, "n2", "n1", leader.term + 3))
    assert leader.role is Role.FOLLOWER and leader.term > 1


def test_follower_answers_stale_append_with_its_term() -> None:
    follower = make_node("n2", hard_state=HardState(term=5))
    follower.step(Message(MessageType.APPEND, "n1", "n2", 3))
    messages, _, _ = drain(follower)
    assert [(m.type, m.term) for m in messages] == [(MessageType.APPEND_RESP, 5)]


# ----------------------------------------------------------------------------- replication


def test_proposal_on_follower_names_the_leader() -> None:
    net = Net()
    net.elect("n1")
    with pytest.raises(NotLeader) as caught:
        net.nodes["n2"].propose(b"x")
    assert caught.value.leader_id == "n1"


def test_committed_entries_apply_everywhere_in_order_once() -> None:
    net = Net()
    leader = net.elect("n1")
    indexes = [leader.propose(b"p%d" % k)[1] for k in range(20)]
    net.run()
    for node_id, applied in net.applied.items():
        assert [e.index for e in applied] == list(range(1, indexes[-1] + 1)), node_id
        assert [e.data for e in applied if e.kind is EntryKind.NORMAL] == [
            b"p%d" % k for k in range(20)
        ]


def test_follower_that_lost_its_log_is_sent_everything_again() -> None:
    net = Net()
    leader = net.elect("n1")
    last = 0
    for k in range(10):
        last = leader.propose(b"p%d" % k)[1]
    net.run()
    # n3 loses its data (a wiped disk, an old backup) and restarts empty, while the
    # same leader still counts its entries as replicated
    net.add(make_node("n3", IDS3, hard_state=HardState(term=leader.term), seed=7))
    net.tick(2, only=["n1"])  # heartbeats carry a commit beyond n3's empty log
    assert net.nodes["n3"].commit_index == last
    assert [e.index for e in net.applied["n3"]] == list(range(1, last + 1))


def test_leader_does_not_commit_old_term_entry_by_counting() -> None:
    """Raft 5.4.2 (figure 8): an entry of an earlier term on a majority is not committed
    until an entry of the leader's own term is."""

    def scenario(node_class: type[RaftNode]) -> tuple[RaftNode, int]:
        # n1 holds an entry of term 2 at index 2 that never committed; now term 3.
        leader = make_node(
            "n1",
            entries=log_of(1, 2),
            hard_state=HardState(term=3, commit=1),
            node_class=node_class,
        )
        become_leader_by_hand(leader, ["n2"])
        assert leader.term == 4 and leader.last_index == 3  # NOOP of term 4 at 3
        # n2 acknowledges index 2 (the old-term entry) but not yet the NOOP.
        leader.step(Message(MessageType.APPEND_RESP, "n2", "n1", 4, index=2))
        return leader, leader.commit_index

    leader, commit = scenario(RaftNode)
    assert commit == 1, "an old-term entry was committed by counting replicas"
    leader.step(Message(MessageType.APPEND_RESP, "n2", "n1", 4, index=3))
    assert leader.commit_index == 3  # the NOOP commits, and index 2 with it

    class CountsOldTerms(RaftNode):
        def _may_commit_by_counting(self, index: int) -> bool:
            return True

    _, commit = scenario(CountsOldTerms)
    assert commit == 2  # the test does notice the broken rule


def test_fast_backtracking_skips_conflicting_term() -> None:
    # The follower holds a long divergent tail of terms 2 and 3; the leader's log has
    # terms 1 and 5. Backtracking one entry per round trip would take ~40 rejections.
    follower_log = log_of(1, *([2] * 20), *([3] * 20))
    leader_log = log_of(1, 1, 1, *([5] * 30))
    leader = make_node("n1", entries=leader_log, hard_state=HardState(term=5, commit=1))
    follower = make_node("n2", entries=follower_log, hard_state=HardState(term=3, commit=1))
    net = Net()
    net.nodes = {"n1": leader, "n2": follower}
    net.applied = {"n1": [], "n2": []}
    net.elect("n1")
    rejections = [m for m in net.sent if m.type is MessageType.APPEND_RESP and m.reject]
    assert 1 <= len(rejections) <= 3, rejections
    assert follower.last_index == leader.last_index
    assert follower.entries(1, follower.last_index + 1) == leader.entries(1, leader.last_index + 1)


def test_follower_truncates_conflicting_uncommitted_suffix() -> None:
    follower = make_node("n2", entries=log_of(1, 1, 2, 2), hard_state=HardState(term=2, commit=2))
    new = (Entry(3, 3, data=b"a"), Entry(3, 4, data=b"b"), Entry(3, 5, data=b"c"))
    follower.step(Message(MessageType.APPEND, "n1", "n2", 3, index=2, log_term=1, entries=new))
    messages, _, readies = drain(follower)
    assert follower.entries(3, 6) == new
    assert readies[0].entries_to_persist == new  # the driver overwrites from index 3
    assert [(m.reject, m.index) for m in messages] == [(False, 5)]


def test_follower_rejects_append_with_missing_previous_entry_and_hints() -> None:
    follower = make_node("n2", entries=log_of(1, 1), hard_state=HardState(term=1, commit=1))
    follower.step(Message(MessageType.APPEND, "n1", "n2", 2, index=7, log_term=2))
    messages, _, _ = drain(follower)
    (m,) = messages
    assert m.reject and m.index == 7 and (m.reject_hint, m.log_term) == (2, 1)


def test_flow_control_bounds_unacknowledged_appends() -> None:
    leader = make_node("n1", max_inflight_msgs=2, max_entries_per_msg=1)
    become_leader_by_hand(leader, ["n2", "n3"])
    # Acknowledge the NOOP so both followers replicate optimistically.
    for peer in ("n2", "n3"):
        leader.step(Message(MessageType.APPEND_RESP, peer, "n1", leader.term, index=1))
    drain(leader)
    for k in range(10):
        leader.propose(b"%d" % k)
    messages, _, _ = drain(leader)
    appends = [m for m in messages if m.type is MessageType.APPEND and m.to_id == "n2"]
    assert len(appends) == 2 and all(len(m.entries) == 1 for m in appends)
    assert leader.progress()["n2"].state is ProgressState.REPLICATE
    # One acknowledgement frees one slot.
    leader.step(Message(MessageType.APPEND_RESP, "n2", "n1", leader.term, index=2))
    messages, _, _ = drain(leader)
    appends = [m for m in messages if m.type is MessageType.APPEND and m.to_id == "n2"]
    assert [m.entries[0].index for m in appends] == [4]


def test_appends_batch_up_to_byte_limit() -> None:
    leader = make_node("n1", max_entries_per_msg=100, max_bytes_per_msg=300)
    become_leader_by_hand(leader, ["n2"])  # n2 is probed with the NOOP: paused till it answers
    for _ in range(6):
        leader.propose(b"x" * 100)
    assert not [m for m in drain(leader)[0] if m.type is MessageType.APPEND]
    leader.step(Message(MessageType.APPEND_RESP, "n2", "n1", leader.term, index=1))
    messages, _, _ = drain(leader)
    sizes = [len(m.entries) for m in messages if m.type is MessageType.APPEND and m.to_id == "n2"]
    assert sizes and max(sizes) == 2 and sum(sizes) == 6
    with pytest.raises(ProposalDropped):
        leader.propose(b"x" * 301)


def test_too_many_uncommitted_proposals_are_dropped() -> None:
    leader = make_node("n1", max_uncommitted_entries=3)
    become_leader_by_hand(leader, ["n2"])  # the NOOP is uncommitted too
    leader.propose(b"a")
    leader.propose(b"b")
    with pytest.raises(ProposalDropped):
        leader.propose(b"c")


def test_heartbeat_commit_is_capped_at_follower_match() -> None:
    leader = make_node("n1")
    become_leader_by_hand(leader, ["n2", "n3"])
    leader.step(Message(MessageType.APPEND_RESP, "n2", "n1", leader.term, index=1))
    assert leader.commit_index == 1
    drain(leader)
    for _ in range(2):
        leader.tick()
    messages, _, _ = drain(leader)
    beats = {m.to_id: m.commit for m in messages if m.type is MessageType.HEARTBEAT}
    assert beats == {"n2": 1, "n3": 0}


def test_a_follower_sent_an_append_skips_the_next_heartbeat_only() -> None:
    leader = make_node("n1")
    become_leader_by_hand(leader, ["n2", "n3"])
    for _ in range(4):  # heartbeats settle: every follower gets one again
        leader.tick()
    drain(leader)
    heartbeat_ticks = leader._cfg.heartbeat_tick

    def beats() -> set[str]:
        for _ in range(heartbeat_ticks):
            leader.tick()
        messages, _, _ = drain(leader)
        return {m.to_id for m in messages if m.type is MessageType.HEARTBEAT}

    assert beats() == {"n2", "n3"}
    leader.step(Message(MessageType.APPEND_RESP, "n2", "n1", leader.term, index=1))
    messages, _, _ = drain(leader)  # the commit goes to n2 (n3, probed, waits)
    appends = [m for m in messages if m.type is MessageType.APPEND]
    assert [m.to_id for m in appends] == ["n2"] and not appends[0].entries
    assert appends[0].quiet  # a commit notice n2 will not answer ...
    assert beats() == {"n2", "n3"}  # ... so it does not stand in for a heartbeat
    leader.propose(b"x")
    messages, _, _ = drain(leader)  # entries go to n2, which answers them
    assert [m.to_id for m in messages if m.type is MessageType.APPEND and m.entries] == ["n2"]
    assert beats() == {"n3"}  # n2 just heard from the leader
    assert beats() == {"n2", "n3"}  # nothing since: heartbeats again


def _replicating_pair() -> tuple[RaftNode, RaftNode]:
    """A leader n1 and a follower n2 (n3 silent) that hold the leader's first entry."""
    leader = make_node("n1")
    follower = make_node("n2")
    for m in become_leader_by_hand(leader, ["n2", "n3"]):
        if m.to_id == "n2" and m.type is MessageType.APPEND:
            follower.step(m)
    for m in drain(follower)[0]:
        leader.step(m)
    return leader, follower


def test_a_commit_notice_to_a_follower_holding_everything_is_quiet_and_not_answered(
) -> None:
    leader, follower = _replicating_pair()
    notices = [m for m in drain(leader)[0] if m.type is MessageType.APPEND]
    assert [(m.to_id, m.quiet, m.entries) for m in notices] == [("n2", True, ())]
    follower.step(notices[0])
    messages, committed, _ = drain(follower)
    assert messages == []  # nothing to answer: the leader knows n2 holds index 1
    assert [e.index for e in committed] == [1]  # but the commit index moved

    leader.propose(b"x")
    appends = [m for m in drain(leader)[0] if m.to_id == "n2" and m.type is MessageType.APPEND]
    assert appends and all(m.entries and not m.quiet for m in appends)
    follower.step(appends[0])
    answers = [m for m in drain(follower)[0] if m.type is MessageType.APPEND_RESP]
    assert [(m.index, m.reject) for m in answers] == [(2, False)]  # entries: answered


def test_a_quiet_notice_the_follower_cannot_accept_is_answered_with_a_rejection() -> None:
    leader, _ = _replicating_pair()
    notice = next(m for m in drain(leader)[0] if m.type is MessageType.APPEND)
    assert notice.quiet
    stranger = make_node("n2")  # lost its log: does not hold the entry before the commit
    stranger.step(notice)
    answers = [m for m in drain(stranger)[0] if m.type is MessageType.APPEND_RESP]
    assert len(answers) == 1 and answers[0].reject


@pytest.mark.parametrize("kind", [MessageType.HEARTBEAT, MessageType.APPEND])
def test_quiet_is_refused_on_anything_but_an_append_without_entries(kind: MessageType) -> None:
    follower = make_node("n2", hard_state=HardState(term=1))
    entries = (Entry(1, 1),) if kind is MessageType.APPEND else ()
    with pytest.raises(InvalidMessage):
        follower.step(Message(kind, "n1", "n2", 1, entries=entries, quiet=True))


def test_step_between_ready_and_advance_goes_to_the_next_ready() -> None:
    follower = make_node("n2", hard_state=HardState(term=1))
    first = (Entry(1, 1), Entry(1, 2))
    follower.step(Message(MessageType.APPEND, "n1", "n2", 1, index=0, log_term=0, entries=first))
    rd1 = follower.ready()
    assert rd1 is not None and rd1.entries_to_persist == first
    assert not follower.has_ready()  # nothing more until advance
    # A new leader overwrites index 2 while rd1 is being persisted.
    second = (Entry(2, 2, data=b"new"),)
    follower.step(Message(MessageType.APPEND, "n3", "n2", 2, index=1, log_term=1, entries=second))
    follower.advance(rd1)
    rd2 = follower.ready()
    assert rd2 is not None and rd2.entries_to_persist == second
    assert [m.index for m in rd2.messages] == [2]
    follower.advance(rd2)
    assert follower.ready() is None


def test_restart_restores_durable_state() -> None:
    net = Net()
    leader = net.elect("n1")
    for k in range(5):
        leader.propose(b"%d" % k)
    net.run()
    old = net.nodes["n2"]
    restarted = make_node(
        "n2",
        entries=old.entries(1, old.last_index + 1),
        hard_state=HardState(term=old.term, vote=old.vote, commit=old.commit_index),
    )
    assert (restarted.term, restarted.commit_index, restarted.last_index) == (
        old.term,
        old.commit_index,
        old.last_index,
    )
    assert restarted.role is Role.FOLLOWER
    _, applied, _ = drain(restarted)
    assert applied == net.applied["n2"]  # nothing applied was passed, so all again


def test_restart_with_hard_state_lost_behind_entries_adopts_their_term() -> None:
    node = make_node("n2", entries=log_of(1, 4), hard_state=HardState(term=2, vote="n3"))
    assert node.term == 4 and node.vote == ""
    rd = node.ready()
    assert rd is not None and rd.hard_state == HardState(term=4, vote="", commit=0)


def test_invalid_message_is_refused_and_changes_nothing() -> None:
    node = make_node("n2", hard_state=HardState(term=1))
    bad = [
        Message(MessageType.APPEND, "n1", "n3", 1),  # not for us
        Message(MessageType.APPEND, "n2", "n2", 1),  # from ourselves
        Message(MessageType.APPEND, "n1", "n2", 5, index=0, entries=(Entry(5, 3),)),  # gap
        Message(MessageType.APPEND, "n1", "n2", 5, index=0, entries=(Entry(6, 1),)),  # future
        Message(
            MessageType.APPEND,
            "n1",
            "n2",
            5,
            entries=(Entry(5, 1, EntryKind.CONFIG, b"junk"),),
        ),
        Message(MessageType.SNAPSHOT, "n1", "n2", 5),  # no snapshot
        Message(MessageType.HEARTBEAT, "n1", "n2", 5, entries=(Entry(5, 1),)),
    ]
    for m in bad:
        with pytest.raises(InvalidMessage):
            node.step(m)
    assert node.term == 1 and node.last_index == 0 and not node.has_ready()


# ----------------------------------------------------------------------------- transfer


def test_leader_transfer() -> None:
    net = Net()
    leader = net.elect("n1")
    term = leader.term
    net.isolate("n2")
    leader.propose(b"n2 misses this")
    net.run()
    net.heal()
    leader.transfer_leadership("n2")
    with pytest.raises(TransferInProgress):
        leader.propose(b"refused")
    net.run()  # n2 is caught up, then told to campaign at once
    assert net.leader().id == "n2"
    assert net.nodes["n2"].term == term + 1
    assert leader.role is Role.FOLLOWER and leader.leader_id == "n2"


def test_leader_transfer_abandoned_after_election_timeout() -> None:
    net = Net()
    leader = net.elect("n1")
    net.isolate("n2")
    leader.transfer_leadership("n2")
    net.tick(ELECTION_TICK, only=["n1", "n3"])
    assert leader.role is Role.LEADER and leader.lead_transferee == ""
    leader.propose(b"accepted again")


# ----------------------------------------------------------------------------- membership


def test_config_change_one_at_a_time() -> None:
    net = Net()
    leader = net.elect("n1")
    net.isolate("n2")
    net.isolate("n3")
    leader.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    assert leader.voters == ("n1", "n2", "n3", "n4")  # in effect once appended
    with pytest.raises(ConfChangeRejected):
        leader.propose_conf_change(ConfChange(ConfChangeOp.REMOVE_VOTER, "n3"))
    net.heal()
    net.add(make_node("n4", IDS3, seed=9))
    net.tick(2)
    assert leader.commit_index == leader.last_index
    assert net.nodes["n4"].voters == ("n1", "n2", "n3", "n4")
    leader.propose_conf_change(ConfChange(ConfChangeOp.REMOVE_VOTER, "n3"))
    assert voters(leader) == ("n1", "n2", "n4")


def test_config_change_needs_quorum_of_new_configuration() -> None:
    net = Net()
    leader = net.elect("n1")
    net.add(make_node("n4", IDS3, seed=9))
    leader.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    net.isolate("n3")
    net.isolate("n4")
    before = leader.commit_index
    net.tick(3, only=["n1", "n2"])
    assert leader.commit_index == before  # 2 of the 4 voters are not a quorum


def test_new_leader_accepts_no_config_change_before_its_noop_commits() -> None:
    leader = make_node("n1")
    become_leader_by_hand(leader, ["n2"])
    with pytest.raises(ConfChangeRejected):
        leader.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    leader.step(Message(MessageType.APPEND_RESP, "n2", "n1", leader.term, index=1))
    leader.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))


def test_invalid_config_changes_are_rejected() -> None:
    net = Net()
    leader = net.elect("n1")
    with pytest.raises(ConfChangeRejected):
        leader.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n2"))
    with pytest.raises(ConfChangeRejected):
        leader.propose_conf_change(ConfChange(ConfChangeOp.REMOVE_VOTER, "n9"))
    with pytest.raises(NotLeader):
        net.nodes["n2"].propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))


def test_config_reverts_when_its_entry_is_truncated() -> None:
    conf = encode_conf_entry(
        ConfChange(ConfChangeOp.ADD_VOTER, "n4"), ConfState(voters=("n1", "n2", "n3", "n4"))
    )
    entries = [Entry(1, 1), Entry(2, 2, EntryKind.CONFIG, conf)]
    follower = make_node("n3", entries=entries, hard_state=HardState(term=2, commit=1))
    assert follower.voters == ("n1", "n2", "n3", "n4")
    follower.step(
        Message(MessageType.APPEND, "n2", "n3", 3, index=1, log_term=1, entries=(Entry(3, 2),))
    )
    assert voters(follower) == IDS3


def test_removed_leader_steps_down_once_removal_commits() -> None:
    net = Net()
    leader = net.elect("n1")
    leader.propose_conf_change(ConfChange(ConfChangeOp.REMOVE_VOTER, "n1"))
    assert leader.role is Role.LEADER and leader.voters == ("n2", "n3")
    net.run()
    assert role(leader) is Role.FOLLOWER
    net.tick(3 * ELECTION_TICK, only=["n2", "n3"])
    new_leader = net.leader()
    assert new_leader.id in ("n2", "n3") and new_leader.voters == ("n2", "n3")
    term = new_leader.term
    net.tick(5 * ELECTION_TICK)  # the removed node never campaigns
    assert net.leader() is new_leader and new_leader.term == term


def test_added_node_catches_up_and_votes() -> None:
    net = Net()
    leader = net.elect("n1")
    for k in range(5):
        leader.propose(b"%d" % k)
    net.run()
    net.add(make_node("n4", IDS3, seed=9))  # starts knowing only the founders
    leader.propose_conf_change(ConfChange(ConfChangeOp.ADD_VOTER, "n4"))
    net.tick(2)
    n4 = net.nodes["n4"]
    assert n4.voters == ("n1", "n2", "n3", "n4") and n4.commit_index == leader.commit_index
    assert net.applied["n4"] == net.applied["n1"]


# ----------------------------------------------------------------------------- snapshots


def test_snapshot_sent_to_follower_behind_compaction() -> None:
    net = Net()
    leader = net.elect("n1")
    net.isolate("n3")
    for k in range(10):
        leader.propose(b"%d" % k)
    net.tick(1, only=["n1", "n2"])
    meta = leader.compact(leader.applied_index - 2)
    assert leader.first_index == meta.index + 1
    assert meta.conf == ConfState(voters=IDS3)

    net.heal()
    follower = net.nodes["n3"]
    readies: list[Ready] = []
    for _ in range(3):  # heartbeat -> response -> SNAPSHOT -> restore
        for node_id in ("n1", "n2", "n3"):
            net.nodes[node_id].tick()
        for _ in range(10):
            moved = False
            for node in net.nodes.values():
                messages, applied, rds = drain(node)
                net.applied[node.id].extend(applied)
                if node is follower:
                    readies.extend(rds)
                for m in messages:
                    moved = True
                    if m.type is MessageType.SNAPSHOT:
                        assert m.snapshot == meta and m.to_id == "n3"
                    net.nodes[m.to_id].step(m)
            if not moved:
                break
    snapshots = [rd.snapshot for rd in readies if rd.snapshot is not None]
    assert snapshots == [meta]
    assert follower.pending_snapshot == meta
    assert follower.first_index == meta.index + 1 and follower.commit_index >= meta.index
    assert follower.last_index == leader.last_index  # replication resumed after it
    assert not any(e.index > meta.index for e in net.applied["n3"])  # waits for the state

    # The application transfers the state, then tells the core.
    net.applied["n3"] = list(net.applied["n1"][: meta.index])
    follower.restore_snapshot_done(meta)
    assert follower.pending_snapshot is None
    _, applied, _ = drain(follower)
    net.applied["n3"].extend(applied)
    assert net.applied["n3"] == net.applied["n1"]


def test_snapshot_for_held_entry_only_fast_forwards_commit() -> None:
    follower = make_node("n2", entries=log_of(1, 1, 1), hard_state=HardState(term=1))
    meta = SnapshotMeta(index=2, term=1, conf=ConfState(voters=IDS3))
    follower.step(Message(MessageType.SNAPSHOT, "n1", "n2", 1, snapshot=meta))
    messages, applied, readies = drain(follower)
    assert all(rd.snapshot is None for rd in readies)
    assert follower.commit_index == 2 and [e.index for e in applied] == [1, 2]
    assert [(m.type, m.index) for m in messages] == [(MessageType.APPEND_RESP, 2)]


def test_restart_with_state_transfer_unfinished_reports_pending_snapshot() -> None:
    meta = SnapshotMeta(index=10, term=2, conf=ConfState(voters=IDS3))
    cfg = RaftConfig(node_id="n2", initial_voters=IDS3)
    node = RaftNode(
        cfg, HardState(term=2, commit=10), meta, [Entry(2, 11)], random.Random(0), applied=4
    )
    assert node.pending_snapshot == meta
    node.step(Message(MessageType.HEARTBEAT, "n1", "n2", 2, commit=11))
    _, applied, _ = drain(node)
    assert applied == []
    node.restore_snapshot_done(meta)
    _, applied, _ = drain(node)
    assert [e.index for e in applied] == [11]


def test_compact_refuses_unapplied_index() -> None:
    node = make_node("n1", ("n1",))
    for _ in range(2 * ELECTION_TICK):
        node.tick()
    node.propose(b"x")
    with pytest.raises(ValueError):
        node.compact(2)
    drain(node)
    assert node.compact(2).index == 2 and node.first_index == 3


# ----------------------------------------------------------------------------- pieces


@given(
    st.lists(st.integers(min_value=0, max_value=4), max_size=30),
    st.integers(min_value=0, max_value=40),
    st.integers(min_value=0, max_value=8),
    st.integers(min_value=0, max_value=10),
)
def test_find_conflict_by_term_matches_linear_scan(
    increments: list[int], index: int, term: int, compact_to: int
) -> None:
    terms, current = [], 1
    for step in increments:
        current += step
        terms.append(current)
    entries = log_of(*terms)
    log = RaftLog(SnapshotMeta(), entries, ConfState(voters=IDS3))
    log.applied = log.committed = log.last_index
    log.compact(min(compact_to, log.last_index))

    def linear(i: int, t: int) -> tuple[int, int]:
        if i > log.last_index:
            return i, 0
        while i > 0:
            own = log.term_at(i)
            if own is None:
                return i, 0
            if own <= t:
                return i, own
            i -= 1
        return 0, 0

    assert log.find_conflict_by_term(index, term) == linear(index, term)


@given(st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=6, unique=True))
def test_conf_entry_round_trips(names: list[str]) -> None:
    conf = ConfState(voters=tuple(sorted(names)))
    change = ConfChange(ConfChangeOp.ADD_VOTER, names[0])
    assert decode_conf_entry(encode_conf_entry(change, conf)) == (change, conf)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{}",
        b"[]",
        b'{"op":"add_voter","node_id":"n4","voters":["n1"]}',
        b'{"op":"nope","node_id":"n4","voters":["n4"]}',
        b'{"op":"add_voter","node_id":"n4","voters":["n4","n1"]}',
    ],
)
def test_malformed_conf_entry_is_refused(data: bytes) -> None:
    with pytest.raises(InvalidConfEntry):
        decode_conf_entry(data)
