"""The only SSE framing: `data: {json}` events, an error event after headers, keep-alives,
`data: [DONE]`, and cancellation when the client goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from cria.api.errors import dumps, error_body
from cria.api.lifecycle import wait_for_disconnect
from cria.errors import CriaError, EngineFailure

log = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"
KEEPALIVE_SECONDS = 15.0


def event(body: Any) -> bytes:
    return b"data: " + dumps(body).encode("utf-8") + b"\n\n"


async def _frames(request: Request, events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Frame `events` as SSE. A disconnect cancels the event source (which aborts its engine
    requests); an error after the headers went out becomes an error event, then [DONE]."""
    gone: asyncio.Future[Any] = asyncio.ensure_future(wait_for_disconnect(request))
    pending: asyncio.Future[Any] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait(
                {pending, gone}, timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if gone in done:
                return
            if not done:
                yield KEEPALIVE
                continue
            task, pending = pending, None
            try:
                body = task.result()
            except StopAsyncIteration:
                break
            except CriaError as exc:
                yield event(error_body(exc))
                break
            except Exception:
                log.exception("stream failed")
                yield event(error_body(EngineFailure("internal server error")))
                break
            yield event(body)
        yield DONE
    finally:
        gone.cancel()
        if pending is not None:
            # The cancellation reaches the generator inside its own task; wait for it to
            # unwind there, or aclose() below would find the generator still running.
            pending.cancel()
            await asyncio.wait({pending})
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def sse_response(request: Request, events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    return StreamingResponse(
        _frames(request, events),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
