"""The only SSE framing: `data: {json}` events, an error event after headers, keep-alives,
`data: [DONE]`, and cancellation when the client goes away.

`SSEResponse` is a plain ASGI response rather than Starlette's StreamingResponse: it costs one
`send` per event and nothing else (no task or wait set per event, which at 64 streams and GPU
step times is what the event loop would otherwise spend its time on). Two helper tasks per
response, not per event: one notices the client leaving, one sends keep-alives while idle.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from cria.api.errors import dumps, error_body
from cria.errors import CriaError, EngineFailure

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_SECONDS = 15.0
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def event(body: Any) -> bytes:
    """An SSE event of `body`: a dict to encode, or JSON already encoded (str)."""
    text = body if isinstance(body, str) else dumps(body)
    return b"data: " + text.encode("utf-8") + b"\n\n"


async def frames(
    events: AsyncIterator[dict[str, Any] | str], *, on_error: Callable[[CriaError], None] | None = None
) -> AsyncGenerator[bytes, None]:
    """Frame `events` as SSE: each event, then [DONE]. An error raised after the headers went
    out becomes an error event (told to `on_error`), then [DONE]."""
    error: CriaError | None = None
    try:
        async for body in events:
            yield event(body)
    except CriaError as exc:
        error = exc
    except Exception:
        log.exception("stream failed")
        error = EngineFailure("internal server error")
    if error is not None:
        if on_error is not None:
            on_error(error)
        yield event(error_body(error))
    yield DONE


class SSEResponse(Response):
    def __init__(
        self,
        events: AsyncIterator[dict[str, Any] | str],
        *,
        on_disconnect: Callable[[], None],
        on_error: Callable[[CriaError], None] | None = None,
        keepalive_seconds: float = KEEPALIVE_SECONDS,
        headers: dict[str, str] | None = None,
    ) -> None:
        """`on_disconnect` is called once if the client leaves: it must make `events` end
        (closing the engine streams does: their readers wake and stop). `on_error` is told
        about an error sent as an SSE event."""
        self.status_code = 200
        self.background = None
        self._events = events
        self._on_disconnect = on_disconnect
        self._keepalive_seconds = keepalive_seconds
        self._on_error = on_error
        self._start_headers = _HEADERS + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        lock = asyncio.Lock()  # the keep-alive task and the event loop below share `send`
        state = {"last_sent": loop.time(), "is_gone": False}

        async def send_body(data: bytes, *, more: bool = True) -> None:
            if state["is_gone"]:
                return
            message: Message = {"type": "http.response.body", "body": data, "more_body": more}
            async with lock:
                try:
                    await send(message)
                except OSError:  # the client went away mid-write
                    gone()
            state["last_sent"] = loop.time()

        def gone() -> None:
            if not state["is_gone"]:
                state["is_gone"] = True
                self._on_disconnect()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone()

        async def keepalive() -> None:
            while True:
                await asyncio.sleep(self._keepalive_seconds)
                if loop.time() - float(state["last_sent"]) >= self._keepalive_seconds:
                    await send_body(KEEPALIVE)

        await send({"type": "http.response.start", "status": 200, "headers": self._start_headers})
        self.status_code = 200
        helpers = [asyncio.ensure_future(watch()), asyncio.ensure_future(keepalive())]
        stream = frames(self._events, on_error=self._on_error)
        try:
            async for frame in stream:
                await send_body(frame)
            await send_body(b"", more=False)
        finally:
            for task in helpers:
                task.cancel()
            await stream.aclose()
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:
                await aclose()
