"""The node's webhook: every finding, case event and case step concerning the node's
agency (exchange.cases.events), posted as JSON to the agency's own case system.

- Durable: the events of each applied block go into an outbox beside the node's data
  (SQLite, WAL, synchronous=FULL), together with the height they were built up to, in
  one transaction. After a restart the builder resumes from that height, so no event
  of a committed block is lost, and each is in the outbox once (its id is unique).
- Signed: the body is sent with `X-Exchange-Signature: sha256=<hex HMAC-SHA256 of the
  body>` under the key of the node config's [webhook] table, and `X-Exchange-Event` (the
  event's id) so a receiver can tell a repeat (an event posted just before a crash, whose
  delivery was not yet recorded, is posted again after it: at least once, ids stable).
- Never in the node's way: the builder and the sender are threads of their own; the node
  only wakes the builder after a block. A POST that fails (an error, a non-2xx status, a
  timeout) is tried again with exponential back-off, up to `attempts_max` times; an
  event that exhausts them stays in the outbox marked failed (logged, counted).

Posts go through the standard library's urllib.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client import Counter, Gauge

from exchange.cases.events import Event, QueryFacts, block_events
from exchange.errors import ExchangeError
from exchange.identity.config import NodeConfig, WebhookSettings
from exchange.ledger.block import open_envelope
from exchange.ledger.findings import findings_chunk_reader, open_output
from exchange.ledger.state import LedgerState
from exchange.ledger.store import BlockStore
from exchange.node.answers import QueryReader
from exchange.node.metrics import REGISTRY
from exchange.v1 import ledger_pb2

log = structlog.get_logger("exchange.webhook")

SIGNATURE_HEADER = "X-Exchange-Signature"
EVENT_HEADER = "X-Exchange-Event"
BATCH_EVENTS_MAX = 256
BUILD_POLL_S = 1.0
SEND_POLL_S = 0.5
ERROR_CHARS_MAX = 300

EVENTS = Counter("exchange_webhook_events", "Webhook events, by outcome (queued, "
                 "delivered, retried, failed)", ["outcome"], registry=REGISTRY)
PENDING = Gauge("exchange_webhook_pending", "Webhook events not delivered yet",
                registry=REGISTRY)


def signature(key: bytes, body: bytes) -> str:
    """The X-Exchange-Signature header value of `body`."""
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def backoff_ms(attempts: int, settings: WebhookSettings, rng: random.Random) -> int:
    """How long to wait after the `attempts`-th failed POST: doubling from the minimum,
    at most the maximum, with up to 10% jitter."""
    base = min(settings.backoff_ms_max, settings.backoff_ms_min * 2 ** min(attempts - 1, 30))
    return int(base * (1 + 0.1 * rng.random()))


class Outbox:
    """Events to post and how far the chain has been read for them."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript("""
            CREATE TABLE IF NOT EXISTS cursor (
                id INTEGER PRIMARY KEY CHECK (id = 0), height INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS events (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, event_id TEXT NOT NULL UNIQUE,
                body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
                next_ms INTEGER NOT NULL DEFAULT 0, delivered_ms INTEGER,
                failed INTEGER NOT NULL DEFAULT 0, last_error TEXT);
            CREATE INDEX IF NOT EXISTS events_due ON events (delivered_ms, failed, next_ms);
        """)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def cursor(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT height FROM cursor WHERE id = 0").fetchone()
        return int(row[0]) if row else None

    def add(self, height: int, events: Sequence[tuple[str, bytes]]) -> int:
        """The events of the blocks up to `height`, and the cursor moved there, at once.
        How many were new."""
        with self._lock:
            self._db.execute("BEGIN")
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO events (event_id, body) VALUES (?, ?)",
                                 events)
            added = self._db.total_changes - before
            self._db.execute("INSERT OR REPLACE INTO cursor VALUES (0, ?)", (height,))
            self._db.execute("COMMIT")
        return added

    def due(self, now_ms: int, limit: int) -> list[tuple[int, str, bytes, int]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event_id, body, attempts FROM events WHERE delivered_ms IS NULL "
                "AND failed = 0 AND next_ms <= ? ORDER BY seq LIMIT ?",
                (now_ms, limit)).fetchall()
        return [(int(r[0]), str(r[1]), bytes(r[2]), int(r[3])) for r in rows]

    def delivered(self, seq: int, now_ms: int) -> None:
        with self._lock:
            self._db.execute("UPDATE events SET delivered_ms = ?, attempts = attempts + 1 "
                             "WHERE seq = ?", (now_ms, seq))

    def retry(self, seq: int, next_ms: int, error: str, give_up: bool) -> None:
        with self._lock:
            self._db.execute("UPDATE events SET attempts = attempts + 1, next_ms = ?, "
                             "last_error = ?, failed = ? WHERE seq = ?",
                             (next_ms, error[:ERROR_CHARS_MAX], int(give_up), seq))

    def next_due_ms(self) -> int | None:
        with self._lock:
            row = self._db.execute("SELECT MIN(next_ms) FROM events WHERE delivered_ms IS "
                                   "NULL AND failed = 0").fetchone()
        return int(row[0]) if row and row[0] is not None else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*), SUM(delivered_ms IS NOT NULL), SUM(failed) FROM events"
            ).fetchone()
        total, delivered, failed = (int(v or 0) for v in row)
        return {"events": total, "delivered": delivered, "failed": failed,
                "pending": total - delivered - failed}


class WebhookHost(Protocol):
    """What the webhook uses of its node: where it keeps its outbox, the blocks, the
    ledger state and the reader holding the data key."""

    @property
    def config(self) -> NodeConfig: ...
    @property
    def agency(self) -> str: ...
    @property
    def chain_id(self) -> str: ...
    @property
    def store(self) -> BlockStore: ...
    @property
    def state(self) -> LedgerState: ...
    @property
    def reader(self) -> QueryReader: ...


class NodeEventSource:
    """What events need, from the node's own state and data key."""

    def __init__(self, node: WebhookHost) -> None:
        self.node = node

    def query_facts(self, query_tx_id: bytes) -> QueryFacts | None:
        rec = self.node.state.queries.get(query_tx_id)
        if rec is None:
            return None
        return QueryFacts(rec.case_id, rec.requester, rec.target, rec.dataset)

    def finding_lines(self, run_tx_id: bytes,
                      findings: ledger_pb2.Findings) -> Mapping[int, Mapping[str, Any]]:
        reader = self.node.reader
        chunk_of = findings_chunk_reader(reader.store, self.node.chain_id)
        lines: dict[int, Mapping[str, Any]] = {}
        try:
            for _chunk, plaintext, _salt in open_output(findings, reader.data_key,
                                                        self.node.chain_id, chunk_of):
                for line in plaintext.splitlines():
                    lines[len(lines)] = json.loads(line)
        except ExchangeError:
            return {}  # not sealed to this agency
        return lines

    def finding_summaries(self, run_tx_id: bytes, findings: ledger_pb2.Findings
                          ) -> list[tuple[str, str]]:
        run = self.node.state.findings.runs.get(run_tx_id)
        if run is not None:
            return [(f, sev) for f, sev, _d in run.summaries]
        return [(s.finding_id, s.severity) for s in findings.findings]

    def finding_parties(self, run_tx_id: bytes, findings: ledger_pb2.Findings) -> set[str]:
        state = self.node.state
        run = state.findings.runs.get(run_tx_id)
        if run is None:
            return set()
        return {run.owner} | {state.queries.queries[q].target for q in run.input_tx_ids}

    def case_opener(self, case_id: str) -> str:
        case = self.node.state.cases.cases.get(case_id)
        return case.agency if case is not None else ""


class WebhookSender:
    """The durable outbox and the thread that posts its events, signed, to the agency's
    URL, with retries and back-off: everything of a webhook that needs no node."""

    def __init__(self, outbox_path: Path, settings: WebhookSettings) -> None:
        self.settings = settings
        self.key = settings.secret()
        self.outbox = Outbox(outbox_path)
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._rng = random.Random()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn(self._send_loop, "webhook-send")
        log.info("webhook started", url=self.settings.url, cursor=self.outbox.cursor())

    def _spawn(self, target: Any, name: str) -> None:
        thread = threading.Thread(target=self._guarded, args=(target, name), name=name,
                                  daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=self.settings.timeout_ms / 1000 + 2.0)
        self.outbox.close()

    def _guarded(self, loop: Any, name: str) -> None:
        while not self._stop.is_set():
            try:
                loop()
                return
            except Exception as exc:  # noqa: BLE001 - a webhook problem never stops the node
                log.error("webhook thread failed; restarting it", thread=name,
                          error=repr(exc)[:ERROR_CHARS_MAX])
                self._stop.wait(BUILD_POLL_S)

    def _refresh_pending(self) -> None:
        PENDING.set(self.outbox.counts()["pending"])

    # -- sending -----------------------------------------------------------------------
    def _send_loop(self) -> None:
        while not self._stop.is_set():
            now = int(time.time() * 1000)
            due = self.outbox.due(now, BATCH_EVENTS_MAX)
            if not due:
                nxt = self.outbox.next_due_ms()
                wait_s = SEND_POLL_S if nxt is None else min(SEND_POLL_S,
                                                             max(0.0, (nxt - now) / 1000))
                self._stop.wait(wait_s)
                continue
            for seq, event_id, body, attempts in due:
                if self._stop.is_set():
                    return
                self._send_one(seq, event_id, body, attempts)
            self._refresh_pending()

    def _send_one(self, seq: int, event_id: str, body: bytes, attempts: int) -> None:
        request = urllib.request.Request(
            self.settings.url, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "exchange-webhook/1",
                     SIGNATURE_HEADER: signature(self.key, body), EVENT_HEADER: event_id})
        try:
            with urllib.request.urlopen(request,  # noqa: S310 - the agency's own URL
                                        timeout=self.settings.timeout_ms / 1000) as reply:
                status = reply.status
        except urllib.error.HTTPError as exc:
            error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            error = str(getattr(exc, "reason", exc))
        else:
            if 200 <= status < 300:
                self.outbox.delivered(seq, int(time.time() * 1000))
                EVENTS.labels("delivered").inc()
                return
            error = f"HTTP {status}"
        tried = attempts + 1
        give_up = tried >= self.settings.attempts_max
        next_ms = int(time.time() * 1000) + backoff_ms(tried, self.settings, self._rng)
        self.outbox.retry(seq, next_ms, error, give_up)
        EVENTS.labels("failed" if give_up else "retried").inc()
        (log.error if give_up else log.info)(
            "webhook post failed" + ("; giving up" if give_up else "; retrying"),
            event=event_id, attempt=tried, error=error)


class Webhook(WebhookSender):
    """A node's webhook: the sender, and the builder that turns each applied block into
    the events concerning the node's agency and puts them in the outbox."""

    def __init__(self, node: WebhookHost, settings: WebhookSettings) -> None:
        super().__init__(node.config.paths.data_dir / "webhook.db", settings)
        self.node = node
        self.source = NodeEventSource(node)
        if self.outbox.cursor() is None:  # first start: events from here on
            self.outbox.add(node.store.height, [])

    def start(self) -> None:
        self._spawn(self._build_loop, "webhook-build")
        super().start()

    def wake(self) -> None:
        """A block was applied (called on the node's loop: never blocks)."""
        self._wake.set()

    # -- building ----------------------------------------------------------------------
    def _build_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(BUILD_POLL_S)
            self._wake.clear()
            self.build_pending()

    def build_pending(self) -> int:
        """Put the events of every block applied since the cursor into the outbox."""
        added = 0
        cursor = self.outbox.cursor() or 0
        store = self.node.store
        chain_id = self.node.chain_id
        agency = self.node.agency
        while cursor < store.height and not self._stop.is_set():
            height = cursor + 1
            _, time_ms, _ = store.index_columns(height)
            transactions = []
            for raw, code in zip(store.envelopes(height), store.results(height), strict=True):
                opened = open_envelope(raw, chain_id)
                transactions.append((opened.tx_id, opened.body, code))
            events = [e for e in block_events(height, time_ms, transactions, self.source)
                      if e.concerns(agency)]
            added += self.outbox.add(height, [(e.id, self._body(e)) for e in events])
            cursor = height
        if added:
            EVENTS.labels("queued").inc(added)
            self._refresh_pending()
        return added

    def _body(self, event: Event) -> bytes:
        doc = {**event.as_dict(), "agency": self.node.agency, "chain_id": self.node.chain_id}
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          default=str).encode()
