"""A deterministic simulation of a Raft cluster built from `exchange.raft.core.RaftNode`.

One seed fixes everything: cluster shape, timing parameters, the network's behaviour
(drops, duplicates, delays, reordering, symmetric and one-way partitions), the disks
(writes are volatile until fsync; a crash keeps a random prefix of what was not yet
fsynced, possibly cutting a batch of entries), crashes (also right before and right
after an fsync) and restarts, drifting clocks, client proposals,
membership changes, leadership transfers, log compaction and the state transfers that
snapshots require. The same seed and step count replay the same run exactly.

Each node is driven by the production Raft driver (exchange.node.driver.RaftDriver),
the code that runs in a node, with this file's fake disk (Storage), network (Transport)
and state machine (Applier). The simulation calls the driver's phases as separate events
(take a Ready and write it; fsync; finish: send, install, apply, advance, compact), so a
node keeps stepping and may crash between any two; the driver's compaction policy runs
as in a node, bounded by the final index (the highest index a quorum has attested).

After every event the harness checks election safety, log matching, leader
completeness, state machine safety and per-incarnation monotonic term and commit (log
matching is rechecked for a node whenever its log's bounds or last entry change), and
the driver's own invariants: nothing acknowledged before it is durable (every message
sent is checked against the sender's fsynced disk), nothing applied twice (each index
applied once, in order), and attestations never lost across a link replacement (each
node's attestation of each applied entry rides a link queue per peer; links are
replaced at random and hand their queue over as a node's links do). At the end it heals
everything, restarts every node, runs quietly and checks liveness: one leader that
every member follows, every member applied everything, every acknowledged proposal is
in every member's state machine exactly once at the index it was acknowledged at, and
every attestation queued was delivered unless its sender or receiver went down.

(Over 600 lines: one run's event loop, its faults and its checks share the run's state
and read best together; the world's values are in world.py.)
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field

from exchange.node.driver import CompactionSettings, RaftDriver
from exchange.node.peers import AttestationQueue
from exchange.raft.confchange import ConfChange, ConfChangeOp
from exchange.raft.core import (
    ConfChangeRejected,
    NotLeader,
    ProposalDropped,
    RaftConfig,
    RaftError,
    RaftNode,
    Ready,
    Role,
)
from exchange.raft.messages import Message, MessageType
from exchange.raft.types import Entry, EntryKind, SnapshotMeta
from tests.sim.world import (
    ATTESTATIONS_QUEUED_MAX,
    DEFAULT_STEPS,
    LOG_BYTES_MAX,
    MEMBERS_MIN,
    UNIVERSE,
    Attestation,
    NodeFactory,
    SimDisk,
    SimNode,
    SimParams,
    SimResult,
    Violation,
    default_node_factory,
    replay_command,
    run_now,
)

__all__ = [
    "DEFAULT_STEPS",
    "NodeFactory",
    "SimParams",
    "SimResult",
    "Simulation",
    "Violation",
    "replay_command",
    "run_now",
    "run_seed",
    "SimDisk",
]


class SimTransport:
    """A node's Transport: checks that what it sends is durable, then hands it to the
    simulated network."""

    def __init__(self, sim: Simulation, sn: SimNode) -> None:
        self.sim, self.sn = sim, sn

    def send(self, messages: Sequence[Message]) -> None:
        for message in messages:
            self.sim._check_durable(self.sn, message)
            self.sim._send(message)


class SimApplier:
    """A node's Applier: the simulated state machine, with an attestation of each
    applied entry sent to every peer, and compaction bounded by the final index."""

    def __init__(self, sim: Simulation, sn: SimNode) -> None:
        self.sim, self.sn = sim, sn

    def role_changed(self, role: Role, leader_id: str) -> None:
        """Nothing to do: the checks read the role from the core."""

    async def apply(self, entries: Sequence[Entry]) -> None:
        for entry in entries:
            self.sim._apply(self.sn, entry)

    def install(self, meta: SnapshotMeta) -> None:
        self.sim._schedule_transfer(self.sn, meta)

    def compact_index_max(self) -> int:
        return self.sn.final_index


class SendsBeforeSync(RaftDriver):
    """Planted driver bug: sends a Ready's messages as soon as it is written."""

    def write(self, rd: Ready) -> None:
        super().write(rd)
        self.transport.send(rd.messages)


# ------------------------------------------------------------------------------ simulation


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    node_id: str = field(compare=False, default="")
    incarnation: int = field(compare=False, default=0)
    message: Message | None = field(compare=False, default=None)
    snapshot: SnapshotMeta | None = field(compare=False, default=None)
    attestations: tuple[Attestation, ...] = field(compare=False, default=())


class Simulation:
    """One seeded run. `run()` returns a SimResult; it never raises for a violation."""

    def __init__(
        self,
        seed: int,
        steps: int,
        node_factory: NodeFactory = default_node_factory,
        quiet_ticks_max: int = 400,
        unsafe_send_before_fsync: bool = False,
        params_override: dict[str, object] | None = None,
    ) -> None:
        """`unsafe_send_before_fsync` breaks the Ready contract on purpose (sends each
        Ready's messages before its writes are durable), to show the checks notice."""
        self.seed = seed
        self.steps_max = steps
        self.rng = random.Random(seed)
        self.params = SimParams.from_rng(self.rng)
        if params_override:
            self.params = dataclasses.replace(self.params, **params_override)  # type: ignore[arg-type]
        self.node_factory = node_factory
        self.quiet_ticks_max = quiet_ticks_max
        self.unsafe_send_before_fsync = unsafe_send_before_fsync
        self.now = 0.0
        self.seq = 0
        self.events: list[_Event] = []
        self.chaos = True
        self.blocked: set[tuple[str, str]] = set()
        self.initial_voters = UNIVERSE[: self.params.members_initial]
        self.nodes = {
            node_id: SimNode(node_id, SimDisk(), self.rng.getrandbits(64)) for node_id in UNIVERSE
        }
        for sn in self.nodes.values():
            skew = self.params.clock_skew
            sn.clock_rate = self.rng.uniform(1.0 - skew, 1.0 + skew)
        # What the checks remember.
        self.leader_of_term: dict[int, str] = {}
        self.log_entries: dict[tuple[int, int], tuple[EntryKind, bytes, int]] = {}
        self.committed: dict[int, Entry] = {}
        self.commit_term: dict[int, int] = {}
        self.commit_index_max = 0
        self.applied: dict[int, Entry] = {}
        self.acknowledged: dict[bytes, int] = {}
        self.result = SimResult(seed=seed, steps=steps, violation=None)
        self.proposal_counter = 0
        self.touched: set[str] = set()
        # attestations queued for a peer and neither delivered nor excused (the sender's
        # or the receiver's memory gone with a crash): (sender, receiver) -> attestations
        self.attestations_owed: dict[tuple[str, str], set[Attestation]] = {}

    # ---------------------------------------------------------------- scheduling

    def _schedule(self, delay: float, kind: str, **fields: object) -> None:
        self.seq += 1
        event = _Event(self.now + delay, self.seq, kind, **fields)  # type: ignore[arg-type]
        heapq.heappush(self.events, event)

    def _live(self) -> list[SimNode]:
        return [sn for sn in self.nodes.values() if sn.node is not None]

    # ---------------------------------------------------------------- running

    def run(self) -> SimResult:
        try:
            self._run()
        except Violation as violation:
            self.result.violation = violation
            self.result.trace = traceback.format_exc()
        except AssertionError as exc:  # the core (or the driver) caught itself
            self.result.violation = Violation("assertion", repr(exc))
            self.result.trace = traceback.format_exc()
        self.result.sim_ticks = int(self.now)
        self.result.terms_max = max(
            (sn.node.term for sn in self.nodes.values() if sn.node is not None), default=0
        )
        self.result.acknowledged = len(self.acknowledged)
        return self.result

    def _run(self) -> None:
        for sn in self.nodes.values():
            self._start(sn)
        self._schedule(1.0, "tick")
        steps = 0
        while steps < self.steps_max:
            self._process_next()
            steps += 1
            self._chaos()
            self._check()
        self._quiet()

    def _process_next(self) -> None:
        event = heapq.heappop(self.events)
        self.now = event.time
        self.result.events += 1
        self.touched.clear()
        kind = event.kind
        if kind == "tick":
            self._on_tick()
            self._schedule(1.0, "tick")
            return
        if kind == "deliver":
            assert event.message is not None
            self._on_deliver(event.message)
            return
        if kind == "attest":
            self._on_attestations(event)
            return
        sn = self.nodes[event.node_id]
        if sn.node is None or sn.incarnation != event.incarnation:
            return  # meant for an incarnation that crashed
        self.touched.add(sn.node_id)
        if kind == "ready":
            self._on_ready(sn)
        elif kind == "fsync":
            self._on_fsync(sn)
        elif kind == "transfer":
            assert event.snapshot is not None
            self._on_transfer(sn, event.snapshot)
        elif kind == "crash":
            if self.chaos:
                self._crash(sn)
        elif kind == "isolate":
            if self.chaos:
                self._isolate(sn.node_id)
        elif kind == "relink":
            self._replace_link(sn)
        else:
            raise AssertionError(kind)

    def _on_tick(self) -> None:
        for sn in self.nodes.values():
            if sn.node is None and self.chaos and self.now >= sn.restart_at:
                self._start(sn)
        live = self._live()
        self.rng.shuffle(live)
        for sn in live:
            assert sn.node is not None
            # Clocks drift: a node ticks at its own rate (safety must not care).
            sn.clock += sn.clock_rate
            while sn.clock >= 1.0 and sn.driver is not None:
                sn.clock -= 1.0
                sn.driver.tick()
            self.touched.add(sn.node_id)
            self._flush_attestations(sn)

    def _after_input(self, sn: SimNode) -> None:
        """The driver's `on_input`: schedule a Ready event if the core has one."""
        node = sn.node
        if node is None or sn.driver is None or sn.driver.busy or sn.ready_scheduled:
            return
        if node.has_ready():
            sn.ready_scheduled = True
            self._schedule(
                self.rng.uniform(0.001, 0.05),
                "ready",
                node_id=sn.node_id,
                incarnation=sn.incarnation,
            )

    def _on_ready(self, sn: SimNode) -> None:
        driver = sn.driver
        assert driver is not None
        sn.ready_scheduled = False
        rd = driver.take_ready()
        if rd is None:
            return
        driver.write(rd)
        sn.outstanding = rd
        delay = self.rng.uniform(0.001, 0.2)
        if self.chaos and self.rng.random() < 0.05:
            delay = self.rng.uniform(0.2, 3.0)  # a slow disk
        self._schedule(delay, "fsync", node_id=sn.node_id, incarnation=sn.incarnation)

    def _on_fsync(self, sn: SimNode) -> None:
        driver, rd = sn.driver, sn.outstanding
        assert driver is not None and rd is not None
        if self.chaos and self.rng.random() < self.params.p_crash_before_fsync:
            self._crash(sn)  # a random prefix of the pending writes survives
            return
        driver.sync()
        if self.chaos and self.rng.random() < self.params.p_crash_after_fsync:
            self._crash(sn)  # durable, but nothing sent or applied
            return
        sn.outstanding = None
        run_now(driver.finish(rd))  # send, install, apply, advance, compact
        self._after_input(sn)

    def _check_durable(self, sn: SimNode, message: Message) -> None:
        """Nothing acknowledged before it is durable: a vote, a term and an appended
        entry a message speaks for are on the sender's fsynced disk."""
        if message.type in (MessageType.PRE_VOTE, MessageType.PRE_VOTE_RESP):
            return  # a pre-vote speaks for a term nobody holds yet
        durable = sn.disk.hard_state
        problem = ""
        if message.term > durable.term:
            problem = f"term {message.term}, durable {durable.term}"
        elif message.type is MessageType.VOTE_RESP and not message.reject and \
                message.term == durable.term and durable.vote != message.to_id:
            # (a vote of an earlier term is covered by any durable later term: the node
            # never votes in that term again)
            problem = (f"vote for {message.to_id} in term {message.term}, durable vote "
                       f"{durable.vote or '-'} in term {durable.term}")
        elif message.type is MessageType.APPEND_RESP and not message.reject and \
                message.index > sn.disk.last_index:
            problem = f"holds {message.index}, durable up to {sn.disk.last_index}"
        if problem:
            raise Violation("acknowledged before durable",
                            f"{sn.node_id} sent {message.type.name} to {message.to_id}: {problem}")

    # ---------------------------------------------------------------- network

    def _send(self, message: Message) -> None:
        if self.chaos and self.rng.random() < self.params.drop_rate:
            return
        copies = 2 if self.chaos and self.rng.random() < self.params.dup_rate else 1
        for _ in range(copies):
            delay = self.rng.uniform(0.01, 0.5)
            if self.chaos and self.rng.random() < self.params.long_delay_rate:
                delay = self.rng.uniform(0.5, 3.0 * self.params.election_tick)
            self._schedule(delay, "deliver", message=message)

    def _on_deliver(self, message: Message) -> None:
        if (message.from_id, message.to_id) in self.blocked:
            return
        sn = self.nodes[message.to_id]
        if sn.driver is None:
            return
        self.touched.add(sn.node_id)
        sn.driver.step(message)

    # ---------------------------------------------------------------- attestations

    def _attest(self, sn: SimNode, index: int) -> None:
        """A node attests each entry it applies, to itself and to every peer's link."""
        self._hold_attestations(sn, [(sn.node_id, index)])
        for peer, queue in sn.links.items():
            if queue.add((sn.node_id, index)):
                self.attestations_owed.setdefault((sn.node_id, peer), set()).add(
                    (sn.node_id, index))

    def _hold_attestations(self, sn: SimNode, attestations: Sequence[Attestation]) -> None:
        for agency, index in attestations:
            sn.attested.setdefault(index, set()).add(agency)
        node = sn.node
        if node is None:
            return
        quorum = len(node.voters) // 2 + 1
        for index in range(len(sn.state_machine), sn.final_index, -1):
            if len(sn.attested.get(index, ())) >= quorum:
                sn.final_index = index
                break

    def _flush_attestations(self, sn: SimNode) -> None:
        """Each link sends what it holds while its peer is reachable (a stream)."""
        for peer, queue in sn.links.items():
            if len(queue) and (sn.node_id, peer) not in self.blocked and \
                    self.nodes[peer].node is not None:
                self._schedule(self.rng.uniform(0.01, 0.5), "attest", node_id=peer,
                               incarnation=self.nodes[peer].incarnation,
                               message=None, attestations=tuple(queue.take()))

    def _on_attestations(self, event: _Event) -> None:
        sn = self.nodes[event.node_id]
        for attestation in event.attestations:  # each sender queues its own only
            owed = self.attestations_owed.get((attestation[0], sn.node_id))
            if owed is not None:
                owed.discard(attestation)  # delivered, or lost with the receiver
        if sn.node is None or sn.incarnation != event.incarnation:
            return
        self._hold_attestations(sn, event.attestations)

    def _replace_link(self, sn: SimNode) -> None:
        """A link replaced (new credentials or address): the new one takes over what
        the old one had not sent, as a node's links do."""
        peer = self.rng.choice(sorted(sn.links))
        fresh: AttestationQueue[Attestation] = AttestationQueue(ATTESTATIONS_QUEUED_MAX)
        fresh.take_over(sn.links[peer])
        sn.links[peer] = fresh

    # ---------------------------------------------------------------- state machine

    def _apply(self, sn: SimNode, entry: Entry) -> None:
        sm = sn.state_machine
        if entry.index != len(sm) + 1:
            raise Violation("apply order", f"{sn.node_id} applies {entry.index} after {len(sm)}")
        self._check_applied(sn.node_id, entry)
        sm.append(entry)
        self._attest(sn, entry.index)
        proposal = sn.proposals.pop(entry.index, None)
        if proposal is not None:
            term, data = proposal
            if entry.term == term:
                if entry.data != data:
                    raise Violation(
                        "acknowledgement", f"{sn.node_id} entry {entry.index} is not its proposal"
                    )
                if data in self.acknowledged:
                    raise Violation("acknowledgement", f"{data!r} acknowledged twice")
                self.acknowledged[data] = entry.index

    def _check_applied(self, node_id: str, entry: Entry) -> None:
        first = self.applied.setdefault(entry.index, entry)
        if first != entry:
            raise Violation(
                "state machine safety",
                f"{node_id} applied {entry} at {entry.index}, another node applied {first}",
            )

    def _schedule_transfer(self, sn: SimNode, meta: SnapshotMeta) -> None:
        delay = self.rng.uniform(0.1, 2.0 * self.params.election_tick if self.chaos else 2.0)
        self._schedule(
            delay, "transfer", node_id=sn.node_id, incarnation=sn.incarnation, snapshot=meta
        )

    def _on_transfer(self, sn: SimNode, meta: SnapshotMeta) -> None:
        """Copy the state up to meta.index from a live peer that has applied it."""
        node = sn.node
        assert node is not None
        if node.applied_index >= meta.index:
            return
        sources = [
            peer
            for peer in self._live()
            if peer is not sn and len(peer.state_machine) >= meta.index
        ]
        if not sources:
            self._schedule_transfer(sn, meta)  # try again later
            return
        source = self.rng.choice(sources)
        sm = sn.state_machine
        for entry in source.state_machine[len(sm) : meta.index]:
            self._check_applied(sn.node_id, entry)
            sm.append(entry)
            # the state comes with its attestations (a node fetches final blocks)
            sn.attested.setdefault(entry.index, set()).update(
                source.attested.get(entry.index, ()))
        if sm[meta.index - 1].term != meta.term:
            raise Violation(
                "snapshot", f"state at {meta.index} has term {sm[meta.index - 1].term}, not {meta}"
            )
        assert sn.driver is not None
        sn.driver.installed(meta)
        self.result.snapshots_installed += 1

    # ---------------------------------------------------------------- lifecycle

    def _config(self, node_id: str) -> RaftConfig:
        p = self.params
        return RaftConfig(
            node_id=node_id,
            initial_voters=self.initial_voters,
            election_tick=p.election_tick,
            heartbeat_tick=p.heartbeat_tick,
            pre_vote=p.pre_vote,
            check_quorum=p.check_quorum,
            max_inflight_msgs=p.max_inflight_msgs,
            max_entries_per_msg=p.max_entries_per_msg,
            max_bytes_per_msg=4096,
            max_uncommitted_entries=p.max_uncommitted_entries,
            max_committed_entries_per_ready=16,
        )

    def _compaction(self) -> CompactionSettings:
        keep = self.params.compact_keep
        return CompactionSettings(
            every_entries=keep,
            log_bytes_max=LOG_BYTES_MAX,
            keep_entries=keep // 4,
            keep_bytes=LOG_BYTES_MAX // 2,
        )

    def _start(self, sn: SimNode) -> None:
        disk = sn.disk
        sn.incarnation += 1
        rng = random.Random(sn.rng_seed ^ sn.incarnation)
        sn.node = self.node_factory(
            self._config(sn.node_id),
            disk.hard_state,
            disk.snapshot,
            list(disk.entries),
            rng,
            len(sn.state_machine),
        )
        driver_class = SendsBeforeSync if self.unsafe_send_before_fsync else RaftDriver
        sn.driver = driver_class(
            sn.node,
            disk,
            SimTransport(self, sn),
            SimApplier(self, sn),
            self._compaction(),
            on_input=lambda: self._after_input(sn),
        )
        sn.links = {
            peer: AttestationQueue(ATTESTATIONS_QUEUED_MAX)
            for peer in UNIVERSE
            if peer != sn.node_id
        }
        sn.outstanding = None
        sn.ready_scheduled = False
        sn.proposals = {}
        sn.seen_term = sn.node.term
        sn.seen_commit = sn.node.commit_index
        sn.leader_checked_term = 0
        sn.log_signature = (0, 0, None)
        self.touched.add(sn.node_id)
        sn.driver.start()  # a recovered snapshot's state is fetched first
        sn.driver.poke()

    def _crash(self, sn: SimNode) -> None:
        for peer, queue in sn.links.items():  # what the links held is gone with it
            owed = self.attestations_owed.get((sn.node_id, peer), set())
            owed.difference_update(queue.take())
        sn.links = {}
        sn.driver = None
        sn.node = None
        sn.incarnation += 1
        sn.disk.crash(self.rng)
        sn.outstanding = None
        sn.ready_scheduled = False
        sn.proposals = {}
        sn.restart_at = self.now + self.rng.randint(1, self.params.downtime_ticks_max)
        self.result.crashes += 1

    # ---------------------------------------------------------------- chaos

    def _leaders(self) -> list[SimNode]:
        return [sn for sn in self._live() if sn.node is not None and sn.node.role is Role.LEADER]

    def _chaos(self) -> None:
        rng, p = self.rng, self.params
        if rng.random() < p.p_propose:
            self._propose()
        if self.chaos and rng.random() < p.p_fault:
            relinked = rng.choice(UNIVERSE)
            self._schedule(0.0, "relink", node_id=relinked,
                           incarnation=self.nodes[relinked].incarnation)
        if rng.random() >= p.p_fault:
            return
        action = rng.random()
        live = self._live()
        down = [sn for sn in self.nodes.values() if sn.node is None]
        leaders = self._leaders()
        if action < 0.15:
            if leaders and rng.random() < 0.5:
                self._crash(rng.choice(leaders))
            elif live:
                self._crash(rng.choice(live))
        elif action < 0.35:
            if down:
                self._start(rng.choice(down))
        elif action < 0.5:
            self._partition()
        elif action < 0.65:
            self.blocked.clear()
        elif action < 0.85:
            self._change_membership()
        else:
            self._transfer_leadership()

    def _propose(self) -> None:
        leaders = self._leaders()
        if not leaders:
            return
        sn = self.rng.choice(leaders)
        node = sn.node
        assert node is not None
        self.proposal_counter += 1
        data = f"{self.seed}:{self.proposal_counter}".encode()
        try:
            term, index = node.propose(data)
        except (NotLeader, ProposalDropped):
            return
        self.result.proposals += 1
        sn.proposals[index] = (term, data)
        self.touched.add(sn.node_id)
        self._poke(sn)

    def _poke(self, sn: SimNode) -> None:
        """Something was proposed to a node's core: its driver looks for a Ready."""
        assert sn.driver is not None
        sn.driver.poke()

    def _partition(self) -> None:
        ids = list(UNIVERSE)
        if self.rng.random() < 0.5:  # symmetric split
            self.rng.shuffle(ids)
            cut = self.rng.randint(1, len(ids) - 1)
            left, right = ids[:cut], ids[cut:]
            for a in left:
                for b in right:
                    self.blocked.add((a, b))
                    self.blocked.add((b, a))
        else:  # one-way: a's messages do not reach b
            a, b = self.rng.sample(ids, 2)
            self.blocked.add((a, b))

    def _isolate(self, node_id: str) -> None:
        for other in UNIVERSE:
            if other != node_id:
                self.blocked.add((node_id, other))
                self.blocked.add((other, node_id))

    def _change_membership(self) -> None:
        leaders = self._leaders()
        if not leaders:
            return
        sn = self.rng.choice(leaders)
        node = sn.node
        assert node is not None
        voters = node.voters
        others = [n for n in UNIVERSE if n not in voters]
        adding = bool(others) and (len(voters) <= MEMBERS_MIN or self.rng.random() < 0.5)
        if adding:
            change = ConfChange(ConfChangeOp.ADD_VOTER, self.rng.choice(others))
        elif len(voters) > MEMBERS_MIN:
            change = ConfChange(ConfChangeOp.REMOVE_VOTER, self.rng.choice(voters))
        else:
            return
        try:
            node.propose_conf_change(change)
        except (NotLeader, ProposalDropped, ConfChangeRejected):
            return
        self.result.conf_changes += 1
        self.touched.add(sn.node_id)
        self._poke(sn)

    def _transfer_leadership(self) -> None:
        leaders = self._leaders()
        if not leaders:
            return
        sn = self.rng.choice(leaders)
        node = sn.node
        assert node is not None
        targets = [v for v in node.voters if v != node.id]
        if not targets:
            return
        try:
            node.transfer_leadership(self.rng.choice(targets))
        except RaftError:
            return
        self.result.transfers += 1
        self.touched.add(sn.node_id)
        self._poke(sn)

    # ---------------------------------------------------------------- checks

    def _check(self) -> None:
        for node_id in sorted(self.touched):
            sn = self.nodes[node_id]
            if sn.node is not None:
                self._check_node(sn, sn.node)

    def _check_node(self, sn: SimNode, node: RaftNode) -> None:
        if node.term < sn.seen_term:
            raise Violation("term monotonic", f"{sn.node_id} term {sn.seen_term} -> {node.term}")
        sn.seen_term = node.term
        commit = node.commit_index
        if commit < sn.seen_commit:
            raise Violation("commit monotonic", f"{sn.node_id} commit {sn.seen_commit} -> {commit}")
        self._check_log_matching(sn, node)
        if commit > sn.seen_commit:
            self._record_commits(sn, node, sn.seen_commit + 1, commit)
            sn.seen_commit = commit
        if node.role is Role.LEADER:
            holder = self.leader_of_term.setdefault(node.term, sn.node_id)
            if holder != sn.node_id:
                raise Violation(
                    "election safety", f"{holder} and {sn.node_id} both lead term {node.term}"
                )
            if sn.leader_checked_term != node.term:
                sn.leader_checked_term = node.term
                self._check_leader_completeness(sn.node_id, node)
                for kind, chance in (
                    ("crash", self.params.p_crash_new_leader),
                    ("isolate", self.params.p_isolate_new_leader),
                ):
                    if self.chaos and self.rng.random() < chance:
                        self._schedule(
                            self.rng.uniform(0.0, 3.0),
                            kind,
                            node_id=sn.node_id,
                            incarnation=sn.incarnation,
                        )

    def _check_log_matching(self, sn: SimNode, node: RaftNode) -> None:
        """Same (index, term) => same entry and same previous term; by induction the
        whole prefixes are then equal (Log Matching). Rechecked whenever the log's
        bounds or last entry change."""
        held = node.last_index >= node.first_index
        last = node.entries(node.last_index, node.last_index + 1) if held else ()
        signature = (node.first_index, node.last_index, last[0] if last else None)
        if signature[:2] == sn.log_signature[:2] and signature[2] is sn.log_signature[2]:
            return
        sn.log_signature = signature
        prev_term = node.term_at(node.first_index - 1)
        assert prev_term is not None
        seen = self.log_entries
        for entry in node.entries(node.first_index, node.last_index + 1):
            value = (entry.kind, entry.data, prev_term)
            known = seen.setdefault((entry.index, entry.term), value)
            if known != value:
                raise Violation(
                    "log matching",
                    f"{sn.node_id} holds ({entry.index}, {entry.term}) as {value}, "
                    f"elsewhere {known}",
                )
            prev_term = entry.term

    def _record_commits(self, sn: SimNode, node: RaftNode, lo: int, hi: int) -> None:
        for index in range(max(lo, node.first_index), hi + 1):
            term = node.term_at(index)
            assert term is not None
            entry = node.entries(index, index + 1)[0]
            known = self.committed.setdefault(index, entry)
            if known != entry:
                raise Violation(
                    "committed entry changed",
                    f"{sn.node_id} committed {entry} at {index}, earlier {known}",
                )
            previous = self.commit_term.get(index)
            if previous is None or node.term < previous:
                self.commit_term[index] = node.term
                for leader in self._leaders():
                    assert leader.node is not None
                    if leader.node.term > node.term:
                        self._check_holds(leader.node_id, leader.node, index)
        self.commit_index_max = max(self.commit_index_max, hi)

    def _check_holds(self, node_id: str, leader: RaftNode, index: int) -> None:
        entry = self.committed[index]
        if index < leader.first_index - 1:
            return  # compacted into its snapshot; state machine safety covers it
        term = leader.term_at(index)
        if term != entry.term:
            raise Violation(
                "leader completeness",
                f"leader {node_id} of term {leader.term} has term {term} at {index}, "
                f"but {entry} committed in term {self.commit_term[index]}",
            )

    def _check_leader_completeness(self, node_id: str, leader: RaftNode) -> None:
        for index in range(max(1, leader.first_index - 1), self.commit_index_max + 1):
            committed_in = self.commit_term.get(index)
            if committed_in is not None and committed_in < leader.term:
                self._check_holds(node_id, leader, index)

    # ---------------------------------------------------------------- the end

    def _quiet(self) -> None:
        self.chaos = False
        self.blocked.clear()
        for sn in self.nodes.values():
            if sn.node is None:
                self._start(sn)
        self._check()
        ticks = 0
        while True:
            event = self.events[0]
            self._process_next()
            self._check()
            if event.kind != "tick":
                continue
            ticks += 1
            if self._settled():
                break
            if ticks > self.quiet_ticks_max:
                raise Violation(
                    "liveness", f"not settled after {ticks} quiet ticks: {self._describe()}"
                )
        self._check_final()
        self._check_attestations_delivered()

    def _check_attestations_delivered(self) -> None:
        """Every attestation queued for a peer reached it, unless the sender or the
        receiver went down meanwhile: none is lost when a link is replaced."""
        while self.events:
            event = heapq.heappop(self.events)
            if event.kind == "attest":
                self._on_attestations(event)
        for sn in self.nodes.values():
            for peer, queue in sn.links.items():
                held = queue.take()
                self._on_attestations(_Event(self.now, 0, "attest", node_id=peer,
                                             incarnation=self.nodes[peer].incarnation,
                                             attestations=tuple(held)))
        for (sender, receiver), owed in sorted(self.attestations_owed.items()):
            if owed:
                raise Violation("attestation lost",
                                f"{len(owed)} of {sender}'s attestations never reached "
                                f"{receiver}, e.g. {min(owed)}")

    def _settled(self) -> bool:
        leaders = [sn.node for sn in self._leaders() if sn.node is not None]
        leaders = [node for node in leaders if node.id in node.voters]
        if not leaders:
            return False
        leader = max(leaders, key=lambda node: node.term)
        if leader.commit_index != leader.last_index:
            return False
        for member in leader.voters:
            node = self.nodes[member].node
            if (
                node is None
                or node.term != leader.term
                or node.leader_id != leader.id
                or node.applied_index != leader.commit_index
                or node.pending_snapshot is not None
            ):
                return False
        return True

    def _check_final(self) -> None:
        leader = max(
            (sn.node for sn in self._leaders() if sn.node is not None), key=lambda n: n.term
        )
        for member in leader.voters:
            sm = self.nodes[member].state_machine
            seen: dict[bytes, int] = {}
            for entry in sm:
                if entry.kind is EntryKind.NORMAL:
                    if entry.data in seen:
                        raise Violation("exactly once", f"{member} applied {entry.data!r} twice")
                    seen[entry.data] = entry.index
            for data, index in self.acknowledged.items():
                if seen.get(data) != index:
                    raise Violation(
                        "acknowledged lost",
                        f"{member} has {data!r} at {seen.get(data)}, acknowledged at {index}",
                    )

    def _describe(self) -> str:
        parts = []
        for sn in self.nodes.values():
            node = sn.node
            if node is None:
                parts.append(f"{sn.node_id}:down")
                continue
            parts.append(
                f"{sn.node_id}:{node.role.value} t{node.term} lead={node.leader_id or '-'} "
                f"c{node.commit_index} a{node.applied_index} last{node.last_index} "
                f"voters={','.join(node.voters)}"
                + (" pending-snap" if node.pending_snapshot else "")
            )
        return "; ".join(parts)


def run_seed(
    seed: int,
    steps: int = DEFAULT_STEPS,
    node_factory: NodeFactory = default_node_factory,
    unsafe_send_before_fsync: bool = False,
    params_override: dict[str, object] | None = None,
) -> SimResult:
    return Simulation(
        seed,
        steps,
        node_factory,
        unsafe_send_before_fsync=unsafe_send_before_fsync,
        params_override=params_override,
    ).run()
