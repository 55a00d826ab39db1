"""The lookup a node runs to answer a query (agents.lookup), on generated sample data
loaded into SQLite stores, against expectations computed here from the CSV files (not
from the store's SQL): subjects by key and by kind, subject sets, periods, fields,
order, the row limit, every refusal, and the request's JSON form."""

from __future__ import annotations

import csv
import json
import random
import sqlite3
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agents
from agents import lookup as lk
from agents.catalog import catalog_entries
from agents.common import checks
from agents.common.store import SqliteAgencyStore
from agents.generate import FILES, GeneratorConfig, generate
from agents.lookup import LookupRefused, LookupRequest
from exchange.errors import ExchangeError, MalformedInput
from exchange.ledger.sealing import canonical_json

CONFIG = GeneratorConfig(seed=20260917, companies=300)
PERIODS = CONFIG.periods
BIG_LIMIT = 1_000_000

AGENCY_OF = {name: agency for agency, files in FILES.items() for name in files}
AGENCY_OF.update(company_flows="pboc", company_trade="customs", active_legal_reps="tax")

# Written out by hand from DATA_CONTRACT.md, independently of the schemas: what each
# subject key matches, as (column, the holder_kind it requires or None).
SUBJECT_COLUMNS: dict[str, dict[str, list[tuple[str, str | None]]]] = {
    "taxpayers": {"uscc": [("uscc", None)], "legal_rep_id": [("legal_rep_id", None)],
                  "person_id": [("legal_rep_id", None)]},
    "vat_invoices": {"invoice_no": [("invoice_no", None)],
                     "issuer_uscc": [("issuer_uscc", None)],
                     "buyer_uscc": [("buyer_uscc", None)],
                     "uscc": [("issuer_uscc", None), ("buyer_uscc", None)]},
    "revenue_declarations": {"uscc": [("uscc", None)], "period": [("period", None)]},
    "export_rebates": {"claim_no": [("claim_no", None)], "uscc": [("uscc", None)]},
    "declarations": {"decl_no": [("decl_no", None)], "uscc": [("uscc", None)]},
    "accounts": {"account_no": [("account_no", None)], "holder_id": [("holder_id", None)],
                 "uscc": [("holder_id", "company")], "person_id": [("holder_id", "person")]},
    "transactions": {"txn_id": [("txn_id", None)], "account_no": [("account_no", None)]},
    "persons": {"person_id": [("person_id", None)]},
    "records": {"record_id": [("record_id", None)], "person_id": [("person_id", None)]},
}
KEYS = {"taxpayers": ("uscc",), "vat_invoices": ("invoice_no",),
        "revenue_declarations": ("uscc", "period"), "export_rebates": ("claim_no",),
        "declarations": ("decl_no",), "accounts": ("account_no",),
        "transactions": ("txn_id",), "persons": ("person_id",), "records": ("record_id",)}
# The column a month filters on ("period": equal to P; a date: inside P).
MONTH_COLUMN = {"taxpayers": "registered_on", "vat_invoices": "issued_on",
                "revenue_declarations": "period", "export_rebates": "period",
                "declarations": "declared_on", "accounts": "opened_on",
                "transactions": "booked_on", "persons": None, "records": "recorded_on"}
VIEW_SUBJECTS = {"company_flows": {"uscc": ["uscc"]},
                 "company_trade": {"uscc": ["uscc"]},
                 "active_legal_reps": {"uscc": ["uscc"], "legal_rep_id": ["legal_rep_id"],
                                       "person_id": ["legal_rep_id"]}}

Row = dict[str, object]


@dataclass
class Sample:
    folder: Path
    stores: dict[str, SqliteAgencyStore]
    csv_rows: dict[str, list[dict[str, str]]]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sample]:
    root = tmp_path_factory.mktemp("lookup")
    generate(CONFIG, root / "data")
    stores = {}
    csv_rows = {}
    for agency in agents.AGENCIES:
        store = agents.open_store(agency, root / f"{agency}.db")
        agents.load_dataset_dir(agency, root / "data" / agency, store)
        stores[agency] = store
        for name in FILES[agency]:
            with (root / "data" / agency / f"{name}.csv").open(encoding="utf-8",
                                                               newline="") as f:
                csv_rows[name] = list(csv.DictReader(f))
    yield Sample(root / "data", stores, csv_rows)
    for store in stores.values():
        store.close()


def run(sample: Sample, request: LookupRequest, row_limit: int = BIG_LIMIT) -> list[Row]:
    rows = lk.lookup(sample.stores[AGENCY_OF[request.dataset]], request, row_limit)
    canonical_json(rows)  # every answer must be sealable
    return rows


def refusal(sample: Sample, agency: str, request: LookupRequest,
            row_limit: int = BIG_LIMIT) -> LookupRefused:
    with pytest.raises(LookupRefused) as caught:
        lk.lookup(sample.stores[agency], request, row_limit)
    return caught.value


def assert_same(actual: list[Row], expected: list[Row]) -> None:
    assert actual == expected
    # equal Decimals may differ in places: the sealed bytes must not
    assert canonical_json(actual) == canonical_json(expected)


# -- expectations from the CSV files ----------------------------------------------------

def typed(column: str, text: str) -> object:
    if column.endswith("_cny"):
        return Decimal(text).quantize(Decimal("0.01"))
    if column == "cross_border":
        return int(text)
    if column == "case_no" and text == "":
        return None
    return text


def expected_rows(sample: Sample, dataset: str, subjects: list[tuple[str, str]],
                  period: str | None = None, fields: tuple[str, ...] = ()) -> list[Row]:
    def matches(row: dict[str, str]) -> bool:
        for key, value in subjects:
            for column, holder_kind in SUBJECT_COLUMNS[dataset][key]:
                if row[column] == value and holder_kind in (None, row.get("holder_kind")):
                    return True
        return False

    def in_month(row: dict[str, str]) -> bool:
        if period is None:
            return True
        column = MONTH_COLUMN[dataset]
        assert column is not None
        return row[column] == period if column == "period" else row[column][:7] == period

    rows = [r for r in sample.csv_rows[dataset] if matches(r) and in_month(r)]
    rows.sort(key=lambda r: tuple(r[k] for k in KEYS[dataset]))
    columns = fields or tuple(sample.csv_rows[dataset][0])
    return [{c: typed(c, r[c]) for c in columns} for r in rows]


def values_of(sample: Sample, dataset: str, key: str) -> list[str]:
    """Every value the key has in the dataset, sorted."""
    found = set()
    for row in sample.csv_rows[dataset]:
        for column, holder_kind in SUBJECT_COLUMNS[dataset][key]:
            if holder_kind in (None, row.get("holder_kind")):
                found.add(row[column])
    return sorted(found)


def expected_view(sample: Sample, view: str, period: str | None) -> list[Row]:
    cny = Decimal("0.01")
    if view == "active_legal_reps":
        return sorted(({"uscc": r["uscc"], "legal_rep_id": r["legal_rep_id"]}
                       for r in sample.csv_rows["taxpayers"] if r["status"] == "active"),
                      key=lambda r: (r["uscc"], r["legal_rep_id"]))
    assert period is not None
    if view == "company_trade":
        trade: dict[str, list[Decimal | int]] = defaultdict(lambda: [Decimal(0),
                                                                     Decimal(0), 0])
        for r in sample.csv_rows["declarations"]:
            if r["declared_on"][:7] == period:
                sums = trade[r["uscc"]]
                value = Decimal(r["declared_value_cny"])
                if r["direction"] == "export":
                    sums[0] += value
                else:
                    sums[1] += value
                    sums[2] += 1
        return [{"uscc": u, "period": period, "export_value_cny": Decimal(e).quantize(cny),
                 "import_value_cny": Decimal(i).quantize(cny), "import_declarations": n}
                for u, (e, i, n) in sorted(trade.items())]
    assert view == "company_flows"
    company_of = {a["account_no"]: a["holder_id"] for a in sample.csv_rows["accounts"]
                  if a["holder_kind"] == "company"}
    flows: dict[str, list[Decimal]] = {}
    for t in sample.csv_rows["transactions"]:
        holder = company_of.get(t["account_no"])
        if holder is None or t["booked_on"][:7] != period:
            continue
        sums = flows.setdefault(holder, [Decimal(0), Decimal(0)])
        amount = Decimal(t["amount_cny"])
        if t["direction"] == "in" and company_of.get(t["counterparty_account"]) != holder:
            sums[0] += amount
        if t["direction"] == "out" and t["cross_border"] == "1":
            sums[1] += amount
    return [{"uscc": u, "period": period, "inflows_cny": i.quantize(cny),
             "outbound_cross_border_cny": o.quantize(cny)}
            for u, (i, o) in sorted(flows.items())]


def absent_uscc() -> str:
    body = "91440300" + "000000001"
    return body + checks.uscc_check_char(body)


def absent_person_id() -> str:
    body = "11010119000101999"
    return body + checks.person_id_check_char(body)


def some(values: list[str], n: int, seed: str) -> list[str]:
    return random.Random(seed).sample(values, min(n, len(values)))


DATASET_KEYS = [(d, k) for d, keys in SUBJECT_COLUMNS.items() for k in keys]


# -- the catalog and the store ------------------------------------------------------------

def test_lookup_keys_are_the_catalogs() -> None:
    for agency in agents.AGENCIES:
        published = {e.dataset: list(e.lookup_keys) for e in catalog_entries(agency)}
        for dataset in agents.datasets_of(agency):
            assert list(lk.lookup_keys(dataset)) == published[dataset.name]
            kinds = {k for k in SUBJECT_COLUMNS[dataset.name] if k in lk.SUBJECT_KINDS}
            assert set(published[dataset.name]) | kinds == set(SUBJECT_COLUMNS[dataset.name])


class RecordingStore:
    """The store, remembering each statement and how many rows it returned."""

    def __init__(self, store: SqliteAgencyStore) -> None:
        self.store = store
        self.statements: list[tuple[str, Mapping[str, object], int]] = []

    @property
    def agency(self) -> str:
        return self.store.agency

    def fetch(self, sql: str, params: Mapping[str, object]) -> list[tuple[object, ...]]:
        rows = self.store.fetch(sql, params)
        self.statements.append((sql, dict(params), len(rows)))
        return rows


@pytest.mark.parametrize("dataset,key", DATASET_KEYS)
def test_every_subject_lookup_uses_an_index(sample: Sample, dataset: str, key: str) -> None:
    store = sample.stores[AGENCY_OF[dataset]]
    value = values_of(sample, dataset, key)[0]
    periods = [None] if MONTH_COLUMN[dataset] is None else [None, PERIODS[-1]]
    db = sqlite3.connect(store.path)
    try:
        for period in periods:
            recording = RecordingStore(store)
            request = LookupRequest(dataset, ((key, value),), period)
            lk.lookup(recording, request, BIG_LIMIT)  # type: ignore[arg-type]
            assert recording.statements
            for sql, params, _n in recording.statements:
                plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
                assert not [p for p in plan if p.startswith("SCAN")], (sql, plan)
    finally:
        db.close()


# -- subjects -----------------------------------------------------------------------------

@pytest.mark.parametrize("dataset,key", DATASET_KEYS)
def test_subject_lookup_by_each_key_matches_the_csv(sample: Sample, dataset: str,
                                                    key: str) -> None:
    for value in some(values_of(sample, dataset, key), 4, f"{dataset}/{key}"):
        rows = run(sample, LookupRequest(dataset, ((key, value),)))
        assert rows, (dataset, key, value)
        assert_same(rows, expected_rows(sample, dataset, [(key, value)]))


def test_uscc_matches_issuer_or_buyer_of_an_invoice(sample: Sample) -> None:
    invoices = sample.csv_rows["vat_invoices"]
    buyers = {r["buyer_uscc"] for r in invoices}
    issuers = {r["issuer_uscc"] for r in invoices}
    both = sorted(buyers & issuers)
    assert both
    u = both[0]
    rows = run(sample, LookupRequest("vat_invoices", (("uscc", u),)))
    assert {r["issuer_uscc"] for r in rows} >= {u} and any(r["buyer_uscc"] == u for r in rows)
    assert all(u in (r["issuer_uscc"], r["buyer_uscc"]) for r in rows)
    as_issuer = run(sample, LookupRequest("vat_invoices", (("issuer_uscc", u),)))
    as_buyer = run(sample, LookupRequest("vat_invoices", (("buyer_uscc", u),)))
    by_number = {r["invoice_no"]: r for r in as_issuer + as_buyer}
    assert_same(rows, [by_number[n] for n in sorted(by_number)])


def test_accounts_by_kind_match_the_holder_kind(sample: Sample) -> None:
    accounts = sample.csv_rows["accounts"]
    person = next(a["holder_id"] for a in accounts
                  if a["holder_kind"] == "person" and not checks.is_valid_uscc(a["holder_id"]))
    company = next(a["holder_id"] for a in accounts if a["holder_kind"] == "company")
    rows = run(sample, LookupRequest("accounts", (("person_id", person),)))
    assert rows and all(r["holder_kind"] == "person" for r in rows)
    rows = run(sample, LookupRequest("accounts", (("uscc", company),)))
    assert rows and all(r["holder_kind"] == "company" for r in rows)
    # a person_id asked as a uscc is a bad subject, not an empty answer
    e = refusal(sample, "pboc", LookupRequest("accounts", (("uscc", person),)))
    assert e.code == "BAD_SUBJECT" and person in str(e)


def test_absent_subject_gives_no_rows(sample: Sample) -> None:
    assert run(sample, LookupRequest("taxpayers", (("uscc", absent_uscc()),))) == []
    assert run(sample, LookupRequest("records", (("person_id", absent_person_id()),))) == []
    assert run(sample, LookupRequest("transactions", (("txn_id", "T-none"),))) == []


@pytest.mark.parametrize("dataset", sorted(SUBJECT_COLUMNS))
def test_subject_set_of_mixed_keys_matches_the_csv(sample: Sample, dataset: str) -> None:
    subjects = []
    for key in SUBJECT_COLUMNS[dataset]:
        subjects += [(key, v) for v in some(values_of(sample, dataset, key), 7, key)]
    subjects += subjects[:3]  # a subject named twice counts once
    rows = run(sample, LookupRequest(dataset, tuple(subjects)))
    assert_same(rows, expected_rows(sample, dataset, subjects))
    keys = [tuple(r[k] for k in KEYS[dataset]) for r in rows]
    assert keys == sorted(set(keys))


def test_subject_set_larger_than_one_statement(sample: Sample) -> None:
    # every uscc, matched against issuer and buyer: several statements whose rows overlap
    usccs = values_of(sample, "vat_invoices", "uscc")
    numbers = values_of(sample, "vat_invoices", "invoice_no")[:1200]
    assert len(usccs) * 2 > lk.PARAMETERS_PER_STATEMENT_MAX
    subjects = [("uscc", u) for u in usccs] + [("invoice_no", n) for n in numbers]
    recording = RecordingStore(sample.stores["tax"])
    request = LookupRequest("vat_invoices", tuple(subjects), PERIODS[1])
    rows = lk.lookup(recording, request, BIG_LIMIT)  # type: ignore[arg-type]
    assert len(recording.statements) >= 4
    assert all(len(params) <= lk.PARAMETERS_PER_STATEMENT_MAX
               for _sql, params, _n in recording.statements)
    assert_same(rows, expected_rows(sample, "vat_invoices", subjects, PERIODS[1]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_subject_set_matches_the_csv(sample: Sample, data: st.DataObject) -> None:
    dataset = data.draw(st.sampled_from(sorted(SUBJECT_COLUMNS)))
    universe = {k: values_of(sample, dataset, k) for k in sorted(SUBJECT_COLUMNS[dataset])}
    subjects = data.draw(st.lists(
        st.sampled_from(sorted(universe)).flatmap(
            lambda k: st.tuples(st.just(k), st.sampled_from(universe[k]))),
        min_size=1, max_size=12))
    month = MONTH_COLUMN[dataset]
    period = data.draw(st.sampled_from([None, *PERIODS]) if month else st.none())
    columns = list(sample.csv_rows[dataset][0])
    fields = tuple(data.draw(st.lists(st.sampled_from(columns), unique=True)))
    request = LookupRequest(dataset, tuple(subjects), period, fields)
    assert_same(run(sample, request), expected_rows(sample, dataset, subjects, period, fields))


# -- periods and fields -----------------------------------------------------------------

@pytest.mark.parametrize("dataset", [d for d, c in MONTH_COLUMN.items() if c])
def test_period_keeps_the_rows_of_that_month(sample: Sample, dataset: str) -> None:
    key = "uscc" if "uscc" in SUBJECT_COLUMNS[dataset] else \
        "person_id" if "person_id" in SUBJECT_COLUMNS[dataset] else KEYS[dataset][0]
    values = some(values_of(sample, dataset, key), 40, dataset)
    subjects = [(key, v) for v in values]
    total = 0
    for period in (*PERIODS, "2026-12", "1999-01"):
        rows = run(sample, LookupRequest(dataset, tuple(subjects), period))
        assert_same(rows, expected_rows(sample, dataset, subjects, period))
        total += len(rows)
    if dataset not in ("taxpayers", "accounts", "records"):  # dated before the sample
        assert total == len(expected_rows(sample, dataset, subjects))


def test_period_bounds_are_the_calendar_month(sample: Sample) -> None:
    txns = sample.csv_rows["transactions"]
    last = max(t["booked_on"] for t in txns)
    t = next(t for t in txns if t["booked_on"] == last)
    subject = (("txn_id", t["txn_id"]),)
    assert run(sample, LookupRequest("transactions", subject, last[:7]))
    assert run(sample, LookupRequest("transactions", subject,
                                     checks.shift_period(last[:7], 1))) == []


def test_fields_select_columns_under_contract_names(sample: Sample) -> None:
    txn = sample.csv_rows["transactions"][5]
    rows = run(sample, LookupRequest("transactions", (("txn_id", txn["txn_id"]),),
                                     fields=("amount_cny", "cross_border")))
    assert rows == [{"amount_cny": Decimal(txn["amount_cny"]),
                     "cross_border": int(txn["cross_border"])}]
    amount = rows[0]["amount_cny"]
    assert isinstance(amount, Decimal) and amount.as_tuple().exponent == -2
    everything = run(sample, LookupRequest("transactions", (("txn_id", txn["txn_id"]),)))
    assert list(everything[0]) == list(txn)


def test_records_without_case_number_give_null(sample: Sample) -> None:
    rows = run(sample, LookupRequest("records", tuple(
        ("record_id", r["record_id"]) for r in sample.csv_rows["records"])))
    assert {r["case_no"] is None for r in rows} == \
        {r["case_no"] == "" for r in sample.csv_rows["records"]}


# -- views ----------------------------------------------------------------------------

@pytest.mark.parametrize("view", sorted(VIEW_SUBJECTS))
def test_view_period_wide_matches_the_csv(sample: Sample, view: str) -> None:
    periods = [None] if view == "active_legal_reps" else PERIODS
    for period in periods:
        expected = expected_view(sample, view, period)
        assert expected
        assert_same(run(sample, LookupRequest(view, period=period)), expected)


@pytest.mark.parametrize("view", sorted(VIEW_SUBJECTS))
def test_view_by_subjects_and_fields(sample: Sample, view: str) -> None:
    period = None if view == "active_legal_reps" else PERIODS[-1]
    everything = expected_view(sample, view, period)
    for key, columns in VIEW_SUBJECTS[view].items():
        values = sorted({str(r[columns[0]]) for r in everything})
        chosen = some(values, 5, view + key) + [
            absent_person_id() if key != "uscc" else absent_uscc()]
        subjects = tuple((key, v) for v in chosen)
        expected = [r for r in everything if any(r[c] in chosen for c in columns)]
        assert expected
        assert_same(run(sample, LookupRequest(view, subjects, period)), expected)
        fields = tuple(everything[0])[-1:]
        assert_same(run(sample, LookupRequest(view, subjects, period, fields)),
                    [{f: r[f] for f in fields} for r in expected])


# -- views computed for their subjects only ----------------------------------------------

VIEW_PERIODS = {"company_flows": PERIODS, "company_trade": PERIODS,
                "active_legal_reps": [None]}
# The index each subject column of a view is read through: (table alias, stored column).
VIEW_SUBJECT_INDEXES = {("company_flows", "uscc"): ("a", "holder_id"),
                        ("company_trade", "uscc"): ("declarations", "uscc"),
                        ("active_legal_reps", "uscc"): ("taxpayers", "uscc"),
                        ("active_legal_reps", "legal_rep_id"): ("taxpayers", "legal_rep_id")}


def view_of(name: str) -> agents.View[object]:
    return agents.views_of(AGENCY_OF[name])[name]


def exact(rows: object) -> str:
    """The rows with every Decimal's places (equal Decimals may differ in them)."""
    return repr(rows)


def whole_then_filtered(sample: Sample, name: str, period: str | None,
                        subjects: Mapping[str, list[str]]) -> list[object]:
    rows = view_of(name).rows(sample.stores[AGENCY_OF[name]], period)
    return [r for r in rows if any(getattr(r, c) in vs for c, vs in subjects.items())]


def view_subject_values(sample: Sample, column: str) -> list[str]:
    """Values a view subject column could be asked for, sorted: those of every taxpayer,
    declarant and account-holding company (so some without a row in a given month or
    view)."""
    if column == "legal_rep_id":
        return sorted({r["legal_rep_id"] for r in sample.csv_rows["taxpayers"]})
    assert column == "uscc", column
    return sorted({r["uscc"] for r in sample.csv_rows["taxpayers"]}
                  | {r["uscc"] for r in sample.csv_rows["declarations"]}
                  | {r["holder_id"] for r in sample.csv_rows["accounts"]
                     if r["holder_kind"] == "company"})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_view_for_subjects_is_the_whole_view_filtered(sample: Sample,
                                                      data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(VIEW_SUBJECTS)))
    view = view_of(name)
    period = data.draw(st.sampled_from(VIEW_PERIODS[name]))
    columns = data.draw(st.lists(st.sampled_from(view.subject_columns), min_size=1,
                                 unique=True))
    subjects = {}
    for column in columns:
        universe = view_subject_values(sample, column)
        absent = absent_uscc() if column == "uscc" else absent_person_id()
        subjects[column] = data.draw(st.lists(st.sampled_from([*universe, absent]),
                                              max_size=30))
    filtered = view.rows(sample.stores[AGENCY_OF[name]], period, subjects)
    expected = whole_then_filtered(sample, name, period, subjects)
    assert exact(filtered) == exact(expected)


@pytest.mark.parametrize("name", sorted(VIEW_SUBJECTS))
def test_view_for_a_seeded_subject_sample_is_the_whole_view_filtered(
        sample: Sample, name: str) -> None:
    view = view_of(name)
    rng = random.Random(f"view-subjects/{name}")
    for period in VIEW_PERIODS[name]:
        for column in view.subject_columns:
            universe = view_subject_values(sample, column)
            for size in (1, 2, 17, len(universe) // 3, len(universe)):
                subjects = {column: rng.sample(universe, size)}
                expected = whole_then_filtered(sample, name, period, subjects)
                filtered = view.rows(sample.stores[AGENCY_OF[name]], period, subjects)
                assert exact(filtered) == exact(expected), (period, column, size)
            if len(view.subject_columns) > 1:  # a row matched on two columns comes once
                everything = view.rows(sample.stores[AGENCY_OF[name]], period)
                both = {c: [str(getattr(r, c)) for r in everything[:20]]
                        for c in view.subject_columns}
                rows = view.rows(sample.stores[AGENCY_OF[name]], period, both)
                assert exact(rows) == exact(whole_then_filtered(sample, name, period, both))
                assert len(set(rows)) == len(rows) and set(everything[:20]) <= set(rows)


@pytest.mark.parametrize("name", sorted(VIEW_SUBJECTS))
def test_view_for_more_subjects_than_one_statement_holds(sample: Sample,
                                                         name: str) -> None:
    view = view_of(name)
    column = view.subject_columns[0]
    universe = view_subject_values(sample, column)
    body = "91440300"
    padding = [f"{body}{i:09d}" for i in range(1, 2 * lk.PARAMETERS_PER_STATEMENT_MAX)]
    padding = [p + checks.uscc_check_char(p) for p in padding]
    subjects = {column: [*universe, *padding, *universe[:50]]}  # some named twice
    period = VIEW_PERIODS[name][-1]
    recording = RecordingStore(sample.stores[AGENCY_OF[name]])
    rows = view.rows(recording, period, subjects)  # type: ignore[arg-type]
    assert len(recording.statements) >= 3
    assert all(len(params) <= lk.PARAMETERS_PER_STATEMENT_MAX
               for _sql, params, _n in recording.statements)
    expected = view.rows(sample.stores[AGENCY_OF[name]], period)
    assert exact(rows) == exact(expected)


def test_company_flows_for_one_company_still_excludes_its_own_accounts(
        sample: Sample) -> None:
    company_of = {a["account_no"]: a["holder_id"] for a in sample.csv_rows["accounts"]
                  if a["holder_kind"] == "company"}
    internal = [(company_of[t["account_no"]], t["booked_on"][:7])
                for t in sample.csv_rows["transactions"]
                if t["direction"] == "in" and t["account_no"] in company_of
                and company_of.get(t["counterparty_account"]) == company_of[t["account_no"]]]
    assert internal, "the sample has no transfer between a company's own accounts"
    for uscc, period in sorted(set(internal))[:10]:
        rows = view_of("company_flows").rows(sample.stores["pboc"], period,
                                            {"uscc": [uscc]})
        expected = [{"uscc": r.uscc, "period": r.period, "inflows_cny": r.inflows_cny,
                     "outbound_cross_border_cny": r.outbound_cross_border_cny}
                    for r in rows]
        assert_same(expected, [r for r in expected_view(sample, "company_flows", period)
                               if r["uscc"] == uscc])


def test_view_subject_filter_edges(sample: Sample) -> None:
    view = view_of("active_legal_reps")
    store = sample.stores["tax"]
    assert view.rows(store, None, {}) == []
    assert view.rows(store, None, {"uscc": []}) == []
    with pytest.raises(ValueError, match="status"):
        view.rows(store, None, {"status": ["active"]})
    with pytest.raises(TypeError):
        view.rows(store, None, {"uscc": absent_uscc()})  # a string, not a collection


@pytest.mark.parametrize("name,column", sorted(VIEW_SUBJECT_INDEXES))
def test_view_lookup_for_subjects_reads_the_subjects_by_index(
        sample: Sample, name: str, column: str) -> None:
    table, stored = VIEW_SUBJECT_INDEXES[(name, column)]
    key = "person_id" if column == "legal_rep_id" else column
    store = sample.stores[AGENCY_OF[name]]
    values = view_subject_values(sample, column)
    db = sqlite3.connect(store.path)
    try:
        for subjects in (values[:1], values[:lk.PARAMETERS_PER_STATEMENT_MAX + 1]):
            recording = RecordingStore(store)
            request = LookupRequest(name, tuple((key, v) for v in subjects),
                                    VIEW_PERIODS[name][-1])
            lk.lookup(recording, request, BIG_LIMIT)  # type: ignore[arg-type]
            assert recording.statements
            for sql, params, _n in recording.statements:
                assert " IN (" in sql  # never the whole view, filtered afterwards
                plan = [row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
                assert not [p for p in plan if p.startswith("SCAN")], (sql, plan)
                assert any(p.startswith(f"SEARCH {table} USING ") and f"{stored}=?" in p
                           for p in plan), (sql, plan)
    finally:
        db.close()


def test_view_lookup_by_uscc_and_person_id_together(sample: Sample) -> None:
    everything = expected_view(sample, "active_legal_reps", None)
    usccs = [str(r["uscc"]) for r in everything[:5]]
    reps = [str(r["legal_rep_id"]) for r in everything[3:9]]
    subjects = tuple([("uscc", u) for u in usccs] + [("person_id", p) for p in reps])
    expected = [r for r in everything if r["uscc"] in usccs or r["legal_rep_id"] in reps]
    assert_same(run(sample, LookupRequest("active_legal_reps", subjects)), expected)
    assert len(run(sample, LookupRequest("active_legal_reps", subjects),
                   len(expected))) == len(expected)
    assert refusal(sample, "tax", LookupRequest("active_legal_reps", subjects),
                   len(expected) - 1).code == "ROW_LIMIT"


# -- order, row limit -------------------------------------------------------------------

def test_answer_bytes_do_not_depend_on_load_order(sample: Sample, tmp_path: Path) -> None:
    reversed_dir = tmp_path / "tax"
    reversed_dir.mkdir()
    for name in FILES["tax"]:
        lines = (sample.folder / "tax" / f"{name}.csv").read_text("utf-8").splitlines()
        (reversed_dir / f"{name}.csv").write_text(
            "\n".join([lines[0], *reversed(lines[1:])]) + "\n", "utf-8")
    other = agents.open_store("tax", tmp_path / "tax.db")
    try:
        agents.load_dataset_dir("tax", reversed_dir, other)
        usccs = values_of(sample, "vat_invoices", "uscc")[:60]
        request = LookupRequest("vat_invoices", tuple(("uscc", u) for u in usccs))
        first = canonical_json(run(sample, request))
        assert canonical_json(run(sample, request)) == first
        assert canonical_json(lk.lookup(other, request, BIG_LIMIT)) == first
    finally:
        other.close()


def _busiest_uscc(sample: Sample) -> tuple[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for r in sample.csv_rows["vat_invoices"]:
        counts[r["issuer_uscc"]] += 1
        if r["buyer_uscc"] != r["issuer_uscc"]:
            counts[r["buyer_uscc"]] += 1
    u = max(counts, key=lambda k: (counts[k], k))
    return u, counts[u]


def test_row_limit_exactly_at_and_above(sample: Sample) -> None:
    u, n = _busiest_uscc(sample)
    assert n > 2
    request = LookupRequest("vat_invoices", (("uscc", u),))
    recording = RecordingStore(sample.stores["tax"])
    assert len(lk.lookup(recording, request, n)) == n  # type: ignore[arg-type]
    assert recording.statements[0][2] == n
    recording = RecordingStore(sample.stores["tax"])
    with pytest.raises(LookupRefused) as caught:
        lk.lookup(recording, request, n - 1)  # type: ignore[arg-type]
    assert caught.value.code == "ROW_LIMIT" and f"{n - 1}" in str(caught.value)
    assert [count for _s, _p, count in recording.statements] == [n]  # at most limit + 1
    assert refusal(sample, "tax", request, 0).code == "ROW_LIMIT"


def test_row_limit_counts_distinct_rows_across_statements(sample: Sample) -> None:
    usccs = values_of(sample, "vat_invoices", "uscc")
    request = LookupRequest("vat_invoices", tuple(("uscc", u) for u in usccs))
    n = len(sample.csv_rows["vat_invoices"])  # every invoice, most matched twice
    recording = RecordingStore(sample.stores["tax"])
    assert len(lk.lookup(recording, request, n)) == n  # type: ignore[arg-type]
    assert len(recording.statements) > 1
    e = refusal(sample, "tax", request, n - 1)
    assert e.code == "ROW_LIMIT"


def test_row_limit_on_a_view(sample: Sample) -> None:
    n = len(expected_view(sample, "company_flows", PERIODS[0]))
    request = LookupRequest("company_flows", period=PERIODS[0])
    assert len(run(sample, request, n)) == n
    e = refusal(sample, "pboc", request, n - 1)
    assert e.code == "ROW_LIMIT" and str(n - 1) in str(e)


# -- refusals ---------------------------------------------------------------------------

def _bad_uscc() -> str:
    good = absent_uscc()
    wrong = next(c for c in checks.USCC_ALPHABET if c != good[-1])
    return good[:-1] + wrong


def _bad_person_id() -> str:
    good = absent_person_id()
    return good[:-1] + ("1" if good[-1] != "1" else "2")


U = absent_uscc()
P = absent_person_id()
REFUSALS = [
    ("tax", LookupRequest("declarations", (("uscc", U),)), "UNKNOWN_DATASET", "declarations"),
    ("police", LookupRequest("company_flows", period="2026-09"), "UNKNOWN_DATASET",
     "company_flows"),
    ("tax", LookupRequest("vat_invoices", (("uscc", U),), fields=("amount_fen",)),
     "UNKNOWN_FIELD", "amount_fen"),
    ("pboc", LookupRequest("company_flows", period="2026-09", fields=("uscc", "inflows")),
     "UNKNOWN_FIELD", "inflows"),
    ("tax", LookupRequest("vat_invoices", (("seller", U),)), "BAD_SUBJECT", "seller"),
    ("tax", LookupRequest("vat_invoices", (("kind", "export"),)), "BAD_SUBJECT", "kind"),
    ("tax", LookupRequest("vat_invoices", (("uscc", _bad_uscc()),)), "BAD_SUBJECT",
     _bad_uscc()),
    ("tax", LookupRequest("taxpayers", (("uscc", U.lower()),)), "BAD_SUBJECT", U.lower()),
    ("tax", LookupRequest("taxpayers", (("uscc", U[:-1]),)), "BAD_SUBJECT", U[:-1]),
    ("police", LookupRequest("records", (("person_id", _bad_person_id()),)), "BAD_SUBJECT",
     _bad_person_id()),
    ("police", LookupRequest("persons", (("uscc", U),)), "BAD_SUBJECT", "uscc"),
    ("pboc", LookupRequest("transactions", (("uscc", U),)), "BAD_SUBJECT", "uscc"),
    ("pboc", LookupRequest("accounts", (("holder_id", "12345"),)), "BAD_SUBJECT", "12345"),
    ("pboc", LookupRequest("transactions", (("txn_id", "T 1"),)), "BAD_SUBJECT", "T 1"),
    ("tax", LookupRequest("revenue_declarations", (("period", "2026-13"),)), "BAD_SUBJECT",
     "2026-13"),
    ("pboc", LookupRequest("company_flows", (("person_id", P),), "2026-09"), "BAD_SUBJECT",
     "person_id"),
    ("tax", LookupRequest("active_legal_reps", (("person_id", _bad_person_id()),)),
     "BAD_SUBJECT", _bad_person_id()),
    ("tax", LookupRequest("vat_invoices", (("uscc", U),), "2026-13"), "BAD_PERIOD", "2026-13"),
    ("tax", LookupRequest("vat_invoices", (("uscc", U),), "2026-9"), "BAD_PERIOD", "2026-9"),
    ("police", LookupRequest("persons", (("person_id", P),), "2026-09"), "BAD_PERIOD",
     "persons"),
    ("tax", LookupRequest("active_legal_reps", period="2026-09"), "BAD_PERIOD",
     "active_legal_reps"),
    ("customs", LookupRequest("company_trade", (("uscc", U),)), "BAD_PERIOD",
     "company_trade"),
    ("tax", LookupRequest("vat_invoices", period="2026-09"), "SUBJECTS_REQUIRED",
     "vat_invoices"),
    ("police", LookupRequest("records"), "SUBJECTS_REQUIRED", "records"),
    ("tax", LookupRequest("taxpayers", (("uscc", U),) * (lk.SUBJECTS_MAX + 1)),
     "TOO_MANY_SUBJECTS", str(lk.SUBJECTS_MAX)),
    ("pboc", LookupRequest("company_flows", (("uscc", U),) * (lk.SUBJECTS_MAX + 1),
                           "2026-09"), "TOO_MANY_SUBJECTS", str(lk.SUBJECTS_MAX)),
]


@pytest.mark.parametrize("agency,request_,code,named", REFUSALS,
                         ids=[f"{c}-{i}" for i, (_a, _r, c, _n) in enumerate(REFUSALS)])
def test_refusals_carry_a_stable_code_and_name_the_culprit(
        sample: Sample, agency: str, request_: LookupRequest, code: str, named: str) -> None:
    e = refusal(sample, agency, request_)
    assert isinstance(e, ExchangeError)
    assert e.code == code
    assert named in str(e)


def test_every_refusal_code_is_exercised() -> None:
    assert {code for _a, _r, code, _n in REFUSALS} | {"ROW_LIMIT"} == lk.REFUSAL_CODES


# -- the request's text and JSON forms -----------------------------------------------------

def test_parse_subject() -> None:
    assert lk.parse_subject(f"uscc={U}") == ("uscc", U)
    assert lk.parse_subject("txn_id=T=1") == ("txn_id", "T=1")
    for bad in ("uscc", f"={U}", "uscc=", f"USCC={U}", f"uscc ={U}", f"uscc= {U}",
                f"uscc={U}\n", f"1x={U}", "uscc=" + "9" * 201):
        with pytest.raises(MalformedInput):
            lk.parse_subject(bad)


names = st.text(min_size=1, max_size=20)
requests = st.builds(
    LookupRequest,
    dataset=names,
    subjects=st.lists(st.tuples(names, st.text(max_size=30)), max_size=8).map(tuple),
    period=st.none() | st.text(max_size=8),
    fields=st.lists(names, max_size=6).map(tuple))


@given(requests)
def test_request_json_round_trip(request: LookupRequest) -> None:
    text = canonical_json(lk.request_to_json(request))
    assert lk.request_from_json(json.loads(text)) == request


@pytest.mark.parametrize("obj", [
    [],
    "vat_invoices",
    {"dataset": "x", "subjects": [], "period": None},
    {"dataset": "x", "subjects": [], "period": None, "fields": [], "limit": 5},
    {"dataset": "", "subjects": [], "period": None, "fields": []},
    {"dataset": 1, "subjects": [], "period": None, "fields": []},
    {"dataset": "x", "subjects": {}, "period": None, "fields": []},
    {"dataset": "x", "subjects": [["uscc"]], "period": None, "fields": []},
    {"dataset": "x", "subjects": [["uscc", 1]], "period": None, "fields": []},
    {"dataset": "x", "subjects": ["uscc=1"], "period": None, "fields": []},
    {"dataset": "x", "subjects": [], "period": 202609, "fields": []},
    {"dataset": "x", "subjects": [], "period": None, "fields": "uscc"},
    {"dataset": "x", "subjects": [], "period": None, "fields": [None]},
])
def test_request_from_json_is_strict(obj: object) -> None:
    with pytest.raises(MalformedInput):
        lk.request_from_json(obj)
