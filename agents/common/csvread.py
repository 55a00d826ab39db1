"""Reading one dataset file: UTF-8 CSV, header row first, RFC 4180 quoting.

Every problem names the file, the physical line (a quoted field may span lines; a
record is named by the line it starts on) and the column (its position in the file's
header and its name). Columns may come in any order; columns the dataset does not
know are ignored. The file is read once, as a stream, in batches of parsed rows.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from operator import call, itemgetter
from pathlib import Path
from typing import BinaryIO

from agents.common.schema import Dataset
from exchange.errors import MalformedInput

BATCH_ROWS = 10_000
FILE_ROWS_MAX = 100_000_000
# A field longer than the csv module's limit (131,072 characters) is "not valid CSV".
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class FileProblem:
    """What is wrong with one file, and where."""

    file: str
    message: str
    line: int | None = None
    column: str | None = None  # the column's name, as the contract spells it
    column_no: int | None = None  # its 1-based position in the file's header

    def __str__(self) -> str:
        where = [self.file]
        if self.line is not None:
            where.append(f"line {self.line}")
        if self.column is not None:
            where.append(f"column {self.column_no} ({self.column})" if self.column_no
                         else f"column {self.column}")
        return f"{', '.join(where)}: {self.message}"


class DataFileError(MalformedInput):
    """One or more dataset files were rejected; nothing of the load was written."""

    def __init__(self, problems: list[FileProblem]) -> None:
        assert problems
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in problems) + " (nothing was loaded)")


class ProblemFound(Exception):
    """Internal: stops reading a file at its first problem."""

    def __init__(self, problem: FileProblem) -> None:
        super().__init__(str(problem))
        self.problem = problem


class DatasetFileReader:
    """Streams the parsed rows ``(line, *values in dataset column order)`` of one file.

    Iterating `batches()` raises ProblemFound at the first problem. When it finishes,
    `rows` and `sha256` (of the file's bytes) are set.
    """

    def __init__(self, path: Path, dataset: Dataset, display_name: str,
                 batch_rows: int = BATCH_ROWS) -> None:
        assert batch_rows > 0
        self.path = path
        self.dataset = dataset
        self.display_name = display_name
        self.batch_rows = batch_rows
        self.rows = 0
        self.sha256 = ""
        self._lines = 0
        self._hash = hashlib.sha256()
        self._header: list[str] = []

    def problem(self, message: str, line: int | None = None,
                column: str | None = None) -> ProblemFound:
        column_no = None
        if column is not None and column in self._header:
            column_no = self._header.index(column) + 1
        return ProblemFound(FileProblem(self.display_name, message, line, column, column_no))

    def _decoded_lines(self, f: BinaryIO) -> Iterator[str]:
        for raw in f:
            self._lines += 1
            self._hash.update(raw)
            if self._lines == 1 and raw.startswith(_BOM):
                raw = raw[len(_BOM):]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise self.problem(f"not UTF-8: byte {raw[exc.start]:#04x} at byte "
                                   f"{exc.start + 1} of the line", self._lines) from None

    def batches(self) -> Iterator[list[tuple[object, ...]]]:
        with open(self.path, "rb") as f:
            yield from self._read(f)
        self.sha256 = self._hash.hexdigest()

    def _read(self, f: BinaryIO) -> Iterator[list[tuple[object, ...]]]:
        dataset = self.dataset
        reader = csv.reader(self._decoded_lines(f), strict=True)
        records = iter(reader)
        header_line = 0
        while True:
            header_line = self._lines + 1
            try:
                header = next(records, None)
            except csv.Error as exc:
                raise self.problem(f"not valid CSV: {exc}", header_line) from None
            if header is None:
                raise self.problem("empty file: no header row", 1)
            if header:
                break
        self._header = [h.strip() for h in header]
        positions = []
        missing = []
        for name in dataset.column_names:
            count = self._header.count(name)
            if count == 0:
                missing.append(name)
            elif count > 1:
                first = self._header.index(name)
                second = self._header.index(name, first + 1)
                raise self.problem(f"column {name!r} appears twice in the header (columns "
                                   f"{first + 1} and {second + 1})", header_line)
            else:
                positions.append(self._header.index(name))
        if missing:
            raise self.problem(
                "missing required column" + ("s " if len(missing) > 1 else " ")
                + ", ".join(repr(m) for m in missing), header_line, missing[0])
        width = len(self._header)
        pick = itemgetter(*positions)
        columns = dataset.columns
        fast = [_or_none(c.parser()) if c.optional else c.parser() for c in columns]
        row_checks = dataset.row_checks()
        single = len(columns) == 1

        batch: list[tuple[object, ...]] = []
        while True:
            line = self._lines + 1
            try:
                fields = next(records, None)
            except csv.Error as exc:
                if batch:
                    yield batch
                raise self.problem(f"not valid CSV: {exc}", line) from None
            if fields is None:
                break
            if not fields:
                continue  # a blank line
            if len(fields) != width:
                if batch:
                    yield batch
                raise self.problem(f"{len(fields)} fields, but the header has {width}", line)
            texts = (pick(fields),) if single else pick(fields)
            try:
                # the fast path: every parser raises ValueError on a bad (or empty) value
                values = tuple(map(call, fast, texts))
            except ValueError:
                if batch:
                    yield batch
                raise self._value_problem(texts, line) from None
            for check in row_checks:
                found = check(values)
                if found is not None:
                    if batch:
                        yield batch
                    raise self.problem(found[1], line, found[0])
            batch.append((line, *values))
            self.rows += 1
            if len(batch) >= self.batch_rows:
                if self.rows > FILE_ROWS_MAX:
                    raise self.problem(f"more than {FILE_ROWS_MAX} rows", line)
                yield batch
                batch = []
        if batch:
            yield batch

    def _value_problem(self, texts: tuple[str, ...], line: int) -> ProblemFound:
        """The slow path: which column of a rejected row is wrong, and why."""
        for column, text in zip(self.dataset.columns, texts, strict=True):
            if not text:
                if column.optional:
                    continue
                return self.problem("empty value", line, column.name)
            try:
                column.parser()(text)
            except ValueError as exc:
                return self.problem(str(exc), line, column.name)
        raise AssertionError(f"{self.display_name} line {line}: no bad value found")


def _or_none(parse: Callable[[str], object]) -> Callable[[str], object]:
    def parse_optional(text: str) -> object:
        return parse(text) if text else None

    return parse_optional
