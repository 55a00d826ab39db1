"""Shenzhen Customs: import and export declarations (DATA_CONTRACT.md, "customs"), and
the catalog view it offers."""

from __future__ import annotations

from agents.common.schema import Column, Dataset, Kind

AGENCY = "customs"

DIRECTIONS = ("import", "export")

DECLARATIONS = Dataset(
    name="declarations",
    description="Customs declarations of goods.",
    columns=(
        Column("decl_no", Kind.IDENTIFIER, "declaration number"),
        Column("uscc", Kind.USCC, "the declaring company (need not be a Shenzhen taxpayer)"),
        Column("direction", Kind.ENUM, "import or export", values=DIRECTIONS),
        Column("hs_code", Kind.IDENTIFIER, "HS commodity code"),
        Column("declared_value_cny", Kind.AMOUNT, "declared customs value, CNY"),
        Column("declared_on", Kind.DATE, "date of declaration"),
        Column("port", Kind.TEXT, "port of entry or exit"),
    ),
    key=("decl_no",),
    indexes=(("declared_on",), ("uscc", "declared_on")),
)

DATASETS = (DECLARATIONS,)
