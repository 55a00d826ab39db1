"""`make bench`: the project's speed figures, printed as a table and as JSON lines.

Each part measures real code paths of the project on this machine; nothing is timed
inside tests. Run `python -m bench [--only NAME ...]`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from exchange.identity.genesis import assemble_genesis, build_genesis, issue_credential
from exchange.identity.keys import CachedSigner, Domain, SigningKey, verify
from exchange.ledger import merkle
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import new_body, seal_envelope
from exchange.ledger.store import BlockStore
from exchange.testing.localnet import Cluster
from exchange.v1 import identity_pb2, ledger_pb2

Result = dict[str, object]


def bench_merkle() -> list[Result]:
    leaves = [os.urandom(1024) for _ in range(10_000)]
    started = time.perf_counter()
    for _ in range(5):
        merkle.root(leaves)
    root_ms = (time.perf_counter() - started) / 5 * 1000
    hashes = [merkle.leaf_hash(leaf) for leaf in leaves]
    tree = merkle.MerkleTree(hashes)
    rootv = tree.root
    started = time.perf_counter()
    proofs = [tree.inclusion_proof(i) for i in range(len(leaves))]
    gen_s = len(leaves) / (time.perf_counter() - started)
    started = time.perf_counter()
    for i in range(len(leaves)):
        assert merkle.verify_inclusion_by_hash(hashes[i], i, len(leaves), proofs[i], rootv)
    ver_s = len(leaves) / (time.perf_counter() - started)
    return [
        {"name": "merkle root, 10,000 leaves of 1 KiB", "value": round(root_ms, 1), "unit": "ms"},
        {"name": "inclusion proofs generated (10,000-leaf tree)", "value": round(gen_s),
         "unit": "proofs/s"},
        {"name": "inclusion proofs verified (10,000-leaf tree)", "value": round(ver_s),
         "unit": "proofs/s"},
    ]


def bench_signatures(count: int = 20_000) -> list[Result]:
    signer = CachedSigner(SigningKey.generate())
    bodies = [os.urandom(1024) for _ in range(count)]
    started = time.perf_counter()
    sigs = [signer.sign(Domain.ENVELOPE, "bench", b) for b in bodies]
    sign_s = count / (time.perf_counter() - started)
    # every message distinct, so the cache of verified signatures never answers
    started = time.perf_counter()
    for body, sig in zip(bodies, sigs, strict=True):
        verify(signer.public_key, Domain.ENVELOPE, "bench", body, sig)
    verify_s = count / (time.perf_counter() - started)
    return [
        {"name": "Ed25519 sign, 1 KiB, one core", "value": round(sign_s), "unit": "signs/s"},
        {"name": "Ed25519 verify, 1 KiB, one core", "value": round(verify_s),
         "unit": "verifies/s"},
    ]


def _bench_network() -> tuple[identity_pb2.SignedGenesis, CachedSigner, CachedSigner]:
    now = int(time.time() * 1000)
    root, node, analyst = SigningKey.generate(), CachedSigner(SigningKey.generate()), \
        CachedSigner(SigningKey.generate())
    member = identity_pb2.Member(agency="tax", root_public_key=root.public_key,
                                 node_public_key=node.public_key,
                                 data_public_key=os.urandom(32), address="127.0.0.1:1")
    cred = issue_credential("bench", "tax", "analyst-1", analyst.public_key, ["analyst"],
                            now - 60_000, now + 86_400_000, root)
    genesis = assemble_genesis(build_genesis("bench", now, [member], [cred]), "bench",
                               {"tax": root})
    return genesis, node, analyst


def bench_store(blocks: int = 300, txs_per_block: int = 100) -> list[Result]:
    genesis, node, analyst = _bench_network()
    with tempfile.TemporaryDirectory() as tmp:
        store = BlockStore.create(Path(tmp) / "blocks.db", genesis)
        applier = LedgerApplier(store, "tax", node)
        envelopes = []
        for _ in range(blocks * txs_per_block):
            body = new_body("bench", "tax", int(time.time() * 1000))
            body.probe.payload = os.urandom(900)
            envelopes.append(seal_envelope(body, analyst))
        started = time.perf_counter()
        for i in range(blocks):
            store.append(applier.cut(envelopes[i * txs_per_block:(i + 1) * txs_per_block],
                                     int(time.time() * 1000), node, "tax"))
        raw_s = blocks / (time.perf_counter() - started)
        store.close()
        store = BlockStore.create(Path(tmp) / "applied.db", genesis)
        applier = LedgerApplier(store, "tax", node)
        started = time.perf_counter()
        for i in range(blocks):
            applier.apply(applier.cut(envelopes[i * txs_per_block:(i + 1) * txs_per_block],
                                      int(time.time() * 1000), node, "tax"))
        applied_s = blocks / (time.perf_counter() - started)
        store.close()
    return [
        {"name": f"block appends to the store ({txs_per_block} x 1 KiB tx, fsync each)",
         "value": round(raw_s), "unit": "blocks/s",
         "tx_per_s": round(raw_s * txs_per_block)},
        {"name": f"blocks cut, fully verified, judged, stored and attested ({txs_per_block} tx)",
         "value": round(applied_s), "unit": "blocks/s",
         "tx_per_s": round(applied_s * txs_per_block)},
    ]


def bench_wal() -> list[Result]:
    from bench.wal import bench_wal as run

    out = []
    for batch in (1, 100):
        with tempfile.TemporaryDirectory() as tmp:
            r = run(Path(tmp) / "wal", 2_000 if batch == 1 else 20_000, batch)
        out.append({"name": f"raft WAL save, batch {batch} x 1 KiB, fsync per save",
                    "value": round(r["entries_per_s"]), "unit": "entries/s",
                    "fsyncs_per_s": round(r["fsyncs_per_s"])})
    return out


def bench_cluster(duration_s: float = 10.0, levels: tuple[int, ...] = (1, 16, 64)
                  ) -> list[Result]:
    """Signed 1 KiB transactions committed by a local four-node cluster (real processes,
    every node verifying every signature, fsyncing its Raft log and block store), with
    closed-loop clients spread over the four nodes; and a plain gRPC echo, measured the
    same way, for comparison."""
    from exchange.client.loadgen import echo_baseline, run_bulk, run_load

    out: list[Result] = []
    for clients in levels:
        r = echo_baseline(clients, min(duration_s, 5.0))
        out.append({"name": f"plain gRPC echo 1 KiB, {clients} clients", "value": r.tx_per_s,
                    "unit": "calls/s", "p50_ms": r.latency_p50_ms, "p99_ms": r.latency_p99_ms})
    with tempfile.TemporaryDirectory() as tmp, Cluster(Path(tmp)) as cluster:
        profiles = [cluster.profile(a) for a in cluster.agencies]
        run_load(profiles, 4, 2.0)  # warm up connections and caches
        for clients in levels:
            before = _node_cpu_s(cluster)
            r = run_load(profiles, clients, duration_s)
            used = _node_cpu_s(cluster) - before
            out.append({"name": f"4-node cluster, signed 1 KiB tx, {clients} clients",
                        "value": r.tx_per_s, "unit": "tx/s", "p50_ms": r.latency_p50_ms,
                        "p99_ms": r.latency_p99_ms, "max_ms": r.latency_max_ms,
                        "errors": r.errors,
                        "node_cpu_ms_per_tx": round(used / max(1, r.committed) * 1000, 2)})
        r = run_bulk(profiles, 500, duration_s)
        out.append({"name": "4-node cluster, bulk SubmitBatch of 500 signed 1 KiB tx, "
                            "one caller per node", "value": r.tx_per_s, "unit": "tx/s",
                    "batch_p50_ms": r.latency_p50_ms, "batch_p99_ms": r.latency_p99_ms,
                    "errors": r.errors})
    out.extend(_etcd_side_by_side(out, duration_s, levels))
    return out


def _etcd_side_by_side(ours: list[Result], duration_s: float, levels: tuple[int, ...]
                       ) -> list[Result]:
    """A four-member etcd 3.4 on loopback measured right after the project's run with the
    same closed-loop client counts (bench.etcd), and the ratio of the project's tx/s to
    etcd's writes/s at each count; one line and nothing else where etcd is missing."""
    from bench import etcd

    if etcd.etcd_binary() is None:
        print("cluster part: etcd not installed (Debian package etcd-server), so no "
              "etcd figures to compare with", flush=True)
        return []
    tx_per_s = {int(str(r["name"]).split(", ")[-1].split()[0]): float(str(r["value"]))
                for r in ours if str(r["name"]).startswith("4-node cluster, signed")}
    out: list[Result] = []
    for r, cpu_s in etcd.measure(levels, duration_s):
        out.append({"name": f"etcd 3.4, 4 members, Put 1 KiB, {r.clients} clients",
                    "value": r.tx_per_s, "unit": "writes/s", "p50_ms": r.latency_p50_ms,
                    "p99_ms": r.latency_p99_ms, "max_ms": r.latency_max_ms,
                    "errors": r.errors,
                    "etcd_cpu_ms_per_write": round(cpu_s / max(1, r.committed) * 1000, 3),
                    "ratio_ours_to_etcd": round(tx_per_s.get(r.clients, 0.0)
                                                / max(r.tx_per_s, 0.1), 3)})
    return out


CROSSQUERY_COMPANIES = 20_000
CROSSQUERY_SECONDS = 15.0


def bench_crossquery() -> list[Result]:
    """End-to-end cross-queries on a local cluster holding generated data: from building
    a signed query to holding its decrypted, commitment-checked rows at the requester."""
    import csv

    import agents
    from agents.generate import GeneratorConfig, generate
    from exchange.client.loadgen import QueryPlan, run_crossqueries

    out: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-xq-") as tmp:
        cluster = Cluster(Path(tmp))
        try:
            cluster.init()
            data = Path(tmp) / "data"
            generate(GeneratorConfig(seed=5, companies=CROSSQUERY_COMPANIES), data)
            for agency in cluster.agencies:
                with agents.open_store(agency, cluster.net / agency / "data" /
                                       "agency.db") as store:
                    agents.load_dataset_dir(agency, data / agency, store)
            cluster.start()
            _lift_rate_limits(cluster)

            def column(agency: str, dataset: str, name: str, where: str = "") -> list[str]:
                with open(data / agency / f"{dataset}.csv", encoding="utf-8") as f:
                    rows = list(csv.DictReader(f))
                return sorted({r[name] for r in rows
                               if not where or r.get("holder_kind") == where})[:2000]

            asked = {
                "tax": ("taxpayers", "uscc", column("tax", "taxpayers", "uscc")),
                "customs": ("declarations", "uscc", column("customs", "declarations", "uscc")),
                "pboc": ("accounts", "uscc", column("pboc", "accounts", "holder_id",
                                                   "company")),
                "police": ("records", "person_id", column("police", "records", "person_id")),
            }
            plans = [QueryPlan(str(cluster.profile(a)),
                               str(cluster.net / a / "analysts" / "supervisor-1.toml"),
                               [(t, *asked[t]) for t in cluster.agencies if t != a])
                     for a in cluster.agencies]
            for clients in (1, 16):
                r = run_crossqueries(plans, clients, CROSSQUERY_SECONDS)
                out.append({"name": f"cross-query, submit to decrypted rows, {clients} "
                                    f"analysts ({CROSSQUERY_COMPANIES:,} companies)",
                            "value": r.latency_p50_ms, "unit": "ms p50",
                            "p99_ms": r.latency_p99_ms, "max_ms": r.latency_max_ms,
                            "queries_per_s": r.tx_per_s, "errors": r.errors,
                            "error_samples": r.error_samples})
            out.append(_bulk_answers(cluster))
        finally:
            cluster.stop()
    return out


def _lift_rate_limits(cluster: Cluster) -> None:
    """The owners raise their per-analyst hourly limits for the benchmark's analysts, as
    an owner would with `exchange policy propose` (signed by its supervisor)."""
    from exchange.client import ExchangeClient, Signer, chain_id_for, load_client_profile

    for owner in cluster.agencies:
        sup = cluster.net / owner / "analysts" / "supervisor-1.toml"
        with ExchangeClient(load_client_profile(sup)) as client:
            signer = Signer.load(client.profile, chain_id_for(sup, client))
            for policy in client.list_policies(owner).policies:
                policy.version += 1
                for grant in policy.grants:
                    grant.rate_per_hour = 0
                def fill(body: ledger_pb2.TxBody, p: ledger_pb2.Policy = policy) -> None:
                    body.policy.CopyFrom(p)

                envelope = signer.make_envelope(fill)
                result = client.submit(envelope)
                assert result.result == "OK", result


def _bulk_answers(cluster: Cluster) -> Result:
    """Period-wide views asked by an automation, one at a time: rows per second from
    submission to decrypted, checked rows."""
    from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
    from exchange.client.crossquery import QuerySpec, build_query, read_answer

    profile_path = cluster.net / "tax" / "analysts" / "automation.toml"
    _, _, genesis = load_genesis(profile_path)
    rows = chunks = 0
    started = time.perf_counter()
    with ExchangeClient(load_client_profile(profile_path), deadline_s=60) as client:
        signer = Signer.load(client.profile, genesis.chain_id)
        for target, view in (("pboc", "company_flows"), ("customs", "company_trade")):
            for period in ("2026-07", "2026-08", "2026-09"):
                envelope, qid = build_query(QuerySpec(target, view, period=period,
                                                      purpose="benchmark"), signer, genesis)
                assert client.submit(envelope).result == "OK"
                answer = read_answer(client.get_answer(qid, wait_ms=60_000))
                assert answer.status == "answered", answer.query
                rows += len(answer.rows)
                chunks += answer.query.chunk_count
    elapsed = time.perf_counter() - started
    return {"name": "bulk answers: period-wide views (company_flows, company_trade), "
                    "6 queries", "value": round(rows / elapsed), "unit": "rows/s",
            "rows": rows, "chunks": chunks, "seconds": round(elapsed, 1)}


SWEEP_COMPANIES = 100_000


def bench_sweep(companies: int = SWEEP_COMPANIES, work_dir: Path | None = None
                ) -> list[Result]:
    """The five reference rules for one period on a local cluster holding the
    generator's data for `companies` companies (bench.sweep)."""
    from bench.sweep import results

    return results(companies, work_dir)


def _node_cpu_s(cluster: Cluster) -> float:
    """CPU seconds (user + system) used so far by the cluster's node processes."""
    total = 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    for proc in cluster.procs.values():
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def bench_sim(seeds: int = 200) -> list[Result]:
    """Seeds per second of the deterministic Raft simulation."""
    import subprocess
    import sys

    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tests.sim", "--seeds", str(seeds)],
                          capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"simulation failed: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return [{"name": f"Raft simulation, {seeds} seeds (5 nodes, faults, checks every step)",
             "value": round(seeds / elapsed, 1), "unit": "seeds/s"}]


def bench_failover(runs: int = 20) -> list[Result]:
    """Time from cutting the leader off (nftables, each node in its own network
    namespace) to the first commit under a new leader; needs root, iproute2, nftables."""
    from bench.failover import measure
    from tests.support.netns import missing_requirement

    missing = missing_requirement()
    if missing:
        print(f"failover part skipped: {missing}", flush=True)
        return []
    r = measure(runs, verbose=False)
    extra = {"runs": r["runs"], "min_ms": r["failover_min_ms"]}
    return [
        {"name": f"failover on the namespace network, median of {runs} leader cut-offs",
         "value": r["failover_median_ms"], "unit": "ms", **extra},
        {"name": f"failover on the namespace network, max of {runs} leader cut-offs",
         "value": r["failover_max_ms"], "unit": "ms", **extra},
    ]


def bench_playbooks() -> list[Result]:
    """The reference playbooks after a sweep yielding about 100 findings: time from a
    finding's commit to its last follow-up answer's commit (bench.playbooks)."""
    from bench.playbooks import measure

    r = measure(verbose=False)
    extra = {k: v for k, v in r.items() if not k.startswith("finding_to_last_answer_p")}
    return [
        {"name": f"playbooks: finding commit to last follow-up answer, p50 ({r['findings']} "
                 f"findings, {r['follow_ups']} follow-ups)",
         "value": r["finding_to_last_answer_p50_s"], "unit": "s", **extra},
        {"name": "playbooks: finding commit to last follow-up answer, p99",
         "value": r["finding_to_last_answer_p99_s"], "unit": "s"},
    ]


PARTS: dict[str, Callable[[], list[Result]]] = {
    "merkle": bench_merkle,
    "signatures": bench_signatures,
    "store": bench_store,
    "wal": bench_wal,
    "sim": bench_sim,
    "cluster": bench_cluster,
    "crossquery": bench_crossquery,
    "sweep": bench_sweep,
    "failover": bench_failover,
    "playbooks": bench_playbooks,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", nargs="*", choices=sorted(PARTS))
    parser.add_argument("--json", action="store_true", help="JSON lines only")
    parser.add_argument("--companies", type=int, default=SWEEP_COMPANIES,
                        help="companies the sweep part generates (default 100,000)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the sweep keeps its cluster and data (default $TMPDIR)")
    args = parser.parse_args()
    parts = {**PARTS, "sweep": lambda: bench_sweep(args.companies, args.work_dir)}
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"exchange benchmarks ({os.cpu_count()} cores)", title_justify="left")
    for col in ("part", "figure", "value", "unit", "extra"):
        table.add_column(col)
    for part, fn in parts.items():
        if args.only and part not in args.only:
            continue
        for result in fn():
            result = {"part": part, **result}
            print(json.dumps(result), flush=True)
            extra = {k: v for k, v in result.items()
                     if k not in ("part", "name", "value", "unit")}
            table.add_row(part, str(result["name"]), f"{result['value']:,}",
                          str(result["unit"]), json.dumps(extra) if extra else "")
    if not args.json:
        Console(width=150).print(table)


if __name__ == "__main__":
    main()
