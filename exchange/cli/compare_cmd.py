"""`exchange rules`, `exchange compare` and `exchange findings`: registering rules, running
them on the network, replaying a run, and listing findings."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from exchange.cli.output import console, emit_json, fmt_ms, table
from exchange.cli.status_cmd import connect, emit_json_line, json_option, node_options
from exchange.client import Signer, load_genesis
from exchange.errors import MalformedInput
from exchange.ids import resolve_tx_id
from exchange.v1 import ledger_pb2, node_pb2


def _rule(spec: str, agency: str):  # type: ignore[no-untyped-def]
    """A rule by file path, or by id among the agency's rule files."""
    from exchange.compare.rule_file import load_rule, load_rules

    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return load_rule(path)
    for rule in load_rules(agency):
        if rule.id == spec:
            return rule
    raise MalformedInput(f"{agency} has no rule {spec!r} in agents/{agency}/rules")


def rule_limit_options(fn: Any) -> Any:
    """--time-limit-s, --memory-limit-mib, --threads: the limits of a rule's run (the
    jobs runner takes them from its config's [rule_limits])."""
    from exchange.compare import duck

    fn = click.option("--threads", type=click.IntRange(1, duck.THREADS_MAX),
                      default=duck.THREADS_DEFAULT, show_default=True,
                      help="DuckDB threads for the rule's SQL.")(fn)
    fn = click.option("--memory-limit-mib", type=click.IntRange(
        duck.MEMORY_LIMIT_MIB_MIN, duck.MEMORY_LIMIT_MIB_MAX),
        default=duck.MEMORY_LIMIT_MIB_DEFAULT, show_default=True,
        help="DuckDB's memory limit for the run, inputs included.")(fn)
    return click.option("--time-limit-s", type=click.FloatRange(
        0, duck.TIME_LIMIT_S_MAX, min_open=True), default=duck.TIME_LIMIT_S_DEFAULT,
        show_default=True, help="Wall-clock limit of the rule's SQL.")(fn)


def _limits(time_limit_s: float, memory_limit_mib: int, threads: int) -> Any:
    from exchange.compare.duck import RuleLimits

    return RuleLimits(time_s=time_limit_s, memory_mib=memory_limit_mib, threads=threads)


@click.group("rules")
def rules() -> None:
    """Comparison rules: list the local files and the registered ones, register one."""


@rules.command("list")
@click.option("--agency", default="", help="Only this owner's rules.")
@node_options
@json_option
def rules_list(agency: str, profile_option: str | None, timeout_s: float,
               as_json: bool) -> None:
    """The rules registered on the ledger, and the local rule files beside them."""
    from exchange.compare.rule_file import load_rules

    _, client = connect(profile_option, timeout_s)
    with client:
        registered = client.list_rules(agency).rules
    local = [r for a in ([agency] if agency else ["tax", "police", "customs", "pboc"])
             for r in load_rules(a)]
    digests = {bytes(r.digest) for r in registered}
    rows = [{"owner": r.owner, "rule": r.id, "version": r.version, "severity": r.severity,
             "digest": r.digest_hex, "registered": r.digest in digests} for r in local]
    if as_json:
        emit_json({"rules": rows, "registered": [
            {"owner": r.owner_agency, "rule": r.rule_id, "version": r.version,
             "digest": bytes(r.digest).hex(), "height": r.height} for r in registered]})
        return
    table("rules", ["owner", "rule", "version", "severity", "digest", "registered"],
          [[r["owner"], r["rule"], r["version"], r["severity"], str(r["digest"])[:16],
            "yes" if r["registered"] else "no"] for r in rows])


@rules.command("show")
@click.argument("rule")
@click.option("--agency", default="", help="Owner whose rule files to look in.")
@node_options
@json_option
def rules_show(rule: str, agency: str, profile_option: str | None,
               timeout_s: float, as_json: bool) -> None:
    """A rule file's parsed content, digest and canonical bytes."""
    import json

    profile_path, client = connect(profile_option, timeout_s)
    client.close()
    r = _rule(rule, agency or client.profile.agency)
    if as_json:
        emit_json({"rule": r.id, "version": r.version, "owner": r.owner,
                   "severity": r.severity, "digest": r.digest_hex,
                   "description": r.description,
                   "canonical": json.loads(r.canonical_bytes)})
        return
    console.print(f"{r.id} version {r.version} ({r.owner}, {r.severity}) digest {r.digest_hex}")
    console.print(r.description)
    click.echo(r.canonical_bytes.decode())


@rules.command("register")
@click.argument("rule")
@node_options
@json_option
def rules_register(rule: str, profile_option: str | None, timeout_s: float,
                   as_json: bool) -> None:
    """Put a rule's canonical bytes and digest on the ledger (sign with a supervisor's
    profile of the owner agency)."""
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        _, _, genesis = load_genesis(profile_path)
        r = _rule(rule, client.profile.agency)
        if r.owner != client.profile.agency:
            raise MalformedInput(f"rule {r.id} is {r.owner}'s, the profile {client.profile.agency}'s")
        signer = Signer.load(client.profile, genesis.chain_id)
        envelope = signer.make_envelope(lambda body: body.rule_registration.CopyFrom(
            ledger_pb2.RuleRegistration(rule_id=r.id, version=r.version, digest=r.digest,
                                        canonical=r.canonical_bytes)))
        result = client.submit(envelope, wait=True)
    if result.result != "OK":
        raise MalformedInput(f"registration of {r.id} judged {result.result} (already "
                             "registered, or not signed by a supervisor of its owner)")
    if as_json:
        emit_json({"rule": r.id, "digest": r.digest_hex, "height": result.height})
    else:
        console.print(f"{r.id} version {r.version} registered at height {result.height} "
                      f"(digest {r.digest_hex})")


@click.group("compare")
def compare() -> None:
    """Run a rule on the network, or replay a run from the ledger."""


@compare.command("run")
@click.argument("rule")
@click.argument("more_rules", nargs=-1)
@click.option("--period", default=None, help="Month YYYY-MM (for period-bound rules).")
@click.option("--subjects-per-query", "subjects_per_query", type=int, default=None,
              help="Subjects one query of a subject set names; more subjects make more "
                   "queries (default 20,000).")
@click.option("--findings-chunk-bytes", type=int, default=None,
              help="Output bytes a findings transaction carries inline; a larger output "
                   "goes in chunk transactions of this size (default 393,216).")
@click.option("--spool-dir", type=click.Path(file_okay=False, path_type=Path),
              default=None, help="Where answers are spooled while they stream in "
                                 "(default: the system's temporary folder).")
@click.option("--rule-runs-concurrent-max", "rule_runs_concurrent_max",
              type=click.IntRange(1, 16), default=2,
              help="With several rules: how many run at once (default 2).")
@rule_limit_options
@node_options
@json_option
def compare_run(rule: str, more_rules: tuple[str, ...], period: str | None,
                subjects_per_query: int | None,
                findings_chunk_bytes: int | None, spool_dir: Path | None,
                rule_runs_concurrent_max: int,
                time_limit_s: float, memory_limit_mib: int, threads: int,
                profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Ask the rule's queries (and its owner's own inputs), run its SQL and commit the
    findings. Use the owner's automation profile. Every answer streams into the run's
    DuckDB chunk by chunk, so no input is held whole in memory. With several rules, an
    input asked whole that two or more of them read alike is asked once for all of them,
    and up to --rule-runs-concurrent-max of them run at once."""
    from exchange.compare.network import NetworkRun, RunBounds

    bounds = RunBounds.with_overrides(subjects_per_query_max=subjects_per_query,
                                      findings_chunk_bytes=findings_chunk_bytes,
                                      spool_dir=spool_dir)
    if more_rules:
        _compare_run_several((rule, *more_rules), period, bounds,
                             _limits(time_limit_s, memory_limit_mib, threads),
                             rule_runs_concurrent_max, profile_option, timeout_s, as_json)
        return

    profile_path, client = connect(profile_option, max(timeout_s, 60.0))
    with client:
        _, _, genesis = load_genesis(profile_path)
        r = _rule(rule, client.profile.agency)
        signer = Signer.load(client.profile, genesis.chain_id)
        params = {"period": period} if period else {}
        steps = len(r.own) + len(r.queries) + 1  # each input, then the SQL
        limits = _limits(time_limit_s, memory_limit_mib, threads)
        if as_json or not sys.stdout.isatty():
            progress = None if as_json else (lambda msg: console.print(f"  {msg}"))
            result = NetworkRun(client, signer, genesis, r, progress, bounds,
                                limits).run(params)
        else:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(),
                          TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                          console=console) as bar:
                task = bar.add_task(f"{r.id}: asking", total=steps)

                def advance(msg: str) -> None:
                    bar.update(task, advance=1, description=f"{r.id}: {msg}")
                    console.print(f"  {msg}")

                result = NetworkRun(client, signer, genesis, r, advance, bounds,
                                    limits).run(params)
    out = _run_dict(result)
    if as_json:
        emit_json(out)
        return
    console.print(f"{result.rule_id} {result.period or '(no period)'}: "
                  f"{len(result.output.rows)} findings from {result.rows_in} input rows "
                  f"({len(result.input_tx_ids)} queries), committed at height "
                  f"{result.height} as {result.findings_tx_id.hex()} in "
                  f"{result.seconds:.1f} s")
    if result.output.rows:
        columns = list(result.output.rows[0])
        table("findings", columns, [[row.get(c, "") for c in columns]
                                    for row in result.output.rows[:100]])


def _run_dict(result: Any) -> dict[str, Any]:
    """A committed run (exchange.compare.network.RunResult) as plain data."""
    return {"rule": result.rule_id, "period": result.period,
            "findings_tx": result.findings_tx_id.hex(), "height": result.height,
            "result": result.result, "findings": len(result.output.rows),
            "output_digest": result.output.digest.hex(), "inputs": len(result.input_tx_ids),
            "input_txs": [t.hex() for t in result.input_tx_ids],
            "rows_in": result.rows_in, "seconds": round(result.seconds, 2),
            "answer_chunks": result.answer_chunks, "findings_chunks": result.findings_chunks,
            "supersedes": [t.hex() for t in result.superseded],
            "subjects": [row["subject"] for row in result.output.rows]}


def _compare_run_several(specs: tuple[str, ...], period: str | None, bounds: Any,
                         limits: Any, concurrent_max: int, profile_option: str | None,
                         timeout_s: float, as_json: bool) -> None:
    """`compare run A B ...`: the rules' shared inputs committed once, the runs side by
    side; every run is tried, and the command fails if any did."""
    import concurrent.futures as cf

    from exchange.compare.network import QUERY_DEADLINE_S, NetworkRun
    from exchange.compare.own_inputs import SharedOwnInputs, planned_run
    from exchange.errors import ExchangeError

    profile_path, client = connect(profile_option, max(timeout_s, 60.0))
    with client:
        _, _, genesis = load_genesis(profile_path)
        signer = Signer.load(client.profile, genesis.chain_id)
        rules = [_rule(spec, client.profile.agency) for spec in specs]
        if len({r.id for r in rules}) != len(rules):
            raise MalformedInput("a rule is named twice")
        params = [{"period": period} if period and r.period_bound else {} for r in rules]
        say = None if as_json else (lambda msg: console.print(f"  {msg}"))
        shared = SharedOwnInputs(client, signer, genesis, QUERY_DEADLINE_S,
                                 progress=say).commit(
            [planned_run(r, p) for r, p in zip(rules, params, strict=True)])

        def one(i: int) -> dict[str, Any]:
            try:
                result = NetworkRun(client, signer, genesis, rules[i], say, bounds,
                                    limits).run(params[i], own_inputs=shared[i])
            except ExchangeError as exc:
                return {"rule": rules[i].id, "error": str(exc)}
            return _run_dict(result)

        with cf.ThreadPoolExecutor(concurrent_max) as pool:
            outs = list(pool.map(one, range(len(rules))))
    if as_json:
        emit_json({"runs": outs})
    else:
        for out in outs:
            console.print(f"{out['rule']}: " + (f"failed: {out['error']}" if "error" in out
                          else f"{out['findings']} findings, committed at height "
                               f"{out['height']} as {out['findings_tx']} in "
                               f"{out['seconds']:.1f} s"))
    failed = [o["rule"] for o in outs if "error" in o]
    if failed:
        raise MalformedInput(f"rule run(s) failed: {', '.join(failed)}")


@compare.command("replay")
@click.argument("run_tx")
@rule_limit_options
@node_options
@json_option
def compare_replay(run_tx: str, time_limit_s: float, memory_limit_mib: int, threads: int,
                   profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Re-run a findings run from the ledger and check its output digest."""
    from exchange.compare.network import replay

    _, client = connect(profile_option, max(timeout_s, 60.0))
    with client:
        run_id = resolve_tx_id(run_tx, client, "findings run")
        run, output = replay(client, run_id, _limits(time_limit_s, memory_limit_mib, threads))
    if as_json:
        emit_json({"run": run_id.hex(), "rule": run.rule_id, "period": run.period,
                   "output_digest": output.digest.hex(), "matches": True,
                   "findings": len(output.rows)})
    else:
        console.print(f"replayed {run.rule_id} {run.period}: {len(output.rows)} findings, "
                      f"output digest {output.digest.hex()} matches the ledger")


@click.group("findings", invoke_without_command=True)
@click.option("--rule", "rule_id", default="", help="Only this rule's runs.")
@click.option("--period", default="")
@click.option("--agency", default="", help="Only this owner's runs.")
@click.option("--severity", default="", help="Only findings of this severity.")
@click.option("--subject", default="", help="Only findings about this uscc or person_id "
                                            "(those your agency may read).")
@click.option("--open", "open_", is_flag=True,
              help="Show subjects and amounts where your agency may read them.")
@click.option("--all-runs", is_flag=True, help="Superseded runs too.")
@node_options
@json_option
@click.pass_context
def findings(ctx: click.Context, rule_id: str, period: str, agency: str, severity: str,
             subject: str, open_: bool, all_runs: bool, profile_option: str | None,
             timeout_s: float, as_json: bool) -> None:
    """Findings on the ledger: per run, each finding's id and severity in clear; its
    subject and amounts are sealed to the owner and the agencies whose data it used,
    whose analysts see them with --open (or --subject). `findings open` turns one into
    a case."""
    import json

    if ctx.invoked_subcommand is not None:
        return
    _, client = connect(profile_option, timeout_s)
    with client:
        listing = client.list_findings(node_pb2.ListFindingsRequest(
            owner_agency=agency, rule_id=rule_id, period=period, all_runs=all_runs,
            open=open_ or bool(subject), subject=subject))
    rows: list[dict[str, Any]] = []
    for run in listing.runs:
        opened = {int(i): json.loads(line) for i, line in zip(run.line_index, run.lines,
                                                               strict=True)}
        for index, f in enumerate(run.findings):
            if severity and f.severity != severity:
                continue
            if subject and index not in opened:
                continue
            row: dict[str, Any] = {
                "finding": f.finding_id, "severity": f.severity, "rule": run.rule_id,
                "period": run.period, "owner": run.owner_agency,
                "run": bytes(run.tx_id).hex(), "height": run.height, "time_ms": run.time_ms,
                "superseded_by": bytes(run.superseded_by).hex()}
            if index in opened:
                row["subject"] = opened[index].get("subject")
                row["amount"] = opened[index].get("amount")
                row["detail"] = opened[index]
            elif open_:
                row["subject"] = "(sealed)"
            rows.append(row)
    if as_json:
        emit_json({"height": listing.height, "findings": rows,
                   "runs": len(listing.runs)})
        return
    show_subjects = open_ or bool(subject)
    table(f"findings at height {listing.height}",
          ["finding", "severity", "owner"] + (["subject", "amount"] if show_subjects else [])
          + ["height", "time", "run"],
          [[r["finding"], r["severity"], r["owner"]]
           + ([r.get("subject", ""), r.get("amount", "")] if show_subjects else [])
           + [r["height"], fmt_ms(r["time_ms"]), str(r["run"])[:16]] for r in rows])


@findings.command("open")
@click.argument("finding_id")
@click.option("--case", "case_id", required=True, help="The case to open (or add it to).")
@click.option("--run", "run_tx", default="", help="The findings run (default: the run in "
                                                   "force that holds FINDING_ID).")
@click.option("--reason", default="", help="Why (on the ledger).")
@node_options
@json_option
def findings_open(finding_id: str, case_id: str, run_tx: str, reason: str,
                  profile_option: str | None, timeout_s: float, as_json: bool) -> None:
    """Turn a finding into a case (or add it to an open one), so that later queries
    (`exchange query --case`) and evidence can refer to it."""
    profile_path, client = connect(profile_option, timeout_s)
    with client:
        _, _, genesis = load_genesis(profile_path)
        run_id = resolve_tx_id(run_tx, client, "findings run") if run_tx else b""
        runs = client.list_findings(node_pb2.ListFindingsRequest(all_runs=bool(run_tx))).runs
        chosen = [r for r in runs if any(f.finding_id == finding_id for f in r.findings)
                  and (not run_id or bytes(r.tx_id) == run_id)]
        if not chosen:
            raise MalformedInput(f"no finding {finding_id!r}"
                                 + (f" in run {run_tx}" if run_tx else " in force"))
        run = chosen[-1]
        signer = Signer.load(client.profile, genesis.chain_id)
        results = []
        for action in ("open", "add"):
            event = ledger_pb2.CaseEvent(case_id=case_id, action=action,
                                         ref_tx_id=bytes(run.tx_id), finding_id=finding_id,
                                         reason=reason)

            def fill(body: ledger_pb2.TxBody, e: ledger_pb2.CaseEvent = event) -> None:
                body.case_event.CopyFrom(e)

            envelope = signer.make_envelope(fill)
            result = client.submit(envelope, wait=True)
            results.append((action, result))
            if result.result == "OK":
                break
    action, result = results[-1]
    if result.result != "OK":
        raise MalformedInput(f"case event judged {result.result} (the case is closed, or "
                             f"{client.profile.agency} neither owns the finding nor gave "
                             "data to it)")
    if as_json:
        emit_json({"case": case_id, "action": action, "finding": finding_id,
                   "run": bytes(run.tx_id).hex(), "height": result.height})
    else:
        verb = "opened with" if action == "open" else "now also holds"
        console.print(f"case {case_id} {verb} finding {finding_id} at height "
                      f"{result.height}")


@click.group("jobs")
def jobs() -> None:
    """The agency's runner of its comparison rules."""


@jobs.command("serve")
@click.option("--config", "config_path", type=click.Path(path_type=Path, exists=True,
                                                         dir_okay=False), required=True,
              help="Jobs config (TOML): profile, rules, periods, interval_s, agency_store.")
@click.option("--rounds", type=click.IntRange(0, 1_000_000), default=0,
              help="Stop after this many rounds (0: run until stopped).")
@click.option("--rule-runs-concurrent-max", "rule_runs_concurrent_max",
              type=click.IntRange(1, 16), default=None,
              help="Rule runs of a round side by side (default: the config's "
                   "rule_runs_concurrent_max, else 2).")
@json_option
def jobs_serve(config_path: Path, rounds: int, rule_runs_concurrent_max: int | None,
               as_json: bool) -> None:
    """Run the agency's rules every interval: each rule version and period once, again
    only when the agency's own data was loaded anew; picks up after a restart from what
    the ledger holds. Then its playbooks. One line per round (a JSON line with --json);
    the logs go to stderr."""
    import structlog

    from exchange.cases.runner import playbooks_for_jobs
    from exchange.compare.jobs import JobsConfig, RoundReport, Runner

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))
    config = JobsConfig.load(config_path)
    if rule_runs_concurrent_max is not None:
        config = dataclasses.replace(config, rule_runs_concurrent_max=rule_runs_concurrent_max)
    status = None
    if sys.stdout.isatty() and not as_json:
        from rich.status import Status

        status = Status("starting", console=console)
        status.start()
    runner = Runner(config, progress=(lambda msg: status.update(msg)) if status else None,
                    base=config_path.parent, playbooks=playbooks_for_jobs)
    done = [0]

    def show(report: RoundReport) -> None:
        done[0] += 1
        out = round_dict(done[0], report)
        if as_json:
            emit_json_line(out)
        else:
            console.print(round_line(out))

    try:
        runner.serve(rounds, on_round=show)
    finally:
        if status is not None:
            status.stop()
        runner.close()


def round_dict(number: int, report: Any) -> dict[str, Any]:
    """One round of `jobs serve` as plain data."""
    return {"round": number,
            "ran": [{"rule": r, "period": p, "findings": n} for r, p, n in report.ran],
            "skipped": report.skipped,
            "failed": [{"rule": r, "period": p, "error": e} for r, p, e in report.failed],
            "playbooks": report.playbooks.as_dict() if report.playbooks is not None else None}


def round_line(out: dict[str, Any]) -> str:
    findings = sum(r["findings"] for r in out["ran"])
    line = (f"round {out['round']}: {len(out['ran'])} rule runs ({findings} findings), "
            f"{out['skipped']} already run, {len(out['failed'])} failed")
    for failed in out["failed"]:
        line += f"\n  failed: {failed['rule']} {failed['period']}: {failed['error']}"
    playbooks = out["playbooks"]
    if playbooks is not None:
        line += (f"; playbooks: {playbooks['finished']} of {playbooks['jobs']} findings "
                 f"done, {sum(playbooks['steps'].values())} steps, "
                 f"{len(playbooks['cases'])} cases")
    return line
