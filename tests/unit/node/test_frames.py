"""SubmitFrames sessions (exchange.node.frames): answers matched by seq and sent together
when ready together, whole-frame refusals, the in-flight bound, the credential checked
for each frame, and the stream ending only once everything read is answered. The node
behind the session is a scripted one here; tests/cluster/test_node_api.py runs the
real one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

from exchange.errors import CredentialInvalid
from exchange.node.auth import Auth, Caller
from exchange.node.frames import FrameSession, frame_refusal
from exchange.v1 import node_pb2

Answer = Callable[[int, node_pb2.SubmitResponse], None]


class Person:
    is_node = False


class Checks:
    """Auth.recheck as the session uses it: the caller again, or CredentialInvalid once
    revoked."""

    def __init__(self) -> None:
        self.revoked = False
        self.rechecked = 0

    def recheck(self, caller: Caller) -> Caller:
        self.rechecked += 1
        if self.revoked:
            raise CredentialInvalid("credential revoked at height 9")
        return caller


class ScriptedNode:
    """Admits every envelope; answers b"refuse..." at once with a refusal and the others
    when the test releases them."""

    def __init__(self) -> None:
        self.held: list[tuple[Answer, int, bytes]] = []
        self.frames: list[list[bytes]] = []

    async def submit_frame(self, raws: Sequence[bytes], waits: Sequence[bool],
                           limited: bool, answer: Answer) -> None:
        assert limited  # a person's submissions are rate-limited
        self.frames.append(list(raws))
        for i, raw in enumerate(raws):
            if raw.startswith(b"refuse"):
                answer(i, node_pb2.SubmitResponse(error_code="BAD_SIGNATURE"))
            else:
                self.held.append((answer, i, raw))

    def release(self) -> None:
        held, self.held = self.held, []
        for answer, i, raw in held:
            answer(i, node_pb2.SubmitResponse(status="committed", tx_id=raw))


def _frame(*items: tuple[int, bytes]) -> node_pb2.SubmitFrame:
    return node_pb2.SubmitFrame(requests=[node_pb2.SubmitRequest(seq=s, envelope=e)
                                          for s, e in items])


class Client:
    """The client's side of one session: frames in, answer messages out."""

    def __init__(self, session: FrameSession) -> None:
        self.frames: asyncio.Queue[node_pb2.SubmitFrame | None] = asyncio.Queue()
        self.messages: list[node_pb2.SubmitAnswers] = []
        self.task = asyncio.create_task(self._run(session))

    async def _frames(self) -> AsyncIterator[node_pb2.SubmitFrame]:
        while (frame := await self.frames.get()) is not None:
            yield frame

    async def _run(self, session: FrameSession) -> None:
        async for message in session.run(self._frames()):
            self.messages.append(message)

    def answers(self) -> dict[int, node_pb2.SubmitResponse]:
        return {r.seq: r for m in self.messages for r in m.responses}


async def _settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def _session(node: ScriptedNode, checks: Checks, **bounds: Any) -> FrameSession:
    caller = cast(Caller, type("C", (), {"who": Person()})())
    return FrameSession(cast(Auth, checks), caller, node.submit_frame, **bounds)


def test_answers_ready_together_leave_as_one_message_each_with_its_seq() -> None:
    async def body() -> None:
        node, checks = ScriptedNode(), Checks()
        client = Client(_session(node, checks))
        client.frames.put_nowait(_frame((1, b"a"), (2, b"refuse"), (3, b"b")))
        await _settle()
        assert [[r.seq for r in m.responses] for m in client.messages] == [[2]]  # at once
        node.release()
        await _settle()
        assert [[r.seq for r in m.responses] for m in client.messages] == [[2], [1, 3]]
        answers = client.answers()
        assert answers[1].tx_id == b"a" and answers[3].tx_id == b"b"
        assert answers[2].error_code == "BAD_SIGNATURE"
        assert node.frames == [[b"a", b"refuse", b"b"]]  # admitted as one frame
        client.frames.put_nowait(None)
        await asyncio.wait_for(client.task, 1)

    asyncio.run(body())


def test_the_stream_ends_only_once_everything_read_is_answered() -> None:
    async def body() -> None:
        node, checks = ScriptedNode(), Checks()
        client = Client(_session(node, checks))
        client.frames.put_nowait(_frame((1, b"a")))
        client.frames.put_nowait(None)  # the client is done writing
        await _settle()
        assert not client.task.done()
        node.release()
        await asyncio.wait_for(client.task, 1)
        assert sorted(client.answers()) == [1]

    asyncio.run(body())


def test_an_oversize_frame_is_refused_whole_and_the_stream_goes_on() -> None:
    async def body() -> None:
        node, checks = ScriptedNode(), Checks()
        client = Client(_session(node, checks, requests_max=2, bytes_max=10))
        client.frames.put_nowait(_frame((1, b"a"), (2, b"b"), (3, b"c")))  # 3 requests
        client.frames.put_nowait(_frame((4, b"x" * 6), (5, b"y" * 6)))  # 12 bytes
        client.frames.put_nowait(_frame((6, b"ok")))
        await _settle()
        node.release()
        await _settle()
        answers = client.answers()
        assert {s: answers[s].error_code for s in range(1, 6)} == dict.fromkeys(
            range(1, 6), "OVERSIZE")
        assert "at most 2 requests" in answers[1].error
        assert "at most 10 bytes" in answers[4].error
        assert answers[6].status == "committed"
        assert node.frames == [[b"ok"]]  # nothing of the refused frames was admitted
        client.frames.put_nowait(None)
        await asyncio.wait_for(client.task, 1)

    asyncio.run(body())


def test_reading_waits_while_the_in_flight_bound_is_reached() -> None:
    async def body() -> None:
        node, checks = ScriptedNode(), Checks()
        client = Client(_session(node, checks, inflight_max=4))
        for seq in (1, 3, 5):
            client.frames.put_nowait(_frame((seq, b"a"), (seq + 1, b"b")))
        await _settle()
        assert len(node.frames) == 2  # 4 in flight: the third frame waits unread
        node.release()
        await _settle()
        assert len(node.frames) == 3
        node.release()
        await _settle()
        assert sorted(client.answers()) == [1, 2, 3, 4, 5, 6]
        client.frames.put_nowait(None)
        await asyncio.wait_for(client.task, 1)

    asyncio.run(body())


def test_a_frame_after_the_callers_credential_is_revoked_submits_nothing() -> None:
    async def body() -> None:
        node, checks = ScriptedNode(), Checks()
        client = Client(_session(node, checks))
        client.frames.put_nowait(_frame((1, b"a")))
        await _settle()
        checks.revoked = True
        client.frames.put_nowait(_frame((2, b"b"), (3, b"c")))
        await _settle()
        node.release()
        await _settle()
        answers = client.answers()
        assert answers[1].status == "committed"
        assert (answers[2].error_code, answers[3].error_code) == ("CREDENTIAL_INVALID",) * 2
        assert "revoked" in answers[2].error
        assert node.frames == [[b"a"]] and checks.rechecked == 2
        client.frames.put_nowait(None)
        await asyncio.wait_for(client.task, 1)

    asyncio.run(body())


def test_frame_refusal_names_the_bound_passed() -> None:
    ok = _frame((1, b"abc"), (2, b"de"))
    assert frame_refusal(ok, requests_max=2, bytes_max=5) is None
    assert frame_refusal(ok, requests_max=1, bytes_max=5) is not None
    assert frame_refusal(ok, requests_max=2, bytes_max=4) is not None
