"""The credentials as the node's key registry holds them (ListCredentials): what
`exchange credential list` shows, with revocations and credentials issued after genesis."""

from __future__ import annotations

from exchange.identity.registry import KeyRegistry
from exchange.v1 import node_pb2


def list_credentials(registry: KeyRegistry, agency: str, height: int) -> node_pb2.CredentialList:
    """Every credential (of `agency`, or all), ordered by agency, subject and key id."""
    chosen = sorted((k for k in registry.credentials() if agency in ("", k.agency)),
                    key=lambda k: (k.agency, k.subject, k.key_id))
    return node_pb2.CredentialList(height=height, credentials=[
        node_pb2.CredentialView(
            key_id=k.key_id, agency=k.agency, subject=k.subject, roles=list(k.roles),
            not_before_ms=k.not_before_ms, not_after_ms=k.not_after_ms,
            revoked_at_height=k.revoked_at_height or 0,
            valid_from_height=k.valid_from_height)
        for k in chosen])
