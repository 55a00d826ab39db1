"""Dataset schemas: columns with their types, keys, and references between datasets.

A schema is plain data. Each column type knows how to turn the CSV text into the value
the store keeps (amounts become integer fen, under a column named ``*_fen``) and says
what is wrong with a bad value; the loader adds file, line and column.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from agents.common import checks

IDENTIFIER_CHARS_MAX = 64
TEXT_CHARS_MAX = 200
_IDENTIFIER_SHAPE = re.compile(rf"[0-9A-Za-z][0-9A-Za-z._/:-]{{0,{IDENTIFIER_CHARS_MAX - 1}}}")
# Free text may span lines (RFC 4180 quoting) but holds no other control character.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class Kind(Enum):
    """The value types of the data contract."""

    IDENTIFIER = "identifier"  # a record number: letters, digits and . _ / : -
    TEXT = "text"  # free text (a name, a bank, a port)
    USCC = "uscc"
    PERSON_ID = "person_id"
    HOLDER_ID = "holder_id"  # a uscc or a person_id, as another column says
    AMOUNT = "amount"  # *_cny: positive, at most two decimals; stored as fen
    DATE = "date"  # *_on: YYYY-MM-DD
    PERIOD = "period"  # YYYY-MM
    ENUM = "enum"
    FLAG = "flag"  # 0 or 1, stored as an integer


_SQL_TYPE = {Kind.AMOUNT: "INTEGER", Kind.FLAG: "INTEGER"}


def _identifier(text: str, _match: Callable[[str], object] = _IDENTIFIER_SHAPE.fullmatch
                ) -> str:
    if _match(text) is None:
        if len(text) > IDENTIFIER_CHARS_MAX:
            raise ValueError(f"longer than {IDENTIFIER_CHARS_MAX} characters")
        raise ValueError(f"{text!r} is not an identifier (letters, digits and . _ / : -, "
                         "starting with a letter or digit)")
    return text


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("empty")
    if len(text) > TEXT_CHARS_MAX:
        raise ValueError(f"longer than {TEXT_CHARS_MAX} characters")
    if text != text.strip():
        raise ValueError(f"{text!r} has leading or trailing white space")
    if _CONTROL.search(text):
        raise ValueError(f"{text!r} contains a control character")
    return text


def _uscc(text: str) -> str:
    problem = checks.uscc_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def _person_id(text: str) -> str:
    problem = checks.person_id_problem(text)
    if problem is not None:
        raise ValueError(problem)
    return text


def _flag(text: str) -> int:
    if text == "0":
        return 0
    if text == "1":
        return 1
    raise ValueError(f"{text!r} is not 0 or 1")


def _memoized(parse: Callable[[str], object], limit: int = 200_000
              ) -> Callable[[str], object]:
    """Dates, periods and ids repeat a great deal in an extract: check each text once
    (the first `limit` distinct valid ones are remembered)."""
    seen: dict[str, object] = {}

    def parse_cached(text: str) -> object:
        value = seen.get(text)
        if value is None:
            value = parse(text)
            if len(seen) < limit:
                seen[text] = value
        return value

    return parse_cached


@dataclass(frozen=True)
class Column:
    """One column of a dataset as the contract names it."""

    name: str
    kind: Kind
    description: str
    values: tuple[str, ...] = ()  # the allowed values of an ENUM
    optional: bool = False  # may be empty (stored as NULL)
    # HOLDER_ID: the ENUM column that says which kind of id this is
    # (its value "company" means a uscc, "person" a person_id).
    holder_kind_column: str = ""

    def __post_init__(self) -> None:
        assert (self.kind is Kind.ENUM) == bool(self.values), self.name
        assert (self.kind is Kind.HOLDER_ID) == bool(self.holder_kind_column), self.name
        assert self.kind is not Kind.AMOUNT or self.name.endswith("_cny"), self.name
        assert self.kind is not Kind.DATE or self.name.endswith("_on"), self.name

    @property
    def stored_name(self) -> str:
        """The store's column: amounts say their unit (`amount_cny` -> `amount_fen`)."""
        if self.kind is Kind.AMOUNT:
            return self.name[: -len("_cny")] + "_fen"
        return self.name

    @property
    def sql_type(self) -> str:
        return _SQL_TYPE.get(self.kind, "TEXT")

    def parser(self) -> Callable[[str], object]:
        """A function from the CSV text to the stored value, raising ValueError."""
        kind = self.kind
        if kind is Kind.ENUM:
            allowed = frozenset(self.values)
            listing = ", ".join(self.values)

            def parse_enum(text: str) -> str:
                if text not in allowed:
                    raise ValueError(f"{text!r} is not one of {listing}")
                return text

            return parse_enum
        if kind is Kind.DATE:
            return _memoized(checks.check_date)
        if kind is Kind.PERIOD:
            return _memoized(checks.check_period)
        if kind is Kind.USCC:  # a company appears on many invoices and declarations
            return _memoized(_uscc)
        if kind is Kind.PERSON_ID:
            return _memoized(_person_id)
        simple: dict[Kind, Callable[[str], object]] = {
            Kind.IDENTIFIER: _identifier, Kind.TEXT: _text,
            Kind.AMOUNT: checks.parse_amount_fen,
            Kind.FLAG: _flag,
            # checked against its kind column once the whole row is parsed
            Kind.HOLDER_ID: _identifier,
        }
        return simple[kind]


@dataclass(frozen=True)
class Reference:
    """`column` of this dataset must be a key of dataset `target` of the same agency."""

    column: str
    target: str


@dataclass(frozen=True)
class Dataset:
    """One file of an agency's import folder and one table of its store."""

    name: str
    description: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    references: tuple[Reference, ...] = ()
    # extra indexes of the store, each a tuple of stored column names
    indexes: tuple[tuple[str, ...], ...] = ()
    column_map: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [c.name for c in self.columns]
        assert len(set(names)) == len(names), self.name
        object.__setattr__(self, "column_map", {c.name: c for c in self.columns})
        for k in self.key:
            assert k in self.column_map and not self.column_map[k].optional, (self.name, k)
        for ref in self.references:
            assert ref.column in self.column_map, (self.name, ref)
        stored = {c.stored_name for c in self.columns}
        for index in self.indexes:
            assert set(index) <= stored, (self.name, index)
        for c in self.columns:
            if c.kind is Kind.HOLDER_ID:
                kind_col = self.column_map[c.holder_kind_column]
                assert set(kind_col.values) == {"company", "person"}, (self.name, c.name)

    @property
    def file_name(self) -> str:
        return f"{self.name}.csv"

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    @property
    def stored_names(self) -> tuple[str, ...]:
        return tuple(c.stored_name for c in self.columns)

    def position(self, column: str) -> int:
        """Index of `column` in this dataset's column order (and stored rows)."""
        return self.column_names.index(column)

    def stored(self, column: str) -> str:
        return self.column_map[column].stored_name

    def row_checks(self) -> tuple[Callable[[tuple[object, ...]], tuple[str, str] | None], ...]:
        """Checks over a whole parsed row; each returns (column, problem) or None."""
        found = []
        for c in self.columns:
            if c.kind is Kind.HOLDER_ID:
                found.append(_holder_check(c.name, self.position(c.name),
                                           self.position(c.holder_kind_column)))
        return tuple(found)


def _holder_check(column: str, at: int, kind_at: int
                  ) -> Callable[[tuple[object, ...]], tuple[str, str] | None]:
    def check(row: tuple[object, ...]) -> tuple[str, str] | None:
        value = str(row[at])
        if row[kind_at] == "company":
            problem = checks.uscc_problem(value)
            return None if problem is None else (column, f"holder_kind company: {problem}")
        problem = checks.person_id_problem(value)
        return None if problem is None else (column, f"holder_kind person: {problem}")

    return check
