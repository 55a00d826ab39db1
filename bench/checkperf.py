"""`exchange check perf` at 1, 16 and 64 clients through the leader's node, on a local
four-node cluster (loopback) and, with root, iproute2 and nftables, on the namespace
network of tests/support/netns.py (each node in its own network namespace, configured by the
key ceremony). Run from the repository root:

    sudo .venv/bin/python -m bench.checkperf [--duration-s 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CLIENTS = (1, 16, 64)
KEYS = ("clients", "committed", "errors", "tx_per_s", "latency_p50_ms", "latency_p99_ms",
        "latency_max_ms")


def _check_perf(profile: Path, clients: int, duration_s: float) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-m", "exchange.cli.main", "check", "perf", "--clients",
         str(clients), "--duration-s", str(duration_s), "--json", "--profile", str(profile)],
        capture_output=True, text=True, check=False, timeout=duration_s + 180)
    try:
        report = json.loads(result.stdout)
    except ValueError as exc:
        raise RuntimeError(f"check perf gave no report: {result.stderr.strip()}") from exc
    return {k: report[k] for k in KEYS}


def loopback(duration_s: float) -> list[dict[str, object]]:
    from exchange.testing.localnet import Cluster

    with tempfile.TemporaryDirectory(prefix="bench-checkperf-") as root, \
            Cluster(Path(root)) as cluster:
        leader = cluster.leader()
        return [{"network": "loopback", **_check_perf(cluster.profile(leader), n, duration_s)}
                for n in CLIENTS]


def namespaces(duration_s: float) -> list[dict[str, object]]:
    from tests.support.netns import NetnsNetwork, missing_requirement

    missing = missing_requirement()
    if missing:
        print(f"namespace network skipped: {missing}", file=sys.stderr)
        return []
    with tempfile.TemporaryDirectory(prefix="bench-checkperf-netns-") as root, \
            NetnsNetwork(Path(root)) as net:
        leader = net.leader()
        return [{"network": "namespaces", **_check_perf(net.profile(leader), n, duration_s)}
                for n in CLIENTS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration-s", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="JSON lines only")
    args = parser.parse_args()
    rows = loopback(args.duration_s)
    if os.geteuid() == 0:
        rows += namespaces(args.duration_s)
    for row in rows:
        if args.json:
            print(json.dumps(row, sort_keys=True))
        else:
            print(f"{row['network']:<11} {row['clients']:>3} clients  {row['tx_per_s']:>7} tx/s  "
                  f"p50 {row['latency_p50_ms']} ms  p99 {row['latency_p99_ms']} ms  "
                  f"max {row['latency_max_ms']} ms  errors {row['errors']}")


if __name__ == "__main__":
    main()
