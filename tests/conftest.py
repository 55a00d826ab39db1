"""What every test shares: the layer markers, given by folder, and the one local cluster.

Folders are layers: tests/unit/<package> (no process started), tests/sim (the seeded
simulation of the production Raft driver), tests/cluster (real `exchange node`
processes on loopback), tests/netns (each node in its own network namespace; needs
root), tests/support (helpers, no tests). Each test is marked with its layer, so
`pytest -m unit` runs the fast ones and `-m "not netns"` skips the root-only ones.

The `cluster` fixture starts one four-node cluster per module and stops exactly the
processes it started. A module shapes it with optional names:

- `CLUSTER_SAMPLE = (seed, companies)`: generated sample data loaded before the start;
- `cluster_setup(cluster)`: called after init (and the sample), before the nodes start,
  e.g. to change a node config;
- `cluster_ready(cluster)`: called once the nodes are up, before the first test.

A module that needs another kind of cluster (a node under libfaketime, nodes that run
test code) defines its own fixture and says why.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from exchange.testing.localnet import Cluster

TESTS = Path(__file__).resolve().parent
LAYERS = ("unit", "sim", "cluster", "netns")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            layer = Path(str(item.fspath)).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue
        if layer in LAYERS:
            item.add_marker(getattr(pytest.mark, layer))


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Four real nodes for the module, shaped by its CLUSTER_SAMPLE, cluster_setup and
    cluster_ready; their log tails are printed at teardown (pytest shows them when a
    test failed)."""
    module = request.module
    c = Cluster(tmp_path_factory.mktemp(module.__name__.rsplit(".", 1)[-1]))
    try:
        sample = getattr(module, "CLUSTER_SAMPLE", None)
        setup = getattr(module, "cluster_setup", None)
        if sample is not None or setup is not None:
            c.init()
        if sample is not None:
            c.load_sample(*sample)
        if setup is not None:
            setup(c)
        c.start()
        ready = getattr(module, "cluster_ready", None)
        if ready is not None:
            ready(c)
        yield c
    finally:
        c.stop()
        print(c.logs_tail())
