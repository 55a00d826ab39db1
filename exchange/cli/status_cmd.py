"""Commands that talk to a running node: `status`, `tx show`, `block show`,
`submit-probe`. Each acts as the analyst of a profile (--profile, $EXCHANGE_PROFILE or
deploy/local/tax/profile.toml) and prints a table for people or JSON with --json."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from google.protobuf import json_format
from rich.table import Table

from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.client import (
    DEADLINE_S_DEFAULT,
    ExchangeClient,
    Signer,
    TxCheck,
    attestation_valid,
    chain_id_for,
    check_transaction,
    find_genesis,
    load_client_profile,
    load_genesis,
    resolve_profile_path,
    signer_name,
)
from exchange.errors import MalformedInput, NodeError, ProofInvalid
from exchange.identity.registry import KeyRegistry
from exchange.ids import resolve_tx_id
from exchange.ledger.block import RESULT_OK, block_hash, parse_header, results_root, tx_id
from exchange.ledger.evidence_verify import summarize
from exchange.ledger.merkle import root as merkle_root
from exchange.v1 import ledger_pb2, node_pb2

F = TypeVar("F", bound=Callable[..., Any])

PROBE_COUNT_MAX = 10_000
PROBE_SIZE_BYTES_MAX = 1 << 20
# block show asks the node for each transaction's result only when the attestations do
# not already show that every one is OK; at most this many lookups per block.
RESULT_LOOKUPS_MAX = 500
HASH_PREFIX_CHARS = 16


# -- shared options and helpers -----------------------------------------------------------

def node_options(f: F) -> F:
    """--profile and --timeout, shared by every command that calls a node."""
    f = click.option("--timeout", "timeout_s", type=click.FloatRange(0.1, 3600.0),
                     default=DEADLINE_S_DEFAULT, show_default=True,
                     help="Deadline of each call to the node, in seconds.")(f)
    f = click.option("--profile", "profile_option", type=str, default=None,
                     help="Analyst profile (default: $EXCHANGE_PROFILE, else "
                          "deploy/local/tax/profile.toml).")(f)
    return f


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON (one object; JSON lines for streams).")(f)


def connect(profile_option: str | None, timeout_s: float,
            retry_s: float = 0.0) -> tuple[Path, ExchangeClient]:
    """The resolved profile path and a client for its node."""
    path = resolve_profile_path(profile_option)
    client = ExchangeClient(load_client_profile(path), deadline_s=timeout_s,
                            retry_unavailable_s=retry_s)
    return path, client


def optional_registry(profile_path: Path) -> KeyRegistry | None:
    """The key registry of the profile's genesis, when the network's genesis is at hand."""
    if find_genesis(profile_path) is None:
        return None
    _, signed, _ = load_genesis(profile_path)
    return KeyRegistry(signed)


def emit_json_line(obj: object) -> None:
    click.echo(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str))


def short(value: bytes, chars: int = HASH_PREFIX_CHARS) -> str:
    return bytes(value).hex()[:chars]


def kv_table(title: str, rows: Sequence[tuple[str, object]]) -> None:
    t = Table(title=title, title_justify="left", show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    for key, value in rows:
        t.add_row(key, str(value))
    console.print(t)


def parse_tx_id(text: str) -> bytes:
    """A full transaction id (64 hex digits); prefixes need a node: resolve_tx_id."""
    return resolve_tx_id(text, None)


# -- status -------------------------------------------------------------------------------

def status_dict(st: node_pb2.NodeStatus, address: str) -> dict[str, object]:
    return {
        "node": address,
        "agency": st.agency,
        "chain_id": st.chain_id,
        "role": st.role,
        "term": st.term,
        "leader": st.leader,
        "commit_index": st.commit_index,
        "applied_index": st.applied_index,
        "height": st.height,
        "tip_hash": bytes(st.tip_hash).hex(),
        "final_height": st.final_height,
        "mempool_size": st.mempool_size,
        "members": list(st.members),
        "quorum": st.quorum,
        "peers": [{"agency": p.agency, "address": p.address, "match_index": p.match_index,
                   "height": p.height, "reachable": p.reachable} for p in st.peers],
        "rate_limits": json_format.MessageToDict(
            st.rate_limits, preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True) if st.HasField("rate_limits") else None,
    }


@click.command("status")
@node_options
@json_option
def status(profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Show the node's Raft role, term, leader, commit and heights, and its view of the
    cluster: peers, members and quorum."""
    _, client = connect(profile_option, timeout_s)
    with client:
        st = client.status()
    if as_json:
        emit_json(status_dict(st, client.address))
        return
    table(f"node {st.agency} at {client.address} (chain {st.chain_id})",
          ["role", "term", "leader", "commit", "applied", "height", "final height", "tip",
           "mempool"],
          [[st.role, st.term, st.leader or "(none)", st.commit_index, st.applied_index,
            st.height, st.final_height, short(st.tip_hash) or "-", st.mempool_size]])
    table(f"members {', '.join(st.members)}; quorum {st.quorum}",
          ["peer", "address", "reachable", "height", "match index"],
          [[p.agency, p.address, "yes" if p.reachable else "no", p.height or "?",
            p.match_index if st.role == "leader" else "-"] for p in st.peers])
    if st.HasField("rate_limits"):
        r = st.rate_limits
        click.echo(f"rate limits per signer {_per_s(r.signer_bytes_per_s, r.signer_tx_per_s)}, "
                   f"per agency {_per_s(r.agency_bytes_per_s, r.agency_tx_per_s)}, probes "
                   + ("disabled" if r.probes_disabled
                      else _per_s(r.probe_bytes_per_s, r.probe_tx_per_s))
                   + f"; burst {r.burst_s} s")


def _per_s(bytes_per_s: int, tx_per_s: int) -> str:
    size = f"{bytes_per_s / (1 << 20):g} MiB/s" if bytes_per_s else "unlimited bytes"
    count = f"{tx_per_s:,} tx/s" if tx_per_s else "unlimited tx"
    return f"{size} and {count}"


# -- tx show ------------------------------------------------------------------------------

@click.group("tx")
def tx() -> None:
    """Transactions on the ledger."""


def tx_dict(info: node_pb2.TransactionInfo, check: TxCheck, members: int,
            quorum: int) -> dict[str, object]:
    body = check.body
    return {
        "tx_id": check.tx_id.hex(),
        "height": info.height,
        "index": info.index,
        "result": info.result,
        "kind": body.WhichOneof("kind") or "",
        "agency": body.agency,
        "signer": check.signer,
        "signer_key_id": bytes(check.envelope.signer_key_id).hex(),
        "created_at_ms": body.created_at_ms,
        "summary": summarize(body),
        "block_hash": check.block_hash.hex(),
        "block_timestamp_ms": check.header.timestamp_ms,
        "proposer": check.header.proposer,
        "attested_by": check.attested_by,
        "attested": len(check.attested_by),
        "node_attested_by": info.attested_by,
        "members": members,
        "quorum": quorum,
        "final": len(check.attested_by) >= quorum,
        "proof": {
            "ok": check.ok,
            "inclusion": check.inclusion,
            "result": check.result,
            "proposer_signature": check.proposer_signature,
            "envelope_signature": check.envelope_signature,
            "attestation_signatures_checked": check.attestation_signatures,
            "problems": check.problems,
        },
    }


def _proof_line(check: TxCheck) -> str:
    if not check.ok:
        return "FAILED: " + "; ".join(check.problems)
    parts = ["inclusion in tx_root"]
    if check.result:
        parts.append("result in attested results root")
    elif check.result is None:
        parts.append("result not yet attested")
    if check.attestation_signatures:
        parts.append("proposer and attestation signatures")
        if check.envelope_signature:
            parts.append("envelope signature")
        elif check.envelope_signature is None:
            parts.append("signer not in genesis (envelope signature not checked)")
    else:
        parts.append("signatures not checked (no genesis found)")
    return "OK (" + ", ".join(parts) + ")"


@tx.command("show")
@click.argument("tx_id_hex", metavar="ID")  # or a prefix of at least 8 hex digits
@node_options
@json_option
def tx_show(tx_id_hex: str, profile_option: str | None, timeout_s: float,
            as_json: bool) -> None:
    """Show a transaction: its decoded body, block, result and attestations, and check
    locally its inclusion proof and result proof against the block's header."""
    profile_path, client = connect(profile_option, timeout_s)
    registry = optional_registry(profile_path)
    with client:
        requested = resolve_tx_id(tx_id_hex, client)
        info = client.get_transaction(requested)
        members = len(registry.members) if registry is not None else \
            len(client.status().members)
    check = check_transaction(info, requested, registry)
    quorum = registry.quorum if registry is not None else info.quorum
    attested = len(check.attested_by)
    if as_json:
        emit_json(tx_dict(info, check, members, quorum))
    else:
        body = check.body
        summary = ", ".join(f"{k}={v}" for k, v in summarize(body).items()) or "-"
        kv_table(f"transaction {check.tx_id.hex()}", [
            ("kind", body.WhichOneof("kind") or "?"),
            ("agency", body.agency),
            ("signer", check.signer),
            ("created", fmt_ms(body.created_at_ms)),
            ("summary", summary),
            ("block", f"height {info.height}, index {info.index} "
                      f"(hash {short(check.block_hash)}..., {fmt_ms(check.header.timestamp_ms)}, "
                      f"proposer {check.header.proposer})"),
            ("result", info.result),
            ("attested", f"{attested}/{members} attested, "
                         f"{'final' if attested >= quorum else f'not final (quorum {quorum})'}"
                         f"{'' if not check.attested_by else ' (' + ', '.join(check.attested_by) + ')'}"),
            ("proof", _proof_line(check)),
        ])
    if not check.ok:
        raise ProofInvalid(f"transaction {check.tx_id.hex()[:16]}...: "
                           + "; ".join(check.problems))


# -- block show ---------------------------------------------------------------------------

@click.group("block")
def block() -> None:
    """Blocks on the ledger."""


def parse_height(text: str) -> int:
    if text.strip().lower() == "tip":
        return 0
    try:
        height = int(text)
    except ValueError as exc:
        raise MalformedInput(f"height {text!r} is not a number or 'tip'") from exc
    if height < 0:
        raise MalformedInput(f"height {height} is negative")
    return height


def block_results(client: ExchangeClient, blk: ledger_pb2.Block,
                  header: ledger_pb2.BlockHeader, hash_: bytes) -> list[str]:
    """Each transaction's result code: all "OK" when an attestation of this block signs
    exactly that, else asked of the node per transaction ("?" beyond the lookup limit)."""
    count = len(blk.envelopes)
    all_ok = results_root([RESULT_OK] * count)
    if any(bytes(a.results_root) == all_ok and bytes(a.block_hash) == hash_
           for a in blk.attestations):
        return [RESULT_OK] * count
    codes: list[str] = []
    for index, raw in enumerate(blk.envelopes):
        if index >= RESULT_LOOKUPS_MAX:
            codes.append("?")
            continue
        env = ledger_pb2.Envelope.FromString(raw)
        info = client.get_transaction(tx_id(env.body))
        if info.height == header.height and info.index == index:
            codes.append(info.result)
        else:  # the id's first occurrence is elsewhere: this one is its duplicate
            codes.append("DUPLICATE_TX")
    return codes


@block.command("show")
@click.argument("height_text", metavar="HEIGHT")
@node_options
@json_option
def block_show(height_text: str, profile_option: str | None, timeout_s: float,
               as_json: bool) -> None:
    """Show a block (HEIGHT, or 0 / tip for the latest): header, transactions with their
    results, and attestations."""
    height = parse_height(height_text)
    profile_path, client = connect(profile_option, timeout_s)
    registry = optional_registry(profile_path)
    with client:
        blk = client.get_block(height)
        header = parse_header(blk.header, height)
        hash_ = block_hash(blk.header)
        codes = block_results(client, blk, header, hash_)
    envelopes = [ledger_pb2.Envelope.FromString(raw) for raw in blk.envelopes]
    bodies = [ledger_pb2.TxBody.FromString(env.body) for env in envelopes]
    tx_root_ok = merkle_root(list(blk.envelopes)) == bytes(header.tx_root)
    quorum = registry.quorum if registry is not None else 0
    atts: list[dict[str, object]] = []
    valid_agencies: set[str] = set()
    for att in blk.attestations:
        valid = None if registry is None else (
            att.height == header.height and bytes(att.block_hash) == hash_
            and attestation_valid(registry, att))
        if valid or valid is None:
            valid_agencies.add(att.agency)
        atts.append({"agency": att.agency, "signer_key_id": bytes(att.signer_key_id).hex(),
                     "results_root": bytes(att.results_root).hex(), "valid": valid})
    results_attested = any(bytes(a.results_root) == results_root(codes) for a in blk.attestations)
    txs = [{"index": i, "tx_id": tx_id(env.body).hex(), "kind": body.WhichOneof("kind") or "",
            "agency": body.agency,
            "signer": signer_name(registry, bytes(env.signer_key_id)), "result": code}
           for i, (env, body, code) in enumerate(zip(envelopes, bodies, codes, strict=True))]
    doc: dict[str, object] = {
        "height": header.height, "hash": hash_.hex(), "chain_id": header.chain_id,
        "prev_hash": bytes(header.prev_hash).hex(), "tx_root": bytes(header.tx_root).hex(),
        "tx_root_ok": tx_root_ok, "tx_count": header.tx_count,
        "timestamp_ms": header.timestamp_ms, "proposer": header.proposer,
        "proposer_key_id": bytes(header.proposer_key_id).hex(),
        "raft_term": header.raft_term, "raft_index": header.raft_index,
        "transactions": txs, "attestations": atts, "attested": len(valid_agencies),
        "quorum": quorum, "final": bool(quorum) and len(valid_agencies) >= quorum,
        "results_attested": results_attested,
    }
    if as_json:
        emit_json(doc)
    else:
        final = ("" if not quorum else
                 ", final" if len(valid_agencies) >= quorum else f", not final (quorum {quorum})")
        kv_table(f"block {header.height}", [
            ("hash", hash_.hex()),
            ("previous", bytes(header.prev_hash).hex()),
            ("tx root", f"{bytes(header.tx_root).hex()} "
                        f"({'matches the transactions' if tx_root_ok else 'DOES NOT MATCH'})"),
            ("transactions", header.tx_count),
            ("time", fmt_ms(header.timestamp_ms)),
            ("proposer", f"{header.proposer} (key {short(header.proposer_key_id)})"),
            ("raft", f"term {header.raft_term}, index {header.raft_index}"),
            ("attested", f"{len(valid_agencies)} members{final}"),
        ])
        table("transactions", ["#", "tx", "kind", "agency", "signer", "result"],
              [[t["index"], str(t["tx_id"])[:HASH_PREFIX_CHARS], t["kind"], t["agency"],
                t["signer"], t["result"]] for t in txs])
        table("attestations", ["agency", "signer key", "results root", "signature"],
              [[a["agency"], str(a["signer_key_id"])[:HASH_PREFIX_CHARS],
                str(a["results_root"])[:HASH_PREFIX_CHARS],
                {True: "valid", False: "INVALID", None: "not checked"}[a["valid"]]]  # type: ignore[index]
               for a in atts])
    if not tx_root_ok:
        raise ProofInvalid(f"block {header.height}: the transactions do not match tx_root")


# -- submit-probe -------------------------------------------------------------------------

def _probe_row(tx: bytes, r: node_pb2.SubmitResponse, latency_ms: float) -> dict[str, object]:
    return {"tx_id": tx.hex(), "status": r.status, "height": r.height, "index": r.index,
            "result": r.result, "duplicate": r.duplicate, "error_code": r.error_code,
            "error": r.error, "latency_ms": round(latency_ms, 1),
            **({"retry_after_ms": r.retry_after_ms} if r.retry_after_ms else {})}


@click.command("submit-probe")
@node_options
@click.option("--count", type=click.IntRange(1, PROBE_COUNT_MAX), default=1, show_default=True,
              help="How many probe transactions.")
@click.option("--size", "size_bytes", type=click.IntRange(0, PROBE_SIZE_BYTES_MAX), default=64,
              show_default=True, help="Random payload bytes per probe.")
@click.option("--batch", is_flag=True, help="Send all in one SubmitBatch call.")
@click.option("--no-wait", is_flag=True, help="Return once admitted, without waiting for "
                                              "the block to commit.")
@click.option("--retry", "retry_s", type=click.FloatRange(0.0, 600.0), default=0.0,
              show_default=True, help="Keep retrying an unavailable node (no leader yet, "
                                      "restarting) for this many seconds; resubmitting the "
                                      "same envelope is safe.")
@json_option
def submit_probe(profile_option: str | None, timeout_s: float, count: int, size_bytes: int,
                 batch: bool, no_wait: bool, retry_s: float, as_json: bool) -> None:
    """Submit probe transactions (random payload, no agency data) signed by the profile's
    analyst; print each one's tx id, height, index and result."""
    profile_path, client = connect(profile_option, timeout_s, retry_s)
    rows: list[dict[str, object]] = []
    started = time.monotonic()
    with client:
        signer = Signer.load(client.profile, chain_id_for(profile_path, client))

        def probe() -> bytes:
            payload = os.urandom(size_bytes)
            return signer.make_envelope(lambda body: body.probe.CopyFrom(
                ledger_pb2.Probe(payload=payload)))

        def show(row: dict[str, object]) -> None:
            rows.append(row)
            if as_json:
                emit_json_line(row)
            elif row["error_code"]:
                click.echo(f"{row['tx_id']}  refused  {row['error_code']}: {row['error']}")
            else:
                click.echo(f"{row['tx_id']}  {row['status']:<9}  height {row['height']:<6} "
                           f"index {row['index']:<4} {row['result'] or '-':<6} "
                           f"{row['latency_ms']} ms{'  (duplicate)' if row['duplicate'] else ''}")

        if batch:
            envelopes = [probe() for _ in range(count)]
            t0 = time.monotonic()
            results = client.submit_batch(envelopes, wait=not no_wait)
            latency = (time.monotonic() - t0) * 1000
            for env, r in zip(envelopes, results, strict=True):
                show(_probe_row(tx_id(ledger_pb2.Envelope.FromString(env).body), r, latency))
        else:
            for _ in range(count):
                env = probe()
                t0 = time.monotonic()
                r = client.submit(env, wait=not no_wait)
                show(_probe_row(tx_id(ledger_pb2.Envelope.FromString(env).body), r,
                                (time.monotonic() - t0) * 1000))
    elapsed = time.monotonic() - started
    refused = [r for r in rows if r["error_code"]]
    invalid = [r for r in rows if not r["error_code"] and r["result"] not in ("", RESULT_OK)]
    if not as_json:
        done = "accepted" if no_wait else "committed"
        click.echo(f"{len(rows) - len(refused)} of {len(rows)} probes {done} in {elapsed:.2f} s "
                   f"({len(rows) / elapsed if elapsed > 0 else 0:.1f} tx/s)")
    if refused or invalid:
        what = ([f"{len(refused)} refused ({refused[0]['error_code']})"] if refused else []) + \
               ([f"{len(invalid)} judged invalid ({invalid[0]['result']})"] if invalid else [])
        raise NodeError(f"{' and '.join(what)} of {len(rows)} probes")
