"""An agency's own inputs to its comparison rules: rows of one of its datasets or views
for a month, read from its own store.

The rows have the value types agents.lookup answers with (text as str, flags and counts
as int, amounts as Decimals with two places), so a rule sees its own data and the other
agencies' answers alike. A dataset is filtered on its `period` column, or else on its
principal date column (agents.lookup.PRINCIPAL_DATES) inside the month; rows come sorted
by the dataset's key, a view's in the view's own order (by subject).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from decimal import Decimal
from typing import Any

from agents import datasets_of, views_of
from agents.common.checks import check_period, fen_to_decimal, period_bounds
from agents.common.schema import Column, Dataset, Kind
from agents.common.store import AgencyStore, to_int
from agents.common.view import View
from agents.lookup import PRINCIPAL_DATES
from exchange.errors import MalformedInput

Row = dict[str, object]


def read_own(store: AgencyStore, dataset: str, period: str | None,
             fields: Sequence[str] = ()) -> list[Row]:
    """The store's rows of `dataset` (one of the store's agency's datasets or views) in
    `period` (None: every row of a dataset; a view not per month), with `fields` (all
    columns when empty)."""
    return list(iter_own(store, dataset, period, fields))


def iter_own(store: AgencyStore, dataset: str, period: str | None,
             fields: Sequence[str] = ()) -> Iterator[Row]:
    """read_own, one row at a time."""
    if period is not None:
        try:
            check_period(period)
        except ValueError as exc:
            raise MalformedInput(str(exc)) from None
    agency = store.agency
    datasets = {d.name: d for d in datasets_of(agency)}
    views = views_of(agency)
    if dataset in datasets:
        return _dataset_rows(store, datasets[dataset], period, fields)
    if dataset in views:
        return _view_rows(store, views[dataset], period, fields)
    offered = ", ".join(list(datasets) + list(views))
    raise MalformedInput(f"{agency} has no dataset or view {dataset!r} (it has {offered})")


def _chosen(name: str, fields: Sequence[str], columns: Sequence[str]) -> list[str]:
    if not fields:
        return list(columns)
    unknown = [f for f in fields if f not in columns]
    if unknown:
        raise MalformedInput(f"{name} has no column(s) {', '.join(unknown)} (it has "
                             f"{', '.join(columns)})")
    return [c for c in columns if c in fields]


def _q(name: str) -> str:
    assert name.replace("_", "").isalnum(), name
    return f'"{name}"'


def _dataset_rows(store: AgencyStore, dataset: Dataset, period: str | None,
                  fields: Sequence[str]) -> Iterator[Row]:
    names = _chosen(dataset.name, fields, dataset.column_names)
    selected = list(dict.fromkeys(list(dataset.key) + names))
    where = ""
    params: dict[str, object] = {}
    if period is not None:
        if "period" in dataset.column_names:
            where = f" WHERE {_q(dataset.stored('period'))} = :period"
            params = {"period": period}
        else:
            date = next((d for d in PRINCIPAL_DATES if d in dataset.column_names), None)
            if date is None:
                raise MalformedInput(f"{dataset.name} has neither a period nor a date: "
                                     "read it without a period")
            start, end = period_bounds(period)
            column = _q(dataset.stored(date))
            where = f" WHERE {column} >= :start AND {column} < :end"
            params = {"start": start, "end": end}
    sql = (f"SELECT {', '.join(_q(dataset.stored(c)) for c in selected)} "
           f"FROM {_q(dataset.name)}{where}")
    # sorted by the key in the store: text in byte order (SQLite's BINARY, PostgreSQL's
    # "C"), which is Python's order of the same strings; streamed, never held whole
    order = ", ".join(_q(dataset.stored(k)) for k in dataset.key)
    converters = [(n, selected.index(n), _converter(dataset.column_map[n])) for n in names]
    for row in store.stream(f"{sql} ORDER BY {order}", params):
        yield {n: convert(row[i]) for n, i, convert in converters}


def _converter(column: Column) -> Callable[[object], object]:
    if column.kind is Kind.AMOUNT:
        return lambda v: fen_to_decimal(to_int(v))
    if column.kind is Kind.FLAG:
        return to_int
    optional = column.optional

    def text(value: object) -> str | None:
        if value is None and optional:
            return None
        assert isinstance(value, str), (column.name, value)
        return value

    return text


def _view_rows(store: AgencyStore, view: View[Any], period: str | None,
               fields: Sequence[str]) -> Iterator[Row]:
    names = _chosen(view.name, fields, [c.name for c in view.columns])
    if view.period_bound and period is None:
        raise MalformedInput(f"view {view.name} is per month: name a period")
    if not view.period_bound and period is not None:
        raise MalformedInput(f"view {view.name} is not per month: read it without a period")
    types = {c.name: c.type for c in view.columns}
    for row in view.iter_rows(store, period):
        out: Row = {}
        for name in names:
            value = getattr(row, name)
            if types[name] == "decimal":
                assert isinstance(value, Decimal) and value.as_tuple().exponent == -2, value
            elif types[name] == "integer":
                assert isinstance(value, int) and not isinstance(value, bool), value
            else:
                assert isinstance(value, str), value
            out[name] = value
        yield out
