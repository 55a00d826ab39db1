"""The node's signing key and data keys, and their rotation: when the ledger names a
new key for this node, the prepared next key (keys/*.next.key) takes over."""

from __future__ import annotations

import os

import structlog

from exchange.errors import ExchangeError
from exchange.identity.config import NodePaths, next_path
from exchange.identity.keys import (
    CachedSigner,
    DataKeyring,
    read_data_key,
    read_data_keyring,
    read_signing_key,
    retire_data_key,
)
from exchange.v1 import identity_pb2

log = structlog.get_logger("exchange.node")


class NodeKeys:
    """The keys this node holds now; `signer` is replaced by a rotation, so holders
    read it at each use."""

    def __init__(self, paths: NodePaths) -> None:
        self.paths = paths
        self.signer = CachedSigner(read_signing_key(paths.node_key))
        self.data_keys: DataKeyring = read_data_keyring(paths.data_key)

    def follow(self, member: identity_pb2.Member) -> None:
        """Take the next keys if the ledger now names them for this node."""
        if bytes(member.node_public_key) != self.signer.public_key:
            self._take_next_node_key(bytes(member.node_public_key))
        if bytes(member.data_public_key) != self.data_keys.public_key:
            self._take_next_data_key(bytes(member.data_public_key))

    def check(self, agency: str, member: identity_pb2.Member) -> None:
        """At start: the keys held are the ones the ledger names (after a rotation that
        applied while this node was down, the prepared next keys take over)."""
        if bytes(member.node_public_key) != self.signer.public_key:
            self._take_next_node_key(bytes(member.node_public_key))
            if bytes(member.node_public_key) != self.signer.public_key:
                raise ExchangeError(f"the ledger names {agency}'s node with another key "
                                    f"than {self.paths.node_key}")
        if bytes(member.data_public_key) != self.data_keys.public_key:
            self._take_next_data_key(bytes(member.data_public_key))
            if bytes(member.data_public_key) != self.data_keys.public_key:
                raise ExchangeError(f"the ledger names {agency}'s data key with another "
                                    f"key than {self.paths.data_key}")

    def _take_next_node_key(self, public_key: bytes) -> None:
        """Switch to the prepared next node key (keys/node.next.key) if it is the one
        the ledger now names; it replaces the current key file."""
        path = self.paths.node_key
        prepared = next_path(path)
        try:
            key = read_signing_key(prepared)
        except (OSError, ExchangeError, ValueError) as exc:
            log.error("the ledger names a node key this node does not hold", error=str(exc))
            return
        if key.public_key != public_key:
            log.error("the prepared next node key is not the one on the ledger",
                      path=str(prepared))
            return
        os.replace(prepared, path)
        self.signer = CachedSigner(key)
        log.info("node key switched to the one on the ledger", key_id=key.key_id.hex())

    def _take_next_data_key(self, public_key: bytes) -> None:
        """Switch to the prepared next data key (keys/data.next.key) if it is the one the
        ledger now names. The key replaced is kept among the retired data keys
        (keys/data.retired/), so everything sealed to it stays readable."""
        path = self.paths.data_key
        prepared = next_path(path)
        try:
            key = read_data_key(prepared)
        except (OSError, ExchangeError, ValueError) as exc:
            log.error("the ledger names a data key this node does not hold", error=str(exc))
            return
        if key.public_key != public_key:
            log.error("the prepared next data key is not the one on the ledger",
                      path=str(prepared))
            return
        try:
            retire_data_key(path, self.data_keys.current)
            os.replace(prepared, path)
        except OSError as exc:  # keys on a read-only volume (a Kubernetes Secret)
            log.error("data key switched in memory only: put the prepared key in place "
                      "and the old one among the retired keys before the next restart",
                      path=str(path), error=str(exc))
        self.data_keys.replace_current(key)
        log.info("data key switched to the one on the ledger", key_id=key.key_id.hex(),
                 retired=len(self.data_keys.key_ids) - 1)
