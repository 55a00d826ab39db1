"""How fast sample data is generated and loaded, as an operator does it: `exchange data
generate`, then `exchange data load` of each agency's folder into its own SQLite store,
each command in its own process, with its wall and CPU time and peak memory.

    python -m bench.data --companies 1000000 --out var/bench-data

`generate_figures` and `load_figures` are what the benchmark suite calls.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from agents import AGENCIES


@dataclass(frozen=True)
class Run:
    """One command: wall and CPU seconds, peak resident memory, what it printed."""

    seconds: float
    cpu_seconds: float
    rss_peak_mb: float
    stdout: str


def run_measured(args: list[str]) -> Run:
    """Run a command to completion and measure it (its stderr is passed through)."""
    started = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    stdout = child.stdout.read()
    _pid, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({child.returncode}): {stdout[-2000:]}")
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, stdout)


def _exchange() -> list[str]:
    return [sys.executable, "-m", "exchange.cli.main"]


def generate_figures(companies: int, seed: int, out: Path) -> dict[str, object]:
    """`exchange data generate` into `out` (replaced): seconds, peak RSS, bytes."""
    run = run_measured([*_exchange(), "data", "generate", "--seed", str(seed),
                        "--companies", str(companies), "--out", str(out), "--overwrite",
                        "--json"])
    report = json.loads(run.stdout)
    size = {a: sum(p.stat().st_size for p in (out / a).glob("*.csv")) for a in AGENCIES}
    return {"companies": companies, "seconds": round(run.seconds, 1),
            "cpu_seconds": round(run.cpu_seconds, 1), "rss_peak_mb": round(run.rss_peak_mb),
            "bytes": size, "rows": report["rows"], "findings": report["findings"]}


def load_figures(agency: str, folder: Path, store: Path) -> dict[str, object]:
    """`exchange data load` of one agency's folder into a new SQLite store: per file and
    in all, megabytes, seconds and MB/s; the process's CPU seconds and peak RSS."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{store}{suffix}").unlink(missing_ok=True)
    load_before = os.getloadavg()[0]
    run = run_measured([*_exchange(), "data", "load", "--agency", agency, str(folder),
                        "--store", str(store), "--json"])
    files = json.loads(run.stdout)["files"]
    size = sum(f["size_bytes"] for f in files)
    return {"agency": agency, "mb": round(size / 1e6, 1), "seconds": round(run.seconds, 1),
            "mb_per_s": round(size / 1e6 / run.seconds, 1),
            "cpu_seconds": round(run.cpu_seconds, 1),
            # what a shared machine's other work changes least: MB per CPU second
            "mb_per_cpu_s": round(size / 1e6 / run.cpu_seconds, 1) if run.cpu_seconds
            else None,
            # the machine's load average (1 min) before and after: others' work included
            "load_average": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "rss_peak_mb": round(run.rss_peak_mb),
            "store_mb": round(store.stat().st_size / 1e6),
            "files": [{"dataset": f["dataset"], "rows": f["rows"], "method": f["method"],
                       "mb": round(f["size_bytes"] / 1e6, 1), "seconds": f["seconds"],
                       "mb_per_s": round(f["size_bytes"] / 1e6 / f["seconds"], 1)
                       if f["seconds"] else None} for f in files]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--companies", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--out", type=Path, required=True,
                        help="working folder (data/ and stores/ are made in it)")
    parser.add_argument("--keep", action="store_true", help="keep the data and stores")
    args = parser.parse_args(argv)
    data, stores = args.out / "data", args.out / "stores"
    stores.mkdir(parents=True, exist_ok=True)
    figures: dict[str, object] = {"generate": generate_figures(args.companies, args.seed,
                                                               data)}
    print(json.dumps(figures["generate"]), flush=True)
    loads = []
    for agency in AGENCIES:
        loads.append(load_figures(agency, data / agency, stores / f"{agency}.db"))
        print(json.dumps(loads[-1]), flush=True)
    figures["load"] = loads
    total_mb = sum(float(str(f["mb"])) for f in loads)
    total_s = sum(float(str(f["seconds"])) for f in loads)
    print("\n| companies | generate s | generate RSS MB | agency | MB | load s | MB/s "
          "| load CPU s | MB per CPU s | load RSS MB | load average |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|")
    g = figures["generate"]
    assert isinstance(g, dict)
    for f in loads:
        print(f"| {args.companies:,} | {g['seconds']} | {g['rss_peak_mb']} | {f['agency']} "
              f"| {f['mb']} | {f['seconds']} | {f['mb_per_s']} | {f['cpu_seconds']} "
              f"| {f['mb_per_cpu_s']} | {f['rss_peak_mb']} | {f['load_average']} |")
    print(f"\nall four: {total_mb:.0f} MB in {total_s:.0f} s, "
          f"{total_mb / total_s:.1f} MB/s loaded one after the other")
    if not args.keep:
        shutil.rmtree(data, ignore_errors=True)
        shutil.rmtree(stores, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
