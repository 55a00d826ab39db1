"""etcd side by side with the cluster part: a four-member etcd 3.4 (Debian package
etcd-server) on loopback, measured with the same closed loop as the project's run.

Each client keeps one Put of a 1 KiB value in flight over etcd's v3 gRPC API
(etcdserverpb.KV/Put) and counts it when etcd acknowledges it, as the project's run
counts a transaction when the node answers that its block committed. The clients are
spread round robin over the four members and over worker processes exactly as
exchange.client.loadgen.run_load spreads them over the four nodes. The request is
encoded here (a PutRequest is two length-delimited fields) so that no etcd client
library is needed: grpcio, which the project already uses, carries it.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from exchange.client.loadgen import (
    ENVELOPE_BYTES,
    ERROR_SAMPLES_KEPT_MAX,
    LoadResult,
    run_workers,
    spread,
)

MEMBERS = ("e1", "e2", "e3", "e4")
PUT_METHOD = "/etcdserverpb.KV/Put"
PUT_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0


def etcd_binary() -> str | None:
    """The etcd server binary on PATH, or None."""
    return shutil.which("etcd")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def put_request(key: bytes, value: bytes) -> bytes:
    """A serialized etcdserverpb.PutRequest{key = 1, value = 2}."""
    return b"\x0a" + _varint(len(key)) + key + b"\x12" + _varint(len(value)) + value


def _free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class EtcdCluster:
    """Four etcd members on loopback, each with its own data directory (fsync on, the
    defaults), started together and stopped (and their data removed) on exit."""

    def __init__(self, binary: str, root: Path) -> None:
        self.binary = binary
        self.root = root
        ports = _free_ports(2 * len(MEMBERS))
        self.client_ports = ports[:len(MEMBERS)]
        self.peer_ports = ports[len(MEMBERS):]
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def endpoints(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.client_ports]

    def __enter__(self) -> EtcdCluster:
        initial = ",".join(f"{name}=http://127.0.0.1:{port}"
                           for name, port in zip(MEMBERS, self.peer_ports, strict=True))
        try:
            for name, cport, pport in zip(MEMBERS, self.client_ports, self.peer_ports,
                                          strict=True):
                log = (self.root / f"{name}.log").open("wb")
                self.procs.append(subprocess.Popen([
                    self.binary, "--name", name, "--data-dir", str(self.root / name),
                    "--listen-client-urls", f"http://127.0.0.1:{cport}",
                    "--advertise-client-urls", f"http://127.0.0.1:{cport}",
                    "--listen-peer-urls", f"http://127.0.0.1:{pport}",
                    "--initial-advertise-peer-urls", f"http://127.0.0.1:{pport}",
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", "bench", "--log-level", "error",
                    "--logger", "zap"],
                    stdout=log, stderr=subprocess.STDOUT))
                log.close()
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_healthy(self) -> None:
        give_up = time.monotonic() + START_TIMEOUT_S
        pending = list(self.client_ports)
        while pending:
            dead = [p.returncode for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"an etcd member exited with code {dead[0]} "
                                   f"(logs in {self.root})")
            if time.monotonic() > give_up:
                raise RuntimeError(f"etcd not healthy within {START_TIMEOUT_S:g} s")
            port = pending[0]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health",
                                            timeout=2) as r:
                    if b'"true"' in r.read():
                        pending.pop(0)
                        continue
            except OSError:
                pass
            time.sleep(0.2)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the members."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for p in self.procs:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


async def _etcd_clients(assignments: list[tuple[str, int]], duration_s: float,
                        start_at: float, out: list[float], errs: list[str]) -> None:
    import grpc

    channels = [grpc.aio.insecure_channel(endpoint) for endpoint, n in assignments if n]
    calls = [ch.unary_unary(PUT_METHOD) for ch in channels]
    while time.time() < start_at:
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + duration_s
    prefix = f"bench/{os.getpid()}/".encode()

    async def one_client(call: grpc.aio.UnaryUnaryMultiCallable, n: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            request = put_request(prefix + f"{n}/{i}".encode(), os.urandom(ENVELOPE_BYTES))
            i += 1
            started = time.perf_counter()
            try:
                await call(request, timeout=PUT_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                if len(errs) < ERROR_SAMPLES_KEPT_MAX:
                    errs.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.05)
                continue
            out.append(time.perf_counter() - started)

    counts = [n for _, n in assignments if n]
    await asyncio.gather(*(one_client(call, c * 1000 + k)
                           for c, (call, n) in enumerate(zip(calls, counts, strict=True))
                           for k in range(n)))
    for ch in channels:
        await ch.close()


def _etcd_worker(assignments: list[tuple[str, int]], duration_s: float, start_at: float,
                 queue: mp.Queue) -> None:  # type: ignore[type-arg]
    out: list[float] = []
    errs: list[str] = []
    try:
        asyncio.run(_etcd_clients(assignments, duration_s, start_at, out, errs))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        errs.append(repr(exc))
    queue.put((out, errs))


def run_etcd_load(endpoints: list[str], clients: int, duration_s: float,
                  processes: int | None = None) -> LoadResult:
    """`clients` closed-loop Put clients for `duration_s`, client i on endpoint
    i mod n, spread over worker processes as run_load spreads its clients."""
    processes = processes or min(clients, max(1, (os.cpu_count() or 2)))
    start_at = time.time() + 2.0
    plan: list[dict[str, int]] = [{} for _ in range(processes)]
    for i, worker in enumerate(spread(clients, len(endpoints), processes)):
        endpoint = endpoints[i % len(endpoints)]
        plan[worker][endpoint] = plan[worker].get(endpoint, 0) + 1
    return run_workers(_etcd_worker, [(sorted(a.items()), duration_s, start_at)
                                      for a in plan if a], clients, duration_s)


def measure(levels: tuple[int, ...], duration_s: float) -> list[tuple[LoadResult, float]]:
    """Start the four members, warm up, then (result, member CPU seconds) per level."""
    binary = etcd_binary()
    assert binary is not None
    with tempfile.TemporaryDirectory() as tmp, EtcdCluster(binary, Path(tmp)) as cluster:
        run_etcd_load(cluster.endpoints, 4, 2.0)
        results = []
        for clients in levels:
            before = cluster.cpu_s()
            r = run_etcd_load(cluster.endpoints, clients, duration_s)
            results.append((r, cluster.cpu_s() - before))
        return results
