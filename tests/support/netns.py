"""Each agency on its own "machine": a network namespace with its own address on a bridge.

The harness makes, for one run, a Linux bridge in the root namespace and one network
namespace per agency joined to it by a veth pair, each with its own address. The key
ceremony runs through the CLI as four agencies run it on four machines: each agency's
folder is its own, and only public files (membership requests, the draft, the root
signatures, the final genesis) pass between them through a shared "table" folder. Each
node then runs inside its namespace from the files the ceremony wrote, exactly as
deploy/ runs it: `ip netns exec NS exchange node --config DIR/node.toml`.

Faults are real: nftables rules inside a node's namespace (drop everything to and from
some peers, drop only what a node sends, random loss with `numgen random`), and signals
to a node's process (SIGSTOP / SIGCONT, SIGKILL). A node can run with its clock off
through libfaketime (`faketime -f +5m exchange node ...`).

Clients (the submitters, status checks, `exchange chain verify`) run in the root
namespace and reach every node through the bridge.

Every name carries a random tag, so parallel runs never clash; `down()` removes the
namespaces, the bridge and the node processes it started, also after a failure.

    with NetnsNetwork(tmp_path) as net:         # namespaces, ceremony, nodes, a leader
        leader = net.leader()
        net.isolate(leader)                     # nft: drop to and from the other nodes
        net.heal()

A further agency can join the running network on a machine of its own
(`add_machine`, `join_ceremony`, then a membership change approved by the members'
roots: `propose_change`, `approve_change`, `submit_change`), count as a member
(`admit`) and leave again (`retire`); the end check then also reads the chain the former
member's store holds, up to the height it left at.

Needs root, iproute2 and nftables; `missing_requirement()` names what is missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import tomli_w

from exchange.client import ExchangeClient, Signer, chain_id_for, load_client_profile
from exchange.errors import ExchangeError
from exchange.identity.config import load_node_config, read_signed_genesis
from exchange.identity.genesis import genesis_hash
from exchange.identity.network import DEFAULT_AGENCIES
from exchange.ledger.block import block_hash, parse_header, tx_id
from exchange.ledger.store import BlockStore
from exchange.v1 import ledger_pb2, node_pb2

GRPC_PORT = 7100
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
POLL_INTERVAL_S = 0.05
STATUS_DEADLINE_S = 1.0
CLI_TIMEOUT_S = 180.0
LOG_TAIL_LINES = 30
LIVE_ROLES = ("leader", "follower")
NFT_TABLE = "xfault"
SUBNET_ATTEMPTS_MAX = 100
SUBMIT_DEADLINE_S = 5.0
PROBE_PAYLOAD_BYTES = 64
BLOCK_STORE_FILE = "blocks.db"  # in the node's data_dir
COMMITTED_AT = re.compile(r"committed at height (\d+)")


def _exchange_command() -> list[str]:
    """The `exchange` entry point of this environment (.venv/bin/exchange)."""
    beside = Path(sys.executable).parent / "exchange"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "exchange.cli.main"]


def missing_requirement(faketime: bool = False) -> str | None:
    """Why the namespace network cannot run here (one line), or None when it can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth, nftables)"
    if shutil.which("ip") is None:
        return "needs the `ip` command (Debian package iproute2)"
    if shutil.which("nft") is None:
        return "needs the `nft` command (Debian package nftables)"
    if faketime and shutil.which("faketime") is None:
        return "needs the `faketime` command (Debian package faketime)"
    tag = secrets.token_hex(3)
    probe, bridge, veth = f"xprobe-{tag}", f"xbp{tag}", f"xvp{tag}"
    steps = [("a network namespace", ["ip", "netns", "add", probe]),
             ("a bridge", ["ip", "link", "add", bridge, "type", "bridge"]),
             ("a veth pair", ["ip", "link", "add", veth, "type", "veth", "peer", "name",
                              "eth0", "netns", probe])]
    try:
        for what, args in steps:
            made = subprocess.run(args, capture_output=True, text=True, check=False)
            if made.returncode != 0:
                return f"cannot create {what}: {made.stderr.strip()}"
    finally:
        for args in (["ip", "link", "del", veth], ["ip", "link", "del", bridge],
                     ["ip", "netns", "del", probe]):
            subprocess.run(args, capture_output=True, check=False)
    return None


def _run(args: Sequence[str], input_text: str | None = None) -> str:
    """Run a system command that must succeed; its stdout."""
    result = subprocess.run(list(args), input=input_text, capture_output=True, text=True,
                            check=False, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): "
                           f"{result.stderr.strip()}")
    return result.stdout


def _subnets_in_use() -> list[ipaddress.IPv4Network]:
    used: list[ipaddress.IPv4Network] = []
    for entry in json.loads(_run(["ip", "-j", "-4", "addr"]) or "[]"):
        for info in entry.get("addr_info", []):
            used.append(ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}",
                                              strict=False))
    for route in json.loads(_run(["ip", "-j", "-4", "route"]) or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            used.append(ipaddress.IPv4Network(dst if "/" in dst else f"{dst}/32",
                                              strict=False))
    return used


def pick_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route of this machine overlaps."""
    r = rng or random.Random()
    used = _subnets_in_use()
    for _ in range(SUBNET_ATTEMPTS_MAX):
        net = ipaddress.IPv4Network(f"10.{r.randrange(64, 192)}.{r.randrange(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet found")


# -- what clients saw -------------------------------------------------------------------

@dataclass(frozen=True)
class Ack:
    """A submission the network acknowledged as committed."""

    tx_id: bytes
    agency: str  # whose node was asked
    sent_at: float  # time.monotonic()
    acked_at: float
    height: int
    index: int
    result: str


@dataclass(frozen=True)
class Refusal:
    """A submission that failed, as the client saw it."""

    agency: str
    sent_at: float
    at: float
    code: str
    message: str


class Submitters:
    """Closed-loop clients, each keeping one signed probe transaction in flight at its
    agency's node as that agency's analyst (its profile), recording every acknowledged
    transaction and every refusal. With `pause_s` each client waits that long between
    one answer and its next submission (fewer, so shorter, chains to check)."""

    def __init__(self, net: NetnsNetwork, agencies: Sequence[str] | None = None,
                 per_agency: int = 1, deadline_s: float = SUBMIT_DEADLINE_S,
                 pause_s: float = 0.0) -> None:
        self.net = net
        self.deadline_s = deadline_s
        self.pause_s = pause_s
        self.acks: list[Ack] = []
        self.refusals: list[Refusal] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        names = list(agencies) if agencies is not None else list(net.agencies)
        self._threads = [threading.Thread(target=self._run, args=(a,), daemon=True,
                                          name=f"submit-{a}-{i}")
                         for a in names for i in range(per_agency)]

    def __enter__(self) -> Submitters:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.deadline_s + 10)

    def _run(self, agency: str) -> None:
        profile = load_client_profile(self.net.profile(agency))
        signer = Signer.load(profile, chain_id_for(self.net.profile(agency)))
        while not self._stop.is_set():
            try:
                with ExchangeClient(profile, deadline_s=self.deadline_s) as client:
                    while not self._stop.is_set():
                        envelope = probe_envelope(signer)
                        sent = time.monotonic()
                        try:
                            res = client.submit(envelope)
                        except ExchangeError as exc:
                            with self._lock:
                                self.refusals.append(Refusal(agency, sent, time.monotonic(),
                                                             exc.code, str(exc)))
                            break  # a fresh channel after any failure
                        if res.status == "committed":
                            with self._lock:
                                self.acks.append(Ack(bytes(res.tx_id), agency, sent,
                                                     time.monotonic(), res.height, res.index,
                                                     res.result))
                        if self.pause_s:
                            self._stop.wait(self.pause_s)
            except ExchangeError as exc:  # the profile's files, the channel
                with self._lock:
                    self.refusals.append(Refusal(agency, time.monotonic(), time.monotonic(),
                                                 exc.code, str(exc)))
            self._stop.wait(0.1)

    def snapshot(self) -> tuple[list[Ack], list[Refusal]]:
        with self._lock:
            return list(self.acks), list(self.refusals)

    def count(self) -> int:
        with self._lock:
            return len(self.acks)

    def wait_growth(self, more: int, timeout_s: float = 30.0,
                    agencies: Iterable[str] | None = None) -> None:
        """Wait until `more` further acknowledgements arrive (from the given agencies'
        nodes, default any)."""
        wanted = set(agencies) if agencies is not None else None

        def counted() -> int:
            with self._lock:
                return sum(1 for a in self.acks if wanted is None or a.agency in wanted)
        target = counted() + more
        deadline = time.monotonic() + timeout_s
        while counted() < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"commits stalled: {counted()} of {target} acknowledged "
                                   f"after {timeout_s:g} s\n" + self.net.logs_tail())
            time.sleep(POLL_INTERVAL_S)


def probe_envelope(signer: Signer) -> bytes:
    return signer.make_envelope(
        lambda body: setattr(body.probe, "payload", os.urandom(PROBE_PAYLOAD_BYTES)))


# -- the chain each node holds ----------------------------------------------------------

@dataclass
class ChainMirror:
    """What one node serves of its chain, fetched through its public API (FollowBlocks)
    and kept incrementally: per height the block hash, Raft term and tx ids."""

    agency: str
    hashes: list[bytes] = field(default_factory=list)
    terms: list[int] = field(default_factory=list)
    positions: dict[bytes, list[tuple[int, int]]] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return len(self.hashes)

    def sync(self, client: ExchangeClient, to_height: int) -> None:
        """Fetch blocks height+1 .. to_height, checking that each links to the last."""
        if to_height <= self.height:
            return
        stream = client.follow_blocks(self.height + 1)
        try:
            for block in stream:
                self._add(block)
                if self.height >= to_height:
                    break
        finally:
            if isinstance(stream, Generator):
                stream.close()  # cancels the call

    def load(self, store: BlockStore) -> None:
        """Read the blocks after `height` from a node's block store on disk (its node
        stopped), checking that each links to the last."""
        for block in store.blocks(self.height + 1):
            self._add(block)

    def _add(self, block: ledger_pb2.Block) -> None:
        header = parse_header(block.header)
        height = self.height + 1
        assert header.height == height, f"{self.agency}: block {header.height} after {height - 1}"
        if self.hashes:
            assert bytes(header.prev_hash) == self.hashes[-1], \
                f"{self.agency}: block {height} does not link to block {height - 1}"
        self.hashes.append(block_hash(block.header))
        self.terms.append(header.raft_term)
        for index, raw in enumerate(block.envelopes):
            tid = tx_id(ledger_pb2.Envelope.FromString(raw).body)
            self.positions.setdefault(tid, []).append((height, index))


# -- the network ------------------------------------------------------------------------

class NetnsNetwork:
    """Four (or more) agencies, each on its own namespace "machine", after a ceremony."""

    def __init__(self, root: Path, agencies: Sequence[str] = DEFAULT_AGENCIES,
                 tag: str | None = None, raft: Mapping[str, int] | None = None) -> None:
        """`raft`: settings for the [raft] table of every node.toml the ceremony writes
        (e.g. `compact_every_entries`), as an operator would edit them; none by default."""
        self.root = root
        self.agencies = tuple(agencies)
        assert 1 <= len(self.agencies) <= 200
        self.tag = tag or secrets.token_hex(3)
        self.bridge = f"xb{self.tag}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.gateway = ""
        self.addresses: dict[str, str] = {}
        self.namespaces = {a: f"xn-{self.tag}-{a}" for a in self.agencies}
        self.veths = {a: f"xv{self.tag}{i}" for i, a in enumerate(self.agencies)}
        self.chain_id = f"netns-{self.tag}"
        self.table = root / "table"  # where the agencies lay their public files
        self.log_dir = root / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.clock: dict[str, str | None] = {}
        self.frozen: set[str] = set()
        self.mirrors = {a: ChainMirror(a) for a in self.agencies}
        self.raft_settings = dict(raft or {})
        self.former: list[str] = []  # agencies removed from the network (`retire`)
        self._logs: dict[str, BinaryIO] = {}
        self._made_bridge = False
        self._made_ns: list[str] = []
        self.exchange = _exchange_command()
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.pop("EXCHANGE_PROFILE", None)

    # -- life cycle ---------------------------------------------------------------------
    def __enter__(self) -> NetnsNetwork:
        self.up()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    def up(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Namespaces and links, the ceremony, every node started, a leader agreed on.
        On any failure, everything made so far is removed again."""
        try:
            self.make_links()
            self.ceremony()
            for agency in self.agencies:
                self._tune_raft(agency)
            for agency in self.agencies:
                self.start_node(agency)
            self.wait_ready(timeout_s, agencies=self.agencies)
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Stop the nodes this network started and remove its namespaces and bridge.
        Safe to call more than once."""
        try:
            self.stop_nodes()
        finally:
            for ns in self._made_ns:
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
            self._made_ns = []
            if self._made_bridge:
                subprocess.run(["ip", "link", "del", self.bridge], capture_output=True,
                               check=False)
                self._made_bridge = False

    def make_links(self) -> None:
        """The bridge (with the clients' address) and one namespace per agency, joined to
        it by a veth pair whose inner end is the namespace's eth0."""
        self.subnet = pick_subnet()
        hosts = list(self.subnet.hosts())
        self.gateway = str(hosts[0])
        self.addresses = {a: str(hosts[10 + i]) for i, a in enumerate(self.agencies)}
        prefix = self.subnet.prefixlen
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._made_bridge = True
        _run(["ip", "addr", "add", f"{self.gateway}/{prefix}", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for agency in self.agencies:
            self._make_machine(agency)

    def _make_machine(self, agency: str) -> None:
        """The agency's namespace, joined to the bridge by a veth pair whose inner end is
        its eth0 with the agency's address, routed through the bridge's address."""
        assert self.subnet is not None
        prefix = self.subnet.prefixlen
        ns, veth = self.namespaces[agency], self.veths[agency]
        _run(["ip", "netns", "add", ns])
        self._made_ns.append(ns)
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
              "netns", ns])
        _run(["ip", "link", "set", veth, "master", self.bridge, "up"])
        _run(["ip", "-n", ns, "addr", "add", f"{self.addresses[agency]}/{prefix}",
              "dev", "eth0"])
        _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        _run(["ip", "-n", ns, "route", "add", "default", "via", self.gateway])

    def add_machine(self, agency: str) -> str:
        """A further machine on the running network: a namespace of its own on the bridge
        with the next free address (removed by `down()` like the others). The agency is
        not a member, not in `agencies`, until `admit`. Its address."""
        assert self.subnet is not None, "the network is not up"
        assert agency not in self.namespaces, f"{agency} already has a machine"
        index = len(self.addresses)
        self.namespaces[agency] = f"xn-{self.tag}-{agency}"
        self.veths[agency] = f"xv{self.tag}{index}"
        self.addresses[agency] = str(list(self.subnet.hosts())[10 + index])
        self._make_machine(agency)
        return self.addresses[agency]

    # -- the key ceremony ---------------------------------------------------------------
    def machine(self, agency: str) -> Path:
        """The agency's own machine: its folder and what it received."""
        return self.root / "machines" / agency

    def agency_dir(self, agency: str) -> Path:
        return self.machine(agency) / "agency"

    def ceremony(self) -> None:
        """`exchange agency init` on each machine; the requests laid on the table;
        `genesis propose` from them; each machine signs the draft it received; `genesis
        finalize`; each machine configures its node from the genesis it received. Only
        public files ever cross between machines."""
        self.table.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)

        def make(agency: str) -> None:
            self.machine(agency).mkdir(parents=True)
            self._cli_ok("agency", "init", "--agency", agency, "--host",
                         self.addresses[agency], "--port", str(GRPC_PORT), "--chain-id",
                         self.chain_id, "--out", str(self.agency_dir(agency)),
                         cwd=self.machine(agency))
            self._hand_over(self.agency_dir(agency) / "request.pb",
                            self.table / f"{agency}.req")
        self._on_every_machine(make)
        draft = self.table / "draft.pb"
        self._cli_ok("genesis", "propose",
                     *[str(self.table / f"{a}.req") for a in self.agencies],
                     "--out", str(draft), cwd=self.table)

        def sign(agency: str) -> None:
            received = self.machine(agency) / "draft.pb"
            self._hand_over(draft, received)
            signature = self.machine(agency) / f"{agency}.sig"
            self._cli_ok("genesis", "sign", str(received), "--agency-dir",
                         str(self.agency_dir(agency)), "--out", str(signature),
                         cwd=self.machine(agency))
            self._hand_over(signature, self.table / f"{agency}.sig")
        self._on_every_machine(sign)
        genesis = self.table / "genesis.pb"
        self._cli_ok("genesis", "finalize", str(draft),
                     *[str(self.table / f"{a}.sig") for a in self.agencies],
                     "--out", str(genesis), cwd=self.table)

        def configure(agency: str) -> None:
            received = self.machine(agency) / "genesis.pb"
            self._hand_over(genesis, received)
            self._cli_ok("agency", "configure", "--agency-dir", str(self.agency_dir(agency)),
                         "--genesis", str(received), cwd=self.machine(agency))
        self._on_every_machine(configure)
        for path in self.table.iterdir():
            assert b"PRIVATE KEY" not in path.read_bytes(), f"{path} holds a private key"

    def _on_every_machine(self, step: Callable[[str], None],
                          agencies: Iterable[str] | None = None) -> None:
        """Run one ceremony step on every agency's machine (or the given ones) at once
        (as four agencies would); the first failure is raised once all have finished."""
        errors: list[BaseException] = []

        def run(agency: str) -> None:
            try:
                step(agency)
            except BaseException as exc:  # noqa: BLE001 - raised below
                errors.append(exc)
        names = list(agencies) if agencies is not None else self.agencies
        threads = [threading.Thread(target=run, args=(a,)) for a in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    @staticmethod
    def _hand_over(src: Path, dst: Path) -> None:
        """A public file carried from one machine to another."""
        assert b"PRIVATE KEY" not in src.read_bytes(), f"{src} is not public"
        shutil.copyfile(src, dst)

    def _cli_ok(self, *args: str, cwd: Path) -> str:
        result = self.cli(*args, cwd=cwd)
        if result.returncode != 0:
            raise RuntimeError(f"exchange {' '.join(args[:2])} failed: "
                               f"{result.stderr.strip()}")
        return result.stdout

    def _tune_raft(self, agency: str) -> None:
        """Write the network's [raft] settings into the agency's node.toml."""
        if not self.raft_settings:
            return
        path = self.node_config(agency)
        doc = tomllib.loads(path.read_text())
        doc.setdefault("raft", {}).update(self.raft_settings)
        path.write_text(tomli_w.dumps(doc))

    # -- changing the network: an agency joins, an agency leaves --------------------------
    def join_ceremony(self, agency: str) -> Path:
        """The joining agency's part of the ceremony, on its own machine (see
        `add_machine`): `exchange agency init` with its own address, `exchange agency
        configure --join` from the genesis it received. Its public membership request is
        laid on the table; that path."""
        self.machine(agency).mkdir(parents=True)
        self._cli_ok("agency", "init", "--agency", agency, "--host", self.addresses[agency],
                     "--port", str(GRPC_PORT), "--chain-id", self.chain_id,
                     "--out", str(self.agency_dir(agency)), cwd=self.machine(agency))
        request = self.table / f"{agency}.req"
        self._hand_over(self.agency_dir(agency) / "request.pb", request)
        received = self.machine(agency) / "genesis.pb"
        self._hand_over(self.table / "genesis.pb", received)
        self._cli_ok("agency", "configure", "--agency-dir", str(self.agency_dir(agency)),
                     "--genesis", str(received), "--join", cwd=self.machine(agency))
        self._tune_raft(agency)
        return request

    def propose_change(self, name: str, by: str, add: Path | None = None,
                       remove: str | None = None) -> Path:
        """`exchange membership propose --add REQUEST | --remove AGENCY` on `by`'s
        machine (through its analyst's profile, against the members its node knows); the
        change laid on the table as NAME.change."""
        assert (add is None) != (remove is None), "give exactly one of add and remove"
        what = ["--add", str(add)] if add is not None else ["--remove", str(remove)]
        written = self.machine(by) / f"{name}.change"
        self._cli_ok("membership", "propose", *what, "--out", str(written),
                     "--profile", str(self.profile(by)), cwd=self.machine(by))
        change = self.table / f"{name}.change"
        self._hand_over(written, change)
        return change

    def approve_change(self, change: Path, approvers: Sequence[str]) -> list[Path]:
        """Each approver, on its own machine, signs the change it received with its root
        key (`exchange membership approve`); the approvals laid on the table."""
        def approve(agency: str) -> None:
            received = self.machine(agency) / change.name
            self._hand_over(change, received)
            approval = self.machine(agency) / f"{change.stem}.{agency}.approval"
            self._cli_ok("membership", "approve", str(received), "--agency-dir",
                         str(self.agency_dir(agency)), "--out", str(approval),
                         cwd=self.machine(agency))
            self._hand_over(approval, self.table / approval.name)
        self._on_every_machine(approve, approvers)
        return [self.table / f"{change.stem}.{a}.approval" for a in approvers]

    def submit_change(self, change: Path, approvals: Sequence[Path], by: str
                      ) -> subprocess.CompletedProcess[str]:
        """`exchange membership submit` on `by`'s machine with the change and approvals
        it received, signed by its root, through its node; the command's result (see
        `committed_height`)."""
        received = []
        for path in (change, *approvals):
            received.append(self.machine(by) / path.name)
            if path.resolve() != received[-1].resolve():
                self._hand_over(path, received[-1])
        return self.cli("membership", "submit", *map(str, received), "--agency-dir",
                        str(self.agency_dir(by)), "--profile", str(self.profile(by)),
                        cwd=self.machine(by))

    @staticmethod
    def committed_height(result: subprocess.CompletedProcess[str]) -> int:
        """The height a `membership submit` (or other `_submit`) reports its change at."""
        found = COMMITTED_AT.search(result.stdout)
        assert result.returncode == 0 and found, result.stdout + result.stderr
        return int(found.group(1))

    def admit(self, agency: str) -> None:
        """The agency is a member now: it counts in `agencies` (readiness, healing,
        faults, the end check)."""
        assert agency in self.namespaces and agency not in self.agencies
        self.agencies = (*self.agencies, agency)
        self.mirrors.setdefault(agency, ChainMirror(agency))

    def retire(self, agency: str) -> None:
        """The agency was removed from the network: it no longer counts as a member; the
        end check reads its chain from its block store instead (its node stopped)."""
        assert agency in self.agencies
        self.agencies = tuple(a for a in self.agencies if a != agency)
        self.former.append(agency)

    def block_store(self, agency: str) -> Path:
        return load_node_config(self.node_config(agency)).paths.data_dir / BLOCK_STORE_FILE

    # -- where things are ---------------------------------------------------------------
    def node_config(self, agency: str) -> Path:
        return self.agency_dir(agency) / "node.toml"

    def profile(self, agency: str) -> Path:
        return self.agency_dir(agency) / "profile.toml"

    def log_path(self, agency: str) -> Path:
        return self.log_dir / f"{agency}.log"

    def address(self, agency: str) -> str:
        return f"{self.addresses[agency]}:{GRPC_PORT}"

    # -- node processes -----------------------------------------------------------------
    def start_node(self, agency: str, clock_offset: str | None = None) -> None:
        """Start the agency's node inside its namespace, from its ceremony files; with
        `clock_offset` (faketime's syntax, e.g. "+5m") under libfaketime."""
        proc = self.procs.get(agency)
        assert proc is None or proc.poll() is not None, f"{agency} is already running"
        log = open(self.log_path(agency), "ab")  # noqa: SIM115 - closed in _reap
        note = f" (faketime {clock_offset})" if clock_offset else ""
        log.write(f"=== start {time.strftime('%H:%M:%S')}{note}\n".encode())
        log.flush()
        self._logs[agency] = log
        wrapper = ["faketime", "-f", clock_offset] if clock_offset else []
        self.procs[agency] = subprocess.Popen(
            ["ip", "netns", "exec", self.namespaces[agency], *wrapper, *self.exchange,
             "node", "--config", str(self.node_config(agency))],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            cwd=self.machine(agency))
        self.clock[agency] = clock_offset
        self.frozen.discard(agency)

    def node_pid(self, agency: str) -> int:
        """The pid of the node process itself (under faketime, the child it runs)."""
        proc = self.procs[agency]
        if not self.clock.get(agency):
            return proc.pid  # `ip netns exec` execs the node in place
        deadline = time.monotonic() + STOP_TIMEOUT_S
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                if pids:
                    return int(pids[0])
            if proc.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"no node process under faketime for {agency}")

    def send_signal(self, agency: str, sig: int) -> None:
        os.kill(self.node_pid(agency), sig)

    def freeze(self, agency: str) -> None:
        """SIGSTOP: the process stays, its sockets stay open, it does nothing."""
        self.send_signal(agency, signal.SIGSTOP)
        self.frozen.add(agency)

    def thaw(self, agency: str) -> None:
        self.send_signal(agency, signal.SIGCONT)
        self.frozen.discard(agency)

    def kill(self, agency: str, sig: int = signal.SIGKILL,
             timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Send `sig` to the node and wait for it to exit; its exit code."""
        proc = self.procs[agency]
        if proc.poll() is None:
            pid = self.node_pid(agency)
            if agency in self.frozen:
                os.kill(pid, signal.SIGCONT)
                self.frozen.discard(agency)
            os.kill(pid, sig)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait(timeout_s)
        self._reap(agency)
        return proc.returncode

    def restart(self, agency: str, clock_offset: str | None = None) -> None:
        """Stop the node (SIGTERM) if it runs and start it again."""
        if self.running(agency):
            self.kill(agency, signal.SIGTERM)
        self.start_node(agency, clock_offset)

    def stop_nodes(self) -> None:
        """SIGTERM every node this network started (thawing frozen ones first), SIGKILL
        what has not exited after the grace period."""
        pids: dict[str, int] = {}
        for agency, proc in self.procs.items():
            if proc.poll() is None:
                with contextlib.suppress(RuntimeError, ProcessLookupError):
                    pid = pids[agency] = self.node_pid(agency)
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGTERM)
        self.frozen.clear()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for agency, proc in self.procs.items():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                if agency in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pids[agency], signal.SIGKILL)
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)
            self._reap(agency)

    def _reap(self, agency: str) -> None:
        log = self._logs.pop(agency, None)
        if log is not None:
            log.close()

    def running(self, agency: str) -> bool:
        proc = self.procs.get(agency)
        return proc is not None and proc.poll() is None

    def live(self) -> list[str]:
        return [a for a in self.agencies if self.running(a)]

    # -- faults: nftables inside the namespaces ------------------------------------------
    def _nft(self, agency: str, rules_in: Sequence[str] = (),
             rules_out: Sequence[str] = ()) -> None:
        """Replace the agency's fault table with these input and output rules (one
        atomic nft transaction; no rules: the table is removed)."""
        lines = [f"add table inet {NFT_TABLE}", f"delete table inet {NFT_TABLE}"]
        if rules_in or rules_out:
            lines += [f"table inet {NFT_TABLE} {{",
                      "  chain input { type filter hook input priority 0; policy accept;",
                      *[f"    {r}" for r in rules_in], "  }",
                      "  chain output { type filter hook output priority 0; policy accept;",
                      *[f"    {r}" for r in rules_out], "  }", "}"]
        _run(["ip", "netns", "exec", self.namespaces[agency], "nft", "-f", "-"],
             "\n".join(lines) + "\n")

    def _set(self, agencies: Iterable[str]) -> str:
        return "{ " + ", ".join(self.addresses[a] for a in sorted(agencies)) + " }"

    def isolate(self, agency: str, peers: Iterable[str] | None = None) -> None:
        """Drop everything between the agency's node and the given peers (default: all
        others), both ways. Clients still reach it."""
        others = [a for a in (peers if peers is not None else self.agencies) if a != agency]
        self._nft(agency, rules_in=[f"ip saddr {self._set(others)} drop"],
                  rules_out=[f"ip daddr {self._set(others)} drop"])

    def split(self, *groups: Sequence[str]) -> None:
        """A partition: nodes talk only within their group."""
        named = [a for g in groups for a in g]
        assert sorted(named) == sorted(self.agencies), "every agency in exactly one group"
        for group in groups:
            others = [a for a in self.agencies if a not in group]
            for agency in group:
                self.isolate(agency, others)

    def drop_outgoing(self, agency: str) -> None:
        """One-way: what the agency's node sends to its peers is lost; what they send
        arrives."""
        others = [a for a in self.agencies if a != agency]
        self._nft(agency, rules_out=[f"ip daddr {self._set(others)} drop"])

    def random_loss(self, percent: int) -> None:
        """Every packet leaving every node's namespace is lost with `percent` % chance."""
        assert 0 < percent < 100
        for agency in self.agencies:
            self._nft(agency, rules_out=[
                f'oifname "eth0" numgen random mod 100 < {percent} drop'])

    def heal(self) -> None:
        """No fault rules left anywhere; frozen nodes resumed."""
        for agency in self.agencies:
            self._nft(agency)
        for agency in list(self.frozen):
            if self.running(agency):
                self.thaw(agency)
        self.frozen.clear()

    def rules(self, agency: str) -> str:
        return _run(["ip", "netns", "exec", self.namespaces[agency], "nft", "list",
                     "ruleset"])

    # -- asking the nodes ---------------------------------------------------------------
    def client(self, agency: str, deadline_s: float = 10.0) -> ExchangeClient:
        return ExchangeClient(load_client_profile(self.profile(agency)),
                              deadline_s=deadline_s)

    def status(self, agency: str, deadline_s: float = STATUS_DEADLINE_S
               ) -> node_pb2.NodeStatus | None:
        """The node's Status, or None when it does not answer."""
        try:
            with self.client(agency, deadline_s=deadline_s) as c:
                return c.status()
        except ExchangeError:
            return None

    def statuses(self, agencies: Iterable[str] | None = None
                 ) -> dict[str, node_pb2.NodeStatus | None]:
        names = list(agencies) if agencies is not None else self.agencies
        out: dict[str, node_pb2.NodeStatus | None] = {}

        def one(agency: str) -> None:
            out[agency] = self.status(agency)
        threads = [threading.Thread(target=one, args=(a,)) for a in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    def leader(self, timeout_s: float = READY_TIMEOUT_S) -> str:
        return self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S,
                   agencies: Sequence[str] | None = None) -> str:
        """Wait until every running node (or the given ones) answers as leader or
        follower of one leader, which itself says it leads in the same term; that
        leader."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, str] = {}
        while True:
            names = list(agencies) if agencies is not None else self.live()
            for agency in names:
                if not self.running(agency):
                    raise RuntimeError(f"node {agency} exited (code "
                                       f"{self.procs[agency].returncode})\n"
                                       + self.log_tail(agency))
            statuses = self.statuses(names)
            last = {a: (f"{s.role} of term {s.term}, leader {s.leader or '-'}"
                        if s is not None else "no answer") for a, s in statuses.items()}
            if names and all(s is not None for s in statuses.values()):
                known = [s for s in statuses.values() if s is not None]
                leaders = {(s.leader, s.term) for s in known}
                if all(s.role in LIVE_ROLES for s in known) and len(leaders) == 1:
                    leader, term = leaders.pop()
                    leading = statuses.get(leader)
                    if leader and leading is not None and leading.role == "leader" \
                            and leading.term == term:
                        return leader
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no agreed leader after {timeout_s:g} s: {last}\n"
                                   + self.logs_tail())
            time.sleep(POLL_INTERVAL_S * 4)

    def wait_height(self, height: int, agencies: Sequence[str] | None = None,
                    timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until the nodes (default: all running) hold at least `height` blocks."""
        deadline = time.monotonic() + timeout_s
        while True:
            names = list(agencies) if agencies is not None else self.live()
            heights = {a: (s.height if s is not None else None)
                       for a, s in self.statuses(names).items()}
            if all(h is not None and h >= height for h in heights.values()):
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"height {height} not reached after {timeout_s:g} s: "
                                   f"{heights}\n" + self.logs_tail())
            time.sleep(POLL_INTERVAL_S * 4)

    def wait_new_leader(self, old: str, old_term: int, timeout_s: float = 30.0,
                        among: Iterable[str] | None = None) -> tuple[str, int, float]:
        """Wait for a node other than `old` to lead in a later term; (leader, term,
        seconds waited)."""
        names = [a for a in (among if among is not None else self.agencies) if a != old]
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            for agency, st in self.statuses(names).items():
                if st is not None and st.role == "leader" and st.term > old_term:
                    return agency, st.term, time.monotonic() - started
            time.sleep(POLL_INTERVAL_S)
        raise TimeoutError(f"no new leader after {timeout_s:g} s (old {old}, term "
                           f"{old_term})\n" + self.logs_tail())

    # -- the CLI ------------------------------------------------------------------------
    def cli(self, *args: str, cwd: Path | None = None, namespace: str | None = None,
            clock_offset: str | None = None, timeout_s: float = CLI_TIMEOUT_S
            ) -> subprocess.CompletedProcess[str]:
        """`exchange ARGS` as a user runs it: in the root namespace, or on an agency's
        machine (inside its namespace, with its clock)."""
        prefix = ["ip", "netns", "exec", namespace] if namespace else []
        if clock_offset:
            prefix += ["faketime", "-f", clock_offset]
        return subprocess.run([*prefix, *self.exchange, *args], capture_output=True,
                              text=True, env=self.env, cwd=cwd or self.root,
                              timeout=timeout_s, check=False)

    def verify_chains(self) -> dict[str, subprocess.CompletedProcess[str]]:
        """`exchange chain verify` against every node, as that agency's analyst."""
        out: dict[str, subprocess.CompletedProcess[str]] = {}

        def one(agency: str) -> None:
            out[agency] = self.cli("chain", "verify", "--profile", str(self.profile(agency)),
                                   "--timeout", "60")
        threads = [threading.Thread(target=one, args=(a,)) for a in self.agencies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return out

    # -- the check every scenario ends with ----------------------------------------------
    def check_acknowledged(self, acks: Sequence[Ack], timeout_s: float = READY_TIMEOUT_S
                           ) -> dict[str, int]:
        """Every acknowledged transaction is on every node exactly once, at the height
        and index it was acknowledged with; every node's chain is the same blocks in the
        same order (hash by hash), with Raft terms that never go back; `exchange chain
        verify` passes against every node. Returns each node's height."""
        self.wait_ready(timeout_s)
        top = max((a.height for a in acks), default=0)
        leader_status = self.status(self.wait_ready(timeout_s), deadline_s=5.0)
        if leader_status is not None:
            top = max(top, leader_status.height)
        self.wait_height(top, agencies=list(self.agencies), timeout_s=timeout_s)
        for agency in self.agencies:
            with self.client(agency, deadline_s=30.0) as c:
                self.mirrors[agency].sync(c, top)
        members = {a: self.mirrors[a] for a in self.agencies}
        for agency, mirror in members.items():
            for ack in acks:
                assert mirror.positions.get(ack.tx_id) == [(ack.height, ack.index)], (
                    f"{agency}: transaction {ack.tx_id.hex()[:16]} acknowledged by "
                    f"{ack.agency} at {(ack.height, ack.index)}, found at "
                    f"{mirror.positions.get(ack.tx_id)}")
            assert all(a <= b for a, b in zip(mirror.terms, mirror.terms[1:], strict=False)), \
                f"{agency}: a block of an older Raft term follows a newer one"
        first = self.mirrors[self.agencies[0]]
        for agency, mirror in members.items():
            common = min(first.height, mirror.height)
            assert common >= top
            assert mirror.hashes[:common] == first.hashes[:common], \
                f"{agency}'s chain diverges from {first.agency}'s"
        for agency, result in self.verify_chains().items():
            assert result.returncode == 0, \
                f"exchange chain verify against {agency}: {result.stderr.strip()}"
            assert "OK" in result.stdout, result.stdout
        for agency in self.former:
            self._check_former(agency, acks, first)
        return {a: self.mirrors[a].height for a in (*self.agencies, *self.former)}

    def _check_former(self, agency: str, acks: Sequence[Ack], reference: ChainMirror
                      ) -> None:
        """The usual check on a removed member, at the height it left at: its node has
        stopped; its block store (on its machine) holds the network's genesis and a
        chain that is a prefix of the members' (hash by hash), with every transaction
        acknowledged up to that height exactly once at its position, all that its own
        node acknowledged among them, and Raft terms that never go back; `exchange chain
        verify --store` passes on it."""
        assert not self.running(agency), f"{agency} was removed but its node still runs"
        path = self.block_store(agency)
        mirror = self.mirrors[agency]
        with BlockStore.open(path) as store:
            assert genesis_hash(store.signed_genesis) == genesis_hash(
                read_signed_genesis(self.table / "genesis.pb")), \
                f"{agency}'s store holds another genesis"
            mirror.load(store)
        left_at = mirror.height
        assert reference.height >= left_at, \
            f"{agency} holds {left_at} blocks, {reference.agency} only {reference.height}"
        assert mirror.hashes == reference.hashes[:left_at], \
            f"{agency}'s chain diverges from {reference.agency}'s"
        for ack in acks:
            if ack.height <= left_at or ack.agency == agency:
                assert mirror.positions.get(ack.tx_id) == [(ack.height, ack.index)], (
                    f"{agency} (left at {left_at}): transaction {ack.tx_id.hex()[:16]} "
                    f"acknowledged by {ack.agency} at {(ack.height, ack.index)}, found at "
                    f"{mirror.positions.get(ack.tx_id)}")
        assert all(a <= b for a, b in zip(mirror.terms, mirror.terms[1:], strict=False)), \
            f"{agency}: a block of an older Raft term follows a newer one"
        result = self.cli("chain", "verify", "--store", str(path))
        assert result.returncode == 0 and "OK" in result.stdout, \
            f"exchange chain verify --store {path}: {result.stdout}{result.stderr.strip()}"

    def block_term(self, agency: str, height: int) -> int:
        with self.client(agency) as c:
            return parse_header(c.get_block(height).header).raft_term

    # -- logs ---------------------------------------------------------------------------
    def log_tail(self, agency: str, lines: int = LOG_TAIL_LINES) -> str:
        path = self.log_path(agency)
        if not path.exists():
            return f"--- {agency}: no log\n"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- {path} (last {len(text)} lines)\n" + "\n".join(text) + "\n"

    def logs_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The tail of every machine's node log (members, joining and former ones)."""
        return "".join(self.log_tail(a, lines) for a in self.namespaces)


# -- the failover measurement -------------------------------------------------------------

def first_commit_after(net: NetnsNetwork, since: float, old_term: int,
                       among: Sequence[str], timeout_s: float = 30.0) -> tuple[float, str]:
    """Clients of each of the `among` nodes submit fresh probes in a loop from `since`
    on; the seconds from `since` until the first acknowledgement of a probe committed in
    a block of a term after `old_term`, and the node that acknowledged it."""
    found: list[tuple[float, str]] = []
    done = threading.Event()

    def client_loop(agency: str) -> None:
        profile = load_client_profile(net.profile(agency))
        signer = Signer.load(profile, chain_id_for(net.profile(agency)))
        while not done.is_set() and time.monotonic() - since < timeout_s:
            try:
                with ExchangeClient(profile, deadline_s=2.0) as client:
                    while not done.is_set():
                        res = client.submit(probe_envelope(signer))
                        at = time.monotonic()
                        if res.status != "committed":
                            continue
                        header = parse_header(client.get_block(res.height).header)
                        if header.raft_term > old_term:
                            found.append((at - since, agency))
                            done.set()
            except ExchangeError:
                time.sleep(0.02)

    threads = [threading.Thread(target=client_loop, args=(a,), daemon=True) for a in among]
    for t in threads:
        t.start()
    done.wait(timeout_s)
    done.set()
    for t in threads:
        t.join(timeout=10)
    if not found:
        raise TimeoutError(f"nothing committed in a term after {old_term} within "
                           f"{timeout_s:g} s\n" + net.logs_tail())
    return min(found)


def acks_between(acks: Iterable[Ack], start: float, end: float,
                 agencies: Iterable[str] | None = None) -> list[Ack]:
    """Acknowledgements of submissions sent at or after `start` and acknowledged before
    `end` (by the given agencies' nodes)."""
    wanted = set(agencies) if agencies is not None else None
    return [a for a in acks if a.sent_at >= start and a.acked_at < end
            and (wanted is None or a.agency in wanted)]


def until(predicate: Callable[[], bool], timeout_s: float, what: str,
          interval_s: float = POLL_INTERVAL_S) -> None:
    """Poll until `predicate()` holds; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout_s:g} s")
        time.sleep(interval_s)


def describe(st: node_pb2.NodeStatus | None) -> str:
    return "no answer" if st is None else f"{st.role} term {st.term} leader {st.leader or '-'}"


__all__ = ["Ack", "ChainMirror", "NetnsNetwork", "Refusal", "Submitters", "acks_between",
           "describe", "first_commit_after", "missing_requirement", "pick_subnet", "until"]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tests.support.netns [-- COMMAND ...]`: bring a namespace network up (in a
    temporary folder unless --dir), run COMMAND in the root namespace with
    EXCHANGE_PROFILE set to the first agency's analyst profile (and
    EXCHANGE_NETNS_PROFILE_<AGENCY> to each agency's), then take everything down; without
    a command, print where things are and keep the network up until SIGINT or SIGTERM."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tests.support.netns", description=main.__doc__)
    parser.add_argument("--dir", type=Path, help="folder for the machines (must not exist)")
    parser.add_argument("--agencies", default=",".join(DEFAULT_AGENCIES))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    missing = missing_requirement()
    if missing:
        print(f"namespace network unavailable: {missing}", file=sys.stderr)
        return 1
    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    with contextlib.ExitStack() as stack:
        if args.dir is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="netns-")))
        else:
            root = args.dir
            root.mkdir(parents=True)
        net = stack.enter_context(NetnsNetwork(root, args.agencies.split(",")))
        env = {**os.environ, "EXCHANGE_PROFILE": str(net.profile(net.agencies[0]))}
        for agency in net.agencies:
            env[f"EXCHANGE_NETNS_PROFILE_{agency.upper()}"] = str(net.profile(agency))
        print(f"namespace network {net.tag} on {net.subnet}, leader {net.leader()}",
              flush=True)
        for agency in net.agencies:
            print(f"  {agency:<10} {net.address(agency):<22} ns {net.namespaces[agency]:<22} "
                  f"profile {net.profile(agency)}", flush=True)
        if command:
            return subprocess.run(command, env=env, check=False).returncode
        stopped = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stopped.set())
        print("up; SIGINT or SIGTERM takes it down", flush=True)
        stopped.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
