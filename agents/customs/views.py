"""customs' catalog view company_trade, as SQL over its own store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from agents.common.checks import fen_to_decimal, period_bounds
from agents.common.store import AgencyStore, to_int
from agents.common.view import SubjectFilter, View, ViewColumn, fetch_filtered


@dataclass(frozen=True, order=True)
class CompanyTrade:
    uscc: str
    period: str
    export_value_cny: Decimal
    import_value_cny: Decimal
    import_declarations: int


COMPANY_TRADE_SQL = """
SELECT uscc,
       SUM(CASE WHEN direction = 'export' THEN declared_value_fen ELSE 0 END),
       SUM(CASE WHEN direction = 'import' THEN declared_value_fen ELSE 0 END),
       SUM(CASE WHEN direction = 'import' THEN 1 ELSE 0 END)
FROM declarations
WHERE declared_on >= :start AND declared_on < :end{subjects}
GROUP BY uscc
"""


def company_trade(store: AgencyStore, period: str, subjects: SubjectFilter | None = None
                  ) -> list[CompanyTrade]:
    """uscc, period, export_value_cny, import_value_cny, import_declarations for every
    company with a declaration in `period` (with `subjects`, of those companies), sorted
    by uscc."""
    start, end = period_bounds(period)
    rows = fetch_filtered(store, COMPANY_TRADE_SQL, {"start": start, "end": end},
                          {"uscc": "uscc"}, subjects)
    return sorted(CompanyTrade(str(uscc), period, fen_to_decimal(to_int(exports)),
                               fen_to_decimal(to_int(imports)), to_int(count))
                  for uscc, exports, imports, count in rows)


def stream_company_trade(store: AgencyStore, period: str | None) -> Iterator[CompanyTrade]:
    """company_trade of every company, streamed from the store in uscc order."""
    assert period is not None
    start, end = period_bounds(period)
    sql = COMPANY_TRADE_SQL.format(subjects="") + "ORDER BY uscc\n"
    for uscc, exports, imports, count in store.stream(sql, {"start": start, "end": end}):
        yield CompanyTrade(str(uscc), period, fen_to_decimal(to_int(exports)),
                           fen_to_decimal(to_int(imports)), to_int(count))


def _compute(store: AgencyStore, period: str | None, subjects: SubjectFilter | None
             ) -> list[CompanyTrade]:
    assert period is not None
    return company_trade(store, period, subjects)


COMPANY_TRADE = View[CompanyTrade](
    name="company_trade",
    agency="customs",
    description="Each company's declared export and import values and its number of "
                "import declarations in a month.",
    columns=(
        ViewColumn("uscc", "uscc", "the declaring company"),
        ViewColumn("period", "period", "the month"),
        ViewColumn("export_value_cny", "decimal", "sum of export declared values"),
        ViewColumn("import_value_cny", "decimal", "sum of import declared values"),
        ViewColumn("import_declarations", "integer", "number of import declarations"),
    ),
    period_bound=True,
    compute=_compute,
    stream=stream_company_trade,
)

VIEWS = {COMPANY_TRADE.name: COMPANY_TRADE}
