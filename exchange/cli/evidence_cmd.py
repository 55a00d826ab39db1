"""`exchange evidence ...`: exporting and verifying evidence bundles."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.errors import MalformedInput
from exchange.ids import resolve_tx_id
from exchange.ledger.evidence import BundleInvalid, add_case_statements, build_bundle, encode_bundle
from exchange.ledger.evidence_verify import verify_bundle
from exchange.ledger.store import BlockStore


@click.group()
def evidence() -> None:
    """Evidence bundles a third party can verify offline."""


@evidence.command("export")
@click.option("--store", "store_path", type=click.Path(path_type=Path), required=True,
              help="Path of a node's block store.")
@click.option("--tx", "tx_ids", multiple=True, help="Transaction id (hex); repeatable.")
@click.option("--case", "case_id", default="",
              help="Everything about a case: its events, the findings that opened or "
                   "joined it with their rules, queries and answers, and every query "
                   "naming it with its answer or refusal.")
@click.option("--with-inputs", is_flag=True,
              help="With --case: also every chunk of the answers its findings' runs read "
                   "(a month of a register at city scale), for a reader who replays the "
                   "runs offline. Without it, each input is its manifest, which commits to "
                   "its chunks.")
@click.option("--reveal-with", "reveal_key", type=click.Path(path_type=Path, exists=True,
                                                             dir_okay=False),
              default=None, help="Your agency's data key: add the plaintext of every "
                                 "payload it opens (your answers, findings, requests), "
                                 "which the verifier checks against the committed digests. "
                                 "The rotated-out data keys kept beside it (data.retired/) "
                                 "open what was sealed before a rotation.")
@click.option("--passphrase-env", default=None,
              help="Environment variable holding the data key's passphrase.")
@click.option("--profile", "profile_option", default=None,
              help="With --case: ask this profile's node for a quorum of members' signed "
                   "statements of the case, so the verifier can check the bundle holds "
                   "every transaction of it.")
@click.option("--out", type=click.Path(path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON.")
def export_cmd(store_path: Path, tx_ids: tuple[str, ...], case_id: str, with_inputs: bool,
               reveal_key: Path | None, passphrase_env: str | None,
               profile_option: str | None, out: Path, as_json: bool) -> None:
    """Bundle transactions with their proofs, headers, attestations and credentials."""
    import os

    from exchange.identity.keys import read_data_keyring
    from exchange.ledger.case_export import case_tx_ids, reveals_for

    if not tx_ids and not case_id:
        raise click.UsageError("give --case or at least one --tx")
    if case_id and profile_option is not None:
        # a case id's beginning, resolved by the node the statements are asked of
        from exchange.cli.case_cmd import resolve_case_id
        from exchange.cli.status_cmd import connect
        from exchange.errors import UnknownId

        _, client = connect(profile_option, 30.0)
        with client, contextlib.suppress(UnknownId):
            case_id = resolve_case_id(client, case_id)
    with_statements = bool(case_id) and profile_option is not None
    with BlockStore.open(store_path) as store:
        ids = [resolve_tx_id(t, store) for t in tx_ids]
        # statements are asked as of this height (taken before the case is read, so the
        # case's transactions up to it are all bundled), with the keys the members sign
        # with today (after any rotation): headers and key history run to it
        through = store.height if with_statements else 0
        if case_id:
            ids = list(dict.fromkeys(case_tx_ids(store, case_id, with_inputs) + ids))
        reveals = []
        if reveal_key is not None:
            passphrase = None
            if passphrase_env:
                value = os.environ.get(passphrase_env)
                if value is None:
                    raise MalformedInput(f"${passphrase_env} is not set")
                passphrase = value.encode()
            reveals = reveals_for(store, ids, read_data_keyring(reveal_key, passphrase))
        bundle = build_bundle(store, ids, reveals, through_height=through)
        if with_statements:
            from exchange.cli.status_cmd import connect

            _, client = connect(profile_option, 30.0)
            with client:
                stated = client.case_statements(case_id, len(bundle.headers))
            add_case_statements(bundle, stated.statements)
        data = encode_bundle(bundle)
    verify_bundle(data)  # never hand out what would not verify
    out.write_bytes(data)
    if as_json:
        emit_json({"out": str(out), "bytes": len(data), "transactions": len(ids),
                   "tx_ids": [t.hex() for t in ids], "reveals": len(reveals),
                   "case": case_id or None,
                   "case_statements": len(bundle.case_statements)})
        return
    console.print(f"wrote {out} ({len(data):,} bytes, {len(ids)} transactions"
                  + (f", {len(reveals)} reveals" if reveals else "")
                  + (", completeness stated by a quorum" if len(bundle.case_statements)
                     else "")
                  + (f", case {case_id}" if case_id else "") + ")")


@evidence.command("verify")
@click.argument("file", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def verify_cmd(file: Path, as_json: bool) -> None:
    """Verify a bundle offline: no node, no network, only the genesis keys it carries."""
    try:
        report = verify_bundle(file.read_bytes())
    except BundleInvalid as exc:
        if as_json:
            emit_json({"ok": False, "where": exc.where, "error": str(exc)})
        click.echo(f"error: evidence invalid: {exc}", err=True)
        sys.exit(1)
    if as_json:
        emit_json({"ok": True, **report.as_dict()})
        return
    console.print(f"chain [bold]{report.chain_id}[/bold]; members {', '.join(report.members)}; "
                  f"quorum {report.quorum}; {report.headers} headers linked to genesis")
    table("transactions", ["height.idx", "tx", "kind", "signer", "created", "result",
                           "attested by", "revealed"],
          [[f"{t.height}.{t.index}", t.tx_id[:16], t.kind, t.signer, fmt_ms(t.created_at_ms),
            t.result, ",".join(t.attested_by), "yes" if t.revealed else ""]
           for t in report.transactions])
    console.print(f"[green]OK[/green]: {len(report.transactions)} transactions verified, "
                  f"{report.reveals} reveals checked")
    if report.case is not None:
        console.print(f"[green]complete[/green]: case {report.case['case_id']} has exactly "
                      f"these {report.case['count']} transactions up to height "
                      f"{report.case['height']}, as "
                      f"{', '.join(report.case['stated_by'])} state")  # type: ignore[arg-type]
