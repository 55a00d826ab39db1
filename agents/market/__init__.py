"""Shenzhen Administration for Market Regulation: the business register. Not one of the
four founding agencies of the data contract: it joins a running network (issue 9), so
its dataset is described here, beside theirs, in the same form."""

from __future__ import annotations

from agents.common.schema import Column, Dataset, Kind

AGENCY = "market"

REGISTRATION_STATUSES = ("active", "revoked", "deregistered")

REGISTRATIONS = Dataset(
    name="registrations",
    description="Companies in the business register.",
    columns=(
        Column("uscc", Kind.USCC, "the company's unified social credit code"),
        Column("name", Kind.TEXT, "registered name"),
        Column("legal_rep_id", Kind.PERSON_ID, "the legal representative's person_id"),
        Column("registered_capital_cny", Kind.AMOUNT, "registered capital, CNY"),
        Column("status", Kind.ENUM, "register status", values=REGISTRATION_STATUSES),
        Column("registered_on", Kind.DATE, "date of registration"),
    ),
    key=("uscc",),
    indexes=(("legal_rep_id",), ("status",)),
)

DATASETS = (REGISTRATIONS,)
