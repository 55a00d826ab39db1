"""The CLI's tables never cut an identifier a person must copy (issue 21): at a pipe's
width or a narrow terminal's, identifiers keep their whole width and prose wraps between
words, or each row becomes a block of "column: value" lines; never a cell ending in
"…"."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from exchange.cli import output

TX = "9f2c5e0d7a41b3c8e6f1a2d4b5c7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9"
USCC = "91440304MA5FXYZ12K"
PERSON = "440310197801140111"
SIGNER = "customs/analyst-1"
CODE = "COSIGNATURE_REQUIRED"
COLUMNS = ["height", "kind", "who", "query", "subjects", "why / outcome", "reason"]
ROWS = [[12, "query", SIGNER, TX, f"uscc={USCC}, person_id={PERSON}",
         "legal representative's record, asked because the rebate claim had no exports",
         CODE],
        [13, "refusal", "police/node", TX[::-1], f"person_id={PERSON}",
         f"{CODE}: a supervisor of the requesting agency must co-sign this query", CODE]]
IDENTIFIERS = [TX, TX[::-1], USCC, PERSON, SIGNER, CODE, f"uscc={USCC},",
               f"person_id={PERSON}"]


def _printed(width: int, monkeypatch: pytest.MonkeyPatch) -> str:
    out = io.StringIO()
    monkeypatch.setattr(output, "console", Console(width=width, file=out, soft_wrap=True,
                                                   color_system=None))
    output.table("audit trail", COLUMNS, ROWS)
    return out.getvalue()


@pytest.mark.parametrize("width", [30, 40, 60, 80, 100, 140, 200, 260])
def test_no_identifier_is_cut_at_any_width(width: int,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    text = _printed(width, monkeypatch)
    assert "…" not in text and "..." not in text
    for identifier in IDENTIFIERS:
        assert any(identifier in line for line in text.splitlines()), (width, identifier)


def test_a_wide_terminal_gets_a_table_and_a_narrow_one_a_block_per_row(
        monkeypatch: pytest.MonkeyPatch) -> None:
    wide = _printed(260, monkeypatch)
    assert "┃" in wide or "│" in wide
    assert wide.count(TX) == 1
    narrow = _printed(60, monkeypatch)
    assert "-[ 1 ]" in narrow and "-[ 2 ]" in narrow
    assert re.search(rf"^query\s+\| {TX}$", narrow, re.MULTILINE)
    assert re.search(rf"^reason\s+\| {CODE}$", narrow, re.MULTILINE)


def test_prose_wraps_between_words_in_a_table_that_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = _printed(200, monkeypatch)
    assert "│" in text or "┃" in text  # still a table
    words = set(" ".join(str(c) for row in ROWS for c in row).split())
    printed = set(re.split(r"[\s│┃]+", text))
    broken = [w for w in words if len(w) > 3 and w.strip(",:") not in
              {p.strip(",:") for p in printed}]
    assert not broken, broken


def test_an_empty_table_still_prints_its_title(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(output, "console", Console(width=30, file=out, color_system=None))
    output.table("cases at height 7", ["case", "opened by", "at height", "status",
                                       "findings", "transactions"], [])
    assert "cases at height 7" in out.getvalue()


def test_lists_take_a_line_per_item_before_a_table_gives_way_to_blocks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(output, "console", Console(width=110, file=out, color_system=None))
    bases = "tax-crime-investigation,anti-money-laundering"
    output.table("police/persons (owner police, version 1)",
                 ["to", "roles", "case", "legal bases", "shapes", "rows", "per hour",
                  "supervisor"],
                 [["customs", "analyst,supervisor", "required", bases, "subject,subject_set",
                   10000, 600, "co-sign"]])
    text = out.getvalue()
    assert "│" in text or "┃" in text  # still a table
    assert "…" not in text
    lines = text.splitlines()
    assert any("tax-crime-investigation," in line for line in lines)
    assert any("anti-money-laundering" in line for line in lines)
    assert not any(bases in line for line in lines)  # one item a line
