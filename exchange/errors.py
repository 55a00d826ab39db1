"""The project's domain errors, raised in the core and mapped once at the edges
(gRPC status codes in the node, one readable line and an exit code in the CLI)."""

from __future__ import annotations


class ExchangeError(Exception):
    """Base of every error the system raises on purpose."""

    code = "ERROR"


class MalformedInput(ExchangeError):
    """Bytes or files that do not parse as what they claim to be."""

    code = "MALFORMED"


class InvalidSignature(ExchangeError):
    """A signature that does not verify under the key it names."""

    code = "BAD_SIGNATURE"


class UnknownSigner(ExchangeError):
    """A key id that no member, credential or rotation on the ledger defines."""

    code = "UNKNOWN_SIGNER"


class CredentialInvalid(ExchangeError):
    """A signer whose credential is revoked, expired or lacks a needed role."""

    code = "CREDENTIAL_INVALID"


class WrongChain(ExchangeError):
    """A body or block that names another chain."""

    code = "WRONG_CHAIN"


class ChainBroken(ExchangeError):
    """A block that does not extend the chain it claims to extend."""

    code = "CHAIN_BROKEN"


class ProofInvalid(ExchangeError):
    """A Merkle proof, commitment or attestation quorum that does not check."""

    code = "PROOF_INVALID"


class StoreCorrupted(ExchangeError):
    """Stored bytes that no longer match what was written."""

    code = "STORE_CORRUPTED"


class AlreadyExists(ExchangeError):
    """Refusing to overwrite something that is already there."""

    code = "ALREADY_EXISTS"


class TimeOutOfWindow(ExchangeError):
    """A body whose creation time is too far from the admitting node's clock."""

    code = "TIME_OUT_OF_WINDOW"


class Oversize(ExchangeError):
    """A message larger than the network allows."""

    code = "OVERSIZE"


class PermissionDenied(ExchangeError):
    """A caller that is not allowed to do what it asks."""

    code = "PERMISSION_DENIED"


class Unavailable(ExchangeError):
    """The service cannot answer now (no leader, shutting down); retrying may work."""

    code = "UNAVAILABLE"


class AgencyMismatch(CredentialInvalid):
    """A body that claims another agency than its signer's."""

    code = "AGENCY_MISMATCH"


class RateLimited(ExchangeError):
    """A submission over its signer's or agency's admission rate limit; it would pass
    after `retry_after_ms`."""

    code = "RATE_LIMITED"

    def __init__(self, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
