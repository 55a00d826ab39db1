"""Deterministic simulation of the Raft core (see harness.py); `python -m tests.sim`."""

from tests.sim.harness import (
    SimParams,
    SimResult,
    Simulation,
    Violation,
    replay_command,
    run_seed,
)

__all__ = ["SimParams", "SimResult", "Simulation", "Violation", "replay_command", "run_seed"]
