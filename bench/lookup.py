"""Micro benchmark of agents.lookup on generated sample data (not run by the tests).

    python -m bench.lookup [--companies 20000] [--lookups 2000] [--dir DIR]

Generates the four agencies' data (or reuses DIR/data), loads it into SQLite stores,
then prints per-dataset and per-view subject-lookup latency (p50, p99, ms) and aggregate
throughput (rows/s) of subject sets and of period-wide views.
"""

from __future__ import annotations

import argparse
import csv
import random
import tempfile
import time
from pathlib import Path

import agents
from agents.generate import GeneratorConfig, generate
from agents.lookup import LookupRequest, lookup

ROW_LIMIT = 1_000_000
SUBJECT_SET_SIZE = 500
# (agency, dataset, subject key, CSV column the subject values come from)
SUBJECT_CASES = (
    ("tax", "taxpayers", "uscc", "uscc"),
    ("tax", "vat_invoices", "uscc", "issuer_uscc"),
    ("tax", "vat_invoices", "invoice_no", "invoice_no"),
    ("tax", "revenue_declarations", "uscc", "uscc"),
    ("tax", "export_rebates", "uscc", "uscc"),
    ("customs", "declarations", "uscc", "uscc"),
    ("pboc", "accounts", "holder_id", "holder_id"),
    ("pboc", "transactions", "txn_id", "txn_id"),
    ("police", "records", "person_id", "person_id"),
)
# (agency, view, subject key, period-bound, tax CSV column the subject values come from)
VIEW_CASES = (
    ("pboc", "company_flows", "uscc", True, "uscc"),
    ("customs", "company_trade", "uscc", True, "uscc"),
    ("tax", "active_legal_reps", "uscc", False, "uscc"),
    ("tax", "active_legal_reps", "person_id", False, "legal_rep_id"),
)


def _column_values(path: Path, column: str, n_max: int, rng: random.Random) -> list[str]:
    with path.open(encoding="utf-8", newline="") as f:
        values = sorted({row[column] for row in csv.DictReader(f)})
    return rng.sample(values, min(n_max, len(values)))


def _percentile_ms(seconds: list[float], q: float) -> float:
    ordered = sorted(seconds)
    return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--companies", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lookups", type=int, default=2_000,
                        help="single-subject lookups per dataset")
    parser.add_argument("--view-lookups", type=int, default=200,
                        help="single-subject lookups per catalog view")
    parser.add_argument("--dir", type=Path, default=None,
                        help="keep data and stores here (reused if present)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="lookup-bench-"))
    data = work / "data"
    if not data.exists():
        started = time.perf_counter()
        generate(GeneratorConfig(seed=args.seed, companies=args.companies), data)
        print(f"generated {args.companies} companies in {time.perf_counter() - started:.1f} s")
    config = GeneratorConfig(seed=args.seed, companies=args.companies)
    stores = {}
    for agency in agents.AGENCIES:
        db = work / f"{agency}.db"
        fresh = not db.exists()
        stores[agency] = agents.open_store(agency, db)
        if fresh:
            started = time.perf_counter()
            agents.load_dataset_dir(agency, data / agency, stores[agency])
            print(f"loaded {agency} in {time.perf_counter() - started:.1f} s")
    rng = random.Random(args.seed)
    try:
        print(f"{'dataset by key':34} {'p50 ms':>8} {'p99 ms':>8} {'rows/lookup':>12}")
        for agency, dataset, key, column in SUBJECT_CASES:
            values = _column_values(data / agency / f"{dataset}.csv", column, args.lookups,
                                    rng)
            store = stores[agency]
            timings = []
            rows = 0
            for value in values:
                started = time.perf_counter()
                rows += len(lookup(store, LookupRequest(dataset, ((key, value),)),
                                   ROW_LIMIT))
                timings.append(time.perf_counter() - started)
            print(f"{dataset + ' by ' + key:34} {_percentile_ms(timings, 0.5):8.3f} "
                  f"{_percentile_ms(timings, 0.99):8.3f} {rows / len(values):12.1f}")
        period = config.periods[-1]
        for agency, view, key, period_bound, column in VIEW_CASES:
            values = _column_values(data / "tax" / "taxpayers.csv", column,
                                    args.view_lookups, rng)
            store = stores[agency]
            timings = []
            rows = 0
            for value in values:
                request = LookupRequest(view, ((key, value),),
                                        period if period_bound else None)
                started = time.perf_counter()
                rows += len(lookup(store, request, ROW_LIMIT))
                timings.append(time.perf_counter() - started)
            print(f"{view + ' by ' + key:34} {_percentile_ms(timings, 0.5):8.3f} "
                  f"{_percentile_ms(timings, 0.99):8.3f} {rows / len(values):12.1f}")
        print(f"{'aggregate':34} {'rows':>8} {'seconds':>8} {'rows/s':>12}")
        usccs = _column_values(data / "tax" / "taxpayers.csv", "uscc", 10 * SUBJECT_SET_SIZE,
                               rng)
        for agency, dataset, set_period in (("tax", "vat_invoices", None),
                                            ("customs", "declarations", None),
                                            ("pboc", "company_flows", period),
                                            ("tax", "active_legal_reps", None)):
            started = time.perf_counter()
            rows = 0
            for first in range(0, len(usccs), SUBJECT_SET_SIZE):
                subjects = tuple(("uscc", u) for u in usccs[first:first + SUBJECT_SET_SIZE])
                rows += len(lookup(stores[agency],
                                   LookupRequest(dataset, subjects, set_period), ROW_LIMIT))
            seconds = time.perf_counter() - started
            label = f"{dataset} sets of {SUBJECT_SET_SIZE} uscc"
            print(f"{label:34} {rows:8d} {seconds:8.3f} {rows / seconds:12.0f}")
        for agency, view, view_period in (("pboc", "company_flows", period),
                                          ("customs", "company_trade", period),
                                          ("tax", "active_legal_reps", None)):
            started = time.perf_counter()
            rows = len(lookup(stores[agency], LookupRequest(view, period=view_period),
                              ROW_LIMIT))
            seconds = time.perf_counter() - started
            print(f"{view + ' period-wide':34} {rows:8d} {seconds:8.3f} "
                  f"{rows / seconds:12.0f}")
    finally:
        for store in stores.values():
            store.close()
    if args.dir is None:
        print(f"data and stores left in {work}")


if __name__ == "__main__":
    main()
