"""The bulk reader of dataset files: whole columns checked at once.

The row reader (agents.common.csvread) decides what a file means and words every
problem, naming file, line and column. This reader answers, fast, only "has the file no
problem at all, and what are its rows?". It parses with the same csv module, fed the
same lines, so its records are the row reader's; it checks a batch of rows column by
column with one regular expression, set or conversion over the whole column (instead of
a function call per value), accepting exactly the values the columns' parsers accept
and converting them the same way. At anything else it raises `NotBulk`, and the loader
reads the load row by row, which reports the problem as it always has.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import hashlib
import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import add
from pathlib import Path
from typing import Protocol, TypeVar

from agents.common import checks
from agents.common.csvread import FILE_ROWS_MAX
from agents.common.schema import IDENTIFIER_CHARS_MAX, TEXT_CHARS_MAX, Column, Dataset, Kind

READ_BYTES = 1 << 20
BATCH_ROWS = 20_000
# Distinct valid identifiers remembered per column kind (a company or person appears
# on many rows); beyond it the memory is cleared and refilled.
CHECKED_CODES_MAX = 300_000
_BOM = "\ufeff"
# Python's csv module refuses a field longer than this (characters).
CSV_FIELD_CHARS_MAX = csv.field_size_limit()

_IDENTIFIER = f"[0-9A-Za-z][0-9A-Za-z._/:-]{{0,{IDENTIFIER_CHARS_MAX - 1}}}"
_AMOUNT = r"(?:0|[1-9][0-9]{0,20})(?:\.[0-9]{1,2})?"
_IDENTIFIERS = re.compile(f"{_IDENTIFIER}(?:\n{_IDENTIFIER})*")
_AMOUNTS = re.compile(f"{_AMOUNT}(?:\n{_AMOUNT})*")
_NO_DECIMALS = re.compile(r"(?m)^[0-9]+$")
_ONE_DECIMAL = re.compile(r"(?m)\.[0-9]$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_USCC_SHAPE = re.compile(r"[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}")
_PERSON_ID_SHAPE = re.compile(r"[0-9]{17}[0-9X]")
# A uscc's weights are 3**(i-1) mod 31 and 34 = 3 (mod 31): the weighted sum mod 31 is
# the body, written as base-34 digits least significant first, mod 31. Likewise a
# person_id's weights are 2**(17-i) mod 11 and 13 = 2 (mod 11).
_BASE34_DIGITS = str.maketrans(checks.USCC_ALPHABET, "0123456789abcdefghijklmnopqrstu")


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused: a batch makes many small containers and no
    cycles, and the collector's passes over them cost a third of the reading."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class FlatRows:
    """Rows as one flat list of stored values, row after row, `width` values each: how
    agents.common.duckread hands its rows to the writer, which inserts many rows per
    statement (a list per row and a statement step per row cost the writer's thread
    more than the inserting itself)."""

    values: list[object]
    width: int

    def __len__(self) -> int:
        return len(self.values) // self.width


# What a bulk reader yields: rows, or the same as one flat list.
Batch = list[tuple[object, ...]] | FlatRows


class NotBulk(Exception):
    """The load must be read row by row: it may have a problem to name, or a shape the
    bulk reader does not take."""


def uscc_valid(code: str) -> bool:
    """checks.is_valid_uscc, faster."""
    if _USCC_SHAPE.fullmatch(code) is None:
        return False
    total = int(code[16::-1].translate(_BASE34_DIGITS), 34) % 31
    return code[17] == checks.USCC_ALPHABET[(31 - total) % 31]


def person_id_valid(code: str) -> bool:
    """checks.is_valid_person_id, faster."""
    if _PERSON_ID_SHAPE.fullmatch(code) is None:
        return False
    value = (12 - 2 * int(code[:17], 13) % 11) % 11
    return code[17] == ("X" if value == 10 else str(value))


class _Checked:
    """Distinct values already found valid by `valid`, bounded."""

    def __init__(self, valid: Callable[[str], bool]) -> None:
        self.valid = valid
        self.known: set[str] = set()

    def all_valid(self, values: Sequence[str]) -> bool:
        new = set(values)
        new -= self.known
        if not new:
            return True
        if not all(map(self.valid, new)):
            return False
        if len(self.known) + len(new) > CHECKED_CODES_MAX:
            self.known.clear()
        self.known |= new
        return True


def _date_valid(text: str) -> bool:
    try:
        checks.check_date(text)
    except ValueError:
        return False
    return True


def _period_valid(text: str) -> bool:
    try:
        checks.check_period(text)
    except ValueError:
        return False
    return True


CodeMemory = dict[Kind, _Checked]


def code_memory() -> CodeMemory:
    """The distinct codes, dates and periods found valid, which the files of one load
    share (a company's uscc appears in most of them)."""
    return {Kind.USCC: _Checked(uscc_valid), Kind.PERSON_ID: _Checked(person_id_valid),
            Kind.DATE: _Checked(_date_valid), Kind.PERIOD: _Checked(_period_valid)}


def _joined(values: Sequence[str]) -> str | None:
    """The values one a line, or None if a value holds a line break itself."""
    joined = "\n".join(values)
    return joined if joined.count("\n") == len(values) - 1 else None


class _ColumnCheck:
    """Checks and converts whole columns of one dataset."""

    def __init__(self, dataset: Dataset, codes: CodeMemory) -> None:
        self.dataset = dataset
        self._codes = codes

    def column(self, column: Column, values: Sequence[str]) -> Sequence[object]:
        """The stored values of a column's texts; NotBulk if one is not valid."""
        if column.optional and "" in values:
            present = [v for v in values if v]
            converted = iter(self._strict(column, present) if present else ())
            return [next(converted) if v else None for v in values]
        return self._strict(column, values)

    def _strict(self, column: Column, values: Sequence[str]) -> Sequence[object]:
        kind = column.kind
        if kind is Kind.IDENTIFIER or kind is Kind.HOLDER_ID:
            joined = _joined(values)
            if joined is None or _IDENTIFIERS.fullmatch(joined) is None:
                raise NotBulk(f"{column.name}: a value is no identifier")
            return values
        if kind is Kind.TEXT:
            if (min(map(len, values)) < 1 or max(map(len, values)) > TEXT_CHARS_MAX
                    or list(map(str.strip, values)) != list(values)
                    or _CONTROL.search("\n".join(values)) is not None):
                raise NotBulk(f"{column.name}: a value is no text")
            return values
        if kind in self._codes:
            if not self._codes[kind].all_valid(values):
                raise NotBulk(f"{column.name}: a value is not valid")
            return values
        if kind is Kind.AMOUNT:
            joined = _joined(values)
            if joined is None or _AMOUNTS.fullmatch(joined) is None:
                raise NotBulk(f"{column.name}: a value is no amount")
            joined = _ONE_DECIMAL.sub(r"\g<0>0", _NO_DECIMALS.sub(r"\g<0>00", joined))
            fen = list(map(int, joined.replace(".", "").split("\n")))
            if min(fen) < 1 or max(fen) > checks.AMOUNT_FEN_MAX:
                raise NotBulk(f"{column.name}: an amount out of bounds")
            return fen
        if kind is Kind.ENUM:
            if not set(values) <= set(column.values):
                raise NotBulk(f"{column.name}: a value is not allowed")
            return values
        if kind is Kind.FLAG:
            if not set(values) <= {"0", "1"}:
                raise NotBulk(f"{column.name}: a value is no flag")
            return list(map(int, values))
        raise AssertionError(kind)

    def holders(self, column: Column, ids: Sequence[object], kinds: Sequence[object]) -> None:
        """A HOLDER_ID column: each id valid as its kind column says."""
        if not holders_valid(self._codes, ids, kinds):
            raise NotBulk(f"{column.name}: an id not valid for its holder kind")


def holders_valid(codes: CodeMemory, ids: Sequence[object], kinds: Sequence[object]) -> bool:
    """Each holder id valid as its holder kind says: a company's a uscc, anyone else's
    a person_id (checked once each through `codes`)."""
    company = [i for i, k in zip(ids, kinds, strict=True) if k == "company"]
    person = [i for i, k in zip(ids, kinds, strict=True) if k != "company"]
    return ((not company or codes[Kind.USCC].all_valid(company))  # type: ignore[arg-type]
            and (not person or codes[Kind.PERSON_ID].all_valid(person)))  # type: ignore[arg-type]


class BulkFileReader:
    """Streams the stored rows (values in dataset column order, no line number) of one
    file, `batch_rows` at a time; NotBulk at anything the row reader would reject or
    that this reader does not take. When it finishes, `rows` and `sha256` are set."""

    def __init__(self, path: Path, dataset: Dataset, display_name: str,
                 batch_rows: int = BATCH_ROWS, codes: CodeMemory | None = None) -> None:
        assert batch_rows > 0
        self.codes = code_memory() if codes is None else codes
        self.path = path
        self.dataset = dataset
        self.display_name = display_name
        self.batch_rows = batch_rows
        self.size_bytes = path.stat().st_size
        self.bytes_read = 0
        self.rows = 0
        self.sha256 = ""

    def _chunks(self) -> Iterator[str]:
        """The file's text in pieces of whole lines (each ending with its line break,
        but the last piece may lack it), the BOM removed, as the row reader decodes it
        line by line."""
        digest = hashlib.sha256()
        carry = b""
        first = True
        with open(self.path, "rb") as f:
            while True:
                chunk = f.read(READ_BYTES)
                self.bytes_read += len(chunk)
                if not chunk:
                    break
                digest.update(chunk)
                data = carry + chunk
                end = data.rfind(b"\n") + 1
                if end == 0:
                    carry = data
                    continue
                carry = data[end:]
                try:
                    text = data[:end].decode("utf-8")
                except UnicodeDecodeError:
                    raise NotBulk("not UTF-8") from None
                yield text.removeprefix(_BOM) if first else text
                first = False
        if carry:
            try:
                text = carry.decode("utf-8")
            except UnicodeDecodeError:
                raise NotBulk("not UTF-8") from None
            yield text.removeprefix(_BOM) if first else text
        self.sha256 = digest.hexdigest()

    def _records(self) -> Iterator[list[str]]:
        """The file's records as the row reader's csv.reader gives them (blank lines
        included, as empty lists). A piece with no quote, carriage return, NUL, blank
        line or over-long line is split on commas, which is what csv.reader does to
        it; any other piece goes through csv.reader itself, whose state never spans
        pieces but inside a quoted field (then the rest goes through it too)."""
        pending: list[str] = []  # lines of a record a quoted line break continues
        for text in self._chunks():
            lines = text.split("\n")
            tail = lines.pop()  # "" if the text ends with a line break
            if (not pending and not tail and '"' not in text and "\r" not in text
                    and "\x00" not in text and "" not in lines
                    and max(map(len, lines)) <= CSV_FIELD_CHARS_MAX):
                yield from map(str.split, lines, repeat(","))
                continue
            feed = pending + list(map(add, lines, repeat("\n")))
            if tail:
                feed.append(tail)
            pending = []
            reader = csv.reader(feed, strict=True)
            while True:
                at = reader.line_num
                try:
                    record = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    if str(exc) == "unexpected end of data" and tail == "" and \
                            reader.line_num == len(feed):
                        pending = feed[at:]  # a quoted field goes on in the next piece
                        break
                    raise NotBulk(f"not valid CSV: {exc}") from None
                yield record
        if pending:
            yield from csv.reader(pending, strict=True)

    def batches(self) -> Iterator[list[tuple[object, ...]]]:
        dataset = self.dataset
        records = self._records()
        try:
            header: list[str] = []
            for header in records:
                if header:
                    break
            if not header:
                raise NotBulk("no header")
            names = [h.strip() for h in header]
            positions = []
            for name in dataset.column_names:
                if names.count(name) != 1:
                    raise NotBulk(f"column {name!r} missing or repeated")
                positions.append(names.index(name))
            width = len(names)
            check = _ColumnCheck(dataset, self.codes)
            holder_at = [(i, dataset.position(c.holder_kind_column))
                         for i, c in enumerate(dataset.columns) if c.kind is Kind.HOLDER_ID]
            batch: list[list[str]] = []
            with gc_paused():
                for fields in records:
                    if not fields:
                        continue  # a blank line, as the row reader skips it
                    batch.append(fields)
                    if len(batch) >= self.batch_rows:
                        yield self._convert(batch, width, positions, check, holder_at)
                        batch = []
                if batch:
                    yield self._convert(batch, width, positions, check, holder_at)
        except csv.Error as exc:
            raise NotBulk(f"not valid CSV: {exc}") from None

    def _convert(self, batch: list[list[str]], width: int, positions: list[int],
                 check: _ColumnCheck, holder_at: list[tuple[int, int]]
                 ) -> list[tuple[object, ...]]:
        if set(map(len, batch)) != {width}:
            raise NotBulk("a row of another width than the header")
        self.rows += len(batch)
        if self.rows > FILE_ROWS_MAX:
            raise NotBulk(f"more than {FILE_ROWS_MAX} rows")
        texts = list(zip(*batch, strict=True))
        columns = [check.column(c, texts[at])
                   for c, at in zip(self.dataset.columns, positions, strict=True)]
        for at, kind_at in holder_at:
            check.holders(self.dataset.columns[at], columns[at], columns[kind_at])
        return list(zip(*columns, strict=True))


# Batches read ahead of the writer, at most.
READ_AHEAD_BATCHES_MAX = 4
_END = object()


class BatchReader(Protocol):
    """A reader of one file's stored rows in batches (BulkFileReader and
    agents.common.duckread.DuckFileReader); `rows`, `bytes_read` and `sha256` say how
    far it is, the last once it is done."""

    dataset: Dataset
    display_name: str
    size_bytes: int
    bytes_read: int
    rows: int
    sha256: str

    def batches(self) -> Iterator[Batch]: ...


R = TypeVar("R", bound=BatchReader)


def read_ahead(readers: Sequence[R]) -> Iterator[tuple[R, Batch | None]]:
    """Every batch of every reader in order as (reader, batch), and (reader, None) once
    a reader is done, read on a thread while the caller writes (SQLite lets go of the
    interpreter while it inserts and builds indexes). A reader's exception is raised
    here; leaving early stops the thread."""
    items: queue.Queue[object] = queue.Queue(maxsize=READ_AHEAD_BATCHES_MAX)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for reader in readers:
                for batch in reader.batches():
                    if not put((reader, batch)):
                        return
                if not put((reader, None)):
                    return
            put(_END)
        except BaseException as exc:  # handed to the caller, raised there
            put(exc)

    thread = threading.Thread(target=work, name="bulk-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
