"""Membership and key changes on a running network, through the CLI: a fifth agency
joins (a quorum of roots approves) and leaves; an agency rotates its node key and its
node certificate with no downtime, and the old certificate is refused by its peers."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import grpc
import pytest

from agents.generate import _org8, _person_id, _uscc
from exchange.client import Signer, load_client_profile
from exchange.errors import CredentialInvalid
from exchange.identity.default_policies import JOINING_OFFERS, default_policies
from exchange.ledger.policy import describe
from exchange.testing.localnet import Cluster
from exchange.v1 import ledger_pb2, peer_pb2, peer_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("membership")]

WAIT_S = 60.0




def _ok(result: object) -> str:
    assert getattr(result, "returncode") == 0, getattr(result, "stderr")  # noqa: B009
    return str(getattr(result, "stdout"))  # noqa: B009


def _probe(cluster: Cluster, agency: str) -> dict[str, object]:
    """One probe through `agency`'s node, signed by its analyst; the node's answer."""
    result = cluster.cli("submit-probe", "--json", "--timeout", "20", agency=agency)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert isinstance(out, dict)
    return out


def _wait(what: str, check: object, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.3)


def _members(cluster: Cluster, agency: str) -> list[str]:
    st = cluster.status(agency)
    return sorted(st.members) if st is not None else []


def test_fifth_agency_joins_answers_and_leaves(cluster: Cluster, tmp_path: Path) -> None:
    net = cluster.net
    request = cluster.prepare_joiner("market")
    change = tmp_path / "add.pb"
    _ok(cluster.cli("membership", "propose", "--add", str(request), "--out", str(change)))

    # two approvals of four are not a quorum: the ledger refuses the change
    approvals = {}
    for agency in ("tax", "police", "customs", "pboc"):
        approvals[agency] = tmp_path / f"{agency}.approval"
        _ok(cluster.run_exchange("membership", "approve", str(change), "--agency-dir",
                                 str(net / agency), "--out", str(approvals[agency])))
    short = cluster.cli("membership", "submit", str(change), str(approvals["tax"]),
                        str(approvals["police"]), "--agency-dir", str(net / "tax"))
    assert short.returncode != 0 and "REJECTED" in short.stderr
    assert _members(cluster, "tax") == ["customs", "pboc", "police", "tax"]

    # the joining node runs before it is a member: it follows, nobody trusts it yet
    cluster.start_node("market")
    _ok(cluster.cli("membership", "submit", str(change), str(approvals["tax"]),
                    str(approvals["police"]), str(approvals["customs"]),
                    "--agency-dir", str(net / "tax")))
    five = ["customs", "market", "pboc", "police", "tax"]
    _wait("every node sees five members",
          lambda: all(_members(cluster, a) == five for a in cluster.agencies))
    # market caught up by streaming verified blocks and commits through Raft like the rest
    height = _probe(cluster, "market")["height"]
    assert isinstance(height, int)
    cluster.wait_height(height, timeout_s=WAIT_S)
    _probe(cluster, "tax")

    # market publishes its catalog, puts a policy for its register in force, loads its
    # records and answers a cross-query from tax, automatically and signed
    company, rep = _uscc("440300", _org8(7)), _person_id(7, "440300")
    data = tmp_path / "market-data"
    data.mkdir()
    (data / "registrations.csv").write_text(
        "uscc,name,legal_rep_id,registered_capital_cny,status,registered_on\n"
        f"{company},Shenzhen Test Trading Co.,{rep},5000000.00,active,2019-04-02\n")
    _ok(cluster.run_exchange("data", "load", "--config", str(net / "market" / "node.toml"),
                             str(data)))
    policy = tmp_path / "market-policy.json"
    policy.write_text(json.dumps(describe(default_policies(five, JOINING_OFFERS)[0])))
    _ok(cluster.run_exchange("policy", "propose", str(policy), "--profile",
                             str(net / "market" / "analysts" / "supervisor-1.toml")))
    _wait("market's catalog is on the ledger", lambda: any(
        e["agency"] == "market" and e["dataset"] == "registrations"
        for e in cluster.cli_json("catalog")["entries"]))  # type: ignore[index]
    answer = cluster.cli_json("query", "--to", "market", "--dataset", "registrations",
                              "--subject", f"uscc={company}", "--case", "CASE-MARKET-1",
                              "--purpose", "who represents the company", "--wait")
    assert isinstance(answer, dict)
    assert [r["legal_rep_id"] for r in answer["data"]] == [rep], answer

    # market's node as a leader candidate: stop the current leader; five members with
    # one down still commit (market's vote counts now)
    leader = cluster.leader()
    if leader != "market":
        cluster.kill(leader)
        new_leader = cluster.wait_ready(WAIT_S)
        assert new_leader != leader
        _probe(cluster, "market")
        cluster.start_node(leader)
        cluster.wait_ready(WAIT_S)

    # removal: a quorum of the five (four) approves
    removal = tmp_path / "remove.pb"
    _ok(cluster.cli("membership", "propose", "--remove", "market", "--out", str(removal)))
    names = []
    for agency in ("tax", "police", "customs", "pboc"):
        path = tmp_path / f"{agency}.removal"
        _ok(cluster.run_exchange("membership", "approve", str(removal), "--agency-dir",
                                 str(net / agency), "--out", str(path)))
        names.append(str(path))
    # the add approvals cannot be replayed against the new member set
    replay = cluster.cli("membership", "submit", str(change), *map(str, approvals.values()),
                         "--agency-dir", str(net / "tax"))
    assert replay.returncode != 0 and "REJECTED" in replay.stderr
    _ok(cluster.cli("membership", "submit", str(removal), *names,
                    "--agency-dir", str(net / "police")))
    four = ["customs", "pboc", "police", "tax"]
    _wait("the four see the removal",
          lambda: all(_members(cluster, a) == four for a in four))
    # the removed node stops itself; its later messages are refused
    _wait("market's node stops", lambda: not cluster.running("market"))
    assert "removed from the network" in cluster.log_tail("market")
    # a transaction signed by market's analyst, carried by a member's node, is refused
    chain_id = cluster.status("tax").chain_id  # type: ignore[union-attr]
    signer = Signer.load(load_client_profile(net / "market" / "profile.toml"), chain_id)
    envelope = signer.make_envelope(lambda body: body.probe.CopyFrom(
        ledger_pb2.Probe(payload=b"after removal")))
    with cluster.client("tax") as tax, \
            pytest.raises(CredentialInvalid, match="revoked") as refused:
        tax.submit(envelope, wait=True)
    assert refused.value.code == "CREDENTIAL_INVALID"
    cluster.agencies = tuple(a for a in cluster.agencies if a != "market")
    _probe(cluster, "customs")
    for agency in four:
        _ok(cluster.cli("chain", "verify", agency=agency))


def _address(cluster: Cluster, agency: str) -> str:
    for line in (cluster.net / agency / "profile.toml").read_text().splitlines():
        if line.startswith("node = "):
            return line.split('"')[1]
    raise AssertionError(f"no node address in {agency}'s profile")


def _peer_status_with(cert: Path, key: Path, ca: Path, address: str) -> grpc.StatusCode:
    creds = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(),
                                         private_key=key.read_bytes(),
                                         certificate_chain=cert.read_bytes())
    with grpc.secure_channel(address, creds) as channel:
        try:
            peer_pb2_grpc.PeerStub(channel).Status(peer_pb2.PeerStatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_node_key_and_certificate_rotate_without_downtime(cluster: Cluster,
                                                          tmp_path: Path) -> None:
    net = cluster.net
    customs = net / "customs"
    old_cert, old_key = tmp_path / "old.pem", tmp_path / "old.key"
    shutil.copy(customs / "tls" / "node.pem", old_cert)
    shutil.copy(customs / "tls" / "node.key", old_key)
    old_node_key = (customs / "keys" / "node.key").read_bytes()
    tax_ca = net / "tax" / "tls" / "ca.pem"
    tax_address = _address(cluster, "tax")
    assert _peer_status_with(old_cert, old_key, tax_ca, tax_address) == grpc.StatusCode.OK

    _ok(cluster.cli("agency", "rotate", "--kind", "node", "--agency-dir", str(customs),
                    agency="customs"))
    _ok(cluster.cli("agency", "rotate", "--kind", "tls", "--agency-dir", str(customs),
                    agency="customs"))
    # the running node switched to the new files; nothing was restarted
    _wait("customs switched its key and certificate",
          lambda: (customs / "keys" / "node.key").read_bytes() != old_node_key
          and (customs / "tls" / "node.pem").read_bytes() != old_cert.read_bytes())
    assert cluster.running("customs")
    # the old certificate is refused by every peer; the network goes on with customs
    _wait("peers refuse customs' old certificate",
          lambda: _peer_status_with(old_cert, old_key, tax_ca, tax_address)
          == grpc.StatusCode.PERMISSION_DENIED)
    for agency in ("customs", "tax"):
        height = _probe(cluster, agency)["height"]
        assert isinstance(height, int)
    cluster.wait_height(int(height), timeout_s=WAIT_S)
    # customs' attestations and blocks (if it leads) verify with the rotated key, and it
    # restarts on it
    cluster.restart("customs")
    cluster.wait_ready(WAIT_S)
    height = _probe(cluster, "customs")["height"]
    cluster.wait_height(int(height), timeout_s=WAIT_S)  # type: ignore[arg-type]
    for agency in ("customs", "police"):
        _ok(cluster.cli("chain", "verify", agency=agency))
