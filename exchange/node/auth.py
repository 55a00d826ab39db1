"""Who calls a node's public API: a member node, or a person of the node's agency whose
credential on the ledger binds the TLS key of the certificate presented (design decision
14). One check for every service (the public API, four eyes), as of the applied height."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import structlog

from exchange import errors
from exchange.identity.peer_auth import (
    PeerAuthenticator,
    PeerIdentity,
    member_cas_from,
    peer_certificate,
)
from exchange.identity.registry import KeyInfo
from exchange.identity.tls import load_certificate, public_key_sha256

if TYPE_CHECKING:
    from exchange.node.node import Node

log = structlog.get_logger("exchange.node")
KNOWN_CERTS_MAX = 1024


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated caller: a member node, or a person (analyst, supervisor,
    automation) with the credential their certificate is bound to."""

    who: PeerIdentity
    tls_key_sha256: bytes
    credential: KeyInfo | None  # None for a member node

    def __str__(self) -> str:
        if self.credential is None:
            return str(self.who)
        return f"{self.who} (credential {self.credential.key_id.hex()})"


class Auth:
    """Who a caller is, by the member CAs and pinned node certificates on the ledger as
    of the last applied block, and, for a person, by the credential on the ledger that
    binds their certificate's key (design decision 14)."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self._version = -1
        self._refresh()

    def _refresh(self) -> None:
        registry = self.node.registry
        if registry.version != self._version:
            self._version = registry.version
            self.authenticator = PeerAuthenticator(
                member_cas_from(registry.members.values()), registry.node_certs)
            self._known: dict[bytes, tuple[PeerIdentity, bytes]] = {}

    def _identify(self, context: grpc.aio.ServicerContext) -> tuple[PeerIdentity, bytes]:
        self._refresh()
        try:
            cert = peer_certificate(context.auth_context())
            known = self._known.get(cert)
            if known is None:
                known = (self.authenticator.identify(cert),
                         public_key_sha256(load_certificate(cert)))
                if len(self._known) > KNOWN_CERTS_MAX:
                    self._known.clear()
                self._known[cert] = known
            return known
        except errors.ExchangeError as exc:
            log.warning("caller refused", peer=context.peer(), error=str(exc))
            raise errors.PermissionDenied(str(exc)) from exc

    def identify(self, context: grpc.aio.ServicerContext) -> PeerIdentity:
        return self._identify(context)[0]

    def member_node(self, context: grpc.aio.ServicerContext) -> PeerIdentity:
        who = self.identify(context)
        if not who.is_node:
            log.warning("non-node caller on the peer service", caller=str(who))
            raise errors.PermissionDenied(f"{who} is not a member node")
        return who

    def caller(self, context: grpc.aio.ServicerContext, read: str = "",
               person_only: bool = False) -> Caller:
        """The one check of every public API call: a member node (unless
        `person_only`), or a person of this node's agency whose credential binds the
        certificate presented and is valid at the applied height (not revoked, not
        expired). A read (`read` names it) on behalf of a person is logged with the
        credential it was checked against."""
        who, tls_key = self._identify(context)
        if who.is_node:
            if person_only:
                raise errors.PermissionDenied(
                    f"{who} is not an analyst of {self.node.agency}")
            return Caller(who, tls_key, None)
        if who.agency != self.node.agency:
            raise errors.PermissionDenied(f"{who} is not of {self.node.agency}")
        caller = self.recheck(Caller(who, tls_key, None))
        if read:
            assert caller.credential is not None
            log.info("read", method=read, reader=str(who),
                     credential=caller.credential.key_id.hex(),
                     height=self.node.store.height)
        return caller

    def own_agency_or_node(self, context: grpc.aio.ServicerContext) -> Caller:
        """`caller` for a call that reads nothing of a person's (submissions, status)."""
        return self.caller(context)

    def recheck(self, caller: Caller) -> Caller:
        """`caller` with its credential checked again as of now (a long stream is cut
        when its reader's credential is revoked)."""
        if caller.who.is_node:
            return caller
        height = self.node.store.height
        try:
            info = self.node.registry.check_reader(
                caller.tls_key_sha256, caller.who.agency, caller.who.subject, height,
                int(time.time() * 1000))
        except errors.CredentialInvalid as exc:
            log.warning("reader refused", reader=str(caller.who), height=height,
                        error=str(exc))
            raise
        return Caller(caller.who, caller.tls_key_sha256, info)
