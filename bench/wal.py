"""Throughput of the write-ahead log: 1 KiB entries, one fsync per save() call.

Run as ``python -m bench.wal [entries] [batch ...]``; prints one JSON line
per batch size. Figures are for the disk under the system temporary directory unless
``EXCHANGE_BENCH_DIR`` names another.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from exchange.raft.types import Entry, HardState
from exchange.raft.wal import WriteAheadLog

ENTRY_BYTES = 1024


def bench_wal(directory: Path, entries: int, batch: int) -> dict[str, float]:
    """Append `entries` 1 KiB entries in save() calls of `batch`, each with a hard state
    and an fsync, into a fresh log under `directory`; returns rates per second."""
    assert entries > 0 and batch > 0
    directory = Path(directory)
    payload = os.urandom(ENTRY_BYTES)
    wal, state = WriteAheadLog.open(directory)
    assert not state.entries, f"{directory} is not empty"
    saves = 0
    started = time.perf_counter()
    with wal:
        index = 0
        while index < entries:
            count = min(batch, entries - index)
            chunk = [Entry(term=1, index=index + 1 + i, data=payload) for i in range(count)]
            index += count
            wal.save(HardState(term=1, vote="a", commit=index), chunk, sync=True)
            saves += 1
    seconds = time.perf_counter() - started
    return {
        "entries": float(entries),
        "batch": float(batch),
        "seconds": seconds,
        "saves_per_s": saves / seconds,
        "fsyncs_per_s": saves / seconds,
        "entries_per_s": entries / seconds,
        "mib_per_s": entries * ENTRY_BYTES / seconds / (1024 * 1024),
    }


def main(argv: list[str]) -> None:
    entries = int(argv[0]) if argv else 20_000
    batches = [int(arg) for arg in argv[1:]] or [1, 10, 100, 1000]
    base = os.environ.get("EXCHANGE_BENCH_DIR")
    for batch in batches:
        with tempfile.TemporaryDirectory(dir=base) as tmp:
            count = min(entries, 2_000) if batch == 1 else entries
            result = bench_wal(Path(tmp) / "wal", count, batch)
        print(json.dumps({"bench": "raft_wal", **result}, sort_keys=True), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
