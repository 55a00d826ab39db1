"""The node's webhook (exchange.node.webhook): the [webhook] table of the node config, the
durable outbox, the HMAC-SHA256 signature and the retries with back-off, against a real
HTTP server started by the test. The events a node builds from its blocks are tested with
real nodes (tests/cluster/test_playbooks_cluster.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from exchange.errors import MalformedInput
from exchange.identity.config import WebhookSettings, load_node_config, node_config_to_toml
from exchange.node.webhook import Outbox, WebhookSender, backoff_ms, signature

KEY = b"0123456789abcdef0123456789abcdef"
WAIT_S = 30.0


class Receiver:
    """An HTTP server that answers with scripted statuses and keeps what it was sent."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.statuses = list(statuses or [])
        self.received: list[tuple[dict[str, str], bytes, int]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.received.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def delivered(self) -> list[tuple[dict[str, str], bytes]]:
        with self.lock:
            return [(h, b) for h, b, s in self.received if 200 <= s < 300]


def _wait(condition: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S:g} s: {what}")
        time.sleep(0.02)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "webhook.key"
    path.write_bytes(KEY + b"\n")
    return path


def _webhook(tmp_path: Path, url: str, secret_file: Path, **kw: int) -> WebhookSender:
    """The webhook's sending half, which needs no node; building events from blocks runs
    in a real node in tests/cluster/test_playbooks_cluster.py."""
    settings = WebhookSettings(url=url, secret_file=secret_file, timeout_ms=2_000,
                               backoff_ms_min=kw.pop("backoff_ms_min", 10),
                               backoff_ms_max=kw.pop("backoff_ms_max", 40), **kw)
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return WebhookSender(data / "webhook.db", settings)


def test_each_event_is_posted_once_signed_and_retried_after_failures(
        tmp_path: Path, secret_file: Path) -> None:
    with Receiver([500, 503]) as receiver:
        hook = _webhook(tmp_path, receiver.url, secret_file)
        events = [(f"tx{i}/finding", json.dumps({"id": f"tx{i}/finding", "n": i}).encode())
                  for i in range(5)]
        assert hook.outbox.add(3, events) == 5
        assert hook.outbox.add(3, events[:2]) == 0  # an event is in the outbox once
        hook.start()
        try:
            _wait(lambda: len(receiver.delivered()) == 5, "five events delivered")
            _wait(lambda: hook.outbox.counts()["delivered"] == 5, "deliveries recorded")
        finally:
            hook.close()
    delivered = receiver.delivered()
    assert sorted(h["X-Exchange-Event"] for h, _ in delivered) == sorted(e for e, _ in events)
    for headers, body in delivered:
        expected = "sha256=" + hmac.new(KEY, body, hashlib.sha256).hexdigest()
        assert headers["X-Exchange-Signature"] == expected
        assert headers["Content-Type"] == "application/json"
    # the first event failed twice before it went through: three posts of it, one accepted
    first = [s for h, _b, s in receiver.received if h["X-Exchange-Event"] == "tx0/finding"]
    assert first == [500, 503, 200]


def test_an_event_that_keeps_failing_is_given_up_after_attempts_max(
        tmp_path: Path, secret_file: Path) -> None:
    with Receiver([500] * 10) as receiver:
        hook = _webhook(tmp_path, receiver.url, secret_file, attempts_max=3)
        hook.outbox.add(1, [("doomed", b"{}")])
        hook.start()
        try:
            _wait(lambda: hook.outbox.counts()["failed"] == 1, "the event given up")
        finally:
            hook.close()
        assert [s for _h, _b, s in receiver.received] == [500, 500, 500]


def test_the_outbox_keeps_events_and_its_cursor_across_a_restart(
        tmp_path: Path, secret_file: Path) -> None:
    path = tmp_path / "webhook.db"
    box = Outbox(path)
    assert box.cursor() is None
    box.add(7, [("a", b"1"), ("b", b"2")])
    box.delivered(box.due(int(time.time() * 1000), 10)[0][0], 1)
    box.close()  # a crash after this loses nothing: every write is committed
    again = Outbox(path)
    assert again.cursor() == 7
    assert [(e, b) for _s, e, b, _a in again.due(int(time.time() * 1000), 10)] == [("b", b"2")]
    assert again.counts() == {"events": 2, "delivered": 1, "failed": 0, "pending": 1}
    again.close()
    with Receiver() as receiver:  # the node restarted: the pending event goes out
        data = tmp_path / "data"
        data.mkdir()
        (tmp_path / "webhook.db").rename(data / "webhook.db")
        hook = _webhook(tmp_path, receiver.url, secret_file)
        assert hook.outbox.cursor() == 7  # a restart does not move the cursor
        hook.start()
        try:
            _wait(lambda: len(receiver.delivered()) == 1, "the pending event delivered")
        finally:
            hook.close()
        assert receiver.delivered()[0][1] == b"2"


def test_signature_and_back_off() -> None:
    body = b'{"event":"case"}'
    assert signature(KEY, body) == "sha256=" + hmac.new(KEY, body, hashlib.sha256).hexdigest()
    settings = WebhookSettings(url="http://x", secret_env="K", backoff_ms_min=100,
                               backoff_ms_max=1_000)
    rng = random.Random(1)
    waits = [backoff_ms(n, settings, rng) for n in range(1, 8)]
    assert 100 <= waits[0] <= 110 and 200 <= waits[1] <= 220 and 400 <= waits[2] <= 440
    assert all(1_000 <= w <= 1_100 for w in waits[4:])


# -- the node config -------------------------------------------------------------------

NODE = """\
agency = "tax"
node_id = "tax-node"
[listen]
grpc = "127.0.0.1:7100"
metrics = "127.0.0.1:7101"
[paths]
data_dir = "data"
genesis = "genesis.pb"
node_key = "keys/node.key"
data_key = "keys/data.key"
tls_cert = "tls/node.crt"
tls_key = "tls/node.key"
[block]
tx_max = 1000
bytes_max = 4194304
interval_ms = 5
"""


@pytest.fixture
def node_toml(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "node.toml"


def test_a_webhook_table_is_read_and_written_back(node_toml: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    node_toml.write_text(NODE + '[webhook]\nurl = "https://cases.tax.example/hook"\n'
                         'secret_file = "keys/webhook.key"\nattempts_max = 5\n')
    config = load_node_config(node_toml)
    assert config.webhook is not None
    assert config.webhook.url == "https://cases.tax.example/hook"
    assert config.webhook.secret_file == node_toml.parent / "keys" / "webhook.key"
    assert config.webhook.attempts_max == 5 and config.webhook.timeout_ms == 5_000
    doc = node_config_to_toml(config, node_toml.parent)
    assert doc["webhook"]["secret_file"] == "keys/webhook.key"
    with pytest.raises(MalformedInput, match="webhook secret_file"):
        config.webhook.secret()  # no such file yet
    node_toml.write_text(NODE + '[webhook]\nurl = "http://127.0.0.1:9/x"\n'
                         'secret_env = "TAX_WEBHOOK_KEY"\n')
    config = load_node_config(node_toml)
    assert config.webhook is not None
    monkeypatch.setenv("TAX_WEBHOOK_KEY", "s3cret")
    assert config.webhook.secret() == b"s3cret"
    monkeypatch.setenv("TAX_WEBHOOK_KEY", "")
    with pytest.raises(MalformedInput, match="empty"):
        config.webhook.secret()
    node_toml.write_text(NODE)
    assert load_node_config(node_toml).webhook is None


@pytest.mark.parametrize(("table", "message"), [
    ('url = "ftp://x/y"\nsecret_env = "K"', "key 'webhook.url'"),
    ('url = "https://x/y"', "exactly one"),
    ('url = "https://x/y"\nsecret_env = "K"\nsecret_file = "f"', "exactly one"),
    ('url = "https://x/y"\nsecret_env = "K"\ncolour = "red"', "key 'webhook.colour': unknown"),
    ('url = "https://x/y"\nsecret_env = "K"\nattempts_max = 0', "key 'webhook.attempts_max'"),
    ('url = "https://x/y"\nsecret_env = "K"\nbackoff_ms_min = 500\nbackoff_ms_max = 100',
     "must not be below"),
])
def test_a_bad_webhook_table_is_refused_naming_the_key(node_toml: Path, table: str,
                                                       message: str) -> None:
    node_toml.write_text(NODE + "[webhook]\n" + table + "\n")
    with pytest.raises(MalformedInput, match=message) as caught:
        load_node_config(node_toml)
    assert str(node_toml) in str(caught.value)
