"""Rules: what a rule is (its inputs, parameters, SQL), its canonical bytes and digest,
and the plan of a run (which own data to read and which queries to ask, for given
parameters). Reading a rule file is exchange.compare.rule_file's.

A rule is a YAML file ``agents/<owner>/rules/<id>.yaml`` (docs/rules.md has the format).
The canonical bytes are the canonical JSON of what the file means (defaults filled in,
so whitespace, comments, key order and spelled-out defaults change nothing); the digest,
SHA-256 of those bytes, is what the ledger registers. The canonical bytes are themselves
a valid rule file (JSON is YAML): `rule_file.load_rule_bytes` reads them back to the
same rule.

The SQL is checked at load too (`check_sql`): one SELECT reading only its inputs and
calling only allowed functions (exchange.compare.duck), bound against empty input
tables of the declared types, returning `subject` (text) and `amount` (a decimal) and
detail columns that have a canonical form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from agents.common import checks
from agents.lookup import SUBJECTS_MAX, LookupRequest
from exchange.compare import duck
from exchange.ledger.sealing import canonical_json
from exchange.specfile import SpecError

INPUTS_MAX = 16
VERSION_MAX = 2**32 - 1  # RuleRegistration.version is a uint32

SEVERITIES = ("high", "medium", "low")
SHAPES = ("aggregate", "subject_set")
PARAMETER_TYPES = ("period",)
SUBJECT_TYPES = ("uscc", "person_id")
# Columns every output row gets besides the SQL's own: the SQL may not name them.
RESERVED_OUTPUT_COLUMNS = ("rule_id", "rule_digest", "period", "severity")
# The run's period (in each output row) is the parameter of this name, "" without one.
PERIOD_PARAMETER = "period"


class RuleError(SpecError):
    """A rule file that is not a valid rule, or a rule whose SQL fails: the message names
    the file and, where one is known, the line."""


# -- the rule ------------------------------------------------------------------------

@dataclass(frozen=True)
class InputColumn:
    """A column of an input table and its SQL type (VARCHAR, BIGINT, DECIMAL(18,2))."""

    name: str
    sql_type: str
    nullable: bool = False


@dataclass(frozen=True)
class Parameter:
    name: str
    type: str  # one of PARAMETER_TYPES
    required: bool = True


@dataclass(frozen=True)
class QuerySpec:
    """An input asked of another agency: one of its catalog views."""

    name: str
    agency: str
    dataset: str  # a catalog view of `agency`
    shape: str  # "aggregate" (period-wide) or "subject_set"
    period: str | None  # the parameter named ("$period" in the file), None: no period
    fields: tuple[str, ...]
    columns: tuple[InputColumn, ...]
    subjects_from: tuple[str, str] | None = None  # (input name, column) for subject_set
    subject_key: str | None = None  # the lookup key the subjects are given as
    line: int = 0


@dataclass(frozen=True)
class OwnSpec:
    """An input read from the owner's own store: a dataset or one of its views."""

    name: str
    dataset: str
    is_view: bool
    period: str | None  # the parameter named, None: not period-bound (whole dataset)
    fields: tuple[str, ...]
    columns: tuple[InputColumn, ...]
    line: int = 0


@dataclass(frozen=True)
class OwnRead:
    """A concrete read of the owner's own data for one run."""

    name: str
    dataset: str
    period: str | None
    fields: tuple[str, ...]


@dataclass(frozen=True)
class PlannedQuery:
    """A concrete query of one run. A subject_set query's subjects are the distinct values
    of a column of an input read or answered before it: `requests` turns them into the
    lookup requests to send (none when there is no subject: the input is then empty)."""

    name: str
    agency: str
    dataset: str
    shape: str
    period: str | None
    fields: tuple[str, ...]
    subjects_from: tuple[str, str] | None
    subject_key: str | None

    def subjects(self, inputs: Mapping[str, Sequence[Mapping[str, object]]]) -> list[str]:
        """The distinct subject values, sorted (subject_set queries only)."""
        assert self.subjects_from is not None, self.name
        source, column = self.subjects_from
        if source not in inputs:
            raise KeyError(f"query {self.name} takes its subjects from {source}, "
                           "which is not read yet")
        values = {row[column] for row in inputs[source]}
        values.discard(None)
        assert all(isinstance(v, str) for v in values), (self.name, column)
        return sorted(str(v) for v in values)

    def requests(self, inputs: Mapping[str, Sequence[Mapping[str, object]]] | None = None
                 ) -> list[LookupRequest]:
        """The lookup requests answering this input (their rows concatenated are the
        input): one period-wide request for an aggregate; for a subject set, one per
        SUBJECTS_MAX subjects, and none for no subject."""
        if self.shape == "aggregate":
            return [LookupRequest(dataset=self.dataset, subjects=(), period=self.period,
                                  fields=self.fields)]
        assert self.subject_key is not None and inputs is not None, self.name
        values = self.subjects(inputs)
        return [LookupRequest(dataset=self.dataset,
                              subjects=tuple((self.subject_key, v)
                                             for v in values[i:i + SUBJECTS_MAX]),
                              period=self.period, fields=self.fields)
                for i in range(0, len(values), SUBJECTS_MAX)]


@dataclass(frozen=True)
class RulePlan:
    """What one run of a rule reads and asks: own reads first, then the queries in order
    (a query may take its subjects from an own read or an earlier query)."""

    rule_id: str
    rule_digest: bytes
    owner: str
    parameters: tuple[tuple[str, str], ...]  # (name, value), sorted
    period: str  # "" for a rule that is not period-bound
    own: tuple[OwnRead, ...]
    queries: tuple[PlannedQuery, ...]

    @property
    def parameters_json(self) -> bytes:
        """The run's parameters as canonical JSON (Findings.parameters)."""
        return canonical_json(dict(self.parameters))


@dataclass(frozen=True)
class Rule:
    source: str  # the file it was read from (for messages)
    id: str
    version: int
    owner: str
    description: str
    severity: str
    parameters: tuple[Parameter, ...]
    queries: tuple[QuerySpec, ...]
    own: tuple[OwnSpec, ...]
    sql: str
    output: tuple[tuple[str, str], ...]  # (column, note)
    output_columns: tuple[tuple[str, str], ...]  # (name, DuckDB type) of the SQL's result
    canonical_bytes: bytes = field(repr=False)
    sql_line: int | None = None  # the file line of the SQL's first line, if it maps
    sql_block: bool = False  # a literal block: SQL line n is file line sql_line + n - 1

    @property
    def digest(self) -> bytes:
        """SHA-256 of the canonical bytes: what the ledger registers."""
        return hashlib.sha256(self.canonical_bytes).digest()

    @property
    def digest_hex(self) -> str:
        return self.digest.hex()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.own) + tuple(q.name for q in self.queries)

    @property
    def input_columns(self) -> dict[str, tuple[InputColumn, ...]]:
        """Each input's columns, own reads then queries."""
        out = {o.name: o.columns for o in self.own}
        out.update({q.name: q.columns for q in self.queries})
        return out

    @property
    def period_bound(self) -> bool:
        return any(p.name == PERIOD_PARAMETER for p in self.parameters)

    def file_line(self, sql_line: int | None) -> int | None:
        """The rule file's line of the SQL's line `sql_line`."""
        if self.sql_line is None:
            return None
        if self.sql_block and sql_line is not None:
            return self.sql_line + sql_line - 1
        return self.sql_line

    def sql_error(self, message: str, sql_line: int | None) -> RuleError:
        where = "" if sql_line is None else f" (SQL line {sql_line})"
        return RuleError(self.source, self.file_line(sql_line),
                         f"rule {self.id}: {message}{where}")

    def check_parameters(self, params: Mapping[str, str]) -> dict[str, str]:
        """The parameters of a run, checked: every required one given, none unknown,
        each a valid value of its type."""
        declared = {p.name: p for p in self.parameters}
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise RuleError(self.source, None, f"rule {self.id} has no parameter(s) "
                            f"{', '.join(unknown)}")
        out: dict[str, str] = {}
        for p in self.parameters:
            value = params.get(p.name)
            if value is None:
                if p.required:
                    raise RuleError(self.source, None, f"rule {self.id} needs parameter "
                                    f"{p.name} ({p.type})")
                continue
            if not isinstance(value, str):
                raise RuleError(self.source, None, f"rule {self.id}: parameter {p.name} "
                                f"is not text: {value!r}")
            try:
                checks.check_period(value)
            except ValueError as exc:
                raise RuleError(self.source, None, f"rule {self.id}: parameter "
                                f"{p.name}: {exc}") from None
            out[p.name] = value
        return out

    def run_period(self, params: Mapping[str, str]) -> str:
        """The period a run's findings carry: its `period` parameter, "" if none."""
        return self.check_parameters(params).get(PERIOD_PARAMETER, "")

    def plan(self, params: Mapping[str, str]) -> RulePlan:
        """The concrete reads and queries of a run with these parameters."""
        checked = self.check_parameters(params)

        def resolve(reference: str | None, name: str) -> str | None:
            if reference is None:
                return None
            value = checked.get(reference)
            if value is None:
                raise RuleError(self.source, None, f"rule {self.id}: input {name} needs "
                                f"parameter {reference}, not given")
            return value

        own = tuple(OwnRead(o.name, o.dataset, resolve(o.period, o.name), o.fields)
                    for o in self.own)
        queries = tuple(PlannedQuery(q.name, q.agency, q.dataset, q.shape,
                                     resolve(q.period, q.name), q.fields, q.subjects_from,
                                     q.subject_key)
                        for q in self.queries)
        return RulePlan(rule_id=self.id, rule_digest=self.digest, owner=self.owner,
                        parameters=tuple(sorted(checked.items())),
                        period=checked.get(PERIOD_PARAMETER, ""), own=own, queries=queries)


# -- the SQL ---------------------------------------------------------------------------

def check_sql(rule: Rule) -> list[tuple[str, str]]:
    """The SQL's result columns, checked against empty input tables."""
    con = duck.connect()
    try:
        for name, input_columns in rule.input_columns.items():
            duck.create_table(con, name, _duck_columns(input_columns), None)
        duck.lock(con)
        try:
            duck.check_statement(con, rule.sql, list(rule.input_columns))
            result = duck.describe(con, rule.sql)
        except duck.SqlProblem as sql_problem:
            raise rule.sql_error(sql_problem.message, sql_problem.sql_line) from None
    finally:
        con.close()
    names = [n for n, _t in result]
    for required in ("subject", "amount"):
        if required not in names:
            raise rule.sql_error(f"the SQL returns no column {required!r} (it returns "
                                 f"{', '.join(names)})", None)
    seen: set[str] = set()
    for name, type_name in result:
        if name in seen:
            raise rule.sql_error(f"the SQL returns two columns named {name!r}", None)
        seen.add(name)
        if name in RESERVED_OUTPUT_COLUMNS:
            raise rule.sql_error(f"the SQL may not return a column {name!r}: every row "
                                 "gets it from the run", None)
        problem = duck.output_type_problem(name, type_name)
        if problem is not None:
            raise rule.sql_error(problem, None)
    return result


def duck_columns(rule: Rule) -> dict[str, tuple[duck.Column, ...]]:
    """Each input's table columns for the engine."""
    return {name: _duck_columns(columns) for name, columns in rule.input_columns.items()}


def _duck_columns(columns: Sequence[InputColumn]) -> tuple[duck.Column, ...]:
    return tuple(duck.Column(c.name, c.sql_type, c.nullable) for c in columns)
