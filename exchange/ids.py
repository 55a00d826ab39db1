"""Ids as people type them: a full id, or any unambiguous prefix of at least
ID_PREFIX_DIGITS_MIN hex digits (as git takes commit ids), since the tables print 16.

Pure: parsing a prefix into the byte range it covers, and turning the ids found in that
range into exactly one id or an error naming the candidates. Finding the candidates is
the caller's (a node's block store, the key registry, a list of cases)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from exchange.errors import AmbiguousId, MalformedInput, UnknownId
from exchange.v1 import node_pb2

ID_PREFIX_DIGITS_MIN = 8
FIND_LIMIT_DEFAULT = 10
FIND_LIMIT_MAX = 100
MATCHES_SHOWN_MAX = 10
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class IdPrefix:
    """A hex prefix of an id of `size_bytes`: every id in [low, high] begins with it."""

    text: str
    size_bytes: int

    @property
    def complete(self) -> bool:
        return len(self.text) == 2 * self.size_bytes

    @property
    def low(self) -> bytes:
        return bytes.fromhex(self.text.ljust(2 * self.size_bytes, "0"))

    @property
    def high(self) -> bytes:
        return bytes.fromhex(self.text.ljust(2 * self.size_bytes, "f"))

    def matches(self, value: bytes) -> bool:
        return len(value) == self.size_bytes and value.hex().startswith(self.text)


def parse_id_prefix(text: str, what: str = "transaction id", size_bytes: int = 32) -> IdPrefix:
    """A full id or a prefix of at least ID_PREFIX_DIGITS_MIN hex digits; anything else
    is refused with what was wrong. A trailing "..." (as tables print) is ignored."""
    cleaned = text.strip().lower().removesuffix("...").removesuffix("…")
    if not cleaned or not set(cleaned) <= _HEX:
        raise MalformedInput(f"{what} {text!r} is not hex")
    if len(cleaned) > 2 * size_bytes:
        raise MalformedInput(f"{what} {text!r} is longer than {2 * size_bytes} hex digits")
    if len(cleaned) < min(ID_PREFIX_DIGITS_MIN, 2 * size_bytes):
        raise MalformedInput(f"{what} {text!r} is too short: give at least "
                             f"{ID_PREFIX_DIGITS_MIN} hex digits of it")
    return IdPrefix(cleaned, size_bytes)


def choose(prefix: IdPrefix, candidates: Sequence[bytes], what: str = "transaction",
           more: bool = False) -> bytes:
    """The one candidate that begins with the prefix; UnknownId when none does,
    AmbiguousId naming the candidates (at most MATCHES_SHOWN_MAX) when several do."""
    found = sorted({bytes(c) for c in candidates if prefix.matches(bytes(c))})
    if len(found) == 1 and not more:
        return found[0]
    if not found:
        raise UnknownId(f"no {what} id begins with {prefix.text}")
    shown = ", ".join(f.hex() for f in found[:MATCHES_SHOWN_MAX])
    extra = " and more" if more or len(found) > MATCHES_SHOWN_MAX else ""
    raise AmbiguousId(f"{prefix.text} is ambiguous: {len(found)}{'+' if extra else ''} "
                      f"{what} ids begin with it ({shown}{extra}); give more digits")


def choose_text(text: str, candidates: Sequence[str], what: str) -> str:
    """A name (a case id) typed whole or as the unambiguous beginning of one: the exact
    match wins; a prefix matching several is refused naming them."""
    typed = text.strip()
    if typed in candidates:
        return typed
    found = sorted({c for c in candidates if c.lower().startswith(typed.lower())})
    if len(found) == 1 and len(typed) >= 4:
        return found[0]
    if not found:
        raise UnknownId(f"no {what} {typed!r}")
    if len(found) == 1:
        raise MalformedInput(f"{what} {typed!r} is too short a beginning: give {found[0]}")
    shown = ", ".join(found[:MATCHES_SHOWN_MAX])
    raise AmbiguousId(f"{what} {typed!r} is ambiguous: {len(found)} begin with it "
                      f"({shown}{' and more' if len(found) > MATCHES_SHOWN_MAX else ''})")


class TxIndex(Protocol):
    def tx_ids_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]: ...

    @property
    def height(self) -> int: ...


def find_transactions(store: TxIndex, request: node_pb2.FindTransactionsRequest
                      ) -> node_pb2.TransactionIdList:
    """The node's side of FindTransactions: the ids in the prefix's range, bounded."""
    prefix = parse_id_prefix(request.tx_id_prefix_hex)
    if request.limit > FIND_LIMIT_MAX:
        raise MalformedInput(f"limit is at most {FIND_LIMIT_MAX}")
    limit = request.limit or FIND_LIMIT_DEFAULT
    found = store.tx_ids_between(prefix.low, prefix.high, limit + 1)
    return node_pb2.TransactionIdList(tx_ids=found[:limit], more=len(found) > limit,
                                      height=store.height)


class FindsTransactions(Protocol):
    def find_transactions(self, prefix_hex: str, limit: int = ...
                          ) -> node_pb2.TransactionIdList: ...


def resolve_tx_id(text: str, finder: FindsTransactions | TxIndex | None,
                  what: str = "transaction") -> bytes:
    """A transaction id from a full id or an unambiguous prefix, asked of a node (a
    client) or a block store; a full id is taken as it is, without asking."""
    prefix = parse_id_prefix(text, f"{what} id")
    if prefix.complete or finder is None:
        if not prefix.complete:
            raise MalformedInput(f"{what} id {text!r} is not 32 bytes (64 hex digits)")
        return prefix.low
    if hasattr(finder, "find_transactions"):
        listing = finder.find_transactions(prefix.text, FIND_LIMIT_DEFAULT)
        return choose(prefix, list(listing.tx_ids), what, more=listing.more)
    found = finder.tx_ids_between(prefix.low, prefix.high, FIND_LIMIT_DEFAULT + 1)
    return choose(prefix, found[:FIND_LIMIT_DEFAULT], what,
                  more=len(found) > FIND_LIMIT_DEFAULT)


def parse_since(text: str) -> int:
    """A `since` time as people type it, as Unix ms: a date (YYYY-MM-DD, UTC midnight) or an ISO 8601 time."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise MalformedInput(f"--since {text!r} is not a date (YYYY-MM-DD) or ISO time") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)
