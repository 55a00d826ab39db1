"""The automatic responder: every committed query to this agency gets exactly one signed
answer or refusal (design decision 8).

When a query naming this agency commits, the node opens its sealed request with the
agency's data key, takes the policy's decision recorded with the query (the same on
every node), looks the subject up in its own store with a parameterized query
(agents.lookup; never SQL from another agency), seals the rows to the requester (and to
itself, so it can reveal them later), and commits the answer: one manifest with the rows
inline, or chunks first and then the manifest that names them. A query the policy
refuses, or that cannot be answered (a bad subject, too many rows), gets a signed
refusal with its reason code instead.

Exactly once, across restarts: the prepared answer (sealed payloads, commitment) is
written to a local spool, fsynced, before anything is submitted. A restart finds every
query the ledger still shows open, takes the spooled answer if there is one, and
submits what is not committed yet; the ledger itself refuses a second answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import structlog

from exchange.errors import ExchangeError, Unavailable
from exchange.identity.config import NodeConfig
from exchange.identity.keys import CachedSigner, DataKey, DataKeyring
from exchange.identity.registry import KeyRegistry
from exchange.ledger.block import new_body, seal_envelope
from exchange.ledger.queries import STATUS_OPEN, QueryBook, QueryRecord, chunks_commitment
from exchange.ledger.sealing import RowLines, seal
from exchange.ledger.store import BlockStore
from exchange.node import metrics as m
from exchange.node.answers import QueryReader
from exchange.v1 import ledger_pb2, node_pb2

log = structlog.get_logger("exchange.responder")

# Plaintext bytes per chunk: a sealed chunk stays far below the 1 MiB envelope limit.
CHUNK_PLAINTEXT_BYTES = 512 * 1024
WORKERS = 8
# Chunks of one answer submitted (and read from the spool) at a time.
CHUNKS_IN_FLIGHT = 8
RETRY_S = 1.0
# An envelope built for a submission is reused while this fresh (the same tx id then
# dedupes a resubmission); older, a new one is signed.
ENVELOPE_REUSE_MS = 60_000
ROWS_DEFAULT_MAX = 10_000
DROPS_BATCH = 64
# The responder's own threads (lookups, sealing, the spool's fsyncs), so that answering
# never queues the node's Raft log writes and block applies behind it.
THREADS = 2

SHAPE = ledger_pb2.QueryShape
REFUSE_BAD_REQUEST = "BAD_REQUEST"
# Refusal reasons as they go on the ledger, in clear: never built from the request.
REFUSAL_TEXT = {
    REFUSE_BAD_REQUEST: "the sealed request is not a valid request for this query",
    "UNKNOWN_DATASET": "the dataset is not offered",
    "UNKNOWN_FIELD": "a field asked for is not in the dataset",
    "BAD_SUBJECT": "a subject is not valid for this dataset (a key it cannot be looked up "
                   "by, or a malformed value or check digit)",
    "BAD_PERIOD": "the period is malformed or does not apply to this dataset",
    "SUBJECTS_REQUIRED": "record-level data is asked about subjects, not period-wide",
    "TOO_MANY_SUBJECTS": "too many subjects in one query",
    "ROW_LIMIT": "the answer has more rows than the policy's row limit",
}


@dataclass(frozen=True)
class Prepared:
    """What this node will answer to one query. The sealed chunks of a multi-chunk
    answer stay in the spool (read one at a time as they are submitted); only their
    commitments are held."""

    refusal: tuple[str, str] | None  # (code, reason)
    commitments: tuple[bytes, ...] = ()
    row_count: int = 0
    inline: ledger_pb2.SealedPayload | None = None  # the only chunk, when there is one

    @property
    def chunk_count(self) -> int:
        return len(self.commitments)


class AnswerSpool:
    """Prepared answers and the last envelope sent for each, durable before submission."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._drops: list[bytes] = []
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS prepared (
                query_tx_id BLOB PRIMARY KEY, refusal_code TEXT, refusal_reason TEXT,
                row_count INTEGER NOT NULL, chunk_count INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS chunks (
                query_tx_id BLOB NOT NULL, idx INTEGER NOT NULL, sealed BLOB NOT NULL,
                PRIMARY KEY (query_tx_id, idx));
            CREATE TABLE IF NOT EXISTS sent (
                query_tx_id BLOB NOT NULL, slot TEXT NOT NULL, envelope BLOB NOT NULL,
                created_ms INTEGER NOT NULL, PRIMARY KEY (query_tx_id, slot));
        """)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def get(self, query_tx_id: bytes) -> Prepared | None:
        with self._lock:
            row = self._db.execute("SELECT refusal_code, refusal_reason, row_count, chunk_count "
                                   "FROM prepared WHERE query_tx_id=?", (query_tx_id,)).fetchone()
            if row is None:
                return None
            commitments: list[bytes] = []
            inline = None
            for (raw,) in self._db.execute("SELECT sealed FROM chunks WHERE query_tx_id=? "
                                           "ORDER BY idx", (query_tx_id,)):
                sealed = ledger_pb2.SealedPayload.FromString(raw)
                commitments.append(bytes(sealed.commitment))
                inline = sealed if int(row[3]) == 1 else None
        if len(commitments) != row[3]:
            raise ExchangeError(f"answer spool: query {query_tx_id.hex()} lacks chunks")
        refusal = (str(row[0]), str(row[1])) if row[0] is not None else None
        return Prepared(refusal, tuple(commitments), int(row[2]), inline)

    def chunk(self, query_tx_id: bytes, index: int) -> ledger_pb2.SealedPayload:
        """One sealed chunk of a prepared answer."""
        with self._lock:
            row = self._db.execute("SELECT sealed FROM chunks WHERE query_tx_id=? AND idx=?",
                                   (query_tx_id, index)).fetchone()
        if row is None:
            raise ExchangeError(f"answer spool: query {query_tx_id.hex()} lacks chunk {index}")
        return ledger_pb2.SealedPayload.FromString(row[0])

    def begin(self, query_tx_id: bytes) -> None:
        """Forget any chunks a preparation interrupted by a crash left for this query."""
        with self._lock:
            self._db.execute("DELETE FROM chunks WHERE query_tx_id=?", (query_tx_id,))

    def put_chunk(self, query_tx_id: bytes, index: int,
                  sealed: ledger_pb2.SealedPayload) -> None:
        """One sealed chunk, as it is made (durable with the `put` that follows)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO chunks VALUES (?, ?, ?)",
                             (query_tx_id, index, sealed.SerializeToString(deterministic=True)))

    def put(self, query_tx_id: bytes, prepared: Prepared,
            sent: tuple[str, bytes, int] | None = None) -> None:
        """Store a prepared answer, whose chunks are already put (and the envelope about
        to be sent for it, as slot, envelope, created_ms) in one fsynced transaction,
        which also carries out the drops asked for since the last one."""
        with self._lock:
            self._db.execute("BEGIN")
            self._drop_pending()
            if sent is not None:
                self._db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?, ?, ?)",
                                 (query_tx_id, *sent))
            refusal = prepared.refusal or (None, None)
            self._db.execute("INSERT OR REPLACE INTO prepared VALUES (?, ?, ?, ?, ?)",
                             (query_tx_id, refusal[0], refusal[1], prepared.row_count,
                              prepared.chunk_count))
            self._db.execute("COMMIT")

    def sent(self, query_tx_id: bytes, slot: str) -> tuple[bytes, int] | None:
        with self._lock:
            row = self._db.execute("SELECT envelope, created_ms FROM sent WHERE "
                                   "query_tx_id=? AND slot=?", (query_tx_id, slot)).fetchone()
        return (bytes(row[0]), int(row[1])) if row else None

    def remember_sent(self, query_tx_id: bytes, slot: str, envelope: bytes,
                      created_ms: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO sent VALUES (?, ?, ?, ?)",
                             (query_tx_id, slot, envelope, created_ms))

    def drop(self, query_tx_id: bytes) -> None:
        """Forget a query that is answered: done with the next write (a drop lost in a
        crash is harmless, the restart sees the query answered and drops it again)."""
        with self._lock:
            self._drops.append(query_tx_id)
            if len(self._drops) >= DROPS_BATCH:
                self._db.execute("BEGIN")
                self._drop_pending()
                self._db.execute("COMMIT")

    def _drop_pending(self) -> None:
        for table in ("prepared", "chunks", "sent"):
            self._db.executemany(f"DELETE FROM {table} WHERE query_tx_id=?",  # noqa: S608
                                 [(q,) for q in self._drops])
        self._drops.clear()

    def query_ids(self) -> list[bytes]:
        with self._lock:
            return [bytes(r[0]) for r in self._db.execute("SELECT query_tx_id FROM prepared")]


class ChunkSealer:
    """Canonical row lines grouped into chunk plaintexts of at most `chunk_bytes` (a row
    is never split; a single larger row makes a chunk of its own), each sealed and handed
    to `put` as soon as it is full, so an answer of any size is held one chunk at a time.
    No rows: one empty chunk."""

    def __init__(self, chunk_bytes: int,
                 seal_chunk: Callable[[int, bytes], ledger_pb2.SealedPayload],
                 put: Callable[[int, ledger_pb2.SealedPayload], None]) -> None:
        self.chunk_bytes = chunk_bytes
        self._seal = seal_chunk
        self._put = put
        self._lines: list[bytes] = []
        self._size = 0
        self.rows = 0
        self.commitments: list[bytes] = []
        self.first: ledger_pb2.SealedPayload | None = None

    def add(self, line: bytes) -> None:
        if self._lines and self._size + len(line) > self.chunk_bytes:
            self._flush()
        self._lines.append(line)
        self._size += len(line)
        self.rows += 1

    def _flush(self) -> None:
        index = len(self.commitments)
        sealed = self._seal(index, b"".join(self._lines))
        self._put(index, sealed)
        self.commitments.append(bytes(sealed.commitment))
        if index == 0:
            self.first = sealed
        self._lines, self._size = [], 0

    def close(self) -> Prepared:
        self._flush()
        return Prepared(None, tuple(self.commitments), self.rows,
                        self.first if len(self.commitments) == 1 else None)


class ResponderHost(Protocol):
    """What the responder uses of its node: the ledger's view of the queries, the node's
    signer (it changes on a key rotation, so it is read at each use) and submission."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def agency(self) -> str: ...
    @property
    def chain_id(self) -> str: ...
    @property
    def signer(self) -> CachedSigner: ...
    @property
    def registry(self) -> KeyRegistry: ...
    @property
    def store(self) -> BlockStore: ...
    @property
    def queries(self) -> QueryBook: ...
    @property
    def reader(self) -> QueryReader: ...

    async def submit_batch(self, raws: Sequence[bytes], wait: bool
                           ) -> list[node_pb2.SubmitResponse]: ...


class Responder:
    """Answers the queries the ledger sends this node's agency."""

    def __init__(self, node: ResponderHost, data_key: DataKey | DataKeyring) -> None:
        self.node = node
        self.data_key = data_key
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.spool = AnswerSpool(node.config.paths.data_dir / "answers.db")
        self._busy: set[bytes] = set()
        self._store: Any = None
        self._store_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(THREADS, thread_name_prefix="responder")

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.spool.close()
        if self._store is not None:
            self._store.close()

    def notify(self, query_tx_id: bytes) -> None:
        self.queue.put_nowait(query_tx_id)

    async def run(self) -> None:
        queries = self.node.queries
        tip_ms = self.node.store.tip_timestamp_ms
        for rec in list(queries.open_for(self.node.agency, tip_ms)):
            self.notify(rec.tx_id)
        for qid in self.spool.query_ids():  # answered or expired while we were down
            known = queries.get(qid)
            if known is None or known.status_at(tip_ms) != STATUS_OPEN:
                await self._run(self.spool.drop, qid)
        workers = [asyncio.create_task(self._worker()) for _ in range(WORKERS)]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()

    async def _worker(self) -> None:
        while True:
            qid = await self.queue.get()
            if qid in self._busy:
                continue
            self._busy.add(qid)
            try:
                await self._answer(qid)
            except ExchangeError as exc:
                log.info("answer not committed yet; retrying", query=qid.hex(), error=str(exc))
                asyncio.get_running_loop().call_later(RETRY_S, self.notify, qid)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad query never stops the node
                log.error("answering failed; retrying later", query=qid.hex(),
                          error=repr(exc)[:300])
                asyncio.get_running_loop().call_later(RETRY_S * 30, self.notify, qid)
            finally:
                self._busy.discard(qid)

    def _is_open(self, qid: bytes) -> QueryRecord | None:
        rec = self.node.queries.get(qid)
        if rec is None or rec.status_at(self.node.store.tip_timestamp_ms) != STATUS_OPEN:
            return None
        return rec

    async def _answer(self, qid: bytes) -> None:
        rec = self._is_open(qid)
        if rec is None:
            await self._run(self.spool.drop, qid)
            return
        started = time.perf_counter()
        prepared = await self._run(self.spool.get, qid)
        fresh: bytes | None = None
        if prepared is None:
            prepared = await self._run(self.prepare, rec)
            sent = None
            if prepared.refusal is not None or prepared.chunk_count == 1:
                body = self._outcome_body(rec, prepared)
                fresh = seal_envelope(body, self.node.signer)
                sent = ("outcome", fresh, body.created_at_ms)
            await self._run(self.spool.put, qid, prepared, sent)
        if prepared.refusal is None and prepared.chunk_count > 1:
            await self._submit_chunks(rec, prepared)
            still_open = self._is_open(qid)
            if still_open is None:
                return
            rec = still_open
        outcome = await self._submit_slot(rec, "outcome", lambda: self._outcome_body(rec,
                                                                                    prepared),
                                          fresh)
        if outcome.result not in ("OK", ""):
            log.warning("answer judged invalid", query=qid.hex(), result=outcome.result)
        m.ANSWERS.labels("refusal" if prepared.refusal else "answer").inc()
        m.ANSWER_SECONDS.observe(time.perf_counter() - started)
        log.info("query answered", query=qid.hex(), requester=rec.requester,
                 dataset=rec.dataset, refusal=prepared.refusal[0] if prepared.refusal else "",
                 rows=prepared.row_count, chunks=prepared.chunk_count)
        await self._run(self.spool.drop, qid)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _submit_chunks(self, rec: QueryRecord, prepared: Prepared) -> None:
        missing = [i for i in range(prepared.chunk_count) if i not in rec.chunks]
        for start in range(0, len(missing), CHUNKS_IN_FLIGHT):
            batch = missing[start:start + CHUNKS_IN_FLIGHT]
            sealed = [await self._run(self.spool.chunk, rec.tx_id, i) for i in batch]
            await asyncio.gather(*(self._submit_slot(
                rec, f"chunk-{i}", lambda i=i, c=c: self._chunk_body(rec, i, c))
                for i, c in zip(batch, sealed, strict=True)))

    async def _submit_slot(self, rec: QueryRecord, slot: str, make_body: Any,
                           envelope: bytes | None = None) -> Any:
        """Submit the envelope for one slot of an answer and wait for its block; reuse the
        envelope sent before while it is fresh, so a retry is the same transaction.
        `envelope`: one just made and spooled."""
        if envelope is None:
            now = int(time.time() * 1000)
            earlier = await self._run(self.spool.sent, rec.tx_id, slot)
            if earlier is not None and now - earlier[1] < ENVELOPE_REUSE_MS:
                envelope = earlier[0]
            else:
                body: ledger_pb2.TxBody = make_body()
                envelope = seal_envelope(body, self.node.signer)
                await self._run(self.spool.remember_sent, rec.tx_id, slot, envelope,
                                body.created_at_ms)
        result = (await self.node.submit_batch([envelope], wait=True))[0]
        if result.error_code:
            raise ExchangeError(f"{result.error_code}: {result.error}")
        return result

    def _body(self) -> ledger_pb2.TxBody:
        return new_body(self.node.chain_id, self.node.agency, int(time.time() * 1000))

    def _chunk_body(self, rec: QueryRecord, index: int,
                    sealed: ledger_pb2.SealedPayload) -> ledger_pb2.TxBody:
        body = self._body()
        body.answer_chunk.CopyFrom(ledger_pb2.AnswerChunk(query_tx_id=rec.tx_id, index=index,
                                                          sealed=sealed))
        return body

    def _outcome_body(self, rec: QueryRecord, prepared: Prepared) -> ledger_pb2.TxBody:
        body = self._body()
        if prepared.refusal is not None:
            code, reason = prepared.refusal
            body.refusal.CopyFrom(ledger_pb2.Refusal(query_tx_id=rec.tx_id, code=code,
                                                     reason=reason))
            return body
        manifest = ledger_pb2.AnswerManifest(query_tx_id=rec.tx_id,
                                             chunk_count=prepared.chunk_count,
                                             row_count=prepared.row_count)
        if prepared.inline is not None:
            manifest.inline_chunk.CopyFrom(prepared.inline)
            manifest.commitment = prepared.inline.commitment
        else:
            digests = []
            for i, commitment in enumerate(prepared.commitments):
                tx_id, committed = rec.chunks[i]
                assert committed == commitment, "spooled chunk differs"
                digests.append(tx_id)
            manifest.chunk_digests.extend(digests)
            manifest.commitment = chunks_commitment(prepared.commitments)
        body.answer_manifest.CopyFrom(manifest)
        return body

    # -- preparing (worker thread) ------------------------------------------------------
    def prepare(self, rec: QueryRecord) -> Prepared:
        """The answer or refusal to `rec`, sealed; raises only for an unavailable store."""
        if not rec.allowed:
            return Prepared((rec.decision_code, rec.decision_reason))
        try:
            request = self.node.reader.open_request(rec)
        except Exception:  # noqa: BLE001 - any malformed request is refused, never fatal
            return Prepared((REFUSE_BAD_REQUEST, REFUSAL_TEXT[REFUSE_BAD_REQUEST]))
        from agents.lookup import LookupRefused, LookupRequest, lookup_iter

        subjects = request.subjects
        shape_ok = {int(SHAPE.QUERY_SHAPE_SUBJECT): len(subjects) == 1,
                    int(SHAPE.QUERY_SHAPE_SUBJECT_SET): len(subjects) >= 1,
                    int(SHAPE.QUERY_SHAPE_AGGREGATE): True}.get(rec.shape, False)
        if not shape_ok:
            return Prepared((REFUSE_BAD_REQUEST, f"{SHAPE.Name(rec.shape)} with "
                                                 f"{len(subjects)} subjects"))  # counts only
        if request.dataset != rec.dataset:
            return Prepared((REFUSE_BAD_REQUEST, "the sealed request names another dataset "
                                                 "than the query"))
        asked = LookupRequest(dataset=rec.dataset, subjects=subjects, period=request.period,
                              fields=rec.fields)
        own_period_wide = rec.requester == rec.target and not subjects
        recipients = self.node.registry.sealing_keys([rec.requester, self.node.agency])

        def seal_chunk(index: int, plaintext: bytes) -> ledger_pb2.SealedPayload:
            sealed, _ = seal(plaintext, recipients, chain_id=self.node.chain_id,
                             context_tx_id=rec.tx_id, chunk=index)
            return sealed

        self.spool.begin(rec.tx_id)
        sealer = ChunkSealer(self.node.config.answer_chunk_bytes, seal_chunk,
                             lambda index, sealed: self.spool.put_chunk(rec.tx_id, index, sealed))
        try:
            with self._store_lock:
                store = self._agency_store()
            if own_period_wide:  # a rule's own inputs: the owner reads its own data
                from agents.own_inputs import iter_own

                rows = iter_own(store, rec.dataset, request.period)
            else:
                rows = lookup_iter(store, asked, rec.row_limit or ROWS_DEFAULT_MAX)
            writer: RowLines | None = None
            for row in rows:
                if writer is None:  # an answer's rows all have the same columns
                    writer = RowLines(row)
                sealer.add(writer.line(row))
        except LookupRefused as exc:
            self.spool.begin(rec.tx_id)  # nothing of a refused answer stays
            # the reason on the ledger is fixed text: the exception's names the subject,
            # which is sealed and must not appear in clear
            return Prepared((exc.code, REFUSAL_TEXT.get(exc.code, "the query cannot be "
                                                                  "answered")))
        except ExchangeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a store that is down: try again later
            raise Unavailable(f"{self.node.agency}'s store: {exc}") from exc
        return sealer.close()

    def _agency_store(self) -> Any:
        if self._store is None:
            import agents
            from agents.common.store import sqlite_store_path

            location = self.node.config.agency_store or sqlite_store_path(
                self.node.config.paths.data_dir)
            opener = getattr(agents, "open_agency_store", None)
            if opener is not None:
                self._store = opener(self.node.agency, location)
            else:
                self._store = agents.open_store(self.node.agency, Path(location))
        return self._store


def close_quietly(responder: Responder | None) -> None:
    if responder is not None:
        with contextlib.suppress(Exception):
            responder.close()
