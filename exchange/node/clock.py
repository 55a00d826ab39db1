"""The clock check: a node whose clock its peers agree is off stops leading and
campaigning, since a leader's clock dates every block."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import structlog

from exchange.node import metrics as m
from exchange.node.driver import RaftDriver
from exchange.raft.core import RaftError, Role

log = structlog.get_logger("exchange.node")

TOLERANCE_WINDOW_DIVISOR = 4  # off by more than a quarter of the admission window
PEERS_AGREEING_MIN = 2
MS_PER_S = 1000


class ClockCheck:
    """How far this node's clock is off from its peers' (`off_ms`, None: it agrees)."""

    def __init__(self, agency: str, driver: RaftDriver, admission_window_ms: int) -> None:
        self.agency = agency
        self.driver = driver
        self.tolerance_ms = admission_window_ms // TOLERANCE_WINDOW_DIVISOR
        self.off_ms: int | None = None

    @property
    def ok(self) -> bool:
        return self.off_ms is None

    def check(self, peer_offsets_ms: Sequence[int]) -> None:
        """Compare this node's clock with its peers'. When at least two of them agree
        that it is off by more than the tolerance, this node stops leading and
        campaigning; it says so, and takes part again once its clock agrees."""
        tolerance_ms = self.tolerance_ms
        if len(peer_offsets_ms) < PEERS_AGREEING_MIN:
            return
        ordered = sorted(peer_offsets_ms)
        median = ordered[len(ordered) // 2]
        off = abs(median) > tolerance_ms and sum(
            1 for o in ordered if abs(o) > tolerance_ms) >= PEERS_AGREEING_MIN
        if off and self.off_ms is None:
            log.critical("this node's clock disagrees with its peers'; it will not lead "
                         "until it is corrected (check NTP)", off_by_ms=-median)
        elif not off and self.off_ms is not None:
            log.warning("this node's clock agrees with its peers' again")
        self.off_ms = -median if off else None
        m.CLOCK_OFF.set(-median / MS_PER_S if off else 0)
        if off:
            self._hand_over()

    def _hand_over(self) -> None:
        core = self.driver.core
        if core.role is not Role.LEADER:
            return
        others = [a for a in core.voters if a != self.agency]
        progress = core.progress()
        if others:
            target = max(others, key=lambda a: progress[a].match if a in progress else -1)
            with contextlib.suppress(RaftError):
                # at once: the followers refuse this node's blocks dated in their
                # future, so the target may never catch up with its log
                core.transfer_leadership(target, at_once=True)
                self.driver.poke()
                log.warning("handing leadership over: this node's clock is off",
                            to=target)
