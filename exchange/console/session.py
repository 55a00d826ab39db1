"""What one person's console reads and signs, through their own agency's node, with the
profile's mutual-TLS identity and their own key (unlocked once, in this process). The
web layer (`app`) only renders what this returns; every signature is made here."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from exchange.client import (
    ExchangeClient,
    Signer,
    TxCheck,
    check_transaction,
    find_genesis,
    load_genesis,
)
from exchange.client.cosign import FourEyesClient, cosign_view, finalize, unsigned_query_body
from exchange.client.crossquery import CheckedAnswer, QuerySpec, build_query
from exchange.errors import ExchangeError, MalformedInput
from exchange.identity.registry import KeyRegistry
from exchange.ledger.block import parse_header, tx_id
from exchange.ledger.policy import Decision, PolicyBook, QueryFacts
from exchange.ledger.queries import SUPERVISOR_ROLE
from exchange.v1 import cosign_pb2, identity_pb2, ledger_pb2, node_pb2

BLOCKS_SHOWN_MAX = 50
QUERIES_REMEMBERED_MAX = 1_000
ROWS_SHOWN_MAX = 500
CSV_ROWS_MAX = 1_000_000


@dataclass
class Preview:
    """What a query will be, before anything is signed: the owner's policy decision
    without and with a supervisor's co-signature, and the fields that will be signed."""

    spec: QuerySpec
    decision: Decision
    with_cosignature: Decision
    signed_fields: list[tuple[str, str]]

    @property
    def needs_cosignature(self) -> bool:
        return not self.decision.allowed and self.with_cosignature.allowed


HEALTH_SERVICE = "exchange.v1.Exchange"  # the service the node reports SERVING


@dataclass
class Person:
    """The console's person: profile, node, key and what they submitted from here."""

    profile_path: Path
    client: ExchangeClient
    signer: Signer
    genesis: identity_pb2.Genesis
    registry: KeyRegistry | None
    roles: tuple[str, ...]
    sent_bodies: dict[str, bytes] = field(default_factory=dict)  # cosign request -> body
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def agency(self) -> str:
        return self.signer.agency

    @property
    def subject(self) -> str:
        return self.signer.subject

    @property
    def is_supervisor(self) -> bool:
        return SUPERVISOR_ROLE in self.roles

    # -- network ----------------------------------------------------------------------
    def network(self) -> dict[str, Any]:
        status = self.client.status()
        catalog = self.client.list_catalog()
        return {"status": status, "catalog": list(catalog.entries),
                "catalog_height": catalog.height, "serving": self.serving()}

    def serving(self) -> str:
        """What the node's standard health service (grpc.health.v1) says of its public
        API: SERVING, NOT_SERVING (e.g. while it shuts down), SERVICE_UNKNOWN, or
        UNREACHABLE when the check itself fails."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub: Any = health_pb2_grpc.HealthStub(self.client.channel)
        try:
            answer = self.client._unary(  # noqa: SLF001 - the client's deadlines, errors
                stub.Check, health_pb2.HealthCheckRequest(service=HEALTH_SERVICE))
        except ExchangeError:
            return "UNREACHABLE"
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))

    # -- ask --------------------------------------------------------------------------
    def preview(self, spec: QuerySpec) -> Preview:
        """The owner's policy (as the node has it now) evaluated for this person, and the
        clear fields the signature will cover."""
        policies = self.client.list_policies(spec.target, spec.dataset).policies
        book = PolicyBook.from_genesis(policies)
        facts = QueryFacts(
            requester_agency=self.agency, requester_roles=frozenset(self.roles),
            target_agency=spec.target, dataset=spec.dataset, fields=spec.fields,
            case_id=spec.case_id, legal_basis=spec.legal_basis, shape=spec.resolved_shape())
        decision = book.evaluate(facts)
        cosigned = book.evaluate(_cosigned(facts))
        signed = [("chain", self.signer.chain_id), ("agency", self.agency),
                  ("analyst", self.subject), ("target", spec.target),
                  ("dataset", spec.dataset),
                  ("subjects", ", ".join(f"{k}={v}" for k, v in spec.subjects)),
                  ("period", spec.period or ""), ("case", spec.case_id),
                  ("purpose", spec.purpose), ("legal_basis", spec.legal_basis),
                  ("fields", ", ".join(spec.fields)),
                  ("deadline_s", str(spec.deadline_s))]
        return Preview(spec, decision, cosigned, signed)

    def submit_query(self, spec: QuerySpec) -> bytes:
        """Sign and submit the query; its tx id. MalformedInput if judged invalid."""
        members = list(self.client.status().member_entries)
        envelope, qid = build_query(spec, self.signer, self.genesis, (), members=members)
        result = self.client.submit(envelope, wait=True)
        if result.result != "OK":
            raise MalformedInput(f"query {qid.hex()} judged invalid: {result.result}")
        return qid

    def request_cosignature(self, spec: QuerySpec) -> cosign_pb2.CosignRequestView:
        members = list(self.client.status().member_entries)
        body = unsigned_query_body(spec, self.signer, self.genesis, members)
        view = FourEyesClient(self.client).submit(body)
        with self.lock:
            self.sent_bodies[view.request_id] = body
            while len(self.sent_bodies) > QUERIES_REMEMBERED_MAX:
                self.sent_bodies.pop(next(iter(self.sent_bodies)))
        return view

    def query_view(self, qid: bytes) -> node_pb2.QueryView:
        """The query's status, without reading its rows."""
        parts = self.client.stream_answer(qid)
        try:
            return next(parts).query
        finally:
            close = getattr(parts, "close", None)
            if close is not None:
                close()

    def answer_head(self, qid: bytes, rows_max: int
                    ) -> tuple[node_pb2.QueryView, list[dict[str, Any]], int]:
        """The query, its first `rows_max` rows and how many there are: every chunk
        read as it streams and checked against its commitment, the whole against the
        manifest; only the rows shown are kept."""
        checked = CheckedAnswer.of_stream(self.client.stream_answer(qid))
        shown: list[dict[str, Any]] = []
        total = 0
        for plaintext in checked:
            for line in plaintext.splitlines():
                total += 1
                if len(shown) < rows_max:
                    shown.append(json.loads(line, parse_float=Decimal))
        return checked.query, shown, total

    def answer_csv(self, qid: bytes) -> Iterator[str]:
        """The answer as CSV text, a chunk at a time as it streams (a chunk that does not
        match its commitment ends the download with an error, never a silent file)."""
        checked = CheckedAnswer.of_stream(self.client.stream_answer(qid))
        columns: list[str] | None = None
        for plaintext in checked:
            out = io.StringIO()
            writer = csv.writer(out)
            for line in plaintext.splitlines():
                row = json.loads(line)
                if columns is None:
                    columns = list(row)
                    writer.writerow(columns)
                writer.writerow([row.get(c, "") for c in columns])
            yield out.getvalue()
        if columns is None:
            out = io.StringIO()
            csv.writer(out).writerow(list(checked.query.fields))
            yield out.getvalue()

    # -- four eyes --------------------------------------------------------------------
    def cosign_requests(self, mine: bool) -> list[cosign_pb2.CosignRequestView]:
        return FourEyesClient(self.client).listing(mine)

    def cosign_request(self, request_id: str) -> cosign_pb2.CosignRequestView:
        return FourEyesClient(self.client).get(request_id)

    def approve(self, request_id: str) -> cosign_pb2.CosignRequestView:
        """Co-sign in this process; only the co-signature goes to the node."""
        four_eyes = FourEyesClient(self.client)
        view = four_eyes.get(request_id)
        if view.analyst == self.subject:
            raise MalformedInput("four eyes: a person does not co-sign their own query")
        return four_eyes.cosign(request_id, cosign_view(view, self.signer.key))

    def decline(self, request_id: str, reason: str) -> cosign_pb2.CosignRequestView:
        return FourEyesClient(self.client).decline(request_id, reason)

    def sent_this(self, view: cosign_pb2.CosignRequestView) -> bool:
        """Whether this console sent the request, with the body the node still holds."""
        with self.lock:
            return self.sent_bodies.get(view.request_id) == bytes(view.body)

    def complete(self, view: cosign_pb2.CosignRequestView) -> bytes:
        """Sign the co-signed query and submit it (again, harmlessly: signing is
        deterministic and a resubmitted envelope returns its first outcome)."""
        envelope, qid = finalize(view, self.signer, self.sent_bodies.get(view.request_id))
        result = self.client.submit(envelope, wait=True)
        if result.result != "OK":
            raise MalformedInput(f"query {qid.hex()} judged invalid: {result.result}")
        return qid

    # -- findings and cases -----------------------------------------------------------
    def findings(self, rule: str, period: str, severity: str, subject: str
                 ) -> tuple[int, list[dict[str, Any]]]:
        listing = self.client.list_findings(node_pb2.ListFindingsRequest(
            rule_id=rule, period=period, open=True, subject=subject))
        rows: list[dict[str, Any]] = []
        for run in listing.runs:
            opened = {int(i): json.loads(line)
                      for i, line in zip(run.line_index, run.lines, strict=True)}
            for index, f in enumerate(run.findings):
                if severity and f.severity != severity:
                    continue
                if subject and index not in opened:
                    continue
                detail = opened.get(index)
                rows.append({"finding": f.finding_id, "severity": f.severity,
                             "rule": run.rule_id, "period": run.period,
                             "owner": run.owner_agency, "run": bytes(run.tx_id).hex(),
                             "height": run.height, "time_ms": run.time_ms,
                             "subject": detail.get("subject") if detail else None,
                             "amount": detail.get("amount") if detail else None})
        return listing.height, rows

    def open_case(self, finding_id: str, run_hex: str, case_id: str, reason: str) -> int:
        """Open a case with a finding (or add it to the open case); the height."""
        run = bytes.fromhex(run_hex)
        last = ""
        for action in ("open", "add"):
            event = ledger_pb2.CaseEvent(case_id=case_id, action=action, ref_tx_id=run,
                                         finding_id=finding_id, reason=reason)

            def fill(body: ledger_pb2.TxBody, e: ledger_pb2.CaseEvent = event) -> None:
                body.case_event.CopyFrom(e)

            result = self.client.submit(self.signer.make_envelope(fill), wait=True)
            if result.result == "OK":
                return int(result.height)
            last = result.result
        raise MalformedInput(f"case event judged {last} (the case is closed, or "
                             f"{self.agency} neither owns the finding nor gave data to it)")

    def cases(self) -> node_pb2.CaseList:
        return self.client.list_cases()

    def case(self, case_id: str) -> tuple[Any, dict[str, Any]]:
        """The case file (timeline, findings, queries with rows) and its graph."""
        from exchange.cases.graph import build_graph
        from exchange.cases.view import gather

        casefile = gather(self.client, case_id, with_rows=True)
        graph = build_graph([f["subject"] for f in casefile.findings if f.get("subject")],
                            [(q["dataset"], q["rows"]) for q in casefile.queries
                             if q.get("rows")])
        return casefile, graph.as_dict()

    def close_case(self, case_id: str, reason: str) -> int:
        if not reason.strip():
            raise MalformedInput("closing a case gives a reason")
        event = ledger_pb2.CaseEvent(case_id=case_id, action="close", reason=reason)

        def fill(body: ledger_pb2.TxBody) -> None:
            body.case_event.CopyFrom(event)

        result = self.client.submit(self.signer.make_envelope(fill), wait=True)
        if result.result != "OK":
            raise MalformedInput(f"closing case {case_id} judged {result.result} (only the "
                                 "agency that opened an open case closes it)")
        return int(result.height)

    def store_path(self) -> Path | None:
        """The agency node's block store, when the profile sits beside the node's config
        (as `exchange init` lays a network out): case bundles are made from it."""
        from exchange.identity.config import load_node_config

        folder = self.profile_path.absolute().parent
        for candidate in (folder / "node.toml", folder.parent / "node.toml"):
            if candidate.is_file():
                try:
                    return load_node_config(candidate).paths.data_dir / "blocks.db"
                except (ExchangeError, AttributeError):
                    return None
        return None

    def export_case(self, case_id: str) -> bytes:
        """The case's evidence bundle, with a quorum's statements of its completeness,
        verified before it is handed out."""
        from exchange.ledger.case_export import case_tx_ids
        from exchange.ledger.evidence import add_case_statements, build_bundle, encode_bundle
        from exchange.ledger.evidence_verify import verify_bundle
        from exchange.ledger.store import BlockStore

        path = self.store_path()
        if path is None:
            raise MalformedInput("no block store of this agency's node beside the profile: "
                                 "ask the node's operator for the bundle "
                                 "(`exchange evidence export --case`)")
        with BlockStore.open(path) as store:
            through = store.height
            ids = case_tx_ids(store, case_id, False)
            bundle = build_bundle(store, ids, [], through_height=through)
            stated = self.client.case_statements(case_id, len(bundle.headers))
            add_case_statements(bundle, stated.statements)
            data = encode_bundle(bundle)
        verify_bundle(data)
        return bytes(data)

    # -- audit and chain --------------------------------------------------------------
    def audit(self, request: node_pb2.AuditRequest, verify: bool
              ) -> tuple[node_pb2.AuditReply, dict[bytes, str]]:
        reply = self.client.audit(request)
        checks: dict[bytes, str] = {}
        if verify:
            for e in reply.entries:
                if bytes(e.tx_id) in checks:
                    continue
                check = self.check_tx(bytes(e.tx_id))
                quorum = self.registry.quorum if self.registry else 0
                checks[bytes(e.tx_id)] = ("failed: " + "; ".join(check.problems)
                                          if not check.ok else "ok" if
                                          len(check.attested_by) >= quorum else "ok-not-final")
        return reply, checks

    def blocks(self, below: int = 0) -> tuple[int, list[dict[str, Any]]]:
        tip = self.client.status().height
        top = min(below - 1, tip) if below else tip
        out = []
        for height in range(top, max(0, top - BLOCKS_SHOWN_MAX), -1):
            block = self.client.get_block(height)
            header = parse_header(block.header, height)
            out.append({"height": height, "time_ms": header.timestamp_ms,
                        "proposer": header.proposer, "txs": len(block.envelopes),
                        "attestations": len({a.agency for a in block.attestations})})
        return tip, out

    def block(self, height: int) -> dict[str, Any]:
        block = self.client.get_block(height)
        header = parse_header(block.header, height)
        txs = []
        for raw in block.envelopes:
            env = ledger_pb2.Envelope.FromString(raw)
            body = ledger_pb2.TxBody.FromString(env.body)
            txs.append({"tx": tx_id(env.body).hex(), "kind": body.WhichOneof("kind") or "",
                        "agency": body.agency})
        return {"height": height, "header": header, "txs": txs,
                "attestations": sorted({a.agency for a in block.attestations})}

    def check_tx(self, txid: bytes) -> TxCheck:
        """The transaction checked here as `exchange tx show` checks it."""
        info = self.client.get_transaction(txid)
        return check_transaction(info, txid, self.registry)

    # -- live -------------------------------------------------------------------------
    def events(self, stop: threading.Event) -> Iterator[dict[str, Any]]:
        """Findings, case events and case steps as they commit, from the next block."""
        from exchange.cases.client_events import RELEVANT, ClientEventSource, relevant
        from exchange.cases.events import block_events
        from exchange.ledger.block import RESULT_OK, results_root

        source = ClientEventSource(self.client)
        for block in self.client.follow_blocks(0):
            if stop.is_set():
                return
            header = parse_header(block.header)
            count = len(block.envelopes)
            all_ok = any(bytes(a.results_root) == results_root([RESULT_OK] * count)
                         for a in block.attestations)
            transactions: list[tuple[bytes, ledger_pb2.TxBody, str]] = []
            for index, raw in enumerate(block.envelopes):
                env = ledger_pb2.Envelope.FromString(raw)
                body = ledger_pb2.TxBody.FromString(env.body)
                kind = body.WhichOneof("kind")
                if kind not in RELEVANT or not relevant(kind, body, source):
                    continue
                txid = tx_id(env.body)
                if kind == "query":
                    source.remember(txid, body)
                code = RESULT_OK
                if not all_ok:
                    info = self.client.get_transaction(txid)
                    code = info.result if (info.height, info.index) == (header.height, index) \
                        else "DUPLICATE_TX"
                transactions.append((txid, body, code))
            for event in block_events(header.height, header.timestamp_ms, transactions,
                                      source):
                yield event.as_dict()


def _cosigned(facts: QueryFacts) -> QueryFacts:
    from dataclasses import replace

    return replace(facts, supervisor_cosigned=True)


def connect_person(profile_path: Path, passphrase: bytes | None) -> Person:
    """The console's person: the profile's client, key (unlocked with `passphrase`) and
    credential roles, checked against the network's genesis."""
    import os
    import secrets
    from dataclasses import replace

    from exchange.client import load_client_profile

    profile = load_client_profile(profile_path)
    _, signed, genesis = load_genesis(profile_path)
    client = ExchangeClient(profile, retry_unavailable_s=5.0)
    if passphrase is not None:
        name = f"EXCHANGE_CONSOLE_PASSPHRASE_{secrets.token_hex(4).upper()}"
        os.environ[name] = passphrase.decode()
        try:
            signer = Signer.load(replace(profile, passphrase_env=name), genesis.chain_id)
        finally:
            del os.environ[name]
    else:
        signer = Signer.load(profile, genesis.chain_id)
    roles: tuple[str, ...] = ()
    if profile.credential.is_file():
        from exchange.identity.genesis import parse_credential

        credential = parse_credential(identity_pb2.SignedCredential.FromString(
            profile.credential.read_bytes()))
        roles = tuple(credential.roles)
    registry = KeyRegistry(signed) if find_genesis(profile_path) is not None else None
    return Person(profile_path, client, signer, genesis, registry, roles)


def now_ms() -> int:
    return int(time.time() * 1000)
