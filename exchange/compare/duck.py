"""The DuckDB a rule's SQL runs in, and what is checked of that SQL.

A session is an in-memory database with external access disabled and extension
auto-install and auto-load off: the inputs are loaded as typed tables, then the
configuration is locked, so the rule's SQL can read nothing but those tables (no file,
no URL, no extension, no ATTACH, no COPY) and cannot turn the settings back. One thread,
and every input table stored in a canonical row order, so that even an order-sensitive
aggregate sees the same rows in the same order whatever order the inputs came in.

The SQL of a rule is one SELECT (a WITH ... SELECT is one), free of the functions whose
result is not a function of the inputs (the clock, random numbers, sequences, samples),
and returns columns of types that have a canonical form.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from types import ModuleType
from typing import Any

import duckdb

DUCKDB_VERSION: str = str(duckdb.__version__)

CONNECT_CONFIG: dict[str, str | bool | int] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "threads": 1,
}

VARCHAR = "VARCHAR"
BIGINT = "BIGINT"
DECIMAL = "DECIMAL(18,2)"
INPUT_SQL_TYPES = (VARCHAR, BIGINT, DECIMAL)

DECIMAL_ABS_LIMIT = Decimal(10) ** 16  # DECIMAL(18,2) holds |v| < 10**16
BIGINT_MIN, BIGINT_MAX = -(2**63), 2**63 - 1
_CENT = Decimal("0.01")

# Output column types a canonical row can hold (DECIMAL checked apart: scale <= 2).
OUTPUT_INTEGER_TYPES = frozenset({"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT",
                                  "UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT"})
OUTPUT_TEXT_TYPES = frozenset({"VARCHAR"})
OUTPUT_BOOLEAN_TYPES = frozenset({"BOOLEAN"})
_DECIMAL_TYPE = re.compile(r"DECIMAL\((\d+),(\d+)\)")

# Calls whose result depends on something besides the inputs.
NONDETERMINISTIC_FUNCTIONS = frozenset({
    "random", "setseed", "uuid", "gen_random_uuid", "uuidv4", "uuidv7", "nextval",
    "currval", "now", "today", "get_current_time", "get_current_timestamp",
    "transaction_timestamp", "current_date", "current_time", "current_timestamp",
    "current_localtime", "current_localtimestamp", "localtime", "localtimestamp",
    "current_query", "current_setting", "current_database", "current_schema",
    "current_schemas", "current_catalog", "pg_backend_pid", "getenv",
})
# The SQL value functions parse as column references (no input column has these names).
NONDETERMINISTIC_COLUMNS = frozenset({
    "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
    "current_localtime", "current_localtimestamp",
})

_LINE = re.compile(r"\bLINE (\d+):")

INPUT_ROWS_MAX = 50_000_000

_pyarrow: ModuleType | None
try:
    _pyarrow = importlib.import_module("pyarrow")
except ImportError:  # pragma: no cover - depends on the environment
    _pyarrow = None


class SqlProblem(Exception):
    """Something wrong with a rule's SQL; `sql_line` is its 1-based line, if known."""

    def __init__(self, message: str, sql_line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.sql_line = sql_line


class InputProblem(Exception):
    """An input table's rows do not have the columns or value types declared."""


@dataclass(frozen=True)
class Column:
    """One column of an input table."""

    name: str
    sql_type: str  # one of INPUT_SQL_TYPES
    nullable: bool = False


def pyarrow_available() -> bool:
    return _pyarrow is not None


def connect() -> duckdb.DuckDBPyConnection:
    """A fresh in-memory database, external access already disabled."""
    return duckdb.connect(":memory:", config=dict(CONNECT_CONFIG))


def connect_for_loading() -> duckdb.DuckDBPyConnection:
    """A fresh in-memory database that may still read files: a streamed run's own spool
    files (exchange.compare.session). `lock` turns external access off for good before
    any rule SQL runs in it."""
    config: dict[str, str | bool | int | float | list[str]] = {
        **CONNECT_CONFIG, "enable_external_access": True}
    return duckdb.connect(":memory:", config=config)


def lock(con: duckdb.DuckDBPyConnection) -> None:
    """External access off (it cannot be turned back on while the database runs) and no
    setting can change after this."""
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def quote(name: str) -> str:
    assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
    return f'"{name}"'


def error_line(message: str) -> int | None:
    """The SQL line a DuckDB error message points at ("LINE n:"), if any."""
    found = _LINE.search(message)
    return int(found.group(1)) if found else None


def sql_problem(exc: duckdb.Error) -> SqlProblem:
    message = str(exc)
    first = message.split("\n", 1)[0].strip()
    return SqlProblem(first, error_line(message))


def line_of_offset(sql: str, offset: int) -> int:
    return sql.count("\n", 0, max(0, min(offset, len(sql)))) + 1


# -- checking the SQL --------------------------------------------------------------------

def check_statement(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """One SELECT statement, calling nothing nondeterministic; SqlProblem otherwise."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise sql_problem(exc) from None
    if len(statements) != 1:
        raise SqlProblem(f"the SQL must be one SELECT statement, found {len(statements)} "
                         "statements", None)
    if statements[0].type != duckdb.StatementType.SELECT:
        raise SqlProblem(f"the SQL must be a SELECT statement, not "
                         f"{statements[0].type.name}", 1)
    (text,) = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchone() or (None,)
    assert isinstance(text, str)
    tree = json.loads(text)
    if tree.get("error"):
        raise SqlProblem(f"the SQL does not parse: {tree.get('error_message')}", None)
    found = _nondeterministic(tree)
    if found:
        name, offset = found
        raise SqlProblem(f"{name} is not allowed: its result does not depend on the inputs "
                         "alone, so the run would not be reproducible",
                         None if offset is None else line_of_offset(sql, offset))


def _nondeterministic(tree: object) -> tuple[str, int | None] | None:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(reversed(node))
            continue
        if not isinstance(node, dict):
            continue
        name = node.get("function_name")
        where = node.get("query_location")
        offset = where if isinstance(where, int) and where < 2**62 else None
        if isinstance(name, str) and name.lower() in NONDETERMINISTIC_FUNCTIONS:
            return f"{name}()", offset
        columns = node.get("column_names")
        if (node.get("class") == "COLUMN_REF" and isinstance(columns, list)
                and len(columns) == 1 and str(columns[0]).lower() in NONDETERMINISTIC_COLUMNS):
            return str(columns[0]), offset
        if node.get("sample") is not None:
            return "a sample (USING SAMPLE / TABLESAMPLE)", offset
        stack.extend(reversed(list(node.values())))
    return None


def output_type_problem(name: str, type_name: str) -> str | None:
    """Why a result column of this type has no canonical form, or None."""
    decimal = _DECIMAL_TYPE.fullmatch(type_name)
    if decimal is not None:
        if int(decimal.group(2)) > 2:
            return (f"column {name} is {type_name}: a decimal has at most two places "
                    "(ROUND or CAST it)")
        return None
    if name == "amount":
        return f"column amount is {type_name}, not a DECIMAL (CAST it AS DECIMAL(18,2))"
    if name == "subject" and type_name not in OUTPUT_TEXT_TYPES:
        return f"column subject is {type_name}, not VARCHAR"
    if type_name in OUTPUT_TEXT_TYPES | OUTPUT_INTEGER_TYPES | OUTPUT_BOOLEAN_TYPES:
        return None
    return (f"column {name} is {type_name}, which has no canonical form (use VARCHAR, "
            "an integer, BOOLEAN or a DECIMAL with at most two places)")


def describe(con: duckdb.DuckDBPyConnection, sql: str) -> list[tuple[str, str]]:
    """The result columns (name, type) of `sql`, bound against the tables present,
    without running it (DESCRIBE binds and plans only; its errors carry "LINE n:")."""
    try:
        rows = con.execute("DESCRIBE " + sql).fetchall()
    except duckdb.Error as exc:
        raise sql_problem(exc) from None
    return [(str(row[0]), str(row[1])) for row in rows]


# -- loading the inputs ------------------------------------------------------------------

def create_table(con: duckdb.DuckDBPyConnection, name: str, columns: Sequence[Column],
                 rows: Sequence[Mapping[str, object]] | None, loader: str = "auto") -> None:
    """Table `name` with `columns`, holding `rows` (dicts with exactly those keys) in the
    canonical order (ORDER BY every column). `rows` None: the empty table alone.
    `loader` is "auto" (Arrow when pyarrow is installed), "arrow" or "lists"."""
    assert columns, name
    assert loader in ("auto", "arrow", "lists"), loader
    table = quote(name)
    definition = ", ".join(f"{quote(c.name)} {c.sql_type}" for c in columns)
    con.execute(f"CREATE TABLE {table} ({definition})")
    if not rows:
        return
    if len(rows) > INPUT_ROWS_MAX:
        raise InputProblem(f"input {name}: {len(rows)} rows, more than {INPUT_ROWS_MAX}")
    values = _columns_of(name, columns, rows)
    texts = [_checked(name, column, column_values)
             for column, column_values in zip(columns, values, strict=True)]
    use_arrow = loader == "arrow" or (loader == "auto" and _pyarrow is not None)
    select = ", ".join(quote(c.name) for c in columns)
    order = ", ".join(f"{quote(c.name)} NULLS FIRST" for c in columns)
    if not use_arrow:
        con.execute(f"INSERT INTO {table} SELECT {select} FROM ({_unnest_source(columns)}) "
                    f"ORDER BY {order}", texts)
        return
    stage = f"stage_{name}"
    con.register(stage, _arrow_table(columns, values))
    try:
        con.execute(f"INSERT INTO {table} SELECT {select} FROM {quote(stage)} ORDER BY {order}")
    finally:
        con.unregister(stage)


def _columns_of(name: str, columns: Sequence[Column], rows: Sequence[Mapping[str, object]]
                ) -> list[list[object]]:
    names = [c.name for c in columns]
    expected = set(names)
    for i, row in enumerate(rows):
        try:
            same = row.keys() == expected
        except AttributeError:
            raise InputProblem(f"input {name}: row {i} is a {type(row).__name__}, not a "
                               "mapping of column names to values") from None
        if not same:
            raise InputProblem(f"input {name}: row {i} has columns {sorted(row)}, expected "
                               f"{sorted(expected)}")
    return [[row[n] for row in rows] for n in names]


def _checked(name: str, column: Column, values: list[object]) -> list[object]:
    """The column's values as the list loader takes them (decimals as plain text), each
    checked to be of the column's type; InputProblem naming the first that is not."""
    def bad(i: int, what: str) -> InputProblem:
        return InputProblem(f"input {name}: row {i} column {column.name}: {values[i]!r} "
                            f"is not {what}")

    nullable = column.nullable
    if column.sql_type == VARCHAR:
        if not all(type(v) is str or (v is None and nullable) for v in values):
            i = next(i for i, v in enumerate(values)
                     if not (type(v) is str or (v is None and nullable)))
            raise bad(i, "text")
        return values
    if column.sql_type == BIGINT:
        for i, v in enumerate(values):
            if v is None and nullable:
                continue
            if type(v) is not int or not BIGINT_MIN <= v <= BIGINT_MAX:
                raise bad(i, "an integer")
        return values
    assert column.sql_type == DECIMAL, column
    texts: list[object] = []
    append = texts.append
    plain = _PLAIN_AMOUNT.fullmatch
    for i, v in enumerate(values):
        if v is None and nullable:
            append(None)
            continue
        if type(v) is not Decimal:
            raise bad(i, "a Decimal")
        text = format(v, "f")
        if plain(text) is None:
            # slow path: "1.500", or something that is no amount at all
            if not v.is_finite():
                raise bad(i, "a Decimal")
            if v != v.quantize(_CENT):
                raise bad(i, "an amount with at most two decimals")
            text = format(v.quantize(_CENT), "f")
            if plain(text) is None:
                raise bad(i, "within DECIMAL(18,2)")
        append(text)
    return texts


# An amount DECIMAL(18,2) holds exactly, written plainly.
_PLAIN_AMOUNT = re.compile(r"-?[0-9]{1,16}(?:\.[0-9]{1,2})?")


def _arrow_table(columns: Sequence[Column], values: Sequence[list[object]]) -> Any:
    pa = _pyarrow
    assert pa is not None
    types = {VARCHAR: pa.string(), BIGINT: pa.int64(), DECIMAL: pa.decimal128(18, 2)}
    return pa.table({c.name: pa.array(v, types[c.sql_type])
                     for c, v in zip(columns, values, strict=True)})


def _unnest_source(columns: Sequence[Column]) -> str:
    """SELECT of every column from list parameters: decimals travel as their text (cast
    exactly), which DuckDB takes in far faster than Python Decimals."""
    parts = []
    for i, c in enumerate(columns, start=1):
        if c.sql_type == DECIMAL:
            parts.append(f"CAST(UNNEST(${i}::VARCHAR[]) AS {DECIMAL}) AS {quote(c.name)}")
        else:
            parts.append(f"UNNEST(${i}::{c.sql_type}[]) AS {quote(c.name)}")
    return "SELECT " + ", ".join(parts)
