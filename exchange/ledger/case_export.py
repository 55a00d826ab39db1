"""What belongs to a case, for `exchange evidence export --case`: its case events, the
findings runs that opened or joined it (with their rules' registrations, every query they
used with its answer's manifest or refusal, and of a run in chunks the chunks holding the
case's findings), and every query naming the case with its answer or refusal; and where a
playbook worked on the case, the playbook's registration and the runs of its rule steps
restricted to the case (those that found nothing too).

A run's inputs are committed by their manifests (each lists its chunks' tx ids and
commits to their salted digests), so a bundle proves what the run read without carrying
a month of the city's register: a bundle's size follows the case, not the register
(DESIGN.md decision 13). `with_inputs` adds every input answer's chunks, for a reader
who replays the run offline.
An agency that can open some of the sealed payloads (its own answers, its findings) may
add their reveals, which the verifier checks against the committed digests.

Works offline on a node's block store: the ledger state is rebuilt from the store.
"""

from __future__ import annotations

from collections.abc import Iterable

from exchange.errors import ExchangeError, MalformedInput
from exchange.identity.keys import DataKey, DataKeyring
from exchange.ledger.apply import LedgerApplier
from exchange.ledger.block import open_envelope
from exchange.ledger.findings import inputs_digest
from exchange.ledger.queries import QueryRecord
from exchange.ledger.sealing import open_sealed
from exchange.ledger.store import BlockStore
from exchange.v1 import evidence_pb2


def _query_and_outcome(rec: QueryRecord) -> list[bytes]:
    out = [rec.tx_id]
    out += [tx for _, (tx, _c) in sorted(rec.chunks.items())]
    if rec.outcome_tx_id:
        out.append(rec.outcome_tx_id)
    return out


def _query_and_manifest(rec: QueryRecord) -> list[bytes]:
    return [rec.tx_id] + ([rec.outcome_tx_id] if rec.outcome_tx_id else [])


def case_tx_ids(store: BlockStore, case_id: str, with_inputs: bool = False) -> list[bytes]:
    """Every transaction of the case, in chain order. MalformedInput if the ledger knows
    no such case and no query names it."""
    state = LedgerApplier(store).state
    wanted: list[bytes] = []
    case = state.cases.cases.get(case_id)
    if case is not None:
        wanted += case.events
        referenced: dict[bytes, set[str]] = {}
        for ref_tx, finding in case.refs:
            if finding:
                referenced.setdefault(ref_tx, set()).add(finding)
        for ref_tx, finding in case.refs:
            run = state.findings.runs.get(ref_tx)
            if finding and run is not None:
                rule = state.findings.rules.get(run.rule_digest)
                if rule is not None:
                    wanted.append(rule.tx_id)
                inputs = _query_and_outcome if with_inputs else _query_and_manifest
                for qid in run.input_tx_ids:
                    wanted += inputs(state.queries.queries[qid])
                wanted += [c for c in run.chunk_tx_ids
                           if {f for f, _, _ in state.findings.chunks[c].summaries}
                           & referenced[ref_tx]]
                wanted.append(run.tx_id)
            else:
                wanted.append(ref_tx)
    for rec in list(state.queries.queries.values()):
        if rec.case_id == case_id:
            wanted += _query_and_outcome(rec)
    for run in list(state.findings.runs.values()):
        if run.case_id == case_id:
            rule = state.findings.rules.get(run.rule_digest)
            wanted += ([rule.tx_id] if rule is not None else []) + [*run.chunk_tx_ids,
                                                                     run.tx_id]
    playbooks = state.playbooks
    for digest in {s.ref.digest for s in list(playbooks.steps.values())
                   if s.case_id == case_id}:
        registered = playbooks.playbook(digest)
        if registered is not None:
            wanted.append(registered.tx_id)
    if not wanted:
        raise MalformedInput(f"the ledger knows no case {case_id!r}")
    unique = list(dict.fromkeys(wanted))
    place = {}
    for tx in unique:
        stored = store.tx(tx)
        if stored is None:
            raise MalformedInput(f"transaction {tx.hex()} of the case is not in the store")
        place[tx] = (stored.height, stored.index)
    return sorted(unique, key=place.__getitem__)


def reveals_for(store: BlockStore, tx_ids: Iterable[bytes],
                data_key: DataKey | DataKeyring) -> list[evidence_pb2.Reveal]:
    """Reveals of every payload among `tx_ids` that `data_key` (or a key of the keyring)
    can open: inline answers,
    answer chunks and findings outputs (a query's request too)."""
    chain_id = store.signed_genesis_chain_id()
    out: list[evidence_pb2.Reveal] = []
    for tx in tx_ids:
        stored = store.tx(tx)
        if stored is None:
            continue
        opened = open_envelope(stored.envelope, chain_id)
        body = opened.body
        try:
            if opened.kind == "answer_manifest" and body.answer_manifest.HasField(
                    "inline_chunk"):
                m = body.answer_manifest
                plaintext, salt = open_sealed(m.inline_chunk, data_key, chain_id=chain_id,
                                              context_tx_id=bytes(m.query_tx_id), chunk=0)
            elif opened.kind == "answer_chunk":
                c = body.answer_chunk
                plaintext, salt = open_sealed(c.sealed, data_key, chain_id=chain_id,
                                              context_tx_id=bytes(c.query_tx_id),
                                              chunk=c.index)
            elif opened.kind == "findings":
                f = body.findings
                if f.chunk_tx_ids:
                    continue  # its output is in its chunks, revealed each
                plaintext, salt = open_sealed(
                    f.sealed_output, data_key, chain_id=chain_id,
                    context_tx_id=inputs_digest([bytes(t) for t in f.input_tx_ids]), chunk=0)
            elif opened.kind == "findings_chunk":
                part = body.findings_chunk
                plaintext, salt = open_sealed(part.sealed_output, data_key,
                                              chain_id=chain_id,
                                              context_tx_id=bytes(part.run_inputs_digest),
                                              chunk=part.index)
            elif opened.kind == "query":
                q = body.query
                plaintext, salt = open_sealed(q.sealed_request, data_key, chain_id=chain_id,
                                              context_tx_id=b"", chunk=0,
                                              requester_agency=body.agency,
                                              target_agency=q.target_agency)
            else:
                continue
        except ExchangeError:
            continue  # sealed to others: it stays sealed in the bundle
        out.append(evidence_pb2.Reveal(tx_id=tx, salt=salt, plaintext=plaintext, part=""))
    return out
