"""The false-invoicing playbooks on a real four-node cluster: the generator's data, the
three rules run by tax's automation for a month with planted rings, then tax's playbook
runner. One case holds every member of a ring (each member's finding names the members
that follow it; the first opens the case, the others join it), each member gets its
follow-ups (its taxpayer record, the invoices it issued, its accounts and their
transactions, its inflows, its legal representative's police records), and the case
graph links the members by their invoices. The other two rules' findings get their
cases and follow-ups too."""

from __future__ import annotations

import csv
import json
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from exchange.testing.localnet import Cluster
from exchange.v1 import node_pb2

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("invoice_playbooks_cluster")]

SEED = 12
COMPANIES = 300
RULES = ("invoice-ring", "invoices-beyond-inflows", "invoices-from-abnormal-issuers")
PLAYBOOKS = ("invoice-ring-follow-up", "invoices-beyond-inflows-follow-up",
             "abnormal-issuers-follow-up")
RING_FOLLOW_UPS = {("tax", "taxpayers"), ("tax", "vat_invoices"), ("pboc", "accounts"),
                   ("pboc", "transactions"), ("pboc", "company_flows"),
                   ("police", "records")}


@dataclass
class Ran:
    cluster: Cluster
    period: str
    truth: set[tuple[str, str]]  # (rule, subject) in the period
    report: dict[str, Any]


def _profile(cluster: Cluster, subject: str) -> str:
    return str(cluster.net / "tax" / "analysts" / f"{subject}.toml")


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ran]:
    cluster = Cluster(tmp_path_factory.mktemp("invoice-playbooks"))
    try:
        cluster.init()
        data = cluster.load_sample(SEED, COMPANIES)
        with open(data / "ground_truth.csv", encoding="utf-8", newline="") as f:
            truth = [(r["rule_id"], r["subject"], r["period"]) for r in csv.DictReader(f)]
        # the month with the most ring members
        months: dict[str, int] = defaultdict(int)
        for rule, _subject, period in truth:
            months[period] += rule == "invoice-ring"
        period = max(sorted(months), key=lambda p: months[p])
        cluster.start()
        for rule_id in RULES:
            _ok(cluster.run_exchange("rules", "register", rule_id, "--profile",
                                     _profile(cluster, "supervisor-1")))
            _ok(cluster.run_exchange("compare", "run", rule_id, "--period", period,
                                     "--profile", _profile(cluster, "automation"),
                                     timeout_s=300))
        for playbook in PLAYBOOKS:
            _ok(cluster.run_exchange("playbooks", "register", playbook, "--profile",
                                     _profile(cluster, "supervisor-1")))
        out = _ok(cluster.run_exchange(
            "playbooks", "run", "--json", "--rounds", "1", "--spool",
            str(cluster.root / "tax-spool.db"), "--profile", _profile(cluster, "automation"),
            timeout_s=600))
        report = json.loads(out.splitlines()[-1])
        yield Ran(cluster, period, {(r, s) for r, s, p in truth if p == period and r in RULES},
                  report)
    finally:
        cluster.stop()


def _findings(cluster: Cluster) -> dict[tuple[bytes, str], dict[str, Any]]:
    """Every finding of the three rules as tax reads it: (run, finding id) -> its line."""
    out = {}
    with cluster.client("tax") as client:
        listing = client.list_findings(node_pb2.ListFindingsRequest(open=True))
    for run in listing.runs:
        if run.rule_id not in RULES:
            continue
        lines = {int(i): json.loads(line) for i, line in zip(run.line_index, run.lines,
                                                             strict=True)}
        for index, summary in enumerate(run.findings):
            out[(bytes(run.tx_id), summary.finding_id)] = {"rule": run.rule_id,
                                                          **lines[index]}
    return out


def test_the_rules_find_the_ground_truth_over_the_network(ran: Ran) -> None:
    found = {(f["rule"], f["subject"]) for f in _findings(ran.cluster).values()}
    assert found == ran.truth
    assert {rule for rule, _s in found} == set(RULES)


def test_one_case_holds_every_member_of_a_ring_with_each_members_follow_ups(
        ran: Ran) -> None:
    cluster = ran.cluster
    findings = _findings(cluster)
    with cluster.client("tax") as client:
        cases = {c.case_id: c for c in client.list_cases().cases}
        trail = client.audit(node_pb2.AuditRequest(agency="tax", limit=100_000))
    case_of: dict[tuple[bytes, str], str] = {}
    for case in cases.values():
        for tx, finding_id in zip(case.ref_tx_ids, case.ref_finding_ids, strict=True):
            if finding_id:
                assert (bytes(tx), finding_id) not in case_of  # one case per finding
                case_of[(bytes(tx), finding_id)] = case.case_id
    assert set(findings) <= set(case_of), "a finding without a case"
    # the rings: members joined by the companies each names as following it
    parent: dict[str, str] = {}

    def root(u: str) -> str:
        while parent.setdefault(u, u) != u:
            u = parent[u]
        return u

    ring = {key: f for key, f in findings.items() if f["rule"] == "invoice-ring"}
    for f in ring.values():
        for other in f["linked_uscc"].split():
            parent[root(other)] = root(f["subject"])
    rings: dict[str, set[tuple[bytes, str]]] = defaultdict(set)
    for key, f in ring.items():
        rings[root(f["subject"])].add(key)
    assert len(rings) >= 2  # planted rings of the month, each its own group
    asked: dict[str, set[tuple[str, str, str]]] = defaultdict(set)
    for entry in trail.entries:
        q = entry.query
        if entry.kind == "query" and q.case_id and q.on_behalf_of.startswith("playbook:"):
            for subject in q.subjects:
                asked[q.case_id].add((q.target_agency, q.dataset, subject.partition("=")[2]))
    for members in rings.values():
        (case_id,) = {case_of[key] for key in members}  # one case for the whole ring
        assert case_id.startswith("TAX-IR-")
        usccs = {findings[key]["subject"] for key in members}
        assert {findings[key]["subject"] for key in findings
                if case_of.get(key) == case_id} >= usccs
        for uscc in usccs:  # each member's own follow-ups, asked in that case
            about = {(a, d) for a, d, s in asked[case_id] if s == uscc}
            assert {("tax", "taxpayers"), ("tax", "vat_invoices"), ("pboc", "accounts"),
                    ("pboc", "company_flows")} <= about, (uscc, about)
        datasets = {(a, d) for a, d, _s in asked[case_id]}
        assert datasets >= RING_FOLLOW_UPS, datasets
        graph = cluster.cli_json("case", "graph", case_id, agency="tax")
        assert isinstance(graph, dict)
        invoiced = {(e["from"], e["to"]) for e in graph["edges"]
                    if e["relation"] == "invoiced"}
        for key in members:  # the ring's links: each member invoiced those following it
            f = findings[key]
            for buyer in f["linked_uscc"].split():
                assert (f"company:{f['subject']}", f"company:{buyer}") in invoiced
        assert any(e["relation"] == "holds" for e in graph["edges"])  # and its accounts


def test_the_other_two_rules_findings_get_their_cases_and_follow_ups(ran: Ran) -> None:
    cluster = ran.cluster
    findings = _findings(cluster)
    with cluster.client("tax") as client:
        cases = {c.case_id: c for c in client.list_cases().cases}
        trail = client.audit(node_pb2.AuditRequest(agency="tax", limit=100_000))
    datasets: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for entry in trail.entries:
        q = entry.query
        if entry.kind == "query" and q.case_id:
            datasets[q.case_id].add((q.target_agency, q.dataset))
    for rule, prefix, wanted in (
            ("invoices-beyond-inflows", "TAX-IB-",
             {("tax", "taxpayers"), ("tax", "vat_invoices"), ("pboc", "accounts"),
              ("pboc", "transactions"), ("pboc", "company_flows")}),
            ("invoices-from-abnormal-issuers", "TAX-AI-",
             {("tax", "taxpayers"), ("tax", "vat_invoices"), ("pboc", "accounts"),
              ("pboc", "transactions"), ("pboc", "company_flows")})):
        keys = [k for k, f in findings.items() if f["rule"] == rule]
        assert keys
        for key in keys:
            (case_id,) = [c for c, case in cases.items() if key in set(zip(
                (bytes(t) for t in case.ref_tx_ids), case.ref_finding_ids, strict=True))]
            assert case_id.startswith(prefix)
            assert wanted <= datasets[case_id], (rule, datasets[case_id])
    assert ran.report["failed"] == 0, ran.report
