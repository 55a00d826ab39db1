"""`python -m tests.support.omitting_node node --config FILE`: a node that, while it leads and
while the file named by $EXCHANGE_TEST_OMIT exists, leaves out of every block it cuts the
probes whose payload starts with b"omit:" (a leader censoring transactions), for
tests/cluster/test_leader_omission.py. Test code only: nothing in the exchange package calls it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from exchange.cli.main import main
from exchange.ledger.block import OpenedEnvelope
from exchange.node.mempool import Mempool

MARKER = b"omit:"
_propose_block = Mempool.propose_block


def _censored(opened: OpenedEnvelope) -> bool:
    return opened.kind == "probe" and bytes(opened.body.probe.payload).startswith(MARKER)


def _propose_leaving_out(self: Mempool, chosen: list[OpenedEnvelope]) -> None:
    flag = os.environ.get("EXCHANGE_TEST_OMIT", "")
    kept: Sequence[OpenedEnvelope] = chosen
    if flag and Path(flag).exists():
        kept = [o for o in chosen if not _censored(o)]
    if kept:
        _propose_block(self, list(kept))


Mempool.propose_block = _propose_leaving_out  # type: ignore[method-assign]

if __name__ == "__main__":
    main()
