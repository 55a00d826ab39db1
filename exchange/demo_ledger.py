"""Used by `make demo`: write a small ledger with the keys `exchange init` made, exactly
as nodes apply blocks (tax's node proposes, every member's node attests), and print two
transaction ids for the evidence step. Replaced by the running cluster once it lands."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from exchange.identity.config import load_node_config, load_profile, read_signed_genesis
from exchange.identity.keys import CachedSigner, read_signing_key
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import new_body, seal_envelope
from exchange.ledger.store import BlockStore


def main(net_dir: Path, store_path: Path, txids_path: Path) -> None:
    agencies = ["tax", "police", "customs", "pboc"]
    configs = {a: load_node_config(net_dir / a / "node.toml") for a in agencies}
    nodes = {a: CachedSigner(read_signing_key(c.paths.node_key)) for a, c in configs.items()}
    analysts = {a: CachedSigner(read_signing_key(load_profile(net_dir / a / "profile.toml")
                                                 .signing_key)) for a in agencies}
    genesis = read_signed_genesis(configs["tax"].paths.genesis)
    applier = LedgerApplier(BlockStore.create(store_path, genesis), "tax", nodes["tax"])
    others = {a: LedgerApplier(BlockStore.create(store_path.with_name(f"{a}-blocks.db"),
                                                 genesis), a, nodes[a])
              for a in agencies if a != "tax"}
    chosen = []
    for height in range(1, 6):
        envs = []
        for agency in agencies:
            body = new_body(applier.chain_id, agency, int(time.time() * 1000))
            body.probe.payload = f"{agency} probe {height}".encode()
            envs.append(seal_envelope(body, analysts[agency]))
        block = applier.cut(envs, int(time.time() * 1000), nodes["tax"], "tax", 1, height + 1)
        applied = applier.apply(block)
        attestations = [applied.attestation] + [o.apply(block).attestation for o in others.values()]
        applier.receive_attestations([a for a in attestations if a is not None])
        if height in (2, 4):
            chosen.append(applied.checked.envelopes[height % 4].tx_id.hex())
    print(f"5 blocks of 4 transactions applied and attested by {', '.join(agencies)}")
    txids_path.write_text("\n".join(chosen) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
