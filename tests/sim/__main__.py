"""Run simulation seeds: `python -m tests.sim --seeds N [--start S] [--steps K]`, or
replay one: `python -m tests.sim --seed S --steps K [--verbose]`."""

from __future__ import annotations

import argparse
import sys
import time

from tests.sim.harness import DEFAULT_STEPS, run_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="run (replay) just this seed")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="chaos events per seed")
    parser.add_argument("--verbose", action="store_true", help="print each seed's summary")
    args = parser.parse_args(argv)

    seeds = [args.seed] if args.seed is not None else range(args.start, args.start + args.seeds)
    failures = []
    totals = {"proposals": 0, "acknowledged": 0, "crashes": 0, "snapshots": 0, "conf": 0}
    started = time.perf_counter()
    for done, seed in enumerate(seeds, 1):
        result = run_seed(seed, args.steps)
        if done % 500 == 0:
            rate = done / (time.perf_counter() - started)
            print(f"... {done} seeds, {len(failures)} failed, {rate:.1f} seeds/s", file=sys.stderr)
        totals["proposals"] += result.proposals
        totals["acknowledged"] += result.acknowledged
        totals["crashes"] += result.crashes
        totals["snapshots"] += result.snapshots_installed
        totals["conf"] += result.conf_changes
        if args.verbose or args.seed is not None:
            print(
                f"seed {seed}: {'ok' if result.ok else 'FAIL'} events={result.events} "
                f"ticks={result.sim_ticks} max_term={result.terms_max} "
                f"proposals={result.proposals} acked={result.acknowledged} "
                f"crashes={result.crashes} snapshots={result.snapshots_installed} "
                f"conf_changes={result.conf_changes} transfers={result.transfers}"
            )
        if not result.ok:
            failures.append(result)
            if args.seed is not None:
                print(result.trace, file=sys.stderr)
            print(f"FAIL seed {seed}: {result.violation}")
            print(f"  replay: {result.replay}")
    elapsed = time.perf_counter() - started
    count = len(seeds)
    print(
        f"{count} seeds, {len(failures)} failed, {elapsed:.1f}s, {count / elapsed:.1f} seeds/s; "
        f"proposals={totals['proposals']} acknowledged={totals['acknowledged']} "
        f"crashes={totals['crashes']} snapshots_installed={totals['snapshots']} "
        f"conf_changes={totals['conf']}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
