"""The node config (one TOML file per node) and the analyst profile the CLI reads.

Paths in either file are relative to the file's own folder and resolved on load, so a
network directory can be moved or copied to another machine whole. Every problem is
reported as MalformedInput naming the file and the key.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
from google.protobuf.message import DecodeError

from exchange.errors import AlreadyExists, MalformedInput
from exchange.identity.genesis import verify_genesis
from exchange.identity.tls import trust_bundle
from exchange.v1 import identity_pb2

RAFT_PORT_OFFSET = 2  # the Raft peer link (exchange.node.raftlink) beside the gRPC port
PORT_MAX = 65535

AGENCY_PATTERN = re.compile(r"^[a-z][a-z0-9-]{1,30}$")
SUBJECT_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ENV_VAR_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
LOG_LEVELS = ("debug", "info", "warning", "error")
# paths.trust_bundle takes this word to mean "the member CAs listed in genesis".
TRUST_FROM_GENESIS = "genesis"
CONFIG_BYTES_MAX = 1 << 20
BLOCK_TX_MAX_LIMIT = 1_000_000
BLOCK_BYTES_MAX_LIMIT = 1 << 30
BLOCK_INTERVAL_MS_LIMIT = 60_000


@dataclass(frozen=True)
class NodePaths:
    """Where a node finds its files (absolute once loaded)."""

    data_dir: Path
    genesis: Path
    node_key: Path
    data_key: Path
    tls_cert: Path
    tls_key: Path
    # None: trust exactly the member CAs of genesis (the default).
    trust_bundle: Path | None = None


@dataclass(frozen=True)
class BlockCutting:
    """When the leader closes a block; each at most the genesis limit."""

    tx_max: int
    bytes_max: int
    interval_ms: int


@dataclass(frozen=True)
class RaftSettings:
    """Raft timing and log compaction. Ticks are `tick_ms` long; an election starts after
    a random [election_ticks, 2 * election_ticks) ticks without a leader."""

    tick_ms: int = 50
    election_ticks: int = 10
    heartbeat_ticks: int = 1
    compact_every_entries: int = 2_000
    compact_keep_entries: int = 500
    # The in-memory log is also compacted once it holds more than this many bytes, and
    # keeps at most compact_keep_bytes of applied entries, so a flood of large blocks
    # cannot grow a node's memory (issue 16).
    compact_log_bytes_max: int = 64 << 20
    compact_keep_bytes: int = 16 << 20


@dataclass(frozen=True)
class WebhookSettings:
    """Where a node posts the findings and case events concerning its agency (issue 10):
    an HTTP(S) URL, the HMAC-SHA256 key (a file, or an environment variable holding it),
    the timeout of one POST and how often, with exponential back-off, to try one event."""

    url: str
    secret_file: Path | None = None
    secret_env: str | None = None
    timeout_ms: int = 5_000
    attempts_max: int = 12
    backoff_ms_min: int = 500
    backoff_ms_max: int = 300_000

    def secret(self) -> bytes:
        """The HMAC key; MalformedInput when it cannot be read or is empty."""
        if self.secret_file is not None:
            try:
                key = self.secret_file.read_bytes().strip()
            except OSError as exc:
                raise MalformedInput(f"webhook secret_file {self.secret_file}: "
                                     f"{exc.strerror}") from exc
        else:
            assert self.secret_env is not None
            key = os.environ.get(self.secret_env, "").strip().encode()
        if not key:
            raise MalformedInput("the webhook's HMAC key is empty (webhook.secret_file or "
                                 "webhook.secret_env)")
        return key


@dataclass(frozen=True)
class NodeConfig:
    """One node. A single gRPC port serves the public API and the peer service (both
    mutual TLS); the Raft peer link (mutual TLS) listens on that port + RAFT_PORT_OFFSET;
    metrics are plain HTTP on their own port."""

    agency: str
    node_id: str
    paths: NodePaths
    listen_grpc: str  # host:port
    listen_metrics: str  # host:port
    block: BlockCutting
    peers: Mapping[str, str] = field(default_factory=dict)  # agency -> host:port
    log_level: str = "info"
    raft: RaftSettings = field(default_factory=RaftSettings)
    # Where the agency's own records are: a PostgreSQL URL, or "" for the SQLite store
    # <data_dir>/agency.db (agents.open_agency_store).
    agency_store: str = ""
    # Plaintext bytes per sealed answer chunk (larger answers are split).
    answer_chunk_bytes: int = 512 * 1024
    # True for an agency joining a running network: it is not in genesis, and becomes a
    # member when a membership change naming its keys commits.
    join: bool = False
    # Where to post the findings and case events concerning the agency (none: nowhere).
    webhook: WebhookSettings | None = None

    def read_trust_bundle(self) -> bytes:
        """PEM of the CAs this node trusts: the bundle file, or genesis's member CAs."""
        if self.paths.trust_bundle is not None:
            return self.paths.trust_bundle.read_bytes()
        return trust_bundle(verify_genesis(read_signed_genesis(self.paths.genesis)))

    def check_against(self, genesis: identity_pb2.Genesis) -> None:
        """Raise MalformedInput unless this config fits the network `genesis` describes."""
        members = {m.agency for m in genesis.members}
        if self.join:
            if self.agency in members:
                raise MalformedInput(f"node config: {self.agency!r} is a founding member of "
                                     f"chain {genesis.chain_id}; it does not join")
        elif self.agency not in members:
            raise MalformedInput(f"node config: {self.agency!r} is not a member of "
                                 f"chain {genesis.chain_id}")
        expected = members - {self.agency}
        if set(self.peers) != expected:
            raise MalformedInput(
                f"node config: peers {sorted(self.peers)} do not match the other members "
                f"{sorted(expected)}")
        params = genesis.params
        if self.block.tx_max > params.block_tx_max:
            raise MalformedInput(f"node config: block.tx_max {self.block.tx_max} exceeds "
                                 f"genesis limit {params.block_tx_max}")
        if self.block.bytes_max > params.block_bytes_max:
            raise MalformedInput(f"node config: block.bytes_max {self.block.bytes_max} "
                                 f"exceeds genesis limit {params.block_bytes_max}")


@dataclass(frozen=True)
class Profile:
    """What the CLI needs to act as one analyst (or automation) of an agency."""

    agency: str
    subject: str
    node: str  # host:port of the agency's node
    tls_cert: Path
    tls_key: Path
    ca_bundle: Path
    signing_key: Path
    credential: Path
    # Name of the environment variable holding the signing key's passphrase, if any.
    passphrase_env: str | None = None
    # TLS name to check the node's certificate against, when not the host of `node`.
    server_name: str | None = None

    def passphrase(self) -> bytes | None:
        if self.passphrase_env is None:
            return None
        value = os.environ.get(self.passphrase_env)
        if value is None:
            raise MalformedInput(
                f"profile {self.agency}/{self.subject}: environment variable "
                f"{self.passphrase_env} (the key passphrase) is not set")
        return value.encode()


# -- reading ---------------------------------------------------------------------------

class _Table:
    """A TOML table being validated: typed getters that name file and key on error."""

    def __init__(self, path: Path, data: Mapping[str, Any], prefix: str = "") -> None:
        self.path = path
        self.data = data
        self.prefix = prefix
        self.used: set[str] = set()

    def error(self, key: str, message: str) -> MalformedInput:
        return MalformedInput(f"{self.path}: key '{self.prefix}{key}': {message}")

    def _get(self, key: str, required: bool) -> object:
        self.used.add(key)
        if key not in self.data:
            if required:
                raise self.error(key, "missing")
            return None
        return self.data[key]

    def string(self, key: str, pattern: re.Pattern[str] | None = None,
               required: bool = True) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.error(key, f"expected a non-empty string, got {value!r}")
        if pattern is not None and not pattern.match(value):
            raise self.error(key, f"{value!r} does not match {pattern.pattern}")
        return value

    def req_string(self, key: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self.string(key, pattern)
        assert value is not None
        return value

    def integer(self, key: str, minimum: int, maximum: int, default: int | None = None) -> int:
        value = self._get(key, default is None)
        if value is None and default is not None:
            return default
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"expected an integer, got {value!r}")
        if not minimum <= value <= maximum:
            raise self.error(key, f"{value} is not between {minimum} and {maximum}")
        return value

    def address(self, key: str) -> str:
        value = self.req_string(key)
        try:
            parse_address(value)
        except MalformedInput as exc:
            raise self.error(key, str(exc)) from exc
        return value

    def path_value(self, key: str) -> Path:
        return resolve_path(self.path.parent, self.req_string(key))

    def table(self, key: str) -> _Table:
        value = self._get(key, True)
        if not isinstance(value, dict):
            raise self.error(key, "expected a table")
        return _Table(self.path, value, f"{self.prefix}{key}.")

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise self.error(unknown[0], "unknown key")


def next_path(path: Path) -> Path:
    """Where a prepared replacement of a key or certificate file waits for the ledger:
    node.key -> node.next.key, node.pem -> node.next.pem. The CLI prepares it there, the
    node moves it into place once the ledger names it."""
    return path.with_name(path.stem + ".next" + path.suffix)


def parse_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port`` for IPv6) and check the port."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise MalformedInput(f"expected host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if not 1 <= port <= PORT_MAX or not host:
        raise MalformedInput(f"expected host:port, got {address!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def resolve_path(base: Path, value: str) -> Path:
    """A path from a config file: relative ones are relative to the file's folder."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base.absolute() / path
    return Path(os.path.normpath(path))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(CONFIG_BYTES_MAX + 1)
    except FileNotFoundError as exc:
        raise MalformedInput(f"{path}: no such file") from exc
    if len(raw) > CONFIG_BYTES_MAX:
        raise MalformedInput(f"{path}: larger than {CONFIG_BYTES_MAX} bytes")
    try:
        return tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise MalformedInput(f"{path}: {exc}") from exc


def load_node_config(path: Path) -> NodeConfig:
    """Read and validate a node.toml, with every path made absolute."""
    top = _Table(path, _read_toml(path))
    agency = top.req_string("agency", AGENCY_PATTERN)
    node_id = top.req_string("node_id", SUBJECT_PATTERN)
    log_level = top.string("log_level", required=False) or "info"
    join = top.data.get("join", False)
    top.used.add("join")
    if not isinstance(join, bool):
        raise top.error("join", "must be true or false")
    if log_level not in LOG_LEVELS:
        raise top.error("log_level", f"{log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    listen_grpc, listen_metrics = _listen(top.table("listen"))
    paths = _paths(top.table("paths"), path)
    peers = _peers(top, agency)
    block = _block(top.table("block"))
    raft = _raft(top)
    agency_store, answer_chunk_bytes = _data(top)
    webhook = _webhook(top.table("webhook")) if "webhook" in top.data else None
    top.done()
    return NodeConfig(agency=agency, node_id=node_id, paths=paths, listen_grpc=listen_grpc,
                      listen_metrics=listen_metrics, block=block, peers=peers,
                      log_level=log_level, raft=raft, agency_store=agency_store,
                      answer_chunk_bytes=answer_chunk_bytes, join=join, webhook=webhook)


def _listen(listen: _Table) -> tuple[str, str]:
    """[listen]: the gRPC and metrics addresses, on two ports."""
    listen_grpc = listen.address("grpc")
    listen_metrics = listen.address("metrics")
    listen.done()
    grpc_port, metrics_port = parse_address(listen_grpc)[1], parse_address(listen_metrics)[1]
    if grpc_port == metrics_port:
        raise listen.error("metrics", "must use another port than listen.grpc")
    if metrics_port == grpc_port + RAFT_PORT_OFFSET:
        raise listen.error("metrics", f"must use another port than listen.grpc + "
                           f"{RAFT_PORT_OFFSET} (the Raft peer link's)")
    if grpc_port + RAFT_PORT_OFFSET > PORT_MAX:
        raise listen.error("grpc", f"leaves no port for the Raft peer link (listen.grpc + "
                           f"{RAFT_PORT_OFFSET})")
    return listen_grpc, listen_metrics


def _paths(p: _Table, path: Path) -> NodePaths:
    """[paths], each made absolute against the config's folder."""
    trust_text = p.string("trust_bundle", required=False) or TRUST_FROM_GENESIS
    paths = NodePaths(
        data_dir=p.path_value("data_dir"),
        genesis=p.path_value("genesis"),
        node_key=p.path_value("node_key"),
        data_key=p.path_value("data_key"),
        tls_cert=p.path_value("tls_cert"),
        tls_key=p.path_value("tls_key"),
        trust_bundle=(None if trust_text == TRUST_FROM_GENESIS
                      else resolve_path(path.parent, trust_text)),
    )
    p.done()
    return paths


def _peers(top: _Table, agency: str) -> dict[str, str]:
    """[peers] (optional): other agencies' node addresses, by agency."""
    peers: dict[str, str] = {}
    if "peers" not in top.data:
        top.used.add("peers")
        return peers
    peer_table = top.table("peers")
    for name in sorted(peer_table.data):
        if not AGENCY_PATTERN.match(name):
            raise peer_table.error(name, f"{name!r} is not an agency name")
        if name == agency:
            raise peer_table.error(name, "a node is not its own peer")
        peers[name] = peer_table.address(name)
    peer_table.done()
    return peers


def _block(b: _Table) -> BlockCutting:
    """[block]: when the leader cuts a block."""
    block = BlockCutting(
        tx_max=b.integer("tx_max", 1, BLOCK_TX_MAX_LIMIT),
        bytes_max=b.integer("bytes_max", 1024, BLOCK_BYTES_MAX_LIMIT),
        interval_ms=b.integer("interval_ms", 1, BLOCK_INTERVAL_MS_LIMIT),
    )
    b.done()
    return block


def _raft(top: _Table) -> RaftSettings:
    """[raft] (optional): timing and log compaction, defaults where left out."""
    raft = RaftSettings()
    if "raft" not in top.data:
        top.used.add("raft")
        return raft
    r = top.table("raft")
    raft = RaftSettings(
        tick_ms=r.integer("tick_ms", 5, 10_000, default=raft.tick_ms),
        election_ticks=r.integer("election_ticks", 2, 1_000, default=raft.election_ticks),
        heartbeat_ticks=r.integer("heartbeat_ticks", 1, 1_000,
                                  default=raft.heartbeat_ticks),
        compact_every_entries=r.integer("compact_every_entries", 10, 10_000_000,
                                        default=raft.compact_every_entries),
        compact_keep_entries=r.integer("compact_keep_entries", 0, 10_000_000,
                                       default=raft.compact_keep_entries),
        compact_log_bytes_max=r.integer("compact_log_bytes_max", 1 << 20, 1 << 40,
                                        default=raft.compact_log_bytes_max),
        compact_keep_bytes=r.integer("compact_keep_bytes", 0, 1 << 40,
                                     default=raft.compact_keep_bytes),
    )
    r.done()
    if raft.heartbeat_ticks >= raft.election_ticks:
        raise r.error("heartbeat_ticks", "must be below election_ticks")
    return raft


def _data(top: _Table) -> tuple[str, int]:
    """[data] (optional): the agency store's location and the answer chunk size."""
    if "data" not in top.data:
        top.used.add("data")
        return "", NodeConfig.answer_chunk_bytes
    d = top.table("data")
    agency_store = d.string("agency_store", required=False) or ""
    answer_chunk_bytes = d.integer("answer_chunk_bytes", 256, 768 * 1024,
                                   default=NodeConfig.answer_chunk_bytes)
    d.done()
    return agency_store, answer_chunk_bytes


def _webhook(w: _Table) -> WebhookSettings:
    url = w.req_string("url")
    if not re.match(r"^https?://[^\s/]+", url):
        raise w.error("url", f"{url!r} is not an http:// or https:// URL")
    secret_file = w.string("secret_file", required=False)
    secret_env = w.string("secret_env", ENV_VAR_PATTERN, required=False)
    if (secret_file is None) == (secret_env is None):
        raise w.error("secret_file", "give the HMAC key as secret_file or secret_env "
                                     "(exactly one)")
    defaults = WebhookSettings(url)
    settings = WebhookSettings(
        url=url, secret_file=(resolve_path(w.path.parent, secret_file)
                              if secret_file is not None else None),
        secret_env=secret_env,
        timeout_ms=w.integer("timeout_ms", 100, 120_000, default=defaults.timeout_ms),
        attempts_max=w.integer("attempts_max", 1, 1_000, default=defaults.attempts_max),
        backoff_ms_min=w.integer("backoff_ms_min", 10, 3_600_000,
                                 default=defaults.backoff_ms_min),
        backoff_ms_max=w.integer("backoff_ms_max", 10, 86_400_000,
                                 default=defaults.backoff_ms_max))
    if settings.backoff_ms_max < settings.backoff_ms_min:
        raise w.error("backoff_ms_max", "must not be below backoff_ms_min")
    w.done()
    return settings


def load_profile(path: Path) -> Profile:
    """Read and validate an analyst profile, with every path made absolute."""
    top = _Table(path, _read_toml(path))
    profile = Profile(
        agency=top.req_string("agency", AGENCY_PATTERN),
        subject=top.req_string("subject", SUBJECT_PATTERN),
        node=top.address("node"),
        tls_cert=top.path_value("tls_cert"),
        tls_key=top.path_value("tls_key"),
        ca_bundle=top.path_value("ca_bundle"),
        signing_key=top.path_value("signing_key"),
        credential=top.path_value("credential"),
        passphrase_env=top.string("passphrase_env", ENV_VAR_PATTERN, required=False),
        server_name=top.string("server_name", required=False),
    )
    top.done()
    return profile


def read_signed_genesis(path: Path) -> identity_pb2.SignedGenesis:
    """The SignedGenesis stored at `path` (parsed, not yet verified)."""
    signed = identity_pb2.SignedGenesis()
    try:
        signed.ParseFromString(path.read_bytes())
    except DecodeError as exc:
        raise MalformedInput(f"{path}: not a serialized SignedGenesis: {exc}") from exc
    return signed


# -- writing ---------------------------------------------------------------------------

def _relative(path: Path, base: Path) -> str:
    return os.path.relpath(path.absolute(), base.absolute())


def node_config_to_toml(config: NodeConfig, base: Path) -> dict[str, Any]:
    """The TOML document for `config`, its paths relative to `base`."""
    p = config.paths
    return {
        "agency": config.agency,
        "node_id": config.node_id,
        "log_level": config.log_level,
        **({"join": True} if config.join else {}),
        "listen": {"grpc": config.listen_grpc, "metrics": config.listen_metrics},
        "paths": {
            "data_dir": _relative(p.data_dir, base),
            "genesis": _relative(p.genesis, base),
            "node_key": _relative(p.node_key, base),
            "data_key": _relative(p.data_key, base),
            "tls_cert": _relative(p.tls_cert, base),
            "tls_key": _relative(p.tls_key, base),
            "trust_bundle": (TRUST_FROM_GENESIS if p.trust_bundle is None
                             else _relative(p.trust_bundle, base)),
        },
        "peers": dict(sorted(config.peers.items())),
        "block": {"tx_max": config.block.tx_max, "bytes_max": config.block.bytes_max,
                  "interval_ms": config.block.interval_ms},
        "raft": {"tick_ms": config.raft.tick_ms, "election_ticks": config.raft.election_ticks,
                 "heartbeat_ticks": config.raft.heartbeat_ticks,
                 "compact_every_entries": config.raft.compact_every_entries,
                 "compact_keep_entries": config.raft.compact_keep_entries,
                 "compact_log_bytes_max": config.raft.compact_log_bytes_max,
                 "compact_keep_bytes": config.raft.compact_keep_bytes},
        "data": {"answer_chunk_bytes": config.answer_chunk_bytes,
                 **({"agency_store": config.agency_store} if config.agency_store else {})},
        **({"webhook": _webhook_toml(config.webhook, base)} if config.webhook else {}),
    }


def _webhook_toml(w: WebhookSettings, base: Path) -> dict[str, Any]:
    doc: dict[str, Any] = {"url": w.url, "timeout_ms": w.timeout_ms,
                           "attempts_max": w.attempts_max, "backoff_ms_min": w.backoff_ms_min,
                           "backoff_ms_max": w.backoff_ms_max}
    if w.secret_file is not None:
        doc["secret_file"] = _relative(w.secret_file, base)
    if w.secret_env is not None:
        doc["secret_env"] = w.secret_env
    return doc


def profile_to_toml(profile: Profile, base: Path) -> dict[str, Any]:
    """The TOML document for `profile`, its paths relative to `base`."""
    doc: dict[str, Any] = {
        "agency": profile.agency,
        "subject": profile.subject,
        "node": profile.node,
        "signing_key": _relative(profile.signing_key, base),
        "credential": _relative(profile.credential, base),
        "tls_cert": _relative(profile.tls_cert, base),
        "tls_key": _relative(profile.tls_key, base),
        "ca_bundle": _relative(profile.ca_bundle, base),
    }
    if profile.passphrase_env is not None:
        doc["passphrase_env"] = profile.passphrase_env
    if profile.server_name is not None:
        doc["server_name"] = profile.server_name
    return doc


def _write_toml(path: Path, doc: dict[str, Any], overwrite: bool) -> None:
    data = tomli_w.dumps(doc).encode()
    try:
        with open(path, "wb" if overwrite else "xb") as f:
            f.write(data)
    except FileExistsError as exc:
        raise AlreadyExists(f"{path} already exists") from exc


def write_node_config(path: Path, config: NodeConfig, overwrite: bool = False) -> None:
    _write_toml(path, node_config_to_toml(config, path.parent), overwrite)


def write_profile(path: Path, profile: Profile, overwrite: bool = False) -> None:
    _write_toml(path, profile_to_toml(profile, path.parent), overwrite)
