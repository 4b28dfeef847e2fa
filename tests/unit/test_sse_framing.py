"""SSE framing with real Starlette requests: errors after headers, [DONE], disconnects."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request

from cria.api.sse import DONE, _frames
from cria.errors import Overloaded

Receive = Callable[[], Awaitable[dict[str, Any]]]


def make_request(receive: Receive) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}
    return Request(scope, receive=receive)


async def never_disconnects() -> dict[str, Any]:
    await asyncio.Event().wait()
    raise AssertionError("unreachable")


async def collect(request: Request, events: AsyncIterator[dict[str, Any]]) -> list[bytes]:
    return [frame async for frame in _frames(request, events)]


def test_events_then_done() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}
        yield {"n": 2}

    frames = asyncio.run(collect(make_request(never_disconnects), events()))
    assert frames == [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', DONE]


def test_error_after_headers_is_an_error_event_then_done() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}
        raise Overloaded("busy")

    frames = asyncio.run(collect(make_request(never_disconnects), events()))
    assert frames[0] == b'data: {"n":1}\n\n'
    assert frames[-1] == DONE and len(frames) == 3
    body = json.loads(frames[1][len(b"data: ") :])
    assert body == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "server_overloaded"}}


def test_unexpected_exception_is_a_server_error_event() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        raise RuntimeError("boom")
        yield {}  # pragma: no cover - makes this an async generator

    frames = asyncio.run(collect(make_request(never_disconnects), events()))
    assert len(frames) == 2 and frames[-1] == DONE
    error = json.loads(frames[0][len(b"data: ") :])["error"]
    assert error["type"] == "server_error" and "boom" not in error["message"]


def test_disconnect_closes_the_event_source() -> None:
    closed = asyncio.Event()
    gate = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gate.wait()
        return {"type": "http.disconnect"}

    async def events() -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"n": 1}
            gate.set()  # the client leaves while the next event is awaited
            await asyncio.Event().wait()
            yield {"n": 2}
        finally:
            closed.set()

    async def run() -> list[bytes]:
        frames = await asyncio.wait_for(collect(make_request(receive), events()), timeout=5)
        assert closed.is_set()
        return frames

    frames = asyncio.run(run())
    assert frames == [b'data: {"n":1}\n\n']  # no [DONE] to a client that is gone
