"""One run's DuckDB, filled as its inputs stream in: the way a run over inputs of any
size is made without holding them in Python (DESIGN.md decision 13).

An input arrives as the canonical JSON Lines its answer chunks carry (one chunk at a
time, from any number of answers). Each chunk is appended to a spool file of the input
on disk; DuckDB's JSON reader then loads the file into a staging table, checking every
value against the input's declared type in SQL (text is a JSON string, a count a JSON
integer, an amount a JSON string of at most two decimals), and the typed table is made
in the canonical row order, as `duck.create_table` makes it from Python rows. The
subjects of a later subject-set query are read back from the loaded table in sorted
batches. Then the session is locked down (`duck.lock`: external access off, settings
locked) and the rule's SQL runs exactly as `run_rule` runs it, so a streamed run and an
in-memory run of the same inputs give the same bytes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import duckdb

from exchange.compare import duck
from exchange.compare.duck import RuleLimits
from exchange.compare.engine import Rows, RuleLimitExceeded, RuleOutput, execute_locked
from exchange.compare.rules import Rule, duck_columns
from exchange.errors import MalformedInput

# An amount as a canonical answer writes it (trailing zeros past two places tolerated).
_AMOUNT_PATTERN = r"-?[0-9]{1,16}(\.[0-9]{1,2}0*)?"


class RunSession:
    """The inputs of one run of `rule`, loaded into DuckDB as they stream in."""

    def __init__(self, rule: Rule, spool_dir: Path | None = None,
                 limits: RuleLimits | None = None) -> None:
        self.rule = rule
        self.limits = limits or RuleLimits()
        self.columns = duck_columns(rule)
        self._dir = Path(tempfile.mkdtemp(prefix="run-", dir=spool_dir))
        self._files: dict[str, BinaryIO] = {}
        self._rows: dict[str, int] = dict.fromkeys(self.columns, 0)
        self._loaded: set[str] = set()
        # external access stays on only while the session reads its own spool files;
        # duck.lock turns it off for good before the rule's SQL runs
        self.con = duck.connect_for_loading(self.limits)
        self._locked = False
        for name, columns in self.columns.items():
            duck.create_table(self.con, name, columns, None)

    def __enter__(self) -> RunSession:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self.con.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    def _check_name(self, name: str) -> None:
        if name not in self.columns:
            raise MalformedInput(f"{self.rule.source}: rule {self.rule.id} has no input "
                                 f"{name!r}")
        if name in self._loaded:
            raise MalformedInput(f"input {name} is already loaded")

    # -- filling ----------------------------------------------------------------------
    def append_jsonl(self, name: str, chunk: bytes) -> None:
        """Add one chunk of canonical JSON Lines (whole lines) to input `name`."""
        self._check_name(name)
        if not chunk:
            return
        if not chunk.endswith(b"\n"):
            raise MalformedInput(f"input {name}: a chunk does not end with a whole line")
        f = self._files.get(name)
        if f is None:
            f = self._files[name] = open(self._dir / f"{name}.jsonl", "wb")  # noqa: SIM115
        f.write(chunk)
        self._rows[name] += chunk.count(b"\n")

    def load_rows(self, name: str, rows: Rows) -> None:
        """Input `name` from rows in memory (as run_rule takes them); for small inputs."""
        self._check_name(name)
        if name in self._files:
            raise MalformedInput(f"input {name} is already being streamed")
        self.con.execute(f"DROP TABLE {duck.quote(name)}")
        try:
            duck.create_table(self.con, name, self.columns[name], rows)
        except duck.InputProblem as exc:
            raise MalformedInput(f"{self.rule.source}: rule {self.rule.id}: {exc}") from None
        self._rows[name] = len(rows)
        self._loaded.add(name)

    def finish(self, name: str) -> int:
        """Load what was streamed into input `name`, checked and in canonical order; the
        number of rows. An input never given stays empty."""
        self._check_name(name)
        self._loaded.add(name)
        f = self._files.pop(name, None)
        if f is None:
            return 0
        f.close()
        path = self._dir / f"{name}.jsonl"
        try:
            self._load_file(name, path)
        except duck.InputProblem as exc:
            raise MalformedInput(f"{self.rule.source}: rule {self.rule.id}: {exc}") from None
        except duckdb.OutOfMemoryException:
            raise RuleLimitExceeded(self.rule, f"its inputs exceed the memory limit "
                                    f"{self.limits.memory_mib} MiB") from None
        finally:
            path.unlink(missing_ok=True)
        return self._rows[name]

    def _load_file(self, name: str, path: Path) -> None:
        columns = self.columns[name]
        if self._rows[name] > duck.INPUT_ROWS_MAX:
            raise duck.InputProblem(f"input {name}: {self._rows[name]} rows, more than "
                                    f"{duck.INPUT_ROWS_MAX}")
        stage = duck.quote(f"stage_{name}")
        spec = ", ".join(f"'{c.name}': 'JSON'" for c in columns)
        self.con.execute(
            f"CREATE TEMP TABLE {stage} AS SELECT row_number() OVER () AS line_no, * "
            f"FROM read_json(?, format = 'newline_delimited', columns = {{{spec}}}, "
            "maximum_object_size = 1048576)", [str(path)])
        try:
            for column in columns:
                self._check_column(name, stage, column)
            values = ", ".join(_typed(c) for c in columns)
            order = ", ".join(f"{duck.quote(c.name)} NULLS FIRST" for c in columns)
            self.con.execute(f"INSERT INTO {duck.quote(name)} SELECT * FROM (SELECT {values} "
                             f"FROM {stage}) ORDER BY {order}")
        finally:
            self.con.execute(f"DROP TABLE {stage}")

    def _check_column(self, name: str, stage: str, column: duck.Column) -> None:
        col = duck.quote(column.name)
        ok = {duck.VARCHAR: f"json_type({col}) = 'VARCHAR'",
              duck.BIGINT: f"json_type({col}) IN ('BIGINT', 'UBIGINT') AND "
                           f"TRY_CAST({col} AS BIGINT) IS NOT NULL",
              duck.DECIMAL: f"json_type({col}) = 'VARCHAR' AND regexp_full_match("
                            f"{col}->>'$', '{_AMOUNT_PATTERN}')"}[column.sql_type]
        if column.nullable:
            ok = f"{col} IS NULL OR json_type({col}) = 'NULL' OR ({ok})"
        else:
            ok = f"{col} IS NOT NULL AND ({ok})"
        bad = self.con.execute(f"SELECT line_no, CAST({col} AS VARCHAR) FROM {stage} "
                               f"WHERE NOT ({ok}) ORDER BY line_no LIMIT 1").fetchone()
        if bad is not None:
            what = {duck.VARCHAR: "text", duck.BIGINT: "an integer",
                    duck.DECIMAL: "an amount with at most two decimals"}[column.sql_type]
            shown = "missing" if bad[1] is None else repr(str(bad[1])[:80])
            raise duck.InputProblem(f"input {name}: row {int(bad[0]) - 1} column "
                                    f"{column.name}: {shown} is not {what}")

    # -- reading back -----------------------------------------------------------------
    def distinct(self, name: str, column: str, batch_max: int) -> Iterator[list[str]]:
        """The sorted distinct non-null values of a loaded input's column, in batches of
        at most `batch_max` (the subjects of a subject-set query)."""
        assert name in self._loaded, name
        assert batch_max >= 1, batch_max
        cursor = self.con.cursor()
        try:
            cursor.execute(f"SELECT DISTINCT {duck.quote(column)} FROM {duck.quote(name)} "
                           f"WHERE {duck.quote(column)} IS NOT NULL "
                           f"ORDER BY {duck.quote(column)}")
            while True:
                batch = cursor.fetchmany(batch_max)
                if not batch:
                    return
                yield [str(v) for (v,) in batch]
        finally:
            cursor.close()

    def row_count(self, name: str) -> int:
        return self._rows[name]

    # -- running ----------------------------------------------------------------------
    def run(self, params: Mapping[str, str], timings: dict[str, float] | None = None
            ) -> RuleOutput:
        """Lock the session down and run the rule's SQL; every input must be loaded."""
        missing = [n for n in self.columns if n not in self._loaded]
        if missing:
            raise MalformedInput(f"{self.rule.source}: rule {self.rule.id} inputs: missing "
                                 f"{', '.join(sorted(missing))}")
        assert not self._locked, "a session runs its rule once"
        self._locked = True
        return execute_locked(self.rule, self.con, params, timings, self.limits)


def _typed(column: duck.Column) -> str:
    col = duck.quote(column.name)
    if column.sql_type == duck.VARCHAR:
        return f"CAST({col}->>'$' AS VARCHAR) AS {col}"
    if column.sql_type == duck.BIGINT:
        return f"CAST({col} AS BIGINT) AS {col}"
    return f"CAST({col}->>'$' AS {duck.DECIMAL}) AS {col}"


def run_streamed(rule: Rule, inputs: Mapping[str, Iterable[bytes]],
                 params: Mapping[str, str], spool_dir: Path | None = None) -> RuleOutput:
    """run_rule over inputs given as chunks of canonical JSON Lines."""
    with RunSession(rule, spool_dir) as session:
        for name, chunks in inputs.items():
            for chunk in chunks:
                session.append_jsonl(name, chunk)
            session.finish(name)
        return session.run(params)

