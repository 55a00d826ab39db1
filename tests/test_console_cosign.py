"""Four eyes through the agency's own node (`exchange cosign`, the FourEyes service) on a
real cluster: an analyst leaves a query the police's policy wants co-signed, a supervisor
of the same agency lists it, co-signs it with their own profile, and the analyst signs
and submits it, which the police answer. Nobody co-signs their own query, only a
supervisor lists others' requests, a co-signature made with another key than the
caller's credential is refused, and a declined request cannot be submitted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
from exchange.cosign_client import FourEyesClient, cosign_view
from exchange.errors import ExchangeError, InvalidSignature, MalformedInput, PermissionDenied
from exchange.localnet import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("console_cosign")]

SEED = 11
COMPANIES = 200


@dataclass
class Net:
    cluster: Cluster
    officer: str

    def profile(self, subject: str, agency: str = "tax") -> str:
        return str(self.cluster.net / agency / "analysts" / f"{subject}.toml")

    def run(self, *args: str, subject: str = "analyst-1") -> tuple[int, str, str]:
        result = self.cluster.run_exchange(*args, "--profile", self.profile(subject))
        return result.returncode, result.stdout, result.stderr

    def ok(self, *args: str, subject: str = "analyst-1") -> dict[str, object]:
        code, out, err = self.run(*args, "--json", subject=subject)
        assert code == 0, err[-2000:]
        return json.loads(out)  # type: ignore[no-any-return]

    def request(self) -> str:
        view = self.ok("cosign", "request", "--to", "police", "--dataset", "records",
                       "--subject", f"person_id={self.officer}", "--case", "SZ-4E-CLI",
                       "--purpose", "legal representative's record")
        assert view["status"] == "pending"
        return str(view["request"])


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    cluster = Cluster(tmp_path_factory.mktemp("cosign"))
    try:
        cluster.init()
        data = cluster.load_sample(SEED, COMPANIES)
        cluster.start()
        officer = next(line.split(",")[1].split("/")[1] for line in
                       (data / "ground_truth.csv").read_text().splitlines()
                       if line.startswith("officer-with-police-record,"))
        yield Net(cluster, officer)
    finally:
        cluster.stop()


def test_a_query_cosigned_through_the_node_is_answered(net: Net) -> None:
    rid = net.request()
    waiting = net.ok("cosign", "list", subject="supervisor-1")["requests"]
    mine = [r for r in waiting if r["request"] == rid]  # type: ignore[index, union-attr]
    assert len(mine) == 1
    shown = mine[0]
    assert shown["subjects"] == [f"person_id={net.officer}"]  # opened by the node
    assert shown["decision"] == "COSIGNATURE_REQUIRED" and shown["allowed_when_cosigned"]
    approved = net.ok("cosign", "approve", rid, subject="supervisor-1")
    assert approved["status"] == "cosigned" and approved["supervisor"] == "supervisor-1"
    submitted = net.ok("cosign", "submit", rid)
    again = net.ok("cosign", "submit", rid)  # deterministic: the same transaction
    assert again["query"] == submitted["query"]
    answer = net.ok("answer", str(submitted["query"]), "--wait", "30")
    assert answer["status"] == "answered"
    assert answer["cosigners"] == ["supervisor-1"]
    assert any(row.get("person_id") == net.officer for row in answer["data"])  # type: ignore[union-attr, attr-defined]
    assert not [r for r in net.ok("cosign", "list", subject="supervisor-1")["requests"]
                if r["request"] == rid]  # type: ignore[index]


def test_nobody_cosigns_their_own_query(net: Net) -> None:
    profile_path = Path(net.profile("supervisor-1"))
    client = ExchangeClient(load_client_profile(profile_path))
    with client:
        _, _, genesis = load_genesis(profile_path)
        signer = Signer.load(client.profile, genesis.chain_id)
        from exchange.cosign_client import unsigned_query_body
        from exchange.crossquery import QuerySpec

        body = unsigned_query_body(QuerySpec(
            target="police", dataset="records", subjects=(("person_id", net.officer),),
            case_id="SZ-4E-OWN", purpose="own"), signer, genesis,
            list(client.status().member_entries))
        four_eyes = FourEyesClient(client)
        view = four_eyes.submit(body)
        with pytest.raises(PermissionDenied, match="own query"):
            four_eyes.cosign(view.request_id, cosign_view(view, signer.key))
        assert four_eyes.get(view.request_id).status == "pending"


def test_only_a_supervisor_sees_or_decides_the_requests_of_others(net: Net) -> None:
    rid = net.request()
    code, _, err = net.run("cosign", "list", subject="automation")
    assert code == 1 and "not a supervisor" in err
    code, _, err = net.run("cosign", "decline", rid, "--reason", "no", subject="automation")
    assert code == 1 and "not a supervisor" in err
    code, _, err = net.run("cosign", "show", rid, subject="automation")
    assert code == 1 and "not a supervisor" in err
    assert net.ok("cosign", "show", rid)["status"] == "pending"  # its analyst sees it


def test_a_cosignature_made_with_another_key_than_the_callers_is_refused(net: Net) -> None:
    rid = net.request()
    supervisor_path = Path(net.profile("supervisor-1"))
    automation_path = Path(net.profile("automation"))
    with ExchangeClient(load_client_profile(supervisor_path)) as client, \
            ExchangeClient(load_client_profile(automation_path)) as other:
        _, _, genesis = load_genesis(supervisor_path)
        other_key = Signer.load(other.profile, genesis.chain_id).key
        four_eyes = FourEyesClient(client)
        view = four_eyes.get(rid)
        with pytest.raises(PermissionDenied, match="key of the caller"):
            four_eyes.cosign(rid, cosign_view(view, other_key))
        mine = Signer.load(client.profile, genesis.chain_id).key
        forged = cosign_view(view, mine)
        forged.signature = bytes(64)
        with pytest.raises((InvalidSignature, ExchangeError), match="does not verify"):
            four_eyes.cosign(rid, forged)
        assert four_eyes.get(rid).status == "pending"


def test_a_declined_request_says_why_and_cannot_be_submitted(net: Net) -> None:
    rid = net.request()
    declined = net.ok("cosign", "decline", rid, "--reason", "no case opened yet",
                      subject="supervisor-1")
    assert declined["status"] == "declined"
    assert declined["decline_reason"] == "no case opened yet"
    code, _, err = net.run("cosign", "submit", rid)
    assert code == 1 and "declined, not co-signed" in err
    code, _, err = net.run("cosign", "approve", rid, subject="supervisor-1")
    assert code == 1 and "already declined" in err


def test_a_request_that_is_not_a_query_of_the_agency_changes_nothing(net: Net) -> None:
    path = Path(net.profile("analyst-1"))
    with ExchangeClient(load_client_profile(path)) as client:
        four_eyes = FourEyesClient(client)
        before = len(four_eyes.listing(mine=True))
        with pytest.raises(MalformedInput):
            four_eyes.submit(b"\xff\x00 not a body")
        with pytest.raises(MalformedInput, match="only a query"):
            from exchange.v1 import ledger_pb2

            four_eyes.submit(ledger_pb2.TxBody(chain_id="x").SerializeToString())
        assert len(four_eyes.listing(mine=True)) == before
