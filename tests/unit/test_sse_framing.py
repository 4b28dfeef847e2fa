"""SSE framing over a real ASGI exchange: errors after headers, [DONE], disconnects, keep-alives."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from cria.api.sse import DONE, KEEPALIVE, SSEResponse
from cria.errors import Overloaded

SCOPE = {"type": "http", "method": "POST", "path": "/", "headers": [], "query_string": b""}


class Exchange:
    """The server side of one HTTP exchange: what the app sent, and a client that may leave."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.leave = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def body(self) -> list[bytes]:
        return [m["body"] for m in self.sent if m["type"] == "http.response.body" and m["body"]]


async def serve(response: SSEResponse, exchange: Exchange) -> None:
    await asyncio.wait_for(response(SCOPE, exchange.receive, exchange.send), timeout=5)


def test_events_then_done() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}
        yield {"n": 2}

    async def run() -> Exchange:
        ex = Exchange()
        await serve(SSEResponse(events(), on_disconnect=lambda: None), ex)
        return ex

    ex = asyncio.run(run())
    assert ex.sent[0]["type"] == "http.response.start" and ex.sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in ex.sent[0]["headers"]
    assert ex.body == [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', DONE]
    assert ex.sent[-1]["more_body"] is False


def test_error_after_headers_is_an_error_event_then_done() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        yield {"n": 1}
        raise Overloaded("busy")

    async def run() -> Exchange:
        ex = Exchange()
        await serve(SSEResponse(events(), on_disconnect=lambda: None), ex)
        return ex

    body = asyncio.run(run()).body
    assert body[0] == b'data: {"n":1}\n\n' and body[-1] == DONE and len(body) == 3
    error = json.loads(body[1][len(b"data: ") :])
    assert error == {"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": "server_overloaded"}}


def test_unexpected_exception_is_a_server_error_event() -> None:
    async def events() -> AsyncIterator[dict[str, Any]]:
        raise RuntimeError("boom")
        yield {}  # pragma: no cover - makes this an async generator

    async def run() -> Exchange:
        ex = Exchange()
        await serve(SSEResponse(events(), on_disconnect=lambda: None), ex)
        return ex

    body = asyncio.run(run()).body
    assert len(body) == 2 and body[-1] == DONE
    error = json.loads(body[0][len(b"data: ") :])["error"]
    assert error["type"] == "server_error" and "boom" not in error["message"]


def test_disconnect_calls_back_and_the_source_ends() -> None:
    async def run() -> tuple[Exchange, list[str]]:
        ex = Exchange()
        calls: list[str] = []
        wake = asyncio.Event()

        async def events() -> AsyncIterator[dict[str, Any]]:
            yield {"n": 1}
            ex.leave.set()  # the client leaves while the next event is awaited
            await wake.wait()  # as a RequestStream's reader waits, until closed

        def on_disconnect() -> None:
            calls.append("gone")
            wake.set()

        await serve(SSEResponse(events(), on_disconnect=on_disconnect), ex)
        return ex, calls

    ex, calls = asyncio.run(run())
    assert calls == ["gone"]
    assert ex.body == [b'data: {"n":1}\n\n']  # nothing more is written to a client that left


def test_keepalive_while_idle() -> None:
    async def run() -> Exchange:
        ex = Exchange()

        async def events() -> AsyncIterator[dict[str, Any]]:
            await asyncio.sleep(0.35)
            yield {"n": 1}

        await serve(SSEResponse(events(), on_disconnect=lambda: None, keepalive_seconds=0.1), ex)
        return ex

    body = asyncio.run(run()).body
    assert body[0] == KEEPALIVE and body.count(KEEPALIVE) >= 2
    assert body[-2:] == [b'data: {"n":1}\n\n', DONE]
