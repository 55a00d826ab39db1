"""The project's domain errors, raised in the core and mapped once at the edges
(gRPC status codes in the node's interceptor, one readable line and an exit code in the
CLI).

Every error that crosses the wire is defined here, under one of four bases that say
what a caller can do about it:

- `BadInput`: the request, file or bytes are wrong; sending them again fails again.
- `NotAllowed`: the caller (its signature, key, credential or role) may not do this.
- `NotAvailable`: the answer is not there now (no leader, a node down or slow, a rate
  limit, not yet written); the same request may succeed later.
- `Conflict`: the request clashes with what is already there.

A node words a refusal "CODE: message"; `BY_CODE` is the one table from such a code
back to its class, used by the node (a leader's refusal of a forwarded transaction) and
by the client (a status's details). A class's `status` names the gRPC status code the
node's server answers it with (a name of `grpc.StatusCode`, so this module needs no
gRPC); subclasses defined elsewhere (a rule file's error, a bundle's) inherit the code
and status of the catalogue class they refine.
"""

from __future__ import annotations

from collections.abc import Mapping

# Trailing metadata of a RATE_LIMITED refusal: milliseconds until it would pass.
RETRY_AFTER_KEY = "exchange-retry-after-ms"


class ExchangeError(Exception):
    """Base of every error the system raises on purpose."""

    code = "ERROR"
    status = "FAILED_PRECONDITION"


# -- the four bases ---------------------------------------------------------------------

class BadInput(ExchangeError):
    """Input that is wrong in itself: malformed, oversize, for another chain, or
    failing a check of its signatures, proofs or links."""

    code = "BAD_INPUT"
    status = "INVALID_ARGUMENT"


class NotAllowed(ExchangeError):
    """A caller or signer that may not do what it asks."""

    code = "NOT_ALLOWED"
    status = "PERMISSION_DENIED"


class NotAvailable(ExchangeError):
    """Something that cannot be had now; the same request may succeed later."""

    code = "NOT_AVAILABLE"
    status = "UNAVAILABLE"


class Conflict(ExchangeError):
    """A request that clashes with what is already there."""

    code = "CONFLICT"
    status = "FAILED_PRECONDITION"


# -- bad input --------------------------------------------------------------------------

class MalformedInput(BadInput):
    """Bytes or files that do not parse as what they claim to be."""

    code = "MALFORMED"


class WrongChain(BadInput):
    """A body or block that names another chain."""

    code = "WRONG_CHAIN"


class TimeOutOfWindow(BadInput):
    """A body whose creation time is too far from the admitting node's clock."""

    code = "TIME_OUT_OF_WINDOW"


class Oversize(BadInput):
    """A message larger than the network allows."""

    code = "OVERSIZE"


class ChainBroken(BadInput):
    """A block that does not extend the chain it claims to extend."""

    code = "CHAIN_BROKEN"
    status = "FAILED_PRECONDITION"


class ProofInvalid(BadInput):
    """A Merkle proof, commitment or attestation quorum that does not check."""

    code = "PROOF_INVALID"
    status = "FAILED_PRECONDITION"


class UnknownId(BadInput):
    """A prefix that no id begins with."""

    code = "UNKNOWN_ID"
    status = "FAILED_PRECONDITION"


class AmbiguousId(BadInput):
    """A prefix that more than one id begins with."""

    code = "AMBIGUOUS_ID"


# -- not allowed ------------------------------------------------------------------------

class InvalidSignature(NotAllowed):
    """A signature that does not verify under the key it names."""

    code = "BAD_SIGNATURE"
    status = "UNAUTHENTICATED"


class UnknownSigner(NotAllowed):
    """A key id that no member, credential or rotation on the ledger defines."""

    code = "UNKNOWN_SIGNER"
    status = "UNAUTHENTICATED"


class CredentialInvalid(NotAllowed):
    """A signer whose credential is revoked, expired or lacks a needed role."""

    code = "CREDENTIAL_INVALID"


class AgencyMismatch(CredentialInvalid):
    """A body that claims another agency than its signer's."""

    code = "AGENCY_MISMATCH"


class PermissionDenied(NotAllowed):
    """A caller that is not allowed to do what it asks."""

    code = "PERMISSION_DENIED"


class NotARecipient(NotAllowed):
    """A sealed payload that has no wrapped key for the data key trying to open it."""

    code = "NOT_A_RECIPIENT"
    status = "FAILED_PRECONDITION"


# -- not available ----------------------------------------------------------------------

class Unavailable(NotAvailable):
    """The service cannot answer now (no leader, shutting down); retrying may work."""

    code = "UNAVAILABLE"


class RateLimited(NotAvailable):
    """A submission over its signer's or agency's admission rate limit; it would pass
    after `retry_after_ms`."""

    code = "RATE_LIMITED"
    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class NotFound(NotAvailable):
    """The node holds no such transaction or block (perhaps not yet)."""

    code = "NOT_FOUND"
    status = "NOT_FOUND"


class StoreCorrupted(NotAvailable):
    """Stored bytes that no longer match what was written."""

    code = "STORE_CORRUPTED"
    status = "FAILED_PRECONDITION"


class NodeUnavailable(NotAvailable):
    """The node cannot be reached, or has no leader to order transactions yet (the
    client's reading of an UNAVAILABLE status)."""

    code = "NODE_UNAVAILABLE"


class NodeTimeout(NotAvailable):
    """The node did not answer within the deadline."""

    code = "DEADLINE_EXCEEDED"
    status = "DEADLINE_EXCEEDED"


# -- conflict ---------------------------------------------------------------------------

class AlreadyExists(Conflict):
    """Refusing to overwrite something that is already there."""

    code = "ALREADY_EXISTS"
    status = "ALREADY_EXISTS"


# -- none of the above ------------------------------------------------------------------

class NodeError(ExchangeError):
    """Any other failure the node reported (a status no domain code or class names)."""

    code = "NODE_ERROR"
    status = "UNKNOWN"


# The one table from a code on the wire to its class. Explicit, so that what a code
# means does not depend on which modules happen to be imported.
CATALOGUE: tuple[type[ExchangeError], ...] = (
    BadInput, MalformedInput, WrongChain, TimeOutOfWindow, Oversize, ChainBroken,
    ProofInvalid, UnknownId, AmbiguousId,
    NotAllowed, InvalidSignature, UnknownSigner, CredentialInvalid, AgencyMismatch,
    PermissionDenied, NotARecipient,
    NotAvailable, Unavailable, RateLimited, NotFound, StoreCorrupted, NodeUnavailable,
    NodeTimeout,
    Conflict, AlreadyExists,
    NodeError,
)
BY_CODE: Mapping[str, type[ExchangeError]] = {cls.code: cls for cls in CATALOGUE}
assert len(BY_CODE) == len(CATALOGUE), "two catalogue classes share a code"


def error_for_code(code: str, message: str, retry_after_ms: int = 0) -> ExchangeError:
    """The domain error that `code` names, saying `message`; an ExchangeError carrying
    the code when the catalogue has no such code (a newer node's), so that it reaches
    the caller as the sender worded it."""
    cls = BY_CODE.get(code)
    if cls is RateLimited:
        return RateLimited(message, retry_after_ms)
    if cls is not None:
        return cls(message)
    error = ExchangeError(message)
    error.code = code
    return error
