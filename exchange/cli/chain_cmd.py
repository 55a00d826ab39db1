"""`exchange chain ...`: checking the ledger."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from exchange.cli.output import console, emit_json, table
from exchange.ledger.store import BlockStore
from exchange.ledger.verify import verify_store


@click.group()
def chain() -> None:
    """Inspect and verify the block chain."""


@chain.command("verify")
@click.option("--store", "store_path", type=click.Path(path_type=Path), required=True,
              help="Path of a node's block store (SQLite).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_cmd(store_path: Path, as_json: bool) -> None:
    """Check every block: hash chain, Merkle roots, proposer and envelope signatures,
    signers' credentials against genesis, result codes and attestations."""
    with BlockStore.open(store_path) as store:
        report = verify_store(store)
    if as_json:
        emit_json(report.as_dict())
    else:
        table(f"chain {report.chain_id}", ["blocks", "transactions", "invalid (marked)",
                                           "attestations", "final height", "members"],
              [[report.height, report.transactions, report.invalid_transactions,
                report.attestations, report.final_height, ", ".join(report.members)]])
        if report.ok:
            console.print(f"[green]OK[/green]: {report.height} blocks verified")
    if not report.ok:
        click.echo(f"error: chain invalid at height {report.bad_height}: {report.error}",
                   err=True)
        sys.exit(1)
