"""SubmitFrames: submissions many to a stream message, answers many to a message.

A client puts every request it has ready into one frame; the node admits a frame in one
pass and puts it on its way to the leader as one forward, and answers that become ready
together (those of one block) leave as one message. gRPC's per-message cost is paid
once per frame instead of once per transaction (BENCHMARKS.md, issue 20).

Bounds: a frame holds at most FRAME_REQUESTS_MAX requests and FRAME_BYTES_MAX bytes of
envelopes (a larger one has each of its requests refused, and the stream goes on); at
most INFLIGHT_MAX requests of a stream wait for answers (reading waits beyond that); an
answers message holds at most ANSWERS_MAX answers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from exchange import errors
from exchange.node.auth import Auth, Caller
from exchange.node.mempool import refusal
from exchange.v1 import node_pb2

FRAME_REQUESTS_MAX = 256
FRAME_BYTES_MAX = 8 << 20
INFLIGHT_MAX = 1_024
ANSWERS_MAX = 1_024

# (envelopes, wait for each, rate-limited, answer(i, response)): admits and answers each
SubmitFrame = Callable[[Sequence[bytes], Sequence[bool], bool,
                        Callable[[int, node_pb2.SubmitResponse], None]], Awaitable[None]]


def frame_refusal(frame: node_pb2.SubmitFrame, requests_max: int = FRAME_REQUESTS_MAX,
                  bytes_max: int = FRAME_BYTES_MAX) -> errors.ExchangeError | None:
    """Why a frame is refused whole (too many requests or bytes), or None."""
    if len(frame.requests) > requests_max:
        return errors.Oversize(f"a frame holds at most {requests_max} requests "
                               f"(this one {len(frame.requests)})")
    size = sum(len(r.envelope) for r in frame.requests)
    if size > bytes_max:
        return errors.Oversize(f"a frame holds at most {bytes_max} bytes of envelopes "
                               f"(this one {size})")
    return None


class FrameSession:
    """One SubmitFrames call: reads frames, has each admitted as a whole, and yields the
    answers ready at once as one message."""

    def __init__(self, auth: Auth, caller: Caller, submit: SubmitFrame,
                 inflight_max: int = INFLIGHT_MAX, answers_max: int = ANSWERS_MAX,
                 requests_max: int = FRAME_REQUESTS_MAX,
                 bytes_max: int = FRAME_BYTES_MAX) -> None:
        self._auth = auth
        self._caller = caller
        self._submit = submit
        self._inflight_max = inflight_max
        self._answers_max = answers_max
        self._requests_max = requests_max
        self._bytes_max = bytes_max
        self._inflight = 0
        self._room = asyncio.Event()
        self._room.set()
        self._ready: list[node_pb2.SubmitResponse] = []
        self._wake = asyncio.Event()
        self._ended = False  # the client sent its last frame
        self._error: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, frames: AsyncIterator[node_pb2.SubmitFrame]
                  ) -> AsyncIterator[node_pb2.SubmitAnswers]:
        reader = asyncio.create_task(self._read(frames))
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._error is not None:
                    raise self._error
                while self._ready:
                    batch = self._ready[:self._answers_max]
                    del self._ready[:self._answers_max]
                    yield node_pb2.SubmitAnswers(responses=batch)
                if self._ended and self._inflight == 0:
                    return
        finally:
            reader.cancel()
            for task in list(self._tasks):
                task.cancel()

    async def _read(self, frames: AsyncIterator[node_pb2.SubmitFrame]) -> None:
        try:
            async for frame in frames:
                n = len(frame.requests)
                while self._inflight and self._inflight + n > self._inflight_max:
                    self._room.clear()
                    await self._room.wait()
                self._inflight += n
                task = asyncio.create_task(self._one(frame))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            self._ended = True
        except BaseException as exc:  # noqa: BLE001 - raised by the call in run()
            self._error = exc
        self._wake.set()

    async def _one(self, frame: node_pb2.SubmitFrame) -> None:
        requests = list(frame.requests)
        answered = [False] * len(requests)

        def answer(i: int, response: node_pb2.SubmitResponse) -> None:
            if answered[i]:
                return
            answered[i] = True
            response.seq = requests[i].seq
            self._ready.append(response)
            self._inflight -= 1
            self._room.set()  # the reader checks again whether its frame fits
            self._wake.set()

        try:
            whole = frame_refusal(frame, self._requests_max, self._bytes_max)
            if whole is not None:
                raise whole
            # the credential is checked again for each frame: revoked, it submits nothing
            caller = self._auth.recheck(self._caller)
            await self._submit([r.envelope for r in requests],
                               [not r.no_wait for r in requests],
                               not caller.who.is_node, answer)
        except errors.ExchangeError as exc:
            for i in range(len(requests)):
                answer(i, refusal(exc))
