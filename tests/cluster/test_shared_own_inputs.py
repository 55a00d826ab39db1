"""tax's three false-invoicing rules read the same own input (the month's invoice
register, same period and fields): the jobs runner commits it once, on behalf of the
three, and runs them side by side. Each run still replays to its digest and exports as an
evidence bundle that verifies offline; a runner that crashed after keeping the input's
envelope commits it once on its rerun; the runs find what runs one after another, each
with its own input, find.

Small bounds, as in test_compare_network.py: answers in chunks of 2 KiB, subject sets in
queries of 5 subjects, findings outputs in chunks of 600 bytes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from exchange.testing.localnet import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("shared_own_inputs")]

CLUSTER_SAMPLE = (21, 400)
PERIOD = "2026-09"
SHARING = ("invoice-ring", "invoices-beyond-inflows", "invoices-from-abnormal-issuers")
ANSWER_CHUNK_BYTES = 2048


def cluster_setup(c: Cluster) -> None:
    for agency in c.agencies:
        c.edit_node_config(agency, "answer_chunk_bytes = 524288",
                           f"answer_chunk_bytes = {ANSWER_CHUNK_BYTES}")


OUTSIDER = "export-rebate-without-exports"  # registered, reads no invoice


def cluster_ready(c: Cluster) -> None:
    for rule_id in (*SHARING, OUTSIDER):
        reg = c.run_exchange("rules", "register", rule_id, "--profile",
                             _profile(c, "supervisor-1"))
        assert reg.returncode == 0, reg.stderr


def _profile(cluster: Cluster, subject: str) -> str:
    return str(cluster.net / "tax" / "analysts" / f"{subject}.toml")


def _config(cluster: Cluster, folder: Path, concurrent: int) -> Path:
    path = folder / f"jobs-{concurrent}.toml"
    path.write_text(
        f'profile = "{_profile(cluster, "automation")}"\n'
        f'rules = {json.dumps(list(SHARING))}\nperiods = ["{PERIOD}"]\n'
        f'state_file = "{folder / "state.json"}"\nrun_playbooks = false\n'
        f"subjects_per_query_max = 5\nfindings_chunk_bytes = 600\n"
        f"rule_runs_concurrent_max = {concurrent}\n")
    return path


def _invoice_queries(cluster: Cluster) -> list[dict[str, Any]]:
    """tax's automation's queries of its own invoice register, from the audit trail."""
    trail = cluster.cli_json("audit", "--agency", "tax", "--analyst", "automation",
                             agency="tax")
    return [e for e in trail["entries"]
            if e["kind"] == "query" and "input invoices" in e["purpose"]]


class _Crash(Exception):
    """The runner's process dies right after it made the input's envelope durable."""


@pytest.fixture(scope="module")
def shared_runs(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory
                ) -> dict[str, Any]:
    """The three rules run by the jobs runner, two at once, after a crash between keeping
    the shared input's envelope and submitting it."""
    from exchange.compare import jobs
    from exchange.compare.network import QUERY_DEADLINE_S
    from exchange.compare.own_inputs import SharedOwnInputs, planned_run
    from exchange.v1 import node_pb2

    folder = tmp_path_factory.mktemp("shared-jobs")
    config = jobs.JobsConfig.load(_config(cluster, folder, 2))
    assert config.rule_runs_concurrent_max == 2
    crashed = jobs.Runner(config)
    try:
        saves = []

        def save_then_crash() -> None:
            crashed._save_state()
            saves.append(1)
            raise _Crash

        sharing = SharedOwnInputs(crashed.client, crashed.signer, crashed.genesis,
                                  QUERY_DEADLINE_S, crashed._state, save_then_crash)
        with pytest.raises(_Crash):
            sharing.commit([planned_run(r, {"period": PERIOD}) for r in crashed.rules()])
        assert saves == [1]
    finally:
        crashed.close()
    kept = json.loads((folder / "state.json").read_text())
    [envelope_hex] = [v for k, v in kept.items() if k.startswith("own-input/")]
    assert _invoice_queries(cluster) == []  # kept, never submitted
    runner = jobs.Runner(jobs.JobsConfig.load(_config(cluster, folder, 2)))
    try:
        report = runner.one_round()
        runs = runner.client.list_findings(node_pb2.ListFindingsRequest(
            owner_agency="tax", period=PERIOD)).runs
    finally:
        runner.close()
    assert not report.failed, report.failed
    assert sorted(r for r, _, _ in report.ran) == sorted(SHARING)
    return {"report": report, "envelope_hex": envelope_hex, "folder": folder,
            "runs": {r.rule_id: r for r in runs if r.rule_id in SHARING and not r.case_id}}


def test_rules_reading_the_same_own_input_reference_one_committed_query(
        cluster: Cluster, shared_runs: dict[str, Any]) -> None:
    from exchange.ledger.block import tx_id
    from exchange.v1 import ledger_pb2

    runs = shared_runs["runs"]
    assert set(runs) == set(SHARING)
    kept = bytes.fromhex(shared_runs["envelope_hex"])
    shared_qid = tx_id(ledger_pb2.Envelope.FromString(kept).body)
    for run in runs.values():  # each run's first input is the register, the same query
        assert bytes(run.input_tx_ids[0]) == shared_qid, run.rule_id
    [query] = _invoice_queries(cluster)  # on the ledger once, the envelope kept pre-crash
    assert query["query"] == shared_qid.hex()
    for rule_id in SHARING:
        assert f"rule {rule_id} v1: input invoices" in query["purpose"]


def test_each_run_on_a_shared_input_replays_to_its_committed_digest(
        cluster: Cluster, shared_runs: dict[str, Any]) -> None:
    for rule_id, run in shared_runs["runs"].items():
        replayed = cluster.run_exchange("compare", "replay", bytes(run.tx_id).hex(),
                                        "--json", "--profile", _profile(cluster, "automation"))
        assert replayed.returncode == 0, (rule_id, replayed.stderr)
        out = json.loads(replayed.stdout)
        assert out["matches"] and out["output_digest"] == bytes(run.output_digest).hex()


def test_a_rerun_of_the_runner_commits_the_shared_input_no_more(
        cluster: Cluster, shared_runs: dict[str, Any]) -> None:
    from exchange.compare import jobs

    folder = shared_runs["folder"]
    runner = jobs.Runner(jobs.JobsConfig.load(_config(cluster, folder, 2)))
    try:
        again = runner.one_round()
    finally:
        runner.close()
    assert again.ran == [] and again.skipped == len(SHARING)
    assert len(_invoice_queries(cluster)) == 1
    kept = json.loads((folder / "state.json").read_text())
    assert not [k for k in kept if k.startswith("own-input/")]  # every run it served ran


def test_each_run_on_a_shared_input_exports_a_bundle_that_verifies_offline(
        cluster: Cluster, shared_runs: dict[str, Any], tmp_path: Path) -> None:
    with_findings = [r for r in SHARING if shared_runs["runs"][r].finding_count]
    assert len(with_findings) >= 2, with_findings  # two runs reading the one input
    for n, rule_id in enumerate(with_findings):
        listed = cluster.cli_json("findings", "--rule", rule_id, "--period", PERIOD,
                                  "--open", agency="tax")
        assert listed["findings"], rule_id
        case = f"CASE-SHARED-{n}"
        opened = cluster.cli_json("findings", "open", listed["findings"][0]["finding"],
                                  "--case", case, agency="tax")
        probe = cluster.cli("submit-probe", agency="tax")  # later blocks attest it
        assert probe.returncode == 0, probe.stderr
        cluster.wait_height(opened["height"] + 1)
        bundle = tmp_path / f"{rule_id}.evidence"
        export = cluster.run_exchange(
            "evidence", "export", "--store", str(cluster.net / "tax" / "data" / "blocks.db"),
            "--case", case, "--with-inputs", "--reveal-with",
            str(cluster.net / "tax" / "keys" / "data.key"),
            "--profile", str(cluster.profile("tax")), "--out", str(bundle), "--json")
        assert export.returncode == 0, export.stderr
        exported = set(json.loads(export.stdout)["tx_ids"])
        run = shared_runs["runs"][rule_id]
        assert {bytes(t).hex() for t in run.input_tx_ids} <= exported
        verified = cluster.run_exchange("evidence", "verify", str(bundle), "--json")
        assert verified.returncode == 0, verified.stderr
        report = json.loads(verified.stdout)
        assert report["case"]["complete"] and report["case"]["case_id"] == case


def test_side_by_side_shared_runs_find_what_sequential_runs_with_own_inputs_find(
        cluster: Cluster, shared_runs: dict[str, Any]) -> None:
    for rule_id in SHARING:
        alone = cluster.run_exchange(
            "compare", "run", rule_id, "--period", PERIOD, "--subjects-per-query", "5",
            "--findings-chunk-bytes", "600", "--json", "--profile",
            _profile(cluster, "automation"), timeout_s=300)
        assert alone.returncode == 0, (rule_id, alone.stderr)
        out = json.loads(alone.stdout)
        shared = shared_runs["runs"][rule_id]
        assert out["output_digest"] == bytes(shared.output_digest).hex(), rule_id
        assert out["findings"] == shared.finding_count
    # run alone, each asked the register itself: three more queries of it
    assert len(_invoice_queries(cluster)) == 1 + len(SHARING)


def test_compare_run_of_several_rules_asks_their_shared_input_once(
        cluster: Cluster, shared_runs: dict[str, Any]) -> None:
    before = len(_invoice_queries(cluster))
    ran = cluster.run_exchange(
        "compare", "run", "invoice-ring", "invoices-from-abnormal-issuers", "--period",
        PERIOD, "--subjects-per-query", "5", "--findings-chunk-bytes", "600",
        "--rule-runs-concurrent-max", "2", "--json", "--profile",
        _profile(cluster, "automation"), timeout_s=300)
    assert ran.returncode == 0, ran.stderr
    runs = {r["rule"]: r for r in json.loads(ran.stdout)["runs"]}
    assert set(runs) == {"invoice-ring", "invoices-from-abnormal-issuers"}
    assert runs["invoice-ring"]["input_txs"][0] == \
        runs["invoices-from-abnormal-issuers"]["input_txs"][0]
    assert len(_invoice_queries(cluster)) == before + 1
    for rule_id, out in runs.items():
        assert out["output_digest"] == bytes(
            shared_runs["runs"][rule_id].output_digest).hex(), rule_id
        replayed = cluster.run_exchange("compare", "replay", out["findings_tx"], "--json",
                                        "--profile", _profile(cluster, "automation"))
        assert replayed.returncode == 0, (rule_id, replayed.stderr)


def test_a_rule_the_shared_input_does_not_name_cannot_use_it(
        cluster: Cluster, shared_runs: dict[str, Any]) -> None:
    """The ledger accepts the shared query as an input only of the rules it names."""
    from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
    from exchange.compare.network import NetworkRun
    from exchange.compare.rule_file import load_rules
    from exchange.compare.session import RunSession

    profile = Path(_profile(cluster, "automation"))
    shared_qid = bytes(shared_runs["runs"]["invoice-ring"].input_tx_ids[0])
    _, _, genesis = load_genesis(profile)
    with ExchangeClient(load_client_profile(profile)) as client:
        signer = Signer.load(client.profile, genesis.chain_id)

        def findings_on_the_shared_input(rule_id: str) -> bytes:
            """The rule's findings over empty inputs, naming the shared query as input."""
            rule = next(r for r in load_rules("tax") if r.id == rule_id)
            with RunSession(rule) as session:
                for name in rule.input_names:
                    session.finish(name)
                output = session.run({"period": PERIOD})
            return NetworkRun(client, signer, genesis, rule)._findings_envelope(
                PERIOD, b'{"period":"2026-09"}', [shared_qid], output, [])

        refused = client.submit(findings_on_the_shared_input(OUTSIDER), wait=True)
        # the same run by a rule the query names (its inputs differ from its earlier
        # run's, so it is a new run) commits: only the rule made the difference
        accepted = client.submit(findings_on_the_shared_input("invoices-beyond-inflows"),
                                 wait=True)
    assert refused.result == "FINDINGS_INVALID", refused
    assert accepted.result == "OK", accepted
