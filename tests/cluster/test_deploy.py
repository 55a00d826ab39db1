"""deploy/ against what the key ceremony really writes, and `exchange health` against
real nodes.

One ceremony runs for the whole module, with the very `exchange agency init` commands
docs/deploy.md gives (four agencies, each into its own folder, then propose, sign,
finalize and configure through the CLI). The systemd units, the Containerfile, the
compose file and the Kubernetes manifests are then checked against the node.toml it
wrote: the config path a unit or container runs, the folder it may write, the ports,
the mount paths, the user and the health command. Where systemd-analyze, docker compose
(or docker-compose) or kubectl is installed, the files also go through that tool;
otherwise that test skips naming the missing tool. Nothing here builds an image or
needs a container daemon.
"""

from __future__ import annotations

import base64
import fnmatch
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from exchange.cli.health_cmd import _tls_name, check_health, dial_address
from exchange.cli.main import _register, cli
from exchange.compare.jobs import JobsConfig
from exchange.errors import ExchangeError
from exchange.identity.config import RAFT_PORT_OFFSET, load_node_config, parse_address
from exchange.testing.localnet import Cluster

pytestmark = [pytest.mark.xdist_group("deploy")]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCS = REPO / "docs" / "deploy.md"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
SYSTEMD = DEPLOY / "systemd"
KUBERNETES = DEPLOY / "kubernetes"
AGENCIES = ("tax", "police", "customs", "pboc")
CHAIN = "shenzhen-exchange-deploytest"
PASSPHRASE_VAR = "EXCHANGE_PASSPHRASE"
CLI_TIMEOUT_S = 120.0
WAIT_S = 60.0
POLL_S = 0.5
# Where an installed agency folder lives: systemd /srv/exchange/<agency>, a container
# or pod /srv/exchange.
SYSTEMD_ROOT = "/srv/exchange"
CONTAINER_DIR = PurePosixPath("/srv/exchange")
INSTALLED_EXCHANGE = "/opt/exchange/bin/exchange"
# systemd keys newer than some installed systemd-analyze (RestartSteps and
# RestartMaxDelaySec came with systemd 254); older versions warn and ignore them.
NEWER_SYSTEMD_KEYS = {"RestartSteps": 254, "RestartMaxDelaySec": 254}
EXPOSURE_MAX = 2.0  # systemd-analyze security: at most 2.0 of 10 ("OK")
# What a node needs from its agency folder (no root key, no CA key, no analyst key).
NODE_FILES = ("node.toml", "genesis.pb", "keys/node.key", "keys/data.key", "tls/node.pem",
              "tls/node.key", "tls/ca.pem")
NEVER_ON_A_NODE = ("keys/root.key", "tls/ca.key")


def _env() -> dict[str, str]:
    env = {**os.environ, PASSPHRASE_VAR: "deploy-test-passphrase", "PYTHONUNBUFFERED": "1"}
    env.pop("EXCHANGE_PROFILE", None)
    return env


_register()


def exchange(*args: str, cwd: Path | None = None, timeout_s: float = CLI_TIMEOUT_S
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "exchange.cli.main", *args], cwd=cwd,
                          capture_output=True, text=True, env=_env(), timeout=timeout_s,
                          check=False)


def exchange_in_process(*args: str) -> None:
    """One CLI command, run in this process (as the user types it, without another
    interpreter start); it must succeed."""
    result = CliRunner().invoke(cli, list(args), env=_env())
    assert result.exit_code == 0, f"exchange {' '.join(args)}: {result.stderr}"


# -- the ceremony, as docs/deploy.md tells it ------------------------------------------

def documented_init_commands() -> dict[str, list[str]]:
    """The `exchange agency init` command docs/deploy.md gives each agency."""
    commands: dict[str, list[str]] = {}
    for line in DOCS.read_text(encoding="utf-8").splitlines():
        if not line.startswith("exchange agency init "):
            continue
        words = shlex.split(line, comments=True)
        agency = words[words.index("--agency") + 1]
        assert agency not in commands, f"docs/deploy.md initialises {agency} twice"
        commands[agency] = words[1:]
    assert sorted(commands) == sorted(AGENCIES), \
        f"docs/deploy.md gives agency init for {sorted(commands)}"
    return commands


def option(words: Sequence[str], name: str) -> str:
    assert name in words, f"{name} missing from {' '.join(words)}"
    return words[words.index(name) + 1]


def with_option(words: Sequence[str], name: str, value: str) -> list[str]:
    out = list(words)
    out[out.index(name) + 1] = value
    return out


@pytest.fixture(scope="module")
def ceremony(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four agency folders under <root>/srv/exchange/<agency>, from the documented
    commands; the coordinator sees only request.pb, draft and signature files."""
    root = tmp_path_factory.mktemp("ceremony")
    srv = root / "srv" / "exchange"
    coordinator = root / "coordinator"
    srv.mkdir(parents=True)
    coordinator.mkdir()
    inits = []
    for agency, words in documented_init_commands().items():
        assert option(words, "--chain-id") == "$CHAIN"
        assert option(words, "--out") == f"{SYSTEMD_ROOT}/{agency}"
        words = with_option(words, "--chain-id", CHAIN)
        inits.append(with_option(words, "--out", str(srv / agency)))
    for words in inits:
        exchange_in_process(*words)
    requests = []
    for agency in AGENCIES:
        request = coordinator / f"{agency}.req.pb"
        shutil.copyfile(srv / agency / "request.pb", request)
        requests.append(str(request))
    draft = str(coordinator / "draft.pb")
    exchange_in_process("genesis", "propose", *requests, "--out", draft)
    signatures = [str(coordinator / f"{a}.sig") for a in AGENCIES]
    for agency, signature in zip(AGENCIES, signatures, strict=True):
        exchange_in_process("genesis", "sign", draft, "--agency-dir", str(srv / agency),
                            "--out", signature)
    genesis = str(coordinator / "genesis.pb")
    exchange_in_process("genesis", "finalize", draft, *signatures, "--out", genesis)
    for agency in AGENCIES:
        exchange_in_process("agency", "configure", "--agency-dir", str(srv / agency),
                            "--genesis", genesis)
    return srv


def node_toml(ceremony: Path, agency: str) -> dict[str, Any]:
    return tomllib.loads((ceremony / agency / "node.toml").read_text())


def test_documented_ceremony_writes_what_deploy_expects(ceremony: Path) -> None:
    commands = documented_init_commands()
    for agency in AGENCIES:
        folder = ceremony / agency
        words = commands[agency]
        doc = node_toml(ceremony, agency)
        port = int(option(words, "--port"))
        assert doc["listen"]["grpc"] == f"{option(words, '--listen-host')}:{port}"
        assert doc["listen"]["metrics"] == f"{option(words, '--listen-host')}:{port + 1}"
        assert doc["paths"]["data_dir"] == "data"
        for name in NODE_FILES + NEVER_ON_A_NODE:
            assert (folder / name).is_file(), f"{agency}: {name} missing"
        config = load_node_config(folder / "node.toml")
        assert config.paths.data_dir == folder / "data" and config.paths.data_dir.is_dir()
        for other in AGENCIES:
            if other != agency:
                host = option(commands[other], "--host")
                assert config.peers[other] == f"{host}:{option(commands[other], '--port')}"


# -- the health command, against real nodes --------------------------------------------

def test_dial_address_reaches_a_wildcard_listener_on_loopback() -> None:
    assert dial_address("0.0.0.0:7100") == "127.0.0.1:7100"
    assert dial_address("[::]:7100") == "[::1]:7100"
    assert dial_address("172.28.0.11:7100") == "172.28.0.11:7100"
    names = ["localhost", "127.0.0.1", "tax.exchange.local", "172.28.0.11"]
    assert _tls_name("127.0.0.1", names) is None
    assert _tls_name("172.28.0.11", names) is None
    assert _tls_name("10.9.9.9", names) == "localhost"


def _health(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return exchange("health", "--config", str(config), "--timeout", "5", *args)


def _wait_health(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Wait (bounded, polling in this process) until the node answers the check
    `exchange health ARGS` makes, then run that command; its result."""
    caught_up = "--caught-up" in args
    _wait_caught_up(config, caught_up, WAIT_S)
    return _health(config, *args)


def _wait_caught_up(config: Path, caught_up: bool, wait_s: float) -> bool:
    node = load_node_config(config)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            check_health(node, caught_up=caught_up, timeout_s=2.0)
            return True
        except ExchangeError:
            if time.monotonic() > deadline:
                return False
        time.sleep(POLL_S)


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """An initialised network whose nodes the tests start one by one (not conftest's
    cluster, which starts all four)."""
    c = Cluster(tmp_path_factory.mktemp("health"))
    try:
        c.init()
        yield c
    finally:
        c.stop()


@pytest.mark.cluster
def test_health_serves_without_quorum_and_caught_up_needs_a_leader(cluster: Cluster) -> None:
    cluster.start_node("tax")
    config = cluster.node_config("tax")
    listen = load_node_config(config).listen_grpc
    result = _wait_health(config)
    assert result.returncode == 0, result.stderr + cluster.log_tail("tax")
    assert result.stdout.strip() == f"SERVING: node tax at {listen}"
    alone = _health(config, "--caught-up")
    assert alone.returncode == 1
    assert "not caught up: no leader" in _error_line(alone)
    unknown = _health(config, "--service", "no.such.Service")
    assert unknown.returncode == 1 and "does not know" in _error_line(unknown)


@pytest.mark.cluster
def test_health_refuses_a_node_of_another_network(cluster: Cluster, tmp_path: Path) -> None:
    """Same address, certificates of another ceremony: mutual TLS fails both ways."""
    if not cluster.running("tax"):
        cluster.start_node("tax")
    other = tmp_path / "other"
    made = exchange("init", "--out", str(other), "--base-port", str(cluster.base_port))
    assert made.returncode == 0, made.stderr
    assert _wait_health(cluster.node_config("tax")).returncode == 0
    result = _health(other / "tax" / "node.toml")
    assert result.returncode == 1
    assert "CERTIFICATE_VERIFY_FAILED" in _error_line(result)


@pytest.mark.cluster
def test_health_caught_up_through_restore_and_rolling_restart(cluster: Cluster) -> None:
    """The procedures of docs/deploy.md: a node restored with an empty data folder
    catches up from its peers; a rolling restart, one node at a time, waits for
    `exchange health --caught-up` before the next."""
    for agency in AGENCIES:
        if not cluster.running(agency):
            cluster.start_node(agency)
    leader = cluster.wait_ready()
    probe = cluster.cli("submit-probe", "--count", "3", agency="police")
    assert probe.returncode == 0, probe.stderr
    for agency in AGENCIES:
        result = _wait_health(cluster.node_config(agency), "--caught-up", "--json")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["status"] == "SERVING" and report["agency"] == agency
        assert report["leader"] == leader and report["height"] >= 1

    follower = next(a for a in AGENCIES if a != leader)
    height = cluster.status(leader).height  # type: ignore[union-attr]
    cluster.kill(follower, signal.SIGTERM)
    data = load_node_config(cluster.node_config(follower)).paths.data_dir
    shutil.rmtree(data)
    data.mkdir()
    cluster.start_node(follower)
    # the leader, which counted the lost entries as the node's, sends them again
    # (tests/unit/raft/test_raft_core.py pins that without a leader change)
    cluster.wait_ready()
    result = _wait_health(cluster.node_config(follower), "--caught-up", "--json")
    assert result.returncode == 0, result.stderr + cluster.log_tail(follower)
    assert json.loads(result.stdout)["height"] >= height

    leader = cluster.wait_ready()
    # a follower, then the leader (the documented order: the leader last)
    for agency in (next(a for a in AGENCIES if a not in (leader, follower)), leader):
        cluster.restart(agency)
        result = _wait_health(cluster.node_config(agency), "--caught-up")
        assert result.returncode == 0, result.stderr + cluster.log_tail(agency)
        assert result.stdout.startswith(f"SERVING, caught up: node {agency} ")
    probe = cluster.cli("submit-probe", "--count", "2", agency="customs")
    assert probe.returncode == 0, probe.stderr
    cluster.kill("tax", signal.SIGTERM)
    gone = _health(cluster.node_config("tax"))
    assert gone.returncode == 1 and "is not reachable" in _error_line(gone)


# Run a command in a private mount namespace where every file system is read-only but
# one folder: what ProtectSystem=strict + ReadWritePaths=, or a read-only container with
# one writable mount, give the node.
READ_ONLY_BUT = """set -e
keep="$1"; shift
mount --bind "$keep" "$keep"
for m in $(findmnt -rno TARGET | grep -v -e '^/proc' -e '^/sys' -e '^/dev'); do
  [ "$m" = "$keep" ] || mount -o remount,bind,ro "$m"
done
cd /
exec "$@"
"""


def _read_only_namespaces() -> str | None:
    """Why a read-only mount namespace cannot be made here, or None if it can."""
    unshare = shutil.which("unshare")
    if unshare is None or shutil.which("findmnt") is None:
        return "unshare or findmnt is not installed (Debian package util-linux)"
    probe = subprocess.run([unshare, "-m", "--propagation", "private", "true"],
                           capture_output=True, text=True, timeout=60, check=False)
    if probe.returncode != 0:
        return f"cannot make a mount namespace: {probe.stderr.strip()}"
    return None


@pytest.mark.cluster
def test_node_writes_nothing_but_its_data_folder(cluster: Cluster) -> None:
    """A member node started with every file system read-only except node.toml's
    data_dir catches up, commits and applies blocks, and keeps serving."""
    reason = _read_only_namespaces()
    if reason is not None:
        pytest.skip(reason)
    for agency in AGENCIES:
        if not cluster.running(agency):
            cluster.start_node(agency)
    cluster.wait_ready()
    agency = "customs"
    config_path = cluster.node_config(agency)
    data = load_node_config(config_path).paths.data_dir
    cluster.kill(agency, signal.SIGTERM)
    log = cluster.root / "logs" / f"{agency}-read-only.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", READ_ONLY_BUT, "sh",
             str(data), sys.executable, "-m", "exchange.cli.main", "node", "--config",
             str(config_path)], stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        assert _wait_caught_up(config_path, True, WAIT_S), log.read_text()[-3000:]
        before = load_node_config(config_path)
        probe = cluster.cli("submit-probe", "--count", "3", agency=agency)
        assert probe.returncode == 0, probe.stderr + log.read_text()[-3000:]
        result = _wait_health(config_path, "--caught-up", "--json")
        assert result.returncode == 0, result.stderr + log.read_text()[-3000:]
        assert proc.poll() is None, log.read_text()[-3000:]
        assert before.paths.data_dir == data
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "Read-only file system" not in text and "Traceback" not in text, text[-3000:]
    cluster.start_node(agency)


def test_health_rejects_a_malformed_config(tmp_path: Path) -> None:
    bad = tmp_path / "node.toml"
    bad.write_text('agency = "tax"\n')
    result = _health(bad)
    assert result.returncode == 1
    assert str(bad) in _error_line(result)


# -- the container image ---------------------------------------------------------------

def containerfile_stages() -> list[dict[str, Any]]:
    """Each FROM ... AS name with its instructions (continuation lines joined)."""
    text = CONTAINERFILE.read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    stages: list[dict[str, Any]] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, rest = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append({"name": name, "base": words[0], "steps": []})
        elif stages:
            stages[-1]["steps"].append((instruction, rest.strip()))
    return stages


def steps(stage: dict[str, Any], instruction: str) -> list[str]:
    return [rest for ins, rest in stage["steps"] if ins == instruction]


def exec_form(text: str) -> list[str]:
    value = json.loads(text)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), text
    return value


def container_uid() -> int:
    runtime = containerfile_stages()[-1]
    users = steps(runtime, "USER")
    assert users, "the runtime stage sets no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and (not gid or gid.isdigit()), "USER is a fixed numeric uid:gid"
    return int(uid)


def health_command_of_container() -> list[str]:
    runtime = containerfile_stages()[-1]
    (check,) = steps(runtime, "HEALTHCHECK")
    assert "CMD " in check
    return exec_form(check.split("CMD ", 1)[1])


def config_argument(command: Sequence[str]) -> str:
    return command[list(command).index("--config") + 1]


def test_containerfile_is_multi_stage_non_root_with_volume_and_grpc_health() -> None:
    stages = containerfile_stages()
    assert len(stages) >= 2 and stages[0]["name"] == "build"
    runtime = stages[-1]
    assert runtime["name"] == "runtime"
    assert container_uid() not in (0,) and container_uid() == 10001
    # the runtime stage takes only the built environment, not the sources
    for copy in steps(runtime, "COPY"):
        assert copy.startswith("--from=build "), copy
    volumes = [v for text in steps(runtime, "VOLUME") for v in exec_form(text)]
    entry = exec_form(steps(runtime, "ENTRYPOINT")[-1])
    command = entry + exec_form(steps(runtime, "CMD")[-1])
    assert command[:2] == ["exchange", "node"]
    config = PurePosixPath(config_argument(command))
    # the node's only writable folder is the volume: node.toml's data_dir beside it
    assert volumes == [str(config.parent / "data")]
    health = health_command_of_container()
    assert health[:2] == ["exchange", "health"] and config_argument(health) == str(config)


def test_containerfile_generates_protobuf_code_as_the_makefile_does() -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    make_line = next(ln.strip() for ln in makefile.splitlines() if "grpc_tools.protoc" in ln)
    protos = re.search(r"^PROTOS := \$\(wildcard (\S+)\)", makefile, re.M)
    assert protos is not None
    make_args = make_line.split("grpc_tools.protoc", 1)[1].replace("$(PROTOS)",
                                                                   protos.group(1)).split()
    build = containerfile_stages()[0]
    runs = " ".join(steps(build, "RUN"))
    assert "grpc_tools.protoc" in runs
    container_args = runs.split("grpc_tools.protoc", 1)[1].split("&&")[0].split()
    assert container_args == make_args
    # what the build stage copies exists and is not filtered out of the build context
    ignore = (CONTAINERFILE.parent / "Containerfile.dockerignore").read_text().splitlines()
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    for copy in steps(build, "COPY"):
        *sources, _ = copy.split()
        for source in sources:
            assert (REPO / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is not in the build context"


def test_an_installed_package_carries_the_rule_files_the_jobs_runner_reads() -> None:
    """The build stage installs with `pip install .`: the reference rules must be
    package data, or an installed jobs runner finds no rule."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["agents"]
    rules = sorted((REPO / "agents").glob("*/rules/*.yaml"))
    assert rules
    for rule in rules:
        relative = rule.relative_to(REPO / "agents").as_posix()
        assert any(fnmatch.fnmatch(relative, g) for g in globs), relative


# -- compose ---------------------------------------------------------------------------

def compose_command() -> list[str]:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True,
                               check=False, timeout=60)
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    if legacy is not None:
        return [legacy]
    pytest.skip("neither `docker compose` (the docker client's compose plugin) nor "
                "docker-compose is installed (Debian package docker-compose)")


def test_compose_config_matches_the_ceremony(ceremony: Path) -> None:
    env = {**_env(), "EXCHANGE_ROOT": str(ceremony)}
    result = subprocess.run([*compose_command(), "-f", str(COMPOSE), "--profile", "jobs",
                             "config"], capture_output=True, text=True, env=env,
                            timeout=CLI_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    doc = yaml.safe_load(result.stdout)
    services = doc["services"]
    (network_name,) = doc["networks"]
    subnet = ipaddress.ip_network(doc["networks"][network_name]["ipam"]["config"][0]["subnet"])
    commands = documented_init_commands()
    addresses = set()
    for agency in AGENCIES:
        service = services[agency]
        folder = ceremony / agency
        config = load_node_config(folder / "node.toml")
        ip = service["networks"][network_name]["ipv4_address"]
        assert ipaddress.ip_address(ip) in subnet
        addresses.add(ip)
        # the address the ceremony put in genesis, and which the others dial, is this
        # container's; the node listens on it (or on every address) at the same port
        assert option(commands[agency], "--host") == ip
        listen_host, listen_port = parse_address(config.listen_grpc)
        assert listen_host in (ip, "0.0.0.0") and listen_port == int(
            option(commands[agency], "--port"))
        for other in AGENCIES:
            if other != agency:
                assert load_node_config(ceremony / other / "node.toml").peers[agency] == \
                    f"{ip}:{listen_port}"
        assert service["user"] == f"{container_uid()}:{container_uid()}"
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
        command = service["command"]
        assert command[:1] == ["node"]
        in_container = PurePosixPath(config_argument(command))
        health = service["healthcheck"]["test"]
        assert health[0] == "CMD" and health[1:] == health_command_of_container()
        mounts = {PurePosixPath(v["target"]): v for v in _volumes(service)}
        folder_mount = mounts[in_container.parent]
        assert Path(folder_mount["source"]) == folder and folder_mount["read_only"]
        # the one writable mount is node.toml's data_dir, the agency folder's data/
        data_target = in_container.parent / config.paths.data_dir.relative_to(folder)
        assert Path(mounts[data_target]["source"]) == config.paths.data_dir
        assert [t for t, m in mounts.items() if not m["read_only"]] == [data_target]
        jobs = services[f"{agency}-jobs"]
        assert {PurePosixPath(v["target"]): v["source"] for v in _volumes(jobs)} == \
            {t: v["source"] for t, v in mounts.items()}
    assert len(addresses) == len(AGENCIES)


def _volumes(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Compose volumes in long form, whichever form `config` printed."""
    out = []
    for volume in service["volumes"]:
        if isinstance(volume, dict):
            out.append({"source": volume["source"], "target": volume["target"],
                        "type": volume["type"], "read_only": bool(volume.get("read_only"))})
            continue
        source, target, *mode = volume.split(":")
        out.append({"source": source, "target": target,
                    "type": "bind" if source.startswith("/") else "volume",
                    "read_only": mode == ["ro"]})
    return out


# -- systemd ---------------------------------------------------------------------------

def unit_directives(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (systemd allows repeating a key)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path}: {line} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


UNITS = ("exchange-node@.service", "exchange-jobs@.service")


@pytest.mark.parametrize("unit", UNITS)
def test_systemd_unit_is_hardened_and_restarts_with_back_off(unit: str) -> None:
    d = unit_directives(SYSTEMD / unit)
    service, section = d["Service"], d["Unit"]

    def one(key: str) -> str:
        assert key in service, f"{unit}: {key} missing"
        assert len(service[key]) == 1, f"{unit}: {key} given twice"
        return service[key][0]

    assert one("User") == "exchange" and one("Group") == "exchange"
    sysusers = (SYSTEMD / "exchange.sysusers").read_text().split("\n")
    assert any(ln.split()[:2] == ["u", "exchange"] for ln in sysusers if ln.strip())
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
                       "CapabilityBoundingSet": "", "AmbientCapabilities": "",
                       "RestrictSUIDSGID": "yes", "ProtectKernelTunables": "yes",
                       "ProtectControlGroups": "yes", "Restart": "on-failure",
                       "UMask": "0077"}.items():
        assert one(key) == value, f"{unit}: {key}={one(key)!r}, want {value!r}"
    assert one("ReadWritePaths") == f"{SYSTEMD_ROOT}/%i/data"
    assert one("RestartSec") and one("RestartSteps").isdigit() and one("RestartMaxDelaySec")
    assert int(section["StartLimitBurst"][0]) >= 1
    assert section["StartLimitIntervalSec"][0] not in ("0", "infinity")
    assert "@system-service" in service["SystemCallFilter"]


def installed_units(ceremony: Path, tmp_path: Path) -> tuple[Path, Path]:
    """The units as installed on a machine whose /srv/exchange is <tmp>/srv/exchange
    (holding the ceremony's tax folder and a jobs.toml) and whose exchange program is
    this environment's: the real install layout under another root."""
    root = tmp_path / "srv" / "exchange"
    shutil.copytree(ceremony / "tax", root / "tax")
    shutil.copyfile(SYSTEMD / "jobs.toml", root / "tax" / "jobs.toml")
    program = Path(sys.executable).parent / "exchange"
    assert program.is_file() and os.access(program, os.X_OK), program
    units = tmp_path / "units"
    units.mkdir()
    for unit in UNITS:
        text = (SYSTEMD / unit).read_text(encoding="utf-8")
        assert INSTALLED_EXCHANGE in text and f"{SYSTEMD_ROOT}/%i" in text
        text = text.replace(INSTALLED_EXCHANGE, str(program))
        text = text.replace(f"{SYSTEMD_ROOT}/%i", f"{root}/%i")
        (units / unit).write_text(text)
    return units, root


def exec_start(d: dict[str, dict[str, list[str]]], agency: str) -> list[str]:
    (line,) = d["Service"]["ExecStart"]
    return shlex.split(line.replace("%i", agency))


def test_systemd_units_run_the_configured_folder_and_write_only_its_data(
        ceremony: Path, tmp_path: Path) -> None:
    units, root = installed_units(ceremony, tmp_path)
    node_unit = unit_directives(units / "exchange-node@.service")
    argv = exec_start(node_unit, "tax")
    assert argv[1:3] == ["node", "--config"]
    config = load_node_config(Path(config_argument(argv)))
    assert config.agency == "tax" and Path(config_argument(argv)).parent == root / "tax"
    (writable,) = node_unit["Service"]["ReadWritePaths"]
    assert Path(writable.replace("%i", "tax")) == config.paths.data_dir
    assert Path(node_unit["Service"]["WorkingDirectory"][0].replace("%i", "tax")) == \
        root / "tax"
    for path in (config.paths.genesis, config.paths.node_key, config.paths.data_key,
                 config.paths.tls_cert, config.paths.tls_key):
        assert path.is_file() and config.paths.data_dir not in path.parents

    jobs_unit = unit_directives(units / "exchange-jobs@.service")
    argv = exec_start(jobs_unit, "tax")
    assert argv[1:4] == ["jobs", "serve", "--config"]
    jobs = JobsConfig.load(Path(config_argument(argv)))
    profile = tomllib.loads(jobs.profile.read_text())
    assert profile["agency"] == "tax" and profile["subject"] == "automation"
    assert profile.get("passphrase_env") == PASSPHRASE_VAR  # from the unit's EnvironmentFile
    (writable,) = jobs_unit["Service"]["ReadWritePaths"]
    assert Path(writable.replace("%i", "tax")) == config.paths.data_dir
    assert jobs.state_file is not None and config.paths.data_dir in jobs.state_file.parents
    assert Path(jobs.agency_store) == config.paths.data_dir / "agency.db"


def _systemd_version(tool: str) -> int:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, out
    return int(match.group(1))


def test_systemd_analyze_verify_accepts_the_units(ceremony: Path, tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    version = _systemd_version(tool)
    units, _ = installed_units(ceremony, tmp_path)
    instances = [str(units / u.replace("@.", "@tax.")) for u in UNITS]
    result = subprocess.run([tool, "verify", "--man=no", *instances], capture_output=True,
                            text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert result.returncode == 0, result.stderr
    tolerated = {key for key, since in NEWER_SYSTEMD_KEYS.items() if version < since}
    for line in (result.stdout + result.stderr).splitlines():
        unknown = re.search(r"Unknown key '(\w+)'", line)
        assert unknown is not None and unknown.group(1) in tolerated, \
            f"systemd-analyze verify: {line}"
    security = subprocess.run(
        [tool, "security", "--offline=yes", f"--threshold={int(EXPOSURE_MAX * 10)}",
         *instances], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False)
    assert security.returncode == 0, security.stdout[-2000:] + security.stderr
    for unit, level in re.findall(r"Overall exposure level for (\S+): ([\d.]+)",
                                  security.stdout):
        assert float(level) <= EXPOSURE_MAX, f"{unit}: exposure {level}"


# -- Kubernetes ------------------------------------------------------------------------

def kube_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def base_statefulset() -> dict[str, Any]:
    docs = kube_docs((KUBERNETES / "base" / "statefulset.yaml").read_text())
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    return sts


def node_container(sts: dict[str, Any]) -> dict[str, Any]:
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    return container


def test_kubernetes_base_runs_the_image_user_with_mutual_tls_probes() -> None:
    sts = base_statefulset()
    assert sts["spec"]["replicas"] == 1  # one node key, one process
    pod = sts["spec"]["template"]["spec"]
    container = node_container(sts)
    uid = container_uid()
    for context in (pod["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True and context["runAsUser"] == uid
    assert pod["securityContext"]["fsGroup"] == uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind])
    health = health_command_of_container()
    config = config_argument(container["args"])
    assert container["args"][:1] == ["node"]
    assert config == config_argument(health)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = container[probe]["exec"]["command"]
        assert command[:2] == ["exchange", "health"] and config_argument(command) == config
    assert "--caught-up" in container["readinessProbe"]["exec"]["command"]
    assert "--caught-up" not in container["livenessProbe"]["exec"]["command"]
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts[claim["metadata"]["name"]]["mountPath"] == \
        str(PurePosixPath(config).parent / "data")
    services = kube_docs((KUBERNETES / "base" / "service.yaml").read_text())
    grpc = [s for s in services if any(p["name"] == "grpc" for p in s["spec"]["ports"])]
    assert grpc and all(s["spec"].get("publishNotReadyAddresses") for s in grpc)


def kustomize_command() -> list[str]:
    kubectl = shutil.which("kubectl")
    if kubectl is not None:
        return [kubectl, "kustomize"]
    kustomize = shutil.which("kustomize")
    if kustomize is not None:
        return [kustomize, "build"]
    pytest.skip("neither kubectl (Debian package kubernetes-client) nor kustomize is "
                "installed")


def _mounted_file(container: dict[str, Any], volumes: dict[str, dict[str, Any]],
                  objects: dict[tuple[str, str], dict[str, Any]], path: PurePosixPath
                  ) -> bytes:
    """The bytes the pod sees at `path`: from the ConfigMap or Secret mounted there."""
    for mount in container["volumeMounts"]:
        target = PurePosixPath(mount["mountPath"])
        volume = volumes[mount["name"]]
        if "subPath" in mount:
            if target != path:
                continue
            key = mount["subPath"]
        else:
            if target not in path.parents:
                continue
            inside = path.relative_to(target).as_posix()
            items = (volume.get("secret") or volume.get("configMap") or {}).get("items")
            if items is None:
                key = inside
            else:
                matched = [i["key"] for i in items if i["path"] == inside]
                assert matched, f"{path}: nothing mounted at {inside} of {mount['name']}"
                key = matched[0]
        if "secret" in volume:
            secret = objects[("Secret", volume["secret"]["secretName"])]
            return base64.b64decode(secret["data"][key])
        if "configMap" in volume:
            cm = objects[("ConfigMap", volume["configMap"]["name"])]
            if key in cm.get("binaryData", {}):
                return base64.b64decode(cm["binaryData"][key])
            return str(cm["data"][key]).encode()
        raise AssertionError(f"{path} is on volume {mount['name']}, not a file source")
    raise AssertionError(f"nothing is mounted at {path}")


def test_kubernetes_overlays_give_each_node_exactly_its_configured_files(
        ceremony: Path, tmp_path: Path) -> None:
    command = kustomize_command()
    tree = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, tree)
    for agency in AGENCIES:
        folder = ceremony / agency
        # the node's files, as docs/deploy.md copies them into the overlay
        for name in NODE_FILES:
            target = tree / "overlays" / agency / "agency" / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / name, target)
        result = subprocess.run([*command, str(tree / "overlays" / agency)],
                                capture_output=True, text=True, timeout=CLI_TIMEOUT_S,
                                check=False)
        assert result.returncode == 0, result.stderr
        docs = kube_docs(result.stdout)
        objects = {(d["kind"], d["metadata"]["name"]): d for d in docs}
        namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
        assert namespaces == {f"exchange-{agency}"}
        sts = objects[("StatefulSet", "exchange-node")]
        container = node_container(sts)
        volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
        config_path = PurePosixPath(config_argument(container["args"]))
        config = load_node_config(folder / "node.toml")
        # node.toml in the pod is the agency's, and every path it names resolves, in
        # the pod, to the very file the ceremony wrote there
        assert _mounted_file(container, volumes, objects, config_path) == \
            (folder / "node.toml").read_bytes()
        for path in (config.paths.genesis, config.paths.node_key, config.paths.data_key,
                     config.paths.tls_cert, config.paths.tls_key):
            inside = config_path.parent / path.relative_to(folder).as_posix()
            assert _mounted_file(container, volumes, objects, inside) == path.read_bytes(), \
                f"{agency}: {inside}"
        data = config_path.parent / config.paths.data_dir.relative_to(folder).as_posix()
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert {m["name"] for m in container["volumeMounts"]
                if PurePosixPath(m["mountPath"]) == data} == {claim["metadata"]["name"]}
        # the pod listens on every address, at the port the container and Service expose
        host, port = parse_address(config.listen_grpc)
        assert host == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == port
        assert ports["metrics"] == parse_address(config.listen_metrics)[1]
        assert ports["raft"] == port + RAFT_PORT_OFFSET
        service = objects[("Service", "exchange-grpc")]
        assert [p["targetPort"] for p in service["spec"]["ports"]] == ["grpc", "raft"]
        # no root key, CA key or analyst key reaches the cluster
        secrets = [base64.b64decode(v) for d in docs if d["kind"] == "Secret"
                   for v in d.get("data", {}).values()]
        for name in NEVER_ON_A_NODE:
            assert (folder / name).read_bytes() not in secrets
        for key in (folder / "analysts").glob("*.key"):
            assert key.read_bytes() not in secrets
