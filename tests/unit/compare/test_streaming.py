"""The streamed paths a city-sized register takes, with small bounds (DESIGN.md decision
13): a run's inputs streamed into DuckDB chunk by chunk give exactly what the in-memory
engine gives and are type-checked as strictly; a streamed answer is checked chunk by
chunk against its commitments; an answer is sealed one chunk at a time; a period-wide
view and an own read stream from the store in the order the whole read gives; findings
outputs are split into chunks of bounded size."""

from __future__ import annotations

import random
import re
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import agents
from agents.generate import GeneratorConfig, generate
from agents.lookup import LookupRefused, LookupRequest, lookup, lookup_iter
from agents.own_inputs import iter_own
from exchange.client.crossquery import CheckedAnswer, read_answer
from exchange.compare import load_rules, run_rule
from exchange.compare.local import gather_inputs
from exchange.compare.network import _line_groups
from exchange.compare.session import RunSession, run_streamed
from exchange.errors import MalformedInput, ProofInvalid
from exchange.ledger.queries import chunks_commitment
from exchange.ledger.sealing import canonical_json, canonical_json_lines, commit
from exchange.node.responder import ChunkSealer
from exchange.v1 import ledger_pb2, node_pb2

SEED = 5
COMPANIES = 1500


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GeneratorConfig,
                                                                       dict[str, object]]]:
    root = tmp_path_factory.mktemp("stream")
    config = GeneratorConfig(seed=SEED, companies=COMPANIES)
    generate(config, root / "data")
    opened: dict[str, object] = {}
    for agency in agents.AGENCIES:
        store = agents.open_store(agency, root / f"{agency}.db")
        agents.load_dataset_dir(agency, root / "data" / agency, store)
        opened[agency] = store
    yield config, opened
    for store in opened.values():
        store.close()  # type: ignore[attr-defined]


def _chunked(rows: Sequence[dict[str, object]], per_chunk: int) -> Iterator[bytes]:
    lines = canonical_json_lines(rows).splitlines(keepends=True)
    for start in range(0, len(lines), per_chunk):
        yield b"".join(lines[start:start + per_chunk])


def test_streamed_inputs_give_the_in_memory_runs_bytes_for_every_reference_rule(
        stores: tuple[GeneratorConfig, dict[str, object]]) -> None:
    config, opened = stores
    ran = 0
    for agency in agents.AGENCIES:
        for rule in load_rules(agency):
            params = {"period": config.periods[-1]} if rule.period_bound else {}
            inputs = gather_inputs(rule.plan(params), opened)  # type: ignore[arg-type]
            whole = run_rule(rule, inputs, params)
            rng = random.Random(rule.id)
            shuffled = {n: rng.sample(list(r), len(r)) for n, r in inputs.items()}
            streamed = run_streamed(rule, {n: _chunked(r, 7) for n, r in shuffled.items()},
                                    params)
            assert streamed.canonical_bytes == whole.canonical_bytes, rule.id
            assert streamed.digest == whole.digest
            ran += 1
    assert ran == 8  # the five of the reference pack and the three false-invoicing rules


def _payments_rule():  # type: ignore[no-untyped-def]
    return next(r for r in load_rules("pboc") if r.id == "payments-without-imports")


@pytest.mark.parametrize(("line", "message"), [
    (b'{"uscc":"91440300MA5XXXXX00","outbound_cross_border_cny":1.5}\n',
     "is not an amount with at most two decimals"),
    (b'{"uscc":"91440300MA5XXXXX00","outbound_cross_border_cny":"1.005"}\n',
     "is not an amount with at most two decimals"),
    (b'{"uscc":"91440300MA5XXXXX00","outbound_cross_border_cny":"1e16"}\n',
     "is not an amount with at most two decimals"),
    (b'{"uscc":7,"outbound_cross_border_cny":"1.00"}\n', "column uscc: '7' is not text"),
    (b'{"outbound_cross_border_cny":"1.00"}\n', "column uscc: missing is not text"),
])
def test_a_streamed_input_of_the_wrong_type_is_refused_naming_row_and_column(
        line: bytes, message: str) -> None:
    rule = _payments_rule()
    good = b'{"uscc":"91440300MA5XXXXX01","outbound_cross_border_cny":"2.00"}\n'
    with RunSession(rule) as session:
        session.append_jsonl("flows", good)
        session.append_jsonl("flows", line)
        with pytest.raises(MalformedInput, match=r"input flows: row 1 .*" + re.escape(message)):
            session.finish("flows")


def test_a_count_must_be_a_json_integer_in_a_streamed_input() -> None:
    rule = _payments_rule()
    with RunSession(rule) as session:
        session.append_jsonl("trade", b'{"uscc":"X","import_declarations":"1"}\n')
        with pytest.raises(MalformedInput, match="import_declarations: '\"1\"' is not an "
                                                 "integer"):
            session.finish("trade")


def test_a_streamed_chunk_must_end_with_a_whole_row_and_every_input_be_given() -> None:
    rule = _payments_rule()
    with RunSession(rule) as session:
        with pytest.raises(MalformedInput, match="whole line"):
            session.append_jsonl("flows", b'{"uscc":"X"')
        session.finish("flows")
        with pytest.raises(MalformedInput, match="missing trade"):
            session.run({"period": "2026-09"})


def test_subjects_are_read_back_sorted_and_distinct_in_bounded_batches() -> None:
    rule = next(r for r in load_rules("tax") if r.id == "export-rebate-without-exports")
    own = rule.plan({"period": "2026-09"}).own[0]
    values = [f"9144030{n:011d}" for n in range(23)]
    rows = [{c.name: (v if c.sql_type == "VARCHAR" else
                      (Decimal("1.00") if c.sql_type.startswith("DECIMAL") else 1))
             for c in rule.input_columns[own.name]} for v in values * 2]
    for i, row in enumerate(rows):
        for key in row:
            if key != "uscc" and isinstance(row[key], str):
                row[key] = f"{row[key]}-{i}"  # keys stay unique, uscc repeats
    with RunSession(rule) as session:
        session.append_jsonl(own.name, canonical_json_lines(rows))
        assert session.finish(own.name) == len(rows)
        batches = list(session.distinct(own.name, "uscc", 5))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert [v for b in batches for v in b] == sorted(values)


# -- streamed answers, checked ------------------------------------------------------------

def _answer(rows: int, per_chunk: int) -> tuple[node_pb2.QueryView, bytes,
                                                list[node_pb2.OpenedChunk]]:
    lines = [canonical_json({"n": i, "uscc": f"U{i:05d}"}) + b"\n" for i in range(rows)]
    chunks = []
    for index, start in enumerate(range(0, rows, per_chunk)):
        plaintext = b"".join(lines[start:start + per_chunk])
        salt = bytes([index]) * 32
        chunks.append(node_pb2.OpenedChunk(index=index, plaintext=plaintext, salt=salt,
                                           commitment=commit(salt, plaintext)))
    whole = chunks_commitment(bytes(c.commitment) for c in chunks)
    query = node_pb2.QueryView(status="answered", row_count=rows, chunk_count=len(chunks))
    return query, whole, chunks


def test_a_streamed_answer_is_checked_chunk_by_chunk_and_as_a_whole() -> None:
    query, whole, chunks = _answer(50, 7)
    got = CheckedAnswer(query, whole, iter(chunks))
    assert b"".join(got).count(b"\n") == 50 and got.rows == 50
    view = node_pb2.AnswerView(query=query, commitment=whole, chunks=chunks)
    assert len(read_answer(view).rows) == 50

    def fails(chunks: list[node_pb2.OpenedChunk], message: str,
              commitment: bytes = whole, q: node_pb2.QueryView = query) -> None:
        with pytest.raises(ProofInvalid, match=message):
            list(CheckedAnswer(q, commitment, iter(chunks)))

    tampered = [node_pb2.OpenedChunk.FromString(c.SerializeToString()) for c in chunks]
    tampered[3].plaintext = tampered[3].plaintext.replace(b"U0002", b"U9002")
    fails(tampered, "chunk 3 does not match its commitment")
    fails([chunks[1], chunks[0], *chunks[2:]], "chunk 1 arrived where chunk 0 belongs")
    fails(chunks[:-1], "7 chunks, the manifest says 8")
    fails(chunks, "do not make the manifest's commitment", commitment=b"\0" * 32)
    fails(chunks, "50 rows, the manifest says 51",
          q=node_pb2.QueryView(status="answered", row_count=51, chunk_count=8))


def test_an_answer_is_sealed_one_bounded_chunk_at_a_time() -> None:
    put: list[tuple[int, bytes]] = []

    def seal_chunk(index: int, plaintext: bytes) -> ledger_pb2.SealedPayload:
        return ledger_pb2.SealedPayload(ciphertext=plaintext, commitment=bytes([index]) * 32)

    sealer = ChunkSealer(100, seal_chunk, lambda i, s: put.append((i, bytes(s.ciphertext))))
    lines = [b"x" * 30 + b"\n"] * 10 + [b"y" * 150 + b"\n"] + [b"z" * 10 + b"\n"]
    for line in lines:
        sealer.add(line)
    prepared = sealer.close()
    assert [i for i, _ in put] == list(range(len(put)))
    assert b"".join(p for _, p in put) == b"".join(lines)
    assert all(len(p) <= 100 or p.count(b"\n") == 1 for _, p in put)
    assert prepared.row_count == 12 and prepared.chunk_count == len(put) == 6
    assert prepared.inline is None
    empty = ChunkSealer(100, seal_chunk, lambda i, s: None).close()
    assert empty.chunk_count == 1 and empty.inline is not None and empty.row_count == 0


def test_findings_outputs_split_into_bounded_chunks_of_whole_lines() -> None:
    lines = [b"a" * 50 + b"\n"] * 9
    groups = _line_groups(lines, 120)
    assert groups == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert _line_groups([], 120) == [(0, 0)]
    assert _line_groups([b"b" * 500 + b"\n"], 120) == [(0, 1)]


def test_a_large_findings_run_streams_in_slices_that_put_back_together() -> None:
    from exchange.client import merge_run_parts
    from exchange.node.server import FINDINGS_PER_MESSAGE, _run_parts

    count = FINDINGS_PER_MESSAGE * 2 + 17
    run = node_pb2.FindingsRun(tx_id=b"r" * 32, rule_id="x", finding_count=count, findings=[
        ledger_pb2.FindingSummary(finding_id=f"x/-/{n + 1}", severity="high")
        for n in range(count)])
    for n in range(0, count, 3):
        run.line_index.append(n)
        run.lines.append(b'{"n":%d}\n' % n)
    small = node_pb2.FindingsRun(tx_id=b"s" * 32, rule_id="y", findings=run.findings[:3])
    parts = _run_parts(run)
    assert len(parts) == 3 and [p.first_finding for p in parts] == [0, FINDINGS_PER_MESSAGE,
                                                                     2 * FINDINGS_PER_MESSAGE]
    assert all(len(p.findings) <= FINDINGS_PER_MESSAGE for p in parts)
    merged = merge_run_parts([*parts, *_run_parts(small)])
    assert merged == [run, small]
    from exchange.errors import NodeError

    with pytest.raises(NodeError, match="out of order"):
        merge_run_parts([parts[0], parts[2]])
    with pytest.raises(NodeError, match="began at"):
        merge_run_parts(parts[1:])


# -- reads that stream from the store -------------------------------------------------------

def test_period_wide_views_and_own_reads_stream_in_the_whole_reads_order(
        stores: tuple[GeneratorConfig, dict[str, object]]) -> None:
    config, opened = stores
    period = config.periods[-1]
    for agency, view in (("pboc", "company_flows"), ("customs", "company_trade"),
                         ("tax", "active_legal_reps")):
        store = opened[agency]
        v = agents.views_of(agency)[view]
        p = period if v.period_bound else None
        whole = list(v.rows(store, p))  # type: ignore[arg-type]
        assert list(v.iter_rows(store, p)) == whole  # type: ignore[arg-type]
        assert len(whole) > 100
        request = LookupRequest(dataset=view, period=p)
        assert list(lookup_iter(store, request, 10**6)) == lookup(  # type: ignore[arg-type]
            store, request, 10**6)  # type: ignore[arg-type]
    rows = list(iter_own(opened["tax"], "revenue_declarations", period))  # type: ignore[arg-type]
    keys = [(r["uscc"], period) for r in rows]
    assert keys == sorted(keys) and len(rows) > 100


def test_a_period_wide_view_over_its_row_limit_is_refused_after_streaming_that_many(
        stores: tuple[GeneratorConfig, dict[str, object]]) -> None:
    config, opened = stores
    request = LookupRequest(dataset="company_flows", period=config.periods[-1])
    got = []
    with pytest.raises(LookupRefused) as refused:
        for row in lookup_iter(opened["pboc"], request, 10):  # type: ignore[arg-type]
            got.append(row)
    assert refused.value.code == "ROW_LIMIT" and len(got) == 10


def test_a_streamed_read_holds_its_own_connection(tmp_path: Path) -> None:
    store = agents.open_store("pboc", tmp_path / "pboc.db")
    try:
        rows = store.stream("SELECT 1 UNION ALL SELECT 2", {}, batch_rows=1)
        assert next(rows) == (1,)
        assert store.fetch("SELECT 3", {}) == [(3,)]  # the store is not held meanwhile
        assert list(rows) == [(2,)]
    finally:
        store.close()


# -- the fast row writer ----------------------------------------------------------------------

_values = st.one_of(
    st.text(), st.none(), st.booleans(),
    st.integers(min_value=-(2**60), max_value=2**60),
    st.decimals(allow_nan=False, allow_infinity=False, places=None),
    st.lists(st.integers(), max_size=2))


@settings(max_examples=400, deadline=None)
@given(keys=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5, unique=True),
       data=st.data())
def test_row_lines_write_exactly_what_canonical_json_writes(keys: list[str],
                                                            data: st.DataObject) -> None:
    from exchange.ledger.sealing import RowLines, canonical_json

    writer = RowLines(keys)
    for _ in range(3):
        row = {k: data.draw(_values) for k in keys}
        if data.draw(st.booleans()):
            row.pop(keys[0])
            row[keys[0] + "x"] = 1
        try:
            expected = canonical_json(row) + b"\n"
        except MalformedInput:
            with pytest.raises(MalformedInput):
                writer.line(row)
            continue
        assert writer.line(row) == expected
