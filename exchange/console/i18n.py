"""The console's message catalogue: one .po file per language under messages/, read at
run time with Babel. Chinese (zh_CN) is the default; English is the other. Dates are
shown in Asia/Shanghai, amounts in yuan with the locale's grouping."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from functools import cache
from pathlib import Path
from zoneinfo import ZoneInfo

from babel.dates import format_datetime
from babel.messages.catalog import Catalog
from babel.messages.pofile import read_po
from babel.numbers import format_currency, format_decimal

MESSAGES_DIR = Path(__file__).parent / "messages"
DOMAIN = "console"
LANGUAGES = ("zh_CN", "en")
LANGUAGE_DEFAULT = "zh_CN"
TIMEZONE_DEFAULT = "Asia/Shanghai"


def po_path(language: str) -> Path:
    return MESSAGES_DIR / language / "LC_MESSAGES" / f"{DOMAIN}.po"


@cache
def catalog(language: str) -> Catalog:
    """The catalogue of `language` (one of LANGUAGES), read once."""
    assert language in LANGUAGES, language
    with po_path(language).open("rb") as f:
        return read_po(f, locale=language, domain=DOMAIN)


@cache
def _table(language: str) -> dict[str, str]:
    return {str(m.id): str(m.string) for m in catalog(language)
            if m.id and isinstance(m.id, str) and m.string}


def choose(language: str | None) -> str:
    return language if language in LANGUAGES else LANGUAGE_DEFAULT


def translator(language: str) -> Callable[..., str]:
    """gettext for `language`: the catalogue's string, formatted with keyword arguments
    (a msgid the catalogue lacks is shown as is; the tests refuse any such msgid)."""
    table = _table(choose(language))

    def gettext(message: str, **values: object) -> str:
        text = table.get(message, message)
        return text % values if values else text
    return gettext


class Formats:
    """Dates, numbers and amounts for one language and time zone."""

    def __init__(self, language: str, timezone: str = TIMEZONE_DEFAULT) -> None:
        self.language = choose(language)
        self.zone = ZoneInfo(timezone)

    def time_ms(self, ms: int) -> str:
        if not ms:
            return "-"
        moment = datetime.fromtimestamp(ms / 1000, UTC)
        return format_datetime(moment, "yyyy-MM-dd HH:mm:ss zzz", tzinfo=self.zone,
                               locale=self.language)

    def number(self, value: object) -> str:
        try:
            return format_decimal(Decimal(str(value)), locale=self.language)
        except (InvalidOperation, ValueError):
            return str(value)

    def amount(self, value: object) -> str:
        """Yuan with the grouping people expect (¥1,234,567.89)."""
        if value is None or value == "":
            return ""
        try:
            return format_currency(Decimal(str(value)), "CNY", locale=self.language)
        except (InvalidOperation, ValueError):
            return str(value)
