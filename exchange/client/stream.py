"""Submitting over one long-lived SubmitStream call shared by many coroutines.

A unary Submit pays gRPC's per-call cost (a new HTTP/2 stream, its headers and
trailers, several callbacks) for each transaction; one stream carries any number of
them, each matched to its answer by seq. The answer is the same SubmitResponse a unary
Submit returns, or a refusal in error_code (as in a batch). A broken stream fails what
waits on it and is opened again by the next submit.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from exchange.errors import NotAvailable
from exchange.v1 import node_pb2


class StreamBroken(NotAvailable):
    """The SubmitStream ended before a submission was answered (it may have committed:
    query it by id)."""

    code = "STREAM_BROKEN"


class SubmitStream:
    """Submissions over one SubmitStream of `stub` (an ExchangeStub on a grpc.aio
    channel): `await submit(envelope)` from any number of coroutines at once."""

    def __init__(self, stub: Any) -> None:
        self._stub = stub
        self._call: Any = None
        self._reader: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[node_pb2.SubmitResponse]] = {}
        self._seq = 0
        self._write_lock = asyncio.Lock()

    def _open(self) -> None:
        self._call = self._stub.SubmitStream()
        self._reader = asyncio.create_task(self._read(self._call))

    async def _read(self, call: Any) -> None:
        error: Exception = StreamBroken("the submit stream ended")
        try:
            async for response in call:
                fut = self._waiting.pop(response.seq, None)
                if fut is not None and not fut.done():
                    fut.set_result(response)
        except grpc.aio.AioRpcError as exc:
            error = exc
        if self._call is call:
            self._call = None
        waiting, self._waiting = self._waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(error)

    async def submit(self, envelope: bytes, timeout_s: float, no_wait: bool = False
                     ) -> node_pb2.SubmitResponse:
        """The node's answer to one envelope. Raises grpc.aio.AioRpcError or
        StreamBroken when the stream fails, TimeoutError after `timeout_s`."""
        if self._call is None:
            self._open()
        call = self._call
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[node_pb2.SubmitResponse] = \
            asyncio.get_running_loop().create_future()
        self._waiting[seq] = fut
        try:
            async with self._write_lock:
                await call.write(node_pb2.SubmitRequest(envelope=envelope, seq=seq,
                                                        no_wait=no_wait))
            return await asyncio.wait_for(fut, timeout_s)
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as exc:
            raise StreamBroken(f"the submit stream ended: {exc}") from exc
        finally:
            self._waiting.pop(seq, None)

    async def close(self) -> None:
        """Say no more requests come and wait for the stream to end."""
        call, reader = self._call, self._reader
        if call is None or reader is None:
            return
        async with self._write_lock:
            with contextlib.suppress(grpc.aio.UsageError):
                await call.done_writing()
        await reader
