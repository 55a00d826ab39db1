"""Identifier check digits and the value formats of the data contract.

Pure functions, no I/O: the loader, the generator and the tests share them.

- uscc: the Unified Social Credit Code of GB 32100-2015, 18 characters from the
  31-character alphabet 0-9 A-Z without I, O, S, V, Z; characters 3 to 8 (the
  administrative division) are digits; the 18th is the check character
  ``ALPHABET[(31 - sum(value(c_i) * 3**(i-1) mod 31)) mod 31]`` over the first 17.
- person_id: the resident identity number of GB 11643, 17 digits and an ISO 7064
  MOD 11-2 check character (``X`` stands for 10), upper case only.
- amounts: positive decimals with at most two places, kept as integer fen.
- dates ``YYYY-MM-DD`` and periods ``YYYY-MM``, kept as their (canonical) text.
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal

USCC_ALPHABET = "0123456789ABCDEFGHJKLMNPQRTUWXY"
USCC_VALUE = {c: i for i, c in enumerate(USCC_ALPHABET)}
# 3**(i-1) mod 31 for positions 1..17, as the standard tabulates them.
USCC_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
USCC_LENGTH = 18
_USCC_SHAPE = re.compile(r"[0-9A-HJ-NPQRTUWXY]{2}[0-9]{6}[0-9A-HJ-NPQRTUWXY]{10}")

# GB 11714 organization code: the 9 characters at positions 9 to 17 of a uscc carry
# their own MOD 11 check character. The generator makes it right; the loader does not
# check it (the contract verifies the 18th character only).
_ORG_WEIGHTS = (3, 7, 9, 10, 5, 8, 4, 2)
_ORG_VALUE = {c: i for i, c in enumerate("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ")}

# 2**(17-i) mod 11 for positions 1..17 (ISO 7064 MOD 11-2).
PERSON_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
PERSON_ID_LENGTH = 18
_PERSON_ID_SHAPE = re.compile(r"[0-9]{17}[0-9X]")

FEN_PER_CNY = 100
# 999,999,999,999.99 CNY: any one amount stays below a trillion, so that sums of
# millions of them still fit the store's 64-bit integers.
AMOUNT_FEN_MAX = 10**14 - 1
_AMOUNT_SHAPE = re.compile(r"(0|[1-9][0-9]{0,20})(?:\.([0-9]{1,2}))?")
_DATE_SHAPE = re.compile(r"([12][0-9]{3})-([0-9]{2})-([0-9]{2})")
_PERIOD_SHAPE = re.compile(r"([12][0-9]{3})-(0[1-9]|1[0-2])")


def uscc_check_char(body: str) -> str:
    """The GB 32100-2015 check character of the first 17 characters of a uscc."""
    assert len(body) == USCC_LENGTH - 1, body
    total = sum(USCC_VALUE[c] * w for c, w in zip(body, USCC_WEIGHTS, strict=True))
    return USCC_ALPHABET[(31 - total % 31) % 31]


def org_code_check_char(body: str) -> str:
    """The GB 11714 check character of an 8-character organization code body."""
    assert len(body) == 8, body
    total = sum(_ORG_VALUE[c] * w for c, w in zip(body, _ORG_WEIGHTS, strict=True))
    value = (11 - total % 11) % 11
    return "X" if value == 10 else str(value)


def uscc_problem(code: str) -> str | None:
    """Why `code` is not a valid uscc, or None if it is."""
    if len(code) != USCC_LENGTH:
        return f"a uscc has {USCC_LENGTH} characters, got {len(code)} in {code!r}"
    if not _USCC_SHAPE.fullmatch(code):
        return (f"{code!r} is not a uscc (upper-case 0-9 A-Z without I O S V Z, "
                "digits at positions 3 to 8)")
    expected = uscc_check_char(code[:17])
    if code[17] != expected:
        return f"bad check digit in uscc {code!r} (expected {expected!r})"
    return None


def is_valid_uscc(code: str) -> bool:
    return uscc_problem(code) is None


def person_id_check_char(body: str) -> str:
    """The ISO 7064 MOD 11-2 check character of the first 17 digits of a person_id."""
    assert len(body) == PERSON_ID_LENGTH - 1 and body.isdigit(), body
    total = sum(int(c) * w for c, w in zip(body, PERSON_ID_WEIGHTS, strict=True))
    value = (12 - total % 11) % 11
    return "X" if value == 10 else str(value)


def person_id_problem(code: str) -> str | None:
    """Why `code` is not a valid person_id, or None if it is."""
    if len(code) != PERSON_ID_LENGTH:
        return f"a person_id has {PERSON_ID_LENGTH} characters, got {len(code)} in {code!r}"
    if not _PERSON_ID_SHAPE.fullmatch(code):
        return f"{code!r} is not a person_id (17 digits and a digit or upper-case X)"
    expected = person_id_check_char(code[:17])
    if code[17] != expected:
        return f"bad check digit in person_id {code!r} (expected {expected!r})"
    return None


def is_valid_person_id(code: str) -> bool:
    return person_id_problem(code) is None


def parse_amount_fen(text: str) -> int:
    """A positive amount of at most two decimals, as integer fen; ValueError otherwise."""
    m = _AMOUNT_SHAPE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not an amount (digits, optionally '.' and one or "
                         "two decimals; no sign, exponent or thousands separator)")
    cents = m.group(2) or ""
    fen = int(m.group(1)) * FEN_PER_CNY + int(cents.ljust(2, "0") or "0")
    if fen <= 0:
        raise ValueError(f"{text!r}: amounts are positive")
    if fen > AMOUNT_FEN_MAX:
        raise ValueError(f"{text!r} exceeds the largest amount {format_fen(AMOUNT_FEN_MAX)}")
    return fen


def format_fen(fen: int) -> str:
    """Integer fen as the canonical decimal text with two places ('1234.50')."""
    sign = "-" if fen < 0 else ""
    fen = abs(fen)
    return f"{sign}{fen // FEN_PER_CNY}.{fen % FEN_PER_CNY:02d}"


def fen_to_decimal(fen: int) -> Decimal:
    """Integer fen as an exact Decimal with two places."""
    return Decimal(fen).scaleb(-2)


def decimal_to_fen(value: Decimal) -> int:
    """An exact Decimal with at most two places as integer fen (ValueError otherwise)."""
    fen = value * FEN_PER_CNY
    if fen != fen.to_integral_value():
        raise ValueError(f"{value} has more than two decimals")
    return int(fen)


def check_date(text: str) -> str:
    """A valid calendar date written YYYY-MM-DD; returns it, ValueError otherwise."""
    m = _DATE_SHAPE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a date YYYY-MM-DD")
    try:
        date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date ({exc})") from None
    return text


def check_period(text: str) -> str:
    """A month written YYYY-MM; returns it, ValueError otherwise."""
    if _PERIOD_SHAPE.fullmatch(text) is None:
        raise ValueError(f"{text!r} is not a period YYYY-MM")
    return text


def period_bounds(period: str) -> tuple[str, str]:
    """The first day of `period` and of the month after, as YYYY-MM-DD text, so that
    'in P' is ``start <= d < end`` on the canonical date text."""
    check_period(period)
    year, month = int(period[:4]), int(period[5:])
    nyear, nmonth = (year + 1, 1) if month == 12 else (year, month + 1)
    return f"{year:04d}-{month:02d}-01", f"{nyear:04d}-{nmonth:02d}-01"


def shift_period(period: str, months: int) -> str:
    """`period` moved by `months` (negative: earlier)."""
    check_period(period)
    index = int(period[:4]) * 12 + int(period[5:]) - 1 + months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def pair_subject(uscc: str, person_id: str) -> str:
    """The subject text of a (uscc, person_id) finding, as ground_truth.csv writes it."""
    return f"{uscc}/{person_id}"
