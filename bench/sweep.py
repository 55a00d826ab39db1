"""The city-scale sweep (`make bench`, part `sweep`): the generator's data for N companies
loaded into a local four-node cluster, every reference rule (the eight of
DATA_CONTRACT.md) registered by its owner and run for one period by its owner's automation, each owner in parallel, every input asked
and answered over the network (DESIGN.md decision 13).

Prints what the operator would want to know before trusting it with the city's
register: generate time, load speed per agency (MB/s), the sweep's wall time and each
rule's, rows moved between agencies, findings against the generator's ground truth
(they must be equal), each node's peak memory, the growth of each node's data
directory, and the time a node takes to restart after the sweep.

    python -m bench.sweep --companies 1000000 [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from exchange.testing.localnet import Cluster

PERIOD = "2026-09"
SEED = 9
LOAD_PROCESSES = 2  # the machine's cores
RULE_RUNS_CONCURRENT_MAX = 2  # an owner's rules at once (the jobs runner's default)
# The jobs config's [rule_limits] for a city-scale register: a month of the city's
# invoices is about 9 million rows, over the default 1,024 MiB of DuckDB memory once
# loaded, and a rule's SQL over it runs longer than the default 60 s on this machine.
RULE_MEMORY_MIB = 4096
RULE_TIME_S = 1800.0


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _load_agency(args: tuple[str, str, str]) -> tuple[str, float]:
    import agents

    agency, db, folder = args
    started = time.perf_counter()
    with agents.open_store(agency, Path(db)) as store:
        agents.load_dataset_dir(agency, Path(folder), store)
    return agency, time.perf_counter() - started


def _peak_rss_mib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return 0


def _register_rules(cluster: Cluster) -> list[tuple[Path, Any]]:
    from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
    from exchange.compare.rule_file import load_rules
    from exchange.v1 import ledger_pb2

    runs = []
    for agency in cluster.agencies:
        sup = cluster.net / agency / "analysts" / "supervisor-1.toml"
        auto = cluster.net / agency / "analysts" / "automation.toml"
        _, _, genesis = load_genesis(sup)
        with ExchangeClient(load_client_profile(sup)) as client:
            signer = Signer.load(client.profile, genesis.chain_id)
            for rule in load_rules(agency):
                registration = ledger_pb2.RuleRegistration(
                    rule_id=rule.id, version=rule.version, digest=rule.digest,
                    canonical=rule.canonical_bytes)

                def fill(body: ledger_pb2.TxBody,
                         r: ledger_pb2.RuleRegistration = registration) -> None:
                    body.rule_registration.CopyFrom(r)

                result = client.submit(signer.make_envelope(fill))
                assert result.result == "OK", result
                runs.append((auto, rule))
    return runs


def _shared_inputs(auto: Path, rules: list[Any]) -> tuple[list[dict[str, bytes]], float]:
    """The owner's own inputs several of its rules read alike, committed once (as the
    jobs runner does), and the seconds that took."""
    from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
    from exchange.compare.network import QUERY_DEADLINE_S
    from exchange.compare.own_inputs import SharedOwnInputs, planned_run

    started = time.perf_counter()
    _, _, genesis = load_genesis(auto)
    with ExchangeClient(load_client_profile(auto), deadline_s=300) as client:
        signer = Signer.load(client.profile, genesis.chain_id)
        shared = SharedOwnInputs(client, signer, genesis, QUERY_DEADLINE_S).commit(
            [planned_run(rule, _params(rule)) for rule in rules])
    return shared, time.perf_counter() - started


def _params(rule: Any) -> dict[str, str]:
    return {"period": PERIOD} if rule.period_bound else {}


def _run_rule(auto: Path, rule: Any, spool: Path,
              own_inputs: dict[str, bytes] | None = None) -> dict[str, Any]:
    from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
    from exchange.compare.duck import RuleLimits
    from exchange.compare.network import NetworkRun, RunBounds

    _, _, genesis = load_genesis(auto)
    with ExchangeClient(load_client_profile(auto), deadline_s=300) as client:
        signer = Signer.load(client.profile, genesis.chain_id)
        r = NetworkRun(client, signer, genesis, rule, bounds=RunBounds(spool_dir=spool),
                       limits=RuleLimits(time_s=RULE_TIME_S, memory_mib=RULE_MEMORY_MIB)
                       ).run(_params(rule), own_inputs=own_inputs)
    return {"rule": r.rule_id, "period": r.period, "result": r.result,
            "seconds": round(r.seconds, 1), "rows_in": r.rows_in,
            "shared_own_inputs": len(own_inputs or {}),
            "rows_moved": r.rows_in - r.own_rows, "queries": len(r.input_tx_ids),
            "answer_chunks": r.answer_chunks, "findings": len(r.output.rows),
            "findings_chunks": r.findings_chunks,
            "subjects": [str(row["subject"]) for row in r.output.rows]}


def measure(companies: int, work_dir: Path | None = None, verbose: bool = True,
            data_dir: Path | None = None,
            rule_runs_concurrent_max: int = RULE_RUNS_CONCURRENT_MAX,
            share_own_inputs: bool = True) -> dict[str, Any]:
    """The figures above; `data_dir`: a folder the generator already wrote for
    `companies` companies and seed SEED (generation is then not timed). Each owner runs
    up to `rule_runs_concurrent_max` of its rules at once and, with `share_own_inputs`,
    commits an own input several of its rules read alike once (as the jobs runner)."""
    from agents.generate import GeneratorConfig, generate

    def say(text: str) -> None:
        if verbose:
            print(f"[sweep {companies:,}] {text}", flush=True)

    out: dict[str, Any] = {"companies": companies, "period": PERIOD,
                           "rule_runs_concurrent_max": rule_runs_concurrent_max,
                           "share_own_inputs": share_own_inputs}
    if work_dir is not None:
        Path(work_dir).mkdir(parents=True, exist_ok=True)  # `--work-dir var/bench` as given
    with tempfile.TemporaryDirectory(prefix="bench-sweep-", dir=work_dir) as tmp:
        root = Path(tmp).resolve()  # the nodes and the CLI run with the cluster as cwd
        cluster = Cluster(root)
        try:
            cluster.init()
            data = data_dir.resolve() if data_dir is not None else root / "data"
            if data_dir is None:
                started = time.perf_counter()
                generate(GeneratorConfig(seed=SEED, companies=companies), data)
                out["generate_s"] = round(time.perf_counter() - started, 1)
            sizes = {a: _dir_bytes(data / a) for a in cluster.agencies}
            out["csv_mb"] = {a: round(b / 1e6) for a, b in sizes.items()}
            say(f"generated in {out.get('generate_s', '(given)')} s: {out['csv_mb']} MB")
            started = time.perf_counter()
            with cf.ProcessPoolExecutor(LOAD_PROCESSES,
                                        mp_context=mp.get_context("spawn")) as pool:
                loaded = dict(pool.map(_load_agency, [
                    (a, str(cluster.net / a / "data" / "agency.db"), str(data / a))
                    for a in cluster.agencies]))
            out["load_s"] = round(time.perf_counter() - started, 1)
            out["load_mb_s_per_agency"] = {a: round(sizes[a] / 1e6 / s, 1)
                                           for a, s in loaded.items()}
            say(f"loaded in {out['load_s']} s: {out['load_mb_s_per_agency']} MB/s")
            before = {a: _dir_bytes(cluster.net / a / "data") for a in cluster.agencies}
            cluster.start()
            runs = _register_rules(cluster)
            by_owner: dict[str, list[tuple[Path, Any]]] = {}
            for auto, rule in runs:
                by_owner.setdefault(rule.owner, []).append((auto, rule))
            spool = root / "spool"
            spool.mkdir()

            def owner_runs(items: list[tuple[Path, Any]]) -> list[dict[str, Any]]:
                shared: list[dict[str, bytes]] = [{} for _ in items]
                if share_own_inputs:
                    shared, seconds = _shared_inputs(items[0][0], [r for _, r in items])
                    if any(shared):
                        say(f"{items[0][1].owner}: shared own inputs committed in "
                            f"{seconds:.1f} s")

                def one(item: tuple[tuple[Path, Any], dict[str, bytes]]) -> dict[str, Any]:
                    (auto, rule), own = item
                    started = time.perf_counter()
                    try:
                        done = _run_rule(auto, rule, spool, own)
                    except Exception as exc:  # the other rules' figures still count
                        seconds = round(time.perf_counter() - started, 1)
                        say(f"{rule.id}: FAILED after {seconds} s: {exc}")
                        return {"rule": rule.id, "failed": str(exc), "subjects": [],
                                "seconds": seconds, "rows_moved": 0, "findings": 0}
                    say(f"{rule.id}: {done['seconds']} s, {done['rows_moved']:,} rows "
                        f"moved, {done['findings']} findings")
                    return done

                with cf.ThreadPoolExecutor(rule_runs_concurrent_max) as runs_pool:
                    return list(runs_pool.map(one, zip(items, shared, strict=True)))

            started = time.perf_counter()
            with cf.ThreadPoolExecutor(len(by_owner)) as threads:
                results = [r for batch in threads.map(owner_runs, by_owner.values())
                           for r in batch]
            out["sweep_s"] = round(time.perf_counter() - started, 1)
            out["node_peak_rss_mib"] = {a: _peak_rss_mib(p.pid)
                                        for a, p in cluster.procs.items()}
            out["runner_peak_rss_mib"] = round(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            out["data_dir_growth_mb"] = {
                a: round((_dir_bytes(cluster.net / a / "data") - before[a]) / 1e6)
                for a in cluster.agencies}
            with open(data / "ground_truth.csv", encoding="utf-8") as f:
                truth = {(r["rule_id"], r["subject"]) for r in csv.DictReader(f)
                         if r["period"] in (PERIOD, "")}
            found = {(r["rule"], s) for r in results for s in r["subjects"]}
            out["findings"] = len(found)
            out["ground_truth"] = len(truth)
            out["findings_equal_ground_truth"] = found == truth
            for r in results:  # each rule on its own: its findings against its truth
                r["ground_truth"] = sum(1 for rule, _s in truth if rule == r["rule"])
                r["equal_ground_truth"] = {s for rule, s in found if rule == r["rule"]} == {
                    s for rule, s in truth if rule == r["rule"]}
            out["rules"] = [{k: v for k, v in r.items() if k != "subjects"} for r in results]
            out["rows_moved_between_agencies"] = sum(r["rows_moved"] for r in results)
            say(f"sweep {out['sweep_s']} s; findings equal ground truth: "
                f"{out['findings_equal_ground_truth']}")
            started = time.perf_counter()
            cluster.restart("tax")
            cluster.wait_ready(timeout_s=3600)
            out["restart_tax_s"] = round(time.perf_counter() - started, 1)
            say(f"tax restarted in {out['restart_tax_s']} s")
        finally:
            cluster.stop()
            shutil.rmtree(root / "spool", ignore_errors=True)
    return out


def results(companies: int, work_dir: Path | None = None) -> list[dict[str, Any]]:
    """The figures as `make bench` rows."""
    r = measure(companies, work_dir)
    extra = {k: v for k, v in r.items() if k != "sweep_s"}
    rows = [{"name": f"rule sweep: all {len(r['rules'])} reference rules, one period, "
                     f"{companies:,} companies, owners in parallel, every input over the "
                     "network",
             "value": r["sweep_s"], "unit": "s", **extra}]
    # each rule's own run time, at every size the sweep measures
    rows += [{"name": f"rule sweep: {rule['rule']} ({companies:,} companies)",
              "value": rule["seconds"], "unit": "s",
              **{k: v for k, v in rule.items() if k not in ("rule", "seconds")}}
             for rule in r["rules"]]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--companies", type=int, default=100_000)
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the cluster, data and spool go (default: $TMPDIR)")
    parser.add_argument("--data", type=Path, default=None,
                        help="a folder `exchange data generate --seed 9 --companies N` "
                             "wrote, instead of generating anew")
    parser.add_argument("--rule-runs-concurrent-max", type=int,
                        default=RULE_RUNS_CONCURRENT_MAX,
                        help="an owner's rules run at once (1: one after another)")
    parser.add_argument("--no-share-own-inputs", action="store_true",
                        help="each run commits its own inputs itself (as before issue 19's "
                             "scaling)")
    args = parser.parse_args()
    if args.rule_runs_concurrent_max < 1:
        parser.error("--rule-runs-concurrent-max is at least 1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(json.dumps(measure(args.companies, args.work_dir, data_dir=args.data,
                             rule_runs_concurrent_max=args.rule_runs_concurrent_max,
                             share_own_inputs=not args.no_share_own_inputs)),
          flush=True)


if __name__ == "__main__":
    main()
