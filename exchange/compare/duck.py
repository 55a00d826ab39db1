"""The DuckDB a rule's SQL runs in, and what is checked of that SQL.

A session is an in-memory database with external access disabled, extension
auto-install and auto-load off, no Python replacement scans and no temporary directory:
the inputs are loaded as typed tables, then the configuration is locked, so the rule's
SQL can read nothing but those tables (no file, no URL, no extension, no ATTACH, no COPY,
no Python variable, nothing spilled to disk) and cannot turn the settings back. A run has
limits (`RuleLimits`): a memory limit (DuckDB's own), a thread count, and a wall-clock
limit enforced by interrupting the query from a timer.

The SQL of a rule is one SELECT (a WITH ... SELECT is one) that reads only its input
tables and calls only the functions of an allow-list (`ALLOWED_FUNCTIONS`): functions
whose result is a function of their arguments alone, so no clock, random number,
sequence, sample, setting, environment or catalog reading. The functions are found in
DuckDB's own parse tree (json_serialize_sql), not in the text. Every input table is
stored in a canonical row order; a query whose result could still depend on the order
rows reach an operator (an order-sensitive aggregate or window function, LIMIT, DISTINCT
ON, a ROWS frame, floating-point arithmetic) runs on one thread, so it sees the rows in
that canonical order whatever thread count the limits allow.

Over 600 lines on purpose: the DuckDB sandbox (the allow-list of functions, the parse-
tree walk that enforces it, the resource limits) must be read together to be trusted.
"""

from __future__ import annotations

import importlib
import json
import re
import threading
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
    "python_enable_replacements": False,
    "temp_directory": "",
    "threads": 1,
}

TIME_LIMIT_S_DEFAULT = 60.0
MEMORY_LIMIT_MIB_DEFAULT = 1024
THREADS_DEFAULT = 1
TIME_LIMIT_S_MAX = 24 * 3600.0
MEMORY_LIMIT_MIB_MIN, MEMORY_LIMIT_MIB_MAX = 16, 1024 * 1024
THREADS_MAX = 256

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

# The functions a rule may call: their result is a function of their arguments alone.
# Operators are functions in DuckDB's parse tree ("+", "~~" for LIKE...). Anything not
# named here (random(), now(), current_setting(), getenv(), version(), the duckdb_*()
# and every other table function...) is refused at registration.
ORDER_FREE_FUNCTIONS = frozenset({
    # arithmetic, comparison-like and bit operators
    "+", "-", "*", "%", "&", "|", "<<", ">>", "xor", "@",
    # text operators: concatenation, LIKE, ILIKE, GLOB, SIMILAR TO, ^@ (starts with)
    "||", "~~", "!~~", "~~*", "!~~*", "~~~", "^@", "like_escape", "not_like_escape",
    "ilike_escape", "not_ilike_escape", "regexp_full_match",
    # numbers
    "abs", "sign", "round", "floor", "ceil", "ceiling", "trunc", "greatest", "least",
    "gcd", "lcm",
    # nulls
    "nullif", "ifnull",
    # text
    "length", "len", "strlen", "char_length", "lower", "upper", "lcase", "ucase", "trim",
    "ltrim", "rtrim", "substring", "substr", "left", "right", "replace", "concat",
    "concat_ws", "starts_with", "ends_with", "prefix", "suffix", "contains", "strpos",
    "instr", "position", "lpad", "rpad", "split_part", "reverse", "repeat",
    "regexp_matches", "regexp_replace", "regexp_extract", "md5", "sha256", "format",
    "typeof",
    # lists and structs (the [..] and {..} literals and their subscripts)
    "list_value", "struct_pack", "list_extract", "array_extract", "struct_extract",
    "list_contains", "array_contains", "list_has", "array_length", "unnest",
    # dates (no time zone: nothing here reads the TimeZone setting)
    "date_part", "datepart", "year", "month", "day", "quarter", "make_date", "date_trunc",
    "datetrunc", "date_diff", "datediff", "last_day", "strftime", "strptime",
    "try_strptime", "to_days", "to_months", "to_years",
    # aggregates whose result is the same for the same multiset of rows
    "count", "count_star", "count_if", "countif", "sum", "min", "max", "bool_and",
    "bool_or", "bit_and", "bit_or", "bit_xor",
    # window functions that give peers (ties) the same value
    "rank", "dense_rank",
})
# Allowed, but their result can depend on the order rows reach them (or, for floating
# point, on how partial results are combined): a query calling one runs on one thread,
# over the input tables' canonical order.
ORDER_SENSITIVE_FUNCTIONS = frozenset({
    "string_agg", "group_concat", "listagg", "list", "array_agg", "first", "last",
    "any_value", "arbitrary", "arg_min", "arg_max", "argmin", "argmax", "min_by",
    "max_by", "row_number", "ntile", "lag", "lead", "first_value", "last_value",
    "nth_value", "/", "//", "avg", "mean", "percent_rank", "cume_dist",
})
ALLOWED_FUNCTIONS = ORDER_FREE_FUNCTIONS | ORDER_SENSITIVE_FUNCTIONS
# Floating-point types: arithmetic on them is not associative, so a sum's last bits
# depend on the order of its terms.
FLOAT_TYPES = frozenset({"FLOAT", "FLOAT4", "REAL", "DOUBLE", "FLOAT8"})
# Types whose values depend on the session's TimeZone setting.
ZONED_TYPES = frozenset({"TIMESTAMPTZ", "TIMESTAMP WITH TIME ZONE", "TIMETZ",
                         "TIME WITH TIME ZONE"})
# The SQL value functions parse as column references (no input column has these names).
SQL_VALUE_FUNCTIONS = frozenset({
    "current_date", "current_time", "current_timestamp", "localtime", "localtimestamp",
    "current_localtime", "current_localtimestamp", "user", "current_user", "session_user",
    "current_role", "current_catalog", "current_schema",
})
# The table references a rule's FROM may hold: tables, joins, subqueries, VALUES, PIVOT,
# and none. Table functions (read_csv(), range(), duckdb_settings()...) and SHOW /
# SUMMARIZE / DESCRIBE are refused.
TABLE_REF_TYPES = frozenset({"BASE_TABLE", "JOIN", "SUBQUERY", "EXPRESSION_LIST", "PIVOT",
                             "EMPTY", "EMPTY_FROM"})

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


class LimitExceeded(Exception):
    """A run went over one of its limits; the message names the limit."""


@dataclass(frozen=True)
class RuleLimits:
    """What one run of a rule may take: wall-clock seconds for the SQL, DuckDB's memory
    (the input tables included), and threads."""

    time_s: float = TIME_LIMIT_S_DEFAULT
    memory_mib: int = MEMORY_LIMIT_MIB_DEFAULT
    threads: int = THREADS_DEFAULT

    def __post_init__(self) -> None:
        if isinstance(self.time_s, bool) or not isinstance(self.time_s, int | float) or \
                not 0 < self.time_s <= TIME_LIMIT_S_MAX:
            raise ValueError(f"time_s is a number of seconds in (0, {TIME_LIMIT_S_MAX:g}]")
        if isinstance(self.memory_mib, bool) or not isinstance(self.memory_mib, int) or \
                not MEMORY_LIMIT_MIB_MIN <= self.memory_mib <= MEMORY_LIMIT_MIB_MAX:
            raise ValueError(f"memory_mib is an integer {MEMORY_LIMIT_MIB_MIN}.."
                             f"{MEMORY_LIMIT_MIB_MAX}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or \
                not 1 <= self.threads <= THREADS_MAX:
            raise ValueError(f"threads is an integer 1..{THREADS_MAX}")


@dataclass(frozen=True)
class SqlShape:
    """What the check learned of a rule's SQL."""

    order_sensitive: str | None  # what makes it depend on row order; None: nothing


@dataclass(frozen=True)
class Column:
    """One column of an input table."""

    name: str
    sql_type: str  # one of INPUT_SQL_TYPES
    nullable: bool = False


def pyarrow_available() -> bool:
    return _pyarrow is not None


def connect(limits: RuleLimits | None = None) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory database, external access already disabled, within `limits`'
    memory (one thread until `set_threads`)."""
    config: dict[str, str | bool | int | float | list[str]] = dict(CONNECT_CONFIG)
    config["memory_limit"] = f"{(limits or RuleLimits()).memory_mib}MiB"
    return _quiet(duckdb.connect(":memory:", config=config))


def _quiet(con: duckdb.DuckDBPyConnection) -> duckdb.DuckDBPyConnection:
    """No progress bars: a long run would draw them on the jobs' stderr."""
    con.execute("SET enable_progress_bar = false")
    return con


def set_threads(con: duckdb.DuckDBPyConnection, threads: int) -> None:
    """Before `lock`: the thread count queries run on."""
    assert 1 <= threads <= THREADS_MAX, threads
    con.execute(f"SET threads = {int(threads)}")


def run_limited(con: duckdb.DuckDBPyConnection, sql: str, limits: RuleLimits,
                rows_max: int) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The column names and at most `rows_max` rows of `sql`. LimitExceeded naming the
    limit when the query runs past `limits.time_s` (interrupted from a timer) or past
    the memory limit; SqlProblem for any other DuckDB error."""
    fired = threading.Event()

    def stop() -> None:
        fired.set()
        con.interrupt()

    timer = threading.Timer(limits.time_s, stop)
    timer.daemon = True
    timer.start()
    try:
        cursor = con.execute(sql)
        names = [str(d[0]) for d in cursor.description or []]
        rows = cursor.fetchmany(rows_max)
    except duckdb.InterruptException:
        if fired.is_set():
            raise LimitExceeded(f"exceeded the {limits.time_s:g} s time limit") from None
        raise
    except duckdb.OutOfMemoryException:
        raise LimitExceeded(f"exceeded the memory limit {limits.memory_mib} MiB") from None
    except duckdb.Error as exc:
        if fired.is_set():  # interrupted while DuckDB raised something else
            raise LimitExceeded(f"exceeded the {limits.time_s:g} s time limit") from None
        raise sql_problem(exc) from None
    finally:
        timer.cancel()
    return names, rows


def connect_for_loading(limits: RuleLimits | None = None) -> duckdb.DuckDBPyConnection:
    """`connect`, but the database may still read files: a streamed run's own spool
    files (exchange.compare.session). `lock` turns external access off for good before
    any rule SQL runs in it."""
    config: dict[str, str | bool | int | float | list[str]] = {
        **CONNECT_CONFIG, "enable_external_access": True,
        "memory_limit": f"{(limits or RuleLimits()).memory_mib}MiB"}
    return _quiet(duckdb.connect(":memory:", config=config))


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

def check_statement(con: duckdb.DuckDBPyConnection, sql: str,
                    tables: Sequence[str]) -> SqlShape:
    """One SELECT statement reading only `tables` (and its own WITH names), calling only
    allowed functions; SqlProblem (with the SQL line where DuckDB gives the place)
    otherwise."""
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
    return _Walk(sql, frozenset(t.lower() for t in tables), _catalog_names()).run(tree)


_CATALOG_NAMES: frozenset[str] | None = None


def _catalog_names() -> frozenset[str]:
    """Names a table reference could resolve to besides the inputs: DuckDB's own views
    (duckdb_settings is one unqualified, pg_class another)."""
    global _CATALOG_NAMES
    if _CATALOG_NAMES is None:
        con = duckdb.connect(":memory:", config=dict(CONNECT_CONFIG))
        try:
            rows = con.execute("SELECT lower(view_name) FROM duckdb_views() UNION "
                               "SELECT lower(table_name) FROM duckdb_tables()").fetchall()
        finally:
            con.close()
        _CATALOG_NAMES = frozenset(str(r[0]) for r in rows)
    return _CATALOG_NAMES


class _Walk:
    """One pass over the parse tree: refuse what is not allowed, note what is
    order-sensitive."""

    def __init__(self, sql: str, tables: frozenset[str], catalog: frozenset[str]) -> None:
        self.sql = sql
        self.tables = tables
        self.catalog = catalog
        self.order_sensitive: str | None = None

    def problem(self, what: str, node: Mapping[str, Any]) -> SqlProblem:
        where = node.get("query_location")
        offset = where if isinstance(where, int) and where < 2**62 else None
        return SqlProblem(what, None if offset is None else line_of_offset(self.sql, offset))

    def sensitive(self, why: str) -> None:
        if self.order_sensitive is None:
            self.order_sensitive = why

    def run(self, tree: object) -> SqlShape:
        ctes = self._cte_names(tree)
        shadowing = sorted(ctes & (self.catalog - self.tables))
        if shadowing:
            raise SqlProblem(f"a WITH query may not be named {shadowing[0]}: DuckDB has a "
                             "view of that name", None)
        self.allowed_tables = self.tables | ctes
        stack = [tree]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(reversed(node))
                continue
            if not isinstance(node, dict):
                continue
            self._node(node)
            stack.extend(reversed(list(node.values())))
        return SqlShape(self.order_sensitive)

    @staticmethod
    def _cte_names(tree: object) -> set[str]:
        names: set[str] = set()
        stack = [tree]
        while stack:
            node = stack.pop()
            if isinstance(node, list):
                stack.extend(node)
            elif isinstance(node, dict):
                cte_map = node.get("cte_map")
                if isinstance(cte_map, dict):
                    names.update(str(e.get("key", "")).lower() for e in cte_map.get("map", [])
                                 if isinstance(e, dict))
                stack.extend(node.values())
        return names

    def _node(self, node: dict[str, Any]) -> None:
        kind = node.get("class")
        if node.get("sample") is not None:
            raise self.problem("a sample (USING SAMPLE / TABLESAMPLE) is not allowed: its "
                               "rows are chosen at random", node)
        if kind in ("FUNCTION", "WINDOW", "AGGREGATE"):
            self._function(node)
        elif kind == "COLUMN_REF":
            columns = node.get("column_names")
            if isinstance(columns, list) and len(columns) == 1 and \
                    str(columns[0]).lower() in SQL_VALUE_FUNCTIONS:
                raise self.problem(f"{columns[0]} is not allowed: its result does not "
                                   "depend on the inputs alone, so the run would not be "
                                   "reproducible", node)
        elif kind == "CAST":
            type_name = str((node.get("type_expr") or {}).get("type_name", "")).upper()
            if type_name in ZONED_TYPES:
                raise self.problem(f"a cast to {type_name} is not allowed: its value "
                                   "depends on the machine's time zone", node)
            if type_name in FLOAT_TYPES:
                self.sensitive(f"a cast to {type_name}")
        elif kind == "CONSTANT":
            literal = node.get("literal")
            if isinstance(literal, dict) and literal.get("kind") == "NUMERIC" and \
                    any(c in str(literal.get("text", "")) for c in "eE"):
                self.sensitive(f"the floating-point literal {literal.get('text')}")
        elif kind is None:
            self._table_ref_or_modifier(node)
        window_frame = (node.get("start"), node.get("end")) if kind == "WINDOW" else ()
        if any(isinstance(b, str) and (b.endswith("_ROWS") or b.endswith("_GROUPS"))
               for b in window_frame):
            self.sensitive("a window with a ROWS or GROUPS frame")

    def _function(self, node: dict[str, Any]) -> None:
        name = str(node.get("function_name", ""))
        if node.get("schema") or node.get("catalog"):
            qualified = ".".join(str(p) for p in (node.get("catalog"), node.get("schema"),
                                                  name) if p)
            raise self.problem(f"{qualified}() is not allowed: call functions by their "
                               "plain name", node)
        lowered = name.lower()
        if lowered not in ALLOWED_FUNCTIONS:
            raise self.problem(f"{name}() is not allowed: a rule may call only functions "
                               "whose result depends on their arguments alone (see "
                               "docs/rules.md)", node)
        if lowered in ORDER_SENSITIVE_FUNCTIONS:
            self.sensitive(f"{name}()")

    def _table_ref_or_modifier(self, node: dict[str, Any]) -> None:
        kind = node.get("type")
        if kind in ("LIMIT_MODIFIER", "LIMIT_PERCENT_MODIFIER"):
            self.sensitive("LIMIT / OFFSET")
        elif kind == "DISTINCT_MODIFIER" and node.get("distinct_on_targets"):
            self.sensitive("DISTINCT ON")
        elif kind == "TABLE_FUNCTION":
            function = node.get("function") or {}
            raise self.problem(f"{function.get('function_name', '?')}() is not allowed in "
                               "FROM: a rule reads its input tables only", node)
        elif kind == "SHOW_REF":
            raise self.problem("SHOW / DESCRIBE / SUMMARIZE is not allowed: a rule reads "
                               "its input tables only", node)
        elif kind == "BASE_TABLE":
            name = str(node.get("table_name", ""))
            qualified = node.get("schema_name") or node.get("catalog_name")
            if qualified or name.lower() not in self.allowed_tables:
                shown = ".".join(str(p) for p in (node.get("catalog_name"),
                                                  node.get("schema_name"), name) if p)
                raise self.problem(f"table {shown} is not allowed: a rule reads its input "
                                   f"tables only ({', '.join(sorted(self.tables))})", node)
        elif isinstance(kind, str) and "sample" in node and kind not in TABLE_REF_TYPES \
                and not kind.endswith("_NODE"):  # a query node (SELECT_NODE...) has one too
            raise self.problem(f"a {kind} in FROM is not allowed", node)


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
