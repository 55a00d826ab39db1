"""`exchange jobs serve`: an agency's long-running runner of its rules.

Each round it takes the agency's rule files, the periods it is told to cover, and what
the ledger already holds: a (rule version, period) whose findings are on the ledger is
not run again, unless the owner's own data was loaded anew since that run (the agency
store's load log changed), in which case the new run supersedes the old one. Because
the ledger is the record of what ran, a restarted runner picks up where it stopped; the
only local state is the load-log fingerprint each run saw (`state_file`).

Config (TOML):

    profile = "deploy/local/tax/analysts/automation.toml"
    rules = ["export-rebate-without-exports"]   # default: every rule of the agency
    rules_dir = "rules"                         # default: agents/<agency>/rules
    periods = ["2026-08", "2026-09"]            # or: recent_months = 3
    interval_s = 60                             # between rounds
    agency_store = "deploy/local/tax/data/agency.db"   # optional: watch its load log
    state_file = "var/jobs/tax.json"

After the rules, each round runs the agency's registered playbooks (exchange.cases.runner,
which the caller passes in as `playbooks`)
on the findings it may read:

    playbooks = ["revenue-inflows-follow-up"]   # default: every playbook of the agency
    follow_ups_per_finding_max = 8              # N: follow-up queries per finding
    follow_ups_per_hour_per_agency = 500        # M: follow-ups per hour to each agency
    playbook_workers = 4                        # findings worked on side by side
    playbook_spool = "var/jobs/tax.playbooks.db"  # default: beside state_file
    run_playbooks = true

The round's rule runs go side by side, at most `rule_runs_concurrent_max` at once (default
2); an own input that several of them read alike (same dataset, period, fields) is
committed once, on behalf of all of them (exchange.compare.own_inputs; its envelope is
kept in the state file until every run it serves has committed, so a restarted runner
reuses it rather than committing it again):

    rule_runs_concurrent_max = 2

Every run of a rule (and of a playbook's rule step) is bounded; a run over a limit fails
naming it, commits nothing, and the runner goes on with the other rules:

    [rule_limits]
    time_s = 60          # wall clock of the rule's SQL
    memory_mib = 1024    # DuckDB's memory limit, the input tables included
    threads = 1          # DuckDB threads (order-sensitive SQL always runs on one)
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime as dt
import hashlib
import json
import signal
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog

from exchange.compare.duck import RuleLimits
from exchange.errors import ExchangeError, MalformedInput
from exchange.v1 import node_pb2

log = structlog.get_logger("exchange.jobs")
INTERVAL_S_MIN = 1.0
# Rule runs of one round side by side: the machine's two cores (each run's DuckDB and the
# answers it streams); a run mostly waits for its answers.
RULE_RUNS_CONCURRENT_MAX_DEFAULT = 2
RULE_RUNS_CONCURRENT_MAX_LIMIT = 16


@dataclass(frozen=True)
class JobsConfig:
    profile: Path
    rules: tuple[str, ...] = ()
    rules_dir: Path | None = None
    periods: tuple[str, ...] = ()
    recent_months: int = 0
    interval_s: float = 60.0
    agency_store: str = ""
    state_file: Path | None = None
    playbooks: tuple[str, ...] = ()
    run_playbooks: bool = True
    follow_ups_per_finding_max: int = 8
    follow_ups_per_hour_per_agency: int = 500
    playbook_workers: int = 4
    playbook_spool: Path | None = None
    # bounds of each rule run (exchange.compare.network.RunBounds; 0 / None: default)
    subjects_per_query_max: int = 0
    findings_chunk_bytes: int = 0
    spool_dir: Path | None = None
    rule_limits: RuleLimits = field(default_factory=RuleLimits)
    rule_runs_concurrent_max: int = RULE_RUNS_CONCURRENT_MAX_DEFAULT

    @classmethod
    def load(cls, path: Path) -> JobsConfig:
        """The jobs config in the TOML file at `path`, every key checked."""
        try:
            doc = _JobsDoc(path, tomllib.loads(path.read_text(encoding="utf-8")))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MalformedInput(f"{path}: {exc}") from exc
        interval = doc.get("interval_s", 60)
        if not isinstance(interval, int | float) or interval < INTERVAL_S_MIN:
            raise doc.error(f"interval_s is a number >= {INTERVAL_S_MIN}")
        months = doc.get("recent_months", 0)
        if not isinstance(months, int) or not 0 <= months <= 24:
            raise doc.error("recent_months is 0..24")
        store = doc.get("agency_store", "")
        if not isinstance(store, str):
            raise doc.error("agency_store is a path or URL")
        if store and "://" not in store:
            store = str(doc.path("agency_store"))
        run_playbooks = doc.get("run_playbooks", True)
        if not isinstance(run_playbooks, bool):
            raise doc.error("run_playbooks is true or false")
        return cls(profile=doc.path("profile"), rules=doc.strings("rules"),
                   rules_dir=doc.optional_path("rules_dir"),
                   periods=doc.strings("periods"), recent_months=months,
                   interval_s=float(interval), agency_store=store,
                   state_file=doc.optional_path("state_file"),
                   playbooks=doc.strings("playbooks"), run_playbooks=run_playbooks,
                   follow_ups_per_finding_max=doc.bounded("follow_ups_per_finding_max", 8,
                                                          0, 64),
                   follow_ups_per_hour_per_agency=doc.bounded(
                       "follow_ups_per_hour_per_agency", 500, 1, 100_000),
                   playbook_workers=doc.bounded("playbook_workers", 4, 1, 32),
                   playbook_spool=doc.optional_path("playbook_spool"),
                   subjects_per_query_max=doc.bounded("subjects_per_query_max", 0, 0,
                                                      100_000),
                   findings_chunk_bytes=doc.bounded("findings_chunk_bytes", 0, 0,
                                                    512 * 1024),
                   spool_dir=doc.optional_path("spool_dir"),
                   rule_limits=doc.rule_limits(),
                   rule_runs_concurrent_max=doc.bounded(
                       "rule_runs_concurrent_max", RULE_RUNS_CONCURRENT_MAX_DEFAULT, 1,
                       RULE_RUNS_CONCURRENT_MAX_LIMIT))

    def run_bounds(self) -> Any:
        """The bounds of each rule run (exchange.compare.network.RunBounds)."""
        from exchange.compare.network import RunBounds

        return RunBounds.with_overrides(
            subjects_per_query_max=self.subjects_per_query_max or None,
            findings_chunk_bytes=self.findings_chunk_bytes or None, spool_dir=self.spool_dir)

    def spool_path(self, base: Path, agency: str) -> Path:
        """Where the playbook runner keeps its spool: as configured, else beside the state
        file, else in `base`."""
        if self.playbook_spool is not None:
            return self.playbook_spool
        if self.state_file is not None:
            return self.state_file.with_suffix(".playbooks.db")
        return base / f"playbooks-{agency}.db"

    def wanted_periods(self, today: dt.date | None = None) -> list[str]:
        periods = list(self.periods)
        if self.recent_months:
            day = today or dt.datetime.now(dt.UTC).date()
            year, month = day.year, day.month
            for _ in range(self.recent_months):
                month -= 1
                if month == 0:
                    year, month = year - 1, 12
                periods.append(f"{year:04d}-{month:02d}")
        return sorted(set(periods))


class _JobsDoc:
    """A jobs config file's keys, read with the checks every kind of value needs; a
    problem names the file."""

    KNOWN = frozenset({
        "profile", "rules", "periods", "recent_months", "interval_s", "agency_store",
        "state_file", "playbooks", "run_playbooks", "follow_ups_per_finding_max",
        "follow_ups_per_hour_per_agency", "playbook_workers", "playbook_spool",
        "subjects_per_query_max", "findings_chunk_bytes", "spool_dir", "rule_limits",
        "rules_dir", "rule_runs_concurrent_max"})

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.file = path
        self.doc = doc
        unknown = sorted(set(doc) - self.KNOWN)
        if unknown:
            raise self.error(f"unknown key(s) {', '.join(unknown)}")
        if "profile" not in doc:
            raise self.error("key 'profile' is required")

    def error(self, message: str) -> MalformedInput:
        return MalformedInput(f"{self.file}: {message}")

    def get(self, key: str, default: object) -> Any:
        return self.doc.get(key, default)

    def path(self, key: str) -> Path:
        """A path, relative to the config's folder unless absolute."""
        value = self.doc[key]
        if not isinstance(value, str) or not value:
            raise self.error(f"{key} is a path")
        p = Path(value)
        return p if p.is_absolute() else self.file.parent / p

    def optional_path(self, key: str) -> Path | None:
        return self.path(key) if key in self.doc else None

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.doc.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(f"{key} is a list of strings")
        return tuple(value)

    def bounded(self, key: str, default: int, low: int, high: int) -> int:
        value = self.doc.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.error(f"{key} is an integer {low}..{high}")
        return value

    def rule_limits(self) -> RuleLimits:
        limits = self.doc.get("rule_limits", {})
        if not isinstance(limits, dict):
            raise self.error("rule_limits is a table (time_s, memory_mib, threads)")
        unknown = sorted(set(limits) - {"time_s", "memory_mib", "threads"})
        if unknown:
            raise self.error(f"rule_limits: unknown key(s) {', '.join(unknown)}")
        try:
            return RuleLimits(**limits)
        except (TypeError, ValueError) as exc:
            raise self.error(f"rule_limits: {exc}") from None


class PlaybookRounds(Protocol):
    """What a jobs round needs of the playbook runner (exchange.cases.runner)."""

    def one_round(self, stopping: threading.Event) -> Any: ...

    def close(self) -> None: ...


# Builds the playbook runner of a jobs Runner (None: the agency has no playbook to run).
PlaybooksFor = Callable[["Runner", Path], PlaybookRounds | None]


@dataclass
class RoundReport:
    ran: list[tuple[str, str, int]] = field(default_factory=list)  # rule, period, findings
    skipped: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)
    playbooks: Any = None  # exchange.cases.runner.RoundReport, when playbooks ran


def load_log_fingerprint(agency: str, location: str) -> str:
    """A digest of the agency store's load log: changes whenever data is loaded."""
    if not location:
        return ""
    import agents

    store: Any = agents.open_agency_store(agency, location)
    try:
        rows = store.fetch("SELECT * FROM load_log ORDER BY 1", {})
    except Exception:  # noqa: BLE001 - no load yet: nothing to watch
        rows = []
    finally:
        store.close()
    return hashlib.sha256(repr(rows).encode()).hexdigest()


class Runner:
    """Runs the configured rules, round after round."""

    def __init__(self, config: JobsConfig, progress: Callable[[str], None] | None = None,
                 base: Path | None = None, playbooks: PlaybooksFor | None = None) -> None:
        """`playbooks` builds the round's playbook runner (exchange.cases.runner's
        `playbooks_for_jobs`, passed in by the caller, since cases builds on compare);
        without it, or with run_playbooks false, a round runs the rules only."""
        from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis

        self.config = config
        self.client = ExchangeClient(load_client_profile(config.profile), deadline_s=60.0,
                                     retry_unavailable_s=30.0)
        _, _, self.genesis = load_genesis(config.profile)
        self.signer = Signer.load(self.client.profile, self.genesis.chain_id)
        self.agency = self.signer.agency
        self.progress = progress
        self.stopping = threading.Event()
        self._state: dict[str, str] = {}
        self._state_lock = threading.RLock()  # runs save it from worker threads
        if config.state_file is not None and config.state_file.exists():
            self._state = json.loads(config.state_file.read_text())
        self.playbook_runner: PlaybookRounds | None = None
        if config.run_playbooks and playbooks is not None:
            self.playbook_runner = playbooks(self, base or config.profile.parent)

    def close(self) -> None:
        if self.playbook_runner is not None:
            self.playbook_runner.close()
        self.client.close()

    def _save_state(self) -> None:
        if self.config.state_file is None:
            return
        self.config.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, sort_keys=True))
        tmp.replace(self.config.state_file)

    def rules(self) -> list[Any]:
        from exchange.compare.rule_file import load_rules

        rules = load_rules(self.agency, self.config.rules_dir)
        if self.config.rules:
            missing = set(self.config.rules) - {r.id for r in rules}
            if missing:
                raise MalformedInput(f"{self.agency} has no rule(s) {', '.join(sorted(missing))}")
            rules = [r for r in rules if r.id in self.config.rules]
        return rules

    def one_round(self) -> RoundReport:
        report = RoundReport()
        fingerprint = load_log_fingerprint(self.agency, self.config.agency_store)
        runs = self.client.list_findings(node_pb2.ListFindingsRequest(
            owner_agency=self.agency)).runs
        done = {(bytes(r.rule_digest), r.period) for r in runs if not r.case_id}
        todo: list[tuple[Any, str]] = []
        for rule in self.rules():
            periods = self.config.wanted_periods() if rule.period_bound else [""]
            for period in periods:
                key = f"{rule.digest_hex}/{period}"
                if (rule.digest, period) in done:
                    if key not in self._state:  # run before this runner kept state
                        self._state[key] = fingerprint
                        self._save_state()
                    if self._state[key] == fingerprint:
                        report.skipped += 1
                        continue
                    # the owner's data was loaded anew since: a new run supersedes
                todo.append((rule, period))
        if self.stopping.is_set():
            return report
        try:
            shared = self._shared_inputs(todo, fingerprint)
        except ExchangeError as exc:
            log.warning("shared own inputs not committed", error=str(exc))
            report.failed += [(rule.id, period, str(exc)) for rule, period in todo]
            return report
        with cf.ThreadPoolExecutor(self.config.rule_runs_concurrent_max,
                                   thread_name_prefix="rule-run") as pool:
            futures = [pool.submit(self._run_one, rule, period, own, fingerprint)
                       for (rule, period), own in zip(todo, shared, strict=True)]
            for (rule, period), future in zip(todo, futures, strict=True):
                outcome = future.result()
                if isinstance(outcome, str):
                    report.failed.append((rule.id, period, outcome))
                elif outcome is not None:
                    report.ran.append((rule.id, period, outcome))
        if self.playbook_runner is not None and not self.stopping.is_set():
            try:
                report.playbooks = self.playbook_runner.one_round(self.stopping)
            except ExchangeError as exc:
                log.warning("playbooks not run this round", error=str(exc))
            else:
                log.info("playbooks round", **report.playbooks.as_dict())
        return report

    def _shared_inputs(self, todo: list[tuple[Any, str]],
                       fingerprint: str) -> list[dict[str, bytes]]:
        """For each run to do, its own inputs committed once for several runs."""
        from exchange.compare.network import QUERY_DEADLINE_S
        from exchange.compare.own_inputs import SharedOwnInputs, planned_run

        planned = [planned_run(rule, {"period": period} if period else {})
                   for rule, period in todo]
        with self._state_lock:
            return SharedOwnInputs(self.client, self.signer, self.genesis, QUERY_DEADLINE_S,
                                   self._state, self._save_state, fingerprint,
                                   self.progress).commit(planned)

    def _run_one(self, rule: Any, period: str, own_inputs: dict[str, bytes],
                 fingerprint: str) -> int | str | None:
        """One rule run (on a worker thread): its findings count, or why it failed (None:
        stopping)."""
        from exchange.compare.network import NetworkRun

        if self.stopping.is_set():
            return None
        try:
            result = NetworkRun(self.client, self.signer, self.genesis, rule,
                                self.progress, self.config.run_bounds(),
                                self.config.rule_limits).run(
                {"period": period} if period else {}, own_inputs=own_inputs)
        except ExchangeError as exc:
            log.warning("rule run failed", rule=rule.id, period=period, error=str(exc))
            return str(exc)
        with self._state_lock:
            self._state[f"{rule.digest_hex}/{period}"] = fingerprint
            self._save_state()
        log.info("rule run", rule=rule.id, period=period, findings=len(result.output.rows),
                 tx=result.findings_tx_id.hex(), seconds=round(result.seconds, 2))
        return len(result.output.rows)

    def serve(self, rounds: int = 0,
              on_round: Callable[[RoundReport], None] | None = None) -> None:
        """Run rounds every interval until stopped (SIGTERM/SIGINT) or `rounds` done;
        `on_round` is told each round's report (the CLI prints it)."""
        def stop(*_: object) -> None:
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        done = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            report = self.one_round()
            log.info("round done", ran=len(report.ran), skipped=report.skipped,
                     failed=len(report.failed))
            if on_round is not None:
                on_round(report)
            done += 1
            if rounds and done >= rounds:
                return
            self.stopping.wait(max(0.0, self.config.interval_s - (time.monotonic() - started)))
