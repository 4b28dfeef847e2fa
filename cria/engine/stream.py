"""RequestStream: the engine's answer to one request, as an async iterator of Deltas."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from cria.engine.types import Delta
from cria.errors import CriaError


class _Closed:
    """Queued by RequestStream.close() to wake a waiting reader."""


_CLOSED = _Closed()


class RequestStream:
    """The Deltas of one request, as an async iterator. Closing it before the last Delta
    (client gone) aborts the request; the engine frees its slot at the next step."""

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.adapter: str | None = None  # the request's LoRA adapter (its metrics' model label)
        self._abort = abort
        self._queue: asyncio.Queue[Delta | CriaError | _Closed] = asyncio.Queue()
        self._pending: Delta | CriaError | _Closed | None = None
        self._is_finished = False

    def put(self, item: Delta | CriaError | _Closed) -> None:
        """Called on the event loop (the engine hands items over with call_soon_threadsafe)."""
        self._queue.put_nowait(item)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Delta:
        """The next Delta; Deltas that queued up while the reader was busy come merged into
        one, so a reader that falls behind (many streams) catches up in fewer, larger chunks."""
        if self._is_finished:
            raise StopAsyncIteration
        item = self._pending if self._pending is not None else await self._queue.get()
        self._pending = None
        if isinstance(item, _Closed) or self._is_finished:  # closed while we waited
            self._is_finished = True
            raise StopAsyncIteration
        if isinstance(item, CriaError):
            self._is_finished = True
            raise item
        queue = self._queue
        while item.finish_reason is None and not queue.empty():
            nxt = queue.get_nowait()
            if not isinstance(nxt, Delta):  # an error or the close marker: hand it out next
                self._pending = nxt
                break
            item = Delta(
                item.text + nxt.text,
                item.n_tokens + nxt.n_tokens,
                nxt.finish_reason,
                nxt.usage,
                nxt.timings,
                item.logprobs + nxt.logprobs,
                item.prompt_logprobs if item.prompt_logprobs is not None else nxt.prompt_logprobs,
            )
        if item.finish_reason is not None:
            self._is_finished = True
        return item

    def close(self) -> None:
        """Abort the request if it is still running; a reader waiting on it stops."""
        if not self._is_finished:
            self._is_finished = True
            self._abort(self.request_id)
            self._queue.put_nowait(_CLOSED)

    async def aclose(self) -> None:
        self.close()
