"""The events of committed blocks as an analyst's own node shows them: the `EventSource`
that `exchange watch` and the console's live page read through the client library
(subjects and amounts where the agency may read them)."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from exchange.cases.events import QueryFacts
from exchange.client import ExchangeClient
from exchange.errors import ExchangeError, NotFound
from exchange.v1 import ledger_pb2, node_pb2

CACHE_MAX = 100_000
RELEVANT = ("findings", "case_event", "query", "answer_manifest", "refusal")


class ClientEventSource:
    """What events need, asked of the analyst's own node (subjects and amounts where the
    agency may read them)."""

    def __init__(self, client: ExchangeClient) -> None:
        self.client = client
        self._queries: OrderedDict[bytes, QueryFacts | None] = OrderedDict()
        self._openers: dict[str, str] = {}

    def remember(self, txid: bytes, body: ledger_pb2.TxBody) -> None:
        q = body.query
        self._queries[txid] = QueryFacts(q.case_id, body.agency, q.target_agency, q.dataset)
        while len(self._queries) > CACHE_MAX:
            self._queries.popitem(last=False)

    def query_facts(self, query_tx_id: bytes) -> QueryFacts | None:
        if query_tx_id not in self._queries:
            try:
                info = self.client.get_transaction(query_tx_id)
            except NotFound:
                return None
            body = ledger_pb2.TxBody.FromString(ledger_pb2.Envelope.FromString(
                info.envelope).body)
            if body.WhichOneof("kind") != "query":
                return None
            self.remember(query_tx_id, body)
        return self._queries[query_tx_id]

    def finding_lines(self, run_tx_id: bytes,
                      findings: ledger_pb2.Findings) -> Mapping[int, Mapping[str, Any]]:
        try:
            listing = self.client.list_findings(node_pb2.ListFindingsRequest(
                rule_id=findings.rule_id, period=findings.period, all_runs=True, open=True))
        except ExchangeError:
            return {}
        for run in listing.runs:
            if bytes(run.tx_id) == run_tx_id:
                return {int(i): json.loads(line)
                        for i, line in zip(run.line_index, run.lines, strict=True)}
        return {}

    def finding_parties(self, run_tx_id: bytes, findings: ledger_pb2.Findings) -> set[str]:
        return set()  # watch shows what the node shows; it does not filter by party

    def finding_summaries(self, run_tx_id: bytes, findings: ledger_pb2.Findings
                          ) -> list[tuple[str, str]]:
        listing = self.client.list_findings(node_pb2.ListFindingsRequest(
            rule_id=findings.rule_id, period=findings.period, all_runs=True))
        for run in listing.runs:
            if bytes(run.tx_id) == run_tx_id:
                return [(f.finding_id, f.severity) for f in run.findings]
        return []

    def case_opener(self, case_id: str) -> str:
        if case_id not in self._openers:
            cases = self.client.list_cases(case_id).cases
            if not cases:
                return ""
            self._openers[case_id] = cases[0].agency
        return self._openers[case_id]


def relevant(kind: str | None, body: ledger_pb2.TxBody, source: ClientEventSource) -> bool:
    """Whether a transaction of `kind` makes an event: findings and case events always, a
    query and its outcome when the query names a case."""
    if kind in ("findings", "case_event"):
        return True
    if kind == "query":
        return bool(body.query.case_id)
    if kind in ("answer_manifest", "refusal"):
        facts = source.query_facts(bytes(getattr(body, kind).query_tx_id))
        return facts is not None and bool(facts.case_id)
    return False
