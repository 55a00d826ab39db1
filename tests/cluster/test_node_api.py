"""The node's public API on a real four-node cluster: invalid input is refused with a
reason and changes nothing; what is submitted anywhere shows up identically everywhere
with quorum attestations; health, reflection and metrics are served; callers are
authenticated from their TLS certificates."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from exchange.client import Signer, chain_id_for, load_client_profile
from exchange.identity import tls
from exchange.identity.config import load_node_config
from exchange.identity.keys import CachedSigner, SigningKey, read_signing_key
from exchange.ledger.block import new_body, seal_envelope, tx_id
from exchange.testing.localnet import Cluster
from exchange.v1 import ledger_pb2, node_pb2, node_pb2_grpc, peer_pb2, peer_pb2_grpc

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("node_api")]


def cluster_ready(c: Cluster) -> None:
    _wait_for_catalogs(c)  # the nodes' own start-up transactions, before any test

def _wait_for_catalogs(cluster: Cluster, timeout_s: float = 60) -> None:
    from agents.catalog import catalog_entries

    wanted = sum(len(catalog_entries(a)) for a in cluster.agencies)
    deadline = time.monotonic() + timeout_s
    with cluster.client("tax") as client:
        while len(client.list_catalog().entries) < wanted:
            assert time.monotonic() < deadline, "catalogs were not published"
            time.sleep(0.2)
    for agency in cluster.agencies:
        cluster.wait_height(cluster.status("tax").height, agencies=[agency])  # type: ignore[union-attr]


def _channel(cluster: Cluster, agency: str, cert_agency: str | None = None,
             subject: str = "analyst-1") -> grpc.Channel:
    """A channel to `agency`'s node with the TLS identity of `cert_agency`'s `subject`."""
    who = cert_agency or agency
    base = cluster.net / who / "analysts"
    profile = load_client_profile(cluster.profile(agency))
    creds = grpc.ssl_channel_credentials(
        profile.ca_bundle.read_bytes() + (cluster.net / who / "tls" / "ca.pem").read_bytes(),
        (base / f"{subject}.tls.key").read_bytes(), (base / f"{subject}.tls.pem").read_bytes())
    return grpc.secure_channel(profile.node, creds)


def _signer(cluster: Cluster, agency: str) -> Signer:
    return Signer.load(load_client_profile(cluster.profile(agency)),
                       chain_id_for(cluster.profile(agency)))


def _probe(signer: Signer, size: int = 32) -> bytes:
    return signer.make_envelope(lambda b: setattr(b.probe, "payload", os.urandom(size)))


def _submit(cluster: Cluster, agency: str, envelope: bytes) -> node_pb2.SubmitResponse:
    with _channel(cluster, agency) as ch:
        return node_pb2_grpc.ExchangeStub(ch).Submit(
            node_pb2.SubmitRequest(envelope=envelope), timeout=20)


def _state(cluster: Cluster) -> tuple[int, int]:
    st = cluster.status("tax")
    assert st is not None
    return st.height, st.mempool_size


def _tx_id_of(envelope: bytes) -> bytes | None:
    """The transaction id an envelope would have (None for bytes that are no envelope)."""
    try:
        return tx_id(ledger_pb2.Envelope.FromString(envelope).body)
    except DecodeError:
        return None


def _forged(signer: Signer) -> bytes:
    env = ledger_pb2.Envelope.FromString(_probe(signer))
    env.signature = bytes(64)
    return env.SerializeToString()


def _stranger(cluster: Cluster) -> bytes:
    body = new_body(chain_id_for(cluster.profile("tax")), "tax", int(time.time() * 1000))
    body.probe.payload = b"x"
    return seal_envelope(body, CachedSigner(SigningKey.generate()))


def _wrong_chain(cluster: Cluster) -> bytes:
    key = read_signing_key(load_client_profile(cluster.profile("tax")).signing_key)
    body = new_body("another-chain", "tax", int(time.time() * 1000))
    body.probe.payload = b"x"
    return seal_envelope(body, CachedSigner(key))


def _at_time(cluster: Cluster, offset_ms: int) -> bytes:
    key = read_signing_key(load_client_profile(cluster.profile("tax")).signing_key)
    body = new_body(chain_id_for(cluster.profile("tax")), "tax",
                    int(time.time() * 1000) + offset_ms)
    body.probe.payload = b"x"
    return seal_envelope(body, CachedSigner(key))


CASES: dict[str, tuple[Callable[[Cluster], bytes], grpc.StatusCode, str]] = {
    "bad signature": (lambda c: _forged(_signer(c, "tax")), grpc.StatusCode.UNAUTHENTICATED,
                      "BAD_SIGNATURE"),
    "unknown signer": (_stranger, grpc.StatusCode.UNAUTHENTICATED, "UNKNOWN_SIGNER"),
    "wrong chain": (_wrong_chain, grpc.StatusCode.INVALID_ARGUMENT, "WRONG_CHAIN"),
    "stale time": (lambda c: _at_time(c, -3_600_000), grpc.StatusCode.INVALID_ARGUMENT,
                   "TIME_OUT_OF_WINDOW"),
    "future time": (lambda c: _at_time(c, 3_600_000), grpc.StatusCode.INVALID_ARGUMENT,
                    "TIME_OUT_OF_WINDOW"),
    "oversize": (lambda c: _probe(_signer(c, "tax"), 2 << 20), grpc.StatusCode.INVALID_ARGUMENT,
                 "OVERSIZE"),
    "malformed bytes": (lambda c: b"\xff\x00not protobuf", grpc.StatusCode.INVALID_ARGUMENT,
                        "MALFORMED"),
    "other agency's signer": (
        lambda c: _signer(c, "police").make_envelope(
            lambda b: (setattr(b, "agency", "tax"), setattr(b.probe, "payload", b"x"))),
        grpc.StatusCode.PERMISSION_DENIED, "AGENCY_MISMATCH"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_invalid_submission_is_refused_with_reason_and_changes_nothing(
        cluster: Cluster, case: str) -> None:
    make, code, reason = CASES[case]
    envelope = make(cluster)
    before = _state(cluster)
    with pytest.raises(grpc.RpcError) as err:
        _submit(cluster, "tax", envelope)
    assert err.value.code() == code, err.value.details()
    assert err.value.details().startswith(reason), err.value.details()
    # a valid probe submitted after the refusal commits; had the refused envelope been
    # admitted, it would have been cut no later than the probe: it is nowhere
    later = _submit(cluster, "tax", _probe(_signer(cluster, "tax")))
    assert later.status == "committed", later
    height, mempool_size = _state(cluster)
    assert height >= before[0] and mempool_size == 0
    refused = _tx_id_of(envelope)
    if refused is not None:
        with _channel(cluster, "tax") as ch, pytest.raises(grpc.RpcError) as missing:
            node_pb2_grpc.ExchangeStub(ch).GetTransaction(
                node_pb2.GetTransactionRequest(tx_id=refused), timeout=20)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_submit_stream_answers_each_request_by_seq_committed_or_refused(
        cluster: Cluster) -> None:
    """Many submissions on one SubmitStream: each valid one answered committed (as a
    unary Submit would be) with its own seq, a refused one with its reason and seq, and
    the refusal changes nothing for the others on the stream."""
    signer = _signer(cluster, "police")
    good = {seq: _probe(signer) for seq in (1, 2, 3, 5)}
    refused = {4: _forged(signer), 6: b"\xff\x00not protobuf"}
    requests = [node_pb2.SubmitRequest(envelope=env, seq=seq)
                for seq, env in sorted({**good, **refused}.items())]
    with _channel(cluster, "police") as ch:
        answers = {r.seq: r for r in node_pb2_grpc.ExchangeStub(ch).SubmitStream(
            iter(requests), timeout=30)}
    assert sorted(answers) == [1, 2, 3, 4, 5, 6]
    for seq, env in good.items():
        a = answers[seq]
        assert (a.status, a.result, a.error_code, a.tx_id) == \
            ("committed", "OK", "", _tx_id_of(env)), a
        assert _submit(cluster, "police", env).height == a.height  # on the ledger there
    assert answers[4].error_code == "BAD_SIGNATURE" and answers[4].status == ""
    assert answers[6].error_code == "MALFORMED" and answers[6].status == ""


def test_submit_frames_answer_each_request_by_seq_and_refuse_an_oversize_frame_whole(
        cluster: Cluster) -> None:
    """SubmitFrames: the requests of a frame are admitted together and each answered
    with its seq (committed, or refused with its reason); a frame over the bound is
    refused request by request, admits nothing, and the stream goes on."""
    signer = _signer(cluster, "customs")
    good = {1: _probe(signer), 4: _probe(signer), 300: _probe(signer)}
    too_many = [node_pb2.SubmitRequest(seq=10 + i, envelope=_probe(signer))
                for i in range(257)]
    frames = [
        node_pb2.SubmitFrame(requests=[
            node_pb2.SubmitRequest(seq=1, envelope=good[1]),
            node_pb2.SubmitRequest(seq=2, envelope=_forged(signer)),
            node_pb2.SubmitRequest(seq=3, envelope=b"\xff\x00not protobuf"),
            node_pb2.SubmitRequest(seq=4, envelope=good[4])]),
        node_pb2.SubmitFrame(requests=too_many),
        node_pb2.SubmitFrame(requests=[node_pb2.SubmitRequest(seq=300,
                                                              envelope=good[300])])]
    with _channel(cluster, "customs") as ch:
        messages = list(node_pb2_grpc.ExchangeStub(ch).SubmitFrames(iter(frames),
                                                                    timeout=30))
    answers = {r.seq: r for m in messages for r in m.responses}
    assert sorted(answers) == [1, 2, 3, 4, *range(10, 267), 300]
    assert len(messages) < len(answers)  # answers ready together came together
    for seq, env in good.items():
        a = answers[seq]
        assert (a.status, a.result, a.error_code, a.tx_id) == \
            ("committed", "OK", "", _tx_id_of(env)), a
    assert answers[2].error_code == "BAD_SIGNATURE"
    assert answers[3].error_code == "MALFORMED"
    assert {answers[10 + i].error_code for i in range(257)} == {"OVERSIZE"}
    with _channel(cluster, "customs") as ch, pytest.raises(grpc.RpcError) as missing:
        node_pb2_grpc.ExchangeStub(ch).GetTransaction(
            node_pb2.GetTransactionRequest(tx_id=_tx_id_of(too_many[0].envelope)),
            timeout=20)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_client_stream_sends_what_is_ready_at_once_in_frames_of_its_bound(
        cluster: Cluster) -> None:
    """exchange.client.stream: eight submissions made at once go as frames of at most
    three (the bound), and each caller hears its own transaction committed."""
    from exchange.client.stream import SubmitStream

    signer = _signer(cluster, "pboc")
    envelopes = [_probe(signer) for _ in range(8)]
    profile = load_client_profile(cluster.profile("pboc"))

    async def body() -> tuple[list[node_pb2.SubmitResponse], int]:
        creds = grpc.ssl_channel_credentials(profile.ca_bundle.read_bytes(),
                                             profile.tls_key.read_bytes(),
                                             profile.tls_cert.read_bytes())
        async with grpc.aio.secure_channel(profile.node, creds) as channel:
            stream = SubmitStream(node_pb2_grpc.ExchangeStub(channel), frame_requests_max=3)
            answers = await asyncio.gather(*(stream.submit(e, 30) for e in envelopes))
            await stream.close()
            return list(answers), stream.frames_sent

    answers, frames = asyncio.run(body())
    assert frames == 3  # 3 + 3 + 2
    assert [(a.status, a.result, a.tx_id) for a in answers] == \
        [("committed", "OK", _tx_id_of(e)) for e in envelopes]


def test_same_envelope_again_returns_the_original_result(cluster: Cluster) -> None:
    envelope = _probe(_signer(cluster, "customs"))
    first = _submit(cluster, "customs", envelope)
    again = _submit(cluster, "customs", envelope)
    assert (again.height, again.index, again.result, again.duplicate) == \
        (first.height, first.index, "OK", True)


def test_submissions_at_every_node_show_up_identically_everywhere(cluster: Cluster) -> None:
    results = {a: _submit(cluster, a, _probe(_signer(cluster, a))) for a in cluster.agencies}
    top = max(r.height for r in results.values())
    cluster.wait_height(top)
    deadline = time.monotonic() + 10
    for agency, res in results.items():
        assert res.status == "committed" and res.result == "OK", agency
        infos = {}
        for reader in cluster.agencies:
            with _channel(cluster, reader) as ch:
                stub = node_pb2_grpc.ExchangeStub(ch)
                while True:
                    info = stub.GetTransaction(node_pb2.GetTransactionRequest(tx_id=res.tx_id))
                    if info.attested_by >= info.quorum or time.monotonic() > deadline:
                        break
                    time.sleep(0.1)
            infos[reader] = info
            assert info.attested_by >= info.quorum == 3, (reader, info.attested_by)
        assert len({(i.height, i.index, i.header, i.envelope, i.result)
                    for i in infos.values()}) == 1


def test_chain_verify_passes_on_every_node(cluster: Cluster) -> None:
    for agency in cluster.agencies:
        out = cluster.cli_json("chain", "verify", agency=agency)
        assert isinstance(out, dict) and out["ok"] is True, out


def test_another_agencys_analyst_may_not_use_this_node(cluster: Cluster) -> None:
    with _channel(cluster, "tax", cert_agency="police") as ch, \
            pytest.raises(grpc.RpcError) as err:
        node_pb2_grpc.ExchangeStub(ch).Status(node_pb2.StatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_analyst_may_not_speak_raft(cluster: Cluster) -> None:
    with _channel(cluster, "tax") as ch, pytest.raises(grpc.RpcError) as err:
        peer_pb2_grpc.PeerStub(ch).Status(peer_pb2.PeerStatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "not a member node" in err.value.details()
    assert "non-node caller on the peer service" in cluster.log_path("tax").read_text()


def test_certificate_from_a_ca_outside_genesis_is_refused(cluster: Cluster,
                                                         tmp_path: Path) -> None:
    rogue_ca = tls.create_ca("tax")  # claims to be tax, but is not tax's CA
    rogue = tls.issue_node_certificate(rogue_ca, "tax", hosts=["127.0.0.1"])
    profile = load_client_profile(cluster.profile("tax"))
    creds = grpc.ssl_channel_credentials(profile.ca_bundle.read_bytes(), rogue.key_pem,
                                         rogue.cert_pem)
    with grpc.secure_channel(profile.node, creds) as ch, pytest.raises(grpc.RpcError) as err:
        peer_pb2_grpc.PeerStub(ch).Status(peer_pb2.PeerStatusRequest(), timeout=5)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the TLS handshake fails


def test_health_and_reflection_are_served(cluster: Cluster) -> None:
    with _channel(cluster, "pboc") as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="exchange.v1.Exchange"), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(
            list_services="")]), timeout=5)
        names = {s.name for a in answers for s in a.list_services_response.service}
    assert {"exchange.v1.Exchange", "exchange.v1.Peer", "grpc.health.v1.Health"} <= names


def test_metrics_endpoint_is_valid_prometheus_text(cluster: Cluster, tmp_path: Path) -> None:
    config = load_node_config(cluster.node_config("tax"))
    text = urllib.request.urlopen(f"http://{config.listen_metrics}/metrics",
                                  timeout=5).read().decode()
    for name in ("exchange_commit_height", "exchange_raft_term", "exchange_leader_changes",
                 "exchange_blocks_applied", "exchange_transactions_applied",
                 "exchange_apply_seconds", "exchange_grpc_seconds"):
        assert name in text
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    result = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                            capture_output=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_revoked_signer_is_refused_from_the_next_block(cluster: Cluster) -> None:
    sup_profile = cluster.net / "tax" / "analysts" / "supervisor-1.toml"
    chain_id = chain_id_for(cluster.profile("tax"))
    supervisor = Signer.load(load_client_profile(sup_profile), chain_id)
    assert _submit(cluster, "tax", _probe(supervisor)).result == "OK"
    root_key = CachedSigner(read_signing_key(cluster.net / "tax" / "keys" / "root.key"))
    body = new_body(chain_id, "tax", int(time.time() * 1000))
    body.credential_revoke.key_id = CachedSigner(
        read_signing_key(load_client_profile(sup_profile).signing_key)).key_id
    body.credential_revoke.reason = "left the bureau"
    revoked = _submit(cluster, "tax", seal_envelope(body, root_key))
    assert revoked.result == "OK"
    with pytest.raises(grpc.RpcError) as err:
        _submit(cluster, "tax", _probe(supervisor))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details().startswith("CREDENTIAL_INVALID"), err.value.details()
    assert "revoked at height" in err.value.details()
    # every node refuses it (asked here as the tax node, which may forward to any node)
    cluster.wait_height(revoked.height)
    tls_dir = cluster.net / "tax" / "tls"
    for agency in cluster.agencies:
        creds = grpc.ssl_channel_credentials(
            (cluster.net / agency / "tls" / "ca.pem").read_bytes(),
            (tls_dir / "node.key").read_bytes(), (tls_dir / "node.pem").read_bytes())
        address = load_client_profile(cluster.profile(agency)).node
        with grpc.secure_channel(address, creds) as ch, pytest.raises(grpc.RpcError) as err:
            node_pb2_grpc.ExchangeStub(ch).Submit(
                node_pb2.SubmitRequest(envelope=_probe(supervisor)), timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, (agency, err.value)
        assert err.value.details().startswith("CREDENTIAL_INVALID"), (agency, err.value)


def test_policy_show_lists_the_genesis_defaults(cluster: Cluster) -> None:
    out = cluster.cli_json("policy", "show", "--owner", "police", agency="customs")
    assert isinstance(out, dict)
    ids = {p["policy_id"] for p in out["policies"]}
    assert ids == {"police/persons", "police/records"}
    records = next(p for p in out["policies"] if p["policy_id"] == "police/records")
    to_customs = next(g for g in records["grants"] if g["to"] == "customs")
    assert to_customs["case_required"] and to_customs["supervisor_cosign"]
    human = cluster.cli("policy", "show", "--dataset", "company_flows", agency="tax")
    assert human.returncode == 0 and "pboc/company_flows" in human.stdout


def test_every_agency_publishes_its_catalog_on_the_ledger(cluster: Cluster) -> None:
    from agents.catalog import catalog_entries

    deadline = time.monotonic() + 30
    while True:
        out = cluster.cli_json("catalog", agency="tax")
        assert isinstance(out, dict)
        published = {(e["agency"], e["dataset"]) for e in out["entries"]}
        wanted = {(a, e.dataset) for a in cluster.agencies for e in catalog_entries(a)}
        if published == wanted or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert published == wanted
    flows = next(e for e in out["entries"] if e["dataset"] == "company_flows")
    assert flows["agency"] == "pboc" and flows["lookup_keys"] == ["uscc"]
    assert "QUERY_SHAPE_AGGREGATE" in flows["shapes"]
    records = next(e for e in out["entries"] if e["dataset"] == "records")
    assert "person_id" in records["lookup_keys"]
    # the same catalog, read from another agency's node
    again = cluster.cli_json("catalog", "--agency", "police", agency="pboc")
    assert isinstance(again, dict)
    assert {e["dataset"] for e in again["entries"]} == {"persons", "records"}
