"""A flood of large probes from one analyst against a local four-node cluster (issue 16,
item 3): every node's RSS before and after, and the latency a second agency's analyst
sees meanwhile. Run from the repository root:

    .venv/bin/python -m bench.flood [--duration-s 60] [--unlimited] [--json]

One analyst of tax sends probes of `--probe-bytes` (default just under the 1 MiB
envelope limit) from `--flooders` threads as fast as its node takes them; a refusal
RATE_LIMITED is waited out for the retry-after it names, so the flood runs at the rate
limit. Meanwhile one closed-loop client of police submits 1 KiB probes and waits for
each to commit. `--unlimited` first lifts every rate limit by a parameters change that
a quorum of roots approves, to show what the memory bounds alone do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from exchange.client import Signer
from exchange.errors import ExchangeError, RateLimited
from exchange.testing.localnet import Cluster

MIB = 1 << 20


def rss_mib(pid: int) -> float:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def node_rss(cluster: Cluster) -> dict[str, float]:
    return {a: round(rss_mib(p.pid), 1) for a, p in sorted(cluster.procs.items())
            if p.poll() is None}


def _p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def probe_latencies(cluster: Cluster, agency: str, stop: threading.Event,
                    out: list[float], errors: list[str]) -> None:
    """One closed-loop client: a 1 KiB probe, wait for its commit, again."""
    with cluster.client(agency, deadline_s=60.0) as client:
        signer = Signer.load(client.profile, client.status().chain_id)
        while not stop.is_set():
            envelope = signer.make_envelope(
                lambda b: setattr(b.probe, "payload", b"q" * 1000))
            started = time.perf_counter()
            try:
                client.submit(envelope, wait=True)
            except ExchangeError as exc:
                errors.append(str(exc))
                continue
            out.append(time.perf_counter() - started)


def flood(cluster: Cluster, agency: str, probe_bytes: int, stop: threading.Event,
          counts: dict[str, int], lock: threading.Lock) -> None:
    """Large probes as fast as the node takes them, waiting out each retry-after."""
    with cluster.client(agency, deadline_s=60.0) as client:
        signer = Signer.load(client.profile, client.status().chain_id)
        payload = b"f" * probe_bytes
        while not stop.is_set():
            envelope = signer.make_envelope(lambda b: setattr(b.probe, "payload", payload))
            try:
                client.submit(envelope, wait=False)
            except RateLimited as exc:
                with lock:
                    counts["refused"] += 1
                stop.wait(max(exc.retry_after_ms, 1) / 1000)
                continue
            except ExchangeError as exc:
                with lock:
                    counts["errors"] += 1
                print(f"flood: {exc}", flush=True)
                stop.wait(0.5)
                continue
            with lock:
                counts["accepted"] += 1
                counts["bytes"] += len(envelope)


def lift_limits(cluster: Cluster, work: Path) -> None:
    """A parameters change, approved by three roots, that removes every rate limit."""
    limits = work / "unlimited.json"
    limits.write_text(json.dumps({"burst_s": 1}))
    change = work / "unlimited.pb"
    steps = [cluster.cli("membership", "propose", "--rate-limits", str(limits),
                         "--out", str(change))]
    approvals = []
    for agency in cluster.agencies[:3]:
        approvals.append(work / f"{agency}.approval")
        steps.append(cluster.run_exchange("membership", "approve", str(change),
                                          "--agency-dir", str(cluster.net / agency),
                                          "--out", str(approvals[-1])))
    steps.append(cluster.cli("membership", "submit", str(change), *map(str, approvals),
                             "--agency-dir", str(cluster.net / cluster.agencies[0])))
    for step in steps:
        if step.returncode != 0:
            raise RuntimeError(step.stderr)


def run(duration_s: float, probe_bytes: int, flooders: int, unlimited: bool,
        settle_s: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="bench-flood-") as root, \
            Cluster(Path(root)) as cluster:
        if unlimited:
            lift_limits(cluster, Path(root))
        with cluster.client("tax") as c:
            limits = c.status().rate_limits
        # a baseline of the quiet network
        stop = threading.Event()
        quiet: list[float] = []
        quiet_errors: list[str] = []
        t = threading.Thread(target=probe_latencies,
                             args=(cluster, "police", stop, quiet, quiet_errors))
        t.start()
        time.sleep(min(10.0, duration_s))
        stop.set()
        t.join()
        rss_before = node_rss(cluster)
        height_before = _height(cluster)

        stop = threading.Event()
        lock = threading.Lock()
        counts = {"accepted": 0, "refused": 0, "errors": 0, "bytes": 0}
        during: list[float] = []
        during_errors: list[str] = []
        threads = [threading.Thread(target=flood,
                                    args=(cluster, "tax", probe_bytes, stop, counts, lock))
                   for _ in range(flooders)]
        threads.append(threading.Thread(target=probe_latencies,
                                        args=(cluster, "police", stop, during, during_errors)))
        started = time.perf_counter()
        for t in threads:
            t.start()
        rss_peak = dict(rss_before)
        leader = cluster.leader()
        samples: list[dict[str, float]] = []
        while time.perf_counter() - started < duration_s:
            time.sleep(1.0)
            now = node_rss(cluster)
            for agency, mib in now.items():
                rss_peak[agency] = max(rss_peak.get(agency, 0.0), mib)
            if len(samples) < int(time.perf_counter() - started) // 10:
                samples.append(now)
                print(f"{time.perf_counter() - started:5.0f} s  RSS MiB {now}",
                      file=sys.stderr, flush=True)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        rss_after = node_rss(cluster)
        time.sleep(settle_s)
        rss_settled = node_rss(cluster)
        return {
            "duration_s": round(elapsed, 1), "probe_bytes": probe_bytes,
            "flooders": flooders, "unlimited": unlimited,
            "limits": {"probe_bytes_per_s": limits.probe_bytes_per_s,
                       "probe_tx_per_s": limits.probe_tx_per_s, "burst_s": limits.burst_s,
                       "signer_bytes_per_s": limits.signer_bytes_per_s},
            "flood_accepted": counts["accepted"], "flood_refused": counts["refused"],
            "flood_errors": counts["errors"],
            "flood_mib": round(counts["bytes"] / MIB, 1),
            "flood_mib_per_s": round(counts["bytes"] / MIB / elapsed, 2),
            "blocks": _height(cluster) - height_before,
            "leader_at_start": leader,
            "rss_before_mib": rss_before, "rss_every_10s_mib": samples,
            "rss_peak_mib": rss_peak,
            "rss_after_mib": rss_after, f"rss_after_{settle_s:g}s_mib": rss_settled,
            "probe_quiet": _latency(quiet, quiet_errors),
            "probe_during_flood": _latency(during, during_errors),
        }


def _height(cluster: Cluster) -> int:
    st = cluster.status("police")
    return st.height if st is not None else 0


def _latency(values: list[float], errors: list[str]) -> dict[str, object]:
    return {"count": len(values), "errors": len(errors),
            "p50_ms": round(_p(values, 0.5) * 1000, 1),
            "p99_ms": round(_p(values, 0.99) * 1000, 1),
            "max_ms": round(max(values, default=0.0) * 1000, 1),
            "mean_ms": round(statistics.fmean(values) * 1000, 1) if values else 0.0,
            **({"error_sample": errors[0]} if errors else {})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=60.0)
    parser.add_argument("--probe-bytes", type=int, default=MIB - 1024)
    parser.add_argument("--flooders", type=int, default=4)
    parser.add_argument("--unlimited", action="store_true",
                        help="lift every rate limit first (a quorum's parameters change)")
    parser.add_argument("--settle-s", type=float, default=10.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run(args.duration_s, args.probe_bytes, args.flooders, args.unlimited,
                 args.settle_s)
    if args.json:
        print(json.dumps(report))
        return
    for key, value in report.items():
        print(f"{key:24} {value}")


if __name__ == "__main__":
    main()
