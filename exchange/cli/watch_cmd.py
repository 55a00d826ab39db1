"""`exchange watch`: new findings and case events, and the steps of cases, as they commit."""

from __future__ import annotations

import contextlib

import click

from exchange.cases.client_events import RELEVANT, ClientEventSource, relevant
from exchange.cases.events import block_events, line_of, wanted
from exchange.cli.output import exit_on_interrupt
from exchange.cli.status_cmd import connect, emit_json_line, json_option, node_options
from exchange.client import ExchangeClient
from exchange.ledger.block import RESULT_OK, parse_header, results_root, tx_id
from exchange.v1 import ledger_pb2


@click.command("watch")
@click.option("--case", "case_id", default="", help="Only this case's events and steps.")
@click.option("--severity", type=click.Choice(["high", "medium", "low"]), default=None,
              help="Only findings of this severity or higher (other events pass).")
@click.option("--from-height", type=click.IntRange(0, None), default=0,
              help="Start at this height (default: the next block committed).")
@click.option("--until-height", type=click.IntRange(0, None), default=0,
              help="Stop after this height (default: run until interrupted).")
@click.option("--no-follow", is_flag=True,
              help="Stop at the height committed when it starts (with --from-height: "
                   "what happened so far, then exit).")
@node_options
@json_option
def watch(case_id: str, severity: str | None, from_height: int, until_height: int,
          no_follow: bool, profile_option: str | None, timeout_s: float,
          as_json: bool) -> None:
    """Stream new findings and case events (open, add, close, notify) and each step of a
    case (its queries, answers and refusals) as they commit: a line each for people,
    --json lines for programs. Subjects and amounts show where your agency may read them.
    Without --from-height it starts at the next block committed, so it prints nothing
    until something new happens; --from-height 1 shows the past first."""
    _, client = connect(profile_option, timeout_s, retry_s=10.0)
    source = ClientEventSource(client)
    with client:
        if case_id:
            from exchange.cli.case_cmd import resolve_case_id
            from exchange.errors import UnknownId

            with contextlib.suppress(UnknownId):  # a case not opened yet is watched for
                case_id = resolve_case_id(client, case_id)
        if no_follow:
            tip = client.status().height
            until_height = min(until_height, tip) if until_height else tip
            if from_height == 0 or from_height > until_height:
                return  # nothing committed in the range asked
        exit_on_interrupt()
        for block in client.follow_blocks(from_height):
            header = parse_header(block.header)
            if until_height and header.height > until_height:
                break
            _emit_block(client, source, block, header, case_id, severity or "", as_json)
            if until_height and header.height >= until_height:
                break


def _emit_block(client: ExchangeClient, source: ClientEventSource, block: ledger_pb2.Block,
                header: ledger_pb2.BlockHeader, case_id: str, severity: str,
                as_json: bool) -> None:
    count = len(block.envelopes)
    all_ok = any(bytes(a.results_root) == results_root([RESULT_OK] * count)
                 for a in block.attestations)
    transactions: list[tuple[bytes, ledger_pb2.TxBody, str]] = []
    for index, raw in enumerate(block.envelopes):
        env = ledger_pb2.Envelope.FromString(raw)
        body = ledger_pb2.TxBody.FromString(env.body)
        kind = body.WhichOneof("kind")
        if kind not in RELEVANT or not relevant(kind, body, source):
            continue
        txid = tx_id(env.body)
        if kind == "query":
            source.remember(txid, body)
        if all_ok:
            code = RESULT_OK
        else:
            info = client.get_transaction(txid)
            code = info.result if (info.height, info.index) == (header.height, index) \
                else "DUPLICATE_TX"
        transactions.append((txid, body, code))
    for event in block_events(header.height, header.timestamp_ms, transactions, source):
        if not wanted(event, case_id, severity):
            continue
        if as_json:
            emit_json_line(event.as_dict())
        else:
            click.echo(line_of(event))
