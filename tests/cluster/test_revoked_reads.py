"""Reads are a person's, checked like writes (design decision 14), on a real cluster: a
person's TLS client certificate is bound to their credential on the ledger, every read
is checked against that credential as of the node's applied height and logged with it,
and a revoked or expired credential reads nothing."""

from __future__ import annotations

import asyncio
import csv
import json
import time
from pathlib import Path

import grpc
import pytest

from exchange.client import ExchangeClient, chain_id_for, load_client_profile
from exchange.errors import NotFound
from exchange.identity import tls
from exchange.identity.config import Profile
from exchange.identity.genesis import issue_credential
from exchange.identity.keys import CachedSigner, SigningKey, read_signing_key, write_private
from exchange.ledger.block import new_body, seal_envelope, tx_id
from exchange.testing.localnet import Cluster
from exchange.v1 import ledger_pb2, node_pb2, node_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("revoked_reads")]

CASE = "SZ-READS-1"


CLUSTER_SAMPLE = (5, 100)

def _profile(cluster: Cluster, agency: str, subject: str) -> Path:
    return cluster.net / agency / "analysts" / f"{subject}.toml"


def _stub(profile: Profile) -> tuple[grpc.Channel, node_pb2_grpc.ExchangeStub]:
    creds = grpc.ssl_channel_credentials(profile.ca_bundle.read_bytes(),
                                         profile.tls_key.read_bytes(),
                                         profile.tls_cert.read_bytes())
    channel = grpc.secure_channel(profile.node, creds)
    return channel, node_pb2_grpc.ExchangeStub(channel)


def _ask(cluster: Cluster, profile: Path) -> str:
    """A customs query to tax about one taxpayer, in CASE; its tx id (hex)."""
    with open(cluster.root / "data" / "tax" / "taxpayers.csv", encoding="utf-8") as f:
        uscc = next(csv.DictReader(f))["uscc"]
    result = cluster.run_exchange(
        "query", "--to", "tax", "--dataset", "taxpayers", "--subject", f"uscc={uscc}",
        "--case", CASE, "--purpose", "reads", "--wait", "--json", "--profile", str(profile))
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["status"] == "answered", out
    return str(out["query"])


def _subject_of(cluster: Cluster) -> str:
    with open(cluster.root / "data" / "tax" / "taxpayers.csv", encoding="utf-8") as f:
        return f"uscc={next(csv.DictReader(f))['uscc']}"


def _reads(cluster: Cluster, qid: str) -> list[list[str]]:
    return [["answer", qid], ["audit", "--subject", _subject_of(cluster)],
            ["findings", "--open"], ["case", "show", CASE], ["audit", "--case", CASE, "--verify"]]


def _rpc_reads(stub: node_pb2_grpc.ExchangeStub, qid: bytes) -> list[tuple[str, object]]:
    return [
        ("GetAnswer", lambda: stub.GetAnswer(node_pb2.GetAnswerRequest(query_tx_id=qid),
                                             timeout=10)),
        ("Audit", lambda: stub.Audit(node_pb2.AuditRequest(subject="uscc=x"), timeout=10)),
        ("ListFindings", lambda: stub.ListFindings(
            node_pb2.ListFindingsRequest(open=True), timeout=10)),
        ("GetTransaction", lambda: stub.GetTransaction(
            node_pb2.GetTransactionRequest(tx_id=qid), timeout=10)),
        ("ListCases", lambda: stub.ListCases(node_pb2.ListCasesRequest(case_id=CASE),
                                             timeout=10)),
        ("FollowBlocks", lambda: next(iter(stub.FollowBlocks(
            node_pb2.FollowBlocksRequest(from_height=1), timeout=10)))),
    ]


def _revoke(cluster: Cluster, agency: str, subject: str) -> int:
    result = cluster.run_exchange(
        "credential", "revoke", "--subject", subject, "--reason", "left the bureau",
        "--json", "--profile", str(_profile(cluster, agency, "supervisor-1")))
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["height"])


def test_a_revoked_analyst_reads_nothing_from_the_revocation_on(cluster: Cluster) -> None:
    analyst = _profile(cluster, "customs", "analyst-1")
    qid = _ask(cluster, analyst)
    # before revocation: every read works, each logged with the credential checked
    for args in _reads(cluster, qid):
        result = cluster.run_exchange(*args, "--profile", str(analyst))
        assert result.returncode == 0, (args, result.stderr)
    profile = load_client_profile(analyst)
    channel, stub = _stub(profile)
    with channel:
        for _name, call in _rpc_reads(stub, bytes.fromhex(qid)):
            call()  # type: ignore[operator]
    kid = CachedSigner(read_signing_key(profile.signing_key)).key_id.hex()
    logged = [json.loads(line) for line in cluster.log_path("customs").read_text().splitlines()
              if '"read"' in line]
    methods = {e["method"] for e in logged if e.get("event") == "read"
               and e.get("credential") == kid and e.get("reader") == "customs/analyst-1"}
    assert {"GetAnswer", "Audit", "ListFindings", "GetTransaction", "ListCases",
            "FollowBlocks"} <= methods, methods

    height = _revoke(cluster, "customs", "analyst-1")
    # the CLI's reads are refused, naming the revocation height
    for args in _reads(cluster, qid):
        result = cluster.run_exchange(*args, "--profile", str(analyst))
        assert result.returncode == 1, (args, result.stdout)
        assert f"revoked at height {height}" in result.stderr, (args, result.stderr)
    # and each RPC with PERMISSION_DENIED
    channel, stub = _stub(profile)
    with channel:
        for name, call in _rpc_reads(stub, bytes.fromhex(qid)):
            with pytest.raises(grpc.RpcError) as err:
                call()  # type: ignore[operator]
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (name, err.value)
            assert f"revoked at height {height}" in err.value.details(), name
    # the supervisor and the automation of customs still read
    for subject in ("supervisor-1", "automation"):
        other = _profile(cluster, "customs", subject)
        result = cluster.run_exchange("answer", qid, "--profile", str(other))
        assert result.returncode == 0, (subject, result.stderr)
        result = cluster.run_exchange("findings", "--open", "--profile", str(other))
        assert result.returncode == 0, (subject, result.stderr)


def test_a_stream_is_cut_when_its_reader_is_revoked(cluster: Cluster) -> None:
    reader = _profile(cluster, "pboc", "analyst-1")
    channel, stub = _stub(load_client_profile(reader))
    with channel:
        stream = stub.FollowBlocks(node_pb2.FollowBlocksRequest(), timeout=60)
        height = _revoke(cluster, "pboc", "analyst-1")
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
        assert f"revoked at height {height}" in err.value.details()


def test_an_open_submit_stream_submits_nothing_once_its_caller_is_revoked(
        cluster: Cluster) -> None:
    """The credential of a SubmitFrames caller is checked again for each frame: after
    its revocation the same open stream has every envelope refused, even one signed by
    a valid key, and none of them reaches the ledger."""
    from exchange.client.stream import SubmitStream

    caller = load_client_profile(_profile(cluster, "police", "analyst-1"))
    chain_id = chain_id_for(cluster.profile("police"))
    signer = CachedSigner(read_signing_key(
        load_client_profile(_profile(cluster, "police", "supervisor-1")).signing_key))

    def probe() -> bytes:
        body = new_body(chain_id, "police", int(time.time() * 1000))
        body.probe.payload = b"revoked stream"
        return seal_envelope(body, signer)

    before, after = probe(), probe()

    async def body() -> tuple[node_pb2.SubmitResponse, node_pb2.SubmitResponse]:
        creds = grpc.ssl_channel_credentials(caller.ca_bundle.read_bytes(),
                                             caller.tls_key.read_bytes(),
                                             caller.tls_cert.read_bytes())
        async with grpc.aio.secure_channel(caller.node, creds) as channel:
            stream = SubmitStream(node_pb2_grpc.ExchangeStub(channel))
            first = await stream.submit(before, 30)
            await asyncio.to_thread(_revoke, cluster, "police", "analyst-1")
            second = await stream.submit(after, 30)
            await stream.close()
            return first, second

    first, second = asyncio.run(body())
    assert (first.status, first.result) == ("committed", "OK"), first
    assert second.error_code == "CREDENTIAL_INVALID" and "revoked" in second.error, second
    supervisor = load_client_profile(_profile(cluster, "police", "supervisor-1"))
    with ExchangeClient(supervisor) as client, pytest.raises(NotFound):
        client.get_transaction(tx_id(ledger_pb2.Envelope.FromString(after).body))


def test_an_expired_credential_reads_nothing(cluster: Cluster, tmp_path: Path) -> None:
    """A credential issued on the ledger for a few seconds, bound to a new certificate:
    it reads while valid and nothing once expired; a certificate no credential binds
    reads nothing at all."""
    agency_dir = cluster.net / "tax"
    chain_id = chain_id_for(cluster.profile("tax"))
    root_key = read_signing_key(agency_dir / "keys" / "root.key")
    root = CachedSigner(root_key)
    ca = tls.read_identity(agency_dir / "tls" / "ca.pem", agency_dir / "tls" / "ca.key")
    client_tls = tls.issue_client_certificate(ca, "tax", "analyst-temp")
    tls.write_identity(client_tls, tmp_path / "temp.pem", tmp_path / "temp.key")
    key = SigningKey.generate()
    write_private(tmp_path / "temp-signing.key", key.to_pem())
    unbound_tls = tls.issue_client_certificate(ca, "tax", "analyst-temp")
    tls.write_identity(unbound_tls, tmp_path / "unbound.pem", tmp_path / "unbound.key")
    not_after_ms = int(time.time() * 1000) + 15_000
    signed = issue_credential(chain_id, "tax", "analyst-temp", key.public_key, ["analyst"],
                              int(time.time() * 1000) - 1000, not_after_ms, root_key,
                              tls_key_sha256=tls.public_key_sha256(client_tls.certificate))
    body = new_body(chain_id, "tax", int(time.time() * 1000))
    body.credential_issue.signed_credential = signed.SerializeToString(deterministic=True)
    base = load_client_profile(cluster.profile("tax"))
    with ExchangeClient(base) as client:
        issued = client.submit(seal_envelope(body, root), wait=True)
    assert issued.result == "OK", issued
    temp = Profile(agency="tax", subject="analyst-temp", node=base.node,
                   tls_cert=tmp_path / "temp.pem", tls_key=tmp_path / "temp.key",
                   ca_bundle=base.ca_bundle, signing_key=tmp_path / "temp-signing.key",
                   credential=base.credential)
    unbound = Profile(agency="tax", subject="analyst-temp", node=base.node,
                      tls_cert=tmp_path / "unbound.pem", tls_key=tmp_path / "unbound.key",
                      ca_bundle=base.ca_bundle, signing_key=tmp_path / "temp-signing.key",
                      credential=base.credential)
    request = node_pb2.ListFindingsRequest(open=True)
    channel, stub = _stub(temp)
    with channel:
        stub.ListFindings(request, timeout=10)  # valid: reads
    channel, stub = _stub(unbound)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ListFindings(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "no credential on the ledger binds" in err.value.details()
    while time.time() * 1000 <= not_after_ms:  # wait for the clock to pass the expiry
        time.sleep(0.5)
    channel, stub = _stub(temp)
    with channel, pytest.raises(grpc.RpcError) as err:
        stub.ListFindings(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not at" in err.value.details() and "height" in err.value.details()
