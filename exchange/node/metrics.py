"""Prometheus metrics of a node, served on its metrics port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from exchange.identity.config import parse_address

REGISTRY = CollectorRegistry(auto_describe=True)
_LATENCY = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5)

COMMIT_HEIGHT = Gauge("exchange_commit_height", "Height of the last applied block",
                      registry=REGISTRY)
FINAL_HEIGHT = Gauge("exchange_final_height", "Highest height attested by a quorum",
                     registry=REGISTRY)
RAFT_TERM = Gauge("exchange_raft_term", "Current Raft term", registry=REGISTRY)
RAFT_COMMIT_INDEX = Gauge("exchange_raft_commit_index", "Raft commit index", registry=REGISTRY)
IS_LEADER = Gauge("exchange_is_leader", "1 when this node leads", registry=REGISTRY)
CLOCK_OFF = Gauge("exchange_clock_off_seconds",
                  "How far this node's clock is off from its peers' when they agree it is "
                  "(0 otherwise); such a node does not lead", registry=REGISTRY)
LEADER_CHANGES = Counter("exchange_leader_changes", "Leader changes seen", registry=REGISTRY)
BLOCKS = Counter("exchange_blocks_applied", "Blocks applied", registry=REGISTRY)
TXS = Counter("exchange_transactions_applied", "Transactions applied, by result",
              ["result"], registry=REGISTRY)
MEMPOOL = Gauge("exchange_mempool_transactions", "Admitted, not yet in a block",
                registry=REGISTRY)
REFUSED = Counter("exchange_submissions_refused", "Submissions refused, by reason",
                  ["reason"], registry=REGISTRY)
BLOCK_FILL_WAITS = Counter("exchange_block_fill_waits",
                           "Times a busy leader waited for its next block to fill, by how "
                           "the wait ended (filled, or interval: block.interval_ms ran out)",
                           ["ended"], registry=REGISTRY)
INVALID_BLOCKS = Counter("exchange_invalid_blocks_from_leader",
                         "Blocks a leader sent that failed the follower's checks",
                         registry=REGISTRY)
APPLY_SECONDS = Histogram("exchange_apply_seconds", "Time to check, judge and store a block",
                          buckets=_LATENCY, registry=REGISTRY)
WAL_SECONDS = Histogram("exchange_wal_save_seconds", "Raft log write and fsync",
                        buckets=_LATENCY, registry=REGISTRY)
ADMISSION_SECONDS = Histogram("exchange_admission_seconds", "Admission checks of one envelope",
                              buckets=_LATENCY, registry=REGISTRY)
COMMIT_SECONDS = Histogram("exchange_submit_to_commit_seconds",
                           "From admission to the transaction's block being applied here",
                           buckets=_LATENCY, registry=REGISTRY)
BLOCK_SECONDS = Histogram("exchange_block_propose_to_apply_seconds",
                          "Leader: from proposing a block to applying it", buckets=_LATENCY,
                          registry=REGISTRY)
GRPC_SECONDS = Histogram("exchange_grpc_seconds", "gRPC handler latency by method",
                         ["method"], buckets=_LATENCY, registry=REGISTRY)
GRPC_REFUSED = Counter("exchange_grpc_refused", "gRPC calls ended by a domain error, by "
                       "method and error code", ["method", "code"], registry=REGISTRY)
GRPC_CANCELLED = Counter("exchange_grpc_cancelled", "gRPC calls cancelled before their "
                         "handler finished (the client's deadline passed or it went away)",
                         ["method"], registry=REGISTRY)
PEER_FRAMES = Counter("exchange_peer_link_frames", "Frames written on the Raft links to peers",
                      registry=REGISTRY)
PEER_ITEMS = Counter("exchange_peer_link_items", "What the frames on the Raft links carried, by "
                     "kind (each Raft message type, forward, forward_reply, attestation)", ["kind"],
                     registry=REGISTRY)
PEER_DROPPED = Counter("exchange_peer_messages_dropped", "Raft messages dropped on full queues",
                       registry=REGISTRY)
RESUBMITTED = Counter("exchange_transactions_reforwarded",
                      "Transactions re-forwarded because the leader left them out",
                      registry=REGISTRY)
ANSWERS = Counter("exchange_answers_committed",
                  "Queries to this agency answered or refused by its responder", ["outcome"],
                  registry=REGISTRY)
ANSWER_SECONDS = Histogram("exchange_answer_seconds",
                           "Responder: from taking a committed query to its answer committing",
                           buckets=_LATENCY, registry=REGISTRY)
ANSWER_READS = Counter("exchange_answer_reads", "Answers decrypted for this agency's analysts",
                       registry=REGISTRY)


def serve_metrics(address: str) -> None:
    host, port = parse_address(address)
    start_http_server(port, addr=host, registry=REGISTRY)
RAFT_LOG_BYTES = Gauge("exchange_raft_log_bytes", "Bytes of Raft entries held in memory",
                       registry=REGISTRY)
RATE_LIMITED = Counter("exchange_submissions_rate_limited",
                       "Submissions refused by the admission rate limits, by limit",
                       ["limit"], registry=REGISTRY)
STATE_CHECKPOINTS = Counter("exchange_state_checkpoints",
                            "Applied-state checkpoints written with the block store",
                            registry=REGISTRY)
