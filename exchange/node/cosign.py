"""Four eyes through the agency's own node (the `exchange.v1.FourEyes` service).

An analyst whose query the owner's policy wants co-signed leaves the unsigned query body
here; a supervisor of the same agency lists it, sees what it asks (subjects opened by the
node from the sealed request) and the policy that asks for the co-signature, and sends
back only a co-signature made in their own process, or declines with a reason. The
analyst's own process then signs the query with the co-signature and submits it.

Every caller is a person of this node's agency, authenticated by the credential bound
to its TLS certificate (`_Auth.caller`). Requests live in the node's memory: at most
REQUESTS_MAX at once, each dropped once its query's deadline has passed, so nothing here
grows with the ledger. A node restart forgets them (the analyst asks again).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import structlog
from google.protobuf.message import DecodeError

from exchange import errors
from exchange.identity.keys import Domain, verify
from exchange.ledger.policy import QueryFacts
from exchange.ledger.queries import SUPERVISOR_ROLE, cosign_message
from exchange.ledger.sealing import open_sealed
from exchange.v1 import cosign_pb2, cosign_pb2_grpc, ledger_pb2

if TYPE_CHECKING:
    from exchange.node.node import Node
    from exchange.node.server import Caller, _Auth

log = structlog.get_logger("exchange.cosign")

FOUR_EYES_SERVICE = cosign_pb2.DESCRIPTOR.services_by_name["FourEyes"].full_name
REQUESTS_MAX = 1_024
PER_ANALYST_MAX = 64
BODY_BYTES_MAX = 256 << 10
REASON_CHARS_MAX = 500
REQUEST_ID_BYTES = 16
STATUS_PENDING = "pending"
STATUS_COSIGNED = "cosigned"
STATUS_DECLINED = "declined"

T = TypeVar("T")


class RequestNotFound(errors.ExchangeError):
    """No such co-signature request (expired, or never made at this node)."""

    code = "NOT_FOUND"


@dataclass
class _Held:
    """One request as held: its view and the key id of the analyst who asked."""

    view: cosign_pb2.CosignRequestView
    analyst_key_id: bytes
    body: ledger_pb2.TxBody = field(default_factory=ledger_pb2.TxBody)


class CosignBook:
    """The co-signature requests of one node's agency, bounded and expiring."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._held: dict[str, _Held] = {}

    def _expire(self, now_ms: int) -> None:
        for rid in [r for r, h in self._held.items() if h.view.deadline_ms <= now_ms]:
            del self._held[rid]

    def submit(self, caller: Caller, raw_body: bytes) -> cosign_pb2.CosignRequestView:
        """Hold an analyst's unsigned query body for a supervisor; MalformedInput for a
        body that is not a query of this agency and chain, already co-signed, or one
        admission would refuse."""
        assert caller.credential is not None
        now_ms = int(time.time() * 1000)
        self._expire(now_ms)
        if len(raw_body) > BODY_BYTES_MAX:
            raise errors.Oversize(f"a query body is at most {BODY_BYTES_MAX} bytes")
        body = ledger_pb2.TxBody()
        try:
            body.ParseFromString(raw_body)
        except DecodeError as exc:
            raise errors.MalformedInput(f"the body is not a transaction body: {exc}") from exc
        if body.WhichOneof("kind") != "query":
            raise errors.MalformedInput("only a query is co-signed")
        if body.chain_id != self.node.chain_id:
            raise errors.WrongChain(f"the body is for chain {body.chain_id!r}, this node "
                                    f"serves {self.node.chain_id!r}")
        if body.agency != self.node.agency:
            raise errors.MalformedInput(f"the query is {body.agency}'s, this node "
                                        f"{self.node.agency}'s")
        if body.query.cosignatures:
            raise errors.MalformedInput("the body already carries co-signatures")
        self.node.applier.queries.check_query_form(body, caller.credential, now_ms)
        analyst = caller.credential.subject
        if len(self._held) >= REQUESTS_MAX:
            raise errors.RateLimited(f"{self.node.agency}'s node holds {REQUESTS_MAX} "
                                     "co-signature requests; retry later", 60_000)
        if sum(1 for h in self._held.values() if h.view.analyst == analyst) >= \
                PER_ANALYST_MAX:
            raise errors.RateLimited(f"{analyst} has {PER_ANALYST_MAX} requests waiting",
                                     60_000)
        q = body.query
        subjects, period = self._opened(body)
        decision = self._decide(body, caller, cosigned=False)
        when_cosigned = self._decide(body, caller, cosigned=True)
        view = cosign_pb2.CosignRequestView(
            request_id=secrets.token_hex(REQUEST_ID_BYTES), analyst=analyst,
            agency=body.agency, status=STATUS_PENDING, created_ms=now_ms,
            deadline_ms=q.deadline_ms, body=raw_body, subjects=subjects, period=period,
            policy_id=when_cosigned.policy_id or decision.policy_id,
            policy_version=when_cosigned.policy_version or decision.policy_version,
            decision_code=decision.code or "allowed", decision_reason=decision.reason,
            allowed_when_cosigned=when_cosigned.allowed)
        self._held[view.request_id] = _Held(view, caller.credential.key_id, body)
        log.info("co-signature requested", request=view.request_id, analyst=analyst,
                 target=q.target_agency, dataset=q.dataset, case=q.case_id)
        return view

    def _opened(self, body: ledger_pb2.TxBody) -> tuple[list[str], str]:
        """The subjects and period the node opens from the sealed request."""
        from agents.lookup import request_from_json

        q = body.query
        try:
            plaintext, _ = open_sealed(q.sealed_request, self.node.reader.data_key,
                                       chain_id=body.chain_id, context_tx_id=b"", chunk=0,
                                       requester_agency=body.agency,
                                       target_agency=q.target_agency)
            request = request_from_json(json.loads(plaintext))
        except (errors.ExchangeError, ValueError, KeyError, TypeError) as exc:
            raise errors.MalformedInput(f"the sealed request does not open here: {exc}") \
                from exc
        return [f"{k}={v}" for k, v in request.subjects], request.period or ""

    def _decide(self, body: ledger_pb2.TxBody, caller: Caller, cosigned: bool) -> Any:
        assert caller.credential is not None
        q = body.query
        return self.node.applier.policies.evaluate(QueryFacts(
            requester_agency=body.agency, requester_roles=frozenset(caller.credential.roles),
            target_agency=q.target_agency, dataset=q.dataset, fields=tuple(q.fields),
            case_id=q.case_id, legal_basis=q.legal_basis, shape=q.shape,
            supervisor_cosigned=cosigned))

    def listing(self, caller: Caller, mine: bool) -> cosign_pb2.CosignRequestList:
        assert caller.credential is not None
        self._expire(int(time.time() * 1000))
        me = caller.credential.subject
        if mine:
            chosen = [h.view for h in self._held.values() if h.view.analyst == me]
        else:
            self._supervisor(caller)
            chosen = [h.view for h in self._held.values()
                      if h.view.analyst != me and h.view.status == STATUS_PENDING]
        chosen.sort(key=lambda v: v.created_ms)
        return cosign_pb2.CosignRequestList(requests=chosen)

    def get(self, caller: Caller, request_id: str) -> cosign_pb2.CosignRequestView:
        held = self._find(request_id)
        assert caller.credential is not None
        if held.view.analyst != caller.credential.subject:
            self._supervisor(caller)
        return held.view

    def cosign(self, caller: Caller, request_id: str,
               co: ledger_pb2.CoSignature) -> cosign_pb2.CosignRequestView:
        """Record a supervisor's co-signature, checked against the key of the caller's
        own credential (so a co-signature is only ever the caller's)."""
        held = self._decidable(caller, request_id)
        assert caller.credential is not None
        if bytes(co.signer_key_id) != caller.credential.key_id:
            raise errors.PermissionDenied("the co-signature is not made with the key of the "
                                          "caller's credential")
        try:
            verify(caller.credential.public_key, Domain.COSIGNATURE, held.body.chain_id,
                   cosign_message(held.body), bytes(co.signature))
        except errors.ExchangeError as exc:
            raise errors.InvalidSignature(f"the co-signature does not verify: {exc}") from exc
        held.view.status = STATUS_COSIGNED
        held.view.cosignature.CopyFrom(co)
        held.view.supervisor = caller.credential.subject
        held.view.decided_ms = int(time.time() * 1000)
        log.info("co-signed", request=request_id, supervisor=held.view.supervisor,
                 analyst=held.view.analyst)
        return held.view

    def decline(self, caller: Caller, request_id: str,
                reason: str) -> cosign_pb2.CosignRequestView:
        reason = " ".join(reason.split())
        if not reason:
            raise errors.MalformedInput("a decline gives a reason")
        if len(reason) > REASON_CHARS_MAX:
            raise errors.MalformedInput(f"a reason is at most {REASON_CHARS_MAX} characters")
        held = self._decidable(caller, request_id)
        assert caller.credential is not None
        held.view.status = STATUS_DECLINED
        held.view.decline_reason = reason
        held.view.supervisor = caller.credential.subject
        held.view.decided_ms = int(time.time() * 1000)
        log.info("co-signature declined", request=request_id,
                 supervisor=held.view.supervisor, analyst=held.view.analyst)
        return held.view

    def _find(self, request_id: str) -> _Held:
        self._expire(int(time.time() * 1000))
        held = self._held.get(request_id)
        if held is None:
            raise RequestNotFound(f"no co-signature request {request_id!r} (expired, "
                                       "or never made here)")
        return held

    def _decidable(self, caller: Caller, request_id: str) -> _Held:
        self._supervisor(caller)
        held = self._find(request_id)
        assert caller.credential is not None
        if held.view.analyst == caller.credential.subject or \
                held.analyst_key_id == caller.credential.key_id:
            raise errors.PermissionDenied("four eyes: a person does not co-sign their own "
                                          "query")
        if held.view.status != STATUS_PENDING:
            raise errors.AlreadyExists(f"request {request_id} is already {held.view.status}")
        return held

    def _supervisor(self, caller: Caller) -> None:
        assert caller.credential is not None
        if SUPERVISOR_ROLE not in caller.credential.roles:
            raise errors.PermissionDenied(f"{caller.who} is not a supervisor of "
                                          f"{self.node.agency}")


class FourEyesService(cosign_pb2_grpc.FourEyesServicer):
    """The FourEyes RPCs: each authenticates its caller as a person of the node's agency
    and maps domain errors to gRPC statuses as the public API does."""

    def __init__(self, node: Node, auth: _Auth) -> None:
        self.auth = auth
        self.book = CosignBook(node)

    async def _run(self, context: grpc.aio.ServicerContext, method: str,
                   fn: Callable[[Caller], T]) -> T:
        from exchange.node.server import _abort, _abort_error

        try:
            caller = self.auth.caller(context, method, person_only=True)
            return fn(caller)
        except RequestNotFound as exc:
            await _abort(context, grpc.StatusCode.NOT_FOUND, f"{exc.code}: {exc}")
            raise  # unreachable: abort raises
        except errors.ExchangeError as exc:
            await _abort_error(context, exc)
            raise  # unreachable: abort raises

    async def SubmitCosignRequest(self, request: cosign_pb2.CosignSubmitRequest,
                                  context: grpc.aio.ServicerContext
                                  ) -> cosign_pb2.CosignRequestView:
        return await self._run(context, "SubmitCosignRequest",
                               lambda c: self.book.submit(c, bytes(request.body)))

    async def ListCosignRequests(self, request: cosign_pb2.CosignListRequest,
                                 context: grpc.aio.ServicerContext
                                 ) -> cosign_pb2.CosignRequestList:
        return await self._run(context, "ListCosignRequests",
                               lambda c: self.book.listing(c, request.mine))

    async def GetCosignRequest(self, request: cosign_pb2.CosignGetRequest,
                               context: grpc.aio.ServicerContext
                               ) -> cosign_pb2.CosignRequestView:
        return await self._run(context, "GetCosignRequest",
                               lambda c: self.book.get(c, request.request_id))

    async def Cosign(self, request: cosign_pb2.CosignApproveRequest,
                     context: grpc.aio.ServicerContext) -> cosign_pb2.CosignRequestView:
        return await self._run(context, "Cosign", lambda c: self.book.cosign(
            c, request.request_id, request.cosignature))

    async def DeclineCosign(self, request: cosign_pb2.CosignDeclineRequest,
                            context: grpc.aio.ServicerContext
                            ) -> cosign_pb2.CosignRequestView:
        return await self._run(context, "DeclineCosign", lambda c: self.book.decline(
            c, request.request_id, request.reason))


def add_four_eyes(server: grpc.aio.Server, node: Node, auth: _Auth) -> None:
    """Serve the FourEyes service beside the public API, on the same port."""
    cosign_pb2_grpc.add_FourEyesServicer_to_server(FourEyesService(node, auth), server)

