"""Running a rule: its SQL over its inputs in a locked-down DuckDB, and the canonical
output (DESIGN.md decision 9).

Pure apart from DuckDB in memory: inputs in (rows as dicts of str, int and Decimal, as
agents.lookup answers and agents.own_inputs reads them), bytes out. The same inputs in
any row order give the same bytes, whatever the thread count: every input table is stored
in a canonical row order, SQL whose result could depend on row order runs on one thread
(exchange.compare.duck), and the output is sorted by subject. A run is bounded by
`RuleLimits` (time, memory, threads); a run over one fails naming it.

The output is JSON Lines, one finding a line, each the canonical JSON (sorted keys) of
the SQL's columns with decimals as strings with exactly two places, plus `rule_id`,
`rule_digest` (hex), `period` ("" for a rule not period-bound) and `severity`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import duckdb

from agents.common.checks import format_fen
from exchange.compare import duck
from exchange.compare.duck import RuleLimits
from exchange.compare.rules import Rule, RuleError, duck_columns
from exchange.errors import MalformedInput
from exchange.ledger.sealing import canonical_json

DUCKDB_VERSION = duck.DUCKDB_VERSION
OUTPUT_ROWS_MAX = 1_000_000

Rows = Sequence[Mapping[str, object]]


class RuleLimitExceeded(RuleError):
    """A run of a rule went over one of its limits (time, memory): nothing of the run is
    kept, and the message names the rule and the limit."""

    def __init__(self, rule: Rule, what: str) -> None:
        super().__init__(rule.source, None, f"rule {rule.id}: {what}")


@dataclass(frozen=True)
class RuleOutput:
    """The findings of one run, canonical."""

    rule_id: str
    period: str
    rows: tuple[dict[str, object], ...] = field(repr=False)  # as serialized, by subject
    canonical_bytes: bytes = field(repr=False)  # JSON Lines
    digest: bytes  # SHA-256 of canonical_bytes (Findings.output_digest)
    duckdb_version: str

    @property
    def lines(self) -> list[bytes]:
        """Each finding's canonical line (with its "\\n")."""
        return self.canonical_bytes.splitlines(keepends=True)

    @property
    def line_digests(self) -> list[bytes]:
        """SHA-256 of each finding's line (FindingSummary.digest)."""
        return [hashlib.sha256(line).digest() for line in self.lines]


def run_rule(rule: Rule, inputs: Mapping[str, Rows], params: Mapping[str, str], *,
             loader: str = "auto", timings: dict[str, float] | None = None,
             limits: RuleLimits | None = None) -> RuleOutput:
    """Run `rule` over `inputs` (every input the rule declares, by name) for `params`,
    within `limits` (the defaults when None).

    RuleError for SQL that fails (naming the rule file and the line), RuleLimitExceeded
    for a run over a limit (naming the rule and the limit), MalformedInput for inputs
    missing, unknown, or not of the declared columns and types. `timings`, if given,
    receives the seconds spent loading, in SQL and canonicalising.
    """
    limits = limits or RuleLimits()
    rule.run_period(params)  # parameters checked before any work
    expected = set(rule.input_names)
    if set(inputs) != expected:
        missing = sorted(expected - set(inputs))
        unknown = sorted(set(inputs) - expected)
        raise MalformedInput(f"{rule.source}: rule {rule.id} inputs: "
                             + "; ".join(part for part in (
                                 f"missing {', '.join(missing)}" if missing else "",
                                 f"unknown {', '.join(unknown)}" if unknown else "")
                                 if part))
    started = time.perf_counter()
    con = duck.connect(limits)
    try:
        try:
            for name, columns in duck_columns(rule).items():
                duck.create_table(con, name, columns, inputs[name], loader)
        except duck.InputProblem as exc:
            raise MalformedInput(f"{rule.source}: rule {rule.id}: {exc}") from None
        except duckdb.OutOfMemoryException:
            raise RuleLimitExceeded(rule, f"its inputs exceed the memory limit "
                                    f"{limits.memory_mib} MiB") from None
        loaded = time.perf_counter()
        output = execute_locked(rule, con, params, timings, limits)
    finally:
        con.close()
    if timings is not None:
        timings["load_s"] = loaded - started
    return output


def execute_locked(rule: Rule, con: duckdb.DuckDBPyConnection, params: Mapping[str, str],
                   timings: dict[str, float] | None = None,
                   limits: RuleLimits | None = None) -> RuleOutput:
    """Check the rule's SQL again (the allow-list), set the thread count (one for
    order-sensitive SQL), lock `con` (its input tables loaded) down and run the SQL in it
    within `limits`: the canonical output. `timings` receives sql_s and canonical_s."""
    limits = limits or RuleLimits()
    period = rule.run_period(params)
    try:
        shape = duck.check_statement(con, rule.sql, list(rule.input_names))
    except duck.SqlProblem as problem:
        raise rule.sql_error(problem.message, problem.sql_line) from None
    duck.set_threads(con, 1 if shape.order_sensitive else limits.threads)
    duck.lock(con)
    started = time.perf_counter()
    try:
        names, result = duck.run_limited(con, rule.sql, limits, OUTPUT_ROWS_MAX + 1)
    except duck.SqlProblem as problem:
        raise rule.sql_error(problem.message, problem.sql_line) from None
    except duck.LimitExceeded as exc:
        raise RuleLimitExceeded(rule, str(exc)) from None
    ran = time.perf_counter()
    if len(result) > OUTPUT_ROWS_MAX:
        raise rule.sql_error(f"more than {OUTPUT_ROWS_MAX} findings", None)
    if names != [n for n, _t in rule.output_columns]:
        raise rule.sql_error(f"the SQL returned columns {names}, not those it was checked "
                             f"with {[n for n, _t in rule.output_columns]}", None)
    rows, data = canonical_output(rule, period, names, result)
    done = time.perf_counter()
    if timings is not None:
        timings.update(sql_s=ran - started, canonical_s=done - ran)
    return RuleOutput(rule_id=rule.id, period=period, rows=tuple(rows), canonical_bytes=data,
                      digest=hashlib.sha256(data).digest(), duckdb_version=DUCKDB_VERSION)


def canonical_output(rule: Rule, period: str, names: Sequence[str],
                     result: Sequence[tuple[object, ...]]
                     ) -> tuple[list[dict[str, object]], bytes]:
    """The rows as serialized, sorted by subject, and their JSON Lines."""
    extra: dict[str, object] = {"rule_id": rule.id, "rule_digest": rule.digest_hex,
                                "period": period, "severity": rule.severity}
    subject_at = list(names).index("subject")
    by_subject: dict[str, dict[str, object]] = {}
    for values in result:
        row: dict[str, object] = {}
        for name, value in zip(names, values, strict=True):
            row[name] = _canonical_value(rule, name, value)
        subject = values[subject_at]
        if not isinstance(subject, str) or not subject:
            raise rule.sql_error(f"a row's subject is {subject!r}, not a non-empty text",
                                 None)
        if row["amount"] is None:
            raise rule.sql_error(f"subject {subject}: amount is NULL", None)
        if subject in by_subject:
            raise rule.sql_error(f"subject {subject} appears twice: a rule makes one "
                                 "finding per subject", None)
        row.update(extra)
        by_subject[subject] = row
    rows = [by_subject[s] for s in sorted(by_subject)]
    try:
        data = b"".join(canonical_json(row) + b"\n" for row in rows)
    except MalformedInput as exc:
        raise rule.sql_error(f"a row has no canonical form: {exc}", None) from None
    return rows, data


def _canonical_value(rule: Rule, name: str, value: object) -> object:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, Decimal):
        fen = value.scaleb(2)
        if not value.is_finite() or fen != fen.to_integral_value():
            raise rule.sql_error(f"column {name}: {value} has more than two decimals", None)
        return format_fen(int(fen))
    raise rule.sql_error(f"column {name}: a {type(value).__name__} value has no canonical "
                         "form", None)


def inputs_digest(rule: Rule, inputs: Mapping[str, Rows]) -> bytes:
    """SHA-256 naming exactly these inputs, whatever their row order: the canonical JSON
    of {input name: SHA-256 hex of its rows' canonical lines, sorted}. With the rule
    digest and the period it keys a run (DESIGN.md decision 9)."""
    expected = set(rule.input_names)
    if set(inputs) != expected:
        raise MalformedInput(f"{rule.source}: rule {rule.id}: inputs "
                             f"{sorted(inputs)}, expected {sorted(expected)}")
    per_input = {}
    for name in sorted(inputs):
        lines = sorted(canonical_json(dict(row)) + b"\n" for row in inputs[name])
        per_input[name] = hashlib.sha256(b"".join(lines)).hexdigest()
    return hashlib.sha256(canonical_json(per_input)).digest()
