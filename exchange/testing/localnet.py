"""A local network of real node processes: `exchange init` into a folder on free ports,
then one `exchange node` process per agency. Used by the tests and by `make bench`.

It stops exactly the processes it started (SIGTERM, then SIGKILL after a grace period),
also when the caller fails; each node's output goes to <root>/logs/<agency>.log so a
failure can show what the nodes said.

    with Cluster(tmp_path, agencies=4) as cluster:   # started, a leader elected
        cluster.cli("submit-probe", agency="police")
        cluster.kill(cluster.leader())
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from exchange.client import ExchangeClient, load_client_profile
from exchange.errors import ExchangeError
from exchange.identity.config import RAFT_PORT_OFFSET
from exchange.identity.network import DEFAULT_AGENCIES, METRICS_PORT_OFFSET, PORT_STRIDE
from exchange.v1 import node_pb2

READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.2
STATUS_DEADLINE_S = 2.0
PORT_RANGE = (20_000, 60_000)
PORT_ATTEMPTS_MAX = 200
CLI_TIMEOUT_S = 120.0
LOG_TAIL_LINES = 40
LIVE_ROLES = ("leader", "follower")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_base_port(agencies: int, rng: random.Random | None = None) -> int:
    """A base port such that every port `exchange init --base-port` will assign to
    `agencies` nodes (gRPC, metrics and the Raft link) is free now."""
    r = rng or random.Random()
    span = PORT_STRIDE * agencies
    for _ in range(PORT_ATTEMPTS_MAX):
        base = r.randrange(PORT_RANGE[0], PORT_RANGE[1] - span)
        ports = [base + PORT_STRIDE * i + off for i in range(agencies)
                 for off in (0, METRICS_PORT_OFFSET, RAFT_PORT_OFFSET)]
        if all(_port_free(p) for p in ports):
            return base
    raise RuntimeError(f"no free block of {span} ports found")


def agency_names(agencies: int | Sequence[str]) -> tuple[str, ...]:
    if not isinstance(agencies, int):
        return tuple(agencies)
    assert 1 <= agencies <= 64
    extra = tuple(f"member{i}" for i in range(len(DEFAULT_AGENCIES) + 1, agencies + 1))
    return (DEFAULT_AGENCIES + extra)[:agencies]


class Cluster:
    """N real node processes of one freshly initialised network under `root`."""

    def __init__(self, root: Path, agencies: int | Sequence[str] = 4,
                 python: str = sys.executable) -> None:
        self.root = root
        self.net = root / "net"
        self.log_dir = root / "logs"
        self.agencies = agency_names(agencies)
        self.python = python
        self.base_port = 0
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, BinaryIO] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.pop("EXCHANGE_PROFILE", None)

    # -- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> Cluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def init(self) -> None:
        """`exchange init` into root/net on free ports."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.base_port = free_base_port(len(self.agencies))
        result = self.run_exchange("init", "--out", str(self.net), "--agencies",
                                   ",".join(self.agencies), "--base-port",
                                   str(self.base_port), "--json")
        if result.returncode != 0:
            raise RuntimeError(f"exchange init failed: {result.stderr.strip()}")

    def load_sample(self, seed: int, companies: int) -> Path:
        """Generate sample data into root/data and load each agency's part into its
        node's store, through the CLI as a user does (before or after `start`)."""
        data = self.root / "data"
        steps: list[tuple[str, ...]] = [("data", "generate", "--seed", str(seed),
                                         "--companies", str(companies), "--out", str(data))]
        steps += [("data", "load", "--config", str(self.node_config(a)), str(data / a))
                  for a in self.agencies]
        for args in steps:
            result = self.run_exchange(*args)
            if result.returncode != 0:
                raise RuntimeError(f"exchange {' '.join(args[:2])} failed: "
                                   f"{result.stderr.strip()}")
        return data

    def prepare_joiner(self, agency: str) -> Path:
        """An agency that is not in genesis, made as on its own machine (`exchange agency
        init` on a free port, then `agency configure --join`): its node follows the chain
        once started and becomes a member when a membership change adds it. Returns its
        membership request."""
        from exchange.identity.ceremony import read_settings

        chain_id = read_settings(self.net / self.agencies[0]).chain_id
        port = free_base_port(1)
        for args in (("agency", "init", "--agency", agency, "--host", "127.0.0.1",
                      "--port", str(port), "--chain-id", chain_id,
                      "--out", str(self.net / agency)),
                     ("agency", "configure", "--agency-dir", str(self.net / agency),
                      "--genesis", str(self.net / "genesis.pb"), "--join")):
            result = self.run_exchange(*args)
            if result.returncode != 0:
                raise RuntimeError(f"exchange {' '.join(args[:2])} failed: "
                                   f"{result.stderr.strip()}")
        self.agencies = (*self.agencies, agency)
        return self.net / agency / "request.pb"

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Init (once), start every node, wait for a leader all of them follow."""
        if not (self.net / "genesis.pb").exists():
            self.init()
        for agency in self.agencies:
            self.start_node(agency)
        self.wait_ready(timeout_s)

    def start_node(self, agency: str, env: Mapping[str, str] | None = None) -> None:
        """Start one node, with `env` added to its environment (e.g. libfaketime's)."""
        assert agency in self.agencies, agency
        proc = self.procs.get(agency)
        assert proc is None or proc.poll() is not None, f"{agency} is already running"
        log = open(self.log_path(agency), "ab")  # noqa: SIM115 - closed in _reap
        log.write(f"=== start {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        self._logs[agency] = log
        self.procs[agency] = subprocess.Popen(
            [self.python, "-m", "exchange.cli.main", "node", "--config",
             str(self.node_config(agency))],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**self.env, **(env or {})}, cwd=self.root)

    def kill(self, agency: str, sig: int = signal.SIGKILL,
             timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Send `sig` to one node and wait for it to exit; its exit code."""
        proc = self.procs[agency]
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout_s)
        self._reap(agency)
        return proc.returncode

    def restart(self, agency: str, sig: int = signal.SIGTERM) -> None:
        """Stop the node if it runs (with `sig`), then start it again."""
        if self.running(agency):
            self.kill(agency, sig)
        self.start_node(agency)

    def stop(self) -> None:
        """Stop every node this cluster started: SIGTERM, then SIGKILL after the grace
        period. Safe to call more than once."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for agency, proc in self.procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
            self._reap(agency)

    def _reap(self, agency: str) -> None:
        log = self._logs.pop(agency, None)
        if log is not None:
            log.close()

    # -- where things are -----------------------------------------------------------------
    def node_config(self, agency: str) -> Path:
        return self.net / agency / "node.toml"

    def edit_node_config(self, agency: str, old: str, new: str) -> None:
        """Replace a line `exchange init` wrote in the agency's node config (before the
        node starts); AssertionError if the config does not hold it."""
        config = self.node_config(agency)
        text = config.read_text()
        assert old in text, f"{config} holds no {old!r}"
        config.write_text(text.replace(old, new))

    def profile(self, agency: str) -> Path:
        return self.net / agency / "profile.toml"

    def log_path(self, agency: str) -> Path:
        return self.log_dir / f"{agency}.log"

    def running(self, agency: str) -> bool:
        proc = self.procs.get(agency)
        return proc is not None and proc.poll() is None

    def live(self) -> list[str]:
        return [a for a in self.agencies if self.running(a)]

    # -- asking the nodes -----------------------------------------------------------------
    def client(self, agency: str, **kwargs: float) -> ExchangeClient:
        return ExchangeClient(load_client_profile(self.profile(agency)), **kwargs)

    def status(self, agency: str) -> node_pb2.NodeStatus | None:
        """The node's status, or None when it does not answer."""
        try:
            with self.client(agency, deadline_s=STATUS_DEADLINE_S) as c:
                return c.status()
        except ExchangeError:
            return None

    def leader(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        """The leader every running node agrees on (waiting for one)."""
        return self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S,
                   agencies: Sequence[str] | None = None) -> str:
        """Wait until every running node (or the given ones) answers as leader or
        follower of one leader, which itself says it leads; return that leader."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, str] = {}
        while True:
            names = list(agencies) if agencies is not None else self.live()
            for agency in names:
                if not self.running(agency):
                    raise RuntimeError(f"node {agency} exited "
                                       f"(code {self.procs[agency].returncode})\n"
                                       + self.log_tail(agency))
            statuses = {a: self.status(a) for a in names}
            last = {a: (f"{s.role} of term {s.term}, leader {s.leader or '-'}"
                        if s is not None else "no answer") for a, s in statuses.items()}
            leaders = {s.leader for s in statuses.values() if s is not None}
            if names and all(s is not None and s.role in LIVE_ROLES for s in statuses.values()) \
                    and len(leaders) == 1:
                leader = leaders.pop()
                leading = statuses[leader] if leader in statuses else (
                    self.status(leader) if leader in self.live() else None)
                if leader and leading is not None and leading.role == "leader":
                    return leader
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no agreed leader after {timeout_s:g} s: {last}\n"
                                   + self.logs_tail())
            time.sleep(POLL_INTERVAL_S)

    def wait_height(self, height: int, agencies: Sequence[str] | None = None,
                    timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the nodes (default: all running) hold at least `height` blocks."""
        deadline = time.monotonic() + timeout_s
        while True:
            names = list(agencies) if agencies is not None else self.live()
            heights = {a: (s.height if (s := self.status(a)) is not None else None)
                       for a in names}
            if all(h is not None and h >= height for h in heights.values()):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"height {height} not reached after {timeout_s:g} s: "
                                   f"{heights}")
            time.sleep(POLL_INTERVAL_S)

    # -- the CLI --------------------------------------------------------------------------
    def run_exchange(self, *args: str, timeout_s: float = CLI_TIMEOUT_S
                     ) -> subprocess.CompletedProcess[str]:
        """`exchange ARGS` in a subprocess, as a user runs it."""
        return subprocess.run([self.python, "-m", "exchange.cli.main", *args],
                              capture_output=True, text=True, env=self.env, cwd=self.root,
                              timeout=timeout_s, check=False)

    def cli(self, *args: str, agency: str = "tax", timeout_s: float = CLI_TIMEOUT_S
            ) -> subprocess.CompletedProcess[str]:
        """`exchange ARGS --profile <agency's profile>`."""
        return self.run_exchange(*args, "--profile", str(self.profile(agency)),
                                 timeout_s=timeout_s)

    def cli_json(self, *args: str, agency: str = "tax") -> object:
        """`exchange ARGS --json --profile ...`, which must succeed; its JSON."""
        result = self.cli(*args, "--json", agency=agency)
        if result.returncode != 0:
            raise AssertionError(f"exchange {' '.join(args)} exited {result.returncode}: "
                                 f"{result.stderr.strip()}")
        return json.loads(result.stdout)

    # -- logs -----------------------------------------------------------------------------
    def log_tail(self, agency: str, lines: int = LOG_TAIL_LINES) -> str:
        path = self.log_path(agency)
        if not path.exists():
            return f"--- {agency}: no log\n"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text) + "\n"

    def logs_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return "".join(self.log_tail(a, lines) for a in self.agencies)
