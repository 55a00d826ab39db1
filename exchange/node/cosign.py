"""Four eyes through the agency's own node (the `exchange.v1.FourEyes` service).

An analyst whose query the owner's policy wants co-signed leaves the unsigned query body
here; a supervisor of the same agency lists it, sees what it asks (subjects opened by the
node from the sealed request) and the policy that asks for the co-signature, and sends
back only a co-signature made in their own process, or declines with a reason. The
analyst's own process then signs the query with the co-signature and submits it.

Every caller is a person of this node's agency, authenticated by the credential bound
to its TLS certificate (`Auth.caller`). Requests are durable: they live in
`cosign.db` beside the node's data (SQLite, WAL, synchronous=FULL), each written, and its
decision recorded, by a committed transaction before the RPC answers, so a node restart
forgets neither a request it acknowledged nor a supervisor's decision. At most
REQUESTS_MAX are held at once (PER_ANALYST_MAX per analyst), each dropped once its query's
deadline has passed, so nothing here grows with the ledger.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
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
    from exchange.node.auth import Auth, Caller
    from exchange.node.node import Node

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
BOOK_FILE = "cosign.db"

T = TypeVar("T")


@dataclass
class _Held:
    """One request as held: its view and the key id of the analyst who asked."""

    view: cosign_pb2.CosignRequestView
    analyst_key_id: bytes
    body: ledger_pb2.TxBody = field(default_factory=ledger_pb2.TxBody)


class CosignStore:
    """The requests on disk: one row each, its view (protobuf) and the key id of the
    analyst who asked; every write is one committed transaction (fsync'd: WAL,
    synchronous=FULL) and the bounds are checked inside the transaction that inserts."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS requests (
                request_id TEXT PRIMARY KEY, analyst TEXT NOT NULL,
                analyst_key_id BLOB NOT NULL, status TEXT NOT NULL,
                created_ms INTEGER NOT NULL, deadline_ms INTEGER NOT NULL,
                view BLOB NOT NULL);
            CREATE INDEX IF NOT EXISTS requests_deadline ON requests (deadline_ms);
            CREATE INDEX IF NOT EXISTS requests_analyst ON requests (analyst, created_ms);
        """)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, view: cosign_pb2.CosignRequestView, analyst_key_id: bytes,
            now_ms: int, agency: str) -> None:
        """Store a new request, or RateLimited (nothing stored) when the node or the
        analyst already holds as many as allowed."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("DELETE FROM requests WHERE deadline_ms <= ?", (now_ms,))
                (held,) = self._db.execute("SELECT COUNT(*) FROM requests").fetchone()
                if held >= REQUESTS_MAX:
                    raise errors.RateLimited(f"{agency}'s node holds {REQUESTS_MAX} "
                                             "co-signature requests; retry later", 60_000)
                (mine,) = self._db.execute("SELECT COUNT(*) FROM requests WHERE analyst = ?",
                                           (view.analyst,)).fetchone()
                if mine >= PER_ANALYST_MAX:
                    raise errors.RateLimited(f"{view.analyst} has {PER_ANALYST_MAX} "
                                             "requests waiting", 60_000)
                self._db.execute(
                    "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (view.request_id, view.analyst, analyst_key_id, view.status,
                     view.created_ms, view.deadline_ms, view.SerializeToString()))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def find(self, request_id: str, now_ms: int
             ) -> tuple[cosign_pb2.CosignRequestView, bytes] | None:
        """A request whose deadline has not passed, and its analyst's key id."""
        with self._lock:
            row = self._db.execute(
                "SELECT view, analyst_key_id FROM requests WHERE request_id = ? "
                "AND deadline_ms > ?", (request_id, now_ms)).fetchone()
        if row is None:
            return None
        return cosign_pb2.CosignRequestView.FromString(row[0]), bytes(row[1])

    def views(self, now_ms: int, analyst: str | None = None,
              pending_not_of: str | None = None) -> list[cosign_pb2.CosignRequestView]:
        """The live requests of `analyst`, or the pending ones of everyone but
        `pending_not_of`, oldest first (at most REQUESTS_MAX)."""
        args: tuple[str, ...]
        if analyst is not None:
            where, args = "analyst = ?", (analyst,)
        else:
            where, args = "analyst != ? AND status = ?", (pending_not_of or "", STATUS_PENDING)
        with self._lock:
            rows = self._db.execute(
                f"SELECT view FROM requests WHERE {where} AND deadline_ms > ? "  # noqa: S608
                "ORDER BY created_ms, request_id LIMIT ?",
                (*args, now_ms, REQUESTS_MAX)).fetchall()
        return [cosign_pb2.CosignRequestView.FromString(r[0]) for r in rows]

    def decide(self, view: cosign_pb2.CosignRequestView, now_ms: int) -> bool:
        """Record a pending request's decision (the view as decided); False when it is
        no longer pending or has expired (nothing written)."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE requests SET status = ?, view = ? WHERE request_id = ? "
                "AND status = ? AND deadline_ms > ?",
                (view.status, view.SerializeToString(), view.request_id, STATUS_PENDING,
                 now_ms))
            return cur.rowcount == 1

    def expire(self, now_ms: int) -> int:
        """Drop the requests whose deadline has passed; how many."""
        with self._lock:
            return self._db.execute("DELETE FROM requests WHERE deadline_ms <= ?",
                                    (now_ms,)).rowcount

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM requests").fetchone()[0])


class CosignBook:
    """The co-signature requests of one node's agency, bounded, expiring and durable."""

    def __init__(self, node: Node, path: Path | None = None) -> None:
        self.node = node
        self.store = CosignStore(path or node.config.paths.data_dir / BOOK_FILE)

    def close(self) -> None:
        self.store.close()

    def submit(self, caller: Caller, raw_body: bytes) -> cosign_pb2.CosignRequestView:
        """Hold an analyst's unsigned query body for a supervisor; MalformedInput for a
        body that is not a query of this agency and chain, already co-signed, or one
        admission would refuse. Stored (committed) before it returns."""
        assert caller.credential is not None
        now_ms = int(time.time() * 1000)
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
        self.store.add(view, caller.credential.key_id, now_ms, self.node.agency)
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
        now_ms = int(time.time() * 1000)
        self.store.expire(now_ms)
        me = caller.credential.subject
        if mine:
            chosen = self.store.views(now_ms, analyst=me)
        else:
            self._supervisor(caller)
            chosen = self.store.views(now_ms, pending_not_of=me)
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
        self._record(caller, held)
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
        held.view.status = STATUS_DECLINED
        held.view.decline_reason = reason
        self._record(caller, held)
        log.info("co-signature declined", request=request_id,
                 supervisor=held.view.supervisor, analyst=held.view.analyst)
        return held.view

    def _record(self, caller: Caller, held: _Held) -> None:
        """Store the decision (committed) before it is answered; AlreadyExists when
        another decision got there first, errors.NotFound when the deadline passed."""
        assert caller.credential is not None
        now_ms = int(time.time() * 1000)
        held.view.supervisor = caller.credential.subject
        held.view.decided_ms = now_ms
        if not self.store.decide(held.view, now_ms):
            found = self.store.find(held.view.request_id, now_ms)
            if found is None:
                raise errors.NotFound(f"co-signature request {held.view.request_id!r} "
                                      "expired")
            raise errors.AlreadyExists(f"request {held.view.request_id} is already "
                                       f"{found[0].status}")

    def _find(self, request_id: str) -> _Held:
        found = self.store.find(request_id, int(time.time() * 1000))
        if found is None:
            raise errors.NotFound(f"no co-signature request {request_id!r} (expired, "
                                       "or never made here)")
        view, key_id = found
        return _Held(view, key_id, ledger_pb2.TxBody.FromString(view.body))

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

    def __init__(self, node: Node, auth: Auth) -> None:
        self.auth = auth
        self.book = CosignBook(node)

    def close(self) -> None:
        self.book.close()

    async def _run(self, context: grpc.aio.ServicerContext, method: str,
                   fn: Callable[[Caller], T]) -> T:
        # the server's interceptor maps a domain error to its status, as for every call
        caller = self.auth.caller(context, method, person_only=True)
        # off the event loop: a write waits for SQLite's fsync
        return await asyncio.to_thread(fn, caller)

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


def add_four_eyes(server: grpc.aio.Server, node: Node, auth: Auth) -> FourEyesService:
    """Serve the FourEyes service beside the public API, on the same port (closed by
    the caller once the server has stopped)."""
    service = FourEyesService(node, auth)
    cosign_pb2_grpc.add_FourEyesServicer_to_server(service, server)
    return service

