"""Four eyes from the people's side: an analyst leaves an unsigned query at the agency's
node for a supervisor (`FourEyesClient.submit`), a supervisor co-signs it in their own
process (`cosign_view`), and the analyst signs the query with the co-signature and
submits it (`finalize`). Used by `exchange cosign` and by the console."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from exchange.client import ExchangeClient, Signer
from exchange.client.crossquery import QuerySpec, build_query
from exchange.errors import MalformedInput
from exchange.identity.keys import CachedSigner
from exchange.ledger.block import seal_envelope, tx_id
from exchange.ledger.queries import sign_cosignature
from exchange.v1 import cosign_pb2, cosign_pb2_grpc, identity_pb2, ledger_pb2

REASON_CHARS_MAX = 500


class FourEyesClient:
    """The node's FourEyes service over the client's mutual-TLS channel."""

    def __init__(self, client: ExchangeClient) -> None:
        self.client = client
        factory: Callable[[Any], Any] = cosign_pb2_grpc.FourEyesStub
        self._stub = factory(client.channel)

    def _call(self, method: Callable[..., Any], request: object) -> Any:
        return self.client._unary(method, request)  # noqa: SLF001 - same deadlines, errors

    def submit(self, body: bytes) -> cosign_pb2.CosignRequestView:
        return cast(cosign_pb2.CosignRequestView, self._call(
            self._stub.SubmitCosignRequest, cosign_pb2.CosignSubmitRequest(body=body)))

    def listing(self, mine: bool) -> list[cosign_pb2.CosignRequestView]:
        reply = self._call(self._stub.ListCosignRequests,
                           cosign_pb2.CosignListRequest(mine=mine))
        return list(reply.requests)

    def get(self, request_id: str) -> cosign_pb2.CosignRequestView:
        return cast(cosign_pb2.CosignRequestView, self._call(
            self._stub.GetCosignRequest, cosign_pb2.CosignGetRequest(request_id=request_id)))

    def cosign(self, request_id: str, co: ledger_pb2.CoSignature
               ) -> cosign_pb2.CosignRequestView:
        return cast(cosign_pb2.CosignRequestView, self._call(
            self._stub.Cosign,
            cosign_pb2.CosignApproveRequest(request_id=request_id, cosignature=co)))

    def decline(self, request_id: str, reason: str) -> cosign_pb2.CosignRequestView:
        if not reason.strip():
            raise MalformedInput("a decline gives a reason")
        if len(reason) > REASON_CHARS_MAX:
            raise MalformedInput(f"a reason is at most {REASON_CHARS_MAX} characters")
        return cast(cosign_pb2.CosignRequestView, self._call(
            self._stub.DeclineCosign,
            cosign_pb2.CosignDeclineRequest(request_id=request_id, reason=reason)))


def unsigned_query_body(spec: QuerySpec, signer: Signer, genesis: identity_pb2.Genesis,
                        members: list[identity_pb2.Member] | None = None) -> bytes:
    """The body of the query `spec` asks, sealed to the requester and the target, with no
    co-signature (what a supervisor co-signs, then the analyst signs)."""
    envelope, _ = build_query(spec, signer, genesis, (), members=members)
    return bytes(ledger_pb2.Envelope.FromString(envelope).body)


def parse_body(view: cosign_pb2.CosignRequestView) -> ledger_pb2.TxBody:
    body = ledger_pb2.TxBody()
    body.ParseFromString(view.body)
    if body.WhichOneof("kind") != "query":
        raise MalformedInput(f"request {view.request_id} holds no query")
    return body


def cosign_view(view: cosign_pb2.CosignRequestView, key: CachedSigner
                ) -> ledger_pb2.CoSignature:
    """A supervisor's co-signature of the request's query, made here with their key."""
    body = parse_body(view)
    if body.query.cosignatures:
        raise MalformedInput("the query already carries co-signatures")
    return sign_cosignature(body, key)


def finalize(view: cosign_pb2.CosignRequestView, signer: Signer,
             expected_body: bytes | None = None) -> tuple[bytes, bytes]:
    """The analyst's signed query envelope with the supervisor's co-signature, and its tx
    id. Signing is deterministic, so finalizing twice gives the same transaction (a
    second submission returns the first's outcome). `expected_body`: the body this
    process sent, which the request must still hold."""
    if view.status != "cosigned":
        raise MalformedInput(f"request {view.request_id} is {view.status}, not co-signed")
    if expected_body is not None and bytes(view.body) != expected_body:
        raise MalformedInput(f"request {view.request_id} holds another query than the one "
                             "sent from here")
    body = parse_body(view)
    if body.agency != signer.agency or body.chain_id != signer.chain_id:
        raise MalformedInput(f"request {view.request_id} is not a query of "
                             f"{signer.agency} on {signer.chain_id}")
    body.query.cosignatures.append(view.cosignature)
    envelope = seal_envelope(body, signer.key)
    return envelope, tx_id(ledger_pb2.Envelope.FromString(envelope).body)
