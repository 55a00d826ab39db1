"""Playbooks on the local cluster: the time from a finding's commit to the commit of the
last answer to its follow-up queries, over a sweep that yields about 100 findings,
printed (never asserted).

A four-node cluster holds the generator's data (5,000 companies, three months: about 100
findings of the five reference rules). Each owner's supervisor registers its rules and
reference playbooks; then each agency's runner (`exchange jobs serve --rounds 1`, the
four side by side as on four machines) runs its rules for the three months and then its
playbooks. The times are the ledger's: the findings' blocks, and the blocks of the
follow-ups' answers or refusals (all block timestamps of the leader's clock).

    .venv/bin/python -m bench.playbooks [--companies 5000] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

COMPANIES_DEFAULT = 5_000
SEED = 5
PERIODS = ("2026-07", "2026-08", "2026-09")
RUN_TIMEOUT_S = 1_800


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def measure(companies: int = COMPANIES_DEFAULT, verbose: bool = True) -> dict[str, object]:
    from exchange.cases.playbooks import load_playbooks
    from exchange.compare.rule_file import load_rules
    from exchange.ledger.playbooks import parse_step_ref
    from exchange.ledger.store import BlockStore
    from exchange.testing.localnet import Cluster
    from exchange.v1 import node_pb2

    def say(text: str) -> None:
        if verbose:
            print(text, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-playbooks-") as tmp:
        root = Path(tmp)
        cluster = Cluster(root)
        try:
            cluster.init()
            cluster.load_sample(SEED, companies)
            cluster.start()
            for agency in cluster.agencies:
                supervisor = str(cluster.net / agency / "analysts" / "supervisor-1.toml")
                for item, kind in ([(r.id, "rules") for r in load_rules(agency)]
                                   + [(p.id, "playbooks") for p in load_playbooks(agency)]):
                    result = cluster.run_exchange(kind, "register", item, "--profile",
                                                  supervisor)
                    if result.returncode != 0:
                        raise RuntimeError(result.stderr)
            say(f"registered; running the four agencies' jobs ({companies:,} companies, "
                f"{len(PERIODS)} months)")
            procs = []
            started = time.perf_counter()
            for agency in cluster.agencies:
                config = root / f"jobs-{agency}.toml"
                config.write_text(
                    f'profile = "{cluster.net / agency / "analysts" / "automation.toml"}"\n'
                    f"periods = {json.dumps(list(PERIODS))}\n"
                    f'state_file = "{root / f"jobs-{agency}.json"}"\n'
                    "follow_ups_per_finding_max = 8\nfollow_ups_per_hour_per_agency = 1000\n")
                log = open(root / f"jobs-{agency}.log", "wb")  # noqa: SIM115
                procs.append((agency, subprocess.Popen(
                    [sys.executable, "-m", "exchange.cli.main", "jobs", "serve", "--config",
                     str(config), "--rounds", "1"], stdout=log, stderr=subprocess.STDOUT,
                    cwd=root, env=cluster.env), log))
            for agency, proc, log in procs:
                try:
                    code = proc.wait(RUN_TIMEOUT_S)
                finally:
                    log.close()
                if code != 0:
                    raise RuntimeError(f"jobs serve of {agency} exited {code}: "
                                       + (root / f"jobs-{agency}.log").read_text()[-2000:])
            wall_s = time.perf_counter() - started
            with cluster.client("tax", deadline_s=60.0) as client:
                runs = client.list_findings(node_pb2.ListFindingsRequest()).runs
                trail = client.audit(node_pb2.AuditRequest(limit=100_000))
                steps = client.list_playbooks("", with_steps=True).steps
            queries = {bytes(e.query.tx_id): e.query for e in trail.entries
                       if e.kind == "query"}
            committed = {(bytes(r.tx_id), f.finding_id): r.time_ms
                         for r in runs if not r.case_id for f in r.findings}
            last_answer: dict[tuple[bytes, str], int] = defaultdict(int)
            case_step: dict[tuple[bytes, str], int] = {}
            follow_ups = refused = 0
            with BlockStore.open(cluster.net / "tax" / "data" / "blocks.db") as store:
                for step in steps:
                    ref = parse_step_ref(step.ref)
                    if ref is None:
                        continue
                    key = (ref.run_tx_id, ref.finding_id)
                    if step.kind == "case":
                        case_step[key] = store.index_columns(step.height)[1]
                    elif step.kind == "query":
                        q = queries[bytes(step.tx_id)]
                        follow_ups += 1
                        refused += q.status == "refused"
                        last_answer[key] = max(last_answer[key], q.outcome_time_ms)
        finally:
            cluster.stop()
    latencies = [(last_answer[k] - t) / 1000 for k, t in committed.items()
                 if last_answer.get(k)]
    working = [(last_answer[k] - case_step[k]) / 1000 for k in committed
               if last_answer.get(k) and k in case_step]
    if not latencies:
        raise RuntimeError("no finding got a follow-up answer")
    return {
        "companies": companies, "findings": len(committed),
        "findings_with_follow_ups": len(latencies), "follow_ups": follow_ups,
        "refused": refused, "sweep_wall_s": round(wall_s, 1),
        "finding_to_last_answer_p50_s": round(statistics.median(latencies), 2),
        "finding_to_last_answer_p99_s": round(_percentile(latencies, 0.99), 2),
        "finding_to_last_answer_max_s": round(max(latencies), 2),
        "case_open_to_last_answer_p50_s": round(statistics.median(working), 2),
        "case_open_to_last_answer_p99_s": round(_percentile(working, 0.99), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--companies", type=int, default=COMPANIES_DEFAULT)
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args()
    result = measure(args.companies, verbose=not args.json)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:36} {value}")


if __name__ == "__main__":
    main()
