"""Admission rate limits (decision 15): bytes and transactions per signer and per agency,
with tighter limits for probes, as token buckets.

The limits are the ledger's (genesis parameters, changed by a parameters change a
quorum approves), read from the registry at each admission, so a change takes effect
at the block that applies it. A bucket holds `burst_s` seconds of its rate and refills
continuously; an envelope passes when every bucket it draws on has room, and then
draws on all of them, so a refused envelope costs nothing. One larger than a whole
bucket passes when that bucket is full (it then owes the difference), so a limit below
the envelope size slows a signer down but never locks it out.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from exchange.errors import PermissionDenied, RateLimited
from exchange.identity.registry import ROLE_NODE, KeyInfo
from exchange.ledger.block import OpenedEnvelope
from exchange.node import metrics
from exchange.v1 import identity_pb2

BUCKETS_MAX = 100_000  # idle (full) buckets are dropped beyond this many


@dataclass
class _Bucket:
    level: float  # units available now (may be negative: owed by an oversize envelope)
    at_s: float  # when `level` was measured


@dataclass(frozen=True, slots=True)
class _Draw:
    key: tuple[str, ...]
    what: str  # for the refusal: "signer tax/analyst-1 bytes"
    rate_per_s: float
    cost: float


class AdmissionLimiter:
    """Token buckets for the envelopes one node admits from people (not from nodes)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, ...], _Bucket] = {}
        self._lock = threading.Lock()  # admissions run in worker threads

    def take(self, opened: OpenedEnvelope, signer: KeyInfo,
             limits: identity_pb2.RateLimits) -> None:
        """Count `opened` against its signer's and agency's limits, or raise RateLimited
        (PermissionDenied for a probe where probes are disabled)."""
        is_probe = opened.kind == "probe"
        if is_probe and limits.probes_disabled:
            raise PermissionDenied("probes are disabled on this network (genesis "
                                   "parameter rate_limits.probes_disabled)")
        if signer.subject == ROLE_NODE:
            return
        burst_s = max(1, limits.burst_s)
        size = len(opened.raw)
        who = f"{signer.agency}/{signer.subject}"
        kid = signer.key_id.hex()
        wanted = [
            (("signer-bytes", kid), f"signer {who}: bytes", limits.signer_bytes_per_s, size),
            (("signer-tx", kid), f"signer {who}: transactions", limits.signer_tx_per_s, 1),
            (("agency-bytes", signer.agency), f"agency {signer.agency}: bytes",
             limits.agency_bytes_per_s, size),
            (("agency-tx", signer.agency), f"agency {signer.agency}: transactions",
             limits.agency_tx_per_s, 1),
        ]
        if is_probe:
            wanted += [
                (("probe-bytes", kid), f"signer {who}: probe bytes", limits.probe_bytes_per_s,
                 size),
                (("probe-tx", kid), f"signer {who}: probes", limits.probe_tx_per_s, 1),
            ]
        draws = [_Draw(key, what, float(rate), float(cost))
                 for key, what, rate, cost in wanted if rate > 0]
        with self._lock:
            self._take(draws, burst_s, limits)

    def _take(self, draws: list[_Draw], burst_s: int,
              limits: identity_pb2.RateLimits) -> None:
        now = self._clock()
        wait_s = 0.0
        refused_by: _Draw | None = None
        for draw in draws:
            capacity = draw.rate_per_s * burst_s
            level = self._level(draw.key, capacity, draw.rate_per_s, now)
            need = min(draw.cost, capacity)
            if level < need:
                this_wait = (need - level) / draw.rate_per_s
                if this_wait > wait_s:
                    wait_s, refused_by = this_wait, draw
        if refused_by is not None:
            metrics.RATE_LIMITED.labels(refused_by.key[0]).inc()
            retry_after_ms = max(1, math.ceil(wait_s * 1000))
            rate = (f"{refused_by.rate_per_s / (1 << 20):g} MiB/s"
                    if "bytes" in refused_by.what else f"{refused_by.rate_per_s:g}/s")
            raise RateLimited(f"{refused_by.what} over the admission rate limit of {rate} "
                              f"(burst {burst_s} s); retry after {retry_after_ms / 1000:.3f} s",
                              retry_after_ms)
        for draw in draws:
            self._buckets[draw.key].level -= draw.cost
        if len(self._buckets) > BUCKETS_MAX:
            self._drop_idle(now, limits)

    def _level(self, key: tuple[str, ...], capacity: float, rate_per_s: float,
               now: float) -> float:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(capacity, now)
        else:
            bucket.level = min(capacity, bucket.level + (now - bucket.at_s) * rate_per_s)
            bucket.at_s = now
        return bucket.level

    def _drop_idle(self, now: float, limits: identity_pb2.RateLimits) -> None:
        """Forget buckets untouched for longer than a burst takes to refill (they are
        full again, as a new bucket starts)."""
        idle_s = max(1, limits.burst_s) * 2
        for key in [k for k, b in self._buckets.items() if now - b.at_s > idle_s]:
            del self._buckets[key]
