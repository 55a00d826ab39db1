"""The block store survives kill -9 in the middle of writing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from exchange.ledger.store import BlockStore
from exchange.ledger.verify import verify_store

ROOT = Path(__file__).resolve().parents[3]

_CHILD = """
import sys, time
from pathlib import Path
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.store import BlockStore
from tests.support.ledger_net import make_net, probe
net = make_net(seed=11)
path = Path(sys.argv[1])
applier = LedgerApplier(BlockStore.create(path, net.signed_genesis))
while True:
    envs = [probe(net, "tax", b"p" * 2000) for _ in range(20)]
    block = applier.cut(envs, int(time.time() * 1000), net.nodes["tax"], "tax")
    applier.apply(block)
    print(applier.store.height, flush=True)
"""


def test_kill_9_mid_append_loses_no_acknowledged_block(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "s.db"
    acknowledged = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(path)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            assert proc.stdout is not None
            lines = 0
            target = rng.randint(3, 15)
            while lines < target and time.monotonic() < deadline:
                line = proc.stdout.readline()
                if not line:
                    break
                acknowledged = max(acknowledged, int(line))
                lines += 1
            time.sleep(rng.random() * 0.05)
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        # each restart continues the same chain
        with BlockStore.open(path) as store:
            report = verify_store(store)
            assert report.ok, report.error
            assert store.height >= acknowledged
    assert acknowledged >= 12
