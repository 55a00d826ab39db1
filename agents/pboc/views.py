"""pboc's catalog view company_flows, as SQL over its own store."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from agents.common.checks import fen_to_decimal, period_bounds
from agents.common.store import AgencyStore, to_int
from agents.common.view import SubjectFilter, View, ViewColumn, fetch_filtered


@dataclass(frozen=True, order=True)
class CompanyFlow:
    uscc: str
    period: str
    inflows_cny: Decimal
    outbound_cross_border_cny: Decimal


# Per company (accounts with holder_kind company, grouped by holder_id) with at least
# one transaction booked in the period: the `in` amounts whose counterparty account is
# not held by the same company, and the `out` amounts with cross_border = 1. `{subjects}`
# narrows the companies (a.holder_id) and nothing else: the counterparty accounts are
# still looked up among all accounts.
COMPANY_FLOWS_SQL = """
SELECT a.holder_id,
       SUM(CASE WHEN t.direction = 'in' AND NOT EXISTS (
                     SELECT 1 FROM accounts c
                     WHERE c.account_no = t.counterparty_account
                       AND c.holder_kind = 'company'
                       AND c.holder_id = a.holder_id)
                THEN t.amount_fen ELSE 0 END),
       SUM(CASE WHEN t.direction = 'out' AND t.cross_border = 1
                THEN t.amount_fen ELSE 0 END)
FROM transactions t
JOIN accounts a ON a.account_no = t.account_no
WHERE a.holder_kind = 'company'
  AND t.booked_on >= :start AND t.booked_on < :end{subjects}
GROUP BY a.holder_id
"""


def company_flows(store: AgencyStore, period: str, subjects: SubjectFilter | None = None
                  ) -> list[CompanyFlow]:
    """uscc, period, inflows_cny, outbound_cross_border_cny for every company with a
    transaction in `period` (with `subjects`, of those companies), sorted by uscc."""
    start, end = period_bounds(period)
    rows = fetch_filtered(store, COMPANY_FLOWS_SQL, {"start": start, "end": end},
                          {"uscc": "a.holder_id"}, subjects)
    return sorted(CompanyFlow(str(uscc), period, fen_to_decimal(to_int(inflows)),
                              fen_to_decimal(to_int(outbound)))
                  for uscc, inflows, outbound in rows)


def stream_company_flows(store: AgencyStore, period: str | None) -> Iterator[CompanyFlow]:
    """company_flows of every company, streamed from the store in uscc order."""
    assert period is not None
    start, end = period_bounds(period)
    sql = COMPANY_FLOWS_SQL.format(subjects="") + "ORDER BY a.holder_id\n"
    for uscc, inflows, outbound in store.stream(sql, {"start": start, "end": end}):
        yield CompanyFlow(str(uscc), period, fen_to_decimal(to_int(inflows)),
                          fen_to_decimal(to_int(outbound)))


def _compute(store: AgencyStore, period: str | None, subjects: SubjectFilter | None
             ) -> list[CompanyFlow]:
    assert period is not None
    return company_flows(store, period, subjects)


COMPANY_FLOWS = View[CompanyFlow](
    name="company_flows",
    agency="pboc",
    description="Each company's inflows (excluding transfers between its own accounts) "
                "and outbound cross-border payments in a month.",
    columns=(
        ViewColumn("uscc", "uscc", "the company"),
        ViewColumn("period", "period", "the month"),
        ViewColumn("inflows_cny", "decimal",
                   "in transactions of its accounts whose counterparty account it does "
                   "not hold"),
        ViewColumn("outbound_cross_border_cny", "decimal",
                   "out transactions with cross_border = 1 of its accounts"),
    ),
    period_bound=True,
    compute=_compute,
    stream=stream_company_flows,
)

VIEWS = {COMPANY_FLOWS.name: COMPANY_FLOWS}
