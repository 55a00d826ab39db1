"""The DuckDB reader of the bulk path (agents.common.duckread): its SQL checks accept
exactly what the columns' parsers accept, it stores what the row path stores, it hands
files it does not take to the Python bulk reader, and a load that fails or dies midway
leaves the store as it was (and in WAL mode)."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agents
from agents.common import duckread
from agents.common.csvread import DataFileError
from agents.common.loader import load_datasets
from agents.common.schema import Column
from agents.common.store import SqliteAgencyStore, SqliteBulkSession
from agents.generate import GeneratorConfig, generate
from exchange.errors import MalformedInput
from tests.unit.agents.test_bulk_load import (
    _CHARS,
    _KINDS,
    _TRICKY,
    _parse_all,
    accounts,
    dump,
    pid,
    transactions,
    uscc,
    write,
)


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
    out = tmp_path_factory.mktemp("duck") / "sample"
    generate(GeneratorConfig(seed=23, companies=300), out)
    return out


# -- the SQL checks accept exactly what the parsers accept ---------------------------------

def _duck_all(column: Column, values: list[str]) -> list[object] | None:
    """The stored values DuckDB makes of `values`, or None if it refuses one."""
    check = duckread.valid_sql(column, "v")
    query = (f"SELECT CASE WHEN v IS NOT NULL AND {check} THEN "
             f"{duckread.stored_sql(column, 'v')} ELSE error('refused') END "
             "FROM (SELECT unnest($values) AS v, generate_subscripts($values, 1) AS i) "
             "ORDER BY i")
    with duckdb.connect() as con:
        try:
            return [r[0] for r in con.execute(query, {"values": values}).fetchall()]
        except duckdb.Error:
            return None


@pytest.mark.parametrize("kind", list(_KINDS))
def test_duckdb_checks_accept_exactly_what_the_parsers_accept(kind: str) -> None:
    column = _KINDS[kind]
    good = _TRICKY[kind][0]
    for value in _TRICKY[kind]:
        assert _duck_all(column, [value]) == _parse_all(column, [value]), value
        assert _duck_all(column, [good, value, good]) == _parse_all(
            column, [good, value, good]), value


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(list(_KINDS)), st.lists(st.text(_CHARS, max_size=20), min_size=1,
                                                 max_size=4))
def test_duckdb_checks_agree_with_the_parsers_on_any_text(kind: str,
                                                          values: list[str]) -> None:
    column = _KINDS[kind]
    if kind == "amount":  # beyond 12 integer digits the reader leaves it to the row path
        values = [v for v in values if len(v.split(".")[0]) <= 12]
    assert _duck_all(column, values) == _parse_all(column, values)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("0123456789ABCDEFGHJKLMNPQRTUWXYIOSVZ"),
               min_size=18, max_size=18),
       st.text(alphabet="0123456789X", min_size=18, max_size=18))
def test_duckdb_check_digits_agree_with_the_standards(code: str, person: str) -> None:
    assert _duck_all(_KINDS["uscc"], [code]) == _parse_all(_KINDS["uscc"], [code])
    assert (_duck_all(_KINDS["person_id"], [person])
            == _parse_all(_KINDS["person_id"], [person]))


def test_text_may_not_start_or_end_with_any_white_space_python_strips() -> None:
    column = _KINDS["text"]
    for space in ["\u00a0", "\u2000", "\u3000", "\x1c", "\x85", "\t", "\u202f"]:
        for value in [f"{space}a", f"a{space}"]:
            assert _duck_all(column, [value]) is None, repr(value)
            assert _parse_all(column, [value]) is None, repr(value)
        assert _duck_all(column, [f"a{space}b"]) == _parse_all(column, [f"a{space}b"])


def test_holder_ids_are_checked_as_their_kind_says(tmp_path: Path,
                                                   stores: Callable[[str, str],
                                                                    SqliteAgencyStore]
                                                   ) -> None:
    header = "account_no,holder_kind,holder_id,bank,opened_on"
    write(tmp_path / "ok", "accounts.csv", header, f"A1,company,{uscc(1)},B,2020-01-01",
          f"A2,person,{pid(2)},B,2020-01-01")
    report = agents.load_dataset_dir("pboc", tmp_path / "ok", stores("pboc", "ok"))
    assert report.files[0].reader == "duckdb"
    write(tmp_path / "bad", "accounts.csv", header, f"A1,company,{uscc(1)},B,2020-01-01",
          f"A2,company,{pid(2)},B,2020-01-01")
    with pytest.raises(DataFileError, match="line 3, column 3 .holder_id.: "
                                                   "holder_kind company"):
        agents.load_dataset_dir("pboc", tmp_path / "bad", stores("pboc", "bad"))


# -- loads ----------------------------------------------------------------------------------

def test_duckdb_reader_python_reader_and_row_path_store_the_same_rows(
        sample: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    for agency in agents.AGENCIES:
        by_duck = stores(agency, f"{agency}-duck")
        by_python = stores(agency, f"{agency}-python")
        by_rows = stores(agency, f"{agency}-rows")
        duck = agents.load_dataset_dir(agency, sample / agency, by_duck, batch_rows=7)
        python = load_datasets(agency, agents.datasets_of(agency), sample / agency,
                               by_python, batch_rows=7, use_duckdb=False)
        rows = agents.load_dataset_dir(agency, sample / agency, by_rows, bulk=False)
        assert {(f.method, f.reader) for f in duck.files} == {("bulk", "duckdb")}
        assert {(f.method, f.reader) for f in python.files} == {("bulk", "python")}
        assert duck.files == python.files == rows.files  # rows, counts, digests
        assert dump(by_duck) == dump(by_python) == dump(by_rows)
        # again, into the stored rows (staged and merged): nothing changes
        again = agents.load_dataset_dir(agency, sample / agency, by_duck, batch_rows=5)
        assert {f.reader for f in again.files} == {"duckdb"}
        assert dump(by_duck) == dump(by_rows)


@pytest.mark.parametrize("batch_rows", [250, 20_000])
def test_many_rows_a_statement_store_what_the_row_path_stores(
        sample: Path, stores: Callable[[str, str], SqliteAgencyStore],
        batch_rows: int) -> None:
    """Batches of ROWS_PER_INSERT rows a statement and a remainder (250 = 2 x 100 + 50;
    20,000 takes a whole file's piece), in every dataset of every agency."""
    for agency in agents.AGENCIES:
        by_duck = stores(agency, f"{agency}-duck-{batch_rows}")
        by_rows = stores(agency, f"{agency}-rows-{batch_rows}")
        duck = agents.load_dataset_dir(agency, sample / agency, by_duck,
                                       batch_rows=batch_rows)
        rows = agents.load_dataset_dir(agency, sample / agency, by_rows, bulk=False)
        assert {f.reader for f in duck.files} == {"duckdb"}
        assert duck.files == rows.files
        assert dump(by_duck) == dump(by_rows)


def _wrong_check_digit(code: str) -> str:
    return code[:-1] + ("1" if code[-1] != "1" else "2")


@pytest.mark.parametrize(("column", "bad"), [
    (2, _wrong_check_digit(uscc(4_000))),  # holder_id: a uscc whose check digit is wrong
    (4, "2026-02-30"),  # opened_on: no such day
])
def test_a_value_checked_once_per_distinct_value_refuses_the_whole_load(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore],
        column: int, bad: str) -> None:
    """Codes and dates are checked on their distinct values beside the streaming rows:
    a bad one deep in the file, after thousands of rows were written, still loads
    nothing and the row path names it."""
    store = stores("pboc", "pboc")
    before = dump(store)
    lines = accounts(5_000)
    fields = lines[4_000].split(",")
    fields[column] = bad
    lines[4_000] = ",".join(fields)
    write(tmp_path / "in", "accounts.csv", *lines)
    with pytest.raises(DataFileError, match=rf"accounts.csv, line 4001, column {column + 1} "):
        agents.load_dataset_dir("pboc", tmp_path / "in", store, batch_rows=100)
    assert dump(store) == before


def test_an_absent_optional_value_is_stored_as_null(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    write(tmp_path / "in", "persons.csv", "person_id,name", f"{pid(1)},甲", f"{pid(2)},乙")
    write(tmp_path / "in", "records.csv", "record_id,person_id,kind,case_no,recorded_on",
          f"R1,{pid(1)},wanted,,2020-01-01", f"R2,{pid(2)},wanted,深公经〔2013〕9487号,2020-01-02")
    by_duck, by_rows = stores("police", "duck"), stores("police", "rows")
    report = agents.load_dataset_dir("police", tmp_path / "in", by_duck)
    agents.load_dataset_dir("police", tmp_path / "in", by_rows, bulk=False)
    assert {f.reader for f in report.files} == {"duckdb"}
    assert dump(by_duck) == dump(by_rows)
    assert dump(by_duck)["records"][0][3] is None


def test_quoted_fields_are_read_by_duckdb_as_by_the_row_path(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    rows = accounts(12)
    rows[3] = f'A2,company,{uscc(2)},"Bank ""North"", Ltd.",2020-01-01'
    rows[4] = f'"A3",company,{uscc(3)},Bank "South",2020-01-01'
    write(tmp_path / "in", "accounts.csv", *rows)
    by_bulk, by_rows = stores("pboc", "bulk"), stores("pboc", "rows")
    fast = agents.load_dataset_dir("pboc", tmp_path / "in", by_bulk, batch_rows=5)
    agents.load_dataset_dir("pboc", tmp_path / "in", by_rows, bulk=False)
    assert [(f.reader, f.rows) for f in fast.files] == [("duckdb", 12)]
    assert dump(by_bulk) == dump(by_rows)
    assert ("A2", "company", uscc(2), 'Bank "North", Ltd.', "2020-01-01") in dump(
        by_bulk)["accounts"]


def test_a_file_duckdb_would_read_apart_is_read_by_the_python_reader(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    spaced = accounts(12)
    spaced[3] = f'A2,company,{uscc(2)}, "Bank",2020-01-01'  # csv.reader keeps the space
    cases = {"blank line": [*accounts(12)[:5], "", *accounts(12)[5:]],
             "carriage returns": [r + "\r" for r in accounts(12)],
             "byte order mark": ["\ufeff" + accounts(12)[0], *accounts(12)[1:]]}
    for name, lines in cases.items():
        write(tmp_path / name, "accounts.csv", *lines)
        by_bulk, by_rows = stores("pboc", f"{name}-bulk"), stores("pboc", f"{name}-rows")
        fast = agents.load_dataset_dir("pboc", tmp_path / name, by_bulk, batch_rows=5)
        agents.load_dataset_dir("pboc", tmp_path / name, by_rows, bulk=False)
        assert [(f.reader, f.rows) for f in fast.files] == [("python", 12)], name
        assert dump(by_bulk) == dump(by_rows), name
    write(tmp_path / "spaced", "accounts.csv", *spaced)
    with pytest.raises(DataFileError, match="line 4, column 4 .bank.: .* white space"):
        agents.load_dataset_dir("pboc", tmp_path / "spaced", stores("pboc", "spaced"))


def test_a_quoted_line_break_loads_as_by_the_row_path(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    rows = accounts(12)
    rows[3] = f'A2,company,{uscc(2)},"Bank of\nShenzhen",2020-01-01'
    write(tmp_path / "in", "accounts.csv", *rows)
    by_bulk, by_rows = stores("pboc", "bulk"), stores("pboc", "rows")
    fast = agents.load_dataset_dir("pboc", tmp_path / "in", by_bulk, batch_rows=5)
    agents.load_dataset_dir("pboc", tmp_path / "in", by_rows, bulk=False)
    assert [f.rows for f in fast.files] == [12]
    assert dump(by_bulk) == dump(by_rows)


def test_a_header_alone_and_columns_in_another_order_load(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    write(tmp_path / "a", "accounts.csv", "opened_on, bank ,holder_id,holder_kind,"
          "account_no,extra", f"2020-01-01,B,{uscc(1)},company,A1,ignored")
    write(tmp_path / "a", "transactions.csv", transactions(0, 1)[0])
    store = stores("pboc", "a")
    report = agents.load_dataset_dir("pboc", tmp_path / "a", store)
    assert [(f.reader, f.rows) for f in report.files] == [("duckdb", 1), ("duckdb", 0)]
    assert dump(store)["accounts"] == [("A1", "company", uscc(1), "B", "2020-01-01")]


def test_an_error_midway_leaves_the_store_as_it_was_and_in_wal_mode(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore],
        monkeypatch: pytest.MonkeyPatch) -> None:
    store = stores("pboc", "pboc")
    write(tmp_path / "first", "accounts.csv", *accounts(5))
    agents.load_dataset_dir("pboc", tmp_path / "first", store)
    before, log = dump(store), store.load_log()
    write(tmp_path / "in", "accounts.csv", *accounts(40))
    write(tmp_path / "in", "transactions.csv", *transactions(3_000, 40))
    written: list[int] = []
    write_rows = SqliteBulkSession.write

    def write_then_fail(self: SqliteBulkSession, dataset: object,
                        rows: list[tuple[object, ...]]) -> None:
        write_rows(self, dataset, rows)  # type: ignore[arg-type]
        written.append(len(rows))
        if len(written) == 4:
            raise OSError(28, "No space left on device", "store")

    monkeypatch.setattr(SqliteBulkSession, "write", write_then_fail)
    with pytest.raises(MalformedInput, match="No space left on device"):
        agents.load_dataset_dir("pboc", tmp_path / "in", store, batch_rows=500)
    assert len(written) == 4
    assert dump(store) == before and store.load_log() == log
    assert store.fetch("PRAGMA journal_mode", {}) == [("wal",)]
    assert not [t for t in threading.enumerate() if t.name.startswith("load-")]


def test_a_load_beside_another_connection_stays_in_wal_mode(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    store = stores("pboc", "pboc")
    other = sqlite3.connect(store.path)
    try:
        other.execute("SELECT COUNT(*) FROM accounts").fetchone()
        assert store._journal_alone() == "wal"
        write(tmp_path / "in", "accounts.csv", *accounts(5))
        agents.load_dataset_dir("pboc", tmp_path / "in", store)
        assert other.execute("SELECT COUNT(*) FROM accounts").fetchone() == (5,)
    finally:
        other.close()
    assert store.fetch("PRAGMA journal_mode", {}) == [("wal",)]


def test_a_load_beside_another_process_stays_in_wal_mode(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    store = stores("pboc", "pboc")
    reader = ("import sqlite3, sys\n"
              "db = sqlite3.connect(sys.argv[1])\n"
              "db.execute('SELECT COUNT(*) FROM accounts').fetchone()\n"
              "print('open', flush=True)\n"
              "sys.stdin.read()\n"
              "print(db.execute('SELECT COUNT(*) FROM accounts').fetchone()[0])\n")
    child = subprocess.Popen([sys.executable, "-c", reader, str(store.path)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline() == "open\n"
        assert store._journal_alone() == "wal"
        write(tmp_path / "in", "accounts.csv", *accounts(5))
        agents.load_dataset_dir("pboc", tmp_path / "in", store)
    finally:
        out, _ = child.communicate("")
    assert out == "5\n"
    assert store.fetch("PRAGMA journal_mode", {}) == [("wal",)]


def test_a_load_killed_midway_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "pboc.db"
    write(tmp_path / "first", "accounts.csv", *accounts(40))
    with agents.open_store("pboc", path) as store:
        agents.load_dataset_dir("pboc", tmp_path / "first", store)
        before = dump(store)
    write(tmp_path / "in", "accounts.csv", *accounts(40))
    write(tmp_path / "in", "transactions.csv", *transactions(400_000, 40))
    loader = ("import sys; from pathlib import Path; import agents\n"
              "store = agents.open_store('pboc', Path(sys.argv[1]))\n"
              "agents.load_dataset_dir('pboc', Path(sys.argv[2]), store, batch_rows=1000,"
              " progress=lambda p: print(p.dataset, p.rows, p.done, file=sys.stderr,"
              " flush=True))\n")
    child = subprocess.Popen([sys.executable, "-c", loader, str(path), str(tmp_path / "in")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[3])
    assert child.stderr is not None
    try:
        for line in child.stderr:  # wait until transactions are being written
            if line.startswith("transactions ") and line.split()[2] == "False":
                break
        else:
            pytest.fail("the load ended before it was killed")
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert child.returncode == -signal.SIGKILL
    with agents.open_store("pboc", path) as store:
        assert dump(store) == before
        assert store.fetch("PRAGMA journal_mode", {}) == [("wal",)]
        assert store.fetch("PRAGMA integrity_check", {}) == [("ok",)]


def test_a_bad_value_deep_in_a_big_file_loads_nothing_and_is_named(
        tmp_path: Path, stores: Callable[[str, str], SqliteAgencyStore]) -> None:
    store = stores("pboc", "pboc")
    write(tmp_path / "first", "accounts.csv", *accounts(40))
    agents.load_dataset_dir("pboc", tmp_path / "first", store)
    before, log = dump(store), store.load_log()
    rows = transactions(150_000, 40)
    rows[149_990] = "T149989,A9,X1,12.345,in,0,2026-09-01"
    write(tmp_path / "in", "accounts.csv", *accounts(40))
    write(tmp_path / "in", "transactions.csv", *rows)
    with pytest.raises(DataFileError, match=r"transactions.csv, line 149991, column 4 "
                                            r"\(amount_cny\): '12.345' is not an amount"):
        agents.load_dataset_dir("pboc", tmp_path / "in", store)
    assert dump(store) == before and store.load_log() == log
    assert store.fetch("PRAGMA journal_mode", {}) == [("wal",)]


def test_a_store_whose_tables_have_primary_keys_loads_as_before(
        tmp_path: Path) -> None:
    from agents.common import store as store_module

    path = tmp_path / "old.db"
    agents.open_store("pboc", path).close()
    db = sqlite3.connect(path)  # the tables as stores made them before
    for dataset in agents.datasets_of("pboc"):
        table = store_module.create_table_sql(dataset, key_index=False)[0]
        key = ", ".join(dataset.stored(k) for k in dataset.key)
        db.execute(f'DROP TABLE "{dataset.name}"')
        db.execute(table[:-1] + f", PRIMARY KEY ({key}))")
    db.commit()
    db.close()
    write(tmp_path / "a", "accounts.csv", *accounts(6))
    write(tmp_path / "a", "transactions.csv", *transactions(30, 6))
    repeated = transactions(30, 6)
    repeated[20] = "T2,A1,X9,1.00,in,0,2026-09-01"
    write(tmp_path / "b", "transactions.csv", *repeated)
    with agents.open_store("pboc", path) as old, agents.open_store(
            "pboc", tmp_path / "new.db") as new:
        assert store_module.has_primary_key(old._db, agents.datasets_of("pboc")[1])
        assert not store_module.has_primary_key(new._db, agents.datasets_of("pboc")[1])
        for store in (old, new):
            report = agents.load_dataset_dir("pboc", tmp_path / "a", store, batch_rows=4)
            assert {f.reader for f in report.files} == {"duckdb"}
            agents.load_dataset_dir("pboc", tmp_path / "a", store, batch_rows=4)  # merged
            with pytest.raises(DataFileError, match="line 21: key txn_id=.T2. repeats line 4"):
                agents.load_dataset_dir("pboc", tmp_path / "b", store, replace=True)
        assert dump(old) == dump(new)
        indexes = {r[0] for r in old.fetch("SELECT name FROM sqlite_master WHERE "
                                           "type = 'index' AND sql IS NOT NULL", {})}
        assert "transactions_key" not in indexes and "transactions_by_booked_on" in indexes
