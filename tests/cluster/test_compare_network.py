"""The reference rules run on a real four-node cluster through each owner's automation:
the findings equal ground_truth.csv exactly, every run replays to its digest, reruns
supersede, and only registered rules run.

The cluster runs with small bounds (answers in chunks of 2 KiB, subject sets in queries of
5 subjects, findings outputs in chunks of 600 bytes), so that every input spans several
chunks and the findings of the larger runs several transactions: the paths a city-sized
register takes, at a size CI runs in a minute."""

from __future__ import annotations

import csv
import json
import time
from typing import Any

import pytest

from exchange.testing.localnet import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("compare_network")]

SEED = 21
COMPANIES = 400
PERIODS = ("2026-07", "2026-08", "2026-09")
RULES = {"tax": ("export-rebate-without-exports", "revenue-below-bank-inflows",
                 "invoices-beyond-inflows", "invoice-ring", "invoices-from-abnormal-issuers"),
         "customs": ("import-undervaluation",), "pboc": ("payments-without-imports",),
         "police": ("officer-with-police-record",)}
UNBOUND = "officer-with-police-record"
ANSWER_CHUNK_BYTES = 2048
BOUNDS = ("--subjects-per-query", "5", "--findings-chunk-bytes", "600")


CLUSTER_SAMPLE = (SEED, COMPANIES)


def cluster_setup(c: Cluster) -> None:
    for agency in c.agencies:
        c.edit_node_config(agency, "answer_chunk_bytes = 524288",
                           f"answer_chunk_bytes = {ANSWER_CHUNK_BYTES}")

def _profile(cluster: Cluster, agency: str, subject: str) -> str:
    return str(cluster.net / agency / "analysts" / f"{subject}.toml")


def _run(cluster: Cluster, agency: str, *args: str) -> dict[str, Any]:
    result = cluster.run_exchange(*args, "--json", "--profile",
                                  _profile(cluster, agency, "automation"), timeout_s=300)
    assert result.returncode == 0, (args, result.stderr)
    out: dict[str, Any] = json.loads(result.stdout)
    return out


def test_an_unregistered_rule_does_not_run(cluster: Cluster, tmp_path: Any) -> None:
    from exchange.compare.rule_file import rules_dir

    text = (rules_dir("pboc") / "payments-without-imports.yaml").read_text()
    changed = tmp_path / "payments-without-imports.yaml"
    changed.write_text(text.replace("version: 1", "version: 99"))
    result = cluster.run_exchange("compare", "run", str(changed), "--period", PERIODS[0],
                                  "--profile", _profile(cluster, "pboc", "automation"))
    assert result.returncode == 1 and "is not registered" in result.stderr, result.stderr
    # nor may an analyst register one: registration is a supervisor's
    refused = cluster.run_exchange("rules", "register", str(changed),
                                   "--profile", str(cluster.profile("pboc")))
    assert refused.returncode == 1 and "judged RULE_INVALID" in refused.stderr


@pytest.fixture(scope="module")
def swept(cluster: Cluster) -> list[tuple[str, dict[str, Any]]]:
    """Every reference rule registered by its owner's supervisor and run by its
    automation for every period (the officer rule once)."""
    runs = []
    for agency, rule_ids in RULES.items():
        for rule_id in rule_ids:
            reg = cluster.run_exchange("rules", "register", rule_id, "--profile",
                                       _profile(cluster, agency, "supervisor-1"))
            assert reg.returncode == 0, reg.stderr
            for period in ((None,) if rule_id == UNBOUND else PERIODS):
                out = _run(cluster, agency, "compare", "run", rule_id, *BOUNDS,
                           *(("--period", period) if period else ()))
                assert out["result"] == "OK", out
                runs.append((agency, out))
    return runs


def test_reference_rules_find_exactly_the_planted_cases_and_replay(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]]) -> None:
    found = {(out["rule"], s, out["period"]) for _, out in swept for s in out["subjects"]}
    with open(cluster.root / "data" / "ground_truth.csv", encoding="utf-8") as f:
        truth = {(r["rule_id"], r["subject"], r["period"]) for r in csv.DictReader(f)}
    assert found == truth
    # the chunked paths were taken: inputs of many chunks, subject sets in several
    # queries, findings in several transactions
    assert all(out["answer_chunks"] > out["inputs"] for _, out in swept), swept
    assert max(out["inputs"] for _, out in swept) > 3
    assert any(out["findings_chunks"] > 1 for _, out in swept)
    for agency, out in swept[:3] + swept[-1:]:
        replay = _run(cluster, agency, "compare", "replay", out["findings_tx"])
        assert replay["matches"] and replay["output_digest"] == out["output_digest"]
    listing = cluster.cli_json("findings", "--all-runs", agency="customs")
    assert len(listing["findings"]) >= len(truth)
    assert {f["severity"] for f in listing["findings"]} == {"high", "medium"}
    registered = cluster.cli_json("rules", "list", agency="tax")
    assert all(r["registered"] for r in registered["rules"])
    shown = cluster.cli("rules", "show", "export-rebate-without-exports", agency="tax")
    digest = next(r["digest"] for r in registered["rules"]
                  if r["rule"] == "export-rebate-without-exports")
    assert shown.returncode == 0 and digest in shown.stdout


def test_a_rerun_supersedes_the_earlier_run(cluster: Cluster,
                                           swept: list[tuple[str, dict[str, Any]]]) -> None:
    first = cluster.cli_json("findings", "--rule", "payments-without-imports", "--period",
                             PERIODS[1], "--all-runs", agency="pboc")
    runs_before = first["runs"]
    again = _run(cluster, "pboc", "compare", "run", "payments-without-imports", "--period",
                 PERIODS[1])
    assert len(again["supersedes"]) == 1
    now = cluster.cli_json("findings", "--rule", "payments-without-imports", "--period",
                           PERIODS[1], agency="pboc")
    assert now["runs"] == 1 and {f["run"] for f in now["findings"]} <= {again["findings_tx"]}
    every = cluster.cli_json("findings", "--rule", "payments-without-imports", "--period",
                             PERIODS[1], "--all-runs", agency="pboc")
    assert every["runs"] == runs_before + 1


def test_a_rule_input_is_recorded_as_a_query_on_behalf_of_the_rule(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]]) -> None:
    trail = cluster.cli_json("audit", "--agency", "police", "--analyst", "automation",
                             agency="police")
    purposes = {e["purpose"] for e in trail["entries"] if e["kind"] == "query"}
    assert any(p.startswith("rule officer-with-police-record v1: input ") for p in purposes)


def test_jobs_runner_runs_each_rule_period_once_and_again_after_new_data(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]], tmp_path: Any) -> None:
    from exchange.cases.runner import playbooks_for_jobs
    from exchange.compare.jobs import JobsConfig, Runner

    config_path = tmp_path / "jobs.toml"
    store = cluster.net / "customs" / "data" / "agency.db"
    config_path.write_text(
        f'profile = "{_profile(cluster, "customs", "automation")}"\n'
        f'periods = {list(PERIODS)!r}\n'.replace("'", '"')
        + f'agency_store = "{store}"\nstate_file = "{tmp_path / "state.json"}"\n'
        + "interval_s = 1\n")
    config = JobsConfig.load(config_path)
    runner = Runner(config, playbooks=playbooks_for_jobs)
    try:
        first = runner.one_round()  # the earlier test ran every period already
        assert first.ran == [] and first.skipped == len(PERIODS) and not first.failed
        load = cluster.run_exchange("data", "load", "--config",
                                    str(cluster.node_config("customs")),
                                    str(cluster.root / "data" / "customs"))
        assert load.returncode == 0, load.stderr
        second = runner.one_round()  # new data loaded: every period again, superseding
        assert [(r, p) for r, p, _ in second.ran] == [
            ("import-undervaluation", p) for p in PERIODS], second
        assert runner.one_round().ran == []
    finally:
        runner.close()
    # a restarted runner (same state file) picks up where it stopped
    again = Runner(JobsConfig.load(config_path), playbooks=playbooks_for_jobs)
    try:
        assert again.one_round().ran == []
    finally:
        again.close()
    served = cluster.run_exchange("jobs", "serve", "--config", str(config_path),
                                  "--rounds", "1")
    assert served.returncode == 0, served.stderr


def test_a_rule_over_its_time_limit_commits_nothing_and_the_runner_serves_the_next(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]], tmp_path: Any) -> None:
    """An endless rule (WITH RECURSIVE with no end) fails naming the limit in the jobs
    runner's round; the good rule after it still runs and its findings commit."""
    import re

    from exchange.cases.runner import playbooks_for_jobs
    from exchange.compare.jobs import JobsConfig, Runner
    from exchange.compare.rule_file import rules_dir
    from exchange.v1 import node_pb2

    reference = (rules_dir("pboc") / "payments-without-imports.yaml").read_text()
    folder = tmp_path / "rules"
    folder.mkdir()
    good = reference.replace("id: payments-without-imports", "id: large-outbound-payments")
    sql = ("sql: |\n  WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r)\n"
           "  SELECT f.uscc AS subject, f.outbound_cross_border_cny AS amount\n"
           "  FROM flows f WHERE f.uscc NOT IN (SELECT CAST(n AS VARCHAR) FROM r)\n")
    endless = re.sub(r"sql: \|\n(  .*\n)+", sql, good).replace(
        "id: large-outbound-payments", "id: endless-recursion")
    assert endless != good
    (folder / "large-outbound-payments.yaml").write_text(good)
    (folder / "endless-recursion.yaml").write_text(endless)
    for name in ("endless-recursion", "large-outbound-payments"):
        reg = cluster.run_exchange("rules", "register", str(folder / f"{name}.yaml"),
                                   "--profile", _profile(cluster, "pboc", "supervisor-1"))
        assert reg.returncode == 0, reg.stderr
    config_path = tmp_path / "jobs.toml"
    config_path.write_text(
        f'profile = "{_profile(cluster, "pboc", "automation")}"\n'
        f'rules_dir = "{folder}"\nperiods = ["{PERIODS[0]}"]\n'
        f'state_file = "{tmp_path / "state.json"}"\nrun_playbooks = false\n'
        "[rule_limits]\ntime_s = 2\nmemory_mib = 256\n")
    runner = Runner(JobsConfig.load(config_path), playbooks=playbooks_for_jobs)
    try:
        report = runner.one_round()
        [(rule_id, period, error)] = report.failed
        assert (rule_id, period) == ("endless-recursion", PERIODS[0])
        assert "rule endless-recursion: exceeded the 2 s time limit" in error, error
        [(ran_id, ran_period, count)] = report.ran
        assert (ran_id, ran_period) == ("large-outbound-payments", PERIODS[0])
        runs = runner.client.list_findings(node_pb2.ListFindingsRequest(
            owner_agency="pboc", period=PERIODS[0])).runs
        assert not [r for r in runs if r.rule_id == "endless-recursion"]
        [committed] = [r for r in runs if r.rule_id == "large-outbound-payments"]
        [reference_run] = [r for r in runs if r.rule_id == "payments-without-imports"
                           and not r.case_id]
        assert committed.finding_count == count == reference_run.finding_count > 0
    finally:
        runner.close()


def test_findings_are_readable_by_their_parties_and_open_as_cases(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]]) -> None:
    # the tax bureau's revenue rule used pboc's data: tax and pboc read it, customs not
    tax = cluster.cli_json("findings", "--rule", "revenue-below-bank-inflows", "--open",
                           agency="tax")
    assert tax["findings"] and all(f["subject"] not in ("", "(sealed)")
                                   for f in tax["findings"])
    subject = tax["findings"][0]["subject"]
    assert all(subject not in f["finding"] for f in tax["findings"])  # ids name no subject
    pboc = cluster.cli_json("findings", "--subject", subject, agency="pboc")
    assert [f["finding"] for f in pboc["findings"]] == [tax["findings"][0]["finding"]]
    customs = cluster.cli_json("findings", "--rule", "revenue-below-bank-inflows", "--open",
                               agency="customs")
    assert {f["subject"] for f in customs["findings"]} == {"(sealed)"}
    finding = tax["findings"][0]["finding"]
    opened = cluster.cli_json("findings", "open", finding, "--case", "CASE-F1", "--reason",
                              "inflows far above declared revenue", agency="tax")
    assert opened["action"] == "open"
    again = cluster.cli_json("findings", "open", tax["findings"][-1]["finding"], "--case",
                             "CASE-F1", agency="pboc")
    assert again["action"] == "add"
    refused = cluster.cli("findings", "open", finding, "--case", "CASE-F2", agency="police")
    assert refused.returncode == 1 and "CASE_INVALID" in refused.stderr


def _tx_hex(envelope: bytes) -> str:
    from exchange.ledger.block import tx_id
    from exchange.v1 import ledger_pb2

    return tx_id(ledger_pb2.Envelope.FromString(envelope).body).hex()


def test_a_case_exports_as_an_evidence_bundle_that_verifies_offline(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]], tmp_path: Any) -> None:
    tax = cluster.cli_json("findings", "--rule", "export-rebate-without-exports", "--open",
                           agency="tax")
    finding = tax["findings"][0]
    opened = cluster.cli_json("findings", "open", finding["finding"], "--case", "CASE-E1",
                              agency="tax")
    follow = cluster.run_exchange(
        "query", "--to", "customs", "--dataset", "declarations", "--subject",
        f"uscc={finding['subject']}", "--case", "CASE-E1", "--purpose", "follow-up",
        "--wait", "--json", "--profile", str(cluster.profile("tax")))
    assert follow.returncode == 0, follow.stderr
    probe = cluster.cli("submit-probe", agency="tax")  # a later block carries attestations
    assert probe.returncode == 0, probe.stderr
    cluster.wait_height(json.loads(follow.stdout)["outcome_height"] + 1)
    bundle = tmp_path / "case.evidence"
    export = cluster.run_exchange(
        "evidence", "export", "--store", str(cluster.net / "tax" / "data" / "blocks.db"),
        "--case", "CASE-E1", "--reveal-with", str(cluster.net / "tax" / "keys" / "data.key"),
        "--profile", str(cluster.profile("tax")), "--out", str(bundle))
    assert export.returncode == 0, export.stderr
    verified = cluster.run_exchange("evidence", "verify", str(bundle), "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    kinds = [t["kind"] for t in report["transactions"]]
    assert {"case_event", "findings", "rule_registration", "query", "answer_manifest"} <= \
        set(kinds), kinds
    assert report["reveals"] >= 3  # the findings output, tax's own inputs, the follow-up
    assert opened["height"] in {t["height"] for t in report["transactions"]}
    assert report["case"]["complete"] and report["case"]["case_id"] == "CASE-E1"
    assert len(report["case"]["stated_by"]) >= 3
    # a bundle that leaves out one transaction of the case fails, naming it
    from exchange.ledger.evidence import encode_bundle
    from exchange.ledger.evidence_verify import decode_bundle
    from exchange.v1 import evidence_pb2

    parsed = decode_bundle(bundle.read_bytes())
    answer_tx = json.loads(follow.stdout)["outcome_tx"]
    kept = [t for t in parsed.transactions
            if evidence_pb2.BundledTransaction(envelope=t.envelope).envelope and
            _tx_hex(t.envelope) != answer_tx]
    assert len(kept) == len(parsed.transactions) - 1
    del parsed.transactions[:]
    parsed.transactions.extend(kept)
    reveals = [r for r in parsed.reveals if bytes(r.tx_id).hex() != answer_tx]
    del parsed.reveals[:]
    parsed.reveals.extend(reveals)
    short = tmp_path / "short.evidence"
    short.write_bytes(encode_bundle(parsed))
    missing = cluster.run_exchange("evidence", "verify", str(short))
    assert missing.returncode == 1 and "case_statements" in missing.stderr \
        and "missing" in missing.stderr, missing.stderr
    data = bytearray(bundle.read_bytes())
    data[len(data) // 3] ^= 0x01
    tampered = tmp_path / "tampered.evidence"
    tampered.write_bytes(bytes(data))
    bad = cluster.run_exchange("evidence", "verify", str(tampered))
    assert bad.returncode == 1 and "evidence invalid" in bad.stderr


def test_a_case_bundle_with_a_swapped_answer_fails_naming_the_case(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]], tmp_path: Any) -> None:
    from exchange.ledger.block import RESULT_OK
    from exchange.ledger.case_export import case_tx_ids
    from exchange.ledger.evidence import BundleInvalid, build_bundle, encode_bundle
    from exchange.ledger.evidence_verify import decode_bundle, verify_bundle
    from exchange.ledger.store import BlockStore

    uscc = swept[0][1]["subjects"][0] if swept[0][1]["subjects"] else None
    assert uscc is not None
    follow = cluster.run_exchange(
        "query", "--to", "customs", "--dataset", "declarations", "--subject", f"uscc={uscc}",
        "--case", "CASE-S1", "--purpose", "the case's question", "--wait", "--json",
        "--profile", str(cluster.profile("tax")))
    other = cluster.run_exchange(
        "query", "--to", "customs", "--dataset", "declarations", "--subject", f"uscc={uscc}",
        "--case", "CASE-OTHER", "--purpose", "another case", "--wait", "--json",
        "--profile", str(cluster.profile("tax")))
    assert follow.returncode == 0 and other.returncode == 0
    cluster.cli("submit-probe", agency="tax")
    mine = json.loads(follow.stdout)["outcome_tx"]
    theirs = json.loads(other.stdout)["outcome_tx"]
    cluster.wait_height(json.loads(other.stdout)["outcome_height"] + 1)
    honest = tmp_path / "honest.evidence"
    export = cluster.run_exchange(
        "evidence", "export", "--store", str(cluster.net / "tax" / "data" / "blocks.db"),
        "--case", "CASE-S1", "--profile", str(cluster.profile("tax")), "--out", str(honest))
    assert export.returncode == 0, export.stderr
    statements = list(decode_bundle(honest.read_bytes()).case_statements)
    with BlockStore.open(cluster.net / "tax" / "data" / "blocks.db") as store:
        ids = [t for t in case_tx_ids(store, "CASE-S1") if t.hex() != mine]
        ids.append(bytes.fromhex(theirs))  # the other case's answer to the same question
        assert store.tx(bytes.fromhex(theirs)).result == RESULT_OK  # type: ignore[union-attr]
        swapped = build_bundle(store, ids)
    swapped.case_statements.extend(statements)
    with pytest.raises(BundleInvalid, match="case_statements"):
        verify_bundle(encode_bundle(swapped))


def test_cases_are_listed_shown_and_closed_by_their_opener(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]]) -> None:
    tax = cluster.cli_json("findings", "--rule", "revenue-below-bank-inflows", "--open",
                           agency="tax")
    finding = tax["findings"][-1]
    cluster.cli_json("findings", "open", finding["finding"], "--case", "CASE-C1",
                     agency="tax")
    asked = cluster.run_exchange(
        "query", "--to", "pboc", "--dataset", "company_flows", "--subject",
        f"uscc={finding['subject']}", "--period", finding["period"], "--case", "CASE-C1",
        "--purpose", "bank inflows", "--wait", "--json", "--profile",
        str(cluster.profile("tax")))
    assert asked.returncode == 0, asked.stderr
    listing = cluster.cli_json("case", "list", agency="customs")
    mine = next(c for c in listing["cases"] if c["case"] == "CASE-C1")
    assert mine["opened_by"] == "tax" and mine["status"] == "open"
    assert mine["transactions"] == 3  # the case event, the query and its answer
    shown = cluster.cli_json("case", "show", "CASE-C1", agency="tax")
    assert [t["kind"] for t in shown["timeline"]] == ["case open", "query", "answer"]
    assert shown["holds"][0]["finding"] == finding["finding"]
    assert shown["timeline"][1]["subjects"] == [f"uscc={finding['subject']}"]
    assert shown["findings"][0]["subject"] == finding["subject"]
    assert f"uscc={finding['subject']}" in shown["subjects"]
    refused = cluster.cli("case", "close", "CASE-C1", "--reason", "not mine", agency="pboc")
    assert refused.returncode == 1 and "CASE_INVALID" in refused.stderr
    closed = cluster.cli_json("case", "close", "CASE-C1", "--reason", "referred to court",
                              agency="tax")
    assert closed["closed_at"] > 0
    after = next(c for c in cluster.cli_json("case", "list", agency="tax")["cases"]
                 if c["case"] == "CASE-C1")
    assert after["status"] == "closed"


def test_a_case_from_a_run_in_chunks_exports_with_its_chunks_and_verifies_offline(
        cluster: Cluster, swept: list[tuple[str, dict[str, Any]]], tmp_path: Any) -> None:
    agency, out = next((a, o) for a, o in swept if o["findings_chunks"] > 1)
    listing = cluster.cli_json("findings", "--rule", out["rule"], "--all-runs", "--open",
                               agency=agency)
    mine = [f for f in listing["findings"] if f["run"] == out["findings_tx"]]
    assert len(mine) == out["findings"] and all(f["subject"] != "(sealed)" for f in mine)
    assert sorted(f["subject"] for f in mine) == sorted(out["subjects"])
    last = mine[-1]  # in the run's last chunk
    opened = cluster.cli_json("findings", "open", last["finding"], "--run", out["findings_tx"],
                              "--case", "CASE-CHUNKS", agency=agency)
    assert opened
    bundle = tmp_path / "chunks.evidence"
    export = cluster.run_exchange(
        "evidence", "export", "--store", str(cluster.net / agency / "data" / "blocks.db"),
        "--case", "CASE-CHUNKS", "--profile", str(cluster.profile(agency)),
        "--reveal-with", str(cluster.net / agency / "keys" / "data.key"), "--out", str(bundle))
    assert export.returncode == 0, export.stderr
    verified = cluster.run_exchange("evidence", "verify", str(bundle), "--json")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    kinds = [t["kind"] for t in report["transactions"]]
    # the run, the chunk holding the case's finding (not the others), and each input as
    # its query and manifest, not its chunks
    assert kinds.count("findings") == 1 and kinds.count("findings_chunk") == 1
    assert "answer_chunk" not in kinds and kinds.count("answer_manifest") == out["inputs"]
    assert report["reveals"] >= 1
    # a revealed chunk changed by one byte is refused
    from exchange.ledger.evidence import BundleInvalid, encode_bundle
    from exchange.ledger.evidence_verify import decode_bundle, verify_bundle

    tampered = decode_bundle(bundle.read_bytes())
    chunk_ids = {bytes.fromhex(t["tx_id"]) for t in report["transactions"]
                 if t["kind"] == "findings_chunk"}
    reveal = next(r for r in tampered.reveals if bytes(r.tx_id) in chunk_ids)
    reveal.plaintext = reveal.plaintext.replace(b"subject", b"subjecT", 1)
    with pytest.raises(BundleInvalid, match="reveals"):
        verify_bundle(encode_bundle(tampered))

    # a chunk of the same rule, period and inputs that the run does not name (valid on
    # the ledger, where it stays unused) bundled beside the run is refused
    from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
    from exchange.ledger.block import open_envelope
    from exchange.ledger.case_export import case_tx_ids
    from exchange.ledger.evidence import build_bundle
    from exchange.ledger.store import BlockStore
    from exchange.v1 import ledger_pb2

    auto = cluster.net / agency / "analysts" / "automation.toml"
    _, _, genesis = load_genesis(auto)
    with ExchangeClient(load_client_profile(auto)) as client:
        signer = Signer.load(client.profile, genesis.chain_id)
        (bundled,) = chunk_ids
        body = open_envelope(client.get_transaction(bundled).envelope, genesis.chain_id).body
        stray = ledger_pb2.FindingsChunk()
        stray.CopyFrom(body.findings_chunk)

        def fill(b: ledger_pb2.TxBody) -> None:
            b.findings_chunk.CopyFrom(stray)

        envelope = signer.make_envelope(fill)
        committed = client.submit(envelope)
        assert committed.result == "OK"  # committed at this node
        stray_id = open_envelope(envelope, genesis.chain_id).tx_id
        # a bundle takes final blocks only: wait until a quorum attested the stray's
        cluster.cli("submit-probe", agency=agency)
        deadline = time.monotonic() + 60
        while client.status().final_height < committed.height:
            assert time.monotonic() < deadline, "the stray chunk's block never became final"
            time.sleep(0.1)
    with BlockStore.open(cluster.net / agency / "data" / "blocks.db") as store:
        ids = case_tx_ids(store, "CASE-CHUNKS") + [stray_id]
        with pytest.raises(BundleInvalid, match="is not the chunk"):
            verify_bundle(encode_bundle(build_bundle(store, ids)))
