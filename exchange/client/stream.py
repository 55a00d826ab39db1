"""Submitting over one long-lived SubmitFrames call shared by many coroutines.

A unary Submit pays gRPC's per-call cost (a new HTTP/2 stream, its headers and
trailers, several callbacks) for each transaction, and a stream still pays a message
each way. Here every request that is ready while the previous frame is being written
goes out in the next frame (at most FRAME_REQUESTS_MAX requests and FRAME_BYTES_MAX
bytes), and the node sends the answers ready at once (those of one block) as one
message; each answer is matched to its request by seq. The answer is the SubmitResponse
a unary Submit returns, or a refusal in error_code (as in a batch). A broken stream
fails what waits on it and is opened again by the next submit.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc

from exchange.errors import NotAvailable
from exchange.v1 import node_pb2

# as the node's bounds (exchange/node/frames.py), which refuse a larger frame
FRAME_REQUESTS_MAX = 256
FRAME_BYTES_MAX = 8 << 20


class StreamBroken(NotAvailable):
    """The stream ended before a submission was answered (it may have committed: query
    it by id)."""

    code = "STREAM_BROKEN"


class _Call:
    """One SubmitFrames call: what waits for an answer on it, and what waits to be sent."""

    def __init__(self, stub: Any) -> None:
        self.rpc = stub.SubmitFrames()
        self.waiting: dict[int, asyncio.Future[node_pb2.SubmitResponse]] = {}
        self.queued: list[node_pb2.SubmitRequest] = []
        self.writer: asyncio.Task[None] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.ended = False

    def fail(self, error: Exception) -> None:
        self.ended = True
        self.queued.clear()
        waiting, self.waiting = self.waiting, {}
        for fut in waiting.values():
            if not fut.done():
                fut.set_exception(error)


class SubmitStream:
    """Submissions over one SubmitFrames call of `stub` (an ExchangeStub on a grpc.aio
    channel): `await submit(envelope)` from any number of coroutines at once."""

    def __init__(self, stub: Any, frame_requests_max: int = FRAME_REQUESTS_MAX,
                 frame_bytes_max: int = FRAME_BYTES_MAX) -> None:
        assert frame_requests_max >= 1 and frame_bytes_max >= 1
        self._stub = stub
        self._frame_requests_max = frame_requests_max
        self._frame_bytes_max = frame_bytes_max
        self._call: _Call | None = None
        self._seq = 0
        self.frames_sent = 0  # how many frames carried the submissions (for tests, bench)

    def _open(self) -> _Call:
        call = _Call(self._stub)
        call.reader = asyncio.create_task(self._read(call))
        self._call = call
        return call

    async def _read(self, call: _Call) -> None:
        error: Exception = StreamBroken("the submit stream ended")
        try:
            async for answers in call.rpc:
                for response in answers.responses:
                    fut = call.waiting.pop(response.seq, None)
                    if fut is not None and not fut.done():
                        fut.set_result(response)
        except grpc.aio.AioRpcError as exc:
            error = exc
        if self._call is call:
            self._call = None
        call.fail(error)

    def _next_frame(self, call: _Call) -> list[node_pb2.SubmitRequest]:
        """The queued requests that fit in one frame (at least one), oldest first."""
        size = 0
        n = 0
        for r in call.queued[:self._frame_requests_max]:
            size += len(r.envelope)
            if n and size > self._frame_bytes_max:
                break
            n += 1
        frame, call.queued[:n] = call.queued[:n], []
        return frame

    async def _write(self, call: _Call) -> None:
        """Send what is queued, a frame at a time, until nothing is."""
        try:
            while call.queued and not call.ended:
                await call.rpc.write(node_pb2.SubmitFrame(requests=self._next_frame(call)))
                self.frames_sent += 1
        except (grpc.aio.UsageError, asyncio.InvalidStateError, grpc.aio.AioRpcError) as exc:
            if self._call is call:
                self._call = None
            call.fail(StreamBroken(f"the submit stream ended: {exc}"))

    async def submit(self, envelope: bytes, timeout_s: float, no_wait: bool = False
                     ) -> node_pb2.SubmitResponse:
        """The node's answer to one envelope. Raises grpc.aio.AioRpcError or
        StreamBroken when the stream fails, TimeoutError after `timeout_s`."""
        call = self._call or self._open()
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[node_pb2.SubmitResponse] = \
            asyncio.get_running_loop().create_future()
        call.waiting[seq] = fut
        call.queued.append(node_pb2.SubmitRequest(envelope=envelope, seq=seq,
                                                  no_wait=no_wait))
        if call.writer is None or call.writer.done():
            call.writer = asyncio.create_task(self._write(call))
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            call.waiting.pop(seq, None)

    async def close(self) -> None:
        """Send what is queued, say no more requests come and wait for the stream to
        end."""
        call = self._call
        if call is None:
            return
        if call.writer is not None:
            await call.writer
        with contextlib.suppress(grpc.aio.UsageError, asyncio.InvalidStateError):
            await call.rpc.done_writing()
        if call.reader is not None:
            await call.reader
