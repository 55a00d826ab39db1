"""`exchange playbooks`: list, show and register an agency's playbooks, and run them."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Any

import click

from exchange.cli.output import console, emit_json, table
from exchange.cli.status_cmd import connect, json_option, node_options
from exchange.client import Signer, load_genesis
from exchange.errors import MalformedInput
from exchange.v1 import ledger_pb2


def _playbook(spec: str, agency: str):  # type: ignore[no-untyped-def]
    """A playbook by file path, or by id among the agency's playbook files."""
    from exchange.cases.playbooks import load_playbook, load_playbooks

    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_playbook(path)
    for playbook in load_playbooks(agency):
        if playbook.id == spec:
            return playbook
    raise MalformedInput(f"{agency} has no playbook {spec!r} in agents/{agency}/playbooks")


@click.group("playbooks")
def playbooks() -> None:
    """Playbooks: what an agency does automatically with its findings."""


@playbooks.command("list")
@click.option("--agency", default="", help="Only this owner's playbooks.")
@node_options
@json_option
def playbooks_list(agency: str, profile_option: str | None, timeout_s: float,
                   as_json: bool) -> None:
    """The local playbook files, whether each is registered, and the registered ones."""
    from agents import AGENCIES
    from exchange.cases.playbooks import load_playbooks

    _, client = connect(profile_option, timeout_s)
    with client:
        registered = client.list_playbooks(agency).playbooks
    local = [p for a in ([agency] if agency else AGENCIES) for p in load_playbooks(a)]
    digests = {bytes(p.digest) for p in registered}
    rows: list[dict[str, Any]] = [{"owner": p.owner, "playbook": p.id, "version": p.version,
             "rules": list(p.trigger.rules), "open_cases": p.trigger.open_cases,
             "steps": len(p.steps), "digest": p.digest_hex, "registered": p.digest in digests}
            for p in local]
    if as_json:
        emit_json({"playbooks": rows, "registered": [
            {"owner": p.owner_agency, "playbook": p.playbook_id, "version": p.version,
             "digest": bytes(p.digest).hex(), "height": p.height} for p in registered]})
        return
    table("playbooks", ["owner", "playbook", "version", "trigger", "steps", "digest",
                        "registered"],
          [[r["owner"], r["playbook"], r["version"],
            ", ".join(r["rules"]) + (" + open cases" if r["open_cases"] else ""), r["steps"],
            str(r["digest"])[:16], "yes" if r["registered"] else "no"] for r in rows])


@playbooks.command("show")
@click.argument("playbook")
@click.option("--agency", default="", help="Owner whose playbook files to look in.")
@node_options
@json_option
def playbooks_show(playbook: str, agency: str, profile_option: str | None,
                   timeout_s: float, as_json: bool) -> None:
    """A playbook file's trigger and steps, digest and canonical bytes."""
    from exchange.cases.playbooks import describe_steps

    if not agency and Path(playbook).suffix not in (".yaml", ".yml"):
        from exchange.client import load_client_profile, resolve_profile_path

        agency = load_client_profile(resolve_profile_path(profile_option)).agency
    p = _playbook(playbook, agency)
    if as_json:
        emit_json({"playbook": p.id, "version": p.version, "owner": p.owner,
                   "digest": p.digest_hex, "canonical": json.loads(p.canonical_bytes)})
        return
    console.print(f"{p.id} version {p.version} ({p.owner}) digest {p.digest_hex}")
    console.print(p.description)
    t = p.trigger
    console.print("trigger: " + ", ".join(
        [f"findings of {', '.join(t.rules)}" if t.rules else "",
         "any new finding on a subject of an open case" if t.open_cases else "",
         f"severity {t.severity_min} or higher" if t.severity_min else "",
         f"amount at least {t.amount_min} CNY" if t.amount_min is not None else ""]
    ).strip(", ").replace(", ,", ","))
    for line in describe_steps(p):
        console.print("  " + line)


@playbooks.command("register")
@click.argument("playbook")
@node_options
@json_option
def playbooks_register(playbook: str, profile_option: str | None, timeout_s: float,
                       as_json: bool) -> None:
    """Put a playbook's canonical bytes and digest on the ledger (sign with a
    supervisor's profile of the owner agency)."""
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        _, _, genesis = load_genesis(profile_path)
        p = _playbook(playbook, client.profile.agency)
        if p.owner != client.profile.agency:
            raise MalformedInput(f"playbook {p.id} is {p.owner}'s, the profile "
                                 f"{client.profile.agency}'s")
        signer = Signer.load(client.profile, genesis.chain_id)
        envelope = signer.make_envelope(lambda body: body.playbook_registration.CopyFrom(
            ledger_pb2.PlaybookRegistration(playbook_id=p.id, version=p.version,
                                            digest=p.digest, canonical=p.canonical_bytes)))
        result = client.submit(envelope, wait=True)
    if result.result != "OK":
        raise MalformedInput(f"registration of {p.id} judged {result.result} (already "
                             "registered, or not signed by a supervisor of its owner)")
    if as_json:
        emit_json({"playbook": p.id, "digest": p.digest_hex, "height": result.height})
    else:
        console.print(f"{p.id} version {p.version} registered at height {result.height} "
                      f"(digest {p.digest_hex})")


@playbooks.command("run")
@click.option("--playbook", "chosen", multiple=True,
              help="Only this playbook (repeatable; default: every one of the agency).")
@click.option("--spool", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The runner's spool (default: var/playbooks/<agency>.db).")
@click.option("--follow-ups-per-finding", "per_finding", type=click.IntRange(0, 64),
              default=8, show_default=True, help="At most this many follow-up queries per "
                                                 "finding.")
@click.option("--follow-ups-per-hour", "per_hour", type=click.IntRange(1, 100_000),
              default=500, show_default=True, help="At most this many follow-ups an hour "
                                                   "to each agency.")
@click.option("--workers", type=click.IntRange(1, 32), default=4, show_default=True)
@click.option("--rounds", type=click.IntRange(0, 1_000_000), default=1, show_default=True,
              help="Rounds to run (0: until stopped).")
@click.option("--interval", "interval_s", type=click.FloatRange(0.1, 3600.0), default=5.0,
              show_default=True, help="Seconds between rounds.")
@node_options
@json_option
def playbooks_run(chosen: tuple[str, ...], spool: Path | None, per_finding: int,
                  per_hour: int, workers: int, rounds: int, interval_s: float,
                  profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Run the agency's registered playbooks on the findings it may read, each finding
    once per playbook version (use the agency's automation profile). `exchange jobs
    serve` does the same after its rules."""
    import signal

    import structlog

    from exchange.cases.playbooks import load_playbooks

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    from exchange.cases.runner import PlaybookRunner, PlaybookSettings

    profile_path, client = connect(profile_option, max(timeout_s, 60.0), retry_s=30.0)
    with client:
        _, _, genesis = load_genesis(profile_path)
        signer = Signer.load(client.profile, genesis.chain_id)
        loaded = load_playbooks(signer.agency)
        if chosen:
            missing = set(chosen) - {p.id for p in loaded}
            if missing:
                raise MalformedInput(f"{signer.agency} has no playbook(s) "
                                     f"{', '.join(sorted(missing))}")
            loaded = [p for p in loaded if p.id in chosen]
        settings = PlaybookSettings(
            spool=spool or Path("var/playbooks") / f"{signer.agency}.db",
            follow_ups_per_finding_max=per_finding, follow_ups_per_hour_per_agency=per_hour,
            workers=workers)
        progress = None if as_json or not sys.stdout.isatty() else (
            lambda msg: console.print(f"  {msg}"))
        runner = PlaybookRunner(client, signer, genesis, loaded, settings, progress)
        stopping = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stopping.set())
        signal.signal(signal.SIGINT, lambda *_: stopping.set())
        done = 0
        try:
            while not stopping.is_set():
                report = runner.one_round(stopping)
                out: dict[str, Any] = report.as_dict()
                if as_json:
                    click.echo(json.dumps(out, sort_keys=True))
                else:
                    console.print(
                        f"round {done + 1}: {report.jobs} jobs, {report.finished} finished, "
                        f"{report.deferred} deferred, {report.failed} failed; steps "
                        f"{dict(report.steps) or '-'}; refused {report.refused}; skipped "
                        f"{dict(report.skipped) or '-'}; cases {len(report.cases)}")
                done += 1
                if rounds and done >= rounds:
                    break
                stopping.wait(interval_s)
        finally:
            runner.close()
