"""A node whose clock is five minutes ahead (libfaketime, a real clock at the edge):
what it is asked to admit is refused with the reason, it neither leads nor campaigns
once its peers' clocks disagree with it, followers refuse to acknowledge blocks dated in
their future, and the network goes on with correct block times."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.testing.localnet import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("clock")]

# libfaketime preloaded into the node process itself (not the `faketime` wrapper, whose
# child a signal to the wrapper would not reach)
LIBFAKETIME = next((p for p in (Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"),
                                Path("/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"),
                                Path("/usr/lib/faketime/libfaketime.so.1")) if p.exists()),
                   None)
SKEW = {"FAKETIME": "+5m", "DONT_FAKE_MONOTONIC": "1"}
WAIT_S = 60.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if LIBFAKETIME is None:
        pytest.skip("needs libfaketime (Debian package faketime)")
    c = Cluster(tmp_path_factory.mktemp("clock"))
    try:
        c.init()
        # police's machine runs five minutes ahead from the start: it may even win the
        # first election before it can compare clocks with its peers
        for agency in c.agencies:
            c.start_node(agency, env={"LD_PRELOAD": str(LIBFAKETIME), **SKEW}
                         if agency == "police" else None)
        c.wait_ready(WAIT_S)
        yield c
    finally:
        c.stop()


def _probe(cluster: Cluster, agency: str) -> tuple[int, str]:
    result = cluster.cli("submit-probe", "--json", "--timeout", "20", agency=agency)
    return result.returncode, result.stdout + result.stderr


def _leader_once_the_clock_is_noticed(cluster: Cluster) -> str:
    """The leader after the skewed node noticed its clock (whichever test runs first)."""
    deadline = time.monotonic() + WAIT_S
    while "clock disagrees with its peers" not in cluster.log_tail("police", 400):
        assert time.monotonic() < deadline, cluster.log_tail("police")
        time.sleep(0.5)
    # it hands leadership over if it had it (which takes a moment), and never takes
    # it again
    while (leader := cluster.wait_ready(WAIT_S)) == "police":
        assert time.monotonic() < deadline, cluster.log_tail("police")
        time.sleep(0.5)
    return leader


def test_a_node_whose_clock_is_off_stops_leading_and_the_network_goes_on(
        cluster: Cluster) -> None:
    leader = _leader_once_the_clock_is_noticed(cluster)
    for _ in range(3):
        code, out = _probe(cluster, "customs")
        assert code == 0, out
        assert json.loads(out)["result"] == "OK"
    # the same leader after those commits: the skewed node did not take the lead back
    assert cluster.wait_ready(WAIT_S) == leader
    # the clients on its own (correct) machines are refused by it, with the reason
    code, out = _probe(cluster, "police")
    assert code != 0 and ("TIME_OUT_OF_WINDOW" in out or "window" in out), out
    # nothing on the chain is dated in the future (block times never go back, so the
    # tip's time bounds every block's)
    tip = cluster.cli_json("block", "show", "tip", agency="tax")
    assert isinstance(tip, dict)
    assert tip["timestamp_ms"] <= int(time.time() * 1000) + 5_000, tip
    assert cluster.cli("chain", "verify", agency="tax").returncode == 0


def test_the_node_whose_clock_is_off_still_follows_the_chain(cluster: Cluster) -> None:
    leader = _leader_once_the_clock_is_noticed(cluster)
    code, out = _probe(cluster, leader)
    assert code == 0, out
    height = json.loads(out)["height"]
    cluster.wait_height(height, timeout_s=WAIT_S)
    assert "police" in cluster.live()
