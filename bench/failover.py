"""Failover on the namespace network: the time from cutting the leader off to the first
commit under a new leader, over many runs, printed (never asserted).

Four agencies, each node in its own network namespace with its own address on a bridge,
configured by the key ceremony (tests/support/netns.py builds it). Closed-loop clients keep
submitting to every node. Each run cuts the current leader off from the other nodes
with nftables (everything to and from them dropped; clients still reach it), then clients
of the other three nodes submit fresh probes until one is acknowledged in a block of a
later Raft term; the time from the cut to that acknowledgement is the figure. The cut is
healed and the old leader caught up before the next run.

    sudo .venv/bin/python -m bench.failover --runs 20 [--json]

Needs root, iproute2 and nftables; without them it says so in one line and exits 0.
Run from the repository root (the harness lives in tests/).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

RUNS_DEFAULT = 20
SETTLE_S = 1.0  # after healing, before the next cut: the old leader back in step


def measure(runs: int = RUNS_DEFAULT, verbose: bool = True) -> dict[str, object]:
    """Cut the leader off `runs` times; the failover times and their summary."""
    from tests.support.netns import NetnsNetwork, Submitters, first_commit_after

    times_s: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp, \
            NetnsNetwork(Path(tmp)) as net, Submitters(net) as subs:
        subs.wait_growth(20)
        for run in range(1, runs + 1):
            leader = net.wait_ready()
            st = net.status(leader)
            assert st is not None
            others = [a for a in net.agencies if a != leader]
            cut_at = time.monotonic()
            net.isolate(leader)
            seconds, by = first_commit_after(net, cut_at, st.term, others)
            new_leader, _, _ = net.wait_new_leader(leader, st.term, among=others)
            times_s.append(seconds)
            if verbose:
                print(f"run {run:>2}: {leader} cut off; first commit under {new_leader} "
                      f"after {seconds * 1000:,.0f} ms (acknowledged by {by})", flush=True)
            net.heal()
            net.wait_ready()
            subs.wait_growth(5, agencies=[leader])
            time.sleep(SETTLE_S)
        acks, _ = subs.snapshot()
    ordered = sorted(times_s)
    return {
        "runs": runs,
        "failover_median_ms": round(statistics.median(ordered) * 1000, 1),
        "failover_max_ms": round(ordered[-1] * 1000, 1),
        "failover_min_ms": round(ordered[0] * 1000, 1),
        "failover_ms": [round(t * 1000, 1) for t in times_s],
        "acknowledged_during_runs": len(acks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=RUNS_DEFAULT)
    parser.add_argument("--json", action="store_true", help="one JSON object only")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    from tests.support.netns import missing_requirement

    missing = missing_requirement()
    if missing:
        print(f"failover benchmark skipped: {missing}")
        return
    result = measure(args.runs, verbose=not args.json)
    if args.json:
        print(json.dumps(result))
        return
    print(f"failover over {result['runs']} runs: median {result['failover_median_ms']:,} ms, "
          f"max {result['failover_max_ms']:,} ms, min {result['failover_min_ms']:,} ms")


if __name__ == "__main__":
    main()
