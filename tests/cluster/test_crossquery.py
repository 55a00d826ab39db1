"""Cross-queries on a real four-node cluster with sample data loaded into each agency's
store: every agency asks every other as policy allows, refusals carry their reason,
other agencies hold answers only as ciphertext, a restarted answering node loses and
duplicates nothing, large answers are chunked, revoked analysts cannot ask, and the
audit trail shows all of it."""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from typing import Any

import pytest

from exchange.client import Signer, load_client_profile, load_genesis
from exchange.client.crossquery import QuerySpec, build_query, read_answer
from exchange.errors import NotARecipient
from exchange.identity.keys import read_data_key
from exchange.ledger.block import RESULT_OK, open_envelope
from exchange.ledger.sealing import canonical_json, open_sealed, verify_reveal
from exchange.ledger.store import BlockStore
from exchange.testing.localnet import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("crossquery")]

SEED = 11
COMPANIES = 300
PERIOD = "2026-09"
CASE = "SZ-2026-001"
CHUNK_BYTES_PBOC = 4096  # small, so period-wide answers from pboc come in chunks


CLUSTER_SAMPLE = (SEED, COMPANIES)


def cluster_setup(c: Cluster) -> None:
    c.edit_node_config("pboc", "answer_chunk_bytes = 524288",
                       f"answer_chunk_bytes = {CHUNK_BYTES_PBOC}")

def _rows(cluster: Cluster, agency: str, dataset: str) -> list[dict[str, str]]:
    with open(cluster.root / "data" / agency / f"{dataset}.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _supervisor(cluster: Cluster, agency: str) -> str:
    return str(cluster.net / agency / "analysts" / "supervisor-1.toml")


def _query(cluster: Cluster, requester: str, *args: str, profile: str | None = None
           ) -> tuple[int, dict[str, Any], str]:
    result = cluster.run_exchange(
        "query", *args, "--wait", "--json", "--profile",
        profile or str(cluster.profile(requester)))
    out = json.loads(result.stdout) if result.stdout.strip() else {}
    return result.returncode, out, result.stderr


def _subject_for(cluster: Cluster, target: str) -> tuple[str, str, list[str], int]:
    """A dataset of `target`, a subject in it, extra CLI args and the expected row count
    (from the CSV files, not from the code under test)."""
    if target == "police":
        records = _rows(cluster, "police", "records")
        person = records[0]["person_id"]
        return "records", f"person_id={person}", [], sum(
            1 for r in records if r["person_id"] == person)
    if target == "tax":
        payers = _rows(cluster, "tax", "taxpayers")
        return "taxpayers", f"uscc={payers[0]['uscc']}", [], 1
    if target == "customs":
        decls = _rows(cluster, "customs", "declarations")
        uscc = decls[0]["uscc"]
        return "declarations", f"uscc={uscc}", [], sum(1 for d in decls if d["uscc"] == uscc)
    accounts = _rows(cluster, "pboc", "accounts")
    uscc = next(a["holder_id"] for a in accounts if a["holder_kind"] == "company")
    return "accounts", f"uscc={uscc}", [], sum(
        1 for a in accounts if a["holder_kind"] == "company" and a["holder_id"] == uscc)


def test_each_agency_can_query_each_other_agency_that_policy_allows(cluster: Cluster) -> None:
    for requester in cluster.agencies:
        for target in cluster.agencies:
            if target == requester:
                continue
            dataset, subject, extra, expected = _subject_for(cluster, target)
            cosign = ["--cosign", _supervisor(cluster, requester)] if target == "police" else []
            code, out, err = _query(cluster, requester, "--to", target, "--dataset", dataset,
                                    "--subject", subject, "--case", CASE, "--purpose",
                                    f"{requester} checks {target}", *extra, *cosign)
            assert code == 0, (requester, target, err, out)
            assert out["status"] == "answered", out
            assert out["rows"] == expected == len(out["data"]), (requester, target, out)
            key, value = subject.split("=")
            assert all(value in row.values() for row in out["data"]), out["data"]
            assert out["requester"] == requester and out["target"] == target


def test_refused_queries_carry_their_reason_and_are_recorded(cluster: Cluster) -> None:
    decls = _rows(cluster, "customs", "declarations")
    person = _rows(cluster, "police", "persons")[0]["person_id"]
    cases = [
        (["--to", "pboc", "--dataset", "transactions", "--subject",
          f"uscc={decls[0]['uscc']}"], "CASE_REQUIRED"),
        (["--to", "police", "--dataset", "persons", "--subject", f"person_id={person}",
          "--case", CASE], "COSIGNATURE_REQUIRED"),
        (["--to", "customs", "--dataset", "declarations", "--subject",
          "uscc=91440300000000000X", "--case", CASE], "BAD_SUBJECT"),
        (["--to", "customs", "--dataset", "no_such_dataset", "--subject",
          f"uscc={decls[0]['uscc']}", "--case", CASE], "NO_POLICY"),
        (["--to", "customs", "--dataset", "declarations", "--subject",
          f"uscc={decls[0]['uscc']}", "--case", CASE, "--fields", "decl_no,secret"],
         "FIELD_NOT_GRANTED"),
    ]
    refused = []
    for args, reason in cases:
        code, out, err = _query(cluster, "tax", *args, "--purpose", f"expect {reason}")
        assert code == 3, (args, err, out)
        assert out["status"] == "refused" and out["refusal_code"] == reason, out
        assert out["refusal_reason"], out
        # the reason is in clear on the ledger: it never repeats the sealed subject
        assert "91440300000000000X" not in out["refusal_reason"], out
        refused.append(out["query"])
    audit = cluster.cli_json("audit", "--agency", "tax", agency="tax")
    by_query = {e["query"]: e for e in audit["entries"] if e["kind"] == "refusal"}
    for (_, reason), qid in zip(cases, refused, strict=True):
        assert by_query[qid]["outcome"].startswith(reason), by_query[qid]
        assert by_query[qid]["purpose"] == f"expect {reason}"


def test_other_agencies_hold_the_answer_only_as_ciphertext(cluster: Cluster) -> None:
    person = _rows(cluster, "police", "records")[0]["person_id"]
    code, out, err = _query(cluster, "tax", "--to", "police", "--dataset", "records",
                            "--subject", f"person_id={person}", "--case", CASE,
                            "--purpose", "officer check", "--cosign",
                            _supervisor(cluster, "tax"))
    assert code == 0, err
    cluster.wait_height(out["outcome_height"])
    with BlockStore.open(cluster.net / "customs" / "data" / "blocks.db") as store:
        stored = store.tx(bytes.fromhex(out["outcome_tx"]))
        assert stored is not None and stored.result == RESULT_OK
        _, _, genesis = load_genesis(cluster.profile("customs"))
        manifest = open_envelope(stored.envelope, genesis.chain_id).body.answer_manifest
    sealed = manifest.inline_chunk
    query_id = bytes.fromhex(out["query"])
    # customs replicated and verified it, but its data key opens nothing
    customs_key = read_data_key(cluster.net / "customs" / "keys" / "data.key")
    with pytest.raises(NotARecipient):
        open_sealed(sealed, customs_key, chain_id=genesis.chain_id, context_tx_id=query_id,
                    chunk=0)
    assert person.encode() not in stored.envelope
    # tax opens it, and can reveal it: plaintext and salt match the committed commitment
    tax_key = read_data_key(cluster.net / "tax" / "keys" / "data.key")
    plaintext, salt = open_sealed(sealed, tax_key, chain_id=genesis.chain_id,
                                  context_tx_id=query_id, chunk=0)
    assert verify_reveal(manifest.commitment, salt, plaintext)
    assert [json.loads(line) for line in plaintext.splitlines()] == out["data"]
    assert not verify_reveal(manifest.commitment, salt,
                             plaintext.replace(person.encode(), b"x"))
    # later, `exchange answer` gives tax's analysts the rows again; customs' get nothing
    again = cluster.cli_json("answer", out["query"], agency="tax")
    assert again["data"] == out["data"] and again["status"] == "answered"
    denied = cluster.cli("answer", out["query"], agency="customs")
    assert denied.returncode == 1 and "sealed to tax" in denied.stderr, denied.stderr


def test_period_wide_answer_is_chunked_and_reassembled(cluster: Cluster) -> None:
    automation = str(cluster.net / "tax" / "analysts" / "automation.toml")
    code, out, err = _query(cluster, "tax", "--to", "pboc", "--dataset", "company_flows",
                            "--period", PERIOD, "--purpose", "revenue vs inflows",
                            profile=automation)
    assert code == 0, err
    assert out["chunks"] > 1, out["chunks"]
    import agents

    with agents.open_store("pboc", cluster.net / "pboc" / "data" / "agency.db") as store:
        expected = agents.views_of("pboc")["company_flows"].rows(store, PERIOD)
    assert out["rows"] == len(expected) == len(out["data"])
    assert [r["uscc"] for r in out["data"]] == [e.uscc for e in expected]
    assert [r["inflows_cny"] for r in out["data"]] == [
        str(e.inflows_cny) for e in expected]
    assert canonical_json(out["data"][0])  # decimals arrive as exact strings


def _outcomes_per_query(store: BlockStore, chain_id: str) -> Counter[bytes]:
    valid: Counter[bytes] = Counter()
    for height in range(1, store.height + 1):
        for raw, code in zip(store.envelopes(height), store.results(height), strict=True):
            opened = open_envelope(raw, chain_id)
            if code == RESULT_OK and opened.kind in ("answer_manifest", "refusal"):
                valid[bytes(getattr(opened.body, opened.kind).query_tx_id)] += 1
    return valid


def test_restarting_the_answering_node_loses_nothing_and_duplicates_nothing(
        cluster: Cluster) -> None:
    _, _, genesis = load_genesis(cluster.profile("tax"))
    signer = Signer.load(load_client_profile(cluster.profile("tax")), genesis.chain_id)
    decls = _rows(cluster, "customs", "declarations")
    usccs = sorted({d["uscc"] for d in decls})[:24]

    def submit(batch: list[str]) -> list[bytes]:
        envs, ids = [], []
        for uscc in batch:
            env, qid = build_query(QuerySpec("customs", "declarations", (("uscc", uscc),),
                                             case_id=CASE, purpose="restart test"),
                                   signer, genesis)
            envs.append(env)
            ids.append(qid)
        with cluster.client("tax") as client:
            results = client.submit_batch(envs, wait=True)
        assert all(r.result == RESULT_OK for r in results), results
        return ids

    # the answering node is down while queries commit; it answers them when it is back
    cluster.kill("customs")
    asked = submit(usccs[:8])
    cluster.start_node("customs")
    # and killed again once it has begun answering a second batch
    second = submit(usccs[8:])
    with cluster.client("tax", deadline_s=30.0) as client:
        assert read_answer(client.get_answer(second[0], wait_ms=30_000)).status == "answered"
    cluster.kill("customs")
    cluster.start_node("customs")
    cluster.wait_ready()
    with cluster.client("tax", deadline_s=30.0) as client:
        for qid in asked + second:
            answer = read_answer(client.get_answer(qid, wait_ms=30_000))
            assert answer.status == "answered", answer.query
            expected = sum(1 for d in decls if d["uscc"] == answer.rows[0]["uscc"])
            assert len(answer.rows) == expected
        height = client.status().height
    cluster.wait_height(height)
    with BlockStore.open(cluster.net / "tax" / "data" / "blocks.db") as store:
        outcomes = _outcomes_per_query(store, genesis.chain_id)
    assert all(outcomes[qid] == 1 for qid in asked + second), outcomes


def test_a_revoked_analyst_can_no_longer_query(cluster: Cluster) -> None:
    listing = cluster.cli_json("credential", "list", "--agency", "customs", agency="customs")
    key_id = next(c["key_id"] for c in listing["credentials"] if c["subject"] == "automation")
    # only the analyst's own agency may revoke: pboc's supervisor cannot
    foreign = cluster.run_exchange("credential", "revoke", "--key-id", key_id,
                                   "--reason", "not yours", "--profile",
                                   _supervisor(cluster, "pboc"))
    assert foreign.returncode == 1 and "judged REJECTED" in foreign.stderr, foreign.stderr
    # nor an analyst of its own agency
    analyst = cluster.run_exchange("credential", "revoke", "--key-id", key_id,
                                   "--reason", "not allowed", "--profile",
                                   str(cluster.profile("customs")))
    assert analyst.returncode == 1 and "judged REJECTED" in analyst.stderr, analyst.stderr
    revoked = cluster.run_exchange("credential", "revoke", "--subject", "automation",
                                   "--reason", "job retired", "--json", "--profile",
                                   _supervisor(cluster, "customs"))
    assert revoked.returncode == 0, revoked.stderr
    automation = str(cluster.net / "customs" / "analysts" / "automation.toml")
    code, out, err = _query(cluster, "customs", "--to", "pboc", "--dataset",
                            "company_flows", "--period", PERIOD, "--purpose", "after",
                            profile=automation)
    assert code == 1 and "revoked at height" in err, (code, err, out)


def test_audit_trail_lists_every_query_answer_and_refusal_verifiably(
        cluster: Cluster) -> None:
    decls = _rows(cluster, "customs", "declarations")
    uscc = decls[1]["uscc"]
    code, out, err = _query(cluster, "pboc", "--to", "customs", "--dataset", "declarations",
                            "--subject", f"uscc={uscc}", "--case", "AUDIT-1",
                            "--purpose", "audit me")
    assert code == 0, err
    cluster.wait_height(out["outcome_height"])
    trail = cluster.cli_json("audit", "--case", "AUDIT-1", "--verify", agency="pboc")
    kinds = [(e["kind"], e["analyst"], e["requester"], e["target"]) for e in trail["entries"]]
    assert kinds == [("query", "analyst-1", "pboc", "customs"),
                     ("answer", "analyst-1", "pboc", "customs")]
    assert all(e["verified"].startswith("ok") for e in trail["entries"]), trail
    assert trail["entries"][0]["subjects"] == [f"uscc={uscc}"]
    # by subject, at the requester and at the target; sealed for everybody else
    for agency in ("pboc", "customs"):
        found = cluster.cli_json("audit", "--subject", f"uscc={uscc}", agency=agency)
        assert out["query"] in {e["query"] for e in found["entries"]}, agency
    other = cluster.cli_json("audit", "--case", "AUDIT-1", agency="police")
    assert other["entries"][0]["subjects"] == ["(sealed)"]
    assert other["entries"][0]["purpose"] == "audit me"
    by_analyst = cluster.cli_json("audit", "--analyst", "analyst-1", "--agency", "pboc",
                                  agency="pboc")
    assert out["query"] in {e["query"] for e in by_analyst["entries"]}
    later = cluster.cli_json("audit", "--case", "AUDIT-1", "--since", "2099-01-01",
                             agency="pboc")
    assert later["entries"] == []


def test_an_owner_changes_its_policy_and_only_the_owner_can(cluster: Cluster) -> None:
    shown = cluster.cli_json("policy", "show", "--owner", "customs", "--dataset",
                             "company_trade", agency="customs")
    policy = dict(shown)  # with --owner and --dataset: the one policy, as propose reads it
    version = policy.pop("version")
    policy["grants"] = [g for g in policy["grants"] if g["to"] != "pboc"]
    path = cluster.root / "customs-company_trade.json"
    path.write_text(json.dumps(policy))
    # another agency's supervisor may not; an analyst of the owner is judged REJECTED
    other = cluster.run_exchange("policy", "propose", str(path), "--profile",
                                 _supervisor(cluster, "tax"))
    assert other.returncode == 1 and "may not set the policy" in other.stderr
    analyst = cluster.run_exchange("policy", "propose", str(path), "--profile",
                                   str(cluster.profile("customs")))
    assert analyst.returncode == 1 and "judged REJECTED" in analyst.stderr
    done = cluster.run_exchange("policy", "propose", str(path), "--json", "--profile",
                                _supervisor(cluster, "customs"))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["version"] == version + 1
    uscc = _rows(cluster, "customs", "declarations")[0]["uscc"]
    code, out, err = _query(cluster, "pboc", "--to", "customs", "--dataset", "company_trade",
                            "--subject", f"uscc={uscc}", "--period", PERIOD, "--case", CASE,
                            "--purpose", "after the change")
    assert code == 3 and out["refusal_code"] == "NOT_GRANTED", (err, out)
    bad = cluster.root / "bad-policy.json"
    bad.write_text(json.dumps({**policy, "grants": [{"to": "tax", "rows": 5}]}))
    malformed = cluster.run_exchange("policy", "propose", str(bad), "--profile",
                                     _supervisor(cluster, "customs"))
    assert malformed.returncode == 1 and "unknown key(s) rows" in malformed.stderr


def test_a_hostile_sealed_request_is_refused_and_the_node_keeps_running(
        cluster: Cluster) -> None:
    from exchange.identity.keys import key_id
    from exchange.ledger.block import new_body, seal_envelope, tx_id
    from exchange.ledger.sealing import seal
    from exchange.v1 import ledger_pb2

    _, _, genesis = load_genesis(cluster.profile("tax"))
    signer = Signer.load(load_client_profile(cluster.profile("tax")), genesis.chain_id)
    keys = {m.agency: bytes(m.data_public_key) for m in genesis.members}
    sealed, _ = seal(b"[" * 100_000, [keys["tax"], keys["customs"]],
                     chain_id=genesis.chain_id, context_tx_id=b"", chunk=0,
                     requester_agency="tax", target_agency="customs")
    body = new_body(genesis.chain_id, "tax", int(time.time() * 1000))
    body.query.CopyFrom(ledger_pb2.Query(
        target_agency="customs", dataset="declarations", case_id=CASE, purpose="hostile",
        legal_basis="tax-crime-investigation", sealed_request=sealed,
        deadline_ms=body.created_at_ms + 60_000, shape=ledger_pb2.QUERY_SHAPE_SUBJECT,
        reply_key_id=key_id("x25519", keys["tax"])))
    envelope = seal_envelope(body, signer.key)
    qid = tx_id(ledger_pb2.Envelope.FromString(envelope).body)
    with cluster.client("tax", deadline_s=30.0) as client:
        assert client.submit(envelope).result == RESULT_OK
        answer = read_answer(client.get_answer(qid, wait_ms=20_000))
    assert answer.status == "refused" and answer.query.refusal_code == "BAD_REQUEST"
    assert cluster.running("customs")
    trail = cluster.cli_json("audit", "--case", CASE, agency="customs")
    assert any(e["query"] == qid.hex() for e in trail["entries"])
