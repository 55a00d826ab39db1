"""Data keys rotate on the ledger, on a real cluster: an agency rotates its X25519 data
key mid-run; what was sealed to the old key stays readable and revealable for a court,
everything new is sealed to the new key, and a key marked compromised is never sealed to
again on any node."""

from __future__ import annotations

import csv
import json
import stat
import time
from pathlib import Path

import pytest

from exchange.client import ExchangeClient, Signer, load_client_profile, load_genesis
from exchange.client.crossquery import QuerySpec, build_query
from exchange.errors import MalformedInput
from exchange.identity.keys import DataKey, read_data_key
from exchange.ledger.block import open_envelope
from exchange.testing.localnet import Cluster

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("data_key_rotation")]

CASE = "SZ-ROTATE-1"


CLUSTER_SAMPLE = (7, 100)

def _taxpayers(cluster: Cluster) -> list[str]:
    with open(cluster.root / "data" / "tax" / "taxpayers.csv", encoding="utf-8") as f:
        return [r["uscc"] for r in csv.DictReader(f)]


def _ask(cluster: Cluster, uscc: str) -> dict[str, object]:
    result = cluster.run_exchange(
        "query", "--to", "tax", "--dataset", "taxpayers", "--subject", f"uscc={uscc}",
        "--case", CASE, "--purpose", "rotation", "--wait", "--json", "--profile",
        str(cluster.profile("customs")))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == "answered" and out["rows"] == 1, out
    return dict(out)


def _rotate(cluster: Cluster, agency: str, *flags: str) -> int:
    result = cluster.run_exchange(
        "agency", "rotate", "--kind", "data", *flags, "--agency-dir",
        str(cluster.net / agency), "--json", "--profile", str(cluster.profile(agency)))
    assert result.returncode == 0, result.stderr
    # a line saying what committed, then the JSON object
    return int(json.loads(result.stdout[result.stdout.index("{"):])["height"])


def _switched_key(path: Path, old: DataKey) -> DataKey:
    """The data key at `path` once the node has switched from `old` to the one the
    ledger names (it does so when it applies the rotation)."""
    deadline = time.monotonic() + 30
    while (key := read_data_key(path)).key_id == old.key_id:
        assert time.monotonic() < deadline, "the node did not switch its data key"
        time.sleep(0.2)
    return key


def _recipients_of_answer(cluster: Cluster, qid: str) -> set[bytes]:
    """The recipient key ids of the answer to `qid`, from customs' own block store."""
    from exchange.ledger.store import BlockStore

    chain_id = load_genesis(cluster.profile("customs"))[2].chain_id
    found: set[bytes] = set()
    with BlockStore.open(cluster.net / "customs" / "data" / "blocks.db") as store:
        for height in range(1, store.height + 1):
            for env in store.envelopes(height):
                opened = open_envelope(env, chain_id)
                if opened.kind == "answer_manifest" and \
                        bytes(opened.body.answer_manifest.query_tx_id).hex() == qid:
                    m = opened.body.answer_manifest
                    found |= {bytes(w.recipient_key_id) for w in m.inline_chunk.recipients}
                elif opened.kind == "answer_chunk" and \
                        bytes(opened.body.answer_chunk.query_tx_id).hex() == qid:
                    c = opened.body.answer_chunk
                    found |= {bytes(w.recipient_key_id) for w in c.sealed.recipients}
    assert found, f"no answer to {qid} in customs' store"
    return found


def test_a_data_key_rotated_mid_run_keeps_old_answers_readable_and_revealable(
        cluster: Cluster, tmp_path: Path) -> None:
    keys = cluster.net / "customs" / "keys"
    old = read_data_key(keys / "data.key")
    payers = _taxpayers(cluster)
    before = _ask(cluster, payers[0])
    assert _recipients_of_answer(cluster, str(before["query"])) >= {old.key_id}

    height = _rotate(cluster, "customs")
    cluster.wait_height(height)
    new = _switched_key(keys / "data.key", old)
    retired = keys / "data.retired" / f"{old.key_id.hex()}.key"
    assert read_data_key(retired).key_id == old.key_id
    assert stat.S_IMODE(retired.stat().st_mode) == 0o600
    # every node names the new key from the rotation on
    for agency in cluster.agencies:
        status = cluster.status(agency)
        assert status is not None
        entry = next(m for m in status.member_entries if m.agency == "customs")
        assert bytes(entry.data_public_key) == new.public_key, agency

    # the answer sealed before the rotation is still readable
    result = cluster.run_exchange("answer", str(before["query"]), "--json", "--profile",
                                  str(cluster.profile("customs")))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["rows"] == 1
    # a new query and its answer are sealed to the new key only
    after = _ask(cluster, payers[1])
    recipients = _recipients_of_answer(cluster, str(after["query"]))
    assert new.key_id in recipients and old.key_id not in recipients
    with ExchangeClient(load_client_profile(cluster.profile("customs"))) as client:
        info = client.get_transaction(bytes.fromhex(str(after["query"])))
    chain_id = load_genesis(cluster.profile("customs"))[2].chain_id
    assert bytes(open_envelope(info.envelope, chain_id).body.query.reply_key_id) == new.key_id

    # evidence for a court: both answers revealed, with the current key and the retired
    bundle = tmp_path / "case.bundle"
    exported = cluster.run_exchange(
        "evidence", "export", "--store", str(cluster.net / "customs" / "data" / "blocks.db"),
        "--case", CASE, "--reveal-with", str(keys / "data.key"), "--out", str(bundle))
    assert exported.returncode == 0, exported.stderr
    verified = cluster.run_exchange("evidence", "verify", str(bundle), "--json")
    assert verified.returncode == 0, verified.stderr + verified.stdout
    report = json.loads(verified.stdout)
    assert report["ok"], report
    txs = {t["tx_id"]: t for t in report["transactions"]}
    answers = [t for t in txs.values() if t["kind"] in ("answer_manifest", "answer_chunk")]
    assert len(answers) >= 2 and all(t["revealed"] for t in answers), answers
    # each query's own sealed request too: one sealed to the old key, one to the new
    for answer in (before, after):
        assert txs[str(answer["query"])]["revealed"], answer

    # a restarted node still holds both keys: it reads from the retired ones on disk
    cluster.restart("customs")
    cluster.wait_ready()
    for answer in (before, after):
        result = cluster.run_exchange("answer", str(answer["query"]), "--json",
                                      "--profile", str(cluster.profile("customs")))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["rows"] == 1


def test_a_compromised_data_key_is_never_sealed_to_again(cluster: Cluster) -> None:
    keys = cluster.net / "tax" / "keys"
    old = read_data_key(keys / "data.key")
    _, _, genesis = load_genesis(cluster.profile("customs"))
    status = cluster.status("customs")
    assert status is not None
    # the members as they are now, but for tax's data key, about to be compromised
    stale = [m for m in status.member_entries if m.agency != "tax"] + [
        m for m in genesis.members if m.agency == "tax"]
    height = _rotate(cluster, "tax", "--compromised")
    cluster.wait_height(height)
    _switched_key(keys / "data.key", old)
    # a query still sealed to the compromised key is not taken by the ledger
    profile = load_client_profile(cluster.profile("customs"))
    signer = Signer.load(profile, genesis.chain_id)
    uscc = _taxpayers(cluster)[2]
    spec = QuerySpec(target="tax", dataset="taxpayers", subjects=(("uscc", uscc),),
                     case_id=CASE, purpose="stale keys")
    envelope, _ = build_query(spec, signer, genesis, members=stale)
    with ExchangeClient(profile) as client, \
            pytest.raises(MalformedInput, match="compromised at height") as refused:
        client.submit(envelope, wait=True)
    assert f"height {height}" in str(refused.value)
    # queried with the keys on the ledger, tax answers, sealed to its new key only
    answered = _ask(cluster, uscc)
    assert old.key_id not in _recipients_of_answer(cluster, str(answered["query"]))
