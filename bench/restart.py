"""Restart time against chain height (issue 16, item 4): `python -m bench.restart`.

Builds chains of 1k, 10k and 100k blocks quickly, straight through the block store and
the applier (real signed blocks and envelopes, no cluster), then times what a node does
at start: open the store and load the applied state (`LedgerApplier`), first from the
stored state as a node finds it after a clean stop, then as after a crash just before a
checkpoint (the most blocks left to replay), and the full replay `--rebuild-state` does.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

from bench.main import _bench_network
from exchange.ledger.apply import CHECKPOINT_EVERY_BLOCKS, LedgerApplier
from exchange.ledger.block import (
    RESULT_OK,
    CheckedBlock,
    block_hash,
    build_block,
    new_body,
    open_envelope,
    seal_envelope,
)
from exchange.ledger.checkpoint import STATE_FORMAT, blob_digest, dump_state
from exchange.ledger.state import LedgerState
from exchange.ledger.store import BlockStore
from exchange.v1 import ledger_pb2

HEIGHTS = (1_000, 10_000, 100_000)
TXS_PER_BLOCK = 4
BLOCKS_PER_BATCH = 64


def build_chain(path: Path, height: int) -> None:
    """A chain of `height` blocks of TXS_PER_BLOCK signed probes, applied as a node
    applies them (checked, judged, stored with checkpoints)."""
    genesis, node, analyst = _bench_network()
    store = BlockStore.create(path, genesis)
    applier = LedgerApplier(store, "tax", node)
    now = int(time.time() * 1000)
    while store.height < height:
        batch: list[tuple[ledger_pb2.Block, CheckedBlock | None]] = []
        tip_hash, tip_height = store.tip_hash, store.height
        for i in range(min(BLOCKS_PER_BATCH, height - store.height)):
            envelopes = []
            for _ in range(TXS_PER_BLOCK):
                body = new_body("bench", "tax", now)
                body.probe.payload = os.urandom(200)
                envelopes.append(seal_envelope(body, analyst))
            block = build_block("bench", tip_height + i + 1, tip_hash, envelopes, now, "tax",
                                node, 1, tip_height + i + 2)
            tip_hash = block_hash(block.header)
            batch.append((block, None))
        applier.apply_many(batch)
    store.close()


def state_as_of(path: Path, height: int) -> None:
    """Store the state as of `height` as the checkpoint: what a crash just before the
    next checkpoint leaves behind (every block above it is to be replayed)."""
    with BlockStore.open(path) as store:
        state = LedgerState(store.signed_genesis)
        for h in range(1, height + 1):
            _, timestamp_ms, _ = store.index_columns(h)
            for raw, code in zip(store.envelopes(h), store.results(h), strict=True):
                if code == RESULT_OK:
                    state.replay(open_envelope(raw, state.chain_id), h, timestamp_ms)
        blob = dump_state(state)
    db = sqlite3.connect(path)
    with db:
        db.execute("INSERT OR REPLACE INTO state_checkpoint VALUES (1,?,?,?,?)",
                   (height, STATE_FORMAT, blob_digest(blob), blob))
    db.close()


def time_start(path: Path, rebuild: bool = False) -> tuple[float, int]:
    """Seconds to open the store and load the applied state, and blocks replayed."""
    started = time.perf_counter()
    store = BlockStore.open(path)
    applier = LedgerApplier(store, rebuild=rebuild)
    elapsed = time.perf_counter() - started
    store.close()
    return elapsed, applier.replayed_blocks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--heights", default=",".join(map(str, HEIGHTS)))
    parser.add_argument("--dir", default=None, help="where to build the chains")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for height in (int(h) for h in args.heights.split(",")):
            path = Path(tmp) / f"chain-{height}.db"
            started = time.perf_counter()
            build_chain(path, height)
            built_s = time.perf_counter() - started
            with BlockStore.open(path) as store:  # as a clean stop leaves it
                LedgerApplier(store).write_checkpoint()
            clean_s, clean_replayed = time_start(path)
            state_as_of(path, max(0, height - (CHECKPOINT_EVERY_BLOCKS - 1)))
            crash_s, crash_replayed = time_start(path)
            rebuild_s, rebuilt = time_start(path, rebuild=True)
            row = {"height": height, "build_s": round(built_s, 1),
                   "start_clean_s": round(clean_s, 3), "replayed_clean": clean_replayed,
                   "start_after_crash_s": round(crash_s, 3),
                   "replayed_after_crash": crash_replayed,
                   "rebuild_state_s": round(rebuild_s, 2), "replayed_rebuild": rebuilt,
                   "store_bytes": path.stat().st_size}
            rows.append(row)
            print(json.dumps(row), flush=True)
            path.unlink()
    print(f"{'height':>8} {'start (clean stop)':>19} {'start (crash)':>14} "
          f"{'full replay (--rebuild-state)':>30}")
    for r in rows:
        print(f"{r['height']:>8} {r['start_clean_s']:>17.3f} s {r['start_after_crash_s']:>12.3f} s"
              f" {r['rebuild_state_s']:>28.2f} s")


if __name__ == "__main__":
    main()
