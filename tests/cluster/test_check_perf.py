"""`exchange check perf`: the load levels and their PASS/FAIL rule, the command's answers
when it cannot run (bad arguments, bad profile, no node), and a real run against a local
four-node cluster whose result is checked against the chain itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from exchange.cli.main import _register, cli
from exchange.client import PROFILE_ENV, Signer, chain_id_for, load_client_profile
from exchange.client.loadgen import (
    ENVELOPE_BYTES,
    LOAD_LEVELS,
    LoadFailed,
    LoadResult,
    judge,
    run_workers,
)
from exchange.identity.config import load_profile
from exchange.identity.local_network import init_network
from exchange.identity.network import NetworkLayout
from exchange.ledger.block import tx_id
from exchange.testing.localnet import Cluster, free_base_port
from exchange.v1 import ledger_pb2

_register()

REPORT_KEYS = {"clients", "committed", "errors", "tx_per_s", "latency_p50_ms",
               "latency_p99_ms", "latency_max_ms", "duration_s", "load", "pass", "reasons",
               "limits", "node", "error_samples", "envelope_bytes", "throttled"}


def _result(**changes: object) -> LoadResult:
    """A run that meets every level's limits; tests change one figure at a time."""
    good = LoadResult(clients=8, duration_s=30.0, committed=30_000, errors=0,
                      tx_per_s=1000.0, latency_p50_ms=5.0, latency_p99_ms=10.0,
                      latency_max_ms=20.0)
    return replace(good, **changes)  # type: ignore[arg-type]


# -- levels and the PASS/FAIL rule -----------------------------------------------------------

def test_levels_grow_from_s_to_l_and_each_sets_a_floor_and_a_ceiling() -> None:
    assert list(LOAD_LEVELS) == ["s", "m", "l"]
    s, m, l_ = LOAD_LEVELS["s"], LOAD_LEVELS["m"], LOAD_LEVELS["l"]
    assert s.clients < m.clients < l_.clients
    assert s.tx_per_s_min < m.tx_per_s_min < l_.tx_per_s_min
    assert s.latency_p99_ms_max < m.latency_p99_ms_max < l_.latency_p99_ms_max
    for name, level in LOAD_LEVELS.items():
        assert level.name == name and level.duration_s > 0
        assert level.tx_per_s_min > 0 and level.latency_p99_ms_max > 0


@pytest.mark.parametrize("name", list(LOAD_LEVELS))
def test_a_run_at_exactly_the_levels_limits_passes(name: str) -> None:
    level = LOAD_LEVELS[name]
    assert judge(_result(tx_per_s=level.tx_per_s_min,
                         latency_p99_ms=level.latency_p99_ms_max), level) == []


@pytest.mark.parametrize("name", list(LOAD_LEVELS))
def test_throughput_below_the_levels_floor_fails_naming_both_figures(name: str) -> None:
    level = LOAD_LEVELS[name]
    reasons = judge(_result(tx_per_s=level.tx_per_s_min - 0.1), level)
    assert len(reasons) == 1
    assert "throughput" in reasons[0] and f"{level.tx_per_s_min - 0.1:g}" in reasons[0]
    assert f"{level.tx_per_s_min:g} tx/s" in reasons[0] and f"load {name}" in reasons[0]


@pytest.mark.parametrize("name", list(LOAD_LEVELS))
def test_p99_above_the_levels_ceiling_fails(name: str) -> None:
    level = LOAD_LEVELS[name]
    reasons = judge(_result(latency_p99_ms=level.latency_p99_ms_max + 0.1), level)
    assert len(reasons) == 1 and "p99" in reasons[0]
    assert f"{level.latency_p99_ms_max:g} ms" in reasons[0]


def test_any_error_fails_even_when_fast_and_names_a_sample() -> None:
    reasons = judge(_result(errors=1, error_samples=["UNAVAILABLE: no leader"]),
                    LOAD_LEVELS["s"])
    assert reasons == ["1 submission failed (e.g. UNAVAILABLE: no leader)"]


def test_a_run_that_committed_nothing_fails_with_or_without_a_level() -> None:
    empty = _result(committed=0, tx_per_s=0.0, latency_p50_ms=0.0, latency_p99_ms=0.0,
                    latency_max_ms=0.0)
    assert judge(empty, None) == ["no transaction committed"]
    # no throughput or latency verdict on figures that do not exist
    assert judge(empty, LOAD_LEVELS["l"]) == ["no transaction committed"]


def test_a_custom_client_count_is_judged_only_on_errors_and_commits() -> None:
    slow = _result(tx_per_s=1.0, latency_p99_ms=60_000.0)
    assert judge(slow, None) == []
    assert len(judge(slow, LOAD_LEVELS["s"])) == 2


def _dying_worker(queue: object) -> None:
    os._exit(3)


def test_a_load_worker_that_dies_is_reported_not_waited_for() -> None:
    with pytest.raises(LoadFailed, match="exited with code 3"):
        run_workers(_dying_worker, [()], clients=1, duration_s=600.0)


# -- the command when it cannot run -----------------------------------------------------------

@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> NetworkLayout:
    """A network from `exchange init` whose node ports are closed (no node runs)."""
    return init_network(tmp_path_factory.mktemp("checkperf") / "local",
                        base_port=free_base_port(4))


def _invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["check", "perf", *args], env={PROFILE_ENV: ""},
                                catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_load_and_clients_together_are_refused_before_anything_runs() -> None:
    code, out, err = _invoke("--load", "m", "--clients", "4")
    assert code == 1 and out == ""
    assert err == "error: give --load or --clients, not both\n"


@pytest.mark.parametrize(("args", "words"), [
    (("--load", "xl"), "Invalid value for '--load'"),
    (("--clients", "0"), "Invalid value for '--clients'"),
    (("--duration-s", "0"), "Invalid value for '--duration-s'"),
])
def test_out_of_range_options_are_usage_errors(args: tuple[str, ...], words: str) -> None:
    code, out, err = _invoke(*args)
    assert code == 2 and out == "" and words in err


def test_a_missing_profile_is_one_readable_line(tmp_path: Path) -> None:
    code, out, err = _invoke("--profile", str(tmp_path / "nowhere.toml"), "--json")
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "nowhere.toml" in err


def test_an_unreachable_node_is_a_fail_with_one_line_and_a_json_report(
        net: NetworkLayout) -> None:
    profile = net.out_dir / "tax" / "profile.toml"
    address = load_profile(profile).node
    code, out, err = _invoke("--profile", str(profile), "--clients", "2", "--duration-s",
                             "1", "--json")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(f"FAIL: node at {address} is not reachable")
    report = json.loads(out)
    assert set(report) >= REPORT_KEYS
    assert report["pass"] is False and report["committed"] == 0 and report["clients"] == 2
    assert report["reasons"] == [err.removeprefix("FAIL: ").strip()]
    assert report["node"] == {"address": address}
    # and without --json: nothing on stdout, the same line on stderr
    code, out, err2 = _invoke("--profile", str(profile), "--load", "s")
    assert code == 1 and out == "" and err2 == err


# -- a real run on a real cluster ------------------------------------------------------------



def _probes_on_chain(cluster: Cluster, agency: str, first: int, last: int,
                     key_id: bytes) -> list[bytes]:
    """The envelopes of probe transactions signed by `key_id` in blocks first..last, as
    the agency's node serves them."""
    found: list[bytes] = []
    with cluster.client(agency) as client:
        for height in range(first, last + 1):
            for raw in client.get_block(height).envelopes:
                env = ledger_pb2.Envelope.FromString(raw)
                body = ledger_pb2.TxBody.FromString(env.body)
                if body.WhichOneof("kind") == "probe" and bytes(env.signer_key_id) == key_id:
                    found.append(bytes(raw))
    return found


@pytest.mark.cluster
@pytest.mark.xdist_group("check_perf")
def test_check_perf_commits_what_it_reports_on_the_chain(cluster: Cluster) -> None:
    leader = cluster.leader()
    entry = next(a for a in cluster.agencies if a != leader)  # submissions are forwarded
    profile_path = cluster.profile(entry)
    with cluster.client(entry) as client:
        analyst_key = Signer.load(load_client_profile(profile_path),
                                  chain_id_for(profile_path, client)).key.key_id
        height_before = client.status().height

    run = cluster.cli("check", "perf", "--clients", "4", "--duration-s", "2", "--json",
                      agency=entry)
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert set(report) >= REPORT_KEYS
    assert report["load"] == "custom" and report["limits"] is None
    assert report["clients"] == 4 and report["duration_s"] == 2.0
    assert report["errors"] == 0 and report["pass"] is True and report["reasons"] == []
    assert report["committed"] > 0
    assert report["tx_per_s"] == round(report["committed"] / 2.0, 1)
    assert 0 < report["latency_p50_ms"] <= report["latency_p99_ms"] <= report["latency_max_ms"]
    assert report["node"]["agency"] == entry and report["node"]["leader"] == leader

    # A probe from another key, committed after every probe of the run: once the entry
    # node holds its block, it holds all of theirs.
    marker = cluster.cli("submit-probe", "--json", agency=leader)
    assert marker.returncode == 0, marker.stderr
    marker_height = json.loads(marker.stdout.splitlines()[0])["height"]
    cluster.wait_height(marker_height, [entry])
    on_chain = _probes_on_chain(cluster, entry, height_before + 1, marker_height, analyst_key)
    ids = {tx_id(ledger_pb2.Envelope.FromString(raw).body) for raw in on_chain}
    assert len(ids) == len(on_chain) == report["committed"]
    assert all(len(raw) == ENVELOPE_BYTES for raw in on_chain)


@pytest.mark.cluster
@pytest.mark.xdist_group("check_perf")
def test_the_installed_command_reads_the_profile_from_the_environment(
        cluster: Cluster) -> None:
    """As operators run it: the `exchange` entry point, profile from $EXCHANGE_PROFILE."""
    exe = Path(sys.executable).parent / "exchange"
    env = {**os.environ, PROFILE_ENV: str(cluster.profile("customs"))}
    run = subprocess.run([str(exe), "check", "perf", "--clients", "2", "--duration-s", "1"],
                         capture_output=True, text=True, env=env, cwd=cluster.root,
                         timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("load custom: 2 closed-loop clients for 1 s")
    assert "signed by customs/analyst-1" in lines[0]
    assert "PASS: no errors" in lines and lines[-1] == "PASS"
