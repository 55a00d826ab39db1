"""What each agency offers on the ledger: its datasets and catalog views as catalog
entries (fields, and what a subject can be looked up by)."""

from __future__ import annotations

from agents import datasets_of, views_of
from agents.lookup import lookup_keys
from exchange.v1 import ledger_pb2

SHAPE = ledger_pb2.QueryShape


def catalog_entries(agency: str) -> list[ledger_pb2.CatalogEntry]:
    """The agency's catalog, in a stable order: datasets, then views."""
    out = []
    for dataset in datasets_of(agency):
        keys = list(lookup_keys(dataset))
        out.append(ledger_pb2.CatalogEntry(
            dataset=dataset.name, description=dataset.description,
            fields=[ledger_pb2.CatalogField(name=c.name, type=c.kind.value,
                                            description=c.description)
                    for c in dataset.columns],
            lookup_keys=keys,
            shapes=[SHAPE.QUERY_SHAPE_SUBJECT, SHAPE.QUERY_SHAPE_SUBJECT_SET]))
    for view in views_of(agency).values():
        out.append(ledger_pb2.CatalogEntry(
            dataset=view.name, description=view.description,
            fields=[ledger_pb2.CatalogField(name=c.name, type=c.type,
                                            description=c.description)
                    for c in view.columns],
            lookup_keys=[c.name for c in view.columns if c.type in ("uscc", "person_id")],
            shapes=[SHAPE.QUERY_SHAPE_AGGREGATE, SHAPE.QUERY_SHAPE_SUBJECT_SET]))
    return out
