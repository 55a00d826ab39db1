"""Shenzhen Taxation Bureau: taxpayers, VAT invoices, revenue declarations and export
rebate claims (DATA_CONTRACT.md, "tax"), and the catalog view it offers."""

from __future__ import annotations

from agents.common.schema import Column, Dataset, Kind, Reference

AGENCY = "tax"

TAXPAYER_STATUSES = ("active", "deregistered", "abnormal")
INVOICE_KINDS = ("domestic", "export")

TAXPAYERS = Dataset(
    name="taxpayers",
    description="Taxpayers registered with the bureau.",
    columns=(
        Column("uscc", Kind.USCC, "the taxpayer's unified social credit code"),
        Column("name", Kind.TEXT, "registered name"),
        Column("legal_rep_id", Kind.PERSON_ID, "the legal representative's person_id"),
        Column("status", Kind.ENUM, "registration status", values=TAXPAYER_STATUSES),
        Column("registered_on", Kind.DATE, "date of tax registration"),
    ),
    key=("uscc",),
    indexes=(("status",), ("legal_rep_id",)),
)

VAT_INVOICES = Dataset(
    name="vat_invoices",
    description="VAT invoices issued by the bureau's taxpayers.",
    columns=(
        Column("invoice_no", Kind.IDENTIFIER, "invoice number"),
        Column("issuer_uscc", Kind.USCC, "the issuing taxpayer"),
        Column("buyer_uscc", Kind.USCC, "the buyer (need not be the bureau's taxpayer)"),
        Column("amount_cny", Kind.AMOUNT, "amount before tax, CNY"),
        Column("tax_cny", Kind.AMOUNT, "VAT, CNY"),
        Column("issued_on", Kind.DATE, "date of issue"),
        Column("kind", Kind.ENUM, "domestic or export invoice", values=INVOICE_KINDS),
    ),
    key=("invoice_no",),
    # an invoice is issued through the bureau by one of its own taxpayers
    references=(Reference("issuer_uscc", "taxpayers"),),
    indexes=(("issuer_uscc", "issued_on"), ("buyer_uscc",), ("issued_on",)),
)

REVENUE_DECLARATIONS = Dataset(
    name="revenue_declarations",
    description="Monthly revenue declared by each taxpayer.",
    columns=(
        Column("uscc", Kind.USCC, "the declaring taxpayer"),
        Column("period", Kind.PERIOD, "the month declared, YYYY-MM"),
        Column("declared_revenue_cny", Kind.AMOUNT, "revenue declared for the month, CNY"),
    ),
    key=("uscc", "period"),
    references=(Reference("uscc", "taxpayers"),),
    indexes=(("period",),),
)

EXPORT_REBATES = Dataset(
    name="export_rebates",
    description="Export VAT rebate claims.",
    columns=(
        Column("claim_no", Kind.IDENTIFIER, "claim number"),
        Column("uscc", Kind.USCC, "the claiming taxpayer"),
        Column("period", Kind.PERIOD, "the month the claim is for, YYYY-MM"),
        Column("claimed_export_value_cny", Kind.AMOUNT, "export value claimed, CNY"),
        Column("rebate_cny", Kind.AMOUNT, "rebate claimed, CNY"),
    ),
    key=("claim_no",),
    references=(Reference("uscc", "taxpayers"),),
    indexes=(("period", "uscc"),),
)

DATASETS = (TAXPAYERS, VAT_INVOICES, REVENUE_DECLARATIONS, EXPORT_REBATES)
