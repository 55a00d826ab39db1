"""`exchange catalog`: what each agency offers, as published on the ledger."""

from __future__ import annotations

import click
from google.protobuf.json_format import MessageToDict

from exchange.cli.output import console, emit_json, table
from exchange.cli.status_cmd import connect, json_option, node_options
from exchange.v1 import ledger_pb2


@click.command("catalog")
@click.option("--agency", default="", help="Only this agency's entries.")
@click.option("--fields", "show_fields", is_flag=True, help="List every field too.")
@node_options
@json_option
def catalog(agency: str, show_fields: bool, profile_option: str | None, timeout_s: float,
            as_json: bool) -> None:
    """List the datasets and views the agencies publish, and what a subject can be
    looked up by."""
    _, client = connect(profile_option, timeout_s)
    with client:
        listing = client.list_catalog(agency)
    if as_json:
        emit_json({"height": listing.height,
                   "entries": [{"agency": p.agency,
                                **MessageToDict(p.entry, preserving_proto_field_name=True)}
                               for p in listing.entries]})
        return
    shape = ledger_pb2.QueryShape
    table(f"catalog at height {listing.height}",
          ["agency", "dataset", "look up by", "shapes", "fields", "description"],
          [[p.agency, p.entry.dataset, ", ".join(p.entry.lookup_keys),
            ",".join(shape.Name(s).removeprefix("QUERY_SHAPE_").lower()
                     for s in p.entry.shapes),
            len(p.entry.fields), p.entry.description] for p in listing.entries])
    if show_fields:
        for p in listing.entries:
            table(f"{p.agency}/{p.entry.dataset}", ["field", "type", "description"],
                  [[f.name, f.type, f.description] for f in p.entry.fields])
    console.print(f"{len(listing.entries)} entries")
