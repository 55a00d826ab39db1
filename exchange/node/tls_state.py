"""The node's TLS material as the ledger says it should be, changed while it runs.

Peers trust exactly the member CAs on the ledger (decision 5): a member added or
removed changes whom this node's server accepts and whom it can dial, without a
restart. An agency rotating its node certificate puts the new certificate on the ledger;
when its node applies that rotation it switches to the new certificate (prepared beside
the current one as `node.next.pem` / `node.next.key`), and from then on its peers accept
only the new one. The server side uses gRPC's dynamic credentials, whose fetcher is
asked for a new configuration at each handshake.
"""

from __future__ import annotations

import os
import ssl
import threading
from collections.abc import Iterable
from pathlib import Path

import grpc
import structlog
from cryptography.hazmat.primitives.serialization import Encoding

from exchange.errors import ExchangeError
from exchange.identity.config import NodeConfig, next_path
from exchange.identity.tls import load_certificate
from exchange.v1 import identity_pb2

log = structlog.get_logger("exchange.tls")


def next_paths(cert_path: Path, key_path: Path) -> tuple[Path, Path]:
    return next_path(cert_path), next_path(key_path)


def trust_pem(members: Iterable[identity_pb2.Member]) -> bytes:
    return b"".join(load_certificate(bytes(m.tls_ca_certificate)).public_bytes(Encoding.PEM)
                    for m in members)


class NodeTls:
    """The node's certificate, key and trusted CAs; thread-safe for gRPC's fetcher."""

    def __init__(self, config: NodeConfig, members: Iterable[identity_pb2.Member]) -> None:
        self._cert_path = config.paths.tls_cert
        self._key_path = config.paths.tls_key
        self._fixed_trust = config.paths.trust_bundle is not None
        self._lock = threading.Lock()
        self.cert_pem = self._cert_path.read_bytes()
        self.key_pem = self._key_path.read_bytes()
        self.trust = (config.read_trust_bundle() if self._fixed_trust
                      else trust_pem(members))
        self._changed = False
        self._generation = 0  # counts changes of certificate or trust
        self._ssl: dict[bool, tuple[int, ssl.SSLContext]] = {}

    @property
    def cert_der(self) -> bytes:
        return load_certificate(self.cert_pem).public_bytes(Encoding.DER)

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.key_pem, self.cert_pem)], root_certificates=self.trust)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(), self._fetch, require_client_authentication=True)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if not self._changed:
                return None
            self._changed = False
            return self._configuration()

    def client_credentials(self) -> grpc.ChannelCredentials:
        with self._lock:
            return grpc.ssl_channel_credentials(root_certificates=self.trust,
                                                private_key=self.key_pem,
                                                certificate_chain=self.cert_pem)

    def ssl_server_context(self) -> ssl.SSLContext:
        """The Raft link's server side (raftlink.py) as of now: this node's certificate,
        a client certificate required and chained to a trusted member CA."""
        return self._ssl_context(server_side=True)

    def ssl_client_context(self) -> ssl.SSLContext:
        """The Raft link's dialling side as of now: this node's certificate, the
        server's chained to a trusted member CA and naming the host dialled."""
        return self._ssl_context(server_side=False)

    def _ssl_context(self, server_side: bool) -> ssl.SSLContext:
        with self._lock:
            cached = self._ssl.get(server_side)
            if cached is not None and cached[0] == self._generation:
                return cached[1]
            generation, trust = self._generation, self.trust
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side
                                 else ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.check_hostname = not server_side
            ctx.load_verify_locations(cadata=trust.decode())
            # the files hold what cert_pem and key_pem hold (switch_to replaces both)
            ctx.load_cert_chain(self._cert_path, self._key_path)
            self._ssl[server_side] = (generation, ctx)
            return ctx

    def set_members(self, members: Iterable[identity_pb2.Member]) -> bool:
        """Trust exactly these members' CAs; True if that changed anything."""
        if self._fixed_trust:
            return False
        trust = trust_pem(members)
        with self._lock:
            if trust == self.trust:
                return False
            self.trust, self._changed = trust, True
            self._generation += 1
        return True

    def switch_to(self, cert_der: bytes) -> bool:
        """Serve and dial with the prepared next certificate, which must be `cert_der`;
        it replaces the current files. False if no such certificate is prepared."""
        if cert_der == self.cert_der:
            return False
        next_cert, next_key = next_paths(self._cert_path, self._key_path)
        try:
            cert_pem, key_pem = next_cert.read_bytes(), next_key.read_bytes()
            if load_certificate(cert_pem).public_bytes(Encoding.DER) != cert_der:
                raise ExchangeError(f"{next_cert} is not the certificate on the ledger")
        except (OSError, ExchangeError, ValueError) as exc:
            log.error("the ledger names a new node certificate this node does not hold; "
                      "peers will refuse the current one", error=str(exc))
            return False
        os.replace(next_key, self._key_path)
        os.replace(next_cert, self._cert_path)
        with self._lock:
            self.cert_pem, self.key_pem, self._changed = cert_pem, key_pem, True
            self._generation += 1
        log.info("node certificate switched to the one on the ledger")
        return True
