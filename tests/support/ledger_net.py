"""An in-memory network for ledger tests: real keys, a real signed genesis, and a
helper that writes blocks to a store the way every node applies them."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from exchange.identity.genesis import assemble_genesis, build_genesis, issue_credential
from exchange.identity.keys import CachedSigner, DataKey, SigningKey
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import attest, new_body, seal_envelope
from exchange.ledger.store import BlockStore
from exchange.v1 import identity_pb2, ledger_pb2

AGENCIES = ("tax", "police", "customs", "pboc")


@dataclass
class Net:
    chain_id: str
    signed_genesis: identity_pb2.SignedGenesis
    roots: dict[str, SigningKey]
    nodes: dict[str, CachedSigner]
    analysts: dict[str, CachedSigner]
    credentials: dict[str, identity_pb2.SignedCredential] = field(default_factory=dict)
    data_keys: dict[str, DataKey] = field(default_factory=dict)
    supervisors: dict[str, CachedSigner] = field(default_factory=dict)
    automations: dict[str, CachedSigner] = field(default_factory=dict)


def make_net(agencies: tuple[str, ...] = AGENCIES, chain_id: str = "test-chain",
             seed: int | None = None,
             policies: list[ledger_pb2.Policy] | None = None) -> Net:
    """A network with fresh keys; with a seed, the same network every time."""
    rng = random.Random(seed)

    def key() -> SigningKey:
        return SigningKey(rng.randbytes(32)) if seed is not None else SigningKey.generate()

    now = 1_790_000_000_000 if seed is not None else int(time.time() * 1000)
    roots = {a: key() for a in agencies}
    nodes = {a: CachedSigner(key()) for a in agencies}
    analysts = {a: CachedSigner(key()) for a in agencies}
    supervisors = {a: CachedSigner(key()) for a in agencies}
    automations = {a: CachedSigner(key()) for a in agencies}
    data_keys = {a: DataKey(key().seed) for a in agencies}
    members = [identity_pb2.Member(
        agency=a, display_name=a.upper(), root_public_key=roots[a].public_key,
        node_public_key=nodes[a].public_key, data_public_key=data_keys[a].public_key,
        tls_ca_certificate=b"", address=f"127.0.0.1:{7100 + i}") for i, a in enumerate(agencies)]
    creds = {a: issue_credential(chain_id, a, "analyst-1", analysts[a].public_key, ["analyst"],
                                 now - 3_600_000, now + 20 * 365 * 86_400_000, roots[a])
             for a in agencies}
    others = [issue_credential(chain_id, a, subject, signer.public_key, [role],
                               now - 3_600_000, now + 20 * 365 * 86_400_000, roots[a])
              for a in agencies
              for subject, signer, role in (("supervisor-1", supervisors[a], "supervisor"),
                                            ("automation", automations[a], "automation"))]
    raw = build_genesis(chain_id, now, members, credentials=[*creds.values(), *others],
                        policies=policies or ())
    return Net(chain_id, assemble_genesis(raw, chain_id, roots), roots, nodes, analysts, creds,
               data_keys, supervisors, automations)


def probe(net: Net, agency: str, payload: bytes = b"x" * 900, at_ms: int | None = None,
          signer: CachedSigner | None = None) -> bytes:
    body = new_body(net.chain_id, agency, at_ms if at_ms is not None else int(time.time() * 1000))
    body.probe.payload = payload
    return seal_envelope(body, signer or net.analysts[agency])


def write_chain(net: Net, path: Path, blocks: int, txs_per_block: int = 3,
                proposer: str = "tax", payload_size: int = 200) -> BlockStore:
    """A store with `blocks` blocks, each attested by every member."""
    store = BlockStore.create(path, net.signed_genesis)
    applier = LedgerApplier(store)
    agencies = list(net.nodes)
    for h in range(blocks):
        envs = [probe(net, agencies[(h + i) % len(agencies)],
                      f"tx {h}.{i} ".encode().ljust(payload_size, b".")[:payload_size])
                for i in range(txs_per_block)]
        block = applier.cut(envs, int(time.time() * 1000), net.nodes[proposer], proposer,
                            raft_term=1, raft_index=h + 2)
        applied = applier.apply(block)
        store.add_attestations([
            attest(net.chain_id, a, applied.checked.header.height, applied.checked.hash,
                   applied.codes, net.nodes[a]) for a in agencies])
    return store


def body_of(raw_envelope: bytes) -> ledger_pb2.TxBody:
    env = ledger_pb2.Envelope.FromString(raw_envelope)
    return ledger_pb2.TxBody.FromString(env.body)
