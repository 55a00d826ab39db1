"""`exchange check perf`: is this network fast enough? As etcdctl's `check perf`, it puts
a known load on the running network through the profile's node and says PASS or FAIL.

The load is closed-loop (each client keeps one 1 KiB probe transaction, signed by the
profile's analyst key, in flight at a time, as etcd's benchmark counts); a transaction
counts when the node answers that its block committed with it judged OK. The levels
(exchange.client.loadgen.LOAD_LEVELS) say how many clients, for how long, and what throughput and
p99 latency the network must reach; the README's "Checking performance" lists them.
"""

from __future__ import annotations

import sys

import click

from exchange.cli.output import emit_json
from exchange.cli.status_cmd import connect, json_option, node_options
from exchange.client import Signer, chain_id_for
from exchange.client.loadgen import (
    ENVELOPE_BYTES,
    LOAD_LEVELS,
    LoadLevel,
    LoadResult,
    judge,
    run_load,
)
from exchange.errors import MalformedInput, NodeError, NodeTimeout, NodeUnavailable, WrongChain

EXIT_FAIL = 1
EXIT_INTERRUPTED = 130
CLIENTS_MAX = 1024
DURATION_S_MIN = 1.0
DURATION_S_MAX = 3600.0
DURATION_S_DEFAULT = 10.0  # for --clients without a level
LOAD_DEFAULT = "s"


@click.group("check")
def check() -> None:
    """Check the running network (as etcdctl check does)."""


def report_dict(result: LoadResult, level: LoadLevel | None, reasons: list[str],
                node: dict[str, object]) -> dict[str, object]:
    """The JSON report: the measured figures, the level's limits, PASS or FAIL and why."""
    return {
        "load": level.name if level is not None else "custom",
        "clients": result.clients,
        "duration_s": result.duration_s,
        "envelope_bytes": ENVELOPE_BYTES,
        "committed": result.committed,
        "errors": result.errors,
        "throttled": result.throttled,
        "tx_per_s": result.tx_per_s,
        "latency_p50_ms": result.latency_p50_ms,
        "latency_p99_ms": result.latency_p99_ms,
        "latency_max_ms": result.latency_max_ms,
        "limits": None if level is None else {
            "tx_per_s_min": level.tx_per_s_min,
            "latency_p99_ms_max": level.latency_p99_ms_max},
        "pass": not reasons,
        "reasons": reasons,
        "error_samples": result.error_samples,
        "node": node,
    }


def _verdict_lines(result: LoadResult, level: LoadLevel | None) -> list[str]:
    """One PASS/FAIL line per criterion, as etcdctl prints them."""
    lines: list[str] = []
    if level is not None:
        ok = result.tx_per_s >= level.tx_per_s_min
        lines.append(f"{'PASS' if ok else 'FAIL'}: throughput {result.tx_per_s:g} tx/s "
                     f"(load {level.name}: at least {level.tx_per_s_min:g})")
        ok = result.latency_p99_ms <= level.latency_p99_ms_max
        lines.append(f"{'PASS' if ok else 'FAIL'}: p99 latency {result.latency_p99_ms:g} ms "
                     f"(load {level.name}: at most {level.latency_p99_ms_max:g})")
    lines.append(f"{'PASS' if result.committed else 'FAIL'}: {result.committed} committed")
    lines.append("PASS: no errors" if not result.errors else
                 f"FAIL: {result.errors} errors: " + "; ".join(result.error_samples))
    if result.throttled:
        lines.append(f"note: {result.throttled} submissions were over the network's "
                     "admission rate limit (RATE_LIMITED) and were sent again after the "
                     "wait the node named; the throughput is what the limit allows one "
                     "signer")
    return lines


def _finish(result: LoadResult, level: LoadLevel | None, reasons: list[str],
            node: dict[str, object], as_json: bool) -> None:
    if as_json:
        emit_json(report_dict(result, level, reasons, node))
    elif result.committed or result.errors:
        click.echo(f"{result.committed} committed in {result.duration_s:g} s: "
                   f"{result.tx_per_s:g} tx/s; latency p50 {result.latency_p50_ms:g} ms, "
                   f"p99 {result.latency_p99_ms:g} ms, max {result.latency_max_ms:g} ms")
        for line in _verdict_lines(result, level):
            click.echo(line)
    if reasons:
        click.echo("FAIL: " + "; ".join(reasons), err=True)
        sys.exit(EXIT_FAIL)
    if not as_json:
        click.echo("PASS")


@check.command("perf")
@node_options
@click.option("--load", "load_name", type=click.Choice(list(LOAD_LEVELS)), default=None,
              help=f"Load level: s, m or l (default {LOAD_DEFAULT}); see the README for "
                   "each level's clients, duration and limits.")
@click.option("--clients", type=click.IntRange(1, CLIENTS_MAX), default=None,
              help="Run this many closed-loop clients instead of a level; then PASS "
                   "means only: something committed, nothing failed.")
@click.option("--duration-s", "duration_s", type=click.FloatRange(DURATION_S_MIN,
                                                                   DURATION_S_MAX),
              default=None, help="How long the load runs, in seconds (default: the "
                                 f"level's; {DURATION_S_DEFAULT:g} with --clients).")
@json_option
def perf(profile_option: str | None, timeout_s: float, load_name: str | None,
         clients: int | None, duration_s: float | None, as_json: bool) -> None:
    """Put a closed-loop load of 1 KiB transactions, signed by the profile's analyst, on
    the network through the profile's node; report committed tx/s and p50, p99 and max
    latency, and PASS or FAIL for the level (exit code 0 on PASS, 1 on FAIL)."""
    if load_name is not None and clients is not None:
        raise MalformedInput("give --load or --clients, not both")
    level = None if clients is not None else LOAD_LEVELS[load_name or LOAD_DEFAULT]
    count = clients if clients is not None else level.clients if level else 0
    duration = duration_s if duration_s is not None else \
        level.duration_s if level is not None else DURATION_S_DEFAULT
    assert count >= 1 and duration > 0
    profile_path, client = connect(profile_option, timeout_s)
    node: dict[str, object] = {"address": client.address}
    nothing = LoadResult(clients=count, duration_s=duration, committed=0, errors=0,
                         tx_per_s=0.0, latency_p50_ms=0.0, latency_p99_ms=0.0,
                         latency_max_ms=0.0)
    with client:
        try:
            st = client.status()
        except (NodeUnavailable, NodeTimeout, NodeError) as exc:
            _finish(nothing, level, [str(exc)], node, as_json)
            return
        node.update(agency=st.agency, role=st.role, term=st.term, leader=st.leader)
        if not st.leader:
            _finish(nothing, level, [f"node {st.agency} at {client.address} knows no leader "
                                     f"(it is {st.role} in term {st.term})"], node, as_json)
            return
        chain_id = chain_id_for(profile_path, client)
        if chain_id != st.chain_id:
            raise WrongChain(f"profile {profile_path} is for chain {chain_id!r}, the node at "
                             f"{client.address} serves {st.chain_id!r}")
        signer = Signer.load(client.profile, chain_id)  # the key opens and is certified
    if not as_json:
        follows = "" if st.role == "leader" else f" of {st.leader}"
        click.echo(f"load {level.name if level else 'custom'}: {count} closed-loop clients "
                   f"for {duration:g} s, {ENVELOPE_BYTES}-byte transactions signed by "
                   f"{signer.agency}/{signer.subject}, through node {st.agency} at "
                   f"{client.address} ({st.role}{follows})")
    try:
        result = run_load([profile_path], count, duration, chain_id=chain_id)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    _finish(result, level, judge(result, level), node, as_json)
