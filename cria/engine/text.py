"""Incremental, UTF-8-safe detokenization and stop-string matching. Pure logic."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class Detokenizer:
    """Turns the byte pieces of tokens into text, one token at a time.

    A character split across tokens (a multi-byte UTF-8 sequence) is held back until it is
    complete, so the text never contains a broken character. Invalid bytes become U+FFFD.
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, piece: bytes) -> str:
        return self._decoder.decode(piece, final=False)

    def flush(self) -> str:
        """The text still held back at the end of generation (a truncated character → U+FFFD)."""
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Finds stop strings in a stream of text, across token boundaries.

    `push` returns the text that is safe to emit and whether a stop string was reached. Text
    that could be the start of a stop string is held back until it is known not to be; the stop
    string itself (and anything after it) is never emitted.
    """

    __slots__ = ("_held", "_stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._held + text
        first: int | None = None
        for stop in self._stops:
            at = buffer.find(stop)
            if at != -1 and (first is None or at < first):
                first = at
        if first is not None:
            self._held = ""
            return buffer[:first], True
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        """Text held back when generation ends without a stop string."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best
