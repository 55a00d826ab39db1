"""What the ledger says at a point of the chain, and the judgement of each transaction
against it (decision 3): keys and credentials, policies, the catalog, queries and their
answers, registered rules and findings, cases, registered playbooks and their steps.

`LedgerState.judge` is the one place a valid, signed transaction is held against the
state before it. Every node runs it on apply, `exchange chain verify` runs it again, and
a node restarting replays its stored chain through it and must get the stored result
codes back. Pure: nothing here does I/O.
"""

from __future__ import annotations

from exchange.errors import ExchangeError, StoreCorrupted
from exchange.identity.registry import (
    REGISTRY_KINDS,
    ROLE_NODE,
    ROLE_ROOT,
    KeyInfo,
    KeyRegistry,
)
from exchange.ledger.block import RESULT_OK, OpenedEnvelope
from exchange.ledger.casechain import CaseChains, case_named
from exchange.ledger.findings import CaseBook, FindingsBook
from exchange.ledger.judge import CODE_REJECTED, valid_attestation_record
from exchange.ledger.playbooks import PlaybookBook
from exchange.ledger.policy import PolicyBook
from exchange.ledger.queries import QUERY_KINDS, QueryBook, Rejected
from exchange.v1 import identity_pb2, ledger_pb2

POLICY_ROLES = frozenset({"supervisor"})
CATALOG_ENTRIES_MAX = 256


class LedgerState:
    """Registry, policies, catalog and queries, advanced one valid transaction at a time."""

    def __init__(self, signed_genesis: identity_pb2.SignedGenesis) -> None:
        self.registry = KeyRegistry(signed_genesis)
        self.chain_id = self.registry.chain_id
        self.policies = PolicyBook.from_genesis(self.registry.genesis.policies)
        # (agency, dataset) -> the latest catalog entry the agency published
        self.catalog: dict[tuple[str, str], ledger_pb2.CatalogEntry] = {}
        self.queries = QueryBook(self.registry, self.policies)
        self.findings = FindingsBook(self.queries)
        self.cases = CaseBook(self.findings)
        self.playbooks = PlaybookBook(self.cases)
        self.queries.standing_approval = self.playbooks.approves
        self.case_chains = CaseChains()

    def judge(self, env: OpenedEnvelope, signer: KeyInfo, height: int, time_ms: int) -> str:
        """Result code of `env`, signed by `signer` (valid at this height) in a block at
        `height` stamped `time_ms`; the state follows it if the code is OK."""
        code = self._judge(env, signer, height, time_ms)
        if code == RESULT_OK:
            case_id = case_named(env.body, self._case_of_query)
            if case_id:
                self.case_chains.follow(case_id, env.tx_id, height)
        return code

    def _case_of_query(self, query_tx_id: bytes) -> str | None:
        rec = self.queries.get(query_tx_id)
        return rec.case_id if rec is not None else None

    def _judge(self, env: OpenedEnvelope, signer: KeyInfo, height: int, time_ms: int) -> str:
        kind = env.kind
        body = env.body
        if kind in REGISTRY_KINDS:
            if kind == "credential_revoke" and not (
                    signer.subject == ROLE_ROOT or POLICY_ROLES & set(signer.roles)):
                return CODE_REJECTED  # revoked by the agency's root or a supervisor
            try:
                self.registry.apply(body, signer, height)
            except ExchangeError:
                return CODE_REJECTED
        elif kind == "attestation_record":
            if not valid_attestation_record(self.registry, body, signer, height):
                return CODE_REJECTED
        elif kind == "policy":
            # A dataset's policy is its owner's alone, set by its root or a supervisor.
            if body.policy.owner_agency != signer.agency or not (
                    signer.subject == ROLE_ROOT or POLICY_ROLES & set(signer.roles)):
                return CODE_REJECTED
            try:
                self.policies.apply(body.policy, signer.agency)
            except ExchangeError:
                return CODE_REJECTED
        elif kind == "catalog_entry":
            entry = body.catalog_entry
            key = (body.agency, entry.dataset)
            if not (signer.subject in (ROLE_ROOT, ROLE_NODE) or POLICY_ROLES & set(signer.roles)):
                return CODE_REJECTED  # an agency's catalog is its node's or a supervisor's
            if not entry.dataset or (key not in self.catalog and sum(
                    1 for a, _ in self.catalog if a == body.agency) >= CATALOG_ENTRIES_MAX):
                return CODE_REJECTED
            self.catalog[key] = entry
        elif kind in QUERY_KINDS:
            try:
                step = self.playbooks.check_query(env, signer) if kind == "query" else None
            except Rejected as exc:
                return exc.result_code
            code = self.queries.judge(env, signer, height, time_ms)
            if code == RESULT_OK and step is not None:
                self.playbooks.done(step, env.tx_id, height)
            return code
        elif kind in ("rule_registration", "findings", "findings_chunk", "case_event",
                      "playbook_registration"):
            try:
                if kind == "rule_registration":
                    self.findings.register(env, signer, height)
                elif kind == "playbook_registration":
                    self.playbooks.register(env, signer, height)
                elif kind == "findings":
                    self.findings.record(env, signer, height, time_ms)
                elif kind == "findings_chunk":
                    self.findings.record_chunk(env, signer)
                else:
                    step = self.playbooks.check_case_event(env, signer)
                    self.cases.judge_event(env, signer, height)
                    if step is not None:
                        self.playbooks.done(step, env.tx_id, height)
            except Rejected as exc:
                return exc.result_code
        return RESULT_OK

    def replay(self, env: OpenedEnvelope, height: int, time_ms: int) -> None:
        """Follow a transaction the stored chain marks valid; the judgement must agree."""
        signer = self.registry.resolve(env.signer_key_id)
        code = self.judge(env, signer, height, time_ms)
        if code != RESULT_OK:
            raise StoreCorrupted(f"height {height}: stored as valid, judged {code} on replay "
                                 f"(tx {env.tx_id.hex()})")
