"""The node's public API on a real cluster, at its edges: SubmitBatch's limit and its
per-item results in a mixed batch; errors that echo a huge value stay errors (not
RESOURCE_EXHAUSTED); junk request bodies, malformed ids and unreachable heights are
INVALID_ARGUMENT (never UNKNOWN with a traceback, never UNAVAILABLE)."""

from __future__ import annotations

import grpc
import pytest

from exchange.testing.localnet import Cluster
from exchange.v1 import node_pb2, node_pb2_grpc
from tests.cluster.test_node_api import _channel, _forged, _probe, _signer, _wait_for_catalogs

pytestmark = [pytest.mark.cluster, pytest.mark.xdist_group("node_api_errors")]

BATCH_ENVELOPES_MAX = 10_000
DETAILS_CHARS_MAX = 2_048  # what a status may echo; gRPC's metadata limit is 8 KiB


def cluster_ready(c: Cluster) -> None:
    _wait_for_catalogs(c)

def _stub(cluster: Cluster, agency: str = "tax") -> tuple[grpc.Channel,
                                                          node_pb2_grpc.ExchangeStub]:
    channel = _channel(cluster, agency)
    return channel, node_pb2_grpc.ExchangeStub(channel)


def _stored(stub: node_pb2_grpc.ExchangeStub, tx_id: bytes) -> bool:
    try:
        stub.GetTransaction(node_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
        return False
    return True


def test_submit_batch_gives_each_item_of_a_mixed_batch_its_own_result(
        cluster: Cluster) -> None:
    signer = _signer(cluster, "tax")
    earlier, good, also_good = _probe(signer), _probe(signer), _probe(signer)
    forged, oversize = _forged(signer), _probe(signer, 2 << 20)
    channel, stub = _stub(cluster)
    with channel:
        first = stub.Submit(node_pb2.SubmitRequest(envelope=earlier), timeout=30)
        assert first.result == "OK" and not first.duplicate
        batch = [good, forged, earlier, oversize, good, also_good]
        reply = stub.SubmitBatch(node_pb2.SubmitBatchRequest(envelopes=batch), timeout=60)
        results = list(reply.results)
        assert len(results) == len(batch)
        ok, bad_signature, duplicate, too_big, again, ok_too = results
        for r in (ok, ok_too):
            assert (r.error_code, r.result, r.duplicate) == ("", "OK", False), r
            assert r.height > 0 and _stored(stub, bytes(r.tx_id))
        assert bad_signature.error_code == "BAD_SIGNATURE" and not bad_signature.tx_id
        assert too_big.error_code == "OVERSIZE" and "exceeds" in too_big.error
        assert (duplicate.duplicate, duplicate.height, duplicate.index, duplicate.result) == \
            (True, first.height, first.index, "OK")
        # the same envelope twice in one batch is one transaction, reported to both
        assert (again.tx_id, again.height, again.index, again.result) == \
            (ok.tx_id, ok.height, ok.index, "OK")
        assert ok.tx_id != ok_too.tx_id


def test_submit_batch_over_its_limit_is_refused_whole_and_commits_nothing(
        cluster: Cluster) -> None:
    signer = _signer(cluster, "tax")
    envelope = _probe(signer)
    channel, stub = _stub(cluster)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.SubmitBatch(node_pb2.SubmitBatchRequest(
                envelopes=[envelope] * (BATCH_ENVELOPES_MAX + 1)), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("OVERSIZE: at most 10,000 envelopes")
        # a transaction committed after the refusal, then look
        later = stub.Submit(node_pb2.SubmitRequest(envelope=_probe(signer)), timeout=30)
        assert later.result == "OK"
        assert not _stored(stub, _tx_id(envelope))
        # exactly the limit is served: every item its own result
        reply = stub.SubmitBatch(node_pb2.SubmitBatchRequest(
            envelopes=[envelope] * BATCH_ENVELOPES_MAX), timeout=120)
        assert len(reply.results) == BATCH_ENVELOPES_MAX
        first = reply.results[0]
        assert (first.error_code, first.result, bytes(first.tx_id)) == \
            ("", "OK", _tx_id(envelope))
        # each copy is the same transaction (or, should admission limit a signer's rate,
        # refused on its own with a code): never a result for another envelope
        assert all((r.error_code, r.result, bytes(r.tx_id)) == ("", "OK", _tx_id(envelope))
                   or (r.error_code and not r.result) for r in reply.results)


def _tx_id(envelope: bytes) -> bytes:
    from exchange.ledger.block import tx_id
    from exchange.v1 import ledger_pb2

    return tx_id(ledger_pb2.Envelope.FromString(envelope).body)


def test_an_error_echoing_a_huge_value_is_cut_not_resource_exhausted(
        cluster: Cluster) -> None:
    channel, stub = _stub(cluster)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.Audit(node_pb2.AuditRequest(subject="x" * 200_000), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        details = err.value.details()
        assert details.startswith("MALFORMED: subject 'xxxx") and "KEY=VALUE" not in details
        assert len(details) <= DETAILS_CHARS_MAX and "characters cut" in details, details


def _raw_call(channel: grpc.Channel, method: str, body: bytes) -> grpc.RpcError:
    call = channel.unary_unary(f"/exchange.v1.Exchange/{method}",
                               request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        call(body, timeout=10)
    return err.value


def test_a_junk_request_body_is_invalid_argument_without_a_traceback(
        cluster: Cluster) -> None:
    log = cluster.log_path("tax")
    logged_before = log.stat().st_size
    channel, _ = _stub(cluster)
    with channel:
        for method in ("GetTransaction", "GetBlock", "Audit", "SubmitBatch", "Status"):
            error = _raw_call(channel, method, b"\xff\xff\xff\xff junk")
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, error)
            assert error.details().startswith("MALFORMED: the request is not a valid"), \
                error.details()
        stream = channel.unary_stream("/exchange.v1.Exchange/FollowBlocks",
                                      request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.RpcError) as err:
            list(stream(b"\xff\xff\xff\xff", timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        # and the node still serves
        _, stub = _stub(cluster)
        assert stub.Status(node_pb2.StatusRequest(), timeout=10).agency == "tax"
    with open(log, "rb") as f:
        f.seek(logged_before)
        logged = f.read().decode("utf-8", "replace")
    assert "Traceback" not in logged and "Unexpected" not in logged, logged[-4000:]


@pytest.mark.parametrize("tx_id", [b"", b"\x01" * 5, b"\x02" * 33, b"\x03" * 65_536],
                         ids=["empty", "5 bytes", "33 bytes", "64 KiB"])
def test_get_transaction_with_a_malformed_id_is_invalid_argument(
        cluster: Cluster, tx_id: bytes) -> None:
    channel, stub = _stub(cluster)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.GetTransaction(node_pb2.GetTransactionRequest(tx_id=tx_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert err.value.details() == "MALFORMED: a transaction id is 32 bytes"
        with pytest.raises(grpc.RpcError) as err:  # a well-formed unknown id
            stub.GetTransaction(node_pb2.GetTransactionRequest(tx_id=bytes(32)), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("height", [2**63, 2**64 - 1])
def test_a_height_that_can_never_be_reached_is_invalid_not_unavailable(
        cluster: Cluster, height: int) -> None:
    channel, stub = _stub(cluster)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            stub.CaseStatements(node_pb2.CaseStatementsRequest(case_id="CASE-NONE",
                                                                 height=height), timeout=20)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "height" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FollowBlocks(node_pb2.FollowBlocksRequest(from_height=height),
                                   timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        with pytest.raises(grpc.RpcError) as err:
            stub.GetBlock(node_pb2.GetBlockRequest(height=height), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, err.value
