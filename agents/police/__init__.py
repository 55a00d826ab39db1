"""Shenzhen Public Security Bureau: persons and their police records
(DATA_CONTRACT.md, "police")."""

from __future__ import annotations

from agents.common.schema import Column, Dataset, Kind, Reference

AGENCY = "police"

RECORD_KINDS = ("wanted", "fraud_conviction", "lost_id_report", "under_investigation")
# The kinds that make officer-with-police-record a finding.
FLAGGING_RECORD_KINDS = ("wanted", "fraud_conviction", "lost_id_report")

PERSONS = Dataset(
    name="persons",
    description="Persons known to the bureau.",
    columns=(
        Column("person_id", Kind.PERSON_ID, "resident identity number"),
        Column("name", Kind.TEXT, "name"),
    ),
    key=("person_id",),
)

RECORDS = Dataset(
    name="records",
    description="Police records about persons.",
    columns=(
        Column("record_id", Kind.IDENTIFIER, "record id"),
        Column("person_id", Kind.PERSON_ID, "the person (in persons.csv)"),
        Column("kind", Kind.ENUM, "kind of record", values=RECORD_KINDS),
        # free text and optional: a lost-id report often has no case number
        Column("case_no", Kind.TEXT, "case number, if any", optional=True),
        Column("recorded_on", Kind.DATE, "date recorded"),
    ),
    key=("record_id",),
    references=(Reference("person_id", "persons"),),
    indexes=(("person_id",), ("kind",)),
)

DATASETS = (PERSONS, RECORDS)
