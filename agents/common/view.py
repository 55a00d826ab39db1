"""A catalog view: an aggregate an agency computes on its own store and offers to the
others (DATA_CONTRACT.md, "Aggregates the agencies offer").

A view is asked for the whole of it (a period-wide query) or for a few subjects: then the
subjects go into the view's SQL as ``AND <column> IN (:s0, :s1, ...)``, in statements of
at most PARAMETERS_PER_STATEMENT_MAX parameters, so that the store reads the subjects'
rows by index instead of the view being computed whole and filtered afterwards. Either
way a row is the same: filtering a view by subjects gives exactly the whole view's rows
of those subjects, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from agents.common.store import AgencyStore

RowT = TypeVar("RowT")

# Bound parameters in one statement, subject values and the others together: far below
# every driver's limit (SQLite 999 in old builds, PostgreSQL 65535).
PARAMETERS_PER_STATEMENT_MAX = 500
SUBJECT_TYPES = ("uscc", "person_id")

# Subject values by view column: rows whose column holds one of the values (any column).
SubjectFilter = Mapping[str, Collection[str]]


@dataclass(frozen=True)
class ViewColumn:
    name: str
    type: str  # uscc, person_id, period, decimal, integer
    description: str


@dataclass(frozen=True)
class View(Generic[RowT]):
    """A named view: its columns and the function computing its rows, sorted by subject.

    A period-bound view takes the month `YYYY-MM`; the others take None. `compute` takes
    a subject filter too (None: every row) on the view's subject columns, those of type
    uscc or person_id.
    """

    name: str
    agency: str
    description: str
    columns: tuple[ViewColumn, ...]
    period_bound: bool
    compute: Callable[[AgencyStore, str | None, SubjectFilter | None], Sequence[RowT]]
    # The whole view (no subject filter) row by row, in the same order, from a read that
    # streams: what a period-wide read uses, so that nothing holds the whole view.
    stream: Callable[[AgencyStore, str | None], Iterator[RowT]] | None = None

    @property
    def subject_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.type in SUBJECT_TYPES)

    def rows(self, store: AgencyStore, period: str | None = None,
             subjects: SubjectFilter | None = None) -> Sequence[RowT]:
        """The view's rows in `period`; with `subjects`, only the rows whose column named
        in it holds one of its values (an empty filter matches no row)."""
        _check_call(self, store, period)
        if subjects is not None:
            unknown = sorted(set(subjects) - set(self.subject_columns))
            if unknown:
                raise ValueError(f"view {self.name} cannot be filtered on "
                                 f"{', '.join(unknown)} (only on "
                                 f"{', '.join(self.subject_columns)})")
            if isinstance(subjects, str) or any(isinstance(v, str)
                                                for v in subjects.values()):
                raise TypeError("a subject filter maps columns to collections of values")
        return self.compute(store, period, subjects)

    def iter_rows(self, store: AgencyStore, period: str | None = None,
                  subjects: SubjectFilter | None = None) -> Iterator[RowT]:
        """`rows`, one at a time: streamed from the store for the whole view."""
        if subjects is None and self.stream is not None:
            _check_call(self, store, period)
            return self.stream(store, period)
        return iter(self.rows(store, period, subjects))


def _check_call(view: View[Any], store: AgencyStore, period: str | None) -> None:
    if store.agency != view.agency:
        raise ValueError(f"view {view.name} is {view.agency}'s, the store is "
                         f"{store.agency}'s")
    if view.period_bound != (period is not None):
        raise ValueError(f"view {view.name} "
                         + ("needs a period" if view.period_bound else "takes no period"))


def subject_conditions(column_sql: str, values: Collection[str] | None,
                       other_params: int) -> Iterator[tuple[str, dict[str, object]]]:
    """The conditions a view's statement is run with, each with its parameters: with no
    filter (None) one empty condition; otherwise ``" AND <column_sql> IN (:s0, ...)"``
    over chunks of the values (each once), at most PARAMETERS_PER_STATEMENT_MAX
    parameters a statement counting the statement's `other_params`. No values, no
    statement."""
    assert column_sql.replace("_", "").replace(".", "").isalnum(), column_sql
    if values is None:
        yield "", {}
        return
    distinct = list(dict.fromkeys(values))
    assert all(isinstance(v, str) for v in distinct), distinct[:3]
    per_statement = PARAMETERS_PER_STATEMENT_MAX - other_params
    assert per_statement >= 1, other_params
    for first in range(0, len(distinct), per_statement):
        chunk = distinct[first:first + per_statement]
        names = [f"s{j}" for j in range(len(chunk))]
        condition = f" AND {column_sql} IN ({', '.join(':' + n for n in names)})"
        yield condition, dict(zip(names, chunk, strict=True))


def fetch_filtered(store: AgencyStore, sql: str, params: Mapping[str, object],
                   columns_sql: Mapping[str, str], subjects: SubjectFilter | None
                   ) -> list[tuple[object, ...]]:
    """The rows of `sql` (which holds ``{subjects}`` where a condition may be added to its
    WHERE clause) run with `params`: all of them without a filter, else those matching
    the filter of each view column (whose SQL expression `columns_sql` gives), a row
    matched on several columns or values once (a view's rows are distinct: each is one
    company's)."""
    if subjects is None:
        return store.fetch(sql.format(subjects=""), params)
    assert set(subjects) <= set(columns_sql), (set(subjects), set(columns_sql))
    found: dict[tuple[object, ...], None] = {}
    for column, values in subjects.items():
        for condition, subject_params in subject_conditions(columns_sql[column], values,
                                                            len(params)):
            assert not set(subject_params) & set(params)
            all_params = {**params, **subject_params}
            assert len(all_params) <= PARAMETERS_PER_STATEMENT_MAX
            found.update(dict.fromkeys(store.fetch(sql.format(subjects=condition),
                                                   all_params)))
    return list(found)
