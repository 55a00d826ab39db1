"""People's Bank of China, Shenzhen Central Sub-branch: bank accounts and their
transactions (DATA_CONTRACT.md, "pboc"), and the catalog view it offers."""

from __future__ import annotations

from agents.common.schema import Column, Dataset, Kind, Reference

AGENCY = "pboc"

HOLDER_KINDS = ("company", "person")
TXN_DIRECTIONS = ("in", "out")

ACCOUNTS = Dataset(
    name="accounts",
    description="Bank accounts and who holds them.",
    columns=(
        Column("account_no", Kind.IDENTIFIER, "account number"),
        Column("holder_kind", Kind.ENUM, "company or person", values=HOLDER_KINDS),
        Column("holder_id", Kind.HOLDER_ID,
               "a uscc for a company, a person_id for a person",
               holder_kind_column="holder_kind"),
        Column("bank", Kind.TEXT, "the bank keeping the account"),
        Column("opened_on", Kind.DATE, "date the account was opened"),
    ),
    key=("account_no",),
    indexes=(("holder_kind", "holder_id"),),
)

TRANSACTIONS = Dataset(
    name="transactions",
    description="Transactions booked on the accounts.",
    columns=(
        Column("txn_id", Kind.IDENTIFIER, "transaction id"),
        Column("account_no", Kind.IDENTIFIER, "the account booked (in accounts.csv)"),
        Column("counterparty_account", Kind.IDENTIFIER,
               "the other side's account, at any bank; need not be known"),
        Column("amount_cny", Kind.AMOUNT, "CNY equivalent at booking, positive"),
        Column("direction", Kind.ENUM, "in or out: the sign of the amount",
               values=TXN_DIRECTIONS),
        Column("cross_border", Kind.FLAG, "1 if the counterparty is abroad"),
        Column("booked_on", Kind.DATE, "booking date"),
    ),
    key=("txn_id",),
    references=(Reference("account_no", "accounts"),),
    indexes=(("booked_on",), ("account_no", "booked_on")),
)

DATASETS = (ACCOUNTS, TRANSACTIONS)
