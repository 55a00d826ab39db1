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
columns' parsers written as vectorised SQL (identifiers, texts, check digits of uscc and
person_id, dates, periods, amounts to integer fen, enums, flags, holder ids by their
kind): a value the row reader would refuse stops the query (DuckDB's `error()`), and
the reader raises `NotBulk`; so does a quoted line break (a record over several lines).
A value the row reader accepts may be refused here too (an amount of over 12 integer
digits, which is out of bounds anyway); the loader then reads the load row by row,
which is slower but decides.

The query streams: DuckDB writes the rows into a pipe in file order, fields separated
by a control character no valid value holds, and the writer takes them `batch_rows` at
a time; DuckDB holds a few of its vectors in memory (its memory limit is
`DUCKDB_MEMORY_MAX`). An optional value that is absent comes out as "" (the writer
stores NULL for it, as for None).
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from itertools import repeat
from pathlib import Path
from typing import cast

from agents.common import checks
from agents.common.bulk import BATCH_ROWS, BulkFileReader, CodeMemory, NotBulk, read_ahead
from agents.common.csvread import FILE_ROWS_MAX
from agents.common.schema import IDENTIFIER_CHARS_MAX, TEXT_CHARS_MAX, Column, Dataset, Kind

SCAN_BYTES = 1 << 22
# What the writer takes from DuckDB at a time (some 10,000 rows).
PIPE_READ_BYTES = 1 << 20
# DuckDB's memory (it streams; its CSV reader and the query hold a few vectors).
DUCKDB_MEMORY_MAX = "512MB"
# Threads DuckDB parses and checks with (this machine's cores, at most 4: the SQLite
# writer that takes the rows is one thread, so more would only contend).
DUCKDB_THREADS_MAX = 4
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


def file_sha256(path: Path, stop: threading.Event | None = None) -> str | None:
    """The digest of the file's bytes (hashlib lets go of the interpreter meanwhile);
    None if `stop` is set first."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_BYTES):
            if stop is not None and stop.is_set():
                return None
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
        return (f"CAST(split_part({v}, '.', 1) AS BIGINT) * {checks.FEN_PER_CNY} "
                f"+ CAST(rpad(split_part({v}, '.', 2), 2, '0') AS BIGINT)")
    if column.kind is Kind.FLAG:
        return f"CAST({v} AS BIGINT)"
    return v


def select_sql(dataset: Dataset, header: tuple[str, ...], path: Path) -> str:
    """The query of a plain file's stored rows in file order, raising an error at the
    first value the row reader would refuse; NotBulk if the header lacks a column."""
    positions = {}
    for name in dataset.column_names:
        if header.count(name) != 1:
            raise NotBulk(f"column {name!r} missing or repeated")
        positions[name] = header.index(name)
    types = ", ".join(f"'c{i}': 'VARCHAR'" for i in range(len(header)))
    values = []
    for column in dataset.columns:
        v = f"c{positions[column.name]}"
        kind_v = (f"c{positions[column.holder_kind_column]}" if column.holder_kind_column
                  else "")
        check = valid_sql(column, v, kind_v)
        bad = f"error('{column.name}: a value the row reader refuses')"
        converted = stored_sql(column, v)
        if column.optional:
            values.append(f"CASE WHEN {v} IS NULL THEN NULL WHEN {check} THEN {converted} "
                          f"ELSE {bad} END")
        else:
            values.append(f"CASE WHEN {v} IS NOT NULL AND {check} THEN {converted} "
                          f"ELSE {bad} END")
    source = (f"read_csv({_sql_text(str(path))}, header = true, auto_detect = false, "
              f"delim = ',', quote = '\"', escape = '\"', new_line = '\\n', "
              f"strict_mode = true, null_padding = false, columns = {{{types}}})")
    return f"SELECT {', '.join(values)} FROM {source}"


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

    def batches(self) -> Iterator[list[tuple[object, ...]]]:
        """The file's rows. Run this on the thread that writes them: the parsing runs
        in DuckDB's threads and the rest is the writer's own work (a second Python
        thread splitting rows would hold the interpreter the writer needs between
        every two rows it inserts)."""
        scan = scan_file(self.path)
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
        digests: list[str | None] = []
        stop = threading.Event()
        hashing = threading.Thread(
            target=lambda: digests.append(file_sha256(self.path, stop)), name="load-hash",
            daemon=True)
        hashing.start()
        try:
            yield from self._plain_batches(scan)
        except BaseException:
            stop.set()  # the load stops: so does the hashing
            raise
        finally:
            hashing.join()
        digest = digests[0] if digests else None
        if digest is None:
            raise NotBulk("the file could not be hashed")
        self.sha256 = digest

    def _plain_batches(self, scan: Scan) -> Iterator[list[tuple[object, ...]]]:
        """DuckDB writes the checked, converted rows as CSV into a pipe on its own
        thread (letting go of the interpreter throughout); here they are split into
        rows. A value the row reader refuses stops DuckDB, and this raises NotBulk."""
        import duckdb  # a fraction of a second to import: only when a load needs it

        data_lines = max(scan.lines - 1, 0)
        if data_lines > FILE_ROWS_MAX:
            raise NotBulk(f"more than {FILE_ROWS_MAX} rows")
        sql = select_sql(self.dataset, scan.header, self.path)
        threads = max(1, min(DUCKDB_THREADS_MAX, os.cpu_count() or 1))
        con = duckdb.connect(config={"threads": threads, "memory_limit": DUCKDB_MEMORY_MAX,
                                     "preserve_insertion_order": True})
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
        try:
            producer.start()
            with open(read_end, "rb", closefd=True) as pipe:
                carry = b""
                while True:
                    chunk = pipe.read(PIPE_READ_BYTES)
                    if not chunk:
                        break
                    data = carry + chunk
                    end = data.rfind(b"\n") + 1
                    carry = data[end:]
                    if _OUTPUT_QUOTE.encode() in data:  # a value holds a line break
                        raise NotBulk("a record over several lines")
                    lines = data[:end].decode("utf-8").split("\n")
                    lines.pop()
                    batch = list(map(str.split, lines, repeat(_FIELD_SEPARATOR)))
                    if batch and (len(batch[0]) != width or len(batch[-1]) != width):
                        raise NotBulk("a row of another width")
                    for at in range(0, len(batch), self.batch_rows):
                        part = batch[at:at + self.batch_rows] if at or len(batch) > \
                            self.batch_rows else batch
                        self.rows += len(part)
                        self.bytes_read = (self.size_bytes * self.rows // data_lines
                                           if data_lines else self.size_bytes)
                        # lists, not tuples: sqlite3 binds any sequence
                        yield cast(list[tuple[object, ...]], part)
                if carry:
                    raise NotBulk("DuckDB's output ends inside a row")
        finally:
            producer.join()  # it ends: the pipe's reading end is closed
            con.close()
        if failed:
            exc = failed[0]
            if isinstance(exc, duckdb.Error):
                raise NotBulk(f"DuckDB: {str(exc).splitlines()[0]}") from None
            raise exc
        if self.rows != data_lines:  # every line a row: a blank line was ruled out
            raise NotBulk(f"{self.rows} rows of {data_lines} lines")
        self.bytes_read = self.size_bytes
