"""The data contract: identifier check digits, value formats, the loader (errors with
file, line and column; atomic, idempotent, --replace, references) and the catalog views
on small hand-made data with exact expected numbers."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import agents
from agents.common import checks
from agents.common.csvread import DataFileError
from agents.common.store import SqliteAgencyStore
from agents.customs.views import CompanyTrade
from agents.pboc.views import CompanyFlow
from agents.tax.views import ActiveLegalRep
from exchange.cli.main import _register, cli
from exchange.errors import MalformedInput

# Published codes: GB 11643's own examples and registered companies' codes.
KNOWN_USCC = ("91350100M000100Y43", "91350500676532779B", "91310110666007217T",
              "91370100780603055K", "91510100MA6BKY6U36", "91330101589882738D")
KNOWN_PERSON_IDS = ("11010519491231002X", "440524188001010014", "11010119900307299X")


def uscc(n: int, region: str = "440300") -> str:
    body = f"91{region}{n:09d}"
    return body + checks.uscc_check_char(body)


def pid(n: int) -> str:
    body = f"44030519800101{n:03d}"
    return body + checks.person_id_check_char(body)


# -- check digits -----------------------------------------------------------------------

@pytest.mark.parametrize("code", KNOWN_USCC)
def test_known_uscc_codes_are_valid(code: str) -> None:
    assert checks.is_valid_uscc(code)
    assert checks.uscc_check_char(code[:17]) == code[17]


@pytest.mark.parametrize("code", KNOWN_PERSON_IDS)
def test_known_person_ids_are_valid(code: str) -> None:
    assert checks.is_valid_person_id(code)


@pytest.mark.parametrize("code,why", [
    ("91350100M000100Y44", "bad check digit"),
    ("91350100M000100Y4", "18 characters"),
    ("91350100M000100Y43A", "18 characters"),
    ("91350100m000100Y43", "not a uscc"),  # lower case
    ("91350100I000100Y43", "not a uscc"),  # I is not in the alphabet
    ("913501A0M000100Y43", "not a uscc"),  # a letter in the division code
    ("91350203M0001QAY9B", "bad check digit"),
])
def test_corrupted_uscc_is_rejected_with_reason(code: str, why: str) -> None:
    problem = checks.uscc_problem(code)
    assert problem is not None and why in problem


@pytest.mark.parametrize("code,why", [
    ("11010519491231002Y", "not a person_id"),
    ("11010519491231002x", "not a person_id"),  # lower-case x is not accepted
    ("110105194912310021", "bad check digit"),
    ("44052418800101001", "18 characters"),
])
def test_corrupted_person_id_is_rejected_with_reason(code: str, why: str) -> None:
    problem = checks.person_id_problem(code)
    assert problem is not None and why in problem


def test_org_code_check_char_matches_published_codes() -> None:
    for code in KNOWN_USCC:
        assert checks.org_code_check_char(code[8:16]) == code[16]


_USCC_ANY = st.sampled_from(checks.USCC_ALPHABET)
_DIGIT = st.sampled_from("0123456789")
_REPLACEMENT = st.characters(min_codepoint=32, max_codepoint=0x7E) | st.sampled_from("中Ｘ")


@st.composite
def valid_usccs(draw: st.DrawFn) -> str:
    body = ("".join(draw(st.lists(_USCC_ANY, min_size=2, max_size=2)))
            + "".join(draw(st.lists(_DIGIT, min_size=6, max_size=6)))
            + "".join(draw(st.lists(_USCC_ANY, min_size=9, max_size=9))))
    return body + checks.uscc_check_char(body)


@st.composite
def valid_person_ids(draw: st.DrawFn) -> str:
    body = "".join(draw(st.lists(_DIGIT, min_size=17, max_size=17)))
    return body + checks.person_id_check_char(body)


@given(valid_usccs(), st.integers(0, 17), _REPLACEMENT)
def test_any_single_character_change_of_a_uscc_is_rejected(code: str, at: int,
                                                           char: str) -> None:
    assert checks.is_valid_uscc(code)
    if char == code[at]:
        return
    assert not checks.is_valid_uscc(code[:at] + char + code[at + 1:])


@given(valid_person_ids(), st.integers(0, 17), _REPLACEMENT)
def test_any_single_character_change_of_a_person_id_is_rejected(code: str, at: int,
                                                                char: str) -> None:
    assert checks.is_valid_person_id(code)
    if char == code[at]:
        return
    assert not checks.is_valid_person_id(code[:at] + char + code[at + 1:])


# -- value formats ----------------------------------------------------------------------

@pytest.mark.parametrize("text,fen", [("1", 100), ("0.01", 1), ("12.5", 1250),
                                      ("1000000.00", 100_000_000),
                                      ("999999999999.99", checks.AMOUNT_FEN_MAX)])
def test_amounts_are_exact_fen(text: str, fen: int) -> None:
    assert checks.parse_amount_fen(text) == fen


@pytest.mark.parametrize("text", ["0", "0.00", "-1", "+1", "1.234", "1e5", "1,000", " 1",
                                  "01", ".5", "1.", "NaN", "1000000000000.00", "9" * 5000])
def test_malformed_or_non_positive_amounts_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        checks.parse_amount_fen(text)


@given(st.integers(1, checks.AMOUNT_FEN_MAX))
def test_amount_text_round_trips_through_fen_and_decimal(fen: int) -> None:
    text = checks.format_fen(fen)
    assert checks.parse_amount_fen(text) == fen
    assert checks.fen_to_decimal(fen) == Decimal(text)
    assert str(checks.fen_to_decimal(fen)) == text
    assert checks.decimal_to_fen(Decimal(text)) == fen


@given(st.integers(-checks.AMOUNT_FEN_MAX, checks.AMOUNT_FEN_MAX))
def test_amount_text_of_negative_fen_is_the_negated_positive_text(fen: int) -> None:
    """A negative amount (a credit note, a refund) reads as its magnitude with a minus,
    the same in the generator's files as in the rule engine's output."""
    from agents import generate

    assert generate.fmt_fen is checks.format_fen
    text = checks.format_fen(fen)
    assert text == ("-" if fen < 0 else "") + checks.format_fen(abs(fen))
    assert checks.fen_to_decimal(fen) == Decimal(text)


@pytest.mark.parametrize("text", ["2026-02-29", "2026-13-01", "2026-1-01", "26-01-01",
                                  "2026-00-10", "2026-04-31", "20260101", "2026-01-01T00"])
def test_invalid_dates_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        checks.check_date(text)


def test_period_bounds_and_shifts_cross_years() -> None:
    assert checks.check_date("2024-02-29") == "2024-02-29"
    assert checks.period_bounds("2026-12") == ("2026-12-01", "2027-01-01")
    assert checks.shift_period("2026-01", -1) == "2025-12"
    for bad in ("2026-13", "2026-1", "202601", "2026-00"):
        with pytest.raises(ValueError):
            checks.check_period(bad)


# -- the loader -------------------------------------------------------------------------

ACCOUNTS_HEADER = "account_no,holder_kind,holder_id,bank,opened_on"
TXN_HEADER = "txn_id,account_no,counterparty_account,amount_cny,direction,cross_border,booked_on"


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(text.encode("utf-8"))
    return path


def lines(*rows: str) -> str:
    return "".join(r + "\n" for r in rows)


@pytest.fixture
def pboc_store(tmp_path: Path) -> Iterator[SqliteAgencyStore]:
    store = agents.open_store("pboc", tmp_path / "pboc" / "agency.db")
    yield store
    store.close()


@pytest.fixture
def tax_store(tmp_path: Path) -> Iterator[SqliteAgencyStore]:
    store = agents.open_store("tax", tmp_path / "tax" / "agency.db")
    yield store
    store.close()


def dump(store: SqliteAgencyStore) -> dict[str, list[tuple[object, ...]]]:
    result = {}
    for d in store.datasets:
        result[d.name] = sorted(store.fetch(f'SELECT * FROM "{d.name}"', {}),
                                key=lambda row: tuple(str(v) for v in row))
    return result


def good_accounts() -> str:
    return lines(ACCOUNTS_HEADER,
                 f"A1,company,{uscc(1)},Bank of Shenzhen,2020-01-01",
                 f"A2,company,{uscc(1)},Bank of Shenzhen,2020-01-02",
                 f"P1,person,{pid(1)},Bank of Shenzhen,2021-05-05")


def good_transactions() -> str:
    return lines(TXN_HEADER,
                 "T1,A1,X9,100.00,in,0,2026-09-01",
                 "T2,A2,A1,20.5,out,1,2026-09-02")


def load_error(agency: str, folder: Path, store: SqliteAgencyStore,
               replace: bool = False) -> str:
    with pytest.raises(DataFileError) as info:
        agents.load_dataset_dir(agency, folder, store, replace=replace)
    return str(info.value)


def test_loads_a_folder_in_any_column_order_ignoring_extra_columns(
        tmp_path: Path, pboc_store: SqliteAgencyStore) -> None:
    folder = tmp_path / "in"
    # reordered columns, an extra column, a BOM, CRLF line ends and RFC 4180 quoting
    write(folder, "accounts.csv",
          "\ufeffbank,extra,opened_on,holder_id,account_no,holder_kind\r\n"
          f'"Bank ""North"", Shenzhen",x,2020-01-01,{uscc(1)},A1,company\r\n'
          f'"Bank of\nShenzhen",,2020-01-01,{uscc(1)},A2,company\r\n')
    write(folder, "transactions.csv", good_transactions())
    report = agents.load_dataset_dir("pboc", folder, pboc_store)
    assert [(f.dataset, f.rows, f.rows_before, f.rows_after) for f in report.files] == [
        ("accounts", 2, 0, 2), ("transactions", 2, 0, 2)]
    rows = dump(pboc_store)
    assert rows["accounts"][0] == ("A1", "company", uscc(1), 'Bank "North", Shenzhen',
                                   "2020-01-01")
    assert rows["accounts"][1][3] == "Bank of\nShenzhen"
    # amounts are integer fen in the store, never floats
    assert rows["transactions"] == [("T1", "A1", "X9", 10_000, "in", 0, "2026-09-01"),
                                    ("T2", "A2", "A1", 2_050, "out", 1, "2026-09-02")]


def test_missing_required_column_names_file_line_and_column(
        tmp_path: Path, pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "accounts.csv",
          lines("account_no,holder_kind,holder_id,opened_on", f"A1,company,{uscc(1)},2020-01-01"))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert "accounts.csv, line 1, column bank: missing required column 'bank'" in message


def test_malformed_value_names_file_line_and_column(tmp_path: Path,
                                                    pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "accounts.csv", good_accounts())
    write(tmp_path / "in", "transactions.csv",
          lines(TXN_HEADER, "T1,A1,X9,100.00,in,0,2026-09-01", "T2,A1,X9,100.001,in,0,2026-09-01"))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert "transactions.csv, line 3, column 4 (amount_cny): '100.001' is not an amount" in message
    assert "nothing was loaded" in message


@pytest.mark.parametrize("row,column,why", [
    ("T1,A1,X9,100.00,in,0,2026-02-30", "7 (booked_on)", "not a valid date"),
    ("T1,A1,X9,100.00,sideways,0,2026-09-01", "5 (direction)", "is not one of in, out"),
    ("T1,A1,X9,100.00,in,2,2026-09-01", "6 (cross_border)", "is not 0 or 1"),
    ("T1,A1,X9,0.00,in,0,2026-09-01", "4 (amount_cny)", "amounts are positive"),
    ("T1,A1,X9,-5,in,0,2026-09-01", "4 (amount_cny)", "not an amount"),
    ("T1,,X9,5,in,0,2026-09-01", "2 (account_no)", "empty value"),
    ("T 1,A1,X9,5,in,0,2026-09-01", "1 (txn_id)", "not an identifier"),
])
def test_each_kind_of_bad_value_is_named(tmp_path: Path, pboc_store: SqliteAgencyStore,
                                         row: str, column: str, why: str) -> None:
    write(tmp_path / "in", "accounts.csv", good_accounts())
    write(tmp_path / "in", "transactions.csv", lines(TXN_HEADER, row))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert f"transactions.csv, line 2, column {column}: " in message
    assert why in message


def test_bad_check_digit_names_file_line_and_column(tmp_path: Path,
                                                    tax_store: SqliteAgencyStore) -> None:
    good, bad_rep = uscc(1), pid(1)[:17] + ("0" if pid(1)[17] != "0" else "1")
    write(tmp_path / "in", "taxpayers.csv",
          lines("uscc,name,legal_rep_id,status,registered_on",
                f"{good},甲公司,{pid(1)},active,2020-01-01",
                f"{uscc(2)},乙公司,{bad_rep},active,2020-01-01"))
    message = load_error("tax", tmp_path / "in", tax_store)
    assert "taxpayers.csv, line 3, column 3 (legal_rep_id): bad check digit" in message
    bad_uscc = good[:17] + ("0" if good[17] != "0" else "1")
    write(tmp_path / "in", "taxpayers.csv",
          lines("uscc,name,legal_rep_id,status,registered_on",
                f"{bad_uscc},甲公司,{pid(1)},active,2020-01-01"))
    message = load_error("tax", tmp_path / "in", tax_store)
    assert "taxpayers.csv, line 2, column 1 (uscc): bad check digit in uscc" in message


def test_holder_id_is_checked_as_its_holder_kind_says(tmp_path: Path,
                                                      pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "accounts.csv",
          lines(ACCOUNTS_HEADER, f"A1,company,{pid(1)},B,2020-01-01"))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert "line 2, column 3 (holder_id): holder_kind company:" in message
    write(tmp_path / "in", "accounts.csv",
          lines(ACCOUNTS_HEADER, f"A1,person,{uscc(1)},B,2020-01-01"))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert "line 2, column 3 (holder_id): holder_kind person:" in message


def test_repeated_key_names_both_lines(tmp_path: Path, pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "accounts.csv", good_accounts())
    rows = [f"T{i},A1,X9,1.00,in,0,2026-09-01" for i in range(25_000)]
    rows.insert(20_500, "T7,A1,X9,2.00,in,0,2026-09-02")  # across staging batches
    write(tmp_path / "in", "transactions.csv", lines(TXN_HEADER, *rows))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert "transactions.csv, line 20502: key txn_id='T7' repeats line 9" in message


def test_repeated_composite_key_names_both_lines(tmp_path: Path,
                                                 tax_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "taxpayers.csv",
          lines("uscc,name,legal_rep_id,status,registered_on",
                f"{uscc(1)},甲公司,{pid(1)},active,2020-01-01"))
    write(tmp_path / "in", "revenue_declarations.csv",
          lines("uscc,period,declared_revenue_cny", f"{uscc(1)},2026-08,10",
                f"{uscc(1)},2026-09,10", f"{uscc(1)},2026-08,11"))
    message = load_error("tax", tmp_path / "in", tax_store)
    assert f"revenue_declarations.csv, line 4: key uscc='{uscc(1)}', period='2026-08' repeats " \
           "line 2" in message


def test_bad_value_before_a_repeat_is_reported_first(tmp_path: Path,
                                                     pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "accounts.csv",
          lines(ACCOUNTS_HEADER, f"A1,company,{uscc(1)},B,2020-01-01",
                f"A2,company,{uscc(1)},B,2020-13-01", f"A1,company,{uscc(1)},B,2020-01-01"))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert "line 3, column 5 (opened_on)" in message and "repeats" not in message
    write(tmp_path / "in", "accounts.csv",
          lines(ACCOUNTS_HEADER, f"A1,company,{uscc(1)},B,2020-01-01",
                f"A1,company,{uscc(1)},B,2020-01-01", f"A2,company,{uscc(1)},B,2020-13-01"))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert "accounts.csv, line 3: key account_no='A1' repeats line 2" in message


@pytest.mark.parametrize("text,where,why", [
    (ACCOUNTS_HEADER + "\nA1,company\n", "line 2", "2 fields, but the header has 5"),
    (ACCOUNTS_HEADER + '\nA1,company,"x"y,B,2020-01-01\n', "line 2", "not valid CSV"),
    (ACCOUNTS_HEADER + f'\nA1,company,{uscc(1)},"B\nB",2020-01-01\nA2,x\n', "line 4",
     "2 fields"),  # a quoted field spanning lines 2-3: the next record starts on line 4
    ("", "line 1", "empty file"),
    (ACCOUNTS_HEADER + ",bank\n", "line 1", "column 'bank' appears twice"),
])
def test_structural_problems_name_the_line(tmp_path: Path, pboc_store: SqliteAgencyStore,
                                           text: str, where: str, why: str) -> None:
    write(tmp_path / "in", "accounts.csv", text)
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert f"accounts.csv, {where}" in message and why in message


def test_non_utf8_bytes_name_the_line(tmp_path: Path, pboc_store: SqliteAgencyStore) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "accounts.csv").write_bytes(
        (ACCOUNTS_HEADER + f"\nA1,company,{uscc(1)},B,2020-01-01\n").encode()
        + b"A2,company,x,\xff\xfe,2020-01-01\n")
    message = load_error("pboc", folder, pboc_store)
    assert "accounts.csv, line 3: not UTF-8: byte 0xff" in message


def test_unresolved_reference_names_file_line_and_column(
        tmp_path: Path, pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "accounts.csv", good_accounts())
    write(tmp_path / "in", "transactions.csv",
          lines(TXN_HEADER, "T1,A1,X9,1.00,in,0,2026-09-01", "T2,NOPE,X9,1.00,in,0,2026-09-01"))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert ("transactions.csv, line 3, column 2 (account_no): account_no 'NOPE' is not in "
            "accounts.csv or the stored accounts") in message


def test_a_bad_file_loads_nothing_of_the_whole_folder(tmp_path: Path,
                                                      pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "ok", "accounts.csv", good_accounts())
    agents.load_dataset_dir("pboc", tmp_path / "ok", pboc_store)
    before = dump(pboc_store)
    write(tmp_path / "in", "accounts.csv",
          good_accounts() + f"A9,company,{uscc(9)},New Bank,2020-01-01\n")
    write(tmp_path / "in", "transactions.csv",
          lines(TXN_HEADER, *[f"T{i},A1,X9,1.00,in,0,2026-09-01" for i in range(30_000)],
                "T-bad,A1,X9,1.00,in,0,2026-09-31"))
    message = load_error("pboc", tmp_path / "in", pboc_store)
    assert "line 30002, column 7 (booked_on)" in message
    assert dump(pboc_store) == before
    assert len(pboc_store.load_log()) == 1


def test_every_rejected_file_is_reported_in_one_run(tmp_path: Path,
                                                    tax_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "taxpayers.csv",
          lines("uscc,name,legal_rep_id,status,registered_on",
                f"{uscc(1)},甲,{pid(1)},dormant,2020-01-01"))
    write(tmp_path / "in", "export_rebates.csv",
          lines("claim_no,uscc,period,claimed_export_value_cny", "C1,x,2026-09,1"))
    error = pytest.raises(DataFileError, agents.load_dataset_dir, "tax", tmp_path / "in",
                          tax_store).value
    assert [(p.file.rsplit("/", 1)[-1], p.line, p.column) for p in error.problems] == [
        ("taxpayers.csv", 2, "status"), ("export_rebates.csv", 1, "rebate_cny")]


def test_loading_the_same_folder_twice_changes_nothing(tmp_path: Path,
                                                       pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "accounts.csv", good_accounts())
    write(tmp_path / "in", "transactions.csv", good_transactions())
    agents.load_dataset_dir("pboc", tmp_path / "in", pboc_store)
    first = dump(pboc_store)
    report = agents.load_dataset_dir("pboc", tmp_path / "in", pboc_store)
    assert dump(pboc_store) == first
    assert [(f.rows_before, f.rows_after) for f in report.files] == [(3, 3), (2, 2)]
    assert [entry[1:] for entry in pboc_store.load_log()][:2] == [
        entry[1:] for entry in pboc_store.load_log()][2:]


def test_a_row_with_a_stored_key_replaces_it(tmp_path: Path,
                                             pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "a", "accounts.csv", good_accounts())
    write(tmp_path / "a", "transactions.csv", good_transactions())
    agents.load_dataset_dir("pboc", tmp_path / "a", pboc_store)
    write(tmp_path / "b", "transactions.csv",
          lines(TXN_HEADER, "T1,A2,X9,99.99,in,0,2026-09-03", "T3,A1,X8,1,out,0,2026-09-04"))
    report = agents.load_dataset_dir("pboc", tmp_path / "b", pboc_store)
    assert [(f.dataset, f.rows_before, f.rows_after) for f in report.files] == [
        ("transactions", 2, 3)]
    assert dump(pboc_store)["transactions"] == [
        ("T1", "A2", "X9", 9_999, "in", 0, "2026-09-03"),
        ("T2", "A2", "A1", 2_050, "out", 1, "2026-09-02"),
        ("T3", "A1", "X8", 100, "out", 0, "2026-09-04")]


def test_replace_makes_the_dataset_equal_to_the_file(tmp_path: Path,
                                                     pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "a", "accounts.csv", good_accounts())
    write(tmp_path / "a", "transactions.csv", good_transactions())
    agents.load_dataset_dir("pboc", tmp_path / "a", pboc_store)
    write(tmp_path / "b", "transactions.csv", lines(TXN_HEADER, "T3,A1,X8,1,out,0,2026-09-04"))
    agents.load_dataset_dir("pboc", tmp_path / "b", pboc_store, replace=True)
    rows = dump(pboc_store)
    assert rows["transactions"] == [("T3", "A1", "X8", 100, "out", 0, "2026-09-04")]
    assert len(rows["accounts"]) == 3  # not in the folder: left as it was
    write(tmp_path / "c", "transactions.csv", lines(TXN_HEADER))
    agents.load_dataset_dir("pboc", tmp_path / "c", pboc_store, replace=True)
    assert dump(pboc_store)["transactions"] == []


def test_references_resolve_against_the_file_and_the_store(
        tmp_path: Path, pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "a", "accounts.csv", good_accounts())
    agents.load_dataset_dir("pboc", tmp_path / "a", pboc_store)
    # A1 is stored, A7 arrives in the same load
    write(tmp_path / "b", "accounts.csv",
          lines(ACCOUNTS_HEADER, f"A7,company,{uscc(7)},B,2020-01-01"))
    write(tmp_path / "b", "transactions.csv",
          lines(TXN_HEADER, "T1,A1,X9,1,in,0,2026-09-01", "T2,A7,X9,1,in,0,2026-09-01"))
    agents.load_dataset_dir("pboc", tmp_path / "b", pboc_store)
    assert pboc_store.row_count(agents.datasets_of("pboc")[1]) == 2
    # with --replace, the stored accounts not in the file no longer count
    message = load_error("pboc", tmp_path / "b", pboc_store, replace=True)
    assert ("transactions.csv, line 2, column 2 (account_no): account_no 'A1' is not in "
            "accounts.csv") in message


def test_replace_may_not_orphan_stored_rows(tmp_path: Path,
                                            pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "a", "accounts.csv", good_accounts())
    write(tmp_path / "a", "transactions.csv", good_transactions())
    agents.load_dataset_dir("pboc", tmp_path / "a", pboc_store)
    before = dump(pboc_store)
    write(tmp_path / "b", "accounts.csv",
          lines(ACCOUNTS_HEADER, f"A1,company,{uscc(1)},B,2020-01-01"))
    message = load_error("pboc", tmp_path / "b", pboc_store, replace=True)
    assert ("accounts.csv: replacing accounts would remove account_no 'A2', which the stored "
            "transactions row txn_id='T2' refers to") in message
    assert dump(pboc_store) == before


def test_tax_and_police_references(tmp_path: Path) -> None:
    with agents.open_store("tax", tmp_path / "t.db") as tax:
        write(tmp_path / "tax", "taxpayers.csv",
              lines("uscc,name,legal_rep_id,status,registered_on",
                    f"{uscc(1)},甲,{pid(1)},active,2020-01-01"))
        write(tmp_path / "tax", "vat_invoices.csv",
              lines("invoice_no,issuer_uscc,buyer_uscc,amount_cny,tax_cny,issued_on,kind",
                    f"I1,{uscc(1)},{uscc(5)},100,13,2026-09-01,domestic",
                    f"I2,{uscc(5)},{uscc(1)},100,13,2026-09-01,domestic"))
        message = load_error("tax", tmp_path / "tax", tax)
        assert "vat_invoices.csv, line 3, column 2 (issuer_uscc)" in message
    with agents.open_store("police", tmp_path / "p.db") as police:
        write(tmp_path / "police", "persons.csv", lines("person_id,name", f"{pid(1)},张三"))
        write(tmp_path / "police", "records.csv",
              lines("record_id,person_id,kind,case_no,recorded_on",
                    f"R1,{pid(1)},wanted,,2020-01-01", f"R2,{pid(2)},wanted,X1,2020-01-01"))
        message = load_error("police", tmp_path / "police", police)
        assert "records.csv, line 3, column 2 (person_id)" in message


def test_folder_problems_are_clear(tmp_path: Path, pboc_store: SqliteAgencyStore) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MalformedInput, match="no dataset file"):
        agents.load_dataset_dir("pboc", tmp_path / "empty", pboc_store)
    write(tmp_path / "typo", "transaction.csv", lines(TXN_HEADER))
    with pytest.raises(MalformedInput, match="transaction.csv is no dataset of this agency"):
        agents.load_dataset_dir("pboc", tmp_path / "typo", pboc_store)
    write(tmp_path / "ok", "accounts.csv", good_accounts())
    with pytest.raises(MalformedInput, match="holds 'pboc' data, not 'tax'"):
        agents.load_dataset_dir("tax", tmp_path / "ok", pboc_store)


def test_a_store_keeps_one_agency(tmp_path: Path) -> None:
    agents.open_store("pboc", tmp_path / "s.db").close()
    with pytest.raises(MalformedInput, match="holds the datasets of 'pboc', not 'tax'"):
        agents.open_store("tax", tmp_path / "s.db")


def test_store_is_wal_with_keys_and_indexes(tmp_path: Path) -> None:
    agents.open_store("pboc", tmp_path / "s.db").close()
    db = sqlite3.connect(tmp_path / "s.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    indexes = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"transactions_by_booked_on", "accounts_by_holder_kind_holder_id"} <= indexes
    db.close()


# -- the CLI ------------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def _commands() -> None:
    _register()


def test_cli_load_reports_and_fails_with_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    write(tmp_path / "in", "accounts.csv", good_accounts())
    store = tmp_path / "pboc.db"
    result = runner.invoke(cli, ["data", "load", "--agency", "pboc", str(tmp_path / "in"),
                                 "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    assert '"rows_after": 3' in result.output
    write(tmp_path / "in", "transactions.csv", lines(TXN_HEADER, "T1,A1,X9,1,in,0,2026-09-31"))
    result = runner.invoke(cli, ["data", "load", "--agency", "pboc", str(tmp_path / "in"),
                                 "--store", str(store)])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "transactions.csv, line 2, column 7 (booked_on)" in result.output
    result = runner.invoke(cli, ["data", "load", "--agency", "pboc", str(tmp_path / "in")])
    assert result.exit_code == 2 and "exactly one of --store and --config" in result.output


def test_cli_load_with_node_config_uses_its_data_dir(tmp_path: Path) -> None:
    config = tmp_path / "node" / "node.toml"
    config.parent.mkdir()
    config.write_text("""agency = "pboc"
node_id = "pboc"
[listen]
grpc = "127.0.0.1:7130"
metrics = "127.0.0.1:7131"
[paths]
data_dir = "data"
genesis = "../genesis.pb"
node_key = "keys/node.key"
data_key = "keys/data.key"
tls_cert = "tls/node.pem"
tls_key = "tls/node.key"
[block]
tx_max = 100
bytes_max = 1048576
interval_ms = 20
""")
    write(tmp_path / "in", "accounts.csv", good_accounts())
    result = CliRunner().invoke(cli, ["data", "load", str(tmp_path / "in"),
                                      "--config", str(config)])
    assert result.exit_code == 0, result.output
    with agents.open_store("pboc", tmp_path / "node" / "data" / "agency.db") as store:
        assert len(dump(store)["accounts"]) == 3
    result = CliRunner().invoke(cli, ["data", "load", "--agency", "tax", str(tmp_path / "in"),
                                      "--config", str(config)])
    assert result.exit_code == 1 and "node config of 'pboc', not 'tax'" in result.output


# -- the views ------------------------------------------------------------------------------

A, B, C = uscc(1), uscc(2), uscc(3)


def test_company_flows_exact(tmp_path: Path, pboc_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "accounts.csv", lines(
        ACCOUNTS_HEADER,
        f"A1,company,{A},Bank,2020-01-01", f"A2,company,{A},Other Bank,2020-01-01",
        f"B1,company,{B},Bank,2020-01-01", f"C1,company,{C},Bank,2020-01-01",
        f"P1,person,{pid(1)},Bank,2020-01-01"))
    write(tmp_path / "in", "transactions.csv", lines(
        TXN_HEADER,
        "t01,A1,EXT-9,1000.10,in,0,2026-09-01",  # inflow
        "t02,A2,A1,500.00,in,0,2026-09-02",  # from its own account: not an inflow
        "t03,A1,A2,500.00,out,0,2026-09-02",
        "t04,A1,B1,250.25,in,0,2026-09-30",  # from another company: inflow
        "t05,B1,A1,250.25,out,0,2026-09-30",
        "t06,A1,HK0001,0.01,in,1,2026-09-15",  # from abroad: inflow
        "t07,A2,P1,40.00,in,0,2026-09-15",  # from a person: inflow
        "t08,A2,US0001,300.00,out,1,2026-09-03",  # outbound cross-border
        "t09,A2,US0001,0.05,out,1,2026-09-03",
        "t10,A2,EXT-1,99.99,out,0,2026-09-03",  # domestic: neither
        "t11,P1,SG0001,1000000.00,out,1,2026-09-05",  # a person's: no subject
        "t12,P1,EXT-1,5000000.00,in,0,2026-09-05",
        "t13,A1,EXT-9,77.00,in,0,2026-10-01",  # other months
        "t14,A1,EXT-9,11.00,in,0,2026-08-31",
        "t15,C1,US0002,12.34,out,1,2026-08-15"))  # C has nothing in 2026-09: no row
    agents.load_dataset_dir("pboc", tmp_path / "in", pboc_store)
    view = agents.views_of("pboc")["company_flows"]
    rows = view.rows(pboc_store, "2026-09")
    assert rows == sorted([
        CompanyFlow(A, "2026-09", Decimal("1290.36"), Decimal("300.05")),
        CompanyFlow(B, "2026-09", Decimal("0.00"), Decimal("0.00")),
    ])
    assert [str(r.inflows_cny) for r in rows if r.uscc == A] == ["1290.36"]
    assert view.rows(pboc_store, "2026-08") == sorted([
        CompanyFlow(A, "2026-08", Decimal("11.00"), Decimal("0.00")),
        CompanyFlow(C, "2026-08", Decimal("0.00"), Decimal("12.34"))])
    assert view.rows(pboc_store, "2026-11") == []
    with pytest.raises(ValueError):
        view.rows(pboc_store)
    with pytest.raises(ValueError):
        view.rows(pboc_store, "2026-9")


def test_company_trade_exact(tmp_path: Path) -> None:
    header = "decl_no,uscc,direction,hs_code,declared_value_cny,declared_on,port"
    write(tmp_path / "in", "declarations.csv", lines(
        header,
        f"D1,{A},import,8471300000,100.10,2026-09-01,盐田港",
        f"D2,{A},import,8471300000,200.20,2026-09-30,盐田港",
        f"D3,{A},export,8517130000,5.05,2026-09-10,蛇口港",
        f"D4,{A},import,8517130000,1.00,2026-10-01,蛇口港",
        f"D5,{B},export,8517130000,7000000.99,2026-09-10,蛇口港"))
    with agents.open_store("customs", tmp_path / "c.db") as store:
        agents.load_dataset_dir("customs", tmp_path / "in", store)
        rows = agents.views_of("customs")["company_trade"].rows(store, "2026-09")
    assert rows == sorted([
        CompanyTrade(A, "2026-09", Decimal("5.05"), Decimal("300.30"), 2),
        CompanyTrade(B, "2026-09", Decimal("7000000.99"), Decimal("0.00"), 0)])


def test_active_legal_reps_exact(tmp_path: Path, tax_store: SqliteAgencyStore) -> None:
    write(tmp_path / "in", "taxpayers.csv", lines(
        "uscc,name,legal_rep_id,status,registered_on",
        f"{C},丙,{pid(3)},active,2020-01-01",
        f"{A},甲,{pid(1)},active,2020-01-01",
        f"{B},乙,{pid(1)},deregistered,2020-01-01",
        f"{uscc(4)},丁,{pid(4)},abnormal,2020-01-01"))
    agents.load_dataset_dir("tax", tmp_path / "in", tax_store)
    view = agents.views_of("tax")["active_legal_reps"]
    assert view.rows(tax_store) == sorted([ActiveLegalRep(A, pid(1)), ActiveLegalRep(C, pid(3))])
    with pytest.raises(ValueError, match="takes no period"):
        view.rows(tax_store, "2026-09")
    with pytest.raises(ValueError, match="the store is pboc's"), \
            agents.open_store("pboc", tax_store.path.parent / "p.db") as other:
        view.rows(other)
    assert agents.views_of("police") == {}
