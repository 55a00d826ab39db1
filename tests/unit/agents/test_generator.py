"""The sample data generator: deterministic, valid (every file loads), realistic in
shape, and its ground_truth.csv equal to what an independent evaluator of the reference
rules computes from the CSV files alone (plain csv and Decimal, written from the
contract's wording, sharing no code with the generator), and to what the rules give on
the agencies' own catalog views."""

from __future__ import annotations

import csv
import hashlib
from collections import defaultdict
from collections.abc import Iterator, Mapping
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner

import agents
from agents.generate import GeneratorConfig, generate
from exchange.cli.main import _register, cli
from exchange.errors import AlreadyExists, MalformedInput

Finding = tuple[str, str, str]  # rule_id, subject, period


def rows(path: Path) -> Iterator[dict[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        yield from csv.DictReader(f)


def ground_truth(root: Path) -> set[Finding]:
    found = {(r["rule_id"], r["subject"], r["period"]) for r in rows(root / "ground_truth.csv")}
    assert sum(1 for _ in rows(root / "ground_truth.csv")) == len(found)
    return found


class Books:
    """Per (uscc, period) figures, straight from the CSV files, as the contract words
    them."""

    def __init__(self, root: Path) -> None:
        zero = Decimal("0")
        holders = {r["account_no"]: (r["holder_kind"], r["holder_id"])
                   for r in rows(root / "pboc" / "accounts.csv")}
        self.inflows: dict[tuple[str, str], Decimal] = defaultdict(lambda: zero)
        self.payments_abroad: dict[tuple[str, str], Decimal] = defaultdict(lambda: zero)
        self.flow_keys: set[tuple[str, str]] = set()
        for t in rows(root / "pboc" / "transactions.csv"):
            kind, holder = holders[t["account_no"]]
            if kind != "company":
                continue
            key = (holder, t["booked_on"][:7])
            self.flow_keys.add(key)
            amount = Decimal(t["amount_cny"])
            if t["direction"] == "in":
                if holders.get(t["counterparty_account"]) != ("company", holder):
                    self.inflows[key] += amount
            elif t["cross_border"] == "1":
                self.payments_abroad[key] += amount
        self.exports: dict[tuple[str, str], Decimal] = defaultdict(lambda: zero)
        self.imports: dict[tuple[str, str], Decimal] = defaultdict(lambda: zero)
        self.import_count: dict[tuple[str, str], int] = defaultdict(int)
        for d in rows(root / "customs" / "declarations.csv"):
            key = (d["uscc"], d["declared_on"][:7])
            if d["direction"] == "export":
                self.exports[key] += Decimal(d["declared_value_cny"])
            else:
                self.imports[key] += Decimal(d["declared_value_cny"])
                self.import_count[key] += 1
        self.claimed: dict[tuple[str, str], Decimal] = defaultdict(lambda: zero)
        for c in rows(root / "tax" / "export_rebates.csv"):
            self.claimed[(c["uscc"], c["period"])] += Decimal(c["claimed_export_value_cny"])
        self.declared = {(d["uscc"], d["period"]): Decimal(d["declared_revenue_cny"])
                         for d in rows(root / "tax" / "revenue_declarations.csv")}
        self.active_reps = {(t["uscc"], t["legal_rep_id"])
                            for t in rows(root / "tax" / "taxpayers.csv")
                            if t["status"] == "active"}
        self.flagged = {r["person_id"] for r in rows(root / "police" / "records.csv")
                        if r["kind"] in ("wanted", "fraud_conviction", "lost_id_report")}
        self.status = {t["uscc"]: t["status"] for t in rows(root / "tax" / "taxpayers.csv")}
        # domestic invoices to another company, per (issuer, buyer, month); and how many
        self.pairs: dict[tuple[str, str, str], Decimal] = defaultdict(lambda: zero)
        self.pair_invoices: dict[tuple[str, str, str], int] = defaultdict(int)
        for i in rows(root / "tax" / "vat_invoices.csv"):
            if i["kind"] == "domestic" and i["issuer_uscc"] != i["buyer_uscc"]:
                key = (i["issuer_uscc"], i["buyer_uscc"], i["issued_on"][:7])
                self.pairs[key] += Decimal(i["amount_cny"])
                self.pair_invoices[key] += 1
        self.invoiced: dict[tuple[str, str], Decimal] = defaultdict(lambda: zero)
        self.from_inactive: dict[tuple[str, str], Decimal] = defaultdict(lambda: zero)
        for (issuer, buyer, period), amount in self.pairs.items():
            self.invoiced[(issuer, period)] += amount
            if self.status.get(issuer) in ("deregistered", "abnormal"):
                self.from_inactive[(buyer, period)] += amount


def ring_members(pairs: Mapping[tuple[str, str, str], Decimal]) -> set[Finding]:
    """Companies on a directed cycle of 2..6 distinct companies whose every pair is at
    least 100,000 CNY in the month: each cycle enumerated from its smallest member by
    depth-first search (no shortcut shared with the rule's SQL)."""
    succ: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for (issuer, buyer, period), amount in pairs.items():
        if amount >= 100_000:
            succ[period][issuer].append(buyer)
    found: set[Finding] = set()

    def walk(graph: Mapping[str, list[str]], period: str, path: list[str]) -> None:
        for nxt in graph.get(path[-1], ()):
            if nxt == path[0] and len(path) >= 2:
                found.update(("invoice-ring", c, period) for c in path)
            elif nxt > path[0] and nxt not in path and len(path) < 6:
                walk(graph, period, [*path, nxt])

    for period, graph in succ.items():
        for start in list(graph):
            walk(graph, period, [start])
    return found


def evaluate(root: Path) -> set[Finding]:
    """The five reference rules over the CSV files, with exact decimals."""
    b = Books(root)
    found: set[Finding] = set()
    for (company, period), claimed in b.claimed.items():
        if b.exports[(company, period)] < Decimal("0.80") * claimed:
            found.add(("export-rebate-without-exports", company, period))
    for key in b.flow_keys:
        company, period = key
        inflows, declared = b.inflows[key], b.declared.get(key, Decimal("0"))
        if inflows - declared > declared * Decimal("0.5") and \
                inflows - declared > Decimal("1000000"):
            found.add(("revenue-below-bank-inflows", company, period))
        payments, imports = b.payments_abroad[key], b.imports[key]
        if b.import_count[key] >= 1 and payments - imports > imports * Decimal("0.3") and \
                payments - imports > Decimal("500000"):
            found.add(("import-undervaluation", company, period))
        if payments > Decimal("200000") and b.import_count[key] == 0:
            found.add(("payments-without-imports", company, period))
    for company, person in b.active_reps:
        if person in b.flagged:
            found.add(("officer-with-police-record", f"{company}/{person}", ""))
    return found | evaluate_invoices(b)


def evaluate_invoices(b: Books) -> set[Finding]:
    """The three false-invoicing rules over the CSV files."""
    found = ring_members(b.pairs)
    for (issuer, period), invoiced in b.invoiced.items():
        if invoiced > Decimal("1000000") and invoiced > 3 * b.inflows[(issuer, period)]:
            found.add(("invoices-beyond-inflows", issuer, period))
    for (buyer, period), amount in b.from_inactive.items():
        if amount > Decimal("100000"):
            found.add(("invoices-from-abnormal-issuers", buyer, period))
    return found


def evaluate_on_views(root: Path, stores: Mapping[str, agents.AgencyStore],
                      periods: tuple[str, ...]) -> set[Finding]:
    """The rules as their owners run them: own data (from the CSV files) and the other
    agencies' catalog views (from the stores)."""
    b = Books(root)
    found: set[Finding] = set()
    for period in periods:
        flows = {r.uscc: r for r in agents.views_of("pboc")["company_flows"].rows(
            stores["pboc"], period)}
        trade = {r.uscc: r for r in agents.views_of("customs")["company_trade"].rows(
            stores["customs"], period)}
        for (company, p), claimed in b.claimed.items():
            exports = trade[company].export_value_cny if company in trade else Decimal(0)
            if p == period and exports < Decimal("0.8") * claimed:
                found.add(("export-rebate-without-exports", company, period))
        for company, f in flows.items():
            declared = b.declared.get((company, period), Decimal(0))
            excess = f.inflows_cny - declared
            if excess > declared / 2 and excess > 1_000_000:
                found.add(("revenue-below-bank-inflows", company, period))
            t = trade.get(company)
            imports = t.import_value_cny if t else Decimal(0)
            count = t.import_declarations if t else 0
            excess = f.outbound_cross_border_cny - imports
            if count and excess > imports * Decimal("0.3") and excess > 500_000:
                found.add(("import-undervaluation", company, period))
            if f.outbound_cross_border_cny > 200_000 and not count:
                found.add(("payments-without-imports", company, period))
    for rep in agents.views_of("tax")["active_legal_reps"].rows(stores["tax"]):
        if rep.legal_rep_id in b.flagged:
            found.add(("officer-with-police-record",
                       f"{rep.uscc}/{rep.legal_rep_id}", ""))
    for period in periods:  # the false-invoicing rules against pboc's company_flows
        flows = {r.uscc: r.inflows_cny for r in agents.views_of("pboc")["company_flows"].rows(
            stores["pboc"], period)}
        for (issuer, p), invoiced in b.invoiced.items():
            if p == period and invoiced > 1_000_000 and \
                    invoiced > 3 * flows.get(issuer, Decimal(0)):
                found.add(("invoices-beyond-inflows", issuer, period))
    return found | {f for f in evaluate_invoices(b) if f[0] != "invoices-beyond-inflows"}


def digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.csv")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "n300"
    generate(GeneratorConfig(seed=1, companies=300), out)
    return out


@pytest.fixture(scope="module")
def medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gen") / "n2000"
    generate(GeneratorConfig(seed=3, companies=2000), out)
    return out


def test_same_seed_and_size_give_the_same_bytes(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(GeneratorConfig(seed=1, companies=300), again)
    assert digest(again) == digest(small)
    other = tmp_path / "other"
    generate(GeneratorConfig(seed=2, companies=300), other)
    assert digest(other) != digest(small)


@pytest.mark.parametrize("seed,companies,end,months", [
    (1, 300, "2026-09", 3), (2, 300, "2026-09", 3), (5, 300, "2027-01", 2),
    (6, 150, "2026-09", 1)])
def test_ground_truth_equals_the_independent_evaluation(tmp_path: Path, seed: int,
                                                        companies: int, end: str,
                                                        months: int) -> None:
    out = tmp_path / "g"
    report = generate(GeneratorConfig(seed=seed, companies=companies, end_period=end,
                                      months=months), out)
    truth = ground_truth(out)
    assert truth == evaluate(out)
    assert {rule for rule, _, _ in truth} == set(report.findings)
    assert sum(report.findings.values()) == len(truth)


def test_ground_truth_equals_the_independent_evaluation_at_2000(medium: Path) -> None:
    assert ground_truth(medium) == evaluate(medium)


def test_every_file_loads_and_the_views_give_the_ground_truth(small: Path,
                                                              tmp_path: Path) -> None:
    stores = {a: agents.open_store(a, tmp_path / a / "agency.db") for a in agents.AGENCIES}
    try:
        for agency, store in stores.items():
            report = agents.load_dataset_dir(agency, small / agency, store)
            assert {f.dataset for f in report.files} == {
                d.name for d in agents.datasets_of(agency)}
            for f in report.files:
                assert f.rows == f.rows_after > 0
        periods = ("2026-07", "2026-08", "2026-09")
        assert evaluate_on_views(small, stores, periods) == ground_truth(small)
    finally:
        for store in stores.values():
            store.close()


def test_every_rule_has_findings_and_every_threshold_has_decoys(medium: Path) -> None:
    truth = ground_truth(medium)
    rules = {rule for rule, _, _ in truth}
    assert rules == {"export-rebate-without-exports", "revenue-below-bank-inflows",
                     "import-undervaluation", "payments-without-imports",
                     "officer-with-police-record", "invoices-beyond-inflows", "invoice-ring",
                     "invoices-from-abnormal-issuers"}
    b = Books(medium)
    million = Decimal("1000000")
    # each threshold met exactly (no finding) and passed by one fen (a finding)
    r1 = [(k, b.exports[k] * 5 - claimed * 4) for k, claimed in b.claimed.items()]
    assert {Decimal(0), Decimal("-0.05"), Decimal("0.05")} <= {gap for _, gap in r1}
    flows = [(k, b.inflows[k], b.declared.get(k, Decimal(0))) for k in b.flow_keys]
    ratio_gaps = {i * 2 - d * 3 for _, i, d in flows if i - d > million}
    assert {Decimal(0), Decimal("0.02"), Decimal("-0.02")} <= ratio_gaps
    excess_gaps = {i - d - million for _, i, d in flows if 2 * (i - d) > d}
    assert {Decimal(0), Decimal("0.01"), Decimal("-0.01")} <= excess_gaps
    no_declaration = {i for k, i, _ in flows if k not in b.declared}
    assert {million, million + Decimal("0.01")} <= no_declaration
    imports = [(b.payments_abroad[k], b.imports[k]) for k in b.flow_keys if b.import_count[k]]
    assert {Decimal(0), Decimal("0.1"), Decimal("-0.1")} <= {
        p * 10 - v * 13 for p, v in imports if p - v > 500_000}
    assert {Decimal(0), Decimal("0.01")} <= {
        p - v - 500_000 for p, v in imports if 10 * (p - v) > 3 * v}
    no_imports = {b.payments_abroad[k] for k in b.flow_keys if not b.import_count[k]}
    assert {Decimal("200000.00"), Decimal("200000.01"), Decimal("199999.99")} <= no_imports
    # officer-with-police-record: findings, and flagged persons who make none
    kinds: dict[str, set[str]] = defaultdict(set)
    for r in rows(medium / "police" / "records.csv"):
        kinds[r["person_id"]].add(r["kind"])
    statuses = {t["legal_rep_id"]: t["status"] for t in rows(medium / "tax" / "taxpayers.csv")}
    assert any(statuses.get(p) in ("deregistered", "abnormal") and "wanted" in k
               for p, k in kinds.items())
    assert any(statuses.get(p) == "active" and k == {"under_investigation"}
               for p, k in kinds.items())
    # invoices-beyond-inflows: exactly 3x inflows and a fen beyond; exactly 1,000,000 and
    # a fen beyond with inflows below a third of it; a company with no bank flows at all
    gaps = {v - 3 * b.inflows[k] for k, v in b.invoiced.items() if v > million}
    assert {Decimal(0), Decimal("0.01")} <= gaps
    assert {million, million + Decimal("0.01")} <= {
        v for k, v in b.invoiced.items() if 3 * b.inflows[k] < million}
    assert any(v > million and k not in b.flow_keys for k, v in b.invoiced.items())
    # invoices-from-abnormal-issuers: exactly 100,000 and a fen beyond, from both statuses
    hundred_k = Decimal("100000")
    assert {hundred_k, hundred_k + Decimal("0.01")} <= set(b.from_inactive.values())
    assert {"deregistered", "abnormal"} <= {
        b.status[i] for (i, _buyer, _p), v in b.pairs.items()
        if b.status.get(i) in ("deregistered", "abnormal")}
    # invoice-ring: pairs reaching 100,000.00 exactly over several invoices and pairs
    # one fen short; companies on a 7-cycle only, found by nobody; self-invoices
    summed = {v for k, v in b.pairs.items() if b.pair_invoices[k] >= 2}
    assert {hundred_k, hundred_k - Decimal("0.01")} <= summed
    ring = {c for rule, c, _p in truth if rule == "invoice-ring"}
    seven = [c for (c, _b, _p), v in b.pairs.items() if v >= hundred_k and c not in ring]
    assert seven  # the 7-ring's and the broken rings' members
    invoices = list(rows(medium / "tax" / "vat_invoices.csv"))
    assert any(i["issuer_uscc"] == i["buyer_uscc"] for i in invoices)
    pair_of = [(i["issuer_uscc"], i["buyer_uscc"], i["issued_on"][:7], Decimal(i["amount_cny"]))
               for i in invoices if i["kind"] == "export"]
    assert any(b.pairs.get(k[:3], Decimal(0)) < hundred_k <= b.pairs.get(k[:3], Decimal(0))
               + k[3] for k in pair_of)  # an export invoice would close a ring


def test_volumes_and_shapes_are_realistic(medium: Path) -> None:
    count = {f"{p.parent.name}/{p.stem}": sum(1 for _ in rows(p))
             for p in medium.glob("*/*.csv")}
    assert count["tax/vat_invoices"] > 5 * count["customs/declarations"]
    assert count["pboc/transactions"] > 5 * count["pboc/accounts"]
    accounts = list(rows(medium / "pboc" / "accounts.csv"))
    per_company: dict[str, int] = defaultdict(int)
    for a in accounts:
        if a["holder_kind"] == "company":
            per_company[a["holder_id"]] += 1
    assert len(per_company) == 2000
    assert max(per_company.values()) >= 3 and min(per_company.values()) == 1
    assert sum(1 for a in accounts if a["holder_kind"] == "person") > 500
    known = {a["account_no"] for a in accounts}
    counterparties = [t["counterparty_account"] for t in rows(medium / "pboc" / "transactions.csv")]
    assert sum(c in known for c in counterparties) > 1000  # both legs of a transfer
    assert sum(c not in known for c in counterparties) > 1000  # banks outside, abroad
    taxpayers = {t["uscc"] for t in rows(medium / "tax" / "taxpayers.csv")}
    assert len(taxpayers) < len(per_company)  # some companies are no Shenzhen taxpayers


def test_output_folder_is_never_overwritten_by_accident(small: Path) -> None:
    with pytest.raises(AlreadyExists):
        generate(GeneratorConfig(seed=1, companies=300), small)
    with pytest.raises(MalformedInput):
        GeneratorConfig(seed=1, companies=10)
    with pytest.raises(MalformedInput):
        GeneratorConfig(seed=1, companies=300, end_period="2026-9")


def test_cli_generate(tmp_path: Path) -> None:
    _register()
    out = tmp_path / "sample"
    result = CliRunner().invoke(cli, ["data", "generate", "--seed", "4", "--companies", "120",
                                      "--out", str(out), "--months", "2", "--json"])
    assert result.exit_code == 0, result.output
    assert '"periods": [\n    "2026-08",\n    "2026-09"\n  ]' in result.output
    assert ground_truth(out) == evaluate(out)
    result = CliRunner().invoke(cli, ["data", "generate", "--seed", "4", "--companies", "120",
                                      "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output


def test_output_does_not_depend_on_how_often_buffers_are_written(
        small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import agents.generate as gen

    monkeypatch.setattr(gen, "FLUSH_LINES", 3)
    monkeypatch.setattr(gen, "FLUSH_COMPANIES", 7)
    again = tmp_path / "again"
    generate(GeneratorConfig(seed=1, companies=300), again)
    assert digest(again) == digest(small)


def test_the_generator_keeps_nothing_per_company_but_the_codes(tmp_path: Path) -> None:
    import agents.generate as gen

    companies = 3_000
    g = gen._Generator(GeneratorConfig(seed=8, companies=companies), tmp_path / "g")
    g.people_and_companies()
    g.assign_scenarios()
    g.write_all()
    assert len(g.usccs) == companies * 18 and len(g.account_counts) == companies
    sized = {name: len(value) for name, value in vars(g).items()
             if isinstance(value, list | dict | set | tuple | bytearray)
             and name not in ("usccs", "account_counts")}
    # the planted cases and the findings are a few per hundred companies; nothing else
    # grows with the register
    assert max(sized.values()) < companies // 10, sized
    assert ground_truth(tmp_path / "g") == evaluate(tmp_path / "g")
