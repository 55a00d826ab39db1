"""The production Raft driver (exchange.node.driver) on its own: the Ready contract it
enforces whoever runs it (the node's loop or the simulation)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import pytest

from exchange.node.driver import CompactionSettings, RaftDriver
from exchange.raft.core import RaftConfig, RaftNode, Role
from exchange.raft.messages import Message
from exchange.raft.types import Entry, HardState, SnapshotMeta
from tests.sim.harness import SimDisk, run_now

ELECTION_TICKS = 5


class Recorder:
    """Transport and Applier that remember what the driver handed them."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.applied: list[int] = []

    def send(self, messages: Sequence[Message]) -> None:
        self.sent.extend(messages)

    def role_changed(self, role: Role, leader_id: str) -> None:
        pass

    async def apply(self, entries: Sequence[Entry]) -> None:
        self.applied.extend(e.index for e in entries)

    def install(self, meta: SnapshotMeta) -> None:
        raise AssertionError("no snapshot in a fresh single-node log")

    def compact_index_max(self) -> int:
        return 0


def _driver(voters: tuple[str, ...]) -> tuple[RaftDriver, SimDisk, Recorder]:
    core = RaftNode(RaftConfig(node_id="n1", initial_voters=voters,
                               election_tick=ELECTION_TICKS, heartbeat_tick=1),
                    HardState(), SnapshotMeta(), [], random.Random(1))
    disk, recorder = SimDisk(), Recorder()
    driver = RaftDriver(core, disk, recorder, recorder,
                        CompactionSettings(every_entries=1_000, log_bytes_max=1 << 20,
                                           keep_entries=10, keep_bytes=1 << 20),
                        on_input=lambda: None)
    return driver, disk, recorder


def _campaign(driver: RaftDriver) -> None:
    for _ in range(ELECTION_TICKS * 3):
        driver.tick()


def test_driver_sends_nothing_of_a_ready_before_it_is_durable() -> None:
    driver, disk, recorder = _driver(("n1", "n2", "n3"))
    _campaign(driver)
    rd = driver.take_ready()
    assert rd is not None and rd.messages
    driver.write(rd)
    with pytest.raises(AssertionError, match="before it is durable"):
        run_now(driver.finish(rd))
    assert recorder.sent == []
    driver.sync()
    assert not disk.pending
    run_now(driver.finish(rd))
    assert recorder.sent == list(rd.messages)


def test_driver_applies_each_committed_entry_once_in_order() -> None:
    driver, _disk, recorder = _driver(("n1",))
    _campaign(driver)
    for data in (b"a", b"b", b"c"):
        while (rd := driver.take_ready()) is not None:
            driver.persist(rd)
            run_now(driver.finish(rd))
        if driver.core.role is Role.LEADER:
            driver.core.propose(data)
    while (rd := driver.take_ready()) is not None:
        driver.persist(rd)
        run_now(driver.finish(rd))
    assert recorder.applied == sorted(set(recorder.applied))
    assert recorder.applied[-1] == driver.core.last_index == driver.core.applied_index
