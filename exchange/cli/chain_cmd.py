"""`exchange chain ...`: checking and following the ledger."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click

from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.cli.status_cmd import connect, emit_json_line, json_option, node_options, short
from exchange.client import ExchangeClient, load_genesis, resolve_profile_path
from exchange.errors import ChainBroken, ExchangeError, WrongChain
from exchange.identity.genesis import genesis_hash
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import block_hash, parse_header
from exchange.ledger.store import BlockStore
from exchange.ledger.verify import ChainReport, verify_store
from exchange.v1 import identity_pb2

STORE_FILE = "blocks.db"


@click.group()
def chain() -> None:
    """Inspect and verify the block chain."""


def fetch_and_verify(client: ExchangeClient, signed_genesis: identity_pb2.SignedGenesis,
                     work_dir: Path) -> ChainReport:
    """Fetch blocks 1..tip from the node into a fresh store under `work_dir`, applying
    each with full verification against our own copy of genesis (the node's word is
    trusted for nothing), then verify the whole store as `--store` does."""
    status = client.status()
    store = BlockStore.create(work_dir / STORE_FILE, signed_genesis)
    with store:
        applier = LedgerApplier(store)
        if status.chain_id != applier.chain_id:
            raise WrongChain(f"node at {client.address} serves chain {status.chain_id!r}, the "
                             f"profile's genesis is {applier.chain_id!r}")
        failure: tuple[int, str] | None = None
        for height in range(1, status.height + 1):
            block = client.get_block(height)  # an unreachable node is an error, not a verdict
            try:
                header = parse_header(block.header, height)
                if header.height != height:
                    raise ChainBroken(f"height {height}: the node sent block {header.height}")
                applier.apply(block)
                applier.receive_attestations(list(block.attestations))
            except ExchangeError as exc:
                failure = (height, str(exc))
                break
            except Exception as exc:  # noqa: BLE001 - bytes from the wire must not crash us
                failure = (height, f"height {height}: unreadable: {exc}")
                break
        if failure is None and status.height and bytes(status.tip_hash) \
                and store.tip_hash != bytes(status.tip_hash):
            failure = (status.height, f"height {status.height}: the node's status names tip "
                                      f"{short(status.tip_hash)}..., its block hashes to "
                                      f"{short(store.tip_hash)}...")
        report = verify_store(store)
    if failure is not None and report.ok:
        report.ok = False
        report.bad_height, report.error = failure
    return report


def _print_report(report: ChainReport, as_json: bool, source: dict[str, str]) -> None:
    if as_json:
        emit_json({**report.as_dict(), **source})
    else:
        table(f"chain {report.chain_id}", ["blocks", "transactions", "invalid (marked)",
                                           "attestations", "final height", "members"],
              [[report.height, report.transactions, report.invalid_transactions,
                report.attestations, report.final_height, ", ".join(report.members)]])
        if report.ok:
            where = f" (fetched from {source['node']})" if "node" in source else ""
            console.print(f"[green]OK[/green]: {report.height} blocks verified{where}")
    if not report.ok:
        click.echo(f"error: chain invalid at height {report.bad_height}: {report.error}",
                   err=True)
        sys.exit(1)


@chain.command("verify")
@click.option("--store", "store_path", type=click.Path(path_type=Path), default=None,
              help="Verify a node's block store (SQLite) instead of asking a running node.")
@click.option("--genesis", "genesis_path", type=click.Path(path_type=Path, dir_okay=False),
              default=None, help="Genesis to verify against (default: the one beside the "
                                 "profile, as `exchange init` lays it out).")
@node_options
@json_option
def verify_cmd(store_path: Path | None, genesis_path: Path | None, profile_option: str | None,
               timeout_s: float, as_json: bool) -> None:
    """Check every block: hash chain, Merkle roots, proposer and envelope signatures,
    signers' credentials against genesis, result codes and attestations.

    Without --store, fetches every block from the profile's node and verifies it against
    the profile's own genesis."""
    if store_path is not None:
        with BlockStore.open(store_path) as store:
            report = verify_store(store)
        _print_report(report, as_json, {"store": str(store_path)})
        return
    profile_path = resolve_profile_path(profile_option)
    _, signed, _ = load_genesis(profile_path, genesis_path)
    _, client = connect(str(profile_path), timeout_s)
    with client, tempfile.TemporaryDirectory(prefix="exchange-verify-") as work:
        report = fetch_and_verify(client, signed, Path(work))
    _print_report(report, as_json, {"node": client.address,
                                    "genesis_hash": genesis_hash(signed).hex()})


@chain.command("follow")
@click.option("--from", "from_height", type=click.IntRange(0), default=0, show_default=True,
              help="First height to show (0: the next block committed).")
@node_options
@json_option
def follow_cmd(from_height: int, profile_option: str | None, timeout_s: float,
               as_json: bool) -> None:
    """Print each block as the node applies it: height, hash, transactions, proposer and
    time. Ctrl-C stops."""
    _, client = connect(profile_option, timeout_s)
    prev: tuple[int, bytes] | None = None
    try:
        with client:
            for block in client.follow_blocks(from_height):
                header = parse_header(block.header)
                hash_ = block_hash(block.header)
                if prev is not None and header.height == prev[0] + 1 \
                        and bytes(header.prev_hash) != prev[1]:
                    raise ChainBroken(f"height {header.height}: previous hash does not match "
                                      f"block {prev[0]} the node sent")
                prev = (header.height, hash_)
                if as_json:
                    emit_json_line({"height": header.height, "hash": hash_.hex(),
                                    "tx_count": header.tx_count, "proposer": header.proposer,
                                    "timestamp_ms": header.timestamp_ms,
                                    "attestations": len(block.attestations)})
                else:
                    click.echo(f"{header.height:>8}  {short(hash_)}  "
                               f"{header.tx_count:>5} tx  {header.proposer:<10} "
                               f"{fmt_ms(header.timestamp_ms)}")
    except KeyboardInterrupt:
        sys.exit(0)
