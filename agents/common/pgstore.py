"""The PostgreSQL adapter of an agency's store (agents.common.store): for an agency whose
records live in PostgreSQL.

Same tables, columns and load log as the SQLite adapter, so the views' portable SQL gives
the same rows on both: amounts are integer fen (BIGINT) in ``*_fen`` columns, dates and
periods are TEXT in the "C" collation (``YYYY-MM-DD`` compares as in SQLite, byte by
byte). One database (or one schema, through the URL's search_path) holds one agency.

A load is one transaction. Rows are staged with COPY into temporary tables that carry the
dataset's key as a unique index, each batch under a savepoint, so that a key repeated in a
file undoes that batch alone and is then looked for; the load goes on to report it and
roll back as the loader decides. (Each batch is a subtransaction, so a load of millions
of rows has hundreds; staging through an unindexed table and INSERT ... ON CONFLICT DO
NOTHING instead took twice as long.) Loads into one store are serialized by an advisory
lock, as SQLite's write lock serializes them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict

from agents.common.schema import Column, Dataset, Kind, Reference
from agents.common.store import (
    SCHEMA_VERSION,
    STREAM_BATCH_ROWS,
    DuplicateKey,
    LoadSession,
    MergeCounts,
    Orphan,
    Unresolved,
    store_indexes,
)
from exchange.errors import MalformedInput, Unavailable

URL_SCHEMES = ("postgresql", "postgres")
CONNECT_TIMEOUT_S = 10
# Local buffers for the staging tables (a session setting, fixed before the first use
# of a temporary table); like the SQLite adapter's page cache, for large loads.
TEMP_BUFFERS_KIB = 262_144
APPLICATION_NAME = "exchange-agency-store"

_PG_TYPE = {Kind.AMOUNT: "BIGINT", Kind.FLAG: "INTEGER"}
_TEXT_TYPE = 'TEXT COLLATE "C"'
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*", re.IGNORECASE)


def is_postgres_url(location: object) -> bool:
    """True for a ``postgresql://`` or ``postgres://`` URL (anything else is a path)."""
    if not isinstance(location, str):
        return False
    scheme, sep, _ = location.partition("://")
    return bool(sep) and scheme in URL_SCHEMES  # as libpq, which takes no other case


def redact_url(url: str) -> str:
    """The URL with any password (in the user part or the query) replaced by ``***``;
    the rest as it was written."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    # the user part ends at the last "@" before the query (a password with an unescaped
    # "/" or "@" is still hidden whole)
    query_at = rest.find("?")
    userinfo_end = rest.rfind("@", 0, len(rest) if query_at < 0 else query_at)
    if userinfo_end >= 0:
        user, colon, _password = rest[:userinfo_end].partition(":")
        rest = (f"{user}:***" if colon else user) + rest[userinfo_end:]
    rest = _QUERY_PASSWORD.sub(r"\1***", rest)
    return f"{scheme}://{rest}"


def _scrub(message: str, url: str) -> str:
    """An error message with the URL's password, should a driver ever echo it, removed."""
    try:
        password = conninfo_to_dict(url).get("password")
    except psycopg.Error:
        password = None
    if password:
        message = message.replace(str(password), "***")
    return message.replace(url, redact_url(url))


_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOLLAR_TAG = re.compile(r"\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$")


@functools.lru_cache(maxsize=256)
def to_pyformat(query: str) -> str:
    """Portable SQL with ``:name`` parameters in psycopg's ``%(name)s`` style.

    ``::`` casts, quoted strings and identifiers, dollar-quoted strings and comments are
    left as they are; every ``%`` is doubled (psycopg reads ``%`` everywhere in a query
    that has parameters).
    """
    out: list[str] = []
    i, n = 0, len(query)
    while i < n:
        c = query[i]
        if c == "%":
            out.append("%%")
            i += 1
        elif c == ":":
            if query.startswith("::", i):
                out.append("::")
                i += 2
                continue
            name = _IDENT.match(query, i + 1)
            if name is None:
                out.append(":")
                i += 1
            else:
                out.append(f"%({name.group()})s")
                i = name.end()
        elif c in "'\"":
            backslash = c == "'" and i > 0 and query[i - 1] in "eE" and (
                i < 2 or not (query[i - 2].isalnum() or query[i - 2] in "_$"))
            end = _quoted_end(query, i, c, backslash)
            out.append(query[i:end].replace("%", "%%"))
            i = end
        elif query.startswith("--", i):
            end = query.find("\n", i)
            end = n if end < 0 else end
            out.append(query[i:end].replace("%", "%%"))
            i = end
        elif query.startswith("/*", i):
            end = _block_comment_end(query, i)
            out.append(query[i:end].replace("%", "%%"))
            i = end
        elif c == "$" and not (i > 0 and (query[i - 1].isalnum() or query[i - 1] == "_")):
            tag = _DOLLAR_TAG.match(query, i)
            if tag is None:  # $1 and the like: not a quote
                out.append(c)
                i += 1
                continue
            close = query.find(tag.group(), tag.end())
            end = n if close < 0 else close + len(tag.group())
            out.append(query[i:end].replace("%", "%%"))
            i = end
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _quoted_end(query: str, start: int, quote_char: str, backslash: bool) -> int:
    """The index after the quote closing the string or identifier opened at `start`."""
    i, n = start + 1, len(query)
    while i < n:
        c = query[i]
        if backslash and c == "\\":
            i += 2
        elif c == quote_char:
            if i + 1 < n and query[i + 1] == quote_char:  # '' or "" inside
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return n  # unterminated: the server reports it


def _block_comment_end(query: str, start: int) -> int:
    depth, i, n = 0, start, len(query)
    while i < n:
        if query.startswith("/*", i):
            depth += 1
            i += 2
        elif query.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return n


def _ident(name: str) -> pgsql.Identifier:
    assert name.replace("_", "").isalnum(), name
    return pgsql.Identifier(name)


def _idents(names: Sequence[str]) -> pgsql.Composed:
    return pgsql.SQL(", ").join(_ident(n) for n in names)


def _pg_type(column: Column) -> str:
    return _PG_TYPE.get(column.kind, _TEXT_TYPE if column.sql_type == "TEXT" else "BIGINT")


def _main_table(dataset: Dataset) -> pgsql.Identifier:
    return _ident(dataset.name)


def _stage_table(dataset: Dataset) -> pgsql.Identifier:
    return pgsql.Identifier("pg_temp", f"stage_{dataset.name}")


def _incoming_table(dataset: Dataset) -> pgsql.Identifier:
    return pgsql.Identifier("pg_temp", f"incoming_{dataset.name}")


def create_table_sql(dataset: Dataset) -> list[tuple[str, pgsql.Composed]]:
    """The DDL of one dataset's table and its indexes (names as in SQLite), each with the
    name of the relation it creates."""
    cols = pgsql.SQL(", ").join(
        pgsql.SQL("{} {}{}").format(_ident(c.stored_name), pgsql.SQL(_pg_type(c)),
                                   pgsql.SQL("" if c.optional else " NOT NULL"))
        for c in dataset.columns)
    key = _idents([dataset.stored(k) for k in dataset.key])
    statements = [(dataset.name, pgsql.SQL(
        "CREATE TABLE IF NOT EXISTS {} ({}, PRIMARY KEY ({}))").format(
        _main_table(dataset), cols, key))]
    for index in store_indexes(dataset):
        name = f"{dataset.name}_by_{'_'.join(index)}"
        statements.append((name, pgsql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
            _ident(name), _main_table(dataset), _idents(index))))
    return statements


_META = (
    ("meta", 'CREATE TABLE IF NOT EXISTS meta ("key" TEXT PRIMARY KEY, "value" TEXT NOT NULL)'),
    ("load_log", """CREATE TABLE IF NOT EXISTS load_log (
        entry BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        loaded_at_ms BIGINT NOT NULL,
        dataset TEXT NOT NULL,
        file_name TEXT NOT NULL,
        file_sha256 TEXT NOT NULL,
        row_count BIGINT NOT NULL,
        "replace" INTEGER NOT NULL
    )"""),
)


def _lock_id(agency: str) -> int:
    """The advisory lock serializing schema changes and loads of one agency's store."""
    digest = hashlib.sha256(f"exchange.agency_store/{agency}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresAgencyStore:
    """One agency's datasets in a PostgreSQL database (see the module)."""

    def __init__(self, url: str, agency: str, datasets: Sequence[Dataset]) -> None:
        if not is_postgres_url(url):
            raise MalformedInput(f"{redact_url(url)}: not a postgresql:// URL")
        self.url = url
        self.display = redact_url(url)
        self._agency = agency
        self.datasets = tuple(datasets)
        self._lock = threading.Lock()
        self._closed = False
        self._conn = self._connect()
        try:
            self._init_schema()
        except BaseException:
            self._conn.close()
            raise

    @property
    def agency(self) -> str:
        return self._agency

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(self.url, autocommit=True,
                                   connect_timeout=CONNECT_TIMEOUT_S,
                                   application_name=APPLICATION_NAME)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"{self.display}: cannot connect: "
                              f"{_scrub(str(exc).strip(), self.url)}") from None
        except psycopg.ProgrammingError as exc:  # a malformed URL
            raise MalformedInput(f"{self.display}: {_scrub(str(exc).strip(), self.url)}"
                                 ) from None
        try:
            conn.execute(f"SET temp_buffers = '{TEMP_BUFFERS_KIB}kB'")
        except BaseException:
            conn.close()
            raise
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        """The open connection, made again once if the server dropped it."""
        assert not self._closed, "store closed"
        if self._conn.broken or self._conn.closed:
            self._conn.close()
            self._conn = self._connect()
        return self._conn

    def _init_schema(self) -> None:
        # Only what is missing is created, so that a role without the right to create
        # tables (a node that only reads) opens a store that exists.
        conn = self._conn
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_id(self._agency),))
            self._create_missing(_META)
            meta = dict(conn.execute('SELECT "key", "value" FROM meta').fetchall())
            if not meta:
                with conn.cursor() as cur:
                    cur.executemany('INSERT INTO meta ("key", "value") VALUES (%s, %s)',
                                    [("agency", self._agency),
                                     ("schema_version", str(SCHEMA_VERSION))])
            elif meta.get("agency") != self._agency:
                raise MalformedInput(f"{self.display}: this store holds the datasets of "
                                     f"{meta.get('agency')!r}, not {self._agency!r}")
            elif meta.get("schema_version") != str(SCHEMA_VERSION):
                raise MalformedInput(f"{self.display}: store schema version "
                                     f"{meta.get('schema_version')}, expected {SCHEMA_VERSION}")
            for dataset in self.datasets:
                self._create_missing(create_table_sql(dataset))

    def _create_missing(self, statements: Sequence[tuple[str, pgsql.Composed | str]]
                        ) -> None:
        for name, statement in statements:
            row = self._conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                     (_ident(name).as_string(self._conn),)).fetchone()
            assert row is not None
            if not row[0]:
                self._conn.execute(statement)

    @contextlib.contextmanager
    def load_session(self) -> Iterator[LoadSession]:
        with self._lock:
            conn = self._connection()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)",
                                 (_lock_id(self._agency),))
                    yield _PostgresLoadSession(conn)
            except psycopg.OperationalError as exc:
                raise Unavailable(f"{self.display}: {_scrub(str(exc).strip(), self.url)} "
                                  "(nothing was loaded)") from None

    def fetch(self, sql: str, params: Mapping[str, object]) -> list[tuple[object, ...]]:
        with self._lock:
            conn = self._connection()
            try:
                return list(conn.execute(to_pyformat(sql), dict(params)).fetchall())
            except psycopg.OperationalError as exc:
                raise Unavailable(f"{self.display}: {_scrub(str(exc).strip(), self.url)}"
                                  ) from None

    def stream(self, sql: str, params: Mapping[str, object],
               batch_rows: int = STREAM_BATCH_ROWS) -> Iterator[tuple[object, ...]]:
        # a server-side cursor in a transaction of its own connection, so the server
        # sends `batch_rows` rows at a time and this store stays free for other reads
        conn = self._connect()
        try:
            with conn.transaction(), conn.cursor(name="exchange_stream") as cursor:
                cursor.itersize = batch_rows
                cursor.execute(to_pyformat(sql), dict(params))
                for row in cursor:
                    yield tuple(row)
        except psycopg.OperationalError as exc:
            raise Unavailable(f"{self.display}: {_scrub(str(exc).strip(), self.url)}"
                              ) from None
        finally:
            conn.close()

    def row_count(self, dataset: Dataset) -> int:
        with self._lock:
            row = self._connection().execute(
                pgsql.SQL("SELECT COUNT(*) FROM {}").format(_main_table(dataset))).fetchone()
        assert row is not None
        return int(row[0])

    def load_log(self) -> list[tuple[object, ...]]:
        """Every file loaded, oldest first: (time ms, dataset, file, sha256, rows, replace)."""
        with self._lock:
            return list(self._connection().execute(
                'SELECT loaded_at_ms, dataset, file_name, file_sha256, row_count, "replace" '
                "FROM load_log ORDER BY entry").fetchall())

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._conn.close()

    def __enter__(self) -> PostgresAgencyStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PostgresLoadSession:
    """Staging tables in the connection's temporary schema, dropped at commit; the whole
    session is the caller's one transaction."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn
        self._staged: dict[str, Dataset] = {}

    def _create_temp(self, table: pgsql.Identifier, dataset: Dataset, unique: bool) -> None:
        cols = pgsql.SQL(", ").join(
            pgsql.SQL("{} {}").format(_ident(c.stored_name), pgsql.SQL(_pg_type(c)))
            for c in dataset.columns)
        key = pgsql.SQL(", UNIQUE ({})").format(
            _idents([dataset.stored(k) for k in dataset.key])) if unique else pgsql.SQL("")
        self._conn.execute(pgsql.SQL("DROP TABLE IF EXISTS {}").format(table))
        self._conn.execute(pgsql.SQL(
            "CREATE TEMPORARY TABLE {} (line BIGINT NOT NULL, {}{}) ON COMMIT DROP").format(
            table, cols, key))

    def _ensure_stage(self, dataset: Dataset) -> None:
        if dataset.name not in self._staged:
            self._create_temp(_stage_table(dataset), dataset, unique=True)
            self._staged[dataset.name] = dataset

    def _copy(self, table: pgsql.Identifier, dataset: Dataset,
              rows: Sequence[tuple[object, ...]]) -> None:
        cols = _idents(("line", *dataset.stored_names))
        with self._conn.cursor() as cur, \
                cur.copy(pgsql.SQL("COPY {} ({}) FROM STDIN").format(table, cols)) as copy:
            for row in rows:
                copy.write_row(row)

    def stage(self, dataset: Dataset, rows: Sequence[tuple[object, ...]]) -> DuplicateKey | None:
        self._ensure_stage(dataset)
        if not rows:
            return None
        try:
            with self._conn.transaction():  # a savepoint: a repeated key undoes the batch
                self._copy(_stage_table(dataset), dataset, rows)
        except psycopg.errors.UniqueViolation:
            return self._find_duplicate(dataset, rows)
        return None

    def _find_duplicate(self, dataset: Dataset, rows: Sequence[tuple[object, ...]]
                        ) -> DuplicateKey:
        # The batch is not staged. Its first row whose key is staged (by an earlier batch)
        # or met on an earlier row of the batch is the first repeat; the rows before it
        # are staged, as the protocol says.
        incoming = _incoming_table(dataset)
        self._create_temp(incoming, dataset, unique=False)
        self._copy(incoming, dataset, rows)
        on = pgsql.SQL(" AND ").join(
            pgsql.SQL("s.{0} = i.{0}").format(_ident(dataset.stored(k))) for k in dataset.key)
        staged_at = dict(self._conn.execute(pgsql.SQL(
            "SELECT i.line, s.line FROM {} i JOIN {} s ON {}").format(
            incoming, _stage_table(dataset), on)).fetchall())
        self._conn.execute(pgsql.SQL("DROP TABLE {}").format(incoming))
        key_at = [1 + dataset.position(k) for k in dataset.key]
        seen: dict[tuple[object, ...], int] = {}
        for at, row in enumerate(rows):
            line = row[0]
            assert isinstance(line, int)
            key = tuple(row[i] for i in key_at)
            first_line = staged_at.get(line, seen.get(key))
            if first_line is not None:
                assert first_line < line, (dataset.name, first_line, line)
                self._copy(_stage_table(dataset), dataset, rows[:at])
                return DuplicateKey(key=key, first_line=int(first_line), line=line)
            seen[key] = line
        raise AssertionError(f"{dataset.name}: no repeated key in the failing batch")

    def first_unresolved(self, dataset: Dataset, ref: Reference, target: Dataset,
                         target_staged: bool, target_stored: bool) -> Unresolved | None:
        self._ensure_stage(dataset)  # a file of a header alone stages nothing
        if target_staged:
            self._ensure_stage(target)
        assert len(target.key) == 1, target.name
        col = _ident(dataset.stored(ref.column))
        target_key = _ident(target.stored(target.key[0]))
        conditions: list[pgsql.Composable] = [pgsql.SQL("TRUE")]
        if target_staged:
            conditions.append(pgsql.SQL(
                "NOT EXISTS (SELECT 1 FROM {} t WHERE t.{} = s.{})").format(
                _stage_table(target), target_key, col))
        if target_stored:
            conditions.append(pgsql.SQL(
                "NOT EXISTS (SELECT 1 FROM {} t WHERE t.{} = s.{})").format(
                _main_table(target), target_key, col))
        row = self._conn.execute(pgsql.SQL(
            "SELECT s.line, s.{} FROM {} s WHERE {} ORDER BY s.line LIMIT 1").format(
            col, _stage_table(dataset), pgsql.SQL(" AND ").join(conditions))).fetchone()
        return None if row is None else Unresolved(line=int(row[0]), value=row[1])

    def merge(self, dataset: Dataset, replace: bool) -> MergeCounts:
        self._ensure_stage(dataset)  # an empty file stages nothing but still merges
        main = _main_table(dataset)
        count = pgsql.SQL("SELECT COUNT(*) FROM {}").format(main)
        before = self._count(count)
        cols = _idents(dataset.stored_names)
        select = pgsql.SQL("SELECT {} FROM {}").format(cols, _stage_table(dataset))
        if replace or before == 0:  # no stored row to meet: a plain insert is faster
            if before:
                self._conn.execute(pgsql.SQL("DELETE FROM {}").format(main))
            self._conn.execute(pgsql.SQL("INSERT INTO {} ({}) {}").format(main, cols, select))
        else:
            key_names = [dataset.stored(k) for k in dataset.key]
            others = [n for n in dataset.stored_names if n not in key_names]
            assert others, dataset.name
            updates = pgsql.SQL(", ").join(
                pgsql.SQL("{0} = excluded.{0}").format(_ident(n)) for n in others)
            # a row equal to the stored one is not rewritten: reloading changes nothing
            changed = pgsql.SQL("({}) IS DISTINCT FROM ({})").format(
                pgsql.SQL(", ").join(pgsql.SQL("{}.{}").format(main, _ident(n))
                                     for n in others),
                pgsql.SQL(", ").join(pgsql.SQL("excluded.{}").format(_ident(n))
                                     for n in others))
            self._conn.execute(pgsql.SQL(
                "INSERT INTO {} ({}) {} ON CONFLICT ({}) DO UPDATE SET {} WHERE {}").format(
                main, cols, select, _idents(key_names), updates, changed))
        after = self._count(count)
        return MergeCounts(rows_before=before, rows_after=after)

    def _count(self, query: pgsql.Composed) -> int:
        row = self._conn.execute(query).fetchone()
        assert row is not None
        return int(row[0])

    def first_orphan(self, dataset: Dataset, ref: Reference, target: Dataset) -> Orphan | None:
        assert len(target.key) == 1, target.name
        col = _ident(dataset.stored(ref.column))
        target_key = _ident(target.stored(target.key[0]))
        keys = pgsql.SQL(", ").join(pgsql.SQL("s.{}").format(_ident(dataset.stored(k)))
                                    for k in dataset.key)
        row = self._conn.execute(pgsql.SQL(
            "SELECT s.{}, {} FROM {} s WHERE NOT EXISTS (SELECT 1 FROM {} t "
            "WHERE t.{} = s.{}) LIMIT 1").format(
            col, keys, _main_table(dataset), _main_table(target), target_key, col)).fetchone()
        return None if row is None else Orphan(key=tuple(row[1:]), value=row[0])

    def log_file(self, dataset: Dataset, file_name: str, file_sha256: str, rows: int,
                 replace: bool) -> None:
        self._conn.execute(
            "INSERT INTO load_log (loaded_at_ms, dataset, file_name, file_sha256, "
            'row_count, "replace") VALUES (%s, %s, %s, %s, %s, %s)',
            (int(time.time() * 1000), dataset.name, file_name, file_sha256, rows,
             int(replace)))
