"""Who is on the other end of a mutual-TLS connection.

gRPC has already checked that the peer's certificate chains to one of the member CAs
in the trust bundle. That is not enough: any member's CA could issue a certificate
whose name claims another agency. Here the certificate's common name
(``<agency>/<subject>``) is checked against the CA that actually signed it: the named
agency's own CA, as listed in genesis (or rotated on the ledger).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature as X509InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding

from exchange.errors import CredentialInvalid, MalformedInput
from exchange.identity.tls import common_name, load_certificate
from exchange.v1 import identity_pb2

NODE_SUBJECT = "node"


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """An authenticated TLS peer."""

    agency: str
    subject: str  # "node" for a member node, else an analyst/automation subject

    @property
    def is_node(self) -> bool:
        return self.subject == NODE_SUBJECT

    def __str__(self) -> str:
        return f"{self.agency}/{self.subject}"


class PeerAuthenticator:
    """Maps a peer certificate to the member agency whose CA issued it."""

    def __init__(self, member_cas: Mapping[str, bytes],
                 node_certs: Mapping[str, bytes] | None = None) -> None:
        self._cas = {agency: load_certificate(der) for agency, der in member_cas.items() if der}
        # agency -> the only node certificate (DER) accepted from it, once pinned
        self._node_certs = dict(node_certs or {})

    def identify(self, cert_pem: bytes) -> PeerIdentity:
        try:
            cert = load_certificate(cert_pem)
            name = common_name(cert)
        except (ValueError, MalformedInput) as exc:
            raise CredentialInvalid(f"unreadable peer certificate: {exc}") from exc
        agency, sep, subject = name.partition("/")
        if not sep or not subject:
            raise CredentialInvalid(f"peer certificate name {name!r} is not agency/subject")
        ca = self._cas.get(agency)
        if ca is None:
            raise CredentialInvalid(f"peer {name!r} names non-member agency {agency!r}")
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, X509InvalidSignature) as exc:
            raise CredentialInvalid(f"peer {name!r} was not certified by {agency}'s CA") from exc
        pinned = self._node_certs.get(agency)
        if subject == NODE_SUBJECT and pinned is not None and \
                cert.public_bytes(Encoding.DER) != pinned:
            raise CredentialInvalid(f"peer {name!r} presents a node certificate {agency} has "
                                    "revoked on the ledger")
        return PeerIdentity(agency, subject)


def peer_certificate(auth_context: Mapping[str, Sequence[bytes]]) -> bytes:
    """The peer's PEM certificate from a gRPC auth context."""
    certs = auth_context.get("x509_pem_cert") or []
    if not certs:
        raise CredentialInvalid("no client certificate")
    return bytes(certs[0])


def member_cas_from(members: Iterable[identity_pb2.Member]) -> dict[str, bytes]:
    """agency -> CA certificate (DER) from genesis Member messages."""
    return {m.agency: bytes(m.tls_ca_certificate) for m in members}
