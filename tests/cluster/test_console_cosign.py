"""Four eyes through the agency's own node (`exchange cosign`, the FourEyes service) on a
real cluster: an analyst leaves a query the police's policy wants co-signed, a supervisor
of the same agency lists it, co-signs it with their own profile, and the analyst signs
and submits it, which the police answer. Nobody co-signs their own query, only a
supervisor lists others' requests, a co-signature made with another key than the
caller's credential is refused, and a declined request cannot be submitted."""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
from exchange.client.cosign import FourEyesClient, cosign_view
from exchange.errors import ExchangeError, InvalidSignature, MalformedInput, PermissionDenied
from exchange.testing.localnet import Cluster

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
        from exchange.client.cosign import unsigned_query_body
        from exchange.client.crossquery import QuerySpec

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


def _short_lived_request(net: Net, deadline_s: int) -> str:
    """A request whose query's deadline is `deadline_s` from now (the CLI asks at least a
    minute), left by analyst-1 through the FourEyes client."""
    from exchange.client.cosign import unsigned_query_body
    from exchange.client.crossquery import QuerySpec

    path = Path(net.profile("analyst-1"))
    with ExchangeClient(load_client_profile(path)) as client:
        _, _, genesis = load_genesis(path)
        signer = Signer.load(client.profile, genesis.chain_id)
        body = unsigned_query_body(QuerySpec(
            target="police", dataset="records", subjects=(("person_id", net.officer),),
            case_id="SZ-4E-SHORT", purpose="short-lived", deadline_s=deadline_s), signer,
            genesis, list(client.status().member_entries))
        return FourEyesClient(client).submit(body).request_id


def test_requests_and_decisions_survive_a_node_restart_and_expire_at_their_deadline(
        net: Net) -> None:
    import time

    from exchange.errors import NotFound

    pending = net.request()
    declined = net.request()
    net.ok("cosign", "decline", declined, "--reason", "no case opened yet",
           subject="supervisor-1")
    short = _short_lived_request(net, deadline_s=2)
    assert net.ok("cosign", "show", short)["status"] == "pending"
    net.cluster.restart("tax")  # SIGTERM, then a new process on the same data
    net.cluster.wait_ready()
    waiting = [r["request"] for r in  # type: ignore[index, union-attr]
               net.ok("cosign", "list", subject="supervisor-1")["requests"]]
    assert pending in waiting and declined not in waiting
    shown = net.ok("cosign", "show", declined)
    assert shown["status"] == "declined" and shown["decline_reason"] == "no case opened yet"
    approved = net.ok("cosign", "approve", pending, subject="supervisor-1")
    assert approved["status"] == "cosigned"
    net.cluster.restart("tax", signal.SIGKILL)  # no clean stop: the commit was enough
    net.cluster.wait_ready()
    assert net.ok("cosign", "show", pending)["status"] == "cosigned"
    net.ok("cosign", "submit", pending)
    path = Path(net.profile("analyst-1"))
    with ExchangeClient(load_client_profile(path)) as client:
        four_eyes = FourEyesClient(client)
        give_up = time.monotonic() + 60
        while short in [v.request_id for v in four_eyes.listing(mine=True)]:
            assert time.monotonic() < give_up, "a request outlived its deadline"
            time.sleep(0.2)
        with pytest.raises(NotFound, match="expired, or never made here"):
            four_eyes.get(short)


def test_the_stored_requests_keep_their_bounds_and_expire(tmp_path: Path) -> None:
    from exchange.errors import RateLimited
    from exchange.node.cosign import (
        PER_ANALYST_MAX,
        REQUESTS_MAX,
        STATUS_DECLINED,
        CosignStore,
    )
    from exchange.v1 import cosign_pb2

    now_ms = 1_800_000_000_000

    def view(n: int, analyst: str, deadline_ms: int = now_ms + 60_000
             ) -> cosign_pb2.CosignRequestView:
        return cosign_pb2.CosignRequestView(request_id=f"r{n}", analyst=analyst,
                                            agency="tax", status="pending",
                                            created_ms=now_ms, deadline_ms=deadline_ms)

    path = tmp_path / "cosign.db"
    store = CosignStore(path)
    for n in range(PER_ANALYST_MAX):
        store.add(view(n, "analyst-1"), b"k1", now_ms, "tax")
    with pytest.raises(RateLimited, match=f"analyst-1 has {PER_ANALYST_MAX} requests"):
        store.add(view(10_000, "analyst-1"), b"k1", now_ms, "tax")
    decided = view(0, "analyst-1")
    decided.status, decided.decline_reason = STATUS_DECLINED, "no"
    assert store.decide(decided, now_ms)
    assert not store.decide(decided, now_ms)  # decided once
    store.close()

    store = CosignStore(path)  # reopened: as it was
    assert store.count() == PER_ANALYST_MAX
    found = store.find("r0", now_ms)
    assert found is not None and found[0].status == STATUS_DECLINED and found[1] == b"k1"
    n = PER_ANALYST_MAX
    while n < REQUESTS_MAX:
        store.add(view(n, f"analyst-{2 + n // PER_ANALYST_MAX}"), b"k", now_ms, "tax")
        n += 1
    with pytest.raises(RateLimited, match=f"holds {REQUESTS_MAX} co-signature requests"):
        store.add(view(n, "analyst-new"), b"k", now_ms, "tax")
    assert store.count() == REQUESTS_MAX and store.find(f"r{n}", now_ms) is None
    later_ms = now_ms + 60_000  # every deadline has passed
    assert store.find("r1", later_ms) is None and store.views(later_ms, "analyst-1") == []
    store.add(view(n, "analyst-new", later_ms + 1), b"k", later_ms, "tax")
    assert store.count() == 1
    store.close()


def test_a_persons_language_outlasts_a_console_restart_and_is_theirs_alone(
        net: Net) -> None:
    from starlette.testclient import TestClient

    from exchange.console.app import create_app
    from exchange.console.security import CSRF_FIELD, Gate
    from exchange.console.session import connect_person
    from exchange.console.settings import SETTINGS_FILE

    host = "testserver"

    def console(subject: str) -> tuple[TestClient, Gate]:
        """A freshly started console of `subject`, one browser signed in."""
        gate = Gate()
        app = create_app(connect_person(Path(net.profile(subject)), None), gate,
                         frozenset({host}))
        client = TestClient(app, base_url=f"http://{host}", follow_redirects=False)
        assert client.get(f"/evidence?token={gate.token}").status_code == 303
        return client, gate

    def lang(client: TestClient) -> str:
        page = client.get("/evidence").text
        return page.split('<html lang="', 1)[1].split('"', 1)[0]

    first, gate = console("analyst-1")
    assert lang(first) == "zh-CN"  # the default
    csrf = next(iter(gate.sessions.values())).csrf
    chosen = first.post("/lang", data={CSRF_FIELD: csrf, "lang": "en", "next": "/evidence"})
    assert chosen.status_code == 303 and lang(first) == "en"
    first.close()

    again, _ = console("analyst-1")  # a new console: nothing of the last one in memory
    assert lang(again) == "en"
    other, _ = console("supervisor-1")  # the same profile folder, another person
    assert lang(other) == "zh-CN"
    settings = json.loads((Path(net.profile("analyst-1")).parent / SETTINGS_FILE)
                          .read_text())
    assert settings["tax/analyst-1"] == {"language": "en"}
    assert "tax/supervisor-1" not in settings
    again.close()
    other.close()


def test_an_unreadable_settings_file_counts_as_no_choice_and_is_replaced(
        tmp_path: Path) -> None:
    from exchange.console.settings import SETTINGS_FILE, PersonSettings

    (tmp_path / SETTINGS_FILE).write_text("{ not json")
    settings = PersonSettings(tmp_path, "tax/analyst-1")
    assert settings.language is None
    with pytest.raises(ValueError, match="not one of"):
        settings.set_language("fr")
    settings.set_language("en")
    assert PersonSettings(tmp_path, "tax/analyst-1").language == "en"
    assert PersonSettings(tmp_path, "tax/analyst-2").language is None
    assert (tmp_path / SETTINGS_FILE).stat().st_mode & 0o777 == 0o600


def test_the_network_page_shows_what_the_nodes_health_service_says(net: Net) -> None:
    from starlette.testclient import TestClient

    from exchange.console.app import create_app
    from exchange.console.security import Gate
    from exchange.console.session import connect_person

    person = connect_person(Path(net.profile("automation")), None)
    assert person.serving() == "SERVING"
    gate = Gate()
    with TestClient(create_app(person, gate, frozenset({"testserver"})),
                    base_url="http://testserver", follow_redirects=False) as client:
        assert client.get(f"/network?token={gate.token}").status_code == 303
        page = client.get("/network").text
    card = page[page.index('id="serving"'):]
    assert card.startswith('id="serving" data-status="SERVING">正在服务<')
    person.client.close()
