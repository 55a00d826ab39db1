"""The error catalogue: one code-to-class table that the node's server and the client
both read, and the one interceptor that turns domain errors into statuses."""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

import agents
import exchange
from exchange import errors
from exchange.client import map_rpc_error
from exchange.node import server

BASES = (errors.BadInput, errors.NotAllowed, errors.NotAvailable, errors.Conflict)


class _Failed(grpc.RpcError):  # type: ignore[misc]
    """A failed call as the client sees it."""

    def __init__(self, status: grpc.StatusCode, details: str,
                 trailing: tuple[tuple[str, str], ...] = ()) -> None:
        self._status, self._details, self._trailing = status, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._status

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._trailing


def _all_modules() -> None:
    """Import every module of the project, so every ExchangeError subclass exists."""
    for package in (exchange, agents):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".v1." in info.name or info.name.endswith("__main__"):
                continue
            importlib.import_module(info.name)


def _subclasses(cls: type[errors.ExchangeError]) -> list[type[errors.ExchangeError]]:
    found, pending = [], [cls]
    while pending:
        for sub in pending.pop().__subclasses__():
            found.append(sub)
            pending.append(sub)
    return found


def test_every_catalogue_class_is_under_one_base_and_found_by_its_code() -> None:
    for cls in errors.CATALOGUE:
        assert errors.BY_CODE[cls.code] is cls
        assert cls in BASES or cls is errors.NodeError or \
            sum(issubclass(cls, base) for base in BASES) == 1, cls
        grpc.StatusCode[cls.status]  # a real status name


def test_no_error_outside_the_catalogue_takes_a_catalogue_code_of_another_class() -> None:
    """A class elsewhere either inherits its catalogue parent's code or has a code of its
    own, so a code on the wire never names two classes, whatever is imported."""
    _all_modules()
    for cls in _subclasses(errors.ExchangeError):
        own = cls.__dict__.get("code")
        if own is not None and cls not in errors.CATALOGUE:
            assert own not in errors.BY_CODE, f"{cls.__qualname__} reuses {own}"


def test_error_for_code_names_the_catalogue_class_or_keeps_an_unknown_code() -> None:
    refused = errors.error_for_code("TIME_OUT_OF_WINDOW", "too late")
    assert type(refused) is errors.TimeOutOfWindow and str(refused) == "too late"
    limited = errors.error_for_code("RATE_LIMITED", "slow down", retry_after_ms=250)
    assert type(limited) is errors.RateLimited and limited.retry_after_ms == 250
    newer = errors.error_for_code("SOME_NEWER_CODE", "from a newer node")
    assert type(newer) is errors.ExchangeError and newer.code == "SOME_NEWER_CODE"


@pytest.mark.parametrize("cls", [c for c in errors.CATALOGUE if c.status != "UNAVAILABLE"],
                         ids=lambda c: c.code)
def test_the_client_reads_back_the_class_and_code_the_server_answers_with(
        cls: type[errors.ExchangeError]) -> None:
    sent = errors.error_for_code(cls.code, "the reason", retry_after_ms=7)
    trailing = ((errors.RETRY_AFTER_KEY, "7"),) if cls is errors.RateLimited else ()
    failed = _Failed(server.status_of(sent), f"{sent.code}: {sent}", trailing)
    read = map_rpc_error(failed, "127.0.0.1:1")
    assert (type(read), read.code) == (cls, cls.code)
    assert "the reason" in str(read) or cls is errors.NodeTimeout
    if cls is errors.RateLimited:
        assert isinstance(read, errors.RateLimited) and read.retry_after_ms == 7


def test_an_unavailable_node_reads_as_node_unavailable_with_its_reason() -> None:
    failed = _Failed(grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE: no leader to forward to")
    read = map_rpc_error(failed, "127.0.0.1:1")
    assert (type(read), read.code) == (errors.NodeUnavailable, "NODE_UNAVAILABLE")
    assert "no leader to forward to" in str(read)


# -- the interceptor, on a real in-process server ----------------------------------------

def _handlers(slow_ended: asyncio.Event | None = None) -> grpc.GenericRpcHandler:
    def decode(raw: bytes) -> bytes:
        return raw

    async def slow(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            await asyncio.Event().wait()  # never set: only the deadline ends it
        finally:
            if slow_ended is not None:
                slow_ended.set()
        return b"never"

    async def limited(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.RateLimited("over the agency's rate", retry_after_ms=1_500)

    async def fine(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return b"ok:" + request

    async def huge(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        raise errors.MalformedInput("x" * 100_000)

    async def stream(request: bytes, context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[bytes]:
        yield b"first"
        raise errors.NotFound("no block 9")

    def unary(fn: Any) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(fn, decode, decode)

    return grpc.method_handlers_generic_handler("test.v1.Edge", {
        "Limited": unary(limited), "Fine": unary(fine), "Huge": unary(huge),
        "Slow": unary(slow),
        "Stream": grpc.unary_stream_rpc_method_handler(stream, decode, decode)})


async def _calls() -> dict[str, Any]:
    srv = grpc.aio.server(interceptors=[server._Edge()])
    srv.add_generic_rpc_handlers((_handlers(),))
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    out: dict[str, Any] = {}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            def call(name: str) -> Any:
                return channel.unary_unary(f"/test.v1.Edge/{name}")
            out["fine"] = await call("Fine")(b"x", timeout=10)
            for name in ("Limited", "Huge"):
                try:
                    await call(name)(b"x", timeout=10)
                except grpc.aio.AioRpcError as exc:
                    out[name] = exc
            got: list[bytes] = []
            try:
                async for item in channel.unary_stream("/test.v1.Edge/Stream")(b"x", timeout=10):
                    got.append(item)
            except grpc.aio.AioRpcError as exc:
                out["Stream"] = (got, exc)
    finally:
        await srv.stop(None)
    return out


def test_the_interceptor_answers_domain_errors_with_their_status_code_and_reason() -> None:
    out = asyncio.run(_calls())
    assert out["fine"] == b"ok:x"
    limited = out["Limited"]
    assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert limited.details() == "RATE_LIMITED: over the agency's rate"
    assert dict(limited.trailing_metadata())[errors.RETRY_AFTER_KEY] == "1500"
    read = map_rpc_error(limited, "here")
    assert (type(read), read.code) == (errors.RateLimited, "RATE_LIMITED")
    assert isinstance(read, errors.RateLimited) and read.retry_after_ms == 1_500
    huge = out["Huge"]
    assert huge.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert huge.details().startswith("MALFORMED: xxx") and "characters cut" in huge.details()
    assert len(huge.details()) < server.DETAILS_CHARS_MAX + 100
    got, stream = out["Stream"]
    assert got == [b"first"]
    assert (stream.code(), stream.details()) == (grpc.StatusCode.NOT_FOUND,
                                                 "NOT_FOUND: no block 9")


def _metric(name: str, **labels: str) -> float:
    from exchange.node import metrics

    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def _past_deadline() -> tuple[grpc.StatusCode, bool]:
    ended = asyncio.Event()
    srv = grpc.aio.server(interceptors=[server._Edge()])
    srv.add_generic_rpc_handlers((_handlers(ended),))
    port = srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                await channel.unary_unary("/test.v1.Edge/Slow")(b"x", timeout=0.2)
                status = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                status = exc.code()
        await asyncio.wait_for(ended.wait(), timeout=30)  # waits for the condition
        return status, ended.is_set()
    finally:
        await srv.stop(None)


def test_a_call_past_its_deadline_has_its_handler_cancelled_and_counted() -> None:
    cancelled_before = _metric("exchange_grpc_cancelled_total", method="Edge.Slow")
    status, ended = asyncio.run(_past_deadline())
    assert status == grpc.StatusCode.DEADLINE_EXCEEDED and ended
    assert _metric("exchange_grpc_cancelled_total", method="Edge.Slow") == \
        cancelled_before + 1


def test_each_refusal_is_counted_by_method_and_code() -> None:
    before = _metric("exchange_grpc_refused_total", method="Edge.Limited", code="RATE_LIMITED")
    asyncio.run(_calls())
    assert _metric("exchange_grpc_refused_total", method="Edge.Limited",
                   code="RATE_LIMITED") == before + 1
    assert _metric("exchange_grpc_seconds_count", method="Edge.Stream") >= 1
