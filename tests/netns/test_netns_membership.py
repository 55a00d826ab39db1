"""A fifth agency joins the running network and leaves it again, on the namespace
harness (tests/support/netns.py): each agency's node in its own network namespace with its own
address, configured by the key ceremony; see docs/faults.md.

The municipal market regulator gets a machine of its own (a fifth namespace on the
bridge) and goes through the ceremony in its own folder; only its public membership
request and the members' approvals cross between machines. Three of the four founding
roots approve its admission while closed-loop submitters run on the four founding
nodes. The founding nodes compact their Raft logs early ([raft] compact_every_entries),
so the newcomer cannot be sent the log from the start: it catches up by streaming
verified (final) blocks from its peers. It then publishes its catalog, loads its
register, puts a policy for it in force, answers tax's cross-query, and submits through
its own node; the harness's usual check runs on all five. Then it is made the leader
(nftables: the leader and one more founder cut off, the two founders left unable to
reach each other, so only market reaches a quorum of 3 of 5), and four of the five roots
remove it while it leads: its node stops itself, the four elect a leader among
themselves and go on, peers refuse its node certificate, and a transaction signed by
its analyst, carried by a member's node, is refused. The harness's usual check ends it,
on the four and, from its block store, on the market regulator at the height it left at.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from agents.generate import _org8, _person_id, _uscc
from exchange.client import Signer, load_client_profile
from exchange.errors import CredentialInvalid
from exchange.identity.default_policies import JOINING_OFFERS, default_policies
from exchange.ledger.policy import describe
from exchange.v1 import ledger_pb2, peer_pb2, peer_pb2_grpc
from tests.support.netns import (
    Ack,
    NetnsNetwork,
    Refusal,
    Submitters,
    acks_between,
    missing_requirement,
    until,
)

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.slow,
              pytest.mark.xdist_group("netns_membership")]

_missing = missing_requirement()
if _missing:
    pytestmark.append(pytest.mark.skip(reason=_missing))

JOINER = "market"
# The founding nodes compact their Raft logs every 40 applied entries, keeping the last
# 30: long before the change that adds market, so it must catch up from blocks. The two
# founders cut off to let market lead fall fewer entries behind than are kept, so they
# catch up from the log (see docs/faults.md on catch-up past the compaction point).
RAFT = {"compact_every_entries": 40, "compact_keep_entries": 30}
PAUSE_S = 0.5  # each submitter's pause between an answer and its next probe (a shorter chain
# for `exchange chain verify` to check on every node, twice)
SETTLE_TIMEOUT_S = 120.0  # a bound on waiting, not a speed claim: a loaded CI machine is slow
CATCH_UP_EVENT = '"event": "catching up by streaming blocks"'
CAUGHT_UP_EVENT = '"event": "caught up"'


@pytest.fixture()
def net(tmp_path: Path) -> Iterator[NetnsNetwork]:
    with NetnsNetwork(tmp_path / "machines", raft=RAFT) as network:
        yield network


def _members(net: NetnsNetwork, agency: str) -> list[str]:
    st = net.status(agency)
    return sorted(st.members) if st is not None else []


def _peer_status_with_node_cert(net: NetnsNetwork, agency: str, peer: str
                                ) -> grpc.StatusCode:
    """The peer service of `peer`'s node, called with `agency`'s node certificate (as
    its node dials its peers), from the root namespace through the bridge."""
    tls = net.agency_dir(agency) / "tls"
    creds = grpc.ssl_channel_credentials(
        root_certificates=(net.agency_dir(peer) / "tls" / "ca.pem").read_bytes(),
        private_key=(tls / "node.key").read_bytes(),
        certificate_chain=(tls / "node.pem").read_bytes())
    with grpc.secure_channel(net.address(peer), creds) as channel:
        try:
            stub = peer_pb2_grpc.PeerStub(channel)  # type: ignore[no-untyped-call]
            stub.Status(peer_pb2.PeerStatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def _codes(refusals: list[Refusal], agency: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in refusals:
        if r.agency == agency:
            out[r.code] = out.get(r.code, 0) + 1
    return out


def _report(**figures: object) -> None:
    print("\n[join and leave] " + ", ".join(f"{k}={v}" for k, v in figures.items()))


def test_fifth_agency_joins_under_load_answers_and_is_removed(net: NetnsNetwork) -> None:
    founders = list(net.agencies)
    tax = "tax"
    started = time.monotonic()
    phases: dict[str, float] = {}  # seconds from the start of the test to each step

    def reached(step: str) -> None:
        phases[step] = round(time.monotonic() - started, 1)
    approvers_add = [a for a in founders if a != "pboc"]  # 3 of 4 roots
    with Submitters(net, founders, pause_s=PAUSE_S) as subs:
        subs.wait_growth(20)
        # every founding node has compacted its Raft log past what a newcomer would need
        until(lambda: all(s is not None and s.applied_index > RAFT["compact_every_entries"]
                          for s in net.statuses(founders).values()),
              SETTLE_TIMEOUT_S, "the founding nodes compacting their Raft logs", 0.2)

        reached("compacted")
        # the market regulator's machine and ceremony; its node runs before it is a member
        address = net.add_machine(JOINER)
        request = net.join_ceremony(JOINER)
        assert f"{address}:" in (net.agency_dir(JOINER) / "node.toml").read_text()
        net.start_node(JOINER)
        change = net.propose_change("add-market", by=tax, add=request)
        approvals = net.approve_change(change, approvers_add)
        for path in net.table.iterdir():
            assert b"PRIVATE KEY" not in path.read_bytes(), f"{path} holds a private key"
        assert _members(net, tax) == sorted(founders)
        assert net.running(JOINER)
        reached("approved")
        join_at = time.monotonic()
        added_height = net.committed_height(net.submit_change(change, approvals, by=tax))
        five = sorted([*founders, JOINER])
        until(lambda: all(_members(net, a) == five for a in five), SETTLE_TIMEOUT_S,
              "every node, market's too, naming five members", 0.2)
        net.admit(JOINER)
        leader = net.wait_ready(SETTLE_TIMEOUT_S)
        # it catches up from blocks its peers stream (the Raft log it lacks was
        # compacted away), each checked to carry a quorum of attestations
        until(lambda: CAUGHT_UP_EVENT in net.log_path(JOINER).read_text(),
              SETTLE_TIMEOUT_S, "market's node catching up", 0.2)
        assert CATCH_UP_EVENT in net.log_path(JOINER).read_text()
        net.wait_height(added_height, agencies=[JOINER], timeout_s=SETTLE_TIMEOUT_S)
        joined_s = time.monotonic() - join_at
        reached("caught_up")
        # the founding nodes kept acknowledging while the change went through
        acks_while_joining = acks_between(subs.snapshot()[0], join_at, time.monotonic())
        assert acks_while_joining, "nothing was acknowledged while market joined"
        # its node certificate is trusted by the members now
        assert _peer_status_with_node_cert(net, JOINER, tax) == grpc.StatusCode.OK

        # market publishes its catalog, loads its register, puts a policy in force and
        # answers tax's cross-query, signed, from its own node
        company, rep = _uscc("440300", _org8(7)), _person_id(7, "440300")
        data = net.machine(JOINER) / "register"
        data.mkdir()
        (data / "registrations.csv").write_text(
            "uscc,name,legal_rep_id,registered_capital_cny,status,registered_on\n"
            f"{company},Shenzhen Test Trading Co.,{rep},5000000.00,active,2019-04-02\n")
        loaded = net.cli("data", "load", "--config", str(net.node_config(JOINER)),
                         str(data), cwd=net.machine(JOINER), namespace=net.namespaces[JOINER])
        assert loaded.returncode == 0, loaded.stderr
        policy = net.machine(JOINER) / "registrations-policy.json"
        policy.write_text(json.dumps(describe(default_policies(five, JOINING_OFFERS)[0])))
        proposed = net.cli("policy", "propose", str(policy), "--profile",
                           str(net.agency_dir(JOINER) / "analysts" / "supervisor-1.toml"),
                           cwd=net.machine(JOINER))
        assert proposed.returncode == 0, proposed.stderr

        def published() -> bool:
            with net.client(tax) as c:
                return any(e.agency == JOINER and e.entry.dataset == "registrations"
                           for e in c.list_catalog(JOINER).entries)
        until(published, SETTLE_TIMEOUT_S, "market's catalog on the ledger", 0.3)
        asked_at = time.monotonic()
        queried = net.cli("query", "--to", JOINER, "--dataset", "registrations",
                          "--subject", f"uscc={company}", "--case", "CASE-MARKET-1",
                          "--purpose", "who represents the company", "--wait", "--json",
                          "--profile", str(net.profile(tax)), cwd=net.machine(tax))
        answered_s = time.monotonic() - asked_at
        reached("answered")
        assert queried.returncode == 0, queried.stderr
        answer = json.loads(queried.stdout)
        assert [r["legal_rep_id"] for r in answer["data"]] == [rep], answer

        # market's analyst submits through its own node, beside the founders' clients
        with Submitters(net, [JOINER], pause_s=PAUSE_S) as own:
            own.wait_growth(10, agencies=[JOINER], timeout_s=SETTLE_TIMEOUT_S)
            subs.wait_growth(10, agencies=founders)
            # the harness's check on all five while market is a member
            member_heights = net.check_acknowledged([*subs.snapshot()[0],
                                                     *own.snapshot()[0]], SETTLE_TIMEOUT_S)
            reached("checked_five")

            # market's vote counts and it can lead: with the leader and one more founder
            # cut off, and the two founders left unable to reach each other, only market
            # reaches a Raft majority (3 of 5); healed at once, the two cut off follow it
            # (pre-vote) and it commits for the founders' clients
            leader_before = net.wait_ready(SETTLE_TIMEOUT_S)
            elected_s: float | None = None
            if leader_before != JOINER:
                st = net.status(leader_before)
                assert st is not None
                cut, one, other = [a for a in founders if a != leader_before]
                net.isolate(leader_before)
                net.isolate(cut)
                net.isolate(one, [other])
                new_leader, _, elected_s = net.wait_new_leader(
                    leader_before, st.term, among=[JOINER, one, other])
                assert new_leader == JOINER, f"{new_leader} leads, not market"
                net.heal()
            market_leads = net.wait_ready(SETTLE_TIMEOUT_S)
            assert market_leads == JOINER, f"{market_leads} leads after healing"
            subs.wait_growth(10, agencies=founders, timeout_s=SETTLE_TIMEOUT_S)
            reached("market_leads")

            # removal of the leader: four of the five roots approve; market's client
            # keeps submitting
            removal = net.propose_change("remove-market", by="police", remove=JOINER)
            approvals = net.approve_change(removal, founders)
            assert net.wait_ready(SETTLE_TIMEOUT_S) == JOINER
            leave_at = time.monotonic()
            removed_height = net.committed_height(
                net.submit_change(removal, approvals, by="police"))
            until(lambda: all(_members(net, a) == sorted(founders) for a in founders),
                  SETTLE_TIMEOUT_S, "the four naming four members", 0.2)
            # its node applies its removal and stops itself
            until(lambda: not net.running(JOINER), SETTLE_TIMEOUT_S, "market's node stopping")
            stopped_s = time.monotonic() - leave_at
            reached("removed")
            net.retire(JOINER)
            leader_after = net.wait_ready(SETTLE_TIMEOUT_S)
            # its client's later submissions fail; the founders go on
            until(lambda: any(r.sent_at >= leave_at for r in own.snapshot()[1]),
                  SETTLE_TIMEOUT_S, "a refused submission from market's client", 0.2)
            subs.wait_growth(10, agencies=founders, timeout_s=SETTLE_TIMEOUT_S)
        own_acks, own_refusals = own.snapshot()
    acks, refusals = subs.snapshot()

    assert net.procs[JOINER].returncode != 0
    assert "removed from the network" in net.log_path(JOINER).read_text(), \
        net.log_tail(JOINER)
    late = [a for a in own_acks if a.height > removed_height]
    assert not late, f"market's node acknowledged {len(late)} transactions after its removal"
    # a transaction signed by market's analyst, carried by a member's node, is refused
    profile = load_client_profile(net.profile(JOINER))
    signer = Signer.load(profile, net.chain_id)
    envelope = signer.make_envelope(lambda body: body.probe.CopyFrom(
        ledger_pb2.Probe(payload=b"after removal")))
    with net.client(tax) as c, pytest.raises(CredentialInvalid, match="revoked") as refused:
        c.submit(envelope, wait=True)
    assert refused.value.code == "CREDENTIAL_INVALID"
    # and the members no longer accept its node's certificate
    peer_code = _peer_status_with_node_cert(net, JOINER, tax)
    assert peer_code != grpc.StatusCode.OK

    every: list[Ack] = [*acks, *own_acks]
    bad = [a for a in every if a.result != "OK"]
    assert not bad, f"probes committed as invalid: {[(a.height, a.result) for a in bad[:5]]}"
    reached("refused")
    heights = net.check_acknowledged(every, SETTLE_TIMEOUT_S)
    reached("checked")
    assert heights[JOINER] >= removed_height, heights  # it applied its own removal
    _report(leader_when_joined=leader, added_at_height=added_height,
            leader_before_market=leader_before,
            market_elected_s=None if elected_s is None else round(elected_s, 2),
            leader_after_removal=leader_after,
            joined_and_caught_up_s=round(joined_s, 1),
            founder_acks_while_joining=len(acks_while_joining),
            cross_query_answered_s=round(answered_s, 1),
            market_acks=len(own_acks), checked_five_at=member_heights,
            removed_at_height=removed_height, market_stopped_after_s=round(stopped_s, 1),
            market_left_at=heights[JOINER], final_heights=heights,
            refused_after_removal=str(refused.value), peer_after_removal=peer_code.name,
            market_client_refusals=_codes(own_refusals, JOINER),
            founder_refusals={a: _codes(refusals, a) for a in founders}, phases_s=phases)
