"""The client side of a node's public API (`exchange.v1.Exchange`), for the CLI and tools.

An `ExchangeClient` speaks to one node over mutual TLS as one analyst (or automation):
the client certificate and key named by a profile, the node checked against the
agency's own CA. Calls are synchronous (the CLI has nothing else to do meanwhile),
each unary call has a deadline, and every gRPC failure is mapped here, once, to a
domain error carrying the server's message.

A `Signer` signs transaction bodies as the profile's analyst, for this chain.

Over 600 lines on purpose: one class, ExchangeClient, with one method per call of the
public API and the one place that maps gRPC failures to domain errors; query building
(crossquery.py), four eyes (cosign.py) and load generation (loadgen.py) already live
beside it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from exchange.errors import (
    BY_CODE,
    RETRY_AFTER_KEY,
    AlreadyExists,
    CredentialInvalid,
    ExchangeError,
    MalformedInput,
    NodeError,
    NodeTimeout,
    NodeUnavailable,
    NotFound,
    RateLimited,
    WrongChain,
)
from exchange.identity.config import (
    Profile,
    load_node_config,
    load_profile,
    read_signed_genesis,
)
from exchange.identity.genesis import parse_credential, verify_genesis
from exchange.identity.keys import CachedSigner, Domain, is_valid, read_signing_key, verify
from exchange.identity.registry import KeyRegistry
from exchange.ledger.block import (
    block_hash,
    new_body,
    parse_header,
    seal_envelope,
    tx_id,
)
from exchange.ledger.judge import signed_by_its_node
from exchange.ledger.merkle import verify_inclusion
from exchange.v1 import identity_pb2, ledger_pb2, node_pb2, node_pb2_grpc

PROFILE_ENV = "EXCHANGE_PROFILE"
DEFAULT_PROFILE = Path("deploy/local/tax/profile.toml")
GENESIS_FILE = "genesis.pb"
NODE_CONFIG_FILE = "node.toml"
DEADLINE_S_DEFAULT = 10.0
# A block is at most the genesis block_bytes_max (4 MiB by default, 1 GiB at most); a
# node never sends more than that in one message.
MESSAGE_BYTES_MAX = 256 << 20
BATCH_ENVELOPES_MAX = 10_000
RETRY_BACKOFF_S_MIN = 0.1
RETRY_BACKOFF_S_MAX = 1.0
TX_ID_BYTES = 32

T = TypeVar("T")


# gRPC's own words for a connection that never carried a call.
_TRANSPORT_MARKERS = ("failed to connect", "connection refused", "connect failed",
                      "socket closed", "handshake", "dns resolution", "name resolution",
                      "connection reset", "no route to host", "connections to all backends",
                      "unreachable")


def map_rpc_error(exc: grpc.RpcError, address: str,
                  deadline_s: float | None = None) -> ExchangeError:
    """The domain error for a failed call to the node at `address`.

    The node words its reasons "CODE: message" with a domain error code; such a code
    picks the error class, otherwise the gRPC status code does.
    """
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or ""
    details = " ".join(str(details).split())  # one line, always
    prefix, sep, rest = details.partition(":")
    domain = BY_CODE.get(prefix.strip()) if sep and prefix.isupper() else None
    reason = rest.strip() if domain is not None else details
    if code == grpc.StatusCode.UNAVAILABLE:
        lowered = details.lower()
        if domain is None and (not details or any(m in lowered for m in _TRANSPORT_MARKERS)):
            hint = f" ({details})" if details else ""
            return NodeUnavailable(f"node at {address} is not reachable{hint}")
        return NodeUnavailable(f"node at {address} is unavailable: {reason}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {deadline_s:g} s" if deadline_s is not None else ""
        return NodeTimeout(f"node at {address} did not answer{within}")
    if code == grpc.StatusCode.CANCELLED:
        return NodeError(f"call to node at {address} was cancelled")
    by_status: dict[Any, type[ExchangeError]] = {
        grpc.StatusCode.INVALID_ARGUMENT: MalformedInput,
        grpc.StatusCode.OUT_OF_RANGE: MalformedInput,
        grpc.StatusCode.UNAUTHENTICATED: CredentialInvalid,
        grpc.StatusCode.PERMISSION_DENIED: CredentialInvalid,
        grpc.StatusCode.NOT_FOUND: NotFound,
        grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    }
    if domain is RateLimited:
        return RateLimited(f"node at {address} refused: RATE_LIMITED: {reason}",
                           _retry_after_ms(exc))
    cls = domain if domain is not None else by_status.get(code, NodeError)
    name = code.name if code is not None else "UNKNOWN"
    if cls is NodeError and domain is None:
        return NodeError(f"node at {address} failed: {name}: {reason or name}")
    if issubclass(cls, NotFound):
        return cls(f"node at {address}: {reason or 'not found'}")
    return cls(f"node at {address} refused: {reason or name}")


def _retry_after_ms(exc: grpc.RpcError) -> int:
    """The retry-after a RATE_LIMITED refusal carries in its trailing metadata."""
    trailing = exc.trailing_metadata() if callable(
        getattr(exc, "trailing_metadata", None)) else None
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return 0
    return 0


# -- profiles ---------------------------------------------------------------------------

def resolve_profile_path(option: str | os.PathLike[str] | None,
                         environ: Mapping[str, str] | None = None,
                         cwd: Path | None = None) -> Path:
    """Which profile to use: `--profile`, else $EXCHANGE_PROFILE, else the local
    network's tax analyst (deploy/local/tax/profile.toml) when it exists."""
    env = os.environ if environ is None else environ
    base = Path.cwd() if cwd is None else cwd
    if option is not None and str(option):
        return _absolute(Path(option), base)
    from_env = env.get(PROFILE_ENV, "")
    if from_env:
        return _absolute(Path(from_env), base)
    default = base / DEFAULT_PROFILE
    if default.is_file():
        return default
    raise MalformedInput(
        f"no profile: pass --profile PATH or set {PROFILE_ENV} "
        f"({DEFAULT_PROFILE} does not exist here; `exchange init` writes one)")


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else base / path


def load_client_profile(path: Path) -> Profile:
    """The profile at `path`, with the files it names checked to exist."""
    profile = load_profile(path)
    for key, file in (("tls_cert", profile.tls_cert), ("tls_key", profile.tls_key),
                      ("ca_bundle", profile.ca_bundle)):
        if not file.is_file():
            raise MalformedInput(f"{path}: key '{key}': no such file {file}")
    return profile


def find_genesis(profile_path: Path) -> Path | None:
    """The genesis the profile's network was made with, as `exchange init` lays it out:
    the genesis of the node config beside the profile, else ../genesis.pb (or
    ../../genesis.pb for the per-subject profiles under analysts/)."""
    folder = profile_path.absolute().parent
    for candidate in (folder / NODE_CONFIG_FILE, folder.parent / NODE_CONFIG_FILE):
        if candidate.is_file():
            try:
                genesis = load_node_config(candidate).paths.genesis
            except MalformedInput:
                continue
            if genesis.is_file():
                return genesis
    for candidate in (folder.parent / GENESIS_FILE, folder.parent.parent / GENESIS_FILE):
        if candidate.is_file():
            return candidate
    return None


def load_genesis(profile_path: Path, explicit: Path | None = None
                 ) -> tuple[Path, identity_pb2.SignedGenesis, identity_pb2.Genesis]:
    """The verified genesis for a profile (or the explicit file); MalformedInput naming
    where it looked when there is none."""
    path = explicit if explicit is not None else find_genesis(profile_path)
    if path is None:
        folder = profile_path.absolute().parent
        raise MalformedInput(
            f"no genesis found for profile {profile_path}: looked for {NODE_CONFIG_FILE} "
            f"and {GENESIS_FILE} in {folder} and its parents; pass --genesis PATH")
    if not path.is_file():
        raise MalformedInput(f"genesis {path}: no such file")
    signed = read_signed_genesis(path)
    return path, signed, verify_genesis(signed)


# -- the client -------------------------------------------------------------------------

class ExchangeClient:
    """Synchronous calls to one node's `exchange.v1.Exchange` service over mutual TLS."""

    def __init__(self, profile: Profile, *, deadline_s: float = DEADLINE_S_DEFAULT,
                 retry_unavailable_s: float = 0.0) -> None:
        assert deadline_s > 0 and retry_unavailable_s >= 0
        self.profile = profile
        self.address = profile.node
        self.deadline_s = deadline_s
        self.retry_unavailable_s = retry_unavailable_s
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(profile, "ca_bundle", profile.ca_bundle),
            private_key=_read(profile, "tls_key", profile.tls_key),
            certificate_chain=_read(profile, "tls_cert", profile.tls_cert))
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MESSAGE_BYTES_MAX),
            ("grpc.max_send_message_length", MESSAGE_BYTES_MAX),
        ]
        if profile.server_name:
            options.append(("grpc.ssl_target_name_override", profile.server_name))
        self._channel = grpc.secure_channel(profile.node, credentials, options=options)
        stub_factory: Callable[[grpc.Channel], Any] = node_pb2_grpc.ExchangeStub
        self._stub = stub_factory(self._channel)

    @classmethod
    def from_profile_path(cls, path: Path, **kwargs: Any) -> ExchangeClient:
        return cls(load_client_profile(path), **kwargs)

    @property
    def channel(self) -> grpc.Channel:
        """The mutual-TLS channel, for the node's other services (FourEyes)."""
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ExchangeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- calls ------------------------------------------------------------------------
    def _unary(self, method: Callable[..., T], request: object,
               deadline_s: float | None = None) -> T:
        """Call with a deadline; retry UNAVAILABLE for up to retry_unavailable_s (every
        call here is idempotent: a resubmitted envelope returns its original outcome)."""
        timeout = self.deadline_s if deadline_s is None else deadline_s
        give_up = time.monotonic() + self.retry_unavailable_s
        backoff = RETRY_BACKOFF_S_MIN
        while True:
            try:
                return method(request, timeout=timeout)
            except grpc.RpcError as exc:
                if (exc.code() == grpc.StatusCode.UNAVAILABLE
                        and time.monotonic() + backoff < give_up):
                    time.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_BACKOFF_S_MAX)
                    continue
                raise map_rpc_error(exc, self.address, timeout) from None

    def submit(self, envelope: bytes, wait: bool = True,
               deadline_s: float | None = None) -> node_pb2.SubmitResponse:
        """Submit one serialized Envelope; with `wait`, return once its block commits."""
        return cast(node_pb2.SubmitResponse, self._unary(
            self._stub.Submit, node_pb2.SubmitRequest(envelope=envelope, no_wait=not wait),
            deadline_s))

    def submit_batch(self, envelopes: Sequence[bytes], wait: bool = True,
                     deadline_s: float | None = None) -> list[node_pb2.SubmitResponse]:
        """Submit many envelopes at once; one response per envelope, in order (a refused
        one carries error_code and error)."""
        if len(envelopes) > BATCH_ENVELOPES_MAX:
            raise MalformedInput(f"a batch holds at most {BATCH_ENVELOPES_MAX} envelopes")
        response = self._unary(self._stub.SubmitBatch,
                               node_pb2.SubmitBatchRequest(envelopes=list(envelopes),
                                                           no_wait=not wait), deadline_s)
        results = list(response.results)
        if len(results) != len(envelopes):
            raise NodeError(f"node at {self.address} answered {len(results)} results for "
                            f"{len(envelopes)} envelopes")
        return results

    def get_transaction(self, tx_id: bytes) -> node_pb2.TransactionInfo:
        if len(tx_id) != TX_ID_BYTES:
            raise MalformedInput(f"a transaction id is {TX_ID_BYTES} bytes, got {len(tx_id)}")
        return cast(node_pb2.TransactionInfo, self._unary(
            self._stub.GetTransaction, node_pb2.GetTransactionRequest(tx_id=tx_id)))

    def get_block(self, height: int) -> ledger_pb2.Block:
        """The block at `height`; 0 is the tip."""
        if height < 0:
            raise MalformedInput(f"height must not be negative, got {height}")
        return cast(ledger_pb2.Block, self._unary(
            self._stub.GetBlock, node_pb2.GetBlockRequest(height=height)))

    def status(self) -> node_pb2.NodeStatus:
        return cast(node_pb2.NodeStatus,
                    self._unary(self._stub.Status, node_pb2.StatusRequest()))

    def list_catalog(self, agency: str = "") -> node_pb2.Catalog:
        return cast(node_pb2.Catalog, self._unary(
            self._stub.ListCatalog, node_pb2.ListCatalogRequest(agency=agency)))

    def list_policies(self, owner: str = "", dataset: str = "") -> node_pb2.PolicyList:
        return cast(node_pb2.PolicyList, self._unary(
            self._stub.ListPolicies,
            node_pb2.ListPoliciesRequest(owner_agency=owner, dataset=dataset)))

    def get_answer(self, query_tx_id: bytes, wait_ms: int = 0) -> node_pb2.AnswerView:
        """A query's status and, for the requesting agency, its rows (opened by the node);
        waits up to `wait_ms` for the answer or refusal to commit. Read streamed, so an
        answer of any number of chunks arrives (held here whole: a caller that must not
        hold it uses stream_answer)."""
        parts = self.stream_answer(query_tx_id, wait_ms)
        head = next(parts)
        view = node_pb2.AnswerView(query=head.query, commitment=head.commitment)
        for part in parts:
            view.chunks.append(part.chunk)
        return view

    def stream_answer(self, query_tx_id: bytes, wait_ms: int = 0
                      ) -> Iterator[node_pb2.AnswerPart]:
        """The answer as the node streams it: the query's view and the manifest's
        commitment first, then one opened chunk a message. UNAVAILABLE before the first
        message is retried like a unary call; a stream broken later raises."""
        if len(query_tx_id) != TX_ID_BYTES:
            raise MalformedInput(f"a query id is {TX_ID_BYTES} bytes, got {len(query_tx_id)}")
        request = node_pb2.GetAnswerRequest(query_tx_id=query_tx_id, wait_ms=wait_ms)
        return self._stream(self._stub.StreamAnswer, request,
                            max(self.deadline_s, wait_ms / 1000 + 5.0))

    def _stream(self, method: Callable[..., Any], request: object,
                first_timeout_s: float) -> Iterator[Any]:
        """A server stream whose messages each come within the call's deadline
        (`first_timeout_s` for the first). UNAVAILABLE before the first message is
        retried like a unary call; a stream broken later raises. An empty stream gives
        an empty iterator."""
        give_up = time.monotonic() + self.retry_unavailable_s
        backoff = RETRY_BACKOFF_S_MIN
        while True:
            call = method(request, timeout=None)  # deadlines per message, below
            try:
                first = _next_within(call, first_timeout_s)
                break
            except StopIteration:
                call.cancel()
                return iter(())
            except grpc.RpcError as exc:
                call.cancel()
                if (exc.code() == grpc.StatusCode.UNAVAILABLE
                        and time.monotonic() + backoff < give_up):
                    time.sleep(backoff)
                    backoff = min(backoff * 2, RETRY_BACKOFF_S_MAX)
                    continue
                raise map_rpc_error(exc, self.address, first_timeout_s) from None
        return self._rest_of(call, first)

    def _rest_of(self, call: Any, first: Any) -> Iterator[Any]:
        try:
            yield first
            while True:
                try:
                    yield _next_within(call, self.deadline_s)
                except StopIteration:
                    return
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address, self.deadline_s) from None
        finally:
            call.cancel()

    def audit(self, request: node_pb2.AuditRequest) -> node_pb2.AuditReply:
        return cast(node_pb2.AuditReply, self._unary(self._stub.Audit, request))

    def case_statements(self, case_id: str, height: int = 0) -> node_pb2.CaseStatementSet:
        return cast(node_pb2.CaseStatementSet, self._unary(
            self._stub.CaseStatements,
            node_pb2.CaseStatementsRequest(case_id=case_id, height=height),
            max(self.deadline_s, 15.0)))

    def list_cases(self, case_id: str = "") -> node_pb2.CaseList:
        return cast(node_pb2.CaseList, self._unary(
            self._stub.ListCases, node_pb2.ListCasesRequest(case_id=case_id)))

    def list_rules(self, owner: str = "") -> node_pb2.RuleList:
        return cast(node_pb2.RuleList, self._unary(
            self._stub.ListRules, node_pb2.ListRulesRequest(owner_agency=owner)))

    def find_transactions(self, prefix_hex: str, limit: int = 10) -> node_pb2.TransactionIdList:
        """The ids that begin with a hex prefix (exchange.ids.resolve_tx_id uses it)."""
        return cast(node_pb2.TransactionIdList, self._unary(
            self._stub.FindTransactions,
            node_pb2.FindTransactionsRequest(tx_id_prefix_hex=prefix_hex, limit=limit)))

    def list_credentials(self, agency: str = "") -> node_pb2.CredentialList:
        return cast(node_pb2.CredentialList, self._unary(
            self._stub.ListCredentials, node_pb2.ListCredentialsRequest(agency=agency)))

    def list_playbooks(self, owner: str = "", with_steps: bool = False,
                       digest: bytes = b"") -> node_pb2.PlaybookList:
        return cast(node_pb2.PlaybookList, self._unary(
            self._stub.ListPlaybooks, node_pb2.ListPlaybooksRequest(
                owner_agency=owner, with_steps=with_steps, digest=digest)))

    def list_findings(self, request: node_pb2.ListFindingsRequest) -> node_pb2.FindingsList:
        """Every run matching `request`, read streamed (one run, or a slice of a large
        run, a message) and put together here; the height is the node's when it began."""
        height = self.status().height
        listing = node_pb2.FindingsList(height=height)
        listing.runs.extend(merge_run_parts(self.stream_findings(request)))
        return listing

    def stream_findings(self, request: node_pb2.ListFindingsRequest
                        ) -> Iterator[node_pb2.FindingsRun]:
        """The node's findings runs one message at a time (StreamFindings)."""
        return self._stream(self._stub.StreamFindings, request, self.deadline_s)

    def follow_blocks(self, from_height: int = 0) -> Iterator[ledger_pb2.Block]:
        """Blocks as the node applies them, from `from_height` on (0: the next one). No
        deadline; closing the iterator cancels the stream."""
        if from_height < 0:
            raise MalformedInput(f"height must not be negative, got {from_height}")
        call = self._stub.FollowBlocks(node_pb2.FollowBlocksRequest(from_height=from_height))
        try:
            yield from call
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, self.address) from None
        finally:
            call.cancel()


def merge_run_parts(parts: Iterable[node_pb2.FindingsRun]) -> list[node_pb2.FindingsRun]:
    """StreamFindings' messages put together into whole runs, in the order they came.
    NodeError for a slice that does not continue its run where the last one ended."""
    runs: dict[bytes, node_pb2.FindingsRun] = {}
    for part in parts:
        run = runs.get(bytes(part.tx_id))
        if run is None:
            if part.first_finding != 0:
                raise NodeError(f"findings of run {bytes(part.tx_id).hex()} began at "
                                f"{part.first_finding}, not 0")
            run = runs[bytes(part.tx_id)] = node_pb2.FindingsRun()
            run.CopyFrom(part)
            continue
        if part.first_finding != len(run.findings):
            raise NodeError(f"findings of run {bytes(part.tx_id).hex()} came out of order")
        run.findings.extend(part.findings)
        run.lines.extend(part.lines)
        run.line_index.extend(part.line_index)
    return list(runs.values())


def _next_within(call: Any, timeout_s: float) -> Any:
    """The stream's next message, or DEADLINE_EXCEEDED after `timeout_s` without one
    (the stream is cancelled; StopIteration at its end)."""
    timer = threading.Timer(timeout_s, call.cancel)
    timer.start()
    try:
        return next(call)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.CANCELLED and not timer.is_alive():
            raise _DeadlineError(timeout_s) from None
        raise
    finally:
        timer.cancel()


class _DeadlineError(grpc.RpcError):  # type: ignore[misc]
    """A stream that sent nothing for too long, as the deadline error it stands for."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"no message in {timeout_s:.0f} s")
        self._timeout_s = timeout_s

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return f"no message from the stream in {self._timeout_s:.0f} s"


def _read(profile: Profile, key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise MalformedInput(f"profile {profile.agency}/{profile.subject}: cannot read "
                             f"{key} {path}: {exc.strerror}") from exc


# -- signing ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Signer:
    """The profile's analyst key, signing bodies for one chain."""

    agency: str
    subject: str
    chain_id: str
    key: CachedSigner

    @classmethod
    def load(cls, profile: Profile, chain_id: str) -> Signer:
        """Read the analyst key (with the profile's passphrase) and check that the
        profile's credential certifies it, for this agency and this chain."""
        try:
            key = CachedSigner(read_signing_key(profile.signing_key, profile.passphrase()))
        except OSError as exc:
            raise MalformedInput(f"profile {profile.agency}/{profile.subject}: cannot read "
                                 f"signing_key {profile.signing_key}: {exc.strerror}") from exc
        if profile.credential.is_file():
            signed = identity_pb2.SignedCredential()
            try:
                signed.ParseFromString(profile.credential.read_bytes())
            except DecodeError as exc:
                raise MalformedInput(f"{profile.credential}: not a credential: {exc}") from exc
            credential = parse_credential(signed)
            if bytes(credential.public_key) != key.public_key:
                raise CredentialInvalid(
                    f"{profile.credential} certifies another key than {profile.signing_key}")
            if credential.agency != profile.agency:
                raise CredentialInvalid(f"{profile.credential} is {credential.agency}'s, "
                                        f"the profile is {profile.agency}'s")
            if credential.chain_id != chain_id:
                raise WrongChain(f"{profile.credential} is for chain {credential.chain_id!r}, "
                                 f"the node serves {chain_id!r}")
        return cls(profile.agency, profile.subject, chain_id, key)

    def make_envelope(self, kind_setter: Callable[[ledger_pb2.TxBody], None],
                      now_ms: int | None = None) -> bytes:
        """A signed, serialized Envelope: a body with chain id, agency, creation time and a
        fresh nonce, its kind filled in by `kind_setter`."""
        created = time.time_ns() // 1_000_000 if now_ms is None else now_ms
        body = new_body(self.chain_id, self.agency, created)
        kind_setter(body)
        if body.WhichOneof("kind") is None:
            raise MalformedInput("the transaction body has no kind")
        return seal_envelope(body, self.key)


def chain_id_for(profile_path: Path, client: ExchangeClient | None = None) -> str:
    """The chain id: from the genesis the profile's network was made with, else from the
    node's status."""
    genesis_path = find_genesis(profile_path)
    if genesis_path is not None:
        return verify_genesis(read_signed_genesis(genesis_path)).chain_id
    if client is None:
        raise MalformedInput(f"no genesis found for profile {profile_path} and no node to ask")
    return client.status().chain_id


# -- checking what a node sends -----------------------------------------------------------

@dataclass
class TxCheck:
    """What a local check of a node's TransactionInfo found. `None` for a check that
    could not be made (no genesis to take keys from, no attestation yet)."""

    tx_id: bytes
    envelope: ledger_pb2.Envelope
    body: ledger_pb2.TxBody
    header: ledger_pb2.BlockHeader
    block_hash: bytes
    signer: str
    inclusion: bool
    result: bool | None
    proposer_signature: bool | None
    envelope_signature: bool | None
    attested_by: list[str]
    attestation_signatures: bool
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def signer_name(registry: KeyRegistry | None, kid: bytes) -> str:
    """agency/subject of a key the registry knows, else the key id's first bytes."""
    if registry is not None:
        try:
            info = registry.resolve(kid)
        except ExchangeError:
            pass
        else:
            return f"{info.agency}/{info.subject}"
    return f"key {bytes(kid).hex()[:16]}"


def attestation_valid(registry: KeyRegistry, att: ledger_pb2.Attestation) -> bool:
    """Whether `att` is signed by its agency's node key (as genesis names it)."""
    return signed_by_its_node(registry, att)


def check_transaction(info: node_pb2.TransactionInfo, requested: bytes,
                      registry: KeyRegistry | None) -> TxCheck:
    """Check a node's answer locally: the tx id is the hash of the body asked for, the
    envelope is in the header's tx_root at its index, its result code is in the
    results_root the attestations sign, and (with a registry from genesis) the proposer,
    envelope and attestation signatures."""
    problems: list[str] = []
    envelope = ledger_pb2.Envelope()
    body = ledger_pb2.TxBody()
    try:
        envelope.ParseFromString(info.envelope)
        body.ParseFromString(envelope.body)
    except DecodeError as exc:
        raise MalformedInput(f"the node sent an envelope that does not parse: {exc}") from exc
    header = parse_header(info.header, info.height)
    hash_ = block_hash(info.header)
    if tx_id(envelope.body) != requested or bytes(info.tx_id) != requested:
        problems.append("the envelope sent is not the transaction asked for")
    if header.height != info.height:
        problems.append(f"header is for height {header.height}, not {info.height}")
    if registry is not None and header.chain_id != registry.chain_id:
        problems.append(f"block is for chain {header.chain_id!r}, genesis is "
                        f"{registry.chain_id!r}")
    size, index = header.tx_count, info.index
    inclusion = verify_inclusion(bytes(info.envelope), index, size,
                                 [bytes(p) for p in info.inclusion_proof], bytes(header.tx_root))
    if not inclusion:
        problems.append("inclusion proof does not match the header's tx_root")

    proposer_ok: bool | None = None
    envelope_ok: bool | None = None
    if registry is not None:
        proposer_ok, envelope_ok = _signatures_check(info, header, envelope, body, registry,
                                                     problems)
    result_ok, attested = _attested_result(info, header, hash_, registry, problems)
    return TxCheck(
        tx_id=requested, envelope=envelope, body=body, header=header, block_hash=hash_,
        signer=signer_name(registry, bytes(envelope.signer_key_id)), inclusion=inclusion,
        result=result_ok, proposer_signature=proposer_ok, envelope_signature=envelope_ok,
        attested_by=sorted(attested), attestation_signatures=registry is not None,
        problems=problems)


def _signatures_check(info: node_pb2.TransactionInfo, header: ledger_pb2.BlockHeader,
                      envelope: ledger_pb2.Envelope, body: ledger_pb2.TxBody,
                      registry: KeyRegistry, problems: list[str]
                      ) -> tuple[bool, bool | None]:
    """Whether the proposer's and the envelope's signatures verify (the envelope's None
    when its signer is not in genesis); each failure added to `problems`."""
    try:
        node = registry.node_key_at(header.proposer, bytes(header.proposer_key_id),
                                    header.height)
        verify(node.public_key, Domain.BLOCK, header.chain_id, bytes(info.header),
               bytes(info.proposer_signature))
        proposer_ok = True
    except ExchangeError:
        proposer_ok = False
    if not proposer_ok:
        problems.append(f"proposer signature of {header.proposer!r} does not verify")
    try:
        key = registry.resolve(bytes(envelope.signer_key_id))
    except ExchangeError:
        return proposer_ok, None  # a credential issued after genesis: not known here
    envelope_ok = is_valid(key.public_key, Domain.ENVELOPE, body.chain_id,
                           bytes(envelope.body), bytes(envelope.signature))
    if not envelope_ok:
        problems.append("envelope signature does not verify")
    return proposer_ok, envelope_ok


def _attested_result(info: node_pb2.TransactionInfo, header: ledger_pb2.BlockHeader,
                     hash_: bytes, registry: KeyRegistry | None, problems: list[str]
                     ) -> tuple[bool | None, set[str]]:
    """Whether the result code is in a results root that an attestation of this block
    signs (None when no attestation is for this block), and the agencies whose
    attestations show it; each failure added to `problems`."""
    leaf = info.result.encode()
    proof = [bytes(p) for p in info.result_proof]
    attested: set[str] = set()
    any_for_block = False
    for att in info.attestations:
        if att.height != header.height or bytes(att.block_hash) != hash_:
            continue
        if registry is not None and not attestation_valid(registry, att):
            problems.append(f"attestation of {att.agency!r} does not verify")
            continue
        any_for_block = True
        if verify_inclusion(leaf, info.index, header.tx_count, proof,
                            bytes(att.results_root)):
            attested.add(att.agency)
    if not any_for_block:
        return None, attested
    if not attested:
        problems.append(f"result {info.result!r} is not in any attested results root")
    return bool(attested), attested
