"""The events a node's webhook builds from its blocks (exchange.node.webhook), read with
the node's own parts: a real ledger (queries, a refusal, a rule's findings and a case,
cut into attested blocks), its block store, its applied state and an agency's data key.
What an agency may not read (a finding not sealed to it) is not in its events."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exchange.cases.events import Event, block_events, line_of, wanted
from exchange.identity.config import NodeConfig
from exchange.ledger.block import open_envelope
from exchange.ledger.state import LedgerState
from exchange.ledger.store import BlockStore
from exchange.node.answers import QueryReader
from exchange.node.webhook import NodeEventSource
from tests.unit.ledger.test_evidence_report import CASE, FINDING_ID, USCC, build_ledger


@dataclass
class NodeParts:
    """What the webhook reads of its node (its WebhookHost protocol), each part the real
    one a node holds; only the config, which building events never reads, is absent."""

    agency: str
    chain_id: str
    store: BlockStore
    state: LedgerState
    reader: QueryReader
    config: NodeConfig | None = None


def _events(tmp_path: Path, agency: str) -> list[Event]:
    led, _ids, _reveals = build_ledger(tmp_path)
    store, net = led.applier.store, led.net
    parts = NodeParts(agency, net.chain_id, store, led.applier.state,
                      QueryReader(agency, net.chain_id, store, led.applier.queries,
                                  net.data_keys[agency]))
    source = NodeEventSource(parts)  # type: ignore[arg-type]  # config is never read
    events: list[Event] = []
    for height in range(1, store.height + 1):
        _, time_ms, _ = store.index_columns(height)
        txs = []
        for raw, code in zip(store.envelopes(height), store.results(height), strict=True):
            opened = open_envelope(raw, net.chain_id)
            txs.append((opened.tx_id, opened.body, code))
        events.extend(block_events(height, time_ms, txs, source))
    store.close()
    return events


def test_a_nodes_events_are_built_from_its_own_ledger_state_and_data_key(
        tmp_path: Path) -> None:
    events = _events(tmp_path, "tax")
    kinds = [e.kind for e in events]
    # the two case queries, the answer to one and the refusal of the other, the finding,
    # the case opened with it; the rule's own period-wide query and its answer name no
    # case and make no event
    assert kinds == ["query", "query", "answer", "refusal", "finding", "case"], kinds
    answer, refusal = events[2], events[3]
    assert answer.case_id == CASE and answer.concerns("customs")
    assert refusal.case_id == CASE and refusal.data["code"] == "COSIGNATURE_REQUIRED"
    assert refusal.concerns("tax") and refusal.concerns("police")
    finding = events[4]
    assert finding.id.endswith(f"/{FINDING_ID}")
    assert finding.data["subject"] == USCC  # sealed to tax: its node reads it
    assert finding.concerns("tax") and finding.concerns("customs")
    assert not finding.concerns("police")
    assert events[5].concerns("tax")
    assert [e.kind for e in events if wanted(e, case_id="OTHER")] == []
    assert [e.kind for e in events if wanted(e, case_id=CASE)] == kinds[:4]
    assert all(line_of(e) for e in events)


def test_a_finding_not_sealed_to_the_agency_is_shown_without_its_subject(
        tmp_path: Path) -> None:
    events = _events(tmp_path, "police")
    finding = next(e for e in events if e.kind == "finding")
    assert "subject" not in finding.data and "amount" not in finding.data
