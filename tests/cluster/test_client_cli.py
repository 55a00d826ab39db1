"""The node client and the CLI commands that use it.

Tests without a node: profile resolution, signing, local proof checks, error mapping
(an unreachable node is one readable line and exit code 1) and the cluster script's
care to stop only its own processes. Tests marked `cluster` run against a real local
cluster of `exchange node` processes (tests/cluster.py); no part of the node is faked.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner

from exchange.cli.main import _register, cli
from exchange.client import (
    DEFAULT_PROFILE,
    PROFILE_ENV,
    Signer,
    chain_id_for,
    check_transaction,
    find_genesis,
    load_client_profile,
    load_genesis,
    map_rpc_error,
    resolve_profile_path,
)
from exchange.errors import (
    CredentialInvalid,
    ExchangeError,
    InvalidSignature,
    MalformedInput,
    NodeTimeout,
    NodeUnavailable,
    NotFound,
    WrongChain,
)
from exchange.identity.config import Profile, load_profile, write_profile
from exchange.identity.local_network import init_network
from exchange.identity.network import AgencyPaths, NetworkLayout
from exchange.identity.registry import KeyRegistry
from exchange.ledger import merkle
from exchange.ledger.block import open_envelope, verify_envelope
from exchange.testing.localnet import Cluster, free_base_port
from exchange.v1 import ledger_pb2, node_pb2
from tests.support.ledger_net import make_net, write_chain

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SCRIPT = REPO / "scripts" / "cluster.sh"

_register()


# -- a network on ports nobody listens on ------------------------------------------------

@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> NetworkLayout:
    """A network from `exchange init` whose node ports are closed (no node runs)."""
    out = tmp_path_factory.mktemp("client") / "local"
    return init_network(out, base_port=free_base_port(4))


def _tax_profile(net: NetworkLayout) -> Path:
    return net.out_dir / "tax" / "profile.toml"


def _invoke(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), env=env or {PROFILE_ENV: ""},
                                catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# -- profile resolution ------------------------------------------------------------------

def test_profile_option_wins_over_environment_and_default(tmp_path: Path) -> None:
    (tmp_path / DEFAULT_PROFILE).parent.mkdir(parents=True)
    (tmp_path / DEFAULT_PROFILE).write_text("")
    chosen = resolve_profile_path("mine.toml", {PROFILE_ENV: "/elsewhere/env.toml"}, tmp_path)
    assert chosen == tmp_path / "mine.toml"


def test_environment_variable_wins_over_default(tmp_path: Path) -> None:
    (tmp_path / DEFAULT_PROFILE).parent.mkdir(parents=True)
    (tmp_path / DEFAULT_PROFILE).write_text("")
    assert resolve_profile_path(None, {PROFILE_ENV: "/elsewhere/env.toml"}, tmp_path) \
        == Path("/elsewhere/env.toml")


def test_local_network_tax_profile_is_the_default_when_it_exists(tmp_path: Path) -> None:
    (tmp_path / DEFAULT_PROFILE).parent.mkdir(parents=True)
    (tmp_path / DEFAULT_PROFILE).write_text("")
    assert resolve_profile_path(None, {PROFILE_ENV: ""}, tmp_path) == tmp_path / DEFAULT_PROFILE


def test_no_profile_anywhere_names_the_option_and_the_variable(tmp_path: Path) -> None:
    with pytest.raises(MalformedInput) as info:
        resolve_profile_path(None, {}, tmp_path)
    assert "--profile" in str(info.value) and PROFILE_ENV in str(info.value)


def test_cli_without_profile_says_how_to_choose_one(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _invoke("status")
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: no profile:")
    assert "--profile" in err and PROFILE_ENV in err


def test_profile_naming_a_missing_file_is_refused_with_the_key(net: NetworkLayout,
                                                               tmp_path: Path) -> None:
    profile = load_profile(_tax_profile(net))
    broken = Profile(**{**profile.__dict__, "tls_cert": tmp_path / "gone.pem"})
    write_profile(tmp_path / "profile.toml", broken)
    with pytest.raises(MalformedInput, match="tls_cert"):
        load_client_profile(tmp_path / "profile.toml")


# -- genesis and signing -----------------------------------------------------------------

def test_genesis_is_found_for_agency_and_per_subject_profiles(net: NetworkLayout) -> None:
    tax = AgencyPaths(net.out_dir / "tax")
    # each agency holds its own copy of the network's genesis, as on its own machine
    assert find_genesis(tax.profile) == tax.dir / "genesis.pb"
    assert (tax.dir / "genesis.pb").read_bytes() == net.genesis.read_bytes()
    assert find_genesis(tax.subject_profile("supervisor-1")) == tax.dir / "genesis.pb"
    assert chain_id_for(tax.profile) == net.chain_id


def test_profile_away_from_its_network_needs_an_explicit_genesis(net: NetworkLayout,
                                                                 tmp_path: Path) -> None:
    lonely = tmp_path / "a" / "b" / "profile.toml"
    lonely.parent.mkdir(parents=True)
    write_profile(lonely, load_profile(_tax_profile(net)))
    assert find_genesis(lonely) is None
    with pytest.raises(MalformedInput, match="--genesis"):
        load_genesis(lonely)
    assert load_genesis(lonely, net.genesis)[2].chain_id == net.chain_id
    code, _, err = _invoke("chain", "verify", "--profile", str(lonely))
    assert code == 1 and "no genesis found" in err and err.count("\n") == 1


def test_signer_envelopes_verify_under_the_genesis_credential(net: NetworkLayout) -> None:
    path = _tax_profile(net)
    signer = Signer.load(load_client_profile(path), chain_id_for(path))
    raws = [signer.make_envelope(lambda b: b.probe.CopyFrom(ledger_pb2.Probe(payload=b"p")))
            for _ in range(2)]
    registry = KeyRegistry(load_genesis(path)[1])
    opened = [open_envelope(raw, net.chain_id) for raw in raws]
    for env in opened:
        verify_envelope(env, registry.resolve(env.signer_key_id).public_key)
        info = registry.resolve(env.signer_key_id)
        assert (info.agency, info.subject) == ("tax", "analyst-1")
        assert env.body.agency == "tax" and env.kind == "probe"
        assert abs(env.body.created_at_ms - time.time() * 1000) < 60_000
    assert opened[0].tx_id != opened[1].tx_id  # fresh nonce each time


def test_signer_refuses_a_key_its_credential_does_not_certify(net: NetworkLayout) -> None:
    tax = AgencyPaths(net.out_dir / "tax")
    profile = load_profile(tax.profile)
    mixed = Profile(**{**profile.__dict__, "signing_key": tax.signing_key("supervisor-1")})
    with pytest.raises(CredentialInvalid, match="another key"):
        Signer.load(mixed, net.chain_id)


def test_signer_refuses_another_chain(net: NetworkLayout) -> None:
    with pytest.raises(WrongChain, match="chain") as refused:
        Signer.load(load_profile(_tax_profile(net)), "some-other-chain")
    assert refused.value.code == "WRONG_CHAIN"


def test_body_without_a_kind_is_not_signed(net: NetworkLayout) -> None:
    signer = Signer.load(load_profile(_tax_profile(net)), net.chain_id)
    with pytest.raises(MalformedInput, match="no kind"):
        signer.make_envelope(lambda body: None)


# -- local checks of what a node sends -----------------------------------------------------

@pytest.fixture(scope="module")
def stored_chain(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    ledger = make_net(seed=7)
    store = write_chain(ledger, tmp_path_factory.mktemp("tx") / "blocks.db", blocks=3,
                        txs_per_block=5)
    return ledger, store


def _transaction_info(store, height: int, index: int) -> node_pb2.TransactionInfo:  # type: ignore[no-untyped-def]
    """What a node answers for GetTransaction, built from a real store."""
    leaves = store.envelopes(height)
    codes = store.results(height)
    header, sig = store.header(height)
    atts = store.attestations(height)
    tid = open_envelope(leaves[index], "test-chain").tx_id
    return node_pb2.TransactionInfo(
        tx_id=tid, envelope=leaves[index], height=height, index=index, result=codes[index],
        inclusion_proof=merkle.inclusion_proof(leaves, index), header=header,
        proposer_signature=sig, attestations=atts, attested_by=len(atts), quorum=3,
        result_proof=merkle.inclusion_proof([c.encode() for c in codes], index))


def test_transaction_proofs_check_locally(stored_chain) -> None:  # type: ignore[no-untyped-def]
    ledger, store = stored_chain
    registry = KeyRegistry(ledger.signed_genesis)
    info = _transaction_info(store, 2, 3)
    check = check_transaction(info, bytes(info.tx_id), registry)
    assert check.ok, check.problems
    assert check.inclusion and check.result and check.proposer_signature
    assert check.envelope_signature
    assert check.attested_by == ["customs", "pboc", "police", "tax"]


def test_tampered_inclusion_proof_is_reported(stored_chain) -> None:  # type: ignore[no-untyped-def]
    ledger, store = stored_chain
    info = _transaction_info(store, 2, 3)
    proof = list(info.inclusion_proof)
    proof[0] = bytes(32)
    del info.inclusion_proof[:]
    info.inclusion_proof.extend(proof)
    check = check_transaction(info, bytes(info.tx_id), KeyRegistry(ledger.signed_genesis))
    assert not check.ok and not check.inclusion
    assert "tx_root" in check.problems[0]


def test_result_code_the_attestations_did_not_sign_is_reported(stored_chain) -> None:  # type: ignore[no-untyped-def]
    ledger, store = stored_chain
    info = _transaction_info(store, 1, 0)
    info.result = "SIGNER_NOT_VALID"
    check = check_transaction(info, bytes(info.tx_id), KeyRegistry(ledger.signed_genesis))
    assert check.result is False and check.attested_by == []
    assert any("not in any attested results root" in p for p in check.problems)


def test_envelope_other_than_the_one_asked_for_is_reported(stored_chain) -> None:  # type: ignore[no-untyped-def]
    ledger, store = stored_chain
    info = _transaction_info(store, 1, 0)
    check = check_transaction(info, bytes(32), KeyRegistry(ledger.signed_genesis))
    assert not check.ok and "not the transaction asked for" in check.problems[0]


# -- errors --------------------------------------------------------------------------------

class _Failed(grpc.RpcError):  # type: ignore[misc]
    """A failed call's status as grpc reports it (code and details)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details", "error", "words"), [
    (grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; last error: "
     "UNKNOWN: ipv4:127.0.0.1:9: Connection refused", NodeUnavailable, "is not reachable"),
    (grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE: no leader to forward to; retry shortly",
     NodeUnavailable, "is unavailable: no leader to forward to"),
    (grpc.StatusCode.UNAUTHENTICATED, "BAD_SIGNATURE: envelope signature does not verify",
     InvalidSignature, "refused: envelope signature does not verify"),
    (grpc.StatusCode.NOT_FOUND, "NOT_FOUND: no block 9", NotFound, ": no block 9"),
    (grpc.StatusCode.INVALID_ARGUMENT, "body has no kind", MalformedInput, "body has no kind"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", NodeTimeout, "within 10 s"),
])
def test_node_failures_map_to_domain_errors_with_the_servers_reason(
        code: grpc.StatusCode, details: str, error: type[ExchangeError], words: str) -> None:
    mapped = map_rpc_error(_Failed(code, details), "127.0.0.1:9", 10.0)
    assert type(mapped) is error
    assert str(mapped).startswith("node at 127.0.0.1:9") and words in str(mapped)


def test_unreachable_node_is_one_readable_line_and_exit_code_1(net: NetworkLayout) -> None:
    profile = _tax_profile(net)
    address = load_profile(profile).node
    result = subprocess.run([sys.executable, "-m", "exchange.cli.main", "status", "--profile",
                             str(profile)], capture_output=True, text=True, timeout=60,
                            check=False, env={**os.environ, PROFILE_ENV: ""})
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: node at {address} is not reachable")


@pytest.mark.parametrize("args", [
    ("status", "--json"),
    ("submit-probe", "--count", "2"),
    ("tx", "show", "ab" * 32),
    ("block", "show", "tip"),
    ("chain", "verify"),
    ("chain", "follow", "--from", "1"),
])
def test_every_node_command_reports_an_unreachable_node_the_same_way(
        net: NetworkLayout, args: tuple[str, ...]) -> None:
    address = load_profile(_tax_profile(net)).node
    code, out, err = _invoke(*args, "--profile", str(_tax_profile(net)))
    assert code == 1 and out == ""
    assert err.startswith(f"error: node at {address} is not reachable") and err.count("\n") == 1


@pytest.mark.parametrize(("args", "words"), [
    (("tx", "show", "zz"), "not hex"),
    (("tx", "show", "abcd"), "too short: give at least 8 hex digits"),
    (("block", "show", "latest"), "not a number or 'tip'"),
])
def test_bad_arguments_are_refused_before_calling_the_node(
        net: NetworkLayout, args: tuple[str, ...], words: str) -> None:
    code, _, err = _invoke(*args, "--profile", str(_tax_profile(net)))
    assert code == 1 and words in err and err.count("\n") == 1


# -- scripts/cluster.sh stops only its own nodes --------------------------------------------

def _cluster_script(var: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAR": str(var), "NET": str(var / "net")}
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), *args], capture_output=True, text=True,
                          env=env, timeout=60, check=False)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_stop_leaves_a_process_that_is_not_an_exchange_node_alone(
        tmp_path: Path, sleeper: subprocess.Popen[bytes]) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "tax.pid").write_text(f"{sleeper.pid}\n")
    result = _cluster_script(tmp_path, "stop")
    assert result.returncode == 0, result.stderr
    assert "tax: not running" in result.stdout
    assert sleeper.poll() is None
    assert not (tmp_path / "run" / "tax.pid").exists()


def test_stop_terminates_the_exchange_node_it_recorded(tmp_path: Path) -> None:
    # argv reads "... exchange node" like a real node's, without being one
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                             "exchange", "node"])
    try:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "police.pid").write_text(f"{proc.pid}\n")
        result = _cluster_script(tmp_path, "stop")
        assert result.returncode == 0, result.stderr
        assert proc.wait(10) == -signal.SIGTERM
        assert f"police: stopped (pid {proc.pid})" in result.stdout
        assert not list((tmp_path / "run").iterdir())
    finally:
        proc.kill()
        proc.wait()


# -- against a real cluster ----------------------------------------------------------------

@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """Four real nodes for each test (not conftest's one per module: these tests stop
    and restart nodes); stopped (exactly these) whatever happens, their log tails
    printed at teardown, which pytest shows for a failing test."""
    c = Cluster(tmp_path, agencies=4)
    try:
        c.start()
        yield c
    finally:
        c.stop()
        print(c.logs_tail())


def _height(row: dict[str, object]) -> int:
    value = row["height"]
    assert isinstance(value, int)
    return value


def _probe(cluster: Cluster, agency: str = "police", *args: str) -> list[dict[str, object]]:
    result = cluster.cli("submit-probe", "--json", *args, agency=agency)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.cluster
def test_status_of_every_node_names_one_leader_and_all_members(cluster: Cluster) -> None:
    leader = cluster.leader()
    for agency in cluster.agencies:
        st = cluster.cli_json("status", agency=agency)
        assert isinstance(st, dict)
        assert st["agency"] == agency and st["leader"] == leader
        assert st["role"] == ("leader" if agency == leader else "follower")
        assert sorted(st["members"]) == sorted(cluster.agencies) and st["quorum"] == 3
        assert {p["agency"] for p in st["peers"]} == set(cluster.agencies) - {agency}
        assert set(st) >= {"term", "commit_index", "height", "final_height", "tip_hash"}


@pytest.mark.cluster
def test_probes_commit_and_tx_show_checks_their_proofs_locally(cluster: Cluster) -> None:
    rows = _probe(cluster, "police", "--count", "3", "--size", "100")
    assert [r["status"] for r in rows] == ["committed"] * 3
    assert all(r["result"] == "OK" and _height(r) >= 1 for r in rows)
    cluster.wait_height(_height(rows[-1]))
    shown = cluster.cli_json("tx", "show", str(rows[0]["tx_id"]), agency="police")
    assert isinstance(shown, dict)
    assert (shown["height"], shown["index"]) == (rows[0]["height"], rows[0]["index"])
    assert shown["kind"] == "probe" and shown["agency"] == "police"
    assert shown["signer"] == "police/analyst-1" and shown["result"] == "OK"
    assert shown["proof"]["ok"] is True and shown["proof"]["inclusion"] is True
    assert shown["quorum"] == 3 and shown["members"] == 4
    human = cluster.cli("tx", "show", str(rows[0]["tx_id"]), agency="police")
    assert human.returncode == 0 and "proof" in human.stdout and "OK" in human.stdout


@pytest.mark.cluster
def test_batch_probes_and_block_show_list_them_with_their_results(cluster: Cluster) -> None:
    rows = _probe(cluster, "customs", "--count", "4", "--batch")
    assert len(rows) == 4 and all(r["result"] == "OK" for r in rows)
    height = str(rows[0]["height"])
    blk = cluster.cli_json("block", "show", height, agency="customs")
    assert isinstance(blk, dict)
    assert blk["height"] == rows[0]["height"] and blk["tx_root_ok"] is True
    ours = {str(r["tx_id"]) for r in rows if r["height"] == rows[0]["height"]}
    listed = {t["tx_id"]: t for t in blk["transactions"]}
    assert ours <= set(listed)
    assert all(listed[t]["result"] == "OK" and listed[t]["kind"] == "probe" for t in ours)
    tip = cluster.cli_json("block", "show", "tip", agency="customs")
    assert isinstance(tip, dict) and tip["height"] >= blk["height"]


@pytest.mark.cluster
def test_chain_verify_fetches_every_block_and_verifies_it_from_genesis(
        cluster: Cluster) -> None:
    _probe(cluster, "tax", "--count", "3")
    report = cluster.cli_json("chain", "verify", agency="pboc")
    assert isinstance(report, dict)
    assert report["ok"] is True and report["height"] >= 3 and report["transactions"] >= 3
    assert sorted(report["members"]) == sorted(cluster.agencies)
    human = cluster.cli("chain", "verify", agency="pboc")
    assert human.returncode == 0 and "blocks verified" in human.stdout


def _as_from_a_shell() -> None:
    """The follower starts as a terminal's command does: no signal blocked or ignored
    (a test worker's process may have inherited either from what ran in it before)."""
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_state(pid: int) -> str:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError as exc:
        return str(exc)
    return "; ".join(line for line in status.splitlines()
                     if line.startswith(("State", "SigPnd", "ShdPnd", "SigBlk", "SigIgn",
                                         "SigCgt", "Threads")))


@pytest.mark.cluster
def test_chain_follow_streams_blocks_and_ctrl_c_exits_0(cluster: Cluster) -> None:
    _probe(cluster, "tax")
    follow = subprocess.Popen(
        [sys.executable, "-m", "exchange.cli.main", "chain", "follow", "--from", "1", "--json",
         "--profile", str(cluster.profile("tax"))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env,
        preexec_fn=_as_from_a_shell)
    try:
        assert follow.stdout is not None
        first = json.loads(follow.stdout.readline())
        assert first["height"] == 1 and len(first["hash"]) == 64
        _probe(cluster, "police")
        second = json.loads(follow.stdout.readline())
        assert second["height"] == 2
        follow.send_signal(signal.SIGINT)
        try:
            code = follow.wait(60)  # a bound on waiting (a loaded machine is slow)
        except subprocess.TimeoutExpired:
            pytest.fail("chain follow still runs a minute after SIGINT; its signal state: "
                        + _signal_state(follow.pid))
        assert code == 0
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.wait()


@pytest.mark.cluster
def test_after_the_leader_is_killed_probes_commit_and_it_catches_up(cluster: Cluster) -> None:
    old = cluster.leader()
    _probe(cluster, "tax")
    cluster.kill(old, signal.SIGKILL)
    survivor = next(a for a in cluster.agencies if a != old)
    code, _, err = _invoke("status", "--profile", str(cluster.profile(old)))
    assert code == 1 and "is not reachable" in err and err.count("\n") == 1
    new = cluster.wait_ready()
    assert new != old
    rows = _probe(cluster, survivor, "--count", "2", "--retry", "30")
    assert all(r["result"] == "OK" for r in rows)
    cluster.restart(old)
    cluster.wait_height(_height(rows[-1]))
    report = cluster.cli_json("chain", "verify", agency=old)
    assert isinstance(report, dict) and report["ok"] is True


@pytest.mark.cluster
def test_cluster_script_starts_reports_and_stops_its_nodes(tmp_path: Path) -> None:
    var = tmp_path / "var"
    env = {**os.environ, "VAR": str(var), "NET": str(tmp_path / "net"),
           "INIT_ARGS": f"--base-port {free_base_port(4)}", PROFILE_ENV: ""}

    def script(command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(CLUSTER_SCRIPT), command], capture_output=True,
                              text=True, env=env, cwd=REPO, timeout=120, check=False)

    pids: dict[str, int] = {}
    try:
        started = script("start")
        pids = {p.stem: int(p.read_text()) for p in (var / "run").glob("*.pid")}
        assert started.returncode == 0, started.stdout + started.stderr
        assert "export EXCHANGE_PROFILE=" in started.stdout
        assert sorted(pids) == ["customs", "pboc", "police", "tax"]
        status = script("status")
        assert status.returncode == 0 and status.stdout.count("members ") == 4
    finally:
        stopped = script("stop")
    assert stopped.returncode == 0
    assert not list((var / "run").glob("*.pid"))
    for pid in pids.values():
        assert not Path(f"/proc/{pid}/cmdline").exists() or \
            b"exchange" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    shutil.rmtree(tmp_path / "net")
