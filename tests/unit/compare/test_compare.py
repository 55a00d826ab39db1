"""The rule engine and the reference rule pack (exchange.compare, agents/*/rules).

The eight reference rules must find exactly ground_truth.csv on generated data, their
inputs gathered as the network gathers them (own reads through agents.own_inputs, each
query answered by the target's agents.lookup). Hand-written inputs pin every threshold
of DATA_CONTRACT.md independently of the generator. Then the rule file format (strict,
errors with file and line), canonical bytes, the DuckDB lockdown and determinism.
"""

from __future__ import annotations

import csv
import random
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import duckdb
import pytest

import agents
from agents.common import checks
from agents.generate import RULE_IDS, GeneratorConfig, generate
from agents.lookup import SUBJECTS_MAX
from agents.own_inputs import read_own
from exchange.compare import (
    RuleError,
    duck,
    load_rule,
    load_rule_bytes,
    load_rules,
    rules_dir,
    run_rule,
)
from exchange.compare.engine import RuleLimitExceeded, inputs_digest
from exchange.compare.local import gather_inputs, run_locally
from exchange.compare.rules import Rule
from exchange.errors import MalformedInput

P = "2026-09"
R1 = "export-rebate-without-exports"
R2 = "revenue-below-bank-inflows"
R3 = "import-undervaluation"
R4 = "payments-without-imports"
R5 = "officer-with-police-record"
OWNER = {R1: "tax", R2: "tax", R3: "customs", R4: "pboc", R5: "police"}

Rows = list[dict[str, object]]


def rule_of(rule_id: str) -> Rule:
    return load_rule(rules_dir(OWNER[rule_id]) / f"{rule_id}.yaml")


def uscc(n: int) -> str:
    body = f"91440300{n:08d}0"
    return body + checks.uscc_check_char(body)


def person(n: int) -> str:
    body = f"44030019800101{n:03d}"
    return body + checks.person_id_check_char(body)


def d(text: str) -> Decimal:
    return checks.fen_to_decimal(checks.decimal_to_fen(Decimal(text)))


def subjects(rule_id: str, inputs: Mapping[str, Rows], period: str = P) -> dict[str, dict]:
    rule = rule_of(rule_id)
    out = run_rule(rule, inputs, {"period": period} if rule.period_bound else {})
    return {str(row["subject"]): row for row in out.rows}


# -- exactness on generated data ---------------------------------------------------------

@dataclass
class Sample:
    folder: Path
    stores: dict[str, agents.AgencyStore]
    periods: tuple[str, ...]
    truth: set[tuple[str, str, str]]


def make_sample(root: Path, seed: int, companies: int) -> Sample:
    config = GeneratorConfig(seed=seed, companies=companies)
    folder = root / "data"
    generate(config, folder)
    stores: dict[str, agents.AgencyStore] = {}
    for agency in agents.AGENCIES:
        store = agents.open_store(agency, root / f"{agency}.db")
        agents.load_dataset_dir(agency, folder / agency, store)
        stores[agency] = store
    with open(folder / "ground_truth.csv", encoding="utf-8", newline="") as f:
        truth = {(r["rule_id"], r["subject"], r["period"]) for r in csv.DictReader(f)}
    return Sample(folder, stores, config.periods, truth)


def every_finding(sample: Sample) -> set[tuple[str, str, str]]:
    found: set[tuple[str, str, str]] = set()
    ran = set()
    for agency in agents.AGENCIES:
        for rule in load_rules(agency):
            ran.add(rule.id)
            runs = [{"period": p} for p in sample.periods] if rule.period_bound else [{}]
            for params in runs:
                output = run_locally(rule, params, sample.stores)
                assert output.period == params.get("period", "")
                found |= {(rule.id, str(row["subject"]), output.period) for row in output.rows}
    assert ran == set(RULE_IDS)
    return found


@pytest.mark.parametrize(("seed", "companies"), [(1, 300), (2, 1_000), (3, 2_000),
                                                 (4, 5_000), (5, 100)])
def test_reference_rules_find_exactly_the_ground_truth(tmp_path: Path, seed: int,
                                                       companies: int) -> None:
    sample = make_sample(tmp_path, seed, companies)
    try:
        found = every_finding(sample)
        assert {rule for rule, _s, _p in sample.truth} == set(RULE_IDS)
        assert sorted(found - sample.truth) == []
        assert sorted(sample.truth - found) == []
    finally:
        for store in sample.stores.values():
            store.close()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sample]:
    made = make_sample(tmp_path_factory.mktemp("compare"), seed=7, companies=300)
    yield made
    for store in made.stores.values():
        store.close()


def test_own_reads_are_typed_sorted_and_in_the_month(sample: Sample) -> None:
    tax = sample.stores["tax"]
    rebates = read_own(tax, "export_rebates", P)
    assert rebates and all(r["period"] == P for r in rebates)
    assert [r["claim_no"] for r in rebates] == sorted(str(r["claim_no"]) for r in rebates)
    for row in rebates:
        value = row["claimed_export_value_cny"]
        assert isinstance(value, Decimal) and value.as_tuple().exponent == -2
    invoices = read_own(tax, "vat_invoices", P, fields=("invoice_no", "issued_on"))
    start, end = checks.period_bounds(P)
    assert invoices and all(start <= str(r["issued_on"]) < end for r in invoices)
    assert set(invoices[0]) == {"invoice_no", "issued_on"}
    everyone = read_own(tax, "taxpayers", None, fields=("uscc",))
    assert len(everyone) == tax.row_count(agents.datasets_of("tax")[0])
    records = read_own(sample.stores["police"], "records", None)
    assert any(r["case_no"] is None for r in records)  # a lost-id report has none
    flows = read_own(sample.stores["pboc"], "company_flows", P)
    assert flows == [{"uscc": f.uscc, "period": f.period, "inflows_cny": f.inflows_cny,
                      "outbound_cross_border_cny": f.outbound_cross_border_cny}
                     for f in agents.views_of("pboc")["company_flows"].rows(
                         sample.stores["pboc"], P)]
    with pytest.raises(MalformedInput):
        read_own(tax, "company_flows", P)  # pboc's view, not tax's
    with pytest.raises(MalformedInput):
        read_own(tax, "taxpayers", "2026-13")


def test_subject_set_queries_name_only_the_subjects_read(sample: Sample) -> None:
    rule = rule_of(R1)
    plan = rule.plan({"period": P})
    inputs = gather_inputs(plan, sample.stores)
    (query,) = plan.queries
    (request,) = query.requests(inputs)
    claimants = sorted({str(r["uscc"]) for r in inputs["rebates"]})
    assert request.subjects == tuple(("uscc", u) for u in claimants)
    assert request.period == P and request.fields == ("uscc", "export_value_cny")
    assert {r["uscc"] for r in inputs["trade"]} <= set(claimants)
    # no subject, no query (a request with no subject would be period-wide)
    assert query.requests({"rebates": []}) == []
    many = [{"uscc": uscc(i)} for i in range(SUBJECTS_MAX + 5)]
    chunks = query.requests({"rebates": many})
    assert [len(c.subjects) for c in chunks] == [SUBJECTS_MAX, 5]


def test_every_input_comes_back_the_same_through_the_network_path(sample: Sample) -> None:
    """Running from gathered inputs shuffled gives the same bytes as the local run."""
    for rule_id in (R2, R5):
        rule = rule_of(rule_id)
        params = {"period": P} if rule.period_bound else {}
        inputs = gather_inputs(rule.plan(params), sample.stores)
        shuffled = {name: random.Random(5).sample(rows, len(rows))
                    for name, rows in inputs.items()}
        first = run_rule(rule, inputs, params)
        again = run_rule(rule, shuffled, params)
        assert first.canonical_bytes == again.canonical_bytes and first.rows
        assert first.digest == again.digest
        assert inputs_digest(rule, inputs) == inputs_digest(rule, shuffled)
        assert first.canonical_bytes == run_locally(rule, params, sample.stores).canonical_bytes


# -- the thresholds, by hand ---------------------------------------------------------------

def test_export_rebate_threshold_is_strictly_below_80_percent() -> None:
    a, b, c, e, f = uscc(1), uscc(2), uscc(3), uscc(4), uscc(5)
    rebates = [
        {"uscc": a, "claimed_export_value_cny": d("1000.00")},  # declared exactly 80%
        {"uscc": b, "claimed_export_value_cny": d("1000.00")},  # one fen below 80%
        {"uscc": c, "claimed_export_value_cny": d("600.00")},  # no declaration at all
        {"uscc": c, "claimed_export_value_cny": d("400.00")},
        {"uscc": e, "claimed_export_value_cny": d("0.05")},  # 80% of 0.05 is 0.04
    ]
    trade = [{"uscc": a, "export_value_cny": d("800.00")},
             {"uscc": b, "export_value_cny": d("799.99")},
             {"uscc": e, "export_value_cny": d("0.04")},
             {"uscc": f, "export_value_cny": d("1.00")}]  # declares, claims nothing
    found = subjects(R1, {"rebates": rebates, "trade": trade})
    assert sorted(found) == [b, c]
    assert found[b]["amount"] == "200.01"
    assert found[b]["declared_export_value_cny"] == "799.99"
    assert found[c]["amount"] == "1000.00"  # none counts as 0, claims summed
    assert found[c]["declared_export_value_cny"] == "0.00"


def test_revenue_rule_needs_more_than_50_percent_and_more_than_a_million() -> None:
    ratio_at, ratio_above = uscc(1), uscc(2)
    excess_at, excess_above = uscc(3), uscc(4)
    undeclared_at, undeclared_above, quiet = uscc(5), uscc(6), uscc(7)
    declarations = [
        {"uscc": ratio_at, "declared_revenue_cny": d("4000000.00")},
        {"uscc": ratio_above, "declared_revenue_cny": d("4000000.00")},
        {"uscc": excess_at, "declared_revenue_cny": d("100000.00")},
        {"uscc": excess_above, "declared_revenue_cny": d("100000.00")},
        {"uscc": quiet, "declared_revenue_cny": d("100.00")},  # declared, no bank rows
    ]
    flows = [
        {"uscc": ratio_at, "inflows_cny": d("6000000.00")},  # excess exactly 50%
        {"uscc": ratio_above, "inflows_cny": d("6000000.01")},
        {"uscc": excess_at, "inflows_cny": d("1100000.00")},  # excess exactly 1,000,000
        {"uscc": excess_above, "inflows_cny": d("1100000.01")},
        {"uscc": undeclared_at, "inflows_cny": d("1000000.00")},
        {"uscc": undeclared_above, "inflows_cny": d("1000000.01")},
    ]
    found = subjects(R2, {"declarations": declarations, "flows": flows})
    assert sorted(found) == sorted([ratio_above, excess_above, undeclared_above])
    assert found[ratio_above]["amount"] == "2000000.01"
    assert found[excess_above]["amount"] == "1000000.01"
    assert found[undeclared_above]["declared_revenue_cny"] == "0.00"
    assert found[undeclared_above]["amount"] == "1000000.01"


def test_import_undervaluation_needs_an_import_declaration_and_both_excesses() -> None:
    ratio_at, ratio_above, excess_at, excess_above = uscc(1), uscc(2), uscc(3), uscc(4)
    exports_only, no_payments = uscc(5), uscc(6)
    trade = [
        {"uscc": ratio_at, "import_value_cny": d("2000000.00"), "import_declarations": 2},
        {"uscc": ratio_above, "import_value_cny": d("2000000.00"), "import_declarations": 1},
        {"uscc": excess_at, "import_value_cny": d("1000000.00"), "import_declarations": 1},
        {"uscc": excess_above, "import_value_cny": d("1000000.00"),
         "import_declarations": 1},
        {"uscc": exports_only, "import_value_cny": d("0.00"), "import_declarations": 0},
        {"uscc": no_payments, "import_value_cny": d("10.00"), "import_declarations": 1},
    ]
    flows = [
        {"uscc": ratio_at, "outbound_cross_border_cny": d("2600000.00")},  # 30% exactly
        {"uscc": ratio_above, "outbound_cross_border_cny": d("2600000.01")},
        {"uscc": excess_at, "outbound_cross_border_cny": d("1500000.00")},  # 500,000 exactly
        {"uscc": excess_above, "outbound_cross_border_cny": d("1500000.01")},
        {"uscc": exports_only, "outbound_cross_border_cny": d("3000000.00")},
    ]
    found = subjects(R3, {"trade": trade, "flows": flows})
    assert sorted(found) == sorted([ratio_above, excess_above])
    assert found[ratio_above]["amount"] == "600000.01"
    assert found[excess_above]["import_declarations"] == 1


def test_payments_without_imports_is_strictly_above_200000_and_no_import() -> None:
    at, above, with_import, exports_only, unknown_to_customs = (uscc(i) for i in range(1, 6))
    flows = [{"uscc": at, "outbound_cross_border_cny": d("200000.00")},
             {"uscc": above, "outbound_cross_border_cny": d("200000.01")},
             {"uscc": with_import, "outbound_cross_border_cny": d("900000.00")},
             {"uscc": exports_only, "outbound_cross_border_cny": d("300000.00")},
             {"uscc": unknown_to_customs, "outbound_cross_border_cny": d("250000.00")}]
    trade = [{"uscc": with_import, "import_declarations": 1},
             {"uscc": exports_only, "import_declarations": 0}]
    found = subjects(R4, {"flows": flows, "trade": trade})
    assert sorted(found) == sorted([above, exports_only, unknown_to_customs])
    assert found[above]["amount"] == "200000.01"


def test_officer_rule_flags_three_kinds_per_company_and_person_without_period() -> None:
    a, b, c, e = uscc(1), uscc(2), uscc(3), uscc(4)
    wanted, lost, investigated, both = person(1), person(2), person(3), person(4)
    reps = [{"uscc": a, "legal_rep_id": wanted}, {"uscc": b, "legal_rep_id": wanted},
            {"uscc": c, "legal_rep_id": lost}, {"uscc": e, "legal_rep_id": investigated},
            {"uscc": uscc(5), "legal_rep_id": both}]
    records = [{"person_id": wanted, "kind": "wanted"},
               {"person_id": wanted, "kind": "wanted"},
               {"person_id": lost, "kind": "lost_id_report"},
               {"person_id": investigated, "kind": "under_investigation"},
               {"person_id": both, "kind": "under_investigation"},
               {"person_id": both, "kind": "fraud_conviction"},
               {"person_id": person(9), "kind": "wanted"}]  # no company of theirs
    rule = rule_of(R5)
    output = run_rule(rule, {"records": records, "reps": reps}, {})
    found = {str(r["subject"]): r for r in output.rows}
    assert sorted(found) == sorted([f"{a}/{wanted}", f"{b}/{wanted}", f"{c}/{lost}",
                                    f"{uscc(5)}/{both}"])
    assert all(r["period"] == "" and r["amount"] == "0.00" and r["severity"] == "medium"
               for r in found.values())
    assert found[f"{uscc(5)}/{both}"]["record_kinds"] == "fraud_conviction"
    assert found[f"{c}/{lost}"]["person_id"] == lost
    with pytest.raises(RuleError, match="no parameter"):
        run_rule(rule, {"records": records, "reps": reps}, {"period": P})


def _write(folder: Path, name: str, header: str, rows: Sequence[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.csv").write_text(header + "\n" + "".join(r + "\n" for r in rows),
                                        encoding="utf-8")


def test_tiny_extracts_through_the_stores(tmp_path: Path) -> None:
    """Hand-written extracts loaded into stores: a deregistered taxpayer with a wanted
    representative, a lost-id report against an investigation, transfers between a
    company's own accounts, a company unknown to tax paying abroad, no declaration."""
    active, dereg, investigated, mover, foreigner = (uscc(i) for i in range(1, 6))
    rep_a, rep_d, rep_i, rep_m = person(1), person(2), person(3), person(4)
    day = f"{P}-15"
    _write(tmp_path / "tax", "taxpayers", "uscc,name,legal_rep_id,status,registered_on", [
        f"{active},A,{rep_a},active,2020-01-01", f"{dereg},D,{rep_d},deregistered,2020-01-01",
        f"{investigated},I,{rep_i},active,2020-01-01", f"{mover},M,{rep_m},active,2020-01-01"])
    _write(tmp_path / "tax", "revenue_declarations", "uscc,period,declared_revenue_cny",
           [f"{mover},{P},100000.00"])
    _write(tmp_path / "police", "persons", "person_id,name",
           [f"{p},N" for p in (rep_a, rep_d, rep_i, rep_m)])
    _write(tmp_path / "police", "records", "record_id,person_id,kind,case_no,recorded_on", [
        f"r1,{rep_a},lost_id_report,,2019-03-01", f"r2,{rep_d},wanted,C-2,2019-03-01",
        f"r3,{rep_i},under_investigation,C-3,2019-03-01"])
    _write(tmp_path / "pboc", "accounts", "account_no,holder_kind,holder_id,bank,opened_on", [
        f"m1,company,{mover},B,2020-01-01", f"m2,company,{mover},B,2020-01-01",
        f"f1,company,{foreigner},B,2020-01-01"])
    _write(tmp_path / "pboc", "transactions",
           "txn_id,account_no,counterparty_account,amount_cny,direction,cross_border,booked_on",
           [f"t1,m1,m2,5000000.00,in,0,{day}",  # from its own account: not an inflow
            f"t2,m2,m1,5000000.00,out,0,{day}",
            f"t3,m1,X9,1100000.01,in,0,{day}",  # 1,000,000.01 above its declaration
            f"t4,f1,HK1,200000.01,out,1,{day}",
            f"t5,f1,HK1,999999.00,out,1,{P[:5]}{int(P[5:]) - 1:02d}-28"])  # month before
    _write(tmp_path / "customs", "declarations",
           "decl_no,uscc,direction,hs_code,declared_value_cny,declared_on,port", [])
    stores = {}
    for agency in agents.AGENCIES:
        store = agents.open_store(agency, tmp_path / "db" / f"{agency}.db")
        folder = tmp_path / agency
        if folder.exists():
            agents.load_dataset_dir(agency, folder, store)
        stores[agency] = store
    try:
        found = set()
        for rule_id in (R1, R2, R3, R4, R5):
            rule = rule_of(rule_id)
            params = {"period": P} if rule.period_bound else {}
            output = run_locally(rule, params, stores)
            found |= {(rule_id, str(r["subject"]), str(r["amount"])) for r in output.rows}
        assert found == {(R2, mover, "1000000.01"), (R4, foreigner, "200000.01"),
                         (R5, f"{active}/{rep_a}", "0.00")}
    finally:
        for store in stores.values():
            store.close()


# -- the rule file format ------------------------------------------------------------------

BASE = (rules_dir("pboc") / f"{R4}.yaml").read_text(encoding="utf-8")


def write_rule(tmp_path: Path, text: str, name: str = R4) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if needle in line)


@pytest.mark.parametrize(("old", "new", "needle", "message"), [
    ("severity: high", "severity: high\ncolour: red", "colour", "unknown key 'colour'"),
    ("version: 1", 'version: "1"', "version", "version must be an integer"),
    ("severity: high", "severity: urgent", "severity", "not one of high, medium, low"),
    ("owner: pboc", "owner: cia", "owner", "not one of"),
    ("agency: customs", "agency: cia", "agency", "not one of"),
    ("dataset: company_trade", "dataset: declarations", "dataset: declarations",
     "offers no catalog view 'declarations'"),
    ("dataset: company_flows", "dataset: accounts_x", "accounts_x", "no dataset or view"),
    ("fields: [uscc, import_declarations]", "fields: [uscc, import_count]", "import_count",
     "no column 'import_count'"),
    ("  - name: trade", "  - name: flows  # again", "flows  # again", "already declared"),
    ("shape: aggregate", "shape: everything", "shape", "not one of aggregate, subject_set"),
    ("shape: aggregate", "shape: aggregate\n    subjects_from: flows.uscc", "subjects_from",
     "subjects_from is for shape subject_set"),
    ("shape: aggregate", "shape: subject_set\n    subjects_from: flows.outbound_cross_border_cny",
     "subjects_from", "holds decimal values"),
    ("shape: aggregate", "shape: subject_set\n    subjects_from: nothing.uscc",
     "subjects_from", "no own input nor an earlier query"),
    ("  - name: trade\n    agency: customs\n    dataset: company_trade\n"
     "    shape: aggregate\n    period: $period",
     "  - name: trade\n    agency: customs\n    dataset: company_trade\n"
     "    shape: aggregate", "dataset: company_trade", "per month"),
    ("    period: $period\n    fields: [uscc, import", "    period: $month\n    fields: [uscc, import",
     "$month", "no parameter 'month'"),
    ("id: payments-without-imports", "id: payments-without-imports\nid: again", "id: again",
     "given twice"),
    ("version: 1", "version: 1\nowner: tax", "owner: pboc", "given twice"),
    ("  period: {type: period, required: true}", "  period: {type: date}", "type: date",
     "not one of period"),
    ("fields: [uscc, import_declarations]", "fields: [uscc, uscc]", "fields: [uscc, uscc]",
     "given twice"),
])
def test_a_malformed_rule_file_names_file_and_line(tmp_path: Path, old: str, new: str,
                                                    needle: str, message: str) -> None:
    assert old in BASE, old
    text = BASE.replace(old, new, 1)
    path = write_rule(tmp_path, text)
    with pytest.raises(RuleError) as caught:
        load_rule(path)
    error = caught.value
    assert message in error.message
    assert error.source == str(path)
    assert error.line == line_of(text, needle), (error.line, str(error))
    assert str(error).startswith(f"{path}:{error.line}: ")
    assert isinstance(error, MalformedInput)


def test_yaml_syntax_errors_and_missing_keys_name_the_line(tmp_path: Path) -> None:
    text = BASE.replace("fields: [uscc, import_declarations]", "fields: [uscc, import", 1)
    with pytest.raises(RuleError) as caught:
        load_rule(write_rule(tmp_path, text))
    assert "not valid YAML" in caught.value.message
    assert caught.value.line is not None and caught.value.line >= line_of(text, "fields: [uscc, import")
    with pytest.raises(RuleError, match="missing severity"):
        load_rule(write_rule(tmp_path, BASE.replace("severity: high\n", "", 1)))
    with pytest.raises(RuleError, match="differs from the file name"):
        load_rule(write_rule(tmp_path, BASE, name="other-name"))
    with pytest.raises(RuleError, match="must be a mapping"):
        load_rule(write_rule(tmp_path, "- just\n- a list\n"))


@pytest.mark.parametrize(("sql", "needle", "message"), [
    ("SELECT f.uscc AS subject,\n       f.outbound_cross_border_cny AS amount\n"
     "FROM flows f\nWHERE f.no_such_column > 1", "no_such_column", '"no_such_column"'),
    ("SELECT f.uscc AS subject,\n       f.outbound_cross_border_cny AS amount\n"
     "FROM flows f\nWHERE AND", "WHERE AND", "syntax error"),
    ("SELECT f.uscc AS subject,\n       f.outbound_cross_border_cny AS amount\n"
     "FROM flows f\nORDER BY random()", "random()", "random() is not allowed"),
    ("SELECT f.uscc AS subject,\n       f.outbound_cross_border_cny AS amount,\n"
     "       current_date AS today\nFROM flows f", "current_date", "current_date is not"),
    ("SELECT uscc AS subject, outbound_cross_border_cny AS amount\n"
     "FROM flows USING SAMPLE 10 ROWS", None, "sample"),
    ("SELECT uscc AS subject, 1.5::DOUBLE AS amount FROM flows", None, "not a DECIMAL"),
    ("SELECT uscc AS subject, outbound_cross_border_cny AS amount, 0.5::DOUBLE AS r\n"
     "FROM flows", None, "no canonical form"),
    ("SELECT uscc AS subject, outbound_cross_border_cny / 3 AS amount FROM flows", None,
     "not a DECIMAL"),
    ("SELECT uscc AS subject, outbound_cross_border_cny * 0.001 AS amount FROM flows", None,
     "at most two places"),
    ("SELECT uscc AS who, outbound_cross_border_cny AS amount FROM flows", None,
     "no column 'subject'"),
    ("SELECT uscc AS subject, outbound_cross_border_cny AS amount, 'x' AS severity\n"
     "FROM flows", None, "may not return a column 'severity'"),
    ("SELECT 1 AS subject; SELECT 2 AS amount", None, "one SELECT statement"),
    ("CREATE TABLE x AS SELECT 1", None, "must be a SELECT"),
    ("SELECT uscc AS subject, outbound_cross_border_cny AS amount\n"
     "FROM read_csv('/etc/passwd')", "read_csv", "read_csv() is not allowed in FROM"),
])
def test_sql_errors_map_to_the_rule_file_line(tmp_path: Path, sql: str, needle: str | None,
                                              message: str) -> None:
    start = BASE.index("sql: |")
    end = BASE.index("output:")
    body = "".join(f"  {line}\n" for line in sql.splitlines())
    text = BASE[:start] + "sql: |\n" + body + "output:\n  subject: the company\n"
    path = write_rule(tmp_path, text)
    with pytest.raises(RuleError) as caught:
        load_rule(path)
    assert message in caught.value.message, str(caught.value)
    if needle is not None:
        assert caught.value.line == line_of(text, needle), str(caught.value)
    assert str(path) in str(caught.value) and BASE[end:]  # the file is named


def _with_sql(tmp_path: Path, sql: str) -> tuple[Path, str]:
    """BASE with `sql` (lines unindented) as its SQL block, and the file's text."""
    start = BASE.index("sql: |")
    body = "".join(f"  {line}\n" for line in sql.splitlines())
    text = BASE[:start] + "sql: |\n" + body + "output:\n  subject: the company\n"
    return write_rule(tmp_path, text), text


@pytest.mark.parametrize(("expression", "named"), [
    ("(SELECT count(*) FROM duckdb_settings())", "duckdb_settings()"),
    ("(SELECT count(*) FROM duckdb_functions())", "duckdb_functions()"),
    ("(SELECT count(*) FROM duckdb_settings)", "table duckdb_settings"),
    ("(SELECT count(*) FROM duckdb_tables)", "table duckdb_tables"),
    ("(SELECT count(*) FROM pg_class)", "table pg_class"),
    ("(SELECT count(*) FROM information_schema.tables)", "table information_schema.tables"),
    ("(SELECT count(*) FROM range(10))", "range()"),
    ("random()", "random()"),
    ("now()::VARCHAR", "now()"),
    ("get_current_timestamp()::VARCHAR", "get_current_timestamp()"),
    ("current_localtimestamp()::VARCHAR", "current_localtimestamp()"),
    ("current_setting('threads')::VARCHAR", "current_setting()"),
    ("getenv('HOME')", "getenv()"),
    ("getvariable('x')::VARCHAR", "getvariable()"),
    ("version()", "version()"),
    ("uuid()::VARCHAR", "uuid()"),
    ("hash(uscc)::VARCHAR", "hash()"),
    ("system.main.abs(1)::VARCHAR", "system.main.abs()"),
    ("current_user", "current_user"),
    ("current_schema", "current_schema"),
    ("'2026-01-01'::TIMESTAMPTZ::VARCHAR", "TIMESTAMPTZ"),
])
def test_registration_refuses_any_function_outside_the_allow_list(
        tmp_path: Path, expression: str, named: str) -> None:
    sql = ("SELECT uscc AS subject,\n       outbound_cross_border_cny AS amount,\n"
           f"       {expression} AS detail\nFROM flows")
    path, text = _with_sql(tmp_path, sql)
    with pytest.raises(RuleError) as caught:
        load_rule(path)
    assert named in caught.value.message and "not allowed" in caught.value.message, \
        str(caught.value)
    assert caught.value.line == line_of(text, expression), str(caught.value)


def test_a_with_query_may_not_take_the_name_of_a_duckdb_view(tmp_path: Path) -> None:
    sql = ("SELECT uscc AS subject, outbound_cross_border_cny AS amount\n"
           "FROM (WITH duckdb_tables AS (SELECT * FROM flows) SELECT * FROM flows)\n"
           "WHERE uscc NOT IN (SELECT table_name FROM duckdb_tables)")
    with pytest.raises(RuleError, match="may not be named duckdb_tables"):
        load_rule(_with_sql(tmp_path, sql)[0])


def test_every_reference_rule_passes_the_allow_list_on_any_thread_count() -> None:
    for agency in agents.AGENCIES:
        for rule in load_rules(agency):
            con = duck.connect()
            try:
                shape = duck.check_statement(con, rule.sql, list(rule.input_names))
            finally:
                con.close()
            # the police rule's and the ring's string_agg have their own ORDER BY, but
            # still run on one thread: an aggregate's order is the engine's to make canonical
            assert (shape.order_sensitive is None) == (rule.id not in (R5, "invoice-ring")), \
                (rule.id, shape)


@pytest.mark.parametrize(("expression", "why"), [
    ("string_agg(t.uscc, ',')", "string_agg()"),
    ("list(t.uscc)::VARCHAR", "list()"),
    ("CAST(sum(CAST(f.outbound_cross_border_cny AS DOUBLE)) AS BIGINT)", "DOUBLE"),
    ("CAST(avg(f.outbound_cross_border_cny) AS BIGINT)", "avg()"),
    ("CAST(sum(f.outbound_cross_border_cny / 3) AS BIGINT)", "/()"),
])
def test_order_sensitive_sql_gives_the_same_bytes_on_any_thread_count(
        tmp_path: Path, expression: str, why: str) -> None:
    sql = ("SELECT f.uscc AS subject, SUM(f.outbound_cross_border_cny) AS amount,\n"
           f"       {expression} AS detail\nFROM flows f, trade t\n"
           "WHERE t.import_declarations = f.uscc_n\nGROUP BY f.uscc")
    sql = sql.replace("f.uscc_n", "CAST(substr(f.uscc, 9, 8) AS BIGINT) % 50")
    rule = load_rule(_with_sql(tmp_path, sql)[0])
    con = duck.connect()
    try:
        assert why in (duck.check_statement(con, rule.sql, list(rule.input_names))
                       .order_sensitive or "")
    finally:
        con.close()
    # more rows than one DuckDB row group (122,880), so that threads would split them
    flows = [{"uscc": uscc(i % 2_000), "outbound_cross_border_cny": d(f"{i % 9973}.{i % 97:02d}")}
             for i in range(150_000)]
    trade = [{"uscc": uscc(i), "import_declarations": i % 50} for i in range(200)]
    digests = {run_rule(rule, {"flows": rng_sample, "trade": trade}, {"period": P},
                        limits=duck.RuleLimits(threads=threads)).digest
               for threads, rng_sample in ((1, flows), (4, flows[::-1]), (2, flows))}
    assert len(digests) == 1


def test_a_rule_over_its_time_limit_fails_naming_the_limit(tmp_path: Path) -> None:
    sql = ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r)\n"
           "SELECT uscc AS subject, outbound_cross_border_cny AS amount\n"
           "FROM flows WHERE uscc NOT IN (SELECT CAST(n AS VARCHAR) FROM r)")
    path, _ = _with_sql(tmp_path, sql)
    rule = load_rule(path)  # registration cannot tell: the recursion is deterministic
    flows = [{"uscc": uscc(1), "outbound_cross_border_cny": d("1.00")}]
    # the recursion has no end: the run ends only by the limit's interrupt
    with pytest.raises(RuleLimitExceeded) as caught:
        run_rule(rule, {"flows": flows, "trade": []}, {"period": P},
                 limits=duck.RuleLimits(time_s=1.0, memory_mib=4096))
    assert f"rule {rule.id}: exceeded the 1 s time limit" in str(caught.value)
    assert str(path) in str(caught.value)


def test_a_rule_over_its_memory_limit_fails_naming_the_limit(tmp_path: Path) -> None:
    sql = ("SELECT a.uscc AS subject, SUM(a.outbound_cross_border_cny) AS amount,\n"
           "       count(DISTINCT a.uscc || b.uscc || c.uscc) AS pairs\n"
           "FROM flows a, flows b, flows c GROUP BY a.uscc")
    rule = load_rule(_with_sql(tmp_path, sql)[0])
    flows = [{"uscc": uscc(i), "outbound_cross_border_cny": d("1.00")} for i in range(300)]
    with pytest.raises(RuleLimitExceeded) as caught:
        run_rule(rule, {"flows": flows, "trade": []}, {"period": P},
                 limits=duck.RuleLimits(time_s=600, memory_mib=64))
    assert f"rule {rule.id}: exceeded the memory limit 64 MiB" in str(caught.value)


def test_inputs_over_the_memory_limit_fail_naming_the_limit() -> None:
    rule = rule_of(R4)
    flows = [{"uscc": uscc(i), "outbound_cross_border_cny": d("1.00")}
             for i in range(600_000)]
    with pytest.raises(RuleLimitExceeded) as caught:
        run_rule(rule, {"flows": flows, "trade": []}, {"period": P},
                 limits=duck.RuleLimits(memory_mib=16))
    assert f"rule {R4}: its inputs exceed the memory limit 16 MiB" in str(caught.value)


def test_rule_limits_are_checked() -> None:
    for bad in ({"time_s": 0}, {"time_s": -1.0}, {"time_s": "5"}, {"time_s": True},
                {"memory_mib": 1}, {"memory_mib": 1.5}, {"threads": 0}, {"threads": True}):
        with pytest.raises(ValueError):
            duck.RuleLimits(**bad)  # type: ignore[arg-type]


def test_the_jobs_config_reads_rule_limits_and_refuses_bad_ones(tmp_path: Path) -> None:
    from exchange.compare.jobs import JobsConfig

    path = tmp_path / "jobs.toml"
    path.write_text('profile = "p.toml"\n', encoding="utf-8")
    assert JobsConfig.load(path).rule_limits == duck.RuleLimits(
        time_s=duck.TIME_LIMIT_S_DEFAULT, memory_mib=duck.MEMORY_LIMIT_MIB_DEFAULT,
        threads=duck.THREADS_DEFAULT)
    path.write_text('profile = "p.toml"\n[rule_limits]\ntime_s = 5\nmemory_mib = 256\n'
                    'threads = 4\n', encoding="utf-8")
    assert JobsConfig.load(path).rule_limits == duck.RuleLimits(5, 256, 4)
    for bad, message in (("rule_limits = 3", "rule_limits is a table"),
                         ("[rule_limits]\ntime_s = 0", "time_s is a number of seconds"),
                         ("[rule_limits]\nmemory = 5", "unknown key(s) memory"),
                         ("[rule_limits]\nthreads = 1000", "threads is an integer")):
        path.write_text(f'profile = "p.toml"\n{bad}\n', encoding="utf-8")
        with pytest.raises(MalformedInput, match=re.escape(message)):
            JobsConfig.load(path)


def test_output_notes_must_name_returned_columns(tmp_path: Path) -> None:
    text = BASE + "  payments_cny: not returned\n"
    with pytest.raises(RuleError, match="returns no column 'payments_cny'") as caught:
        load_rule(write_rule(tmp_path, text))
    assert caught.value.line == line_of(text, "payments_cny: not returned")


def test_reformatting_a_rule_file_keeps_its_canonical_bytes(tmp_path: Path) -> None:
    original = rule_of(R4)
    reformatted = """\
# the same rule, written otherwise
severity: high   # keys in another order
description: "The company made outbound cross-border payments in the month totalling
  more than 200,000 CNY and no import declaration in the month.   The company need not
  be a taxpayer."
owner: pboc
version: 0x1
id: payments-without-imports
parameters: {period: {type: period}}
queries: [{name: trade, agency: customs, dataset: company_trade, shape: aggregate,
           period: $period, fields: [import_declarations, uscc]}]
own:
- {dataset: company_flows, name: flows, period: $period,
   fields: [outbound_cross_border_cny, uscc]}
sql: "SELECT f.uscc AS subject,\\n       f.outbound_cross_border_cny AS amount\\nFROM flows \\
f\\nLEFT JOIN trade t ON t.uscc = f.uscc\\nWHERE f.outbound_cross_border_cny > 200000\\n  AND \\
COALESCE(t.import_declarations, 0) = 0\\n"
output: {amount: "outbound cross-border payments in the month, CNY",
         subject: "the paying company's uscc"}
"""
    again = load_rule(write_rule(tmp_path, reformatted))
    assert again.canonical_bytes == original.canonical_bytes
    assert again.digest == original.digest and len(again.digest) == 32
    # the canonical bytes are a rule file themselves, and read back to the same rule
    back = load_rule_bytes(original.canonical_bytes, "registered")
    assert back.canonical_bytes == original.canonical_bytes
    # what the rule means changes its digest
    changed = load_rule(write_rule(tmp_path, BASE.replace("> 200000", ">= 200000")))
    assert changed.digest != original.digest
    bumped = load_rule(write_rule(tmp_path, BASE.replace("version: 1", "version: 2")))
    assert bumped.digest != original.digest


def test_every_reference_rule_is_valid_and_owned_where_it_lives() -> None:
    seen = {}
    for agency in agents.AGENCIES:
        for rule in load_rules(agency):
            assert rule.owner == agency
            seen[rule.id] = rule
    assert sorted(seen) == sorted(RULE_IDS)
    false_invoicing = ("invoices-beyond-inflows", "invoice-ring",
                       "invoices-from-abnormal-issuers")
    assert {r.id: r.severity for r in seen.values()} == {
        R1: "high", R2: "high", R3: "high", R4: "high", R5: "medium",
        **dict.fromkeys(false_invoicing, "high")}
    assert not seen[R5].period_bound and all(seen[r].period_bound
                                             for r in (R1, R2, R3, R4, *false_invoicing))
    assert all(seen[r].owner == "tax" for r in false_invoicing)
    for rule in seen.values():  # no rule asks another agency for raw records
        for query in rule.queries:
            assert query.dataset in agents.views_of(query.agency)


# -- the engine ------------------------------------------------------------------------------

def test_output_is_canonical_json_lines() -> None:
    rule = rule_of(R4)
    b, a = uscc(2), uscc(1)
    flows = [{"uscc": b, "outbound_cross_border_cny": d("300000")},
             {"uscc": a, "outbound_cross_border_cny": d("200000.5")}]
    output = run_rule(rule, {"flows": flows, "trade": []}, {"period": P})
    digest = rule.digest_hex
    expected = b"".join(
        (f'{{"amount":"{amount}","period":"{P}","rule_digest":"{digest}",'
         f'"rule_id":"{R4}","severity":"high","subject":"{s}"}}\n').encode()
        for s, amount in ((a, "200000.50"), (b, "300000.00")))
    assert output.canonical_bytes == expected
    assert output.digest == __import__("hashlib").sha256(expected).digest()
    assert output.duckdb_version == duckdb.__version__
    assert len(output.line_digests) == 2
    empty = run_rule(rule, {"flows": [], "trade": []}, {"period": P})
    assert empty.canonical_bytes == b"" and empty.rows == ()


def test_shuffled_inputs_give_the_same_bytes_even_for_order_sensitive_sql(
        tmp_path: Path) -> None:
    sql = ("  SELECT f.uscc AS subject, SUM(f.outbound_cross_border_cny) AS amount,\n"
           "         string_agg(t.uscc, ',') AS seen, list(t.import_declarations)::VARCHAR"
           " AS counts\n"
           "  FROM flows f, trade t GROUP BY f.uscc\n")
    start = BASE.index("sql: |")
    text = BASE[:start] + "sql: |\n" + sql
    rule = load_rule(write_rule(tmp_path, text))
    flows = [{"uscc": uscc(i % 3), "outbound_cross_border_cny": d(f"{i}.{i % 100:02d}")}
             for i in range(200)]
    trade = [{"uscc": uscc(i), "import_declarations": i % 7} for i in range(40)]
    digests = set()
    for seed in range(6):
        rng = random.Random(seed)
        shuffled = {"flows": rng.sample(flows, len(flows)), "trade": rng.sample(trade, 40)}
        for loader in ("lists", "arrow") if duck.pyarrow_available() else ("lists",):
            digests.add(run_rule(rule, shuffled, {"period": P}, loader=loader).digest)
    assert len(digests) == 1


def test_inputs_are_checked_against_the_declared_columns() -> None:
    rule = rule_of(R4)
    good = {"uscc": uscc(1), "outbound_cross_border_cny": d("1.00")}
    cases: list[tuple[dict[str, Rows], str]] = [
        ({"flows": [good]}, "missing trade"),
        ({"flows": [good], "trade": [], "extra": []}, "unknown extra"),
        ({"flows": [{"uscc": uscc(1)}], "trade": []}, "has columns"),
        ({"flows": [{**good, "outbound_cross_border_cny": 1.0}], "trade": []},
         "is not a Decimal"),
        ({"flows": [{**good, "outbound_cross_border_cny": Decimal("1.001")}], "trade": []},
         "at most two decimals"),
        ({"flows": [{**good, "outbound_cross_border_cny": Decimal("1e16")}], "trade": []},
         "within DECIMAL(18,2)"),
        ({"flows": [good], "trade": [{"uscc": uscc(1), "import_declarations": "1"}]},
         "is not an integer"),
        ({"flows": [{**good, "uscc": None}], "trade": []}, "is not text"),
    ]
    for inputs, message in cases:
        with pytest.raises(MalformedInput, match=re.escape(message)):
            run_rule(rule, inputs, {"period": P})
    with pytest.raises(RuleError, match="needs parameter period"):
        run_rule(rule, {"flows": [], "trade": []}, {})
    with pytest.raises(RuleError, match="not a period"):
        run_rule(rule, {"flows": [], "trade": []}, {"period": "2026-9"})


def test_a_rule_whose_sql_fails_at_run_time_names_file_and_line(tmp_path: Path) -> None:
    sql = ("  SELECT uscc AS subject,\n"
           "         CAST(outbound_cross_border_cny * 1000000 AS DECIMAL(18,2)) AS amount\n"
           "  FROM flows\n")
    start = BASE.index("sql: |")
    text = BASE[:start] + "sql: |\n" + sql
    path = write_rule(tmp_path, text)
    rule = load_rule(path)
    flows = [{"uscc": uscc(1), "outbound_cross_border_cny": d("99999999999.00")}]
    with pytest.raises(RuleError) as caught:
        run_rule(rule, {"flows": flows, "trade": []}, {"period": P})
    assert str(path) in str(caught.value)
    duplicate = BASE[:start] + ("sql: |\n  SELECT 'same' AS subject, outbound_cross_border_cny"
                                " AS amount FROM flows\n")
    rule = load_rule(write_rule(tmp_path, duplicate))
    two = [{"uscc": uscc(1), "outbound_cross_border_cny": d("1")},
           {"uscc": uscc(2), "outbound_cross_border_cny": d("2")}]
    with pytest.raises(RuleError, match="appears twice"):
        run_rule(rule, {"flows": two, "trade": []}, {"period": P})


# -- the sandbox itself ------------------------------------------------------------------
# Each escape runs straight against the locked-down session (no rule file, so no SQL
# check): each test fails if its part of the lock-down (duck.CONNECT_CONFIG, duck.lock)
# is removed, because the statement would then succeed or fail for another reason.

FS_DISABLED = "file system operations are disabled by configuration"


@pytest.fixture(params=["in-memory", "streamed"])
def session(request: pytest.FixtureRequest, tmp_path: Path
            ) -> Iterator[duckdb.DuckDBPyConnection]:
    """A rule's session as the engine makes it: one input table, then locked. Both ways:
    from rows in memory (external access off from the start), and as a streamed run makes
    it (external access on while it reads its own spool file, then locked)."""
    limits = duck.RuleLimits(memory_mib=32)
    streamed = request.param == "streamed"
    con = duck.connect_for_loading(duck.RuleLimits(memory_mib=256)) if streamed \
        else duck.connect(limits)
    try:
        if streamed:  # the JSON reader's buffers need more than the tests' small limit
            spool = tmp_path / "flows.jsonl"
            spool.write_text('{"uscc":"x"}\n', encoding="utf-8")
            con.execute(f"CREATE TABLE flows AS SELECT uscc FROM read_json('{spool}', "
                        "columns = {'uscc': 'VARCHAR'})")
            con.execute(f"SET memory_limit = '{limits.memory_mib}MiB'")
        else:
            duck.create_table(con, "flows", (duck.Column("uscc", duck.VARCHAR),),
                              [{"uscc": "x"}])
        duck.lock(con)
        assert con.execute("SELECT * FROM flows").fetchall() == [("x",)]
        yield con
    finally:
        con.close()


def _refused(con: duckdb.DuckDBPyConnection, statement: str,
             error: type[duckdb.Error], message: str) -> None:
    with pytest.raises(duckdb.Error) as caught:
        con.execute(statement).fetchall()
    assert isinstance(caught.value, error) and message in str(caught.value), \
        f"{statement}: {type(caught.value).__name__}: {caught.value}"


def test_the_sandbox_refuses_reading_a_file(session: duckdb.DuckDBPyConnection,
                                            tmp_path: Path) -> None:
    secret = tmp_path / "secret.csv"
    secret.write_text("a\n1\n", encoding="utf-8")
    for statement in (f"SELECT * FROM read_csv('{secret}')", f"SELECT * FROM '{secret}'",
                      f"SELECT * FROM read_text('{secret}')", f"SELECT * FROM glob('{tmp_path}/*')"):
        _refused(session, statement, duckdb.PermissionException, FS_DISABLED)


def test_the_sandbox_refuses_writing_a_file(session: duckdb.DuckDBPyConnection,
                                            tmp_path: Path) -> None:
    out = tmp_path / "out.csv"
    _refused(session, f"COPY flows TO '{out}'", duckdb.PermissionException, FS_DISABLED)
    assert not out.exists()


def test_the_sandbox_refuses_installing_or_loading_an_extension(
        session: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    fake = tmp_path / "evil.duckdb_extension"
    fake.write_bytes(b"\x7fELF" + bytes(4096))
    _refused(session, "INSTALL httpfs", duckdb.PermissionException, FS_DISABLED)
    _refused(session, f"INSTALL '{fake}'", duckdb.PermissionException, FS_DISABLED)
    _refused(session, f"LOAD '{fake}'", duckdb.PermissionException,
             "Loading external extensions is disabled through configuration")
    _refused(session, "LOAD httpfs", duckdb.PermissionException,
             "Loading external extensions is disabled through configuration")


def test_the_sandbox_refuses_the_network(session: duckdb.DuckDBPyConnection) -> None:
    # without the lock-down DuckDB would try to auto-install httpfs instead
    for url in ("https://example.com/x.csv", "http://127.0.0.1:9/x.parquet",
                "s3://bucket/x.parquet"):
        _refused(session, f"SELECT * FROM '{url}'", duckdb.PermissionException, FS_DISABLED)
        _refused(session, f"SELECT * FROM read_csv('{url}')", duckdb.PermissionException,
                 FS_DISABLED)


def test_the_sandbox_refuses_attaching_a_database(session: duckdb.DuckDBPyConnection,
                                                  tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    duckdb.connect(str(other)).close()
    _refused(session, f"ATTACH '{other}' AS other", duckdb.PermissionException, FS_DISABLED)
    _refused(session, f"ATTACH '{tmp_path / 'new.db'}' AS new", duckdb.PermissionException,
             FS_DISABLED)
    assert not (tmp_path / "new.db").exists()


def test_the_sandbox_settings_cannot_be_changed_back(
        session: duckdb.DuckDBPyConnection) -> None:
    for setting in ("enable_external_access = true", "lock_configuration = false",
                    "autoload_known_extensions = true", "autoinstall_known_extensions = true",
                    "python_enable_replacements = true", "temp_directory = '/tmp'",
                    "memory_limit = '64GiB'", "threads = 64"):
        _refused(session, f"SET {setting}", duckdb.InvalidInputException,
                 "the configuration has been locked")


def test_the_sandbox_reads_no_python_variable(session: duckdb.DuckDBPyConnection) -> None:
    # DuckDB's Python replacement scan looks names up in the frame that calls execute
    secret_relation = session.sql("SELECT 'leaked' AS a")
    assert secret_relation is not None
    with pytest.raises(duckdb.CatalogException, match="secret_relation does not exist"):
        session.execute("SELECT * FROM secret_relation").fetchall()


def test_the_sandbox_keeps_its_second_walls(session: duckdb.DuckDBPyConnection) -> None:
    # each is behind disabled external access (which alone already refuses extension
    # auto-install and auto-load and Python replacement scans), and so not reachable by
    # an escape of its own: a second wall should the first one fall
    for name in ("autoinstall_known_extensions", "autoload_known_extensions",
                 "python_enable_replacements"):
        assert session.execute(f"SELECT current_setting('{name}')").fetchone() == (False,)


def test_the_sandbox_spills_nothing_to_disk(session: duckdb.DuckDBPyConnection) -> None:
    # over the 32 MiB memory limit a sort would otherwise spill to a temporary directory
    _refused(session, "SELECT count(*) FROM (SELECT range::VARCHAR || 'x' AS s "
             "FROM range(3000000) ORDER BY s DESC)", duckdb.OutOfMemoryException,
             "no temporary directory is specified")


@pytest.mark.parametrize("statement", [
    "SELECT * FROM read_csv('/etc/passwd')", "COPY (SELECT 1) TO '/tmp/x.csv'",
    "INSTALL httpfs", "ATTACH '/tmp/x.db' AS x", "PRAGMA version",
])
def test_a_rule_cannot_reach_outside_its_inputs(tmp_path: Path, statement: str) -> None:
    start = BASE.index("sql: |")
    text = BASE[:start] + f"sql: |\n  {statement}\n"
    with pytest.raises(RuleError):
        load_rule(write_rule(tmp_path, text))


def test_empty_inputs_still_get_typed_tables(tmp_path: Path) -> None:
    start = BASE.index("sql: |")
    text = BASE[:start] + ("sql: |\n  SELECT 'x' AS subject, SUM(outbound_cross_border_cny)"
                           " AS amount, typeof(SUM(outbound_cross_border_cny)) AS t,\n"
                           "    (SELECT typeof(any_value(import_declarations)) FROM trade) AS n"
                           "\n  FROM flows\n")
    rule = load_rule(write_rule(tmp_path, text))
    rows = [{"uscc": uscc(1), "outbound_cross_border_cny": d("1.00")}]
    (row,) = run_rule(rule, {"flows": rows, "trade": []}, {"period": P}).rows
    assert row["t"] == "DECIMAL(38,2)" and row["n"] == "BIGINT"


def test_reference_rule_copies_remain_loadable_elsewhere(tmp_path: Path) -> None:
    """load_rules reads a folder of rule files; a copied rule keeps its digest."""
    folder = tmp_path / "rules"
    folder.mkdir()
    for path in rules_dir("tax").glob("*.yaml"):
        shutil.copy(path, folder / path.name)
    copied = {r.id: r.digest for r in load_rules("tax", folder)}
    assert copied == {r.id: r.digest for r in load_rules("tax")}
    with pytest.raises(RuleError, match="owned by tax"):
        load_rules("pboc", folder)
