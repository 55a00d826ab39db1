"""Playbooks on a real four-node cluster (issue 10, "Done when"): the reference rule pack
on generated data, then each owner's reference playbooks, open one case per matched
finding with its follow-up queries answered; `exchange watch` shows each step as it
commits; a webhook receiver started here gets every event concerning its agency once,
with a valid signature; a case's evidence bundle verifies offline. And exactly once under
crashes: the police's runner is killed (SIGKILL) at random points of its playbook several
times, and every finding still has one case and one set of follow-up queries, with no
step sent twice."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from exchange.cases.playbooks import QueryStep, load_playbooks
from exchange.ledger.block import open_envelope
from exchange.ledger.playbooks import CODE_STEP_DONE, parse_step_ref
from exchange.ledger.store import BlockStore
from exchange.testing.localnet import Cluster
from exchange.v1 import node_pb2
from tests.unit.node.test_webhook import Receiver

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("playbooks_cluster")]

SEED = 31
COMPANIES = 400
PERIOD = "2026-09"
RULES = {"tax": ("export-rebate-without-exports", "revenue-below-bank-inflows"),
         "customs": ("import-undervaluation",), "pboc": ("payments-without-imports",),
         "police": ("officer-with-police-record",)}
UNBOUND = "officer-with-police-record"
HOOKED = ("tax", "police")  # the nodes with a webhook
KILLS = 5
KILL_AFTER_S = (1.0, 3.0)
WAIT_S = 90.0


@dataclass
class Swept:
    cluster: Cluster
    receiver: Receiver
    keys: dict[str, bytes]
    watch_path: Path
    kills: list[tuple[float, int]] = field(default_factory=list)  # (after s, steps then)
    reports: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bounded: dict[str, dict[str, Any]] = field(default_factory=dict)


def _profile(cluster: Cluster, agency: str, subject: str) -> str:
    return str(cluster.net / agency / "analysts" / f"{subject}.toml")


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _run_playbooks(cluster: Cluster, agency: str, *extra: str) -> list[str]:
    return ["exchange.cli.main", "playbooks", "run", "--json", "--spool",
            str(cluster.root / f"{agency}-spool.db"), "--profile",
            _profile(cluster, agency, "automation"), *extra]


def _webhook_events(receiver: Receiver) -> list[tuple[dict[str, str], bytes]]:
    return receiver.delivered()


def _outbox_pending(cluster: Cluster, agency: str) -> int:
    import sqlite3

    db = sqlite3.connect(f"file:{cluster.net / agency / 'data' / 'webhook.db'}?mode=ro",
                         uri=True)
    try:
        row = db.execute("SELECT COUNT(*) FROM events WHERE delivered_ms IS NULL").fetchone()
        return int(row[0])
    finally:
        db.close()


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:g} s: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swept]:
    root = tmp_path_factory.mktemp("playbooks")
    cluster = Cluster(root)
    watch: subprocess.Popen[bytes] | None = None
    runner: subprocess.Popen[bytes] | None = None
    with Receiver() as receiver:
        try:
            cluster.init()
            keys = {}
            for agency in HOOKED:  # each hooked node signs with a key of its own
                key = hashlib.sha256(f"webhook key of {agency}".encode()).hexdigest().encode()
                keys[agency] = key
                (cluster.net / agency / "webhook.key").write_bytes(key + b"\n")
                with open(cluster.node_config(agency), "a", encoding="utf-8") as f:
                    f.write(f'\n[webhook]\nurl = "{receiver.url}"\n'
                            'secret_file = "webhook.key"\nbackoff_ms_min = 50\n')
            cluster.load_sample(SEED, COMPANIES)
            cluster.start()
            watch_path = root / "watch.jsonl"
            with open(watch_path, "wb") as out:  # streams from the next block on
                watch = subprocess.Popen(
                    [sys.executable, "-m", "exchange.cli.main", "watch", "--json",
                     "--profile", str(cluster.profile("tax"))],
                    stdout=out, stderr=subprocess.DEVNULL, cwd=root, env=cluster.env)
            swept = Swept(cluster, receiver, keys, watch_path)
            for agency, rule_ids in RULES.items():
                supervisor = _profile(cluster, agency, "supervisor-1")
                for rule_id in rule_ids:
                    _ok(cluster.run_exchange("rules", "register", rule_id, "--profile",
                                             supervisor))
                    _ok(cluster.run_exchange(
                        "compare", "run", rule_id,
                        *(("--period", PERIOD) if rule_id != UNBOUND else ()),
                        "--profile", _profile(cluster, agency, "automation"), timeout_s=300))
                for playbook in load_playbooks(agency):
                    _ok(cluster.run_exchange("playbooks", "register", playbook.id,
                                             "--profile", supervisor))
            # the police's runner, killed at random points of its playbook
            rng = random.Random(SEED)
            for _ in range(KILLS):
                runner = subprocess.Popen(
                    [sys.executable, "-m", *_run_playbooks(cluster, "police", "--rounds", "0",
                                                           "--interval", "0.2",
                                                           "--workers", "1")],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
                    env=cluster.env)
                delay = rng.uniform(*KILL_AFTER_S)
                try:
                    runner.wait(delay)
                except subprocess.TimeoutExpired:
                    runner.send_signal(signal.SIGKILL)
                    runner.wait(10)
                runner = None
                with cluster.client("police") as client:
                    taken = len(client.list_playbooks("police", with_steps=True).steps)
                swept.kills.append((round(delay, 2), taken))
            # bounds: pboc's runner at most 2 follow-ups a finding, tax's 2 an hour per agency
            for agency, bound in (("pboc", "--follow-ups-per-finding"),
                                  ("tax", "--follow-ups-per-hour")):
                out = _ok(cluster.run_exchange(*_run_playbooks(cluster, agency)[1:],
                                               bound, "2", "--rounds", "1", timeout_s=300))
                swept.bounded[agency] = json.loads(out.splitlines()[-1])
            for agency in RULES:  # every runner to the end, then once more: nothing new
                reports = []
                for _ in range(2):
                    out = _ok(cluster.run_exchange(*_run_playbooks(cluster, agency)[1:],
                                                   "--rounds", "1", timeout_s=300))
                    reports += [json.loads(line) for line in out.splitlines() if line.strip()]
                swept.reports[agency] = reports
            cluster.cli("submit-probe", agency="tax")  # one more block for the stragglers
            yield swept
        finally:
            for proc in (runner, watch):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(10)
            cluster.stop()


def _store(cluster: Cluster, agency: str = "tax") -> BlockStore:
    return BlockStore.open(cluster.net / agency / "data" / "blocks.db")


def _findings(cluster: Cluster) -> dict[tuple[str, str], dict[str, Any]]:
    """Every finding in force, as its owner reads it: (run, finding id) -> finding."""
    out = {}
    for agency in RULES:
        listing = cluster.cli_json("findings", "--agency", agency, "--open", agency=agency)
        for f in listing["findings"]:  # type: ignore[index]
            out[(f["run"], f["finding"])] = f
    return out


def test_every_finding_has_one_case_and_one_set_of_follow_ups(swept: Swept) -> None:
    cluster = swept.cluster
    findings = _findings(cluster)
    assert len(findings) >= 10, findings
    steps_of: dict[tuple[str, str], list[Any]] = defaultdict(list)
    playbooks = {}
    for agency in RULES:
        with cluster.client(agency) as client:
            listing = client.list_playbooks(agency, with_steps=True)
        for p in load_playbooks(agency):
            playbooks[p.digest_hex] = p
        for step in listing.steps:
            ref = parse_step_ref(step.ref)
            assert ref is not None
            steps_of[(ref.run_tx_id.hex(), ref.finding_id)].append((ref, step))
    cases = cases_of(cluster)
    for key, finding in findings.items():
        assert steps_of.get(key), f"no playbook took finding {key}"
        by_playbook: dict[str, list[Any]] = defaultdict(list)
        for ref, step in steps_of[key]:
            by_playbook[ref.digest.hex()].append((ref, step))
        owners = set()
        for digest, steps in by_playbook.items():  # per playbook version: one set
            playbook = playbooks[digest]
            case_steps = [s for ref, s in steps if ref.step_key == "0-case"]
            assert len(case_steps) == 1, (key, playbook.id, case_steps)
            case = cases[case_steps[0].case_id]
            assert case.agency == playbook.owner and case.status == "open"
            assert (bytes.fromhex(key[0]), key[1]) in set(zip(
                (bytes(t) for t in case.ref_tx_ids), case.ref_finding_ids, strict=True))
            keys = [ref.step_key for ref, s in steps if s.kind != "rule"]
            assert len(keys) == len(set(keys)), keys  # each step once
            asked = [ref.step_key for ref, s in steps if s.kind == "query"]
            assert asked and len(asked) <= sum(isinstance(s, QueryStep)
                                               for s in playbook.steps)
            assert any(ref.step_key.endswith("-notify") for ref, _s in steps)
            owners.add(playbook.owner)
        assert finding["owner"] in owners  # the finding's own agency took it
    # one valid transaction per step on the ledger, and none sent twice
    with _store(cluster) as store:
        on_behalf: Counter[str] = Counter()
        codes: Counter[str] = Counter()
        for height in range(1, store.height + 1):
            for raw, code in zip(store.envelopes(height), store.results(height), strict=True):
                codes[code] += 1
                env = open_envelope(raw, store.signed_genesis_chain_id())
                if env.kind == "query" and code == "OK" and \
                        env.body.query.on_behalf_of.startswith("playbook:"):
                    on_behalf[env.body.query.on_behalf_of] += 1
    assert on_behalf and max(on_behalf.values()) == 1
    assert codes[CODE_STEP_DONE] == 0, codes
    # every follow-up was answered or refused on the record, most of them answered
    with cluster.client("tax") as client:
        trail = client.audit(node_pb2.AuditRequest(limit=100_000))
    follow_ups = [e.query for e in trail.entries if e.kind == "query"
                  and e.query.on_behalf_of.startswith("playbook:")]
    assert len(follow_ups) == len(on_behalf)
    assert {q.status for q in follow_ups} <= {"answered", "refused"}
    assert sum(q.status == "answered" for q in follow_ups) > len(follow_ups) // 2
    # the second pass of every runner found nothing left to do
    for agency, reports in swept.reports.items():
        assert reports[-1]["jobs"] == 0 and reports[-1]["steps"] == {}, (agency, reports)
    assert swept.reports["police"][0]["failed"] == 0
    # the kills fell in the middle of the police's work, more than once
    police_steps = sum(1 for ref_steps in steps_of.values() for ref, _s in ref_steps
                       if playbooks[ref.digest.hex()].owner == "police")
    interrupted = [k for k in swept.kills if 0 < k[1] < police_steps]
    assert len(interrupted) >= 2, (swept.kills, police_steps)


def test_follow_ups_are_bounded_per_finding_and_per_hour(swept: Swept) -> None:
    pboc, tax = swept.bounded["pboc"], swept.bounded["tax"]
    assert pboc["skipped"].get("follow-up bound per finding", 0) > 0, pboc
    with swept.cluster.client("pboc") as client:
        steps = client.list_playbooks("pboc", with_steps=True).steps
    asked: Counter[tuple[bytes, str]] = Counter()
    for step in steps:
        ref = parse_step_ref(step.ref)
        assert ref is not None
        if step.kind == "query":
            asked[(ref.run_tx_id, ref.finding_id)] += 1
    assert asked and max(asked.values()) <= 2
    # tax met its hourly bound (2 per target agency): the rest waited for later rounds
    assert tax["deferred"] > 0 and tax["steps"].get("follow-up", 0) <= 2 * 4, tax


def cases_of(cluster: Cluster) -> dict[str, Any]:
    with cluster.client("tax") as client:
        return {c.case_id: c for c in client.list_cases().cases}


def _case_transactions(cluster: Cluster) -> dict[str, set[str]]:
    """Per case, the tx ids of its case events, queries and their outcomes."""
    out: dict[str, set[str]] = defaultdict(set)
    for case_id, case in cases_of(cluster).items():
        out[case_id].update(bytes(t).hex() for t in case.event_tx_ids)
    with cluster.client("tax") as client:
        trail = client.audit(node_pb2.AuditRequest(limit=100_000))
    for e in trail.entries:
        if e.query.case_id:
            out[e.query.case_id].add(bytes(e.tx_id).hex())
    return out


def test_watch_shows_each_step_as_it_commits(swept: Swept) -> None:
    cluster = swept.cluster
    expected = _case_transactions(cluster)
    expected_txs = set().union(*expected.values())

    def seen() -> list[dict[str, Any]]:
        text = swept.watch_path.read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    _wait(lambda: expected_txs <= {e["tx"] for e in seen()}, "watch shows every case step")
    events = seen()
    assert [e["height"] for e in events] == sorted(e["height"] for e in events)
    by_tx = defaultdict(list)
    for e in events:
        by_tx[e["tx"]].append(e)
    for case_id, txs in expected.items():
        for tx in txs:
            assert all(e.get("case") == case_id for e in by_tx[tx]), (case_id, by_tx[tx])
    kinds = Counter(e["event"] for e in events)
    assert kinds["finding"] >= len(_findings(cluster))
    assert kinds["case"] and kinds["query"] and kinds["answer"]
    # the tax analyst reads its own findings' subjects; others' stay sealed
    tax_findings = [e for e in events if e["event"] == "finding" and e["owner"] == "tax"]
    assert tax_findings and all(e.get("subject") for e in tax_findings)
    police_findings = [e for e in events if e["event"] == "finding" and e["owner"] == "pboc"]
    assert all("subject" not in e for e in police_findings)
    # one case, as a person watches it
    case_id = next(c for c in expected if c.startswith("TAX-RV"))
    lines = cluster.run_exchange("watch", "--case", case_id, "--from-height", "1",
                                 "--until-height", str(max(e["height"] for e in events)),
                                 "--profile", str(cluster.profile("tax")))
    text = _ok(lines)
    assert f"{case_id} open by tax by playbook" in text
    assert text.count(" query ") >= 3 and " notify by tax" in text


def _concerning(cluster: Cluster, agency: str) -> set[str]:
    """The events a node's webhook owes its agency, from the ledger's listings (not the
    event builder): findings it owns or gave data to, events of cases it opened or acted
    on, queries naming a case that it asked or was asked, and their outcomes."""
    ids: set[str] = set()
    with cluster.client(agency) as client:
        chain_id = client.status().chain_id
        trail = client.audit(node_pb2.AuditRequest(limit=100_000))
        queries = {bytes(e.query.tx_id): e.query for e in trail.entries}
        runs = client.list_findings(node_pb2.ListFindingsRequest(all_runs=True)).runs
        cases = client.list_cases().cases
        for run in runs:
            parties = {run.owner_agency} | {queries[bytes(q)].target_agency
                                            for q in run.input_tx_ids}
            if agency in parties:
                ids.update(f"{bytes(run.tx_id).hex()}/{f.finding_id}" for f in run.findings)
        for case in cases:
            for tx in case.event_tx_ids:
                info = client.get_transaction(bytes(tx))
                actor = open_envelope(info.envelope, chain_id).body.agency
                if agency in (case.agency, actor):
                    ids.add(bytes(tx).hex())
    for e in trail.entries:
        q = e.query
        if q.case_id and agency in (q.requester_agency, q.target_agency):
            ids.add(bytes(e.tx_id).hex())
    return ids


def test_the_webhook_gets_every_event_once_with_a_valid_signature(swept: Swept) -> None:
    cluster, receiver = swept.cluster, swept.receiver
    _wait(lambda: all(_outbox_pending(cluster, a) == 0 for a in HOOKED),
          "the webhook outboxes drained")
    received: dict[str, list[str]] = defaultdict(list)
    for headers, body in _webhook_events(receiver):
        doc = json.loads(body)
        agency = doc["agency"]
        key = swept.keys[agency]
        assert headers["X-Exchange-Signature"] == \
            "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
        assert headers["X-Exchange-Event"] == doc["id"]
        received[agency].append(doc["id"])
    for agency in HOOKED:
        ids = received[agency]
        assert len(ids) == len(set(ids)), Counter(ids).most_common(3)  # once each
        assert set(ids) == _concerning(cluster, agency), agency


def test_a_case_bundle_holds_the_playbooks_steps_and_verifies_offline(swept: Swept) -> None:
    cluster = swept.cluster
    case_id = next(c for c in cases_of(cluster) if c.startswith("TAX-RV"))
    shown = cluster.cli_json("case", "show", case_id, agency="tax")
    assert shown["findings"][0]["subject"]  # type: ignore[index]
    kinds = [t["kind"] for t in shown["timeline"]]  # type: ignore[index]
    assert kinds[0] == "case open" and "answer" in kinds and kinds[-1] == "case notify"
    answered = [q for q in shown["queries"] if q["rows"]]  # type: ignore[index]
    assert answered and all(q["playbook"] or q["on_behalf_of"] for q in answered)
    graph = cluster.cli_json("case", "graph", case_id, agency="tax")
    relations = {e["relation"] for e in graph["edges"]}  # type: ignore[index]
    assert {"legal representative", "holds"} <= relations, relations
    bundle = cluster.root / "case.evidence"
    _ok(cluster.run_exchange(
        "evidence", "export", "--store", str(cluster.net / "tax" / "data" / "blocks.db"),
        "--case", case_id, "--reveal-with", str(cluster.net / "tax" / "keys" / "data.key"),
        "--profile", str(cluster.profile("tax")), "--out", str(bundle)))
    verified = json.loads(_ok(cluster.run_exchange("evidence", "verify", str(bundle),
                                                   "--json")))
    assert verified["ok"] and verified["case"]["case_id"] == case_id
    bundled = {t["tx_id"] for t in verified["transactions"]}
    steps = _case_transactions(cluster)[case_id]
    assert steps <= bundled
    assert any(t["kind"] == "playbook_registration" for t in verified["transactions"])
    # the rule step's runs for the case are in the bundle and replay to their digests
    with cluster.client("tax") as client:
        scoped = [r for r in client.list_findings(node_pb2.ListFindingsRequest(
            owner_agency="tax", all_runs=True)).runs if r.case_id == case_id]
    assert scoped and {bytes(r.tx_id).hex() for r in scoped} <= bundled
    replayed = json.loads(_ok(cluster.run_exchange(
        "compare", "replay", bytes(scoped[0].tx_id).hex(), "--json", "--profile",
        _profile(cluster, "tax", "automation"))))
    assert replayed["matches"]
