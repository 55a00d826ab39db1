"""Admission rate limits (issue 16, item 3): per signer and per agency, bytes and
transactions, probes tighter, on the ledger and changed by a quorum like membership."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from exchange.errors import PermissionDenied, RateLimited
from exchange.identity.genesis import DEFAULT_RATE_LIMITS
from exchange.identity.keys import CachedSigner, Domain
from exchange.identity.registry import membership_change_statement
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import RESULT_OK, new_body, open_envelope, seal_envelope
from exchange.ledger.judge import CODE_REJECTED
from exchange.ledger.store import BlockStore
from exchange.node.ratelimit import AdmissionLimiter
from exchange.v1 import identity_pb2, ledger_pb2
from tests.support.ledger_net import AGENCIES, Net, make_net, probe

KIB = 1 << 10


class Clock:
    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture(scope="module")
def net() -> Net:
    return make_net()


@pytest.fixture
def applier(net: Net, tmp_path: Path) -> LedgerApplier:
    return LedgerApplier(BlockStore.create(tmp_path / "blocks.db", net.signed_genesis))


def _limits(**kw: int) -> identity_pb2.RateLimits:
    return identity_pb2.RateLimits(**({"burst_s": 1} | kw))  # type: ignore[arg-type]


def _query_like(net: Net, agency: str, size: int) -> bytes:
    """A non-probe envelope of about `size` bytes (a catalog entry: real work)."""
    body = new_body(net.chain_id, agency, int(time.time() * 1000))
    body.catalog_entry.CopyFrom(ledger_pb2.CatalogEntry(dataset="x" * size))
    return seal_envelope(body, net.analysts[agency])


def _take(limiter: AdmissionLimiter, applier: LedgerApplier, raw: bytes,
          limits: identity_pb2.RateLimits) -> None:
    opened = open_envelope(raw, applier.chain_id)
    limiter.take(opened, applier.registry.resolve(opened.signer_key_id), limits)


def test_flood_beyond_the_signers_limit_is_refused_with_a_retry_after(
        net: Net, applier: LedgerApplier) -> None:
    clock = Clock()
    limiter = AdmissionLimiter(clock)
    limits = _limits(signer_tx_per_s=10, burst_s=2)
    for _ in range(20):  # the burst: 2 s of 10/s
        _take(limiter, applier, probe(net, "tax"), limits)
    with pytest.raises(RateLimited) as refused:
        _take(limiter, applier, probe(net, "tax"), limits)
    assert refused.value.code == "RATE_LIMITED"
    assert refused.value.retry_after_ms == 100  # one token at 10/s
    assert "signer tax/analyst-1: transactions" in str(refused.value)
    assert "retry after 0.100 s" in str(refused.value)
    # other signers are not affected, of the same agency or another
    _take(limiter, applier, probe(net, "tax", signer=net.supervisors["tax"]), limits)
    _take(limiter, applier, probe(net, "police"), limits)
    # once the retry-after has passed, the signer passes again (once)
    clock.now_s += refused.value.retry_after_ms / 1000
    _take(limiter, applier, probe(net, "tax"), limits)
    with pytest.raises(RateLimited):
        _take(limiter, applier, probe(net, "tax"), limits)


def test_bytes_are_limited_per_signer_and_per_agency(net: Net, applier: LedgerApplier) -> None:
    clock = Clock()
    limiter = AdmissionLimiter(clock)
    limits = _limits(signer_bytes_per_s=8 * KIB, agency_bytes_per_s=12 * KIB)
    for _ in range(7):
        _take(limiter, applier, _query_like(net, "tax", KIB), limits)
    with pytest.raises(RateLimited, match="signer tax/analyst-1: bytes"):
        _take(limiter, applier, _query_like(net, "tax", KIB), limits)
    # the agency's bucket has room for a few more, from another of its signers
    body = new_body(net.chain_id, "tax", int(time.time() * 1000))
    body.catalog_entry.CopyFrom(ledger_pb2.CatalogEntry(dataset="y" * KIB))
    _take(limiter, applier, seal_envelope(body, net.supervisors["tax"]), limits)
    with pytest.raises(RateLimited, match="agency tax: bytes"):
        for _ in range(8):
            body = new_body(net.chain_id, "tax", int(time.time() * 1000))
            body.catalog_entry.CopyFrom(ledger_pb2.CatalogEntry(dataset="y" * KIB))
            _take(limiter, applier, seal_envelope(body, net.automations["tax"]), limits)
    # another agency has its own bucket
    _take(limiter, applier, _query_like(net, "customs", KIB), limits)


def test_a_refused_envelope_costs_nothing(net: Net, applier: LedgerApplier) -> None:
    clock = Clock()
    limiter = AdmissionLimiter(clock)
    limits = _limits(signer_tx_per_s=100, agency_tx_per_s=1)
    _take(limiter, applier, probe(net, "tax"), limits)
    for _ in range(50):  # refused by the agency's limit: the signer's bucket keeps its room
        with pytest.raises(RateLimited, match="agency tax"):
            _take(limiter, applier, probe(net, "tax"), limits)
    clock.now_s += 1.0
    _take(limiter, applier, probe(net, "tax"), limits)


def test_probes_are_limited_tighter_than_real_work_and_can_be_disabled(
        net: Net, applier: LedgerApplier) -> None:
    limiter = AdmissionLimiter(Clock())
    limits = identity_pb2.RateLimits()
    limits.CopyFrom(DEFAULT_RATE_LIMITS)
    assert limits.probe_bytes_per_s < limits.signer_bytes_per_s
    big_probe = probe(net, "tax", b"p" * (600 * KIB))
    budget = limits.probe_bytes_per_s * limits.burst_s
    for _ in range(budget // len(big_probe)):
        _take(limiter, applier, big_probe, limits)
    with pytest.raises(RateLimited, match="probe bytes"):
        _take(limiter, applier, big_probe, limits)
    # the same signer's real work of the same size still passes
    _take(limiter, applier, _query_like(net, "tax", 600 * KIB), limits)
    limits.probes_disabled = True
    with pytest.raises(PermissionDenied, match="probes are disabled"):
        _take(limiter, applier, probe(net, "police"), limits)


def test_an_envelope_larger_than_a_whole_bucket_passes_when_it_is_full(
        net: Net, applier: LedgerApplier) -> None:
    clock = Clock()
    limiter = AdmissionLimiter(clock)
    limits = _limits(probe_bytes_per_s=KIB)
    raw = probe(net, "tax", b"p" * (4 * KIB))
    _take(limiter, applier, raw, limits)
    with pytest.raises(RateLimited) as refused:
        _take(limiter, applier, raw, limits)
    # it owes about 3 KiB and needs a full bucket (1 KiB): about 4 s at 1 KiB/s
    assert 3_900 < refused.value.retry_after_ms < 4_300
    clock.now_s += refused.value.retry_after_ms / 1000
    _take(limiter, applier, raw, limits)


def test_node_keys_are_not_rate_limited(net: Net, applier: LedgerApplier) -> None:
    limiter = AdmissionLimiter(Clock())
    limits = _limits(signer_tx_per_s=1, agency_tx_per_s=1)
    for _ in range(10):
        body = new_body(net.chain_id, "pboc", int(time.time() * 1000))
        body.catalog_entry.CopyFrom(ledger_pb2.CatalogEntry(dataset="accounts"))
        _take(limiter, applier, seal_envelope(body, net.nodes["pboc"]), limits)


# -- changing the limits on the ledger --------------------------------------------------

def _params_change(net: Net, limits: identity_pb2.RateLimits, approvers: tuple[str, ...],
                   members: tuple[str, ...] = tuple(sorted(AGENCIES))) -> bytes:
    change = ledger_pb2.MembershipChange(
        members_before=list(members),
        rate_limits=limits.SerializeToString(deterministic=True))
    statement = membership_change_statement(change)
    for agency in approvers:
        root = net.roots[agency]
        change.approvals.append(ledger_pb2.MemberSignature(
            agency=agency, key_id=root.key_id,
            signature=root.sign(Domain.MEMBERSHIP_CHANGE, net.chain_id, statement)))
    body = new_body(net.chain_id, "tax", int(time.time() * 1000))
    body.membership_change.CopyFrom(change)
    return seal_envelope(body, CachedSigner(net.roots["tax"]))


def _commit(net: Net, applier: LedgerApplier, raw: bytes) -> str:
    block = applier.cut([raw], int(time.time() * 1000), net.nodes["tax"], "tax")
    return applier.apply(block).codes[0]


def test_a_quorum_of_roots_changes_the_rate_limits(net: Net, applier: LedgerApplier) -> None:
    assert applier.registry.rate_limits == DEFAULT_RATE_LIMITS
    tight = _limits(signer_tx_per_s=2, burst_s=3, probes_disabled=True)
    # two roots of four are not a quorum
    assert _commit(net, applier, _params_change(net, tight, ("tax", "police"))) == CODE_REJECTED
    # approvals for another member set do not count
    stale = _params_change(net, tight, ("tax", "police", "customs"),
                           members=("customs", "police", "tax"))
    assert _commit(net, applier, stale) == CODE_REJECTED
    assert applier.registry.rate_limits == DEFAULT_RATE_LIMITS
    # a broken limit (no burst) is refused even with every approval
    assert _commit(net, applier, _params_change(
        net, identity_pb2.RateLimits(signer_tx_per_s=1), AGENCIES)) == CODE_REJECTED
    version = applier.registry.version
    assert _commit(net, applier,
                   _params_change(net, tight, ("tax", "police", "customs"))) == RESULT_OK
    assert applier.registry.rate_limits == tight
    assert applier.registry.version == version  # members and keys did not change
    # what the limiter reads from the registry now holds
    limiter = AdmissionLimiter(Clock())
    with pytest.raises(PermissionDenied):
        _take(limiter, applier, probe(net, "tax"), applier.registry.rate_limits)
    # and a node restarting from its blocks (or its stored state) has the same limits
    store = applier.store
    assert LedgerApplier(store, rebuild=True).registry.rate_limits == tight
