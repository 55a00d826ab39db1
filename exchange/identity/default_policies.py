"""The policies a new network's genesis carries: every member's datasets of the data
contract (../shared/DATA_CONTRACT.md), offered to the other members for the two legal
bases, as the key ceremony (exchange.identity.ceremony) writes them into the draft
genesis. Each owner changes its own later by a policy transaction; evaluating policies
is the ledger's (exchange.ledger.policy). Here, in identity, because the genesis is
built here and identity imports nothing of the ledger."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from exchange.v1 import ledger_pb2

SHAPE = ledger_pb2.QueryShape

# The legal bases a query names (the default policies grant these two).
LEGAL_BASIS_TAX_CRIME = "tax-crime-investigation"
LEGAL_BASIS_AML = "anti-money-laundering"


@dataclass(frozen=True, slots=True)
class DatasetOffer:
    """One dataset as its owner offers it by default."""

    owner: str
    dataset: str
    fields: tuple[str, ...]
    aggregate: bool = False  # a catalog view the comparison jobs read period-wide
    about_persons: bool = False


# The datasets and views of the data contract (../shared/DATA_CONTRACT.md).
CONTRACT_OFFERS: tuple[DatasetOffer, ...] = (
    DatasetOffer("tax", "taxpayers", ("uscc", "name", "legal_rep_id", "status",
                                      "registered_on")),
    DatasetOffer("tax", "vat_invoices", ("invoice_no", "issuer_uscc", "buyer_uscc",
                                         "amount_cny", "tax_cny", "issued_on", "kind")),
    DatasetOffer("tax", "revenue_declarations", ("uscc", "period", "declared_revenue_cny")),
    DatasetOffer("tax", "export_rebates", ("claim_no", "uscc", "period",
                                           "claimed_export_value_cny", "rebate_cny")),
    DatasetOffer("tax", "active_legal_reps", ("uscc", "legal_rep_id"), aggregate=True),
    DatasetOffer("customs", "declarations", ("decl_no", "uscc", "direction", "hs_code",
                                             "declared_value_cny", "declared_on", "port")),
    DatasetOffer("customs", "company_trade", ("uscc", "period", "export_value_cny",
                                              "import_value_cny", "import_declarations"),
                 aggregate=True),
    DatasetOffer("pboc", "accounts", ("account_no", "holder_kind", "holder_id", "bank",
                                      "opened_on")),
    DatasetOffer("pboc", "transactions", ("txn_id", "account_no", "counterparty_account",
                                          "amount_cny", "direction", "cross_border",
                                          "booked_on")),
    DatasetOffer("pboc", "company_flows", ("uscc", "period", "inflows_cny",
                                           "outbound_cross_border_cny"), aggregate=True),
    DatasetOffer("police", "persons", ("person_id", "name"), about_persons=True),
    DatasetOffer("police", "records", ("record_id", "person_id", "kind", "case_no",
                                       "recorded_on"), about_persons=True),
)

ROW_LIMIT_RECORDS = 10_000
# A period-wide view has at most one row per company and month: four times the city's
# 2.5 million enterprises.
ROW_LIMIT_AGGREGATE = 10_000_000
RATE_PER_HOUR_ANALYST = 600
RATE_PER_HOUR_AUTOMATION = 1_000


# The market regulator's register, offered by the agency that joins a running network
# (issue 9); its supervisor puts this policy in force once it is a member.
JOINING_OFFERS: tuple[DatasetOffer, ...] = (
    DatasetOffer("market", "registrations", ("uscc", "name", "legal_rep_id",
                                             "registered_capital_cny", "status",
                                             "registered_on")),
)


def default_policies(members: Sequence[str],
                     offers: Sequence[DatasetOffer] = CONTRACT_OFFERS
                     ) -> list[ledger_pb2.Policy]:
    """A sensible starting point for a network of `members` (each owner may change its
    own later): every member may ask every other member's datasets for a tax-crime or
    anti-money-laundering investigation, record-level data only within a case (people,
    and automations running playbooks); the catalog views are open to automations
    without a case (the comparison jobs ask them period-wide); and queries to the police
    about persons need a supervisor's co-signature (decision 7)."""
    present = set(members)
    out = []
    for offer in offers:
        if offer.owner not in present:
            continue
        grants = []
        for requester in sorted(present - {offer.owner}):
            grants.append(ledger_pb2.PolicyGrant(
                requester_agency=requester, roles=["analyst", "supervisor"],
                fields=list(offer.fields),
                legal_bases=[LEGAL_BASIS_TAX_CRIME, LEGAL_BASIS_AML], case_required=True,
                row_limit=ROW_LIMIT_RECORDS, rate_per_hour=RATE_PER_HOUR_ANALYST,
                supervisor_cosign_required=offer.about_persons,
                shapes=[SHAPE.QUERY_SHAPE_SUBJECT, SHAPE.QUERY_SHAPE_SUBJECT_SET]))
            if not offer.aggregate:
                # playbooks' follow-ups (issue 10): an automation asks record-level data
                # within a case; about persons only on a supervisor's approval, which a
                # playbook's registration by a supervisor stands for (ledger/playbooks.py)
                grants.append(ledger_pb2.PolicyGrant(
                    requester_agency=requester, roles=["automation"],
                    fields=list(offer.fields),
                    legal_bases=[LEGAL_BASIS_TAX_CRIME, LEGAL_BASIS_AML], case_required=True,
                    row_limit=ROW_LIMIT_RECORDS, rate_per_hour=RATE_PER_HOUR_AUTOMATION,
                    supervisor_cosign_required=offer.about_persons,
                    shapes=[SHAPE.QUERY_SHAPE_SUBJECT, SHAPE.QUERY_SHAPE_SUBJECT_SET]))
            if offer.aggregate:
                grants.append(ledger_pb2.PolicyGrant(
                    requester_agency=requester, roles=["automation"],
                    fields=list(offer.fields), legal_bases=[LEGAL_BASIS_TAX_CRIME],
                    case_required=False, row_limit=ROW_LIMIT_AGGREGATE,
                    shapes=[SHAPE.QUERY_SHAPE_AGGREGATE, SHAPE.QUERY_SHAPE_SUBJECT_SET]))
        out.append(ledger_pb2.Policy(policy_id=f"{offer.owner}/{offer.dataset}",
                                     owner_agency=offer.owner, dataset=offer.dataset,
                                     grants=grants, version=1))
    return out
