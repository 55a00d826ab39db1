"""The block store: blocks, their transactions and attestations in SQLite.

WAL journal with synchronous=FULL: a block is durable when `append` returns, and a
crash mid-append leaves the store at the previous block (SQLite's atomic commit). The
store holds exactly the bytes that were hashed and signed; hashes and ids kept beside
them are indexes, which `exchange chain verify` recomputes and compares.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exchange.errors import ChainBroken, MalformedInput, StoreCorrupted
from exchange.identity.genesis import genesis_hash
from exchange.ledger.block import block_hash, parse_header, tx_id
from exchange.v1 import identity_pb2, ledger_pb2

SCHEMA_VERSION = 2
TX_IDS_PER_QUERY = 500  # ids in one IN (...) lookup, under SQLite's variable limit
# A transaction's place is one integer, (height << POS_BITS) | index in the block: the
# rowid of its row, so rows go in at the end of the table in order. A block cannot hold
# 2**20 envelopes (each is over 64 bytes, a block is one Raft entry of at most 64 MiB).
POS_BITS = 20
POS_INDEX_MASK = (1 << POS_BITS) - 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS blocks (
    height INTEGER PRIMARY KEY,
    hash BLOB NOT NULL,
    header BLOB NOT NULL,
    proposer_signature BLOB NOT NULL,
    tx_count INTEGER NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    raft_index INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS txs (
    pos INTEGER PRIMARY KEY,
    tx_id BLOB NOT NULL,
    envelope BLOB NOT NULL,
    result TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS txs_by_id ON txs (tx_id);
CREATE TABLE IF NOT EXISTS attestations (
    height INTEGER NOT NULL,
    agency TEXT NOT NULL,
    signer_key_id BLOB NOT NULL,
    block_hash BLOB NOT NULL,
    results_root BLOB NOT NULL,
    signature BLOB NOT NULL,
    PRIMARY KEY (height, agency, signer_key_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state_checkpoint (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    height INTEGER NOT NULL,
    format TEXT NOT NULL,
    digest BLOB NOT NULL,
    state BLOB NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The applied ledger state as of `height`, as `exchange.ledger.checkpoint` wrote it."""

    height: int
    format: str
    digest: bytes  # SHA-256 of `state`, an integrity check of the stored bytes
    state: bytes


@dataclass(frozen=True, slots=True)
class StoredTx:
    tx_id: bytes
    height: int
    index: int
    envelope: bytes
    result: str


class BlockStore:
    """Append-only block storage. One writer; readers may use other threads."""

    def __init__(self, path: Path, signed_genesis: identity_pb2.SignedGenesis) -> None:
        self.path = path
        self.signed_genesis = signed_genesis
        self.genesis_hash = genesis_hash(signed_genesis)
        self._lock = threading.RLock()
        self._db = _connect(path)
        _upgrade(self._db, path)
        self._tip_height, self._tip_hash, self._tip_timestamp_ms = self._read_tip()

    @classmethod
    def create(cls, path: Path, signed_genesis: identity_pb2.SignedGenesis) -> BlockStore:
        """Open the store at `path`, creating it for `signed_genesis` if absent; an
        existing store must hold the same genesis."""
        db = _connect(path)
        try:
            with db:
                db.executescript(_SCHEMA)
                row = db.execute("SELECT value FROM meta WHERE key='genesis'").fetchone()
                raw = signed_genesis.SerializeToString(deterministic=True)
                if row is None:
                    db.execute("INSERT INTO meta VALUES ('genesis', ?)", (raw,))
                    db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
                elif genesis_hash(_parse_genesis(row[0])) != genesis_hash(signed_genesis):
                    raise ChainBroken(f"{path} belongs to another network (genesis differs)")
        finally:
            db.close()
        return cls(path, signed_genesis)

    @classmethod
    def open(cls, path: Path) -> BlockStore:
        """Open an existing store with the genesis it holds."""
        if not path.exists():
            raise FileNotFoundError(2, "no block store", str(path))
        db = _connect(path)
        try:
            row = db.execute("SELECT value FROM meta WHERE key='genesis'").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreCorrupted(f"{path} is not a block store: {exc}") from exc
        finally:
            db.close()
        if row is None:
            raise StoreCorrupted(f"{path} holds no genesis")
        return cls(path, _parse_genesis(row[0]))

    def signed_genesis_chain_id(self) -> str:
        return identity_pb2.Genesis.FromString(self.signed_genesis.genesis).chain_id

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------
    @property
    def height(self) -> int:
        return self._tip_height

    @property
    def tip_hash(self) -> bytes:
        return self._tip_hash

    @property
    def tip_timestamp_ms(self) -> int:
        return self._tip_timestamp_ms

    def append(self, block: ledger_pb2.Block, results: Sequence[str] | None = None) -> bytes:
        """Append the next block (its header must extend the tip). Returns its hash."""
        return self.append_many([(block, results)])[-1]

    def append_many(self, blocks: Sequence[tuple[ledger_pb2.Block, Sequence[str] | None]],
                    checkpoint: Checkpoint | None = None,
                    tx_ids: Sequence[Sequence[bytes]] | None = None) -> list[bytes]:
        """Append several blocks in one SQLite transaction (one fsync), with the applied
        state as of the last of them when `checkpoint` is given: both are written or
        neither, so the state stored never disagrees with the blocks stored. `tx_ids`:
        each block's transaction ids, where the caller has them (else read here)."""
        hashes: list[bytes] = []
        with self._lock:
            height, prev, prev_ts = self._tip_height, self._tip_hash, self._tip_timestamp_ms
            rows_b: list[tuple[object, ...]] = []
            rows_t: list[tuple[object, ...]] = []
            rows_a: list[tuple[object, ...]] = []
            for k, (block, results) in enumerate(blocks):
                header = parse_header(block.header, height + 1)
                if header.height != height + 1 or bytes(header.prev_hash) != prev:
                    raise ChainBroken(f"block {header.height} does not extend the tip "
                                      f"at height {height}")
                envs = list(block.envelopes)
                if results is not None and len(results) != len(envs):
                    raise MalformedInput("one result per transaction")
                if len(envs) > POS_INDEX_MASK:
                    raise MalformedInput(f"a block of {len(envs)} transactions")
                hash_ = block_hash(block.header)
                height, prev, prev_ts = header.height, hash_, header.timestamp_ms
                rows_b.append((height, hash_, block.header, block.proposer_signature,
                               len(envs), header.timestamp_ms, header.raft_index))
                ids = tx_ids[k] if tx_ids is not None else None
                if ids is not None and len(ids) != len(envs):
                    raise MalformedInput("one transaction id per transaction")
                for idx, raw in enumerate(envs):
                    if ids is None:
                        env = ledger_pb2.Envelope()
                        env.ParseFromString(raw)
                        id_ = tx_id(env.body)
                    else:
                        id_ = ids[idx]
                    rows_t.append((_pos(height, idx), id_, raw,
                                   results[idx] if results is not None else ""))
                rows_a.extend(_attestation_row(a) for a in block.attestations)
                hashes.append(hash_)
            with self._db:
                self._db.executemany("INSERT INTO blocks VALUES (?,?,?,?,?,?,?)", rows_b)
                self._db.executemany("INSERT INTO txs VALUES (?,?,?,?)", rows_t)
                self._db.executemany(
                    "INSERT OR IGNORE INTO attestations VALUES (?,?,?,?,?,?)", rows_a)
                if checkpoint is not None:
                    if checkpoint.height != height:
                        raise MalformedInput(f"a checkpoint of height {checkpoint.height} "
                                             f"stored with blocks up to {height}")
                    self._put_checkpoint(checkpoint)
            self._tip_height, self._tip_hash, self._tip_timestamp_ms = height, prev, prev_ts
        return hashes

    def write_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Store the applied state as of the tip (the caller applies nothing meanwhile)."""
        with self._lock:
            if checkpoint.height != self._tip_height:
                raise MalformedInput(f"a checkpoint of height {checkpoint.height} with the "
                                     f"tip at {self._tip_height}")
            with self._db:
                self._put_checkpoint(checkpoint)

    def _put_checkpoint(self, checkpoint: Checkpoint) -> None:
        self._db.execute("INSERT OR REPLACE INTO state_checkpoint VALUES (1,?,?,?,?)",
                         (checkpoint.height, checkpoint.format, checkpoint.digest,
                          checkpoint.state))

    def checkpoint(self) -> Checkpoint | None:
        """The stored applied state, if any (a store from before checkpoints has none)."""
        with self._lock:
            try:
                row = self._db.execute("SELECT height, format, digest, state "
                                       "FROM state_checkpoint WHERE id=1").fetchone()
            except sqlite3.OperationalError:
                return None  # opened read-only, from before the table existed
        if row is None:
            return None
        return Checkpoint(int(row[0]), str(row[1]), bytes(row[2]), bytes(row[3]))

    def set_results(self, height: int, results: Sequence[str]) -> None:
        """Record the result codes of a block's transactions after applying it."""
        with self._lock, self._db:
            self._db.executemany("UPDATE txs SET result=? WHERE pos=?",
                                 [(code, _pos(height, i)) for i, code in enumerate(results)])

    def add_attestations(self, attestations: Sequence[ledger_pb2.Attestation]) -> int:
        """Keep attestations (already verified by the caller). Returns how many were new."""
        with self._lock, self._db:
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO attestations VALUES (?,?,?,?,?,?)",
                                 [_attestation_row(a) for a in attestations])
            return self._db.total_changes - before

    # -- reading -------------------------------------------------------------------
    def header(self, height: int) -> tuple[bytes, bytes]:
        """(header bytes, proposer signature) of a block."""
        row = self._one("SELECT header, proposer_signature FROM blocks WHERE height=?", height)
        return bytes(row[0]), bytes(row[1])

    def block_hash_at(self, height: int) -> bytes:
        return bytes(self._one("SELECT hash FROM blocks WHERE height=?", height)[0])

    def envelopes(self, height: int) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT envelope FROM txs WHERE pos BETWEEN ? AND ? ORDER BY pos",
                _block_range(height)).fetchall()
        return [bytes(r[0]) for r in rows]

    def results(self, height: int) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT result FROM txs WHERE pos BETWEEN ? AND ? ORDER BY pos",
                _block_range(height)).fetchall()
        return [str(r[0]) for r in rows]

    def block(self, height: int, with_attestations: bool = True) -> ledger_pb2.Block:
        header, sig = self.header(height)
        block = ledger_pb2.Block(header=header, proposer_signature=sig,
                                 envelopes=self.envelopes(height))
        if with_attestations:
            block.attestations.extend(self.attestations(height))
        return block

    def blocks(self, start: int = 1, end: int | None = None) -> Iterator[ledger_pb2.Block]:
        last = self._tip_height if end is None else min(end, self._tip_height)
        for height in range(start, last + 1):
            yield self.block(height)

    def attestations(self, height: int) -> list[ledger_pb2.Attestation]:
        with self._lock:
            rows = self._db.execute(
                "SELECT agency, signer_key_id, block_hash, results_root, signature "
                "FROM attestations WHERE height=? ORDER BY agency, signer_key_id",
                (height,)).fetchall()
        return [ledger_pb2.Attestation(agency=r[0], signer_key_id=r[1], height=height,
                                       block_hash=r[2], results_root=r[3], signature=r[4])
                for r in rows]

    def tx(self, tx_id_: bytes) -> StoredTx | None:
        """The first (valid) occurrence of a transaction id."""
        with self._lock:
            row = self._db.execute(
                "SELECT pos, envelope, result FROM txs WHERE tx_id=? "
                "ORDER BY (result != 'OK'), pos LIMIT 1", (tx_id_,)).fetchone()
        if row is None:
            return None
        pos = int(row[0])
        return StoredTx(tx_id_, pos >> POS_BITS, pos & POS_INDEX_MASK, bytes(row[1]),
                        str(row[2]))

    def tx_ids_between(self, low: bytes, high: bytes, limit: int) -> list[bytes]:
        """Distinct transaction ids in [low, high], in order, at most `limit` (an id
        prefix's range: exchange.ids.IdPrefix)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT tx_id FROM txs WHERE tx_id BETWEEN ? AND ? ORDER BY tx_id "
                "LIMIT ?", (low, high, limit)).fetchall()
        return [bytes(r[0]) for r in rows]

    def stored_tx_ids(self, tx_ids: Sequence[bytes]) -> set[bytes]:
        """Those of `tx_ids` any stored block holds: one query per TX_IDS_PER_QUERY ids
        instead of one per id (a block's worth is looked up at once)."""
        found: set[bytes] = set()
        with self._lock:
            for i in range(0, len(tx_ids), TX_IDS_PER_QUERY):
                part = tx_ids[i:i + TX_IDS_PER_QUERY]
                found.update(bytes(r[0]) for r in self._db.execute(
                    f"SELECT DISTINCT tx_id FROM txs WHERE tx_id IN "
                    f"({','.join('?' * len(part))})", part))
        return found

    def has_tx(self, tx_id_: bytes, below_height: int | None = None) -> bool:
        with self._lock:
            if below_height is None:
                row = self._db.execute("SELECT 1 FROM txs WHERE tx_id=? LIMIT 1",
                                       (tx_id_,)).fetchone()
            else:
                row = self._db.execute("SELECT 1 FROM txs WHERE tx_id=? AND pos<? LIMIT 1",
                                       (tx_id_, _pos(below_height, 0))).fetchone()
        return row is not None

    def raw_rows(self, height: int) -> tuple[bytes, list[bytes]]:
        """The stored hash and tx ids of a block, as indexed (for verification)."""
        stored_hash = self.block_hash_at(height)
        with self._lock:
            rows = self._db.execute(
                "SELECT tx_id FROM txs WHERE pos BETWEEN ? AND ? ORDER BY pos",
                _block_range(height)).fetchall()
        return stored_hash, [bytes(r[0]) for r in rows]

    def index_columns(self, height: int) -> tuple[int, int, int]:
        """(tx_count, timestamp_ms, raft_index) as indexed beside the header."""
        row = self._one("SELECT tx_count, timestamp_ms, raft_index FROM blocks WHERE height=?",
                        height)
        return int(row[0]), int(row[1]), int(row[2])

    def _one(self, sql: str, height: int) -> tuple[Any, ...]:
        with self._lock:
            row = self._db.execute(sql, (height,)).fetchone()
        if row is None:
            raise KeyError(f"no block at height {height}")
        return tuple(row)

    def _read_tip(self) -> tuple[int, bytes, int]:
        with self._lock:
            row = self._db.execute(
                "SELECT height, hash, timestamp_ms FROM blocks ORDER BY height DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return 0, self.genesis_hash, 0
        return int(row[0]), bytes(row[1]), int(row[2])


def _attestation_row(a: ledger_pb2.Attestation) -> tuple[object, ...]:
    return (a.height, a.agency, bytes(a.signer_key_id), bytes(a.block_hash),
            bytes(a.results_root), bytes(a.signature))


def _pos(height: int, idx: int) -> int:
    """A transaction's place: the rowid of its row."""
    return (height << POS_BITS) | idx


def _block_range(height: int) -> tuple[int, int]:
    """The first and last `pos` a block's transactions may have."""
    return _pos(height, 0), _pos(height, POS_INDEX_MASK)


def _upgrade(db: sqlite3.Connection, path: Path) -> None:
    """Bring a store written by an earlier version to SCHEMA_VERSION, in one SQLite
    transaction (a crash leaves it as it was; the next open upgrades it again).

    Schema 1 kept transactions in a WITHOUT ROWID table keyed by (height, idx): a
    1 KiB envelope does not fit in such a table's page and took a 4 KiB overflow page
    of its own (three times the space, twice the writes). Schema 2 keys them by
    rowid = (height << POS_BITS) | idx."""
    def needs_upgrade() -> bool:
        columns = {str(r[1]) for r in db.execute("PRAGMA table_info(txs)")}
        if not columns or "pos" in columns:
            return False  # new, or current
        if "idx" not in columns:
            raise StoreCorrupted(f"{path}: its txs table is of no schema this version knows")
        return True

    try:
        if not needs_upgrade():
            return
    except sqlite3.DatabaseError:
        return  # not a block store: open() says so
    if db.in_transaction:
        db.commit()
    db.execute("BEGIN IMMEDIATE")
    try:
        if not needs_upgrade():  # another process upgraded it meanwhile
            db.execute("ROLLBACK")
            return
        db.execute("CREATE TABLE txs_v2 (pos INTEGER PRIMARY KEY, tx_id BLOB NOT NULL, "
                   "envelope BLOB NOT NULL, result TEXT NOT NULL DEFAULT '')")
        db.execute(f"INSERT INTO txs_v2 SELECT (height << {POS_BITS}) | idx, tx_id, "
                   "envelope, result FROM txs ORDER BY height, idx")
        db.execute("DROP TABLE txs")
        db.execute("ALTER TABLE txs_v2 RENAME TO txs")
        db.execute("CREATE INDEX txs_by_id ON txs (tx_id)")
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _parse_genesis(raw: bytes) -> identity_pb2.SignedGenesis:
    signed = identity_pb2.SignedGenesis()
    signed.ParseFromString(raw)
    return signed


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    return db
