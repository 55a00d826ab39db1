"""An agency's own store of its datasets, behind a small adapter interface.

`AgencyStore` is what the loader and the views need; `SqliteAgencyStore` is the default
adapter (one SQLite file per agency, WAL, synchronous=FULL). Another adapter (an agency
whose records live in PostgreSQL) implements the same two protocols:

- a load runs in one `LoadSession`, one database transaction: rows are staged with their
  line numbers, checked (repeated keys, unresolved references) where the data is, merged
  into the tables, and the whole load commits or nothing does;
- the views run read-only SQL through `fetch`, written in portable SQL with `:name`
  parameters (an adapter translates the placeholders to its driver's style).

Tables are named after the datasets, columns after the contract's columns, except that
amounts are integer fen in a column named ``*_fen`` (``amount_cny`` -> ``amount_fen``).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Protocol

from agents.common.bulk import Batch, FlatRows
from agents.common.schema import Dataset, Kind, Reference
from exchange.errors import MalformedInput

SCHEMA_VERSION = 1
STORE_FILE_NAME = "agency.db"
BUSY_TIMEOUT_MS = 10_000
# Page cache per connection (main and temp schemas): large loads build big indexes.
CACHE_KIB = 262_144
# Page cache during a bulk load (SqliteAgencyStore.bulk_session).
BULK_CACHE_KIB = 65_536
# While a bulk load builds an index: sorted in runs of this size by worker threads.
SORT_CACHE_KIB = 4_096
SORT_THREADS = max(1, min(4, os.cpu_count() or 1))
# A streamed read's own connection: a sequential scan, sorted in temporary files; a page
# cache of the store's size for each of a node's concurrent streams held a node's memory
# near 1 GiB.
STREAM_CACHE_KIB = 16_384
# Rows a statement inserts when a bulk reader hands them as one flat list (SQLite takes
# up to 32,766 parameters; a dataset has at most a dozen columns).
ROWS_PER_INSERT = 100
# Page size of a new store: large loads write and index fewer, fuller pages (a 93 MB
# file of invoices loaded in 2.65 CPU s at 16 KiB against 2.9 s at 4 KiB, measured).
PAGE_BYTES = 16_384


@dataclass(frozen=True)
class DuplicateKey:
    """A key met twice in one file."""

    key: tuple[object, ...]
    first_line: int
    line: int


@dataclass(frozen=True)
class Unresolved:
    """A staged row whose reference is neither staged nor stored."""

    line: int
    value: object


@dataclass(frozen=True)
class Orphan:
    """A stored row whose reference the load would remove."""

    key: tuple[object, ...]
    value: object


@dataclass(frozen=True)
class MergeCounts:
    rows_before: int
    rows_after: int


class LoadSession(Protocol):
    """One atomic load: everything staged and merged in it commits together or not at
    all (an exception leaving the session rolls it back)."""

    def stage(self, dataset: Dataset, rows: Sequence[tuple[object, ...]]) -> DuplicateKey | None:
        """Append rows ``(line, *values in dataset column order)`` to the dataset's
        staging area. Returns the first repeated key (the rows before it are staged)."""
        ...

    def first_unresolved(self, dataset: Dataset, ref: Reference, target: Dataset,
                         target_staged: bool, target_stored: bool) -> Unresolved | None:
        """The lowest-line staged row of `dataset` whose `ref.column` is not a key of
        `target` among its staged rows (if `target_staged`) or its stored rows (if
        `target_stored`)."""
        ...

    def merge(self, dataset: Dataset, replace: bool) -> MergeCounts:
        """Write the staged rows into the dataset's table: a staged row replaces a stored
        row with its key; with `replace`, stored rows not staged are deleted."""
        ...

    def first_orphan(self, dataset: Dataset, ref: Reference, target: Dataset) -> Orphan | None:
        """After merging: a stored row of `dataset` whose reference has no target row."""
        ...

    def log_file(self, dataset: Dataset, file_name: str, file_sha256: str, rows: int,
                 replace: bool) -> None:
        """Record in the store's load log that this file was loaded."""
        ...


# Rows a streamed read holds at a time.
STREAM_BATCH_ROWS = 10_000


class AgencyStore(Protocol):
    """An agency's store of its own datasets."""

    @property
    def agency(self) -> str: ...

    def load_session(self) -> contextlib.AbstractContextManager[LoadSession]: ...

    def fetch(self, sql: str, params: Mapping[str, object]) -> list[tuple[object, ...]]:
        """Rows of a read-only query (portable SQL, `:name` parameters)."""
        ...

    def stream(self, sql: str, params: Mapping[str, object],
               batch_rows: int = STREAM_BATCH_ROWS) -> Iterator[tuple[object, ...]]:
        """fetch, row by row, holding at most `batch_rows` rows at a time: for reads
        whose size grows with the register (a period-wide view, an own input)."""
        ...

    def row_count(self, dataset: Dataset) -> int: ...

    def close(self) -> None: ...


def _quote(name: str) -> str:
    assert name.replace("_", "").isalnum(), name
    return f'"{name}"'


def _columns(names: Sequence[str]) -> str:
    return ", ".join(_quote(n) for n in names)


def _stage_table(dataset: Dataset) -> str:
    return f'temp."stage_{dataset.name}"'


def _main_table(dataset: Dataset) -> str:
    return f'main."{dataset.name}"'


def store_indexes(dataset: Dataset) -> list[tuple[str, ...]]:
    """The dataset's indexes (stored column names) besides its key's: those its
    schema lists, and one for each lookup column (a key column or a uscc, person_id or
    holder_id column, as agents.lookup matches subjects) that no index starts with."""
    indexes = list(dataset.indexes)
    leading = {dataset.stored(dataset.key[0])} | {index[0] for index in indexes}
    for c in dataset.columns:
        if ((c.name in dataset.key or c.kind in (Kind.USCC, Kind.PERSON_ID, Kind.HOLDER_ID))
                and c.stored_name not in leading):
            indexes.append((c.stored_name,))
            leading.add(c.stored_name)
    return indexes


def create_table_sql(dataset: Dataset, key_index: bool = True) -> list[str]:
    """The DDL of one dataset's table and its indexes. The key is a unique index of its
    own, which a bulk load builds after the rows like the others (found 0.35 s faster
    in 2.5 s for 960,742 invoices than keeping a primary key in order row by row);
    `key_index=False` for a table made with its key as primary key, as stores were
    before (see `has_primary_key`)."""
    cols = []
    for c in dataset.columns:
        null = "" if c.optional else " NOT NULL"
        cols.append(f"{_quote(c.stored_name)} {c.sql_type}{null}")
    key = _columns([dataset.stored(k) for k in dataset.key])
    statements = [f'CREATE TABLE IF NOT EXISTS "{dataset.name}" ({", ".join(cols)})']
    if key_index:
        statements.append(f'CREATE UNIQUE INDEX IF NOT EXISTS "{_key_index_name(dataset)}" '
                          f'ON "{dataset.name}" ({key})')
    for index in store_indexes(dataset):
        statements.append(f'CREATE INDEX IF NOT EXISTS "{_index_name(dataset, index)}" '
                          f'ON "{dataset.name}" ({_columns(index)})')
    return statements


def has_primary_key(db: sqlite3.Connection, dataset: Dataset) -> bool:
    """The dataset's table exists with its key as primary key (made before the key
    became an index of its own)."""
    return db.execute("SELECT 1 FROM pragma_index_list(?) WHERE origin = 'pk'",
                      (dataset.name,)).fetchone() is not None


def _key_index_name(dataset: Dataset) -> str:
    return f"{dataset.name}_key"


_META = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS load_log (
    entry INTEGER PRIMARY KEY,
    loaded_at_ms INTEGER NOT NULL,
    dataset TEXT NOT NULL,
    file_name TEXT NOT NULL,
    file_sha256 TEXT NOT NULL,
    row_count INTEGER NOT NULL,
    replace INTEGER NOT NULL
);
"""


class SqliteAgencyStore:
    """The default adapter: one SQLite file holding one agency's datasets."""

    def __init__(self, path: Path, agency: str, datasets: Sequence[Dataset]) -> None:
        self.path = path
        self._agency = agency
        self.datasets = tuple(datasets)
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._db.execute(f"PRAGMA page_size={PAGE_BYTES}")  # a new file's only
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
            self._db.execute("PRAGMA temp_store=FILE")
            self._init_schema()
        except BaseException:
            self._db.close()
            raise

    @property
    def agency(self) -> str:
        return self._agency

    def _init_schema(self) -> None:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _META.split(";"):
                if statement.strip():
                    db.execute(statement)
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if not meta:
                db.executemany("INSERT INTO meta (key, value) VALUES (?, ?)",
                               [("agency", self._agency),
                                ("schema_version", str(SCHEMA_VERSION))])
            elif meta.get("agency") != self._agency:
                raise MalformedInput(f"{self.path}: this store holds the datasets of "
                                     f"{meta.get('agency')!r}, not {self._agency!r}")
            elif meta.get("schema_version") != str(SCHEMA_VERSION):
                raise MalformedInput(f"{self.path}: store schema version "
                                     f"{meta.get('schema_version')}, expected {SCHEMA_VERSION}")
            for dataset in self.datasets:
                for statement in create_table_sql(dataset,
                                                  not has_primary_key(db, dataset)):
                    db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def load_session(self) -> Iterator[LoadSession]:
        with self._lock:
            session = _SqliteLoadSession(self._db)
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield session
            except BaseException:
                self._db.execute("ROLLBACK")
                session.drop_staging()
                raise
            self._db.execute("COMMIT")
            session.drop_staging()

    @contextlib.contextmanager
    def bulk_session(self) -> Iterator[SqliteBulkSession]:
        """One atomic load through the bulk path (see SqliteBulkSession).

        When no other connection has the store open, the load's one transaction is
        journaled with a rollback journal instead of the write-ahead log: pages the load
        adds past the end of the file are written once instead of twice (into the log,
        then copied into the file), and the journal keeps only the pages it changes.
        Either way a load that does not commit leaves the store as it was (a process
        that dies mid-load leaves a journal that the next opening rolls back), and the
        store is in WAL mode again after it."""
        with self._lock:
            session = SqliteBulkSession(self._db)
            # rows go to the tables in order and indexes are sorted once: a smaller page
            # cache loads as fast (measured) and keeps the loader's memory down
            self._db.execute(f"PRAGMA cache_size=-{BULK_CACHE_KIB}")
            try:
                self._journal_alone()
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield session
                except BaseException:
                    self._db.execute("ROLLBACK")
                    session.drop_staging()
                    raise
                self._db.execute("COMMIT")
                session.drop_staging()
            finally:
                self._db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
                self._db.execute("PRAGMA journal_mode=WAL")

    def _journal_alone(self) -> str:
        """A rollback journal if this is the store's only connection (leaving WAL mode
        needs that), else WAL as before; the journal mode in force."""
        self._db.execute("PRAGMA busy_timeout=0")  # no waiting for the others to go
        try:
            (mode,) = self._db.execute("PRAGMA journal_mode=DELETE").fetchone()
        except sqlite3.OperationalError:  # another connection holds the store
            (mode,) = self._db.execute("PRAGMA journal_mode").fetchone()
        finally:
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return str(mode)

    def fetch(self, sql: str, params: Mapping[str, object]) -> list[tuple[object, ...]]:
        with self._lock:
            return [tuple(r) for r in self._db.execute(sql, dict(params)).fetchall()]

    def stream(self, sql: str, params: Mapping[str, object],
               batch_rows: int = STREAM_BATCH_ROWS) -> Iterator[tuple[object, ...]]:
        # a read-only connection of its own (WAL: a consistent snapshot that neither
        # blocks nor waits for this store's other users)
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            db.execute(f"PRAGMA cache_size=-{STREAM_CACHE_KIB}")
            db.execute("PRAGMA temp_store=FILE")
            cursor = db.execute(sql, dict(params))
            while True:
                batch = cursor.fetchmany(batch_rows)
                if not batch:
                    return
                yield from (tuple(r) for r in batch)
        finally:
            db.close()

    def row_count(self, dataset: Dataset) -> int:
        with self._lock:
            (n,) = self._db.execute(f"SELECT COUNT(*) FROM {_main_table(dataset)}").fetchone()
        return int(n)

    def load_log(self) -> list[tuple[object, ...]]:
        """Every file loaded, oldest first: (time ms, dataset, file, sha256, rows, replace)."""
        with self._lock:
            return [tuple(r) for r in self._db.execute(
                "SELECT loaded_at_ms, dataset, file_name, file_sha256, row_count, replace "
                "FROM load_log ORDER BY entry").fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> SqliteAgencyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SqliteLoadSession:
    """Staging tables in SQLite's temp schema, inside the load's transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._staged: dict[str, Dataset] = {}
        self._insert_sql: dict[str, str] = {}

    def _ensure_stage(self, dataset: Dataset) -> str:
        sql = self._insert_sql.get(dataset.name)
        if sql is not None:
            return sql
        assert dataset.name not in self._staged, dataset.name
        table = _stage_table(dataset)
        cols = ", ".join(f"{_quote(c.stored_name)} {c.sql_type}" for c in dataset.columns)
        key = _columns([dataset.stored(k) for k in dataset.key])
        self._db.execute(f"DROP TABLE IF EXISTS {table}")
        self._db.execute(f"CREATE TABLE {table} (line INTEGER PRIMARY KEY, {cols}, "
                         f"UNIQUE ({key}))")
        self._staged[dataset.name] = dataset
        placeholders = ", ".join("?" * (len(dataset.columns) + 1))
        sql = (f"INSERT INTO {table} (line, {_columns(dataset.stored_names)}) "
               f"VALUES ({placeholders})")
        self._insert_sql[dataset.name] = sql
        return sql

    def stage(self, dataset: Dataset, rows: Sequence[tuple[object, ...]]) -> DuplicateKey | None:
        sql = self._ensure_stage(dataset)
        try:
            self._db.executemany(sql, rows)
        except sqlite3.IntegrityError:
            return self._find_duplicate(dataset, rows)
        return None

    def _find_duplicate(self, dataset: Dataset, rows: Sequence[tuple[object, ...]]
                        ) -> DuplicateKey:
        # executemany stopped at the first row whose key was already staged: the rows
        # before it are in, so the first row whose key is staged under another line is it.
        key_at = [1 + dataset.position(k) for k in dataset.key]
        where = " AND ".join(f"{_quote(dataset.stored(k))} = ?" for k in dataset.key)
        query = f"SELECT line FROM {_stage_table(dataset)} WHERE {where}"
        for row in rows:
            key = tuple(row[i] for i in key_at)
            found = self._db.execute(query, key).fetchone()
            assert found is not None, (dataset.name, row[0])
            line = row[0]
            assert isinstance(line, int)
            if found[0] != line:
                return DuplicateKey(key=key, first_line=int(found[0]), line=line)
        raise AssertionError(f"{dataset.name}: no repeated key in the failing batch")

    def first_unresolved(self, dataset: Dataset, ref: Reference, target: Dataset,
                         target_staged: bool, target_stored: bool) -> Unresolved | None:
        self._ensure_stage(dataset)  # a file of a header alone stages nothing
        if target_staged:
            self._ensure_stage(target)
        assert len(target.key) == 1, target.name
        col = _quote(dataset.stored(ref.column))
        target_key = _quote(target.stored(target.key[0]))
        conditions = ["1"]
        if target_staged:
            conditions.append(f"NOT EXISTS (SELECT 1 FROM {_stage_table(target)} t "
                              f"WHERE t.{target_key} = s.{col})")
        if target_stored:
            conditions.append(f"NOT EXISTS (SELECT 1 FROM {_main_table(target)} t "
                              f"WHERE t.{target_key} = s.{col})")
        row = self._db.execute(
            f"SELECT s.line, s.{col} FROM {_stage_table(dataset)} s "
            f"WHERE {' AND '.join(conditions)} ORDER BY s.line LIMIT 1").fetchone()
        return None if row is None else Unresolved(line=int(row[0]), value=row[1])

    def merge(self, dataset: Dataset, replace: bool) -> MergeCounts:
        self._ensure_stage(dataset)  # an empty file stages nothing but still merges
        main = _main_table(dataset)
        (before,) = self._db.execute(f"SELECT COUNT(*) FROM {main}").fetchone()
        cols = _columns(dataset.stored_names)
        select = f"SELECT {cols} FROM {_stage_table(dataset)} WHERE 1 ORDER BY line"
        if replace:
            self._db.execute(f"DELETE FROM {main}")
            self._db.execute(f"INSERT INTO {main} ({cols}) {select}")
        else:
            key = _columns([dataset.stored(k) for k in dataset.key])
            updates = ", ".join(f"{_quote(n)} = excluded.{_quote(n)}"
                                for n in dataset.stored_names
                                if n not in {dataset.stored(k) for k in dataset.key})
            self._db.execute(f"INSERT INTO {main} ({cols}) {select} "
                             f"ON CONFLICT ({key}) DO UPDATE SET {updates}")
        (after,) = self._db.execute(f"SELECT COUNT(*) FROM {main}").fetchone()
        return MergeCounts(rows_before=int(before), rows_after=int(after))

    def first_orphan(self, dataset: Dataset, ref: Reference, target: Dataset) -> Orphan | None:
        assert len(target.key) == 1, target.name
        col = _quote(dataset.stored(ref.column))
        target_key = _quote(target.stored(target.key[0]))
        keys = _columns([dataset.stored(k) for k in dataset.key])
        row = self._db.execute(
            f"SELECT s.{col}, {keys} FROM {_main_table(dataset)} s "
            f"WHERE NOT EXISTS (SELECT 1 FROM {_main_table(target)} t "
            f"WHERE t.{target_key} = s.{col}) LIMIT 1").fetchone()
        return None if row is None else Orphan(key=tuple(row[1:]), value=row[0])

    def log_file(self, dataset: Dataset, file_name: str, file_sha256: str, rows: int,
                 replace: bool) -> None:
        self._db.execute(
            "INSERT INTO load_log (loaded_at_ms, dataset, file_name, file_sha256, "
            "row_count, replace) VALUES (?, ?, ?, ?, ?, ?)",
            (int(time.time() * 1000), dataset.name, file_name, file_sha256, rows,
             int(replace)))

    def drop_staging(self) -> None:
        for dataset in self._staged.values():
            self._db.execute(f"DROP TABLE IF EXISTS {_stage_table(dataset)}")
        self._staged.clear()
        self._insert_sql.clear()


class RowsRefused(Exception):
    """The bulk path met a problem (a key repeated in a file, a reference that does not
    resolve, a row a replace would orphan) that the row path must find and name."""


class SqliteBulkSession(_SqliteLoadSession):
    """A load written straight into the tables, for rows already known to be valid.

    A dataset that is empty (or emptied by replace) gets its rows inserted into its table
    with its secondary indexes dropped and built again after, in the same transaction;
    its key's unique index, built first, catches a repeated key. A dataset with stored
    rows gets them through a staging table keyed like it, then merged as the row path merges. References and
    orphans are checked on the tables once every file is in. Any problem raises
    RowsRefused, and the caller rolls the whole load back.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__(db)
        self._direct: dict[str, bool] = {}
        self._sql: dict[str, str] = {}  # a dataset's one-row INSERT
        self._sql_many: dict[str, str] = {}  # and its ROWS_PER_INSERT-row one
        self._written: dict[str, int] = {}

    def rows_stored(self, dataset: Dataset) -> int:
        (n,) = self._db.execute(f"SELECT COUNT(*) FROM {_main_table(dataset)}").fetchone()
        return int(n)

    def begin(self, dataset: Dataset, replace: bool) -> None:
        """Prepare to write the dataset's rows."""
        assert dataset.name not in self._direct, dataset.name
        main = _main_table(dataset)
        if replace:
            self._db.execute(f"DELETE FROM {main}")
        direct = self.rows_stored(dataset) == 0
        self._direct[dataset.name] = direct
        # an absent optional value comes as None or "" (agents.common.duckread)
        placeholders = ", ".join("NULLIF(?, '')" if c.optional else "?"
                                 for c in dataset.columns)
        cols = _columns(dataset.stored_names)
        if direct:
            self._db.execute(f'DROP INDEX IF EXISTS "{_key_index_name(dataset)}"')
            for index in store_indexes(dataset):
                self._db.execute(f'DROP INDEX IF EXISTS "{_index_name(dataset, index)}"')
            table = main
        else:
            table = _stage_table(dataset)
            types = ", ".join(f"{_quote(c.stored_name)} {c.sql_type}"
                              for c in dataset.columns)
            key = _columns([dataset.stored(k) for k in dataset.key])
            self._db.execute(f"DROP TABLE IF EXISTS {table}")
            self._db.execute(f"CREATE TABLE {table} ({types}, PRIMARY KEY ({key}))")
            self._staged[dataset.name] = dataset
        self._sql[dataset.name] = f"INSERT INTO {table} ({cols}) VALUES ({placeholders})"
        self._sql_many[dataset.name] = (f"INSERT INTO {table} ({cols}) VALUES "
                                        + ", ".join([f"({placeholders})"] * ROWS_PER_INSERT))

    def write(self, dataset: Dataset, rows: Batch) -> None:
        """Rows of stored values in dataset column order (no line number), as rows or
        as one flat list (FlatRows: ROWS_PER_INSERT rows a statement)."""
        try:
            if isinstance(rows, FlatRows):
                self._write_flat(dataset, rows)
            else:
                self._db.executemany(self._sql[dataset.name], rows)
        except sqlite3.IntegrityError:
            raise RowsRefused(f"{dataset.name}: a repeated key") from None
        except sqlite3.ProgrammingError:  # a row of another width
            raise RowsRefused(f"{dataset.name}: a row of another width") from None
        self._written[dataset.name] = self._written.get(dataset.name, 0) + len(rows)

    def _write_flat(self, dataset: Dataset, rows: FlatRows) -> None:
        width = len(dataset.columns)
        if rows.width != width or len(rows.values) % width:
            raise RowsRefused(f"{dataset.name}: a row of another width")
        flat = rows.values
        step = ROWS_PER_INSERT * width
        whole = len(flat) - len(flat) % step
        self._db.executemany(self._sql_many[dataset.name],
                             (flat[at:at + step] for at in range(0, whole, step)))
        self._db.executemany(self._sql[dataset.name],
                             (flat[at:at + width] for at in range(whole, len(flat), width)))

    def finish(self, dataset: Dataset) -> int:
        """Build the indexes again, or merge the staged rows into the table; the rows
        the table holds now."""
        if self._direct[dataset.name]:
            # SQLite sorts an index's keys in runs of the page cache's size, each run on
            # a worker thread, and merges them: with a small cache the sorting is spread
            # over the cores instead of done on this thread (measured: the writer's own
            # CPU for 960,742 invoices' three indexes fell from 2.0 s to 0.4-0.7 s)
            self._db.execute(f"PRAGMA threads={SORT_THREADS}")
            self._db.execute(f"PRAGMA cache_size=-{SORT_CACHE_KIB}")
            try:
                # the key's unique index first: a repeated key stops the load before the
                # others are sorted
                for statement in create_table_sql(
                        dataset, not has_primary_key(self._db, dataset))[1:]:
                    self._db.execute(statement)
            except sqlite3.IntegrityError:
                raise RowsRefused(f"{dataset.name}: a repeated key") from None
            finally:
                self._db.execute(f"PRAGMA cache_size=-{BULK_CACHE_KIB}")
                self._db.execute("PRAGMA threads=0")
            return self._written.get(dataset.name, 0)  # into an empty table, each new
        key_names = [dataset.stored(k) for k in dataset.key]
        updates = ", ".join(f"{_quote(n)} = excluded.{_quote(n)}"
                            for n in dataset.stored_names if n not in key_names)
        cols = _columns(dataset.stored_names)
        self._db.execute(f"INSERT INTO {_main_table(dataset)} ({cols}) "
                         f"SELECT {cols} FROM {_stage_table(dataset)} WHERE 1 "
                         f"ON CONFLICT ({_columns(key_names)}) DO UPDATE SET {updates}")
        return self.rows_stored(dataset)

    def check_references(self, dataset: Dataset, ref: Reference, target: Dataset) -> None:
        """Every value of `ref.column` in the rows this load wrote is a key of the
        target's table (which holds, by now, what the row path resolves against: the
        stored rows, the rows of this load, or with replace exactly the file's)."""
        assert len(target.key) == 1, target.name
        source = (_main_table(dataset) if self._direct[dataset.name]
                  else _stage_table(dataset))
        col = _quote(dataset.stored(ref.column))
        target_key = _quote(target.stored(target.key[0]))
        # each distinct value once (an index leads with the column: see store_indexes)
        row = self._db.execute(
            f"SELECT 1 FROM (SELECT DISTINCT {col} AS v FROM {source}) s WHERE NOT EXISTS "
            f"(SELECT 1 FROM {_main_table(target)} t WHERE t.{target_key} = s.v) LIMIT 1"
        ).fetchone()
        if row is not None:
            raise RowsRefused(f"{dataset.name}.{ref.column}: a reference does not resolve")


def _index_name(dataset: Dataset, index: tuple[str, ...]) -> str:
    return f"{dataset.name}_by_{'_'.join(index)}"


def sqlite_store_path(data_dir: Path) -> Path:
    """Where a node keeps its agency's store by default."""
    return data_dir / STORE_FILE_NAME


def to_int(value: object) -> int:
    """An integer a query returned (drivers give int, or Decimal for SUM of bigint)."""
    if isinstance(value, bool) or not isinstance(value, int | Decimal):
        raise TypeError(f"expected an integer from the store, got {value!r}")
    result = int(value)
    assert result == value, value
    return result
