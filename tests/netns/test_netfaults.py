"""The network as it really runs: four agencies, each node in its own network namespace
with its own address, configured by the key ceremony, under real network faults
(nftables rules) and process faults (SIGSTOP, faketime). See docs/faults.md.

Closed-loop clients submit signed probes to every node throughout each scenario; each
scenario ends by healing, then checking that every transaction acknowledged so far (in
this and the earlier scenarios) is on every node exactly once, at the position it was
acknowledged with, that the four chains are the same blocks in the same order with Raft
terms that never go back, and that `exchange chain verify` passes against each node.

The scenarios share one network (made once for the module); each starts by healing
whatever an earlier one may have left and waiting for an agreed leader.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.netns import (
    Ack,
    NetnsNetwork,
    Refusal,
    Submitters,
    acks_between,
    describe,
    first_commit_after,
    missing_requirement,
    until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.slow,
              pytest.mark.xdist_group("netfaults")]

FROZEN_S = 10.0  # the issue: a leader frozen for 10 s
CLOCK_OFFSET = "+5m"  # the issue: a clock off by five minutes
SETTLE_TIMEOUT_S = 60.0
LOSS_HELD_S = 8.0  # random loss lasts at least this long
# Each client pauses between an answer and its next submission: every scenario runs
# `exchange chain verify` against every node over the whole chain, so the chain is kept
# to some hundreds of blocks per scenario.
PAUSE_S = 0.2

_missing = missing_requirement()
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

ACKNOWLEDGED: list[Ack] = []  # every acknowledgement of the module, checked after each scenario


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetnsNetwork]:
    with NetnsNetwork(tmp_path_factory.mktemp("netns")) as network:
        yield network


@pytest.fixture()
def healthy(net: NetnsNetwork) -> NetnsNetwork:
    """The network with no fault left over: rules removed, nodes resumed, every node
    running on the true clock, one leader agreed on."""
    net.heal()
    for agency in net.agencies:
        if not net.running(agency) or net.clock.get(agency):
            net.restart(agency)
    net.wait_ready(SETTLE_TIMEOUT_S)
    return net


def _finish(net: NetnsNetwork, subs: Submitters) -> tuple[list[Ack], list[Refusal]]:
    """Stop the clients, heal, and check everything acknowledged so far."""
    subs.stop()
    acks, refusals = subs.snapshot()
    bad = [a for a in acks if a.result != "OK"]
    assert not bad, f"probes committed as invalid: {[(a.height, a.result) for a in bad[:5]]}"
    ACKNOWLEDGED.extend(acks)
    net.heal()
    net.check_acknowledged(ACKNOWLEDGED, SETTLE_TIMEOUT_S)
    return acks, refusals


def _report(name: str, **figures: object) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def _codes(refusals: list[Refusal], start: float, end: float) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in refusals:
        if start <= r.at < end:
            out[r.code] = out.get(r.code, 0) + 1
    return out


def test_leader_cut_off_majority_commits_again_within_2s_and_old_leader_catches_up(
        healthy: NetnsNetwork) -> None:
    net = healthy
    leader = net.leader()
    st = net.status(leader)
    assert st is not None
    old_term = st.term
    others = [a for a in net.agencies if a != leader]
    with Submitters(net, pause_s=PAUSE_S) as subs:
        subs.wait_growth(20)
        cut_at = time.monotonic()
        net.isolate(leader)
        commit_again_s, by = first_commit_after(net, cut_at, old_term, others)
        # the old leader loses its quorum and steps down while cut off
        until(lambda: (s := net.status(leader)) is not None and s.role != "leader",
              10.0, f"{leader} stepping down")
        stepped_down_s = time.monotonic() - cut_at
        subs.wait_growth(20, agencies=others)
        # the old leader's own client has tried, and failed, while it was cut off
        until(lambda: any(r.agency == leader and r.sent_at >= cut_at
                          for r in subs.snapshot()[1]),
              30.0, f"a failed submission to {leader} while cut off", 0.1)
        heal_at = time.monotonic()
        net.heal()
        new_leader = net.wait_ready(SETTLE_TIMEOUT_S)
        # after healing the old leader follows, catches up and acknowledges again
        subs.wait_growth(5, agencies=[leader], timeout_s=SETTLE_TIMEOUT_S)
        back_s = time.monotonic() - heal_at
    acks, refusals = _finish(net, subs)
    from_cut_off = acks_between(acks, cut_at, heal_at, [leader])
    assert not from_cut_off, \
        f"{leader} acknowledged {len(from_cut_off)} transactions submitted while cut off"
    # how soon the majority commits again is a figure, not a pass mark: _report prints it
    # and bench.failover measures it over many runs; what is asserted is the
    # order (a commit in a later term by the majority while the leader is cut off)
    _report("leader cut off", leader=leader, new_leader=new_leader, commit_again_s=round(commit_again_s, 3),
            first_commit_at=by, old_leader_stepped_down_s=round(stepped_down_s, 2),
            old_leader_acks_again_after_heal_s=round(back_s, 2),
            majority_acks_while_cut=len(acks_between(acks, cut_at, heal_at, others)),
            refusals_at_old_leader=_codes([r for r in refusals if r.agency == leader],
                                          cut_at, heal_at))


def test_two_two_split_acknowledges_nothing_and_commits_resume_on_healing(
        healthy: NetnsNetwork) -> None:
    net = healthy
    leader = net.leader()
    partner = next(a for a in net.agencies if a != leader)
    side_a = [leader, partner]
    side_b = [a for a in net.agencies if a not in side_a]
    with Submitters(net, pause_s=PAUSE_S) as subs:
        subs.wait_growth(20)
        split_at = time.monotonic()
        net.split(side_a, side_b)
        # check-quorum: the leader steps down; pre-vote: nobody wins an election
        until(lambda: all(s is None or s.role != "leader" for s in net.statuses().values()),
              10.0, "no leader on either side")
        no_leader_s = time.monotonic() - split_at
        # every agency's client has tried, and failed, during the split
        until(lambda: all(any(r.agency == a and r.sent_at >= split_at
                              for r in subs.snapshot()[1]) for a in net.agencies),
              30.0, "a failed submission from every agency during the split", 0.2)
        during = {a: describe(s) for a, s in net.statuses().items()}
        heal_at = time.monotonic()
        net.heal()
        net.wait_ready(SETTLE_TIMEOUT_S)
        subs.wait_growth(20, timeout_s=SETTLE_TIMEOUT_S)
        resumed_s = time.monotonic() - heal_at
    acks, refusals = _finish(net, subs)
    during_split = acks_between(acks, split_at, heal_at)
    assert not during_split, \
        f"{len(during_split)} transactions submitted during the split were acknowledged"
    _report("2-2 split", sides=f"{side_a}|{side_b}", no_leader_after_s=round(no_leader_s, 2),
            split_held_s=round(heal_at - split_at, 1), roles_during=during,
            commits_resumed_after_heal_s=round(resumed_s, 2),
            refusals_during=_codes(refusals, split_at, heal_at))


def test_one_way_loss_of_the_leaders_outgoing_traffic(healthy: NetnsNetwork) -> None:
    net = healthy
    leader = net.leader()
    st = net.status(leader)
    assert st is not None
    others = [a for a in net.agencies if a != leader]
    with Submitters(net, pause_s=PAUSE_S) as subs:
        subs.wait_growth(20)
        cut_at = time.monotonic()
        net.drop_outgoing(leader)
        new_leader, new_term, elected_s = net.wait_new_leader(leader, st.term, among=others)
        subs.wait_growth(20, agencies=others)
        until(lambda: (s := net.status(leader)) is not None and s.role != "leader",
              10.0, f"{leader} stepping down")
        old_view = describe(net.status(leader))
        heal_at = time.monotonic()
        net.heal()
        net.wait_ready(SETTLE_TIMEOUT_S)
        subs.wait_growth(5, agencies=[leader], timeout_s=SETTLE_TIMEOUT_S)
    acks, refusals = _finish(net, subs)
    from_muted = acks_between(acks, cut_at, heal_at, [leader])
    _report("one-way loss of leader's outgoing", leader=leader, new_leader=new_leader,
            new_leader_after_s=round(elected_s, 2), old_leader_while_muted=old_view,
            majority_acks=len(acks_between(acks, cut_at, heal_at, others)),
            muted_node_acks=len(from_muted),
            refusals_at_muted=_codes([r for r in refusals if r.agency == leader],
                                     cut_at, heal_at))
    assert not from_muted, f"{leader} acknowledged what it could not replicate"


@pytest.mark.parametrize("percent", [5, 20])
def test_random_loss_on_every_link(healthy: NetnsNetwork, percent: int) -> None:
    net = healthy
    with Submitters(net, pause_s=PAUSE_S) as subs:
        subs.wait_growth(20)
        before_at, before = time.monotonic(), subs.count()
        subs.wait_growth(20)
        rate_before = (subs.count() - before) / (time.monotonic() - before_at)
        lossy_at = time.monotonic()
        net.random_loss(percent)
        start = subs.count()
        # commits go on under loss: some arrive, on every node, while it lasts
        subs.wait_growth(20, timeout_s=SETTLE_TIMEOUT_S)
        for agency in net.agencies:
            subs.wait_growth(1, agencies=[agency], timeout_s=SETTLE_TIMEOUT_S)
        time.sleep(max(0.0, lossy_at + LOSS_HELD_S - time.monotonic()))
        statuses = {a: describe(s) for a, s in net.statuses().items()}
        held_s = time.monotonic() - lossy_at
        committed = subs.count() - start
        net.heal()
    acks, refusals = _finish(net, subs)
    _report(f"{percent}% random loss", tx_per_s_before=round(rate_before, 1),
            tx_per_s_under_loss=round(committed / held_s, 1), held_s=round(held_s, 1),
            roles_under_loss=statuses, refusals=_codes(refusals, lossy_at, lossy_at + held_s))


def test_frozen_leader_resumed_after_10s_does_not_act_on_its_stale_term(
        healthy: NetnsNetwork) -> None:
    net = healthy
    leader = net.leader()
    st = net.status(leader)
    assert st is not None
    old_term = st.term
    others = [a for a in net.agencies if a != leader]
    with Submitters(net, pause_s=PAUSE_S) as subs:
        subs.wait_growth(20)
        frozen_at = time.monotonic()
        net.freeze(leader)
        new_leader, new_term, elected_s = net.wait_new_leader(leader, old_term, among=others)
        subs.wait_growth(20, agencies=others)
        time.sleep(max(0.0, frozen_at + FROZEN_S - time.monotonic()))
        # what the majority committed in the old term before the thaw
        witness = others[0]
        top = net.status(witness)
        assert top is not None
        with net.client(witness, deadline_s=30) as c:
            net.mirrors[witness].sync(c, top.height)
        old_term_top = max((h + 1 for h, t in enumerate(net.mirrors[witness].terms)
                            if t == old_term), default=0)
        net.thaw(leader)
        thawed_at = time.monotonic()
        # it hears of the newer term and follows; it never leads again in the old one
        until(lambda: (s := net.status(leader)) is not None and s.term >= new_term
              and s.role != "leader", 15.0, f"{leader} following after the thaw")
        follows_s = time.monotonic() - thawed_at
        subs.wait_growth(5, agencies=[leader], timeout_s=SETTLE_TIMEOUT_S)
    _finish(net, subs)
    for agency, mirror in net.mirrors.items():
        late = [h + 1 for h, t in enumerate(mirror.terms) if t == old_term
                and h + 1 > old_term_top]
        assert not late, f"{agency}: blocks of the stale term {old_term} at heights {late}"
    _report("frozen leader", leader=leader, old_term=old_term, new_leader=new_leader,
            new_term=new_term, new_leader_after_s=round(elected_s, 2),
            follows_after_thaw_s=round(follows_s, 2))


def test_node_with_clock_off_by_five_minutes_is_refused_and_the_network_goes_on(
        healthy: NetnsNetwork) -> None:
    missing = missing_requirement(faketime=True)
    if missing:
        pytest.skip(missing)
    net = healthy
    leader = net.leader()
    skewed = next(a for a in net.agencies if a != leader)
    others = [a for a in net.agencies if a != skewed]
    net.restart(skewed, clock_offset=CLOCK_OFFSET)
    net.wait_ready(SETTLE_TIMEOUT_S)
    with Submitters(net, pause_s=PAUSE_S) as subs:
        subs.wait_growth(20, agencies=others)
        # the skewed machine's analyst, through the node on the same machine
        own = net.cli("submit-probe", "--profile", str(net.profile(skewed)), "--timeout",
                      "40", namespace=net.namespaces[skewed], clock_offset=CLOCK_OFFSET)
        # an analyst elsewhere, with a true clock, through the skewed node
        through = net.cli("submit-probe", "--profile", str(net.profile(skewed)))
        subs.wait_growth(20, agencies=others)
        top = net.status(net.leader())
        assert top is not None
        net.wait_height(top.height, agencies=[skewed])  # it keeps applying blocks
    acks, refusals = _finish(net, subs)
    assert own.returncode == 1, own.stdout + own.stderr
    assert "TIME_OUT_OF_WINDOW" in own.stderr or "in the future" in own.stderr, own.stderr
    assert through.returncode == 1, through.stdout + through.stderr
    assert "old" in through.stderr and "clock" in through.stderr, through.stderr
    assert not [a for a in acks if a.agency == skewed], \
        "the node with the wrong clock acknowledged a transaction"
    _report("clock +5 min", node=skewed, own_machine=own.stderr.strip(),
            true_clock_client=through.stderr.strip(),
            refusals_at_skewed=_codes([r for r in refusals if r.agency == skewed],
                                      0.0, time.monotonic()))
