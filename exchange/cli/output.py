"""Shared output helpers: JSON for programs, rich tables for people."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

# soft_wrap: a line of text is printed whole (a terminal may fold it, but never a
# newline in mid-phrase); tables still fit the width
console = Console(width=None if sys.stdout.isatty() else 140, soft_wrap=True)


def emit_json(obj: object) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


# What a table's frame adds to its columns' widths: a border and one space each side of
# every cell, and the closing border.
FRAME_CELLS_PER_COLUMN = 3
FRAME_CELLS = 1
PROSE_CELLS_MIN = 12


def _widest_line(text: str) -> int:
    return max((cell_len(line) for line in text.splitlines()), default=0)


def _widest_word(text: str) -> int:
    return max((cell_len(word) for word in text.split()), default=0)


def _min_widths(columns: Sequence[str], cells: Sequence[Sequence[str]]
                ) -> tuple[list[int], list[bool]]:
    """Each column's narrowest width that cuts no value, and whether it is prose (a
    column with spaces in a cell, which wraps between words, never inside one)."""
    mins: list[int] = []
    prose: list[bool] = []
    for i, col in enumerate(columns):
        values = [row[i] for row in cells if i < len(row)]
        is_prose = any(len(v.split()) > 1 for v in values)
        prose.append(is_prose)
        if is_prose:
            widest = max([_widest_word(col), *(_widest_word(v) for v in values)])
            mins.append(max(widest, min(PROSE_CELLS_MIN, max(
                [_widest_line(col), *(_widest_line(v) for v in values)]))))
        else:
            mins.append(max([_widest_line(col), *(_widest_line(v) for v in values)]))
    return mins, prose


def _fits(mins: Sequence[int]) -> bool:
    return sum(mins) + FRAME_CELLS_PER_COLUMN * len(mins) + FRAME_CELLS <= console.width


def _list_per_line(value: str) -> str:
    """A comma-separated list without spaces ("analyst,supervisor") one item a line."""
    if "," in value and not any(ch.isspace() for ch in value):
        return value.replace(",", ",\n")
    return value


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Print rows for people without ever cutting a value: identifiers (a column whose
    cells have no spaces: USCCs, person ids, tx ids, signers, reason codes) keep their
    whole width and prose wraps between words; if that is too wide for the width (a
    pipe's or a narrow terminal's), lists ("analyst,supervisor") take a line per item;
    if even that does not fit, each row is printed as its own block of "column | value"
    lines instead."""
    cells = [[str(c) for c in row] for row in rows]
    columns = [str(c) for c in columns]
    mins, prose = _min_widths(columns, cells)
    if not _fits(mins):
        listed = [[_list_per_line(v) for v in row] for row in cells]
        listed_mins, listed_prose = _min_widths(columns, listed)
        if not _fits(listed_mins):
            _records(title, columns, cells)
            return
        cells, mins, prose = listed, listed_mins, listed_prose
    t = Table(title=title, title_justify="left")
    for col, width, is_prose in zip(columns, mins, prose, strict=True):
        t.add_column(col, min_width=width, no_wrap=not is_prose, overflow="fold")
    for row in cells:
        t.add_row(*row)
    console.print(t)


def _records(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Rows too wide for the width, one block each: every value whole on its own line."""
    if title:
        console.print(title, soft_wrap=True, highlight=False, markup=False)
    label = max((cell_len(c) for c in columns), default=0)
    for number, row in enumerate(rows, 1):
        console.print(f"-[ {number} ]" + "-" * max(0, min(console.width, 40) - 8 - len(
            str(number))), soft_wrap=True, highlight=False, markup=False)
        for col, value in zip(columns, row, strict=False):
            lines = value.splitlines() or [""]
            pad = " " * (label - cell_len(col))
            console.print(f"{col}{pad} | {lines[0]}", soft_wrap=True, highlight=False,
                          markup=False)
            for more in lines[1:]:
                console.print(f"{' ' * label} | {more}", soft_wrap=True, highlight=False,
                              markup=False)
    if not rows:
        console.print("(none)", highlight=False)


def fmt_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def exit_on_interrupt() -> None:
    """Ctrl-C (SIGINT) ends a command that follows a stream at once, with status 0, what
    it printed flushed. Not KeyboardInterrupt: raised inside gRPC's blocking wait for the
    next message it can leave the call's lock taken, and the process then hangs in the
    stream's cancel (seen in the suite: `chain follow` still running a minute after
    Ctrl-C)."""
    def stop(_signum: int, _frame: object) -> None:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(0)

    signal.signal(signal.SIGINT, stop)
