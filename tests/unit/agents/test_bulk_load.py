"""The bulk path of a load (agents.common.bulk, SqliteBulkSession): it stores exactly
what the row path stores, takes only loads without any problem, and hands every other
load back to the row path whole, which names the problem; exercised with batches of a
few rows so that every multi-batch path runs, and with a read size of a few bytes so
that quoted fields span the pieces the file is read in."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import agents
from agents.common import bulk, checks
from agents.common.bulk import NotBulk
from agents.common.csvread import DataFileError
from agents.common.schema import Column, Kind
from agents.common.store import SqliteAgencyStore
from agents.generate import GeneratorConfig, generate
from exchange.cli import data_cmd
from exchange.cli.main import _register, cli

ACCOUNTS_HEADER = "account_no,holder_kind,holder_id,bank,opened_on"
TXN_HEADER = "txn_id,account_no,counterparty_account,amount_cny,direction,cross_border,booked_on"


def uscc(n: int) -> str:
    body = f"91440300{n:09d}"
    return body + checks.uscc_check_char(body)


def pid(n: int) -> str:
    body = f"44030519800101{n:03d}"
    return body + checks.person_id_check_char(body)


def write(folder: Path, name: str, *rows: str, newline: str = "\n") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes("".join(r + newline for r in rows).encode())


def dump(store: SqliteAgencyStore) -> dict[str, list[tuple[object, ...]]]:
    return {d.name: sorted(store.fetch(f'SELECT * FROM "{d.name}"', {}), key=repr)
            for d in store.datasets}


def accounts(n: int) -> list[str]:
    return [ACCOUNTS_HEADER] + [f"A{i},company,{uscc(i)},Bank {i},2020-01-01"
                                for i in range(n)]


def transactions(n: int, accounts_n: int) -> list[str]:
    return [TXN_HEADER] + [f"T{i},A{i % accounts_n},X{i},{i + 1}.5,in,{i % 2},2026-09-01"
                           for i in range(n)]


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Callable[[str, str], SqliteAgencyStore]]:
    opened: list[SqliteAgencyStore] = []

    def open_(agency: str, name: str) -> SqliteAgencyStore:
        store = agents.open_store(agency, tmp_path / "stores" / f"{name}.db")
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk") / "sample"
    generate(GeneratorConfig(seed=21, companies=300), out)
    return out


def test_bulk_and_row_paths_store_the_same_rows_in_many_batches(
        sample: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    for agency in agents.AGENCIES:
        by_bulk, by_rows = stores(agency, f"{agency}-bulk"), stores(agency, f"{agency}-rows")
        fast = agents.load_dataset_dir(agency, sample / agency, by_bulk, batch_rows=7)
        slow = agents.load_dataset_dir(agency, sample / agency, by_rows, batch_rows=7,
                                       bulk=False)
        assert {f.method for f in fast.files} == {"bulk"}
        assert {f.method for f in slow.files} == {"rows"}
        assert [(f.dataset, f.rows, f.rows_before, f.rows_after, f.sha256, f.size_bytes)
                for f in fast.files] == [
            (f.dataset, f.rows, f.rows_before, f.rows_after, f.sha256, f.size_bytes)
            for f in slow.files]
        assert dump(by_bulk) == dump(by_rows)
        assert [e[1:] for e in by_bulk.load_log()] == [e[1:] for e in by_rows.load_log()]
        # again, into stored rows (staged and merged): nothing changes
        again = agents.load_dataset_dir(agency, sample / agency, by_bulk, batch_rows=5)
        assert {f.method for f in again.files} == {"bulk"}
        assert [(f.rows_before, f.rows_after) for f in again.files] == [
            (f.rows_after, f.rows_after) for f in fast.files]
        assert dump(by_bulk) == dump(by_rows)


def test_indexes_are_rebuilt_after_a_bulk_load(sample: Path,
                                               stores: Callable[[str, str], SqliteAgencyStore]
                                               ) -> None:
    store = stores("pboc", "pboc")
    before = set(store.fetch("SELECT name FROM sqlite_master WHERE type = 'index'", {}))
    agents.load_dataset_dir("pboc", sample / "pboc", store, batch_rows=50)
    assert set(store.fetch("SELECT name FROM sqlite_master WHERE type = 'index'", {})) == before
    plan = store.fetch("EXPLAIN QUERY PLAN SELECT * FROM transactions WHERE booked_on = "
                       ":d", {"d": "2026-09-01"})
    assert "transactions_by_booked_on" in str(plan)


def _bad_later_batch_cases() -> list[tuple[str, list[str], str]]:
    bad_date = transactions(20, 5)
    bad_date[17] = "T16,A1,X9,1.00,in,0,2026-02-30"
    repeated = transactions(20, 5)
    repeated[18] = "T3,A1,X9,1.00,in,0,2026-09-01"
    unresolved = transactions(20, 5)
    unresolved[19] = "T18,NOPE,X9,1.00,in,0,2026-09-01"
    return [
        ("bad value", bad_date, "transactions.csv, line 18, column 7 (booked_on)"),
        ("repeated key", repeated, "transactions.csv, line 19: key txn_id='T3' repeats line 5"),
        ("unresolved", unresolved,
         "transactions.csv, line 20, column 2 (account_no): account_no 'NOPE' is not in "
         "accounts.csv or the stored accounts"),
    ]


@pytest.mark.parametrize("stored", [False, True], ids=["into-empty", "into-stored"])
@pytest.mark.parametrize("case,rows,message", _bad_later_batch_cases(),
                         ids=[c[0] for c in _bad_later_batch_cases()])
def test_a_problem_in_a_later_batch_loads_nothing_and_is_named_as_by_the_row_path(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore], stored: bool,
        case: str, rows: list[str], message: str) -> None:
    store = stores("pboc", "pboc")
    if stored:
        write(tmp_path / "first", "accounts.csv", *accounts(5))
        write(tmp_path / "first", "transactions.csv", *transactions(3, 5))
        agents.load_dataset_dir("pboc", tmp_path / "first", store, batch_rows=2)
    before, log = dump(store), store.load_log()
    write(tmp_path / "in", "accounts.csv", *accounts(5))
    write(tmp_path / "in", "transactions.csv", *rows)
    with pytest.raises(DataFileError) as bulk_error:
        agents.load_dataset_dir("pboc", tmp_path / "in", store, batch_rows=3)
    assert message in str(bulk_error.value)
    with pytest.raises(DataFileError) as row_error:
        agents.load_dataset_dir("pboc", tmp_path / "in", store, batch_rows=3, bulk=False)
    assert str(bulk_error.value) == str(row_error.value)
    assert dump(store) == before and store.load_log() == log
    assert not [t for t in threading.enumerate() if t.name == "bulk-reader"]


def test_replace_in_bulk_deletes_missing_rows_and_refuses_orphans(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    store = stores("pboc", "pboc")
    write(tmp_path / "a", "accounts.csv", *accounts(6))
    write(tmp_path / "a", "transactions.csv", *transactions(12, 6))
    agents.load_dataset_dir("pboc", tmp_path / "a", store, batch_rows=4)
    write(tmp_path / "b", "transactions.csv", *transactions(4, 6))
    report = agents.load_dataset_dir("pboc", tmp_path / "b", store, replace=True, batch_rows=3)
    assert [(f.method, f.rows_before, f.rows_after) for f in report.files] == [
        ("bulk", 12, 4)]
    before = dump(store)
    write(tmp_path / "c", "accounts.csv", *accounts(2))  # A2..A5 are still referred to
    with pytest.raises(DataFileError, match="replacing accounts would remove account_no"):
        agents.load_dataset_dir("pboc", tmp_path / "c", store, replace=True, batch_rows=3)
    assert dump(store) == before


def test_quoted_fields_spanning_the_pieces_read_load_as_by_the_row_path(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "READ_BYTES", 7)
    rows = ["\ufeffbank,extra,opened_on,holder_id,account_no,holder_kind"]
    for i in range(30):
        bank = [f"Bank {i}", f'"Bank ""North"", {i}"', f'"Bank of\nShenzhen {i}"',
                f'"中国银行\r\n{i}"'][i % 4]
        rows.append(f'{bank},"x\n,y",2020-01-01,{uscc(i)},A{i},company')
    write(tmp_path / "in", "accounts.csv", *rows, newline="\r\n")
    by_bulk, by_rows = stores("pboc", "bulk"), stores("pboc", "rows")
    fast = agents.load_dataset_dir("pboc", tmp_path / "in", by_bulk, batch_rows=4)
    agents.load_dataset_dir("pboc", tmp_path / "in", by_rows, bulk=False)
    assert fast.files[0].method == "bulk" and fast.files[0].rows == 30
    assert dump(by_bulk) == dump(by_rows)
    assert any("\n" in str(row[3]) for row in dump(by_bulk)["accounts"])


def test_known_code_memory_refills_when_full(sample: Path,
                                             stores: Callable[[str, str], SqliteAgencyStore],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bulk, "CHECKED_CODES_MAX", 10)
    by_bulk, by_rows = stores("tax", "bulk"), stores("tax", "rows")
    fast = agents.load_dataset_dir("tax", sample / "tax", by_bulk, batch_rows=9)
    agents.load_dataset_dir("tax", sample / "tax", by_rows, bulk=False)
    assert {f.method for f in fast.files} == {"bulk"}
    assert dump(by_bulk) == dump(by_rows)
    memory = bulk.code_memory()
    codes = [uscc(i) for i in range(25)]
    assert memory[Kind.USCC].all_valid(codes)
    assert len(memory[Kind.USCC].known) <= 25
    assert not memory[Kind.USCC].all_valid([*codes[:5], codes[5][:17] + "?"])


# -- the column checks accept exactly what the parsers accept ------------------------------

_KINDS = {
    "identifier": Column("x", Kind.IDENTIFIER, ""),
    "text": Column("x", Kind.TEXT, ""),
    "uscc": Column("x", Kind.USCC, ""),
    "person_id": Column("x", Kind.PERSON_ID, ""),
    "amount": Column("x_cny", Kind.AMOUNT, ""),
    "date": Column("x_on", Kind.DATE, ""),
    "period": Column("x", Kind.PERIOD, ""),
    "enum": Column("x", Kind.ENUM, "", values=("in", "out")),
    "flag": Column("x", Kind.FLAG, ""),
}
_TRICKY = {
    "identifier": ["A1", "a.b/c:d-e_f", "1" * 64, "1" * 65, "-A", "A B", "A\nB", "", "Ä"],
    "text": ["甲公司", " a", "a ", "a\u3000", "\u2028a", "a\x00b", "a\x7f", "a\nb", "",
             " ", "x" * 200, "x" * 201, 'Bank "N", S'],
    "uscc": [uscc(1), uscc(1)[:17] + "0", uscc(1).lower(), "91350100M000100Y43",
             "91350100M000100Y4", "91350100I000100Y43", "913501A0M000100Y43",
             "91350100M000100Y43\n91350100M000100Y43"],
    "person_id": [pid(1), "11010519491231002X", "11010519491231002x", "110105194912310021",
                  "44052418800101001", "440524188001010014 "],
    "amount": ["1", "0.01", "12.5", "1000000.00", "999999999999.99", "0", "0.00", "-1",
               "+1", "1.234", "1e5", "1,000", " 1", "01", ".5", "1.", "NaN",
               "1000000000000.00", "9" * 22, "1\n2", "00.5", "0.5", "0.0", "1.0.0"],
    "date": ["2024-02-29", "2026-02-29", "2026-13-01", "2026-1-01", "2026-04-31",
             "20260101", "2026-01-01T00", "0999-01-01", "3000-01-01", "1000-01-01"],
    "period": ["2026-09", "2026-13", "2026-1", "202601", "2026-00", "2026-09-01"],
    "enum": ["in", "out", "IN", "", "in "],
    "flag": ["0", "1", "2", "01", "", " 1"],
}


def _parse_all(column: Column, values: list[str]) -> list[object] | None:
    parse = column.parser()
    try:
        return [parse(v) for v in values]
    except ValueError:
        return None


def _check_all(column: Column, values: list[str]) -> list[object] | None:
    check = bulk._ColumnCheck(agents.datasets_of("pboc")[0], bulk.code_memory())
    try:
        return list(check.column(column, values))
    except NotBulk:
        return None


@pytest.mark.parametrize("kind", list(_KINDS))
def test_column_checks_accept_exactly_what_the_parsers_accept(kind: str) -> None:
    column = _KINDS[kind]
    for value in _TRICKY[kind]:
        assert _check_all(column, [value]) == _parse_all(column, [value]), value
        good = _TRICKY[kind][0]
        assert _check_all(column, [good, value, good]) == _parse_all(
            column, [good, value, good]), value


_CHARS = st.sampled_from("0123456789.-:/ _AXxaZ\n\u3000中\"")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(_KINDS)), st.lists(st.text(_CHARS, max_size=20), min_size=1,
                                                 max_size=4))
def test_column_checks_agree_with_the_parsers_on_any_text(kind: str,
                                                          values: list[str]) -> None:
    column = _KINDS[kind]
    assert _check_all(column, values) == _parse_all(column, values)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(checks.USCC_ALPHABET), min_size=17, max_size=17),
       st.sampled_from(checks.USCC_ALPHABET), st.text(alphabet="0123456789", min_size=17,
                                                      max_size=17),
       st.sampled_from("0123456789X"))
def test_fast_check_digits_agree_with_the_standards(body: str, last: str, digits: str,
                                                    check: str) -> None:
    assert bulk.uscc_valid(body + last) == checks.is_valid_uscc(body + last)
    assert bulk.person_id_valid(digits + check) == checks.is_valid_person_id(digits + check)


# -- the CLI --------------------------------------------------------------------------------

def test_cli_load_shows_progress_on_stderr_only(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    _register()
    monkeypatch.setattr(data_cmd, "PROGRESS_AFTER_S", 0.0)
    monkeypatch.setattr(data_cmd, "PROGRESS_EVERY_S", 0.0)
    write(tmp_path / "in", "accounts.csv", *accounts(40))
    write(tmp_path / "in", "transactions.csv", *transactions(50_000, 40))
    result = CliRunner().invoke(cli, ["data", "load", "--agency", "pboc",
                                      str(tmp_path / "in"), "--store",
                                      str(tmp_path / "s.db"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [(f["dataset"], f["rows"], f["method"]) for f in report["files"]] == [
        ("accounts", 40, "bulk"), ("transactions", 50_000, "bulk")]
    lines = result.stderr.splitlines()
    assert any("transactions.csv: 20,000 rows" in line and "MB/s" in line for line in lines)
    assert any("transactions.csv: 50,000 rows, done in" in line for line in lines)


def test_a_bulk_load_uses_a_small_page_cache_and_gives_the_store_its_own_back(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from agents.common import store as store_module

    store = stores("pboc", "pboc")
    seen: list[object] = []
    write_rows = store_module.SqliteBulkSession.write

    def write(self: store_module.SqliteBulkSession, dataset: object,
              rows: list[tuple[object, ...]]) -> None:
        seen.append(self._db.execute("PRAGMA cache_size").fetchone()[0])
        write_rows(self, dataset, rows)  # type: ignore[arg-type]

    monkeypatch.setattr(store_module.SqliteBulkSession, "write", write)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "accounts.csv").write_text("\n".join(accounts(5)) + "\n")
    agents.load_dataset_dir("pboc", tmp_path / "in", store)
    assert seen == [-store_module.BULK_CACHE_KIB]
    assert store.fetch("PRAGMA cache_size", {}) == [(-store_module.CACHE_KIB,)]
