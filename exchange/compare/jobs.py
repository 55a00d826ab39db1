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
    periods = ["2026-08", "2026-09"]            # or: recent_months = 3
    interval_s = 60                             # between rounds
    agency_store = "deploy/local/tax/data/agency.db"   # optional: watch its load log
    state_file = "var/jobs/tax.json"
"""

from __future__ import annotations

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
from typing import Any

import structlog

from exchange.errors import ExchangeError, MalformedInput
from exchange.v1 import node_pb2

log = structlog.get_logger("exchange.jobs")
INTERVAL_S_MIN = 1.0


@dataclass(frozen=True)
class JobsConfig:
    profile: Path
    rules: tuple[str, ...] = ()
    periods: tuple[str, ...] = ()
    recent_months: int = 0
    interval_s: float = 60.0
    agency_store: str = ""
    state_file: Path | None = None

    @classmethod
    def load(cls, path: Path) -> JobsConfig:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise MalformedInput(f"{path}: {exc}") from exc
        known = {"profile", "rules", "periods", "recent_months", "interval_s",
                 "agency_store", "state_file"}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise MalformedInput(f"{path}: unknown key(s) {', '.join(unknown)}")
        if "profile" not in doc:
            raise MalformedInput(f"{path}: key 'profile' is required")
        base = path.parent

        def rel(value: object, key: str) -> Path:
            if not isinstance(value, str) or not value:
                raise MalformedInput(f"{path}: {key} is a path")
            p = Path(value)
            return p if p.is_absolute() else base / p

        def strings(key: str) -> tuple[str, ...]:
            value = doc.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise MalformedInput(f"{path}: {key} is a list of strings")
            return tuple(value)

        interval = doc.get("interval_s", 60)
        if not isinstance(interval, int | float) or interval < INTERVAL_S_MIN:
            raise MalformedInput(f"{path}: interval_s is a number >= {INTERVAL_S_MIN}")
        months = doc.get("recent_months", 0)
        if not isinstance(months, int) or not 0 <= months <= 24:
            raise MalformedInput(f"{path}: recent_months is 0..24")
        store = doc.get("agency_store", "")
        if not isinstance(store, str):
            raise MalformedInput(f"{path}: agency_store is a path or URL")
        if store and "://" not in store:
            store = str(rel(store, "agency_store"))
        return cls(profile=rel(doc["profile"], "profile"), rules=strings("rules"),
                   periods=strings("periods"), recent_months=months,
                   interval_s=float(interval), agency_store=store,
                   state_file=rel(doc["state_file"], "state_file")
                   if "state_file" in doc else None)

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


@dataclass
class RoundReport:
    ran: list[tuple[str, str, int]] = field(default_factory=list)  # rule, period, findings
    skipped: int = 0
    failed: list[tuple[str, str, str]] = field(default_factory=list)


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

    def __init__(self, config: JobsConfig,
                 progress: Callable[[str], None] | None = None) -> None:
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
        if config.state_file is not None and config.state_file.exists():
            self._state = json.loads(config.state_file.read_text())

    def close(self) -> None:
        self.client.close()

    def _save_state(self) -> None:
        if self.config.state_file is None:
            return
        self.config.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.config.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self._state, sort_keys=True))
        tmp.replace(self.config.state_file)

    def rules(self) -> list[Any]:
        from exchange.compare.rules import load_rules

        rules = load_rules(self.agency)
        if self.config.rules:
            missing = set(self.config.rules) - {r.id for r in rules}
            if missing:
                raise MalformedInput(f"{self.agency} has no rule(s) {', '.join(sorted(missing))}")
            rules = [r for r in rules if r.id in self.config.rules]
        return rules

    def one_round(self) -> RoundReport:
        from exchange.compare.network import NetworkRun

        report = RoundReport()
        fingerprint = load_log_fingerprint(self.agency, self.config.agency_store)
        runs = self.client.list_findings(node_pb2.ListFindingsRequest(
            owner_agency=self.agency)).runs
        done = {(bytes(r.rule_digest), r.period) for r in runs}
        for rule in self.rules():
            periods = self.config.wanted_periods() if rule.period_bound else [""]
            for period in periods:
                if self.stopping.is_set():
                    return report
                key = f"{rule.digest_hex}/{period}"
                if (rule.digest, period) in done:
                    if key not in self._state:  # run before this runner kept state
                        self._state[key] = fingerprint
                        self._save_state()
                    if self._state[key] == fingerprint:
                        report.skipped += 1
                        continue
                    # the owner's data was loaded anew since: a new run supersedes
                try:
                    result = NetworkRun(self.client, self.signer, self.genesis, rule,
                                        self.progress).run(
                        {"period": period} if period else {})
                except ExchangeError as exc:
                    log.warning("rule run failed", rule=rule.id, period=period, error=str(exc))
                    report.failed.append((rule.id, period, str(exc)))
                    continue
                self._state[key] = fingerprint
                self._save_state()
                report.ran.append((rule.id, period, len(result.output.rows)))
                log.info("rule run", rule=rule.id, period=period,
                         findings=len(result.output.rows), tx=result.findings_tx_id.hex(),
                         seconds=round(result.seconds, 2))
        return report

    def serve(self, rounds: int = 0) -> None:
        """Run rounds every interval until stopped (SIGTERM/SIGINT) or `rounds` done."""
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
            done += 1
            if rounds and done >= rounds:
                return
            self.stopping.wait(max(0.0, self.config.interval_s - (time.monotonic() - started)))
