"""The fastest reader of dataset files: DuckDB parses and checks whole files in C++.

Like agents.common.bulk's reader it answers only "has the file no problem at all, and
what are its rows?" (the row reader words problems). It takes files of the shape the
generator and most extracts have, where DuckDB's CSV reader splits records exactly as
the row reader's csv.reader does: no carriage return, NUL, blank line or BOM, a header
without quotes, and no white space between a quote and the comma or line end next to it
(DuckDB drops spaces there, csv.reader keeps them or refuses the line). One scan of the
bytes finds that (`scan_file`); other files are read by agents.common.bulk. DuckDB's
read_csv then splits the records (RFC 4180 quoting; every row as wide as the header,
else an error) and one query checks and converts every value with the rules of the
columns' parsers written as vectorised SQL (identifiers, texts, amounts to integer fen,
enums, flags): a value the row reader would refuse stops the query (DuckDB's `error()`),
and the reader raises `NotBulk`; so does a quoted line break (a record over several
lines). Values that repeat from row to row (uscc and person_id with their check
digits, holder ids by their kind, dates, periods; not a dataset's whole key) are
checked once per distinct value instead, by a second query on a thread of its own
beside the streaming rows (`prepared`: it also scans and hashes the next files ahead of
the writer); its verdict is taken before the reader reports the file done, so a refused
value still loads nothing. A value the row reader accepts may be refused here too (an
amount of over 12 integer digits, which is out of bounds anyway); the loader then reads
the load row by row, which is slower but decides.

The query streams: DuckDB writes the rows into a pipe in file order, fields separated
by a control character no valid value holds, and the writer takes them as one flat list
of values per piece (FlatRows, `batch_rows` rows at most), inserting many rows per
statement; DuckDB holds a few of its vectors in memory (its memory limit is
`DUCKDB_MEMORY_MAX`). An optional value that is absent comes out as "" (the writer
stores NULL for it, as for None).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sys
import threading
from collections.abc import Generator, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, cast

from agents.common import checks
from agents.common.bulk import (
    BATCH_ROWS,
    Batch,
    BulkFileReader,
    CodeMemory,
    FlatRows,
    NotBulk,
    code_memory,
    gc_paused,
    holders_valid,
    read_ahead,
)
from agents.common.csvread import FILE_ROWS_MAX
from agents.common.schema import IDENTIFIER_CHARS_MAX, TEXT_CHARS_MAX, Column, Dataset, Kind

if TYPE_CHECKING:
    import duckdb

SCAN_BYTES = 1 << 22
# What the writer takes from DuckDB at a time (some 10,000 rows).
PIPE_READ_BYTES = 1 << 20
# DuckDB's memory (it streams; its CSV reader and the query hold a few vectors).
DUCKDB_MEMORY_MAX = "512MB"
# Threads DuckDB streams a file's rows with, and checks distinct values with: one
# each (the writer's thread, splitting and inserting, is the load's bound; on two cores
# a second DuckDB thread only spun waiting for the pipe, measured).
STREAM_THREADS = 1
CHECK_THREADS = 1
# An amount this reader converts has at most this many digits before the point (a
# larger one exceeds checks.AMOUNT_FEN_MAX, which the row reader refuses).
AMOUNT_INTEGER_DIGITS_MAX = len(str(checks.AMOUNT_FEN_MAX // checks.FEN_PER_CNY))
# Bytes that a plain file has not: a carriage return, a NUL.
_NOT_PLAIN = (b"\r", b"\x00")
# White space between a quote and a field's end, which DuckDB and csv.reader read apart.
_SPACED_QUOTE = re.compile(rb'(?m)(?:^|,)[ \t]+"|"[ \t]+(?:,|$)')
# Between DuckDB and the writer: a field separator and a quote no valid value holds
# (schema.TEXT refuses control characters; the other kinds allow none at all).
_FIELD_SEPARATOR = "\x1f"
_OUTPUT_QUOTE = "\x1e"
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Scan:
    """What one quick pass over a file's bytes found: its lines, whether it is plain."""

    size_bytes: int
    lines: int  # line breaks, plus one if the last line lacks its break
    plain: bool
    header: tuple[str, ...]  # the first line's fields, stripped (() if not plain)


def scan_file(path: Path) -> Scan:
    """Find whether DuckDB reads the file's records as the row reader does (see the
    module): no carriage return or NUL anywhere, no blank line, no BOM, a header first
    line of UTF-8 without quotes, no white space next to a quote at a field's end
    (DuckDB refuses bad UTF-8 in the rest itself)."""
    size = lines = 0
    plain = True
    first = b""
    carry = b""  # the last piece's unfinished line
    previous = b"\n"  # a file starting with a line break starts with a blank line
    with open(path, "rb") as f:
        while True:
            chunk = f.read(SCAN_BYTES)
            if not chunk:
                break
            size += len(chunk)
            lines += chunk.count(b"\n")
            if plain:
                if b"\n" not in first:
                    first += chunk
                if (any(b in chunk for b in _NOT_PLAIN) or b"\n\n" in chunk
                        or (previous == b"\n" and chunk[:1] == b"\n")):
                    plain = False
                elif b'"' in chunk or b'"' in carry:
                    data = carry + chunk  # whole lines, as the pattern is of one line
                    end = data.rfind(b"\n") + 1
                    carry = data[end:]
                    if _SPACED_QUOTE.search(data, 0, end) is not None:
                        plain = False
                else:
                    carry = chunk[chunk.rfind(b"\n") + 1:]
            previous = chunk[-1:]
    if plain and _SPACED_QUOTE.search(carry) is not None:
        plain = False
    if size and previous != b"\n":
        lines += 1
    header: tuple[str, ...] = ()
    head = first.split(b"\n", 1)[0]
    if first.startswith(_BOM) or not head or b'"' in head:
        plain = False
    else:
        try:
            header = tuple(h.strip() for h in head.decode("utf-8").split(","))
        except UnicodeDecodeError:
            plain = False
    return Scan(size, lines, plain, header if plain else ())


def file_sha256(path: Path) -> str:
    """The digest of the file's bytes (hashlib lets go of the interpreter meanwhile)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


@cache
def _space_class() -> str:
    """A regular expression class of the characters Python's str.strip() removes."""
    return "[" + "".join(f"\\x{{{c:x}}}" for c in range(sys.maxunicode + 1)
                         if chr(c).isspace()) + "]"


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _uscc_check_sql(v: str) -> str:
    """The uscc's check character as SQL (given its shape is right)."""
    alphabet = _sql_text(checks.USCC_ALPHABET)
    terms = " + ".join(f"(instr({alphabet}, substr({v}, {i + 1}, 1)) - 1) * {w}"
                       for i, w in enumerate(checks.USCC_WEIGHTS))
    return f"substr({alphabet}, (31 - ({terms}) % 31) % 31 + 1, 1)"


def _person_id_check_sql(v: str) -> str:
    """The person_id's check character as SQL (given its shape is right)."""
    terms = " + ".join(f"(ascii(substr({v}, {i + 1}, 1)) - 48) * {w}"
                       for i, w in enumerate(checks.PERSON_ID_WEIGHTS))
    return f"substr('0123456789X', (12 - ({terms}) % 11) % 11 + 1, 1)"


_USCC_SHAPE = "[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}"
_PERSON_ID_SHAPE = "[0-9]{17}[0-9X]"
_IDENTIFIER = f"[0-9A-Za-z][0-9A-Za-z._/:-]{{0,{IDENTIFIER_CHARS_MAX - 1}}}"
_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"


def _uscc_valid_sql(v: str) -> str:
    return (f"(regexp_full_match({v}, '{_USCC_SHAPE}') "
            f"AND substr({v}, 18, 1) = {_uscc_check_sql(v)})")


def _person_id_valid_sql(v: str) -> str:
    return (f"(regexp_full_match({v}, '{_PERSON_ID_SHAPE}') "
            f"AND substr({v}, 18, 1) = {_person_id_check_sql(v)})")


def valid_sql(column: Column, v: str, kind_v: str = "") -> str:
    """A boolean SQL expression: the non-NULL text `v` is a valid value of `column`
    (for a holder id, `kind_v` is its kind column's text)."""
    kind = column.kind
    if kind is Kind.IDENTIFIER:
        return f"regexp_full_match({v}, '{_IDENTIFIER}')"
    if kind is Kind.HOLDER_ID:
        return (f"regexp_full_match({v}, '{_IDENTIFIER}') AND CASE {kind_v} "
                f"WHEN 'company' THEN {_uscc_valid_sql(v)} "
                f"ELSE {_person_id_valid_sql(v)} END")
    if kind is Kind.TEXT:
        space = _space_class()
        return (f"(length({v}) BETWEEN 1 AND {TEXT_CHARS_MAX} "
                f"AND NOT regexp_matches({v}, '^{space}|{space}$') "
                f"AND NOT regexp_matches({v}, '{_CONTROL}'))")
    if kind is Kind.USCC:
        return _uscc_valid_sql(v)
    if kind is Kind.PERSON_ID:
        return _person_id_valid_sql(v)
    if kind is Kind.AMOUNT:
        return (f"(regexp_full_match({v}, "
                f"'(0|[1-9][0-9]{{0,{AMOUNT_INTEGER_DIGITS_MAX - 1}}})(\\.[0-9]{{1,2}})?') "
                f"AND {v} NOT IN ('0', '0.0', '0.00'))")
    if kind is Kind.DATE:
        return (f"(regexp_full_match({v}, '[12][0-9]{{3}}-[0-9]{{2}}-[0-9]{{2}}') "
                f"AND try_strptime({v}, '%Y-%m-%d') IS NOT NULL)")
    if kind is Kind.PERIOD:
        return f"regexp_full_match({v}, '[12][0-9]{{3}}-(0[1-9]|1[0-2])')"
    if kind is Kind.ENUM:
        return f"{v} IN ({', '.join(map(_sql_text, column.values))})"
    if kind is Kind.FLAG:
        return f"{v} IN ('0', '1')"
    raise AssertionError(kind)


def stored_sql(column: Column, v: str) -> str:
    """The stored value of a valid text `v` as SQL (amounts in fen, flags as integers)."""
    if column.kind is Kind.AMOUNT:
        # exact: a valid amount has at most 12 digits before the point and 2 after
        return f"CAST(CAST({v} AS DECIMAL(18, 2)) * {checks.FEN_PER_CNY} AS BIGINT)"
    if column.kind is Kind.FLAG:
        return f"CAST({v} AS BIGINT)"
    return v


# Kinds whose values repeat from row to row (a company's uscc, a person's id, a date):
# checked once per distinct value (`distinct_sql`, `check_distinct`) rather than on every row (the
# check digits were half the reading's CPU for invoices, where 2.9 million rows name
# 300,000 companies).
DISTINCT_KINDS = frozenset({Kind.USCC, Kind.PERSON_ID, Kind.HOLDER_ID, Kind.DATE,
                            Kind.PERIOD})


def checked_distinct(dataset: Dataset, column: Column) -> bool:
    """Whether the column's values are checked once per distinct value (`distinct_sql`)
    rather than on every row: its kind repeats from row to row, and it is not the
    dataset's whole key (a key's values are all distinct, and DuckDB checks them on the
    streaming rows faster than one by one)."""
    return column.kind in DISTINCT_KINDS and dataset.key != (column.name,)


def _positions(dataset: Dataset, header: tuple[str, ...]) -> dict[str, str]:
    """Each dataset column's field in the file as SQL (`c<i>`); NotBulk if the header
    lacks a column or repeats it."""
    positions = {}
    for name in dataset.column_names:
        if header.count(name) != 1:
            raise NotBulk(f"column {name!r} missing or repeated")
        positions[name] = f"c{header.index(name)}"
    return positions


def _source_sql(header: tuple[str, ...], path: Path) -> str:
    types = ", ".join(f"'c{i}': 'VARCHAR'" for i in range(len(header)))
    return (f"read_csv({_sql_text(str(path))}, header = true, auto_detect = false, "
            f"delim = ',', quote = '\"', escape = '\"', new_line = '\\n', "
            f"strict_mode = true, null_padding = false, columns = {{{types}}})")


def select_sql(dataset: Dataset, header: tuple[str, ...], path: Path) -> str:
    """The query of a plain file's stored rows in file order, raising an error at the
    first value the row reader would refuse, but for the values `checked_distinct`, which
    it only requires present (`check_distinct` checks them); NotBulk if the header
    lacks a column."""
    positions = _positions(dataset, header)
    values = []
    for column in dataset.columns:
        v = positions[column.name]
        kind_v = positions[column.holder_kind_column] if column.holder_kind_column else ""
        check = "TRUE" if checked_distinct(dataset, column) else valid_sql(column, v, kind_v)
        bad = f"error('{column.name}: a value the row reader refuses')"
        converted = stored_sql(column, v)
        if column.optional:
            values.append(f"CASE WHEN {v} IS NULL THEN NULL WHEN {check} THEN {converted} "
                          f"ELSE {bad} END")
        else:
            values.append(f"CASE WHEN {v} IS NOT NULL AND {check} THEN {converted} "
                          f"ELSE {bad} END")
    return f"SELECT {', '.join(values)} FROM {_source_sql(header, path)}"


def distinct_sql(dataset: Dataset, header: tuple[str, ...], path: Path
                 ) -> tuple[str, list[Column]] | None:
    """The query of the distinct values of the dataset's columns of DISTINCT_KINDS in one
    scan of the file (a holder id with its holder kind), and the columns in the order
    it selects them; None if the dataset has none. Each result row is one distinct
    value of one column (or pair), the other columns NULL."""
    positions = _positions(dataset, header)
    columns = [c for c in dataset.columns if checked_distinct(dataset, c)]
    if not columns:
        return None
    selected: list[str] = []
    sets: list[str] = []
    for column in columns:
        v = positions[column.name]
        if column.holder_kind_column:
            k = positions[column.holder_kind_column]
            selected += [f"{k} AS k{len(selected)}", v]
            sets.append(f"({k}, {v})")
        else:
            selected.append(v)
            sets.append(f"({v})")
    return (f"SELECT {', '.join(selected)} FROM {_source_sql(header, path)} "
            f"GROUP BY GROUPING SETS ({', '.join(sets)})", columns)


# Distinct values fetched from DuckDB at a time.
DISTINCT_FETCH_ROWS = 50_000


def all_distinct_valid(cursor: duckdb.DuckDBPyConnection, columns: list[Column],
                       codes: CodeMemory) -> bool:
    """Whether every value of the distinct-values query run on `cursor` (see
    `distinct_sql`) is valid, each checked once (and once per load: `codes` remembers
    the valid ones), fetched a bounded number of rows at a time."""
    while rows := cursor.fetchmany(DISTINCT_FETCH_ROWS):
        at = 0
        for column in columns:
            if column.holder_kind_column:
                pairs = [(r[at], r[at + 1]) for r in rows if r[at + 1] is not None]
                if not holders_valid(codes, [v for _k, v in pairs], [k for k, _v in pairs]):
                    return False
                at += 2
                continue
            values = [r[at] for r in rows if r[at] is not None]
            if not codes[column.kind].all_valid(values):
                return False
            at += 1
    return True


class _Preparation:
    """One file's scan, digest and distinct-value check (each a future)."""

    def __init__(self, codes: CodeMemory) -> None:
        self.codes = codes
        self.scan: Future[Scan] = Future()
        self.sha256: Future[str] = Future()
        self.refused: Future[str | None] = Future()  # why, if a value is refused

    def run(self, reader: DuckFileReader) -> None:
        """Scan, hash and check the reader's file (the digest and check only if it is
        plain: else the bulk reader reads it); every future gets its result or error."""
        try:
            scan = scan_file(reader.path)
        except BaseException as exc:  # raised where the result is taken
            for future in (self.scan, self.sha256, self.refused):
                future.set_exception(exc)
            return
        self.scan.set_result(scan)
        if not scan.plain:
            self.sha256.set_result("")
            self.refused.set_result(None)
            return
        try:
            self.sha256.set_result(file_sha256(reader.path))
        except BaseException as exc:
            self.sha256.set_exception(exc)
        try:
            self.refused.set_result(check_distinct(reader.dataset, scan, reader.path,
                                                   self.codes))
        except BaseException as exc:
            self.refused.set_exception(exc)


def _connect(threads: int, **config: str | bool | int) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB for the loader: `threads`, DUCKDB_MEMORY_MAX, no progress
    bars (they would be drawn on the loader's stderr)."""
    import duckdb

    con = duckdb.connect(config={"threads": threads, "memory_limit": DUCKDB_MEMORY_MAX,
                                 **config})
    con.execute("SET enable_progress_bar = false")
    return con


def check_distinct(dataset: Dataset, scan: Scan, path: Path, codes: CodeMemory) -> str | None:
    """Why a value of the file's columns `checked_distinct` is refused, or None if every
    one is valid (DuckDB finds the distinct values; see `all_distinct_valid`)."""
    import duckdb

    distinct = distinct_sql(dataset, scan.header, path)
    if distinct is None:
        return None
    con = _connect(CHECK_THREADS)
    try:
        if not all_distinct_valid(con.execute(distinct[0]), distinct[1], codes):
            return "a value the row reader refuses"
    except duckdb.Error as exc:
        return f"DuckDB: {str(exc).splitlines()[0]}"
    finally:
        con.close()
    return None


@contextlib.contextmanager
def prepared(readers: Sequence[DuckFileReader]) -> Iterator[None]:
    """The readers' files scanned, hashed and their distinct values checked in order on a
    thread of their own, ahead of and beside the writer (DuckDB and hashlib let go of
    the interpreter), which takes each result when it needs it. Leaving stops the
    thread after the file it is at."""
    stop = threading.Event()
    codes = code_memory()  # the thread's own: the writer's bulk readers use theirs
    work = []
    for reader in readers:
        reader._prepared = _Preparation(codes)
        work.append((reader, reader._prepared))

    def run() -> None:
        for reader, preparation in work:
            if stop.is_set():
                for future in (preparation.scan, preparation.sha256, preparation.refused):
                    future.cancel()
                continue
            preparation.run(reader)

    thread = threading.Thread(target=run, name="load-prepare", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class DuckFileReader:
    """Streams the stored rows (values in dataset column order) of one file, `batch_rows`
    at a time, as agents.common.bulk.BulkFileReader does (and through it, if the file
    is not plain); NotBulk at anything the row reader would refuse. When it finishes,
    `rows` and `sha256` are set."""

    def __init__(self, path: Path, dataset: Dataset, display_name: str,
                 batch_rows: int = BATCH_ROWS, codes: CodeMemory | None = None) -> None:
        assert batch_rows > 0
        self.path = path
        self.dataset = dataset
        self.display_name = display_name
        self.batch_rows = batch_rows
        self.size_bytes = path.stat().st_size
        self.bytes_read = 0
        self.rows = 0
        self.sha256 = ""
        self.method = "duckdb"  # or "bulk" once the file is found not plain
        self._codes = codes
        self._prepared: _Preparation | None = None

    def batches(self) -> Iterator[Batch]:
        """The file's rows. Run this on the thread that writes them: the parsing runs
        in DuckDB's threads and the rest is the writer's own work (a second Python
        thread splitting rows would hold the interpreter the writer needs between
        every two rows it inserts). The file's scan, digest and distinct-value check
        come from `prepared` if the loader used it (ahead, on a thread of their own), else
        are made here."""
        if self._prepared is None:
            self._prepared = _Preparation(code_memory())
            self._prepared.run(self)
        scan = self._prepared.scan.result()
        if not scan.plain:
            self.method = "bulk"
            reader = BulkFileReader(self.path, self.dataset, self.display_name,
                                    self.batch_rows, self._codes)
            for _reader, batch in read_ahead([reader]):
                self.rows, self.bytes_read = reader.rows, reader.bytes_read
                if batch is not None:
                    yield batch
            self.rows, self.bytes_read = reader.rows, reader.bytes_read
            self.sha256 = reader.sha256
            return
        with gc_paused():  # many small lists and strings per batch, and no cycles
            yield from self._plain_batches(scan)
        # the distinct values' check ran beside the rows: its verdict before the end
        refused = self._prepared.refused.result()
        if refused is not None:
            raise NotBulk(refused)
        self.sha256 = self._prepared.sha256.result()

    def _plain_batches(self, scan: Scan) -> Iterator[FlatRows]:
        """DuckDB writes the checked, converted rows as CSV into a pipe on its own
        thread (letting go of the interpreter throughout); here they are split into
        rows. A value the row reader refuses stops DuckDB, and this raises NotBulk."""
        import duckdb  # a fraction of a second to import: only when a load needs it

        data_lines = max(scan.lines - 1, 0)
        if data_lines > FILE_ROWS_MAX:
            raise NotBulk(f"more than {FILE_ROWS_MAX} rows")
        sql = select_sql(self.dataset, scan.header, self.path)
        con = _connect(STREAM_THREADS, preserve_insertion_order=True)
        read_end, write_end = os.pipe()
        failed: list[BaseException] = []

        def produce() -> None:
            try:
                con.execute(f"COPY ({sql}) TO '/dev/fd/{write_end}' (FORMAT CSV, "
                            f"HEADER false, DELIMITER '{_FIELD_SEPARATOR}', "
                            f"QUOTE '{_OUTPUT_QUOTE}', USE_TMP_FILE false)")
            except BaseException as exc:  # handed to the reader, raised there
                failed.append(exc)
            finally:
                os.close(write_end)  # DuckDB has closed its own: the reader sees the end

        producer = threading.Thread(target=produce, name="load-duckdb", daemon=True)
        width = len(self.dataset.columns)

        def pieces() -> Generator[list[object], None, None]:
            """The pipe's pieces as flat lists of values (a split per row would make a
            list per row)."""
            with pipe:
                carry = b""
                while chunk := pipe.read(PIPE_READ_BYTES):
                    data = carry + chunk
                    end = data.rfind(b"\n") + 1
                    carry = data[end:]
                    if _OUTPUT_QUOTE.encode() in data:  # a value holds a line break
                        raise NotBulk("a record over several lines")
                    if not end:
                        continue
                    lines = data.count(b"\n", 0, end)
                    values = data[:end - 1].decode("utf-8").replace(
                        "\n", _FIELD_SEPARATOR).split(_FIELD_SEPARATOR)
                    if len(values) != lines * width:
                        raise NotBulk("a row of another width")
                    yield cast(list[object], values)
                if carry:
                    raise NotBulk("DuckDB's output ends inside a row")

        pipe = open(read_end, "rb", closefd=True)  # noqa: SIM115 (closed in finally)
        split = pieces()
        try:
            producer.start()
            step = self.batch_rows * width
            for values in split:
                for at in range(0, len(values), step):
                    part = values[at:at + step] if len(values) > step else values
                    self.rows += len(part) // width
                    self.bytes_read = (self.size_bytes * self.rows // data_lines
                                       if data_lines else self.size_bytes)
                    yield FlatRows(part, width)
        finally:
            split.close()
            pipe.close()  # if the split never began: DuckDB's writes end with EPIPE
            producer.join()
            con.close()
        if failed:
            exc = failed[0]
            if isinstance(exc, duckdb.Error):
                raise NotBulk(f"DuckDB: {str(exc).splitlines()[0]}") from None
            raise exc
        if self.rows != data_lines:  # every line a row: a blank line was ruled out
            raise NotBulk(f"{self.rows} rows of {data_lines} lines")
        self.bytes_read = self.size_bytes
