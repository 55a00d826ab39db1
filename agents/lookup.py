"""The lookup a node runs to answer a committed query: the subject looked up in the
agency's own store with a parameterized query, never with SQL from another agency.

A request names one of the agency's datasets or catalog views, the subjects (pairs
``key=value``), an optional month and the fields wanted. A subject key is a lookup key
of the dataset (what the catalog lists: its key columns and its uscc, person_id and
holder_id columns) or a subject kind, ``uscc`` or ``person_id``, which matches every
column of that kind (an invoice by uscc is one its issuer or its buyer; an account by
uscc is one a company holds). Rows matching any subject are returned once each, sorted
by the dataset's key (a view's rows keep the view's own order), as dicts of contract
column names to canonical-JSON values: text as str, flags and counts as int, amounts
as Decimals with two places. What cannot be answered is a `LookupRefused` with a
stable code.

Pure apart from `store.fetch`: portable SQL with ``:name`` parameters, at most
`PARAMETERS_PER_STATEMENT_MAX` parameters a statement, each statement limited to one
row more than the caller's row limit; ordering is done here, on Python strings, so that
two adapters (whatever their collation) give the same bytes. A view asked for subjects
is computed for those subjects only (the view's SQL filters on them), never whole.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from functools import cache
from typing import Any

from agents import datasets_of, views_of
from agents.common import checks
from agents.common import view as view_module
from agents.common.schema import Column, Dataset, Kind
from agents.common.store import AgencyStore, to_int
from agents.common.view import View
from exchange.errors import MalformedInput, NotAllowed

SUBJECTS_MAX = 100_000
# Bound parameters in one statement, subject values and the period's together, for
# datasets as for views (far below every driver's limit).
PARAMETERS_PER_STATEMENT_MAX = view_module.PARAMETERS_PER_STATEMENT_MAX
SUBJECT_KINDS = ("uscc", "person_id")
# A dataset with several date columns filters a period on the first of these it has.
PRINCIPAL_DATES = ("issued_on", "declared_on", "booked_on", "recorded_on",
                   "registered_on", "opened_on")

UNKNOWN_DATASET = "UNKNOWN_DATASET"
UNKNOWN_FIELD = "UNKNOWN_FIELD"
BAD_SUBJECT = "BAD_SUBJECT"
BAD_PERIOD = "BAD_PERIOD"
SUBJECTS_REQUIRED = "SUBJECTS_REQUIRED"
TOO_MANY_SUBJECTS = "TOO_MANY_SUBJECTS"
ROW_LIMIT = "ROW_LIMIT"
REFUSAL_CODES = frozenset({UNKNOWN_DATASET, UNKNOWN_FIELD, BAD_SUBJECT, BAD_PERIOD,
                           SUBJECTS_REQUIRED, TOO_MANY_SUBJECTS, ROW_LIMIT})

REQUEST_KEYS = ("dataset", "subjects", "period", "fields")
_SUBJECT_KEY_SHAPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_SUBJECT_VALUE_CHARS_MAX = 200
_SUBJECT_COLUMN_KINDS = (Kind.USCC, Kind.PERSON_ID, Kind.HOLDER_ID)
_HOLDER_KIND_OF = {"uscc": "company", "person_id": "person"}
_IDENTIFIER_PARSE = Column("identifier", Kind.IDENTIFIER, "").parser()


@dataclass(frozen=True)
class LookupRequest:
    """What a query asks of the answering agency (sealed in the query as JSON)."""

    dataset: str  # a dataset or catalog view of the agency
    subjects: tuple[tuple[str, str], ...] = ()  # (key, value); () = period-wide (views)
    period: str | None = None  # "YYYY-MM"
    fields: tuple[str, ...] = ()  # () = every column


class LookupRefused(NotAllowed):
    """A request the agency does not answer; `code` is one of REFUSAL_CODES."""

    def __init__(self, code: str, reason: str) -> None:
        assert code in REFUSAL_CODES, code
        super().__init__(reason)
        self.code = code
        self.reason = reason


# -- the request as plaintext -----------------------------------------------------------

def parse_subject(text: str) -> tuple[str, str]:
    """``"uscc=9144..."`` -> ``("uscc", "9144...")``. Only the shape is checked here;
    whether the key and value suit the dataset is the lookup's to say."""
    key, sep, value = text.partition("=")
    if not sep:
        raise MalformedInput(f"subject {text!r} is not key=value")
    if _SUBJECT_KEY_SHAPE.fullmatch(key) is None:
        raise MalformedInput(f"subject {text!r}: {key!r} is not a key name "
                             "(lower-case letters, digits and _)")
    if not value:
        raise MalformedInput(f"subject {text!r} has an empty value")
    if len(value) > _SUBJECT_VALUE_CHARS_MAX:
        raise MalformedInput(f"subject {text!r}: value longer than "
                             f"{_SUBJECT_VALUE_CHARS_MAX} characters")
    if value != value.strip() or not value.isprintable():
        raise MalformedInput(f"subject {text!r}: value holds white space or a control "
                             "character")
    return key, value


def request_to_json(request: LookupRequest) -> dict[str, object]:
    """The request as a JSON object (every key present), for canonical_json."""
    return {
        "dataset": request.dataset,
        "subjects": [[key, value] for key, value in request.subjects],
        "period": request.period,
        "fields": list(request.fields),
    }


def request_from_json(obj: object) -> LookupRequest:
    """The request a JSON object (as request_to_json writes it) holds; MalformedInput
    for a missing or unknown key or a value of the wrong type."""
    if not isinstance(obj, dict):
        raise MalformedInput(f"a lookup request is a JSON object, got {type(obj).__name__}")
    unknown = sorted(str(k) for k in obj if k not in REQUEST_KEYS)
    if unknown:
        raise MalformedInput(f"lookup request: unknown key(s) {', '.join(unknown)}")
    missing = [k for k in REQUEST_KEYS if k not in obj]
    if missing:
        raise MalformedInput(f"lookup request: missing key(s) {', '.join(missing)}")
    dataset, subjects, period, fields = (obj[k] for k in REQUEST_KEYS)
    if not isinstance(dataset, str) or not dataset:
        raise MalformedInput("lookup request: dataset is not a non-empty string")
    if not isinstance(subjects, list):
        raise MalformedInput("lookup request: subjects is not a list")
    pairs = []
    for i, pair in enumerate(subjects):
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(part, str) for part in pair)):
            raise MalformedInput(f"lookup request: subject {i} is not a [key, value] pair "
                                 "of strings")
        pairs.append((pair[0], pair[1]))
    if period is not None and not isinstance(period, str):
        raise MalformedInput("lookup request: period is neither a string nor null")
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise MalformedInput("lookup request: fields is not a list of strings")
    return LookupRequest(dataset=dataset, subjects=tuple(pairs), period=period,
                         fields=tuple(fields))


# -- what a dataset can be looked up by ---------------------------------------------------

def lookup_keys(dataset: Dataset) -> tuple[str, ...]:
    """The dataset's lookup key columns, as the catalog lists them: its key, its subject
    columns, and the columns referring to another of the agency's datasets (the bank
    transactions of an account: transactions by account_no)."""
    return tuple(dict.fromkeys(
        list(dataset.key) + [c.name for c in dataset.columns
                             if c.kind in _SUBJECT_COLUMN_KINDS]
        + [r.column for r in dataset.references]))


@dataclass(frozen=True)
class _Target:
    """A stored column a subject value is compared with, and for a holder_id column the
    holder kind the value must be of (stored kind column, value), if any."""

    column: str
    holder_kind: tuple[str, str] | None = None


@dataclass(frozen=True)
class _SubjectKey:
    name: str
    kind: Kind  # how a value is checked
    targets: tuple[_Target, ...]


@dataclass(frozen=True)
class _DatasetPlan:
    dataset: Dataset
    keys: dict[str, _SubjectKey]
    period_column: str | None  # stored name of the `period` column
    date_column: str | None  # stored name of the principal date column


@cache
def _dataset_plan(dataset: Dataset) -> _DatasetPlan:
    keys: dict[str, _SubjectKey] = {}
    for name in lookup_keys(dataset):
        column = dataset.column_map[name]
        assert column.sql_type == "TEXT", (dataset.name, name)
        keys[name] = _SubjectKey(name, column.kind, (_Target(column.stored_name),))
    for kind_name, kind in (("uscc", Kind.USCC), ("person_id", Kind.PERSON_ID)):
        targets = []
        for column in dataset.columns:
            if column.kind is kind:
                targets.append(_Target(column.stored_name))
            elif column.kind is Kind.HOLDER_ID:
                kind_column = dataset.column_map[column.holder_kind_column]
                holder_kind = _HOLDER_KIND_OF[kind_name]
                assert holder_kind in kind_column.values and holder_kind.isalnum()
                targets.append(_Target(column.stored_name,
                                       (kind_column.stored_name, holder_kind)))
        if targets:  # the kind covers the column of its name, if any, and the others
            keys[kind_name] = _SubjectKey(kind_name, kind, tuple(targets))
    names = dataset.column_names
    dates = [c.name for c in dataset.columns if c.kind is Kind.DATE]
    principal = next((d for d in PRINCIPAL_DATES if d in dates), None)
    assert principal is not None or not dates, (dataset.name, "no principal date")
    period_column = "period" if "period" in names else None
    assert period_column is None or dataset.column_map["period"].kind is Kind.PERIOD
    return _DatasetPlan(dataset=dataset, keys=keys,
                        period_column=period_column,
                        date_column=None if period_column else principal)


def _view_keys(view: View[Any]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Subject key -> (value type, view columns it matches)."""
    keys: dict[str, tuple[str, tuple[str, ...]]] = {}
    for column in view.columns:
        if column.type in SUBJECT_KINDS:
            keys[column.name] = (column.type, (column.name,))
    for kind in SUBJECT_KINDS:
        matched = tuple(c.name for c in view.columns if c.type == kind)
        if matched:
            keys[kind] = (kind, matched)
    return keys


# -- checking a request ---------------------------------------------------------------

def _value_problem(kind: Kind | str, value: str) -> str | None:
    if kind in (Kind.USCC, "uscc"):
        return checks.uscc_problem(value)
    if kind in (Kind.PERSON_ID, "person_id"):
        return checks.person_id_problem(value)
    if kind is Kind.HOLDER_ID:
        if checks.is_valid_uscc(value) or checks.is_valid_person_id(value):
            return None
        return (f"{value!r} is neither a uscc ({checks.uscc_problem(value)}) nor a "
                f"person_id ({checks.person_id_problem(value)})")
    assert isinstance(kind, Kind) and kind in (Kind.IDENTIFIER, Kind.PERIOD), kind
    if len(value) > _SUBJECT_VALUE_CHARS_MAX:
        return f"longer than {_SUBJECT_VALUE_CHARS_MAX} characters"
    parse = checks.check_period if kind is Kind.PERIOD else _IDENTIFIER_PARSE
    try:
        parse(value)
    except ValueError as exc:
        return str(exc)
    return None


def _check_subjects(name: str, subjects: Sequence[tuple[str, str]],
                    key_kinds: dict[str, Kind | str]) -> dict[str, list[str]]:
    """Values by subject key, each once, in first-seen order; BAD_SUBJECT otherwise."""
    values: dict[str, dict[str, None]] = {}
    for key, value in subjects:
        kind = key_kinds.get(key)
        if kind is None:
            raise LookupRefused(BAD_SUBJECT, f"{name} has no lookup key {key!r} "
                                f"(it has {', '.join(key_kinds)})")
        if not isinstance(value, str):
            raise LookupRefused(BAD_SUBJECT, f"subject {key}: {value!r} is not text")
        problem = _value_problem(kind, value)
        if problem is not None:
            raise LookupRefused(BAD_SUBJECT, f"subject {key}={value!r}: {problem}")
        values.setdefault(key, {})[value] = None
    return {key: list(vs) for key, vs in values.items()}


def _check_period(period: str | None) -> None:
    if period is None:
        return
    try:
        checks.check_period(period)
    except (ValueError, TypeError):
        raise LookupRefused(BAD_PERIOD, f"{period!r} is not a period YYYY-MM") from None


def _check_fields(name: str, fields: Sequence[str], columns: Sequence[str]
                  ) -> tuple[str, ...]:
    if not fields:
        return tuple(columns)
    unknown = [f for f in fields if f not in columns]
    if unknown:
        raise LookupRefused(UNKNOWN_FIELD, f"{name} has no field(s) "
                            f"{', '.join(map(repr, unknown))} (it has {', '.join(columns)})")
    return tuple(dict.fromkeys(fields))


def _row_limit_refusal(name: str, row_limit: int) -> LookupRefused:
    return LookupRefused(ROW_LIMIT, f"more than the row limit of {row_limit} rows match "
                         f"in {name}: ask for fewer subjects or a month")


# -- the lookup -------------------------------------------------------------------------

def lookup(store: AgencyStore, request: LookupRequest, row_limit: int
           ) -> list[dict[str, object]]:
    """The rows of the agency's `request.dataset` that match the request, at most
    `row_limit` of them (more is a ROW_LIMIT refusal, never a truncated answer)."""
    return list(lookup_iter(store, request, row_limit))


def lookup_iter(store: AgencyStore, request: LookupRequest, row_limit: int
                ) -> Iterator[dict[str, object]]:
    """lookup, one row at a time: a period-wide view is streamed from the store, so
    the answer to it is never held whole. A refusal (LookupRefused) may come before the
    first row or, for ROW_LIMIT, after `row_limit` rows: a caller discards what it
    received then."""
    assert row_limit >= 0, row_limit
    agency = store.agency
    datasets = {d.name: d for d in datasets_of(agency)}
    views = views_of(agency)
    if request.dataset in datasets:
        dataset = datasets[request.dataset]
        if len(request.subjects) > SUBJECTS_MAX:
            raise _too_many(request)
        return iter(_lookup_dataset(store, _dataset_plan(dataset), request, row_limit))
    if request.dataset in views:
        if len(request.subjects) > SUBJECTS_MAX:
            raise _too_many(request)
        return _lookup_view(store, views[request.dataset], request, row_limit)
    offered = ", ".join(list(datasets) + list(views))
    raise LookupRefused(UNKNOWN_DATASET, f"{agency} has no dataset or view "
                        f"{request.dataset!r} (it offers {offered})")


def _too_many(request: LookupRequest) -> LookupRefused:
    return LookupRefused(TOO_MANY_SUBJECTS, f"{len(request.subjects)} subjects, more than "
                         f"the {SUBJECTS_MAX} one request may name")


def _q(name: str) -> str:
    assert name.replace("_", "").isalnum(), name
    return f'"{name}"'


def _lookup_dataset(store: AgencyStore, plan: _DatasetPlan, request: LookupRequest,
                    row_limit: int) -> list[dict[str, object]]:
    dataset = plan.dataset
    fields = _check_fields(dataset.name, request.fields, dataset.column_names)
    _check_period(request.period)
    if request.period is not None and plan.period_column is None and plan.date_column is None:
        raise LookupRefused(BAD_PERIOD, f"{dataset.name} has no date or period: "
                            "ask without a period")
    values = _check_subjects(dataset.name, request.subjects,
                             {k: sk.kind for k, sk in plan.keys.items()})
    if not values:
        raise LookupRefused(SUBJECTS_REQUIRED, f"{dataset.name} is looked up by subject "
                            f"(one of {', '.join(plan.keys)}), not period-wide")
    wanted = set(fields) | set(dataset.key)
    selected = [c for c in dataset.columns if c.name in wanted]
    at = {c.name: i for i, c in enumerate(selected)}
    key_at = [at[k] for k in dataset.key]
    # Rows by key: a row may match several statements (an invoice's issuer in one chunk,
    # its buyer in another). At most row_limit rows are kept between statements and a
    # statement returns at most row_limit + 1, so memory stays within twice the limit.
    found: dict[tuple[object, ...], tuple[object, ...]] = {}
    for sql, params in _statements(plan, selected, values, request.period, row_limit):
        rows = store.fetch(sql, params)
        assert len(rows) <= row_limit + 1, (sql, len(rows))
        for row in rows:
            found.setdefault(tuple(row[i] for i in key_at), row)
        if len(found) > row_limit:
            raise _row_limit_refusal(dataset.name, row_limit)
    converters = [(name, at[name], _converter(dataset.column_map[name])) for name in fields]
    return [{name: convert(row[i]) for name, i, convert in converters}
            for _key, row in sorted(found.items(), key=_by_key)]


def _by_key(item: tuple[tuple[object, ...], tuple[object, ...]]) -> tuple[str, ...]:
    key = item[0]
    assert all(isinstance(part, str) for part in key), key
    return tuple(str(part) for part in key)


def _statements(plan: _DatasetPlan, selected: Sequence[Column],
                values: dict[str, list[str]], period: str | None, row_limit: int
                ) -> Iterator[tuple[str, dict[str, object]]]:
    """Per subject key, the statements looking its values up, at most
    PARAMETERS_PER_STATEMENT_MAX values (across its target columns) in each."""
    head = (f"SELECT {', '.join(_q(c.stored_name) for c in selected)} "
            f"FROM {_q(plan.dataset.name)} WHERE ")
    tail = f" LIMIT {int(row_limit) + 1}"
    period_sql = ""
    period_params: dict[str, object] = {}
    if period is not None and plan.period_column is not None:
        period_sql = f" AND {_q(plan.period_column)} = :period"
        period_params = {"period": period}
    elif period is not None and plan.date_column is not None:
        start, end = checks.period_bounds(period)
        date = _q(plan.date_column)
        period_sql = f" AND {date} >= :start AND {date} < :end"
        period_params = {"start": start, "end": end}
    for key, key_values in values.items():
        targets = plan.keys[key].targets
        per_statement = (PARAMETERS_PER_STATEMENT_MAX - len(period_params)) // len(targets)
        assert per_statement >= 1
        for first in range(0, len(key_values), per_statement):
            chunk = key_values[first:first + per_statement]
            params = dict(period_params)
            alternatives = []
            for t, target in enumerate(targets):
                names = [f"s{t}_{j}" for j in range(len(chunk))]
                params.update(zip(names, chunk, strict=True))
                condition = f"{_q(target.column)} IN ({', '.join(':' + n for n in names)})"
                if target.holder_kind is not None:
                    kind_column, kind = target.holder_kind
                    condition = f"{_q(kind_column)} = '{kind}' AND {condition}"
                alternatives.append(f"({condition})")
            assert len(params) <= PARAMETERS_PER_STATEMENT_MAX
            yield f"{head}({' OR '.join(alternatives)}){period_sql}{tail}", params


def _converter(column: Column) -> Any:
    if column.kind is Kind.AMOUNT:
        return lambda v: checks.fen_to_decimal(to_int(v))
    if column.kind is Kind.FLAG:
        return to_int
    optional = column.optional

    def text(value: object) -> str | None:
        if value is None and optional:
            return None
        assert isinstance(value, str), (column.name, value)
        return value

    return text


def _lookup_view(store: AgencyStore, view: View[Any], request: LookupRequest,
                 row_limit: int) -> Iterator[dict[str, object]]:
    columns = tuple(c.name for c in view.columns)
    fields = _check_fields(view.name, request.fields, columns)
    _check_period(request.period)
    if view.period_bound and request.period is None:
        raise LookupRefused(BAD_PERIOD, f"view {view.name} is per month: name a period")
    if not view.period_bound and request.period is not None:
        raise LookupRefused(BAD_PERIOD, f"view {view.name} is not per month: "
                            "ask without a period")
    keys = _view_keys(view)
    values = _check_subjects(view.name, request.subjects,
                             {k: kind for k, (kind, _cols) in keys.items()})
    # Values by view column (a kind matches every column of it); none: period-wide.
    wanted: dict[str, dict[str, None]] = {}
    for key, vs in values.items():
        for column in keys[key][1]:
            wanted.setdefault(column, {}).update(dict.fromkeys(vs))
    types = {c.name: c.type for c in view.columns}
    return _view_rows(view, view.iter_rows(store, request.period, wanted or None), wanted,
                      fields, types, row_limit)


def _view_rows(view: View[Any], rows: Iterator[Any], wanted: dict[str, dict[str, None]],
               fields: Sequence[str], types: dict[str, str], row_limit: int
               ) -> Iterator[dict[str, object]]:
    for count, row in enumerate(rows):
        assert not wanted or any(getattr(row, c) in vs for c, vs in wanted.items()), row
        if count == row_limit:
            raise _row_limit_refusal(view.name, row_limit)
        yield {name: _view_value(types[name], getattr(row, name)) for name in fields}


def _view_value(type_name: str, value: object) -> object:
    if type_name == "decimal":
        assert isinstance(value, Decimal) and value.as_tuple().exponent == -2, value
    elif type_name == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), value
    else:
        assert isinstance(value, str), value
    return value
