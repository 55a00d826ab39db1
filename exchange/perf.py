"""Load generation against a running network, counted as etcd's benchmark counts:
closed-loop clients, each keeping one transaction in flight at a time.

Each transaction is a 1 KiB envelope (a probe body with random payload) signed by the
profile's analyst key; it is counted when the node answers that its block committed.
The clients run in several worker processes so that the load generator itself (signing,
gRPC client work) is not the bottleneck of a Python measurement.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc

from exchange.identity.config import Profile
from exchange.identity.keys import CachedSigner

ENVELOPE_BYTES = 1024
# probe payload size that makes the whole serialized envelope 1 KiB
_PAYLOAD_BYTES = ENVELOPE_BYTES - 155


@dataclass
class LoadResult:
    clients: int
    duration_s: float
    committed: int
    errors: int
    tx_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    error_samples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return 0.0
    k = min(len(sorted_values) - 1, max(0, int(round(p * (len(sorted_values) - 1)))))
    return sorted_values[k]


def _open_profile(profile_path: Path) -> tuple[Profile, CachedSigner, str,
                                               grpc.ChannelCredentials]:
    """What a load client needs from an analyst profile laid out as `exchange init`
    writes it: the profile, its signer, the chain id and TLS credentials."""
    from exchange.identity.config import load_profile, read_signed_genesis
    from exchange.identity.keys import read_signing_key
    from exchange.v1 import identity_pb2

    profile = load_profile(profile_path)
    signer = CachedSigner(read_signing_key(profile.signing_key, profile.passphrase()))
    genesis = read_signed_genesis(profile_path.parent.parent / "genesis.pb")
    chain_id = identity_pb2.Genesis.FromString(genesis.genesis).chain_id
    creds = grpc.ssl_channel_credentials(profile.ca_bundle.read_bytes(),
                                         profile.tls_key.read_bytes(),
                                         profile.tls_cert.read_bytes())
    return profile, signer, chain_id, creds


async def _client_loop(assignments: list[tuple[str, int]], duration_s: float,
                       start_at: float, out: list[float], errs: list[str]) -> None:
    """Run, for each (profile, count), `count` closed-loop clients of that profile."""
    await asyncio.gather(*(_profile_clients(Path(p), n, duration_s, start_at, out, errs)
                           for p, n in assignments if n))


async def _profile_clients(profile_path: Path, clients: int, duration_s: float,
                           start_at: float, out: list[float], errs: list[str]) -> None:
    from exchange.ledger.block import new_body, seal_envelope
    from exchange.v1 import node_pb2, node_pb2_grpc

    profile, signer, chain_id, creds = _open_profile(profile_path)
    options = [("grpc.ssl_target_name_override", profile.server_name)] \
        if profile.server_name else []
    channel = grpc.aio.secure_channel(profile.node, creds, options=options)
    stub = node_pb2_grpc.ExchangeStub(channel)
    while time.time() < start_at:
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + duration_s

    async def one_client() -> None:
        while time.monotonic() < deadline:
            body = new_body(chain_id, profile.agency, int(time.time() * 1000))
            body.probe.payload = os.urandom(_PAYLOAD_BYTES)
            envelope = seal_envelope(body, signer)
            started = time.perf_counter()
            try:
                await stub.Submit(node_pb2.SubmitRequest(envelope=envelope), timeout=30)
            except grpc.aio.AioRpcError as exc:
                if len(errs) < 1000:
                    errs.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.05)
                continue
            out.append(time.perf_counter() - started)

    await asyncio.gather(*(one_client() for _ in range(clients)))
    await channel.close()


def _worker(assignments: list[tuple[str, int]], duration_s: float, start_at: float,
            queue: mp.Queue) -> None:  # type: ignore[type-arg]
    out: list[float] = []
    errs: list[str] = []
    try:
        asyncio.run(_client_loop(assignments, duration_s, start_at, out, errs))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        errs.append(repr(exc))
    queue.put((out, errs))


def run_load(profiles: list[Path], clients: int, duration_s: float,
             processes: int | None = None) -> LoadResult:
    """Run `clients` closed-loop clients for `duration_s`, spread over the profiles (one
    per agency node, round robin) and over worker processes."""
    processes = processes or min(clients, max(1, (os.cpu_count() or 2)))
    start_at = time.time() + 2.0  # let every worker connect first
    # client i talks to profile i mod n, and runs in process i mod processes
    plan: list[dict[str, int]] = [{} for _ in range(processes)]
    for i in range(clients):
        profile = str(profiles[i % len(profiles)])
        plan[i % processes][profile] = plan[i % processes].get(profile, 0) + 1
    return _run_workers(_worker,
                        [(sorted(a.items()), duration_s, start_at) for a in plan if a],
                        clients, duration_s)


def _run_workers(target: Callable[..., None], arg_lists: list[tuple[Any, ...]],
                 clients: int, duration_s: float) -> LoadResult:
    """Start one process per argument tuple (each reports (latencies, errors) on the queue
    passed last), wait for them and summarise what the closed-loop clients measured."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    workers = []
    for args in arg_lists:
        proc = ctx.Process(target=target, args=(*args, queue))
        proc.start()
        workers.append(proc)
    latencies: list[float] = []
    errors: list[str] = []
    for _ in workers:
        out, errs = queue.get(timeout=duration_s + 120)
        latencies.extend(out)
        errors.extend(errs)
    for proc in workers:
        proc.join(timeout=10)
    latencies.sort()
    return LoadResult(
        clients=clients, duration_s=duration_s, committed=len(latencies), errors=len(errors),
        tx_per_s=round(len(latencies) / duration_s, 1),
        latency_p50_ms=round(_percentile(latencies, 0.50) * 1000, 1),
        latency_p99_ms=round(_percentile(latencies, 0.99) * 1000, 1),
        latency_max_ms=round((latencies[-1] if latencies else 0) * 1000, 1),
        error_samples=sorted(set(errors))[:5])


def echo_baseline(clients: int, duration_s: float, processes: int | None = None
                  ) -> LoadResult:
    """A plain grpc.aio echo of 1 KiB on loopback (no TLS, no work), measured the same
    way, so the system's overhead over bare gRPC is visible."""
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    port_q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    server = ctx.Process(target=_echo_server, args=(port_q, ready), daemon=True)
    server.start()
    port = port_q.get(timeout=30)
    try:
        processes = processes or min(clients, max(1, (os.cpu_count() or 2)))
        queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        start_at = time.time() + 1.0
        shares = [clients // processes + (1 if i < clients % processes else 0)
                  for i in range(processes)]
        workers = [ctx.Process(target=_echo_worker, args=(port, s, duration_s, start_at, queue))
                   for s in shares if s]
        for w in workers:
            w.start()
        latencies: list[float] = []
        for _ in workers:
            latencies.extend(queue.get(timeout=duration_s + 60))
        for w in workers:
            w.join(timeout=10)
    finally:
        server.terminate()
        server.join(timeout=5)
    latencies.sort()
    return LoadResult(
        clients=clients, duration_s=duration_s, committed=len(latencies), errors=0,
        tx_per_s=round(len(latencies) / duration_s, 1),
        latency_p50_ms=round(_percentile(latencies, 0.5) * 1000, 2),
        latency_p99_ms=round(_percentile(latencies, 0.99) * 1000, 2),
        latency_max_ms=round((latencies[-1] if latencies else 0) * 1000, 2))


def _echo_server(port_q: mp.Queue, ready: object) -> None:  # type: ignore[type-arg]
    async def main() -> None:
        server = grpc.aio.server()

        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            return request

        handler = grpc.method_handlers_generic_handler("bench.Echo", {
            "Echo": grpc.unary_unary_rpc_method_handler(echo)})
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_q.put(port)
        await server.wait_for_termination()
    asyncio.run(main())


def _echo_worker(port: int, clients: int, duration_s: float, start_at: float,
                 queue: mp.Queue) -> None:  # type: ignore[type-arg]
    async def main() -> list[float]:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary("/bench.Echo/Echo")
        payload = os.urandom(ENVELOPE_BYTES)
        out: list[float] = []
        while time.time() < start_at:
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + duration_s

        async def one() -> None:
            while time.monotonic() < deadline:
                t = time.perf_counter()
                await call(payload)
                out.append(time.perf_counter() - t)
        await asyncio.gather(*(one() for _ in range(clients)))
        await channel.close()
        return out
    queue.put(asyncio.run(main()))


def summary_line(r: LoadResult) -> str:
    return (f"{r.clients:>3} clients: {r.tx_per_s:>8,.1f} tx/s  p50 {r.latency_p50_ms:>7.1f} ms  "
            f"p99 {r.latency_p99_ms:>7.1f} ms  max {r.latency_max_ms:>7.1f} ms  "
            f"({r.committed} committed, {r.errors} errors)")


__all__ = ["LoadResult", "echo_baseline", "run_load", "summary_line"]


async def _bulk_loop(profile_path: Path, batch: int, duration_s: float,
                     out: list[tuple[int, float]]) -> None:
    from exchange.ledger.block import new_body, seal_envelope
    from exchange.v1 import node_pb2, node_pb2_grpc

    profile, signer, chain_id, creds = _open_profile(profile_path)
    async with grpc.aio.secure_channel(profile.node, creds, options=[
            ("grpc.max_send_message_length", 64 << 20),
            ("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = node_pb2_grpc.ExchangeStub(channel)
        deadline = time.monotonic() + duration_s
        while time.monotonic() < deadline:
            envelopes = []
            for _ in range(batch):
                body = new_body(chain_id, profile.agency, int(time.time() * 1000))
                body.probe.payload = os.urandom(_PAYLOAD_BYTES)
                envelopes.append(seal_envelope(body, signer))
            started = time.perf_counter()
            res = await stub.SubmitBatch(node_pb2.SubmitBatchRequest(envelopes=envelopes),
                                         timeout=120)
            out.append((sum(1 for r in res.results if r.status == "committed"),
                        time.perf_counter() - started))


def _bulk_worker(profile_path: str, batch: int, duration_s: float,
                 queue: mp.Queue) -> None:  # type: ignore[type-arg]
    out: list[tuple[int, float]] = []
    asyncio.run(_bulk_loop(Path(profile_path), batch, duration_s, out))
    queue.put(out)


def run_bulk(profiles: list[Path], batch: int, duration_s: float) -> LoadResult:
    """One bulk caller per profile, each submitting `batch` envelopes per SubmitBatch
    call and waiting for them all to commit (as a comparison job does)."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    workers = [ctx.Process(target=_bulk_worker, args=(str(p), batch, duration_s, queue))
               for p in profiles]
    started = time.perf_counter()
    for w in workers:
        w.start()
    calls: list[tuple[int, float]] = []
    for _ in workers:
        calls.extend(queue.get(timeout=duration_s + 300))
    elapsed = time.perf_counter() - started
    for w in workers:
        w.join(timeout=10)
    committed = sum(c for c, _ in calls)
    latencies = sorted(t for _, t in calls)
    return LoadResult(
        clients=len(profiles), duration_s=round(elapsed, 1), committed=committed,
        errors=sum(batch - c for c, _ in calls), tx_per_s=round(committed / elapsed, 1),
        latency_p50_ms=round(_percentile(latencies, 0.5) * 1000, 1),
        latency_p99_ms=round(_percentile(latencies, 0.99) * 1000, 1),
        latency_max_ms=round((latencies[-1] if latencies else 0) * 1000, 1))


# -- cross-queries ------------------------------------------------------------------------

@dataclass(frozen=True)
class QueryPlan:
    """What one closed-loop analyst asks, round robin: (target, dataset, key, values)."""

    profile: str
    cosigner_profile: str
    targets: list[tuple[str, str, str, list[str]]]


async def _query_clients(plan: QueryPlan, clients: int, duration_s: float, start_at: float,
                         out: list[float], errs: list[str]) -> None:
    import random

    from exchange.client import Signer
    from exchange.crossquery import QuerySpec, build_query, read_answer
    from exchange.identity.config import load_profile, read_signed_genesis
    from exchange.identity.genesis import verify_genesis
    from exchange.identity.keys import read_signing_key
    from exchange.v1 import node_pb2, node_pb2_grpc

    profile_path = Path(plan.profile)
    profile, key, chain_id, creds = _open_profile(profile_path)
    genesis = verify_genesis(read_signed_genesis(profile_path.parent.parent / "genesis.pb"))
    signer = Signer(profile.agency, profile.subject, chain_id, key)
    supervisor = load_profile(Path(plan.cosigner_profile))
    cosigner = CachedSigner(read_signing_key(supervisor.signing_key, supervisor.passphrase()))
    channel = grpc.aio.secure_channel(profile.node, creds)
    stub = node_pb2_grpc.ExchangeStub(channel)
    rng = random.Random(os.getpid())
    while time.time() < start_at:
        await asyncio.sleep(0.01)
    deadline = time.monotonic() + duration_s

    async def one_client(offset: int) -> None:
        n = offset
        while time.monotonic() < deadline:
            target, dataset, key_name, values = plan.targets[n % len(plan.targets)]
            n += 1
            spec = QuerySpec(target, dataset, ((key_name, rng.choice(values)),),
                             case_id="BENCH-1", purpose="benchmark")
            started = time.perf_counter()
            envelope, qid = build_query(spec, signer, genesis,
                                        [cosigner] if target == "police" else [])
            try:
                r = await stub.Submit(node_pb2.SubmitRequest(envelope=envelope), timeout=30)
                if r.result != "OK":
                    raise RuntimeError(f"query judged {r.result}")
                view = await stub.GetAnswer(node_pb2.GetAnswerRequest(
                    query_tx_id=qid, wait_ms=20_000), timeout=30)
                answer = read_answer(view)
                if answer.status != "answered":
                    raise RuntimeError(f"{answer.status} {view.query.refusal_code} "
                                       f"{view.query.refusal_reason}")
            except (grpc.aio.AioRpcError, RuntimeError) as exc:
                if len(errs) < 1000:
                    errs.append(str(exc)[:200])
                await asyncio.sleep(0.05)
                continue
            out.append(time.perf_counter() - started)

    await asyncio.gather(*(one_client(i) for i in range(clients)))
    await channel.close()


def _query_worker(plans: list[tuple[QueryPlan, int]], duration_s: float, start_at: float,
                  queue: mp.Queue) -> None:  # type: ignore[type-arg]
    out: list[float] = []
    errs: list[str] = []

    async def main() -> None:
        await asyncio.gather(*(_query_clients(p, n, duration_s, start_at, out, errs)
                               for p, n in plans if n))
    try:
        asyncio.run(main())
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        errs.append(repr(exc))
    queue.put((out, errs))


def run_crossqueries(plans: list[QueryPlan], clients: int, duration_s: float,
                     processes: int | None = None) -> LoadResult:
    """`clients` closed-loop analysts (spread over the plans, one per requesting agency)
    each asking a single-subject query, waiting for the answer and decrypting it; the
    latency counted is from building the query to holding the checked rows."""
    processes = processes or min(clients, max(1, (os.cpu_count() or 2)))
    start_at = time.time() + 2.0
    assignment: list[dict[int, int]] = [{} for _ in range(processes)]
    for i in range(clients):
        slot = assignment[i % processes]
        slot[i % len(plans)] = slot.get(i % len(plans), 0) + 1
    return _run_workers(_query_worker,
                        [([(plans[p], n) for p, n in sorted(slot.items())], duration_s,
                          start_at) for slot in assignment if slot],
                        clients, duration_s)
