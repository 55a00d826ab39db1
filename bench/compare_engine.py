"""How long the reference rules take on generated data: per rule, gathering its inputs
from local stores (own reads and the targets' lookups, the network skipped), then the
engine's part: loading the inputs into DuckDB, the SQL, and the canonical output.

    python -m bench.compare_engine --companies 100000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import agents
from agents.generate import GeneratorConfig, generate
from exchange.compare import duck
from exchange.compare.engine import run_rule
from exchange.compare.local import gather_inputs
from exchange.compare.rule_file import load_rules


@dataclass(frozen=True)
class RuleTiming:
    rule_id: str
    period: str
    rows_in: int
    rows_out: int
    gather_s: float  # own reads + lookups on the SQLite stores (not the engine)
    load_s: float  # inputs into typed DuckDB tables, canonical order
    sql_s: float
    canonical_s: float
    engine_s: float  # run_rule end to end (load + SQL + canonical + checks)


@dataclass(frozen=True)
class BenchReport:
    companies: int
    seed: int
    loader: str
    duckdb_version: str
    generate_s: float
    store_load_s: float
    rules: tuple[RuleTiming, ...]


def bench_rules(companies: int = 100_000, seed: int = 1, loader: str = "auto",
                work_dir: Path | None = None) -> BenchReport:
    """Generate `companies` companies' data, load the four stores, and time each reference
    rule on the last month (the officer rule once)."""
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        config = GeneratorConfig(seed=seed, companies=companies)
        generate(config, root / "data")
        generated = time.perf_counter()
        stores: dict[str, agents.AgencyStore] = {}
        try:
            for agency in agents.AGENCIES:
                store: agents.AgencyStore = agents.open_store(agency, root / f"{agency}.db")
                agents.load_dataset_dir(agency, root / "data" / agency, store)
                stores[agency] = store
            loaded = time.perf_counter()
            timings = []
            for agency in agents.AGENCIES:
                for rule in load_rules(agency):
                    params = {"period": config.periods[-1]} if rule.period_bound else {}
                    t0 = time.perf_counter()
                    inputs = gather_inputs(rule.plan(params), stores)
                    t1 = time.perf_counter()
                    parts: dict[str, float] = {}
                    output = run_rule(rule, inputs, params, loader=loader, timings=parts)
                    t2 = time.perf_counter()
                    timings.append(RuleTiming(
                        rule_id=rule.id, period=output.period,
                        rows_in=sum(len(rows) for rows in inputs.values()),
                        rows_out=len(output.rows), gather_s=round(t1 - t0, 3),
                        load_s=round(parts["load_s"], 3), sql_s=round(parts["sql_s"], 3),
                        canonical_s=round(parts["canonical_s"], 3),
                        engine_s=round(t2 - t1, 3)))
        finally:
            for store in stores.values():
                store.close()
    used = loader if loader != "auto" else ("arrow" if duck.pyarrow_available() else "lists")
    return BenchReport(companies=companies, seed=seed, loader=used,
                       duckdb_version=duck.DUCKDB_VERSION,
                       generate_s=round(generated - started, 1),
                       store_load_s=round(loaded - generated, 1), rules=tuple(timings))


def format_report(report: BenchReport) -> str:
    lines = [f"{report.companies} companies, seed {report.seed}, DuckDB "
             f"{report.duckdb_version}, input loader {report.loader} "
             f"(generate {report.generate_s} s, load stores {report.store_load_s} s)",
             f"{'rule':32} {'period':8} {'rows in':>9} {'out':>5} {'gather s':>9} "
             f"{'load s':>7} {'sql s':>6} {'canon s':>7} {'engine s':>8}"]
    for t in report.rules:
        lines.append(f"{t.rule_id:32} {t.period or '-':8} {t.rows_in:>9} {t.rows_out:>5} "
                     f"{t.gather_s:>9.3f} {t.load_s:>7.3f} {t.sql_s:>6.3f} "
                     f"{t.canonical_s:>7.3f} {t.engine_s:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--companies", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loader", choices=("auto", "arrow", "lists"), default="auto")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    report = bench_rules(args.companies, args.seed, args.loader)
    print(json.dumps(asdict(report), indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
