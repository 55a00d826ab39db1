"""Each agency's own TLS CA and the certificates it issues (design decision 5).

Every gRPC connection is mutual TLS. An agency's CA (ECDSA P-256, which BoringSSL in
grpcio accepts everywhere) issues its node a certificate usable as server and client,
and each analyst or automation a client certificate whose common name is
``<agency>/<subject>``. Peers trust exactly the member CAs that genesis (later, the
ledger) lists: `trust_bundle` turns those DER certificates into the PEM bundle grpc
wants.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from exchange.errors import MalformedInput
from exchange.identity.keys import write_private
from exchange.v1 import identity_pb2

CA_VALIDITY_DAYS = 3650
NODE_VALIDITY_DAYS = 730
CLIENT_VALIDITY_DAYS = 365
# Certificates start a little in the past so a peer whose clock lags still accepts them.
BACKDATE = datetime.timedelta(minutes=5)
ORGANIZATIONAL_UNIT = "exchange"
LOCAL_DOMAIN = "exchange.local"
# Names every node certificate carries, so the local network works out of the box.
DEFAULT_NODE_HOSTS = ("localhost", "127.0.0.1")

_DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class TlsIdentity:
    """A certificate and its private key."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def cert_der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())


def _utc(now: datetime.datetime | None) -> datetime.datetime:
    if now is None:
        return datetime.datetime.now(datetime.UTC)
    if now.tzinfo is None:
        raise ValueError("certificate times must be timezone-aware")
    return now.astimezone(datetime.UTC)


def _name(agency: str, common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, agency),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ORGANIZATIONAL_UNIT),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def general_name(host: str) -> x509.GeneralName:
    """A subjectAltName entry for a host: an IP address or a DNS name."""
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    if not host or len(host) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        raise MalformedInput(f"{host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host.lower())


def ca_common_name(agency: str) -> str:
    """The common name of an agency's own TLS CA."""
    return f"{agency} exchange CA"


def create_ca(agency: str, now: datetime.datetime | None = None,
              validity_days: int = CA_VALIDITY_DAYS) -> TlsIdentity:
    """A new self-signed CA for `agency`, allowed to sign leaf certificates only."""
    start = _utc(now) - BACKDATE
    key = _new_key()
    name = _name(agency, ca_common_name(agency))
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return TlsIdentity(cert, key)


def _issue(ca: TlsIdentity, agency: str, common_name: str, sans: Sequence[x509.GeneralName],
           usages: Sequence[x509.ObjectIdentifier], now: datetime.datetime | None,
           validity_days: int) -> TlsIdentity:
    start = _utc(now) - BACKDATE
    ca_end = ca.certificate.not_valid_after_utc
    end = min(start + datetime.timedelta(days=validity_days), ca_end)
    if end <= start:
        raise ValueError("the CA has expired")
    key = _new_key()
    public = key.public_key()
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(agency, common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
            critical=False)
        .sign(ca.private_key, hashes.SHA256())
    )
    return TlsIdentity(cert, key)


def node_hosts(agency: str, extra_hosts: Iterable[str] = ()) -> tuple[str, ...]:
    """The names a node certificate is valid for: localhost, 127.0.0.1,
    ``<agency>.exchange.local`` and any given host, without repeats."""
    hosts: list[str] = []
    for host in (*DEFAULT_NODE_HOSTS, f"{agency}.{LOCAL_DOMAIN}", *extra_hosts):
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def issue_node_certificate(ca: TlsIdentity, agency: str, hosts: Iterable[str] = (),
                           now: datetime.datetime | None = None,
                           validity_days: int = NODE_VALIDITY_DAYS) -> TlsIdentity:
    """The node's certificate: server and client auth (it dials its peers with it),
    CN ``<agency>/node``, SANs from `node_hosts`."""
    sans = [general_name(h) for h in node_hosts(agency, hosts)]
    return _issue(ca, agency, f"{agency}/node", sans,
                  [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
                  now, validity_days)


def issue_client_certificate(ca: TlsIdentity, agency: str, subject: str,
                             now: datetime.datetime | None = None,
                             validity_days: int = CLIENT_VALIDITY_DAYS) -> TlsIdentity:
    """An analyst's or automation's client certificate, CN ``<agency>/<subject>``."""
    if not subject or "/" in subject:
        raise MalformedInput(f"invalid certificate subject {subject!r}")
    name = f"{agency}/{subject}"
    # A SAN naming the holder keeps the certificate well-formed for strict verifiers.
    san = x509.UniformResourceIdentifier(f"exchange:{name}")
    return _issue(ca, agency, name, [san], [ExtendedKeyUsageOID.CLIENT_AUTH], now,
                  validity_days)


def write_identity(identity: TlsIdentity, cert_path: Path, key_path: Path,
                   overwrite: bool = False) -> None:
    """Write the certificate as PEM and the private key as PKCS#8 PEM, mode 0600."""
    write_private(key_path, identity.key_pem, overwrite=overwrite)
    with open(cert_path, "wb" if overwrite else "xb") as f:
        f.write(identity.cert_pem)


def load_certificate(data: bytes) -> x509.Certificate:
    """A certificate from PEM or DER bytes."""
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise MalformedInput(f"cannot read certificate: {exc}") from exc


def read_identity(cert_path: Path, key_path: Path) -> TlsIdentity:
    """A certificate and key as `write_identity` wrote them."""
    cert = load_certificate(cert_path.read_bytes())
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise MalformedInput(f"{key_path}: cannot read private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise MalformedInput(f"{key_path}: not an ECDSA private key")
    return TlsIdentity(cert, key)


def trust_bundle(genesis: identity_pb2.Genesis) -> bytes:
    """Concatenated PEM of every member's CA certificate, in genesis order: the roots
    a node and its peers trust, and nothing else."""
    pems: list[bytes] = []
    for member in genesis.members:
        if not member.tls_ca_certificate:
            raise MalformedInput(f"member {member.agency} has no TLS CA certificate")
        cert = load_certificate(bytes(member.tls_ca_certificate))
        pems.append(cert.public_bytes(serialization.Encoding.PEM))
    return b"".join(pems)


def common_name(cert: x509.Certificate) -> str:
    """The certificate's subject CN (``<agency>/<subject>`` for our leaves)."""
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise MalformedInput("certificate has no single common name")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def fingerprint_sha256(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def public_key_sha256(cert: x509.Certificate) -> bytes:
    """SHA-256 of the certificate's DER SubjectPublicKeyInfo: what a credential names to
    bind its holder's TLS client certificate (a renewed certificate for the same key
    stays bound)."""
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return digest.finalize()
