"""A leader that leaves a submission out is found out (issue 16, item 8c; decision 3):
the follower that admitted it watches for its inclusion, forwards it again and again,
and raises the alarm (exchange_transactions_reforwarded and a warning in its log); once
a leader includes it, it commits and the submitter learns where.

Every node runs tests/support/omitting_node.py, which, while a flag file exists, leaves out of
the blocks it cuts as leader the probes marked "omit:"; the follower's side is the
production code."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from exchange.client import Signer
from exchange.errors import NotFound
from exchange.identity.config import load_node_config
from exchange.ledger.block import tx_id
from exchange.testing.localnet import Cluster
from exchange.v1 import ledger_pb2

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("leader_omission")]

WAIT_S = 60.0
REFORWARDED = "exchange_transactions_reforwarded_total"
REPO = Path(__file__).resolve().parents[2]


class OmittingCluster(Cluster):
    """A cluster whose nodes run through tests.support.omitting_node."""

    def __init__(self, root: Path, flag: Path) -> None:
        super().__init__(root)
        self.env["EXCHANGE_TEST_OMIT"] = str(flag)
        self.env["PYTHONPATH"] = str(REPO) + (
            ":" + self.env["PYTHONPATH"] if self.env.get("PYTHONPATH") else "")

    def start_node(self, agency: str, env: Mapping[str, str] | None = None) -> None:
        assert agency in self.agencies, agency
        log = open(self.log_path(agency), "ab")  # noqa: SIM115 - closed in _reap
        log.write(f"=== start {time.strftime('%H:%M:%S')}\n".encode())
        log.flush()
        self._logs[agency] = log
        self.procs[agency] = subprocess.Popen(
            [sys.executable, "-m", "tests.support.omitting_node", "node", "--config",
             str(self.node_config(agency))],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**self.env, **(env or {})}, cwd=self.root)


@pytest.fixture(scope="module")
def flag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("omit") / "omit-now"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, flag: Path) -> Iterator[Cluster]:
    """Nodes running tests.support.omitting_node (not conftest's cluster of real nodes)."""
    c = OmittingCluster(tmp_path_factory.mktemp("omission"), flag)
    try:
        c.start()
        yield c
    finally:
        c.stop()


def _wait(what: str, check: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def _metric(cluster: Cluster, agency: str, name: str) -> float:
    address = load_node_config(cluster.node_config(agency)).listen_metrics
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _committed(cluster: Cluster, agency: str, tx: bytes) -> bool:
    with cluster.client(agency) as client:
        try:
            client.get_transaction(tx)
        except NotFound:
            return False
    return True


def test_follower_reforwards_what_the_leader_leaves_out_and_raises_the_alarm(
        cluster: Cluster, flag: Path) -> None:
    leader = cluster.leader()
    follower = next(a for a in cluster.agencies if a != leader)
    with cluster.client(follower) as client:
        signer = Signer.load(client.profile, client.status().chain_id)
        censored = signer.make_envelope(lambda b: setattr(b.probe, "payload", b"omit: me"))
        honest = signer.make_envelope(lambda b: setattr(b.probe, "payload", b"honest"))
        censored_id = tx_id(ledger_pb2.Envelope.FromString(censored).body)
        before = _metric(cluster, follower, REFORWARDED)
        flag.touch()
        assert client.submit(censored, wait=False).status == "accepted"
        # the leader includes what it does not censor, in blocks after the censored one
        assert client.submit(honest, wait=True).result == "OK"
        _wait("the follower forwarding the left-out transaction again",
              lambda: _metric(cluster, follower, REFORWARDED) > before)
        assert not _committed(cluster, follower, censored_id)
        log = cluster.log_path(follower).read_text(encoding="utf-8")
        assert "re-forwarding transactions the leader has not included" in log
        # it keeps trying (and counting) while the leader keeps leaving it out
        again = _metric(cluster, follower, REFORWARDED)
        _wait("a second re-forward", lambda: _metric(cluster, follower, REFORWARDED) > again)
        assert not _committed(cluster, follower, censored_id)
        # once the leader includes it, it commits on every node
        flag.unlink()
        for agency in cluster.agencies:
            def there(agency: str = agency) -> bool:
                return _committed(cluster, agency, censored_id)

            _wait(f"the re-forwarded transaction committed at {agency}", there)
        # the submitter's answer: the original outcome, where it committed
        result = client.submit(censored, wait=True)
        assert result.duplicate and result.result == "OK" and result.height > 0
