"""Client channels from this node to its peers (forwards to the leader, catch-up), apart
from the Raft links: the members' addresses, the client credentials, a bounded pool."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import grpc

from exchange.node.peers import CHANNEL_OPTIONS
from exchange.v1 import node_pb2_grpc

CHANNELS_OPEN_MAX = 32


class PeerChannels:
    """Channels to the members, by agency; replaced when membership or TLS changes."""

    def __init__(self, agency: str, addresses: Mapping[str, str]) -> None:
        self.agency = agency
        self.addresses: dict[str, str] = dict(addresses)
        self.credentials: grpc.ChannelCredentials | None = None
        self._open: list[grpc.aio.Channel] = []
        self._leader_stubs: dict[str, tuple[node_pb2_grpc.ExchangeStub, grpc.aio.Channel]] = {}

    def knows(self, agency: str) -> bool:
        """`agency` is a member this node can reach (a removed leader is not)."""
        return agency in self.addresses

    def update(self, addresses: Mapping[str, str]) -> None:
        """Follow a membership change: the cached leader stubs go."""
        self.addresses = dict(addresses)
        self._leader_stubs.clear()

    def channel(self, peer: str) -> grpc.aio.Channel:
        assert self.credentials is not None
        ch = grpc.aio.secure_channel(self.addresses[peer], self.credentials,
                                     options=CHANNEL_OPTIONS)
        self._open.append(ch)
        if len(self._open) > CHANNELS_OPEN_MAX:
            old = self._open.pop(0)
            # a cached leader stub on the channel closed goes with it
            for leader, (_, channel) in list(self._leader_stubs.items()):
                if channel is old:
                    del self._leader_stubs[leader]
            asyncio.get_running_loop().create_task(old.close())
        return ch

    def leader_stub(self, leader: str) -> node_pb2_grpc.ExchangeStub:
        cached = self._leader_stubs.get(leader)
        if cached is None:
            channel = self.channel(leader)
            cached = self._leader_stubs[leader] = (node_pb2_grpc.ExchangeStub(channel), channel)
        return cached[0]

    async def close(self) -> None:
        for ch in self._open:
            await ch.close()
