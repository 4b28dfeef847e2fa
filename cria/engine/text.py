"""Incremental, UTF-8-safe detokenization and stop-string matching. Pure logic."""

from __future__ import annotations

import codecs
import json
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

    __slots__ = ("_held", "_repeats", "_stops")

    def __init__(self, stops: Sequence[str], *, repeated_block: tuple[str, str] | None = None) -> None:
        """`repeated_block` (open, close): also stop right after a block from `open` to `close`
        that repeats an earlier one of the output (see `RepeatedBlocks`)."""
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self._repeats = RepeatedBlocks(*repeated_block) if repeated_block else None

    def push(self, text: str) -> tuple[str, bool]:
        out, is_stopped = self._push(text)
        if self._repeats is not None and out:
            at = self._repeats.push(out)
            if at is not None:
                self._held = ""
                return out[:at], True
        return out, is_stopped

    def _push(self, text: str) -> tuple[str, bool]:
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


class RepeatedBlocks:
    """Finds the first block of a text stream (from `open` to the next `close`) that repeats an
    earlier block: the same JSON value between the markers if it parses, else the same text
    (whitespace at either end aside). A model that loops writes the same tool call again and
    again; the engine stops it at the first repeat.
    """

    __slots__ = ("_buf", "_close", "_open", "_seen")

    def __init__(self, open: str, close: str) -> None:
        if not open or not close:
            raise ValueError("both markers must be non-empty")
        self._open, self._close = open, close
        self._buf = ""  # from the current block's opening marker, or a tail that may begin one
        self._seen: set[str] = set()

    def push(self, text: str) -> int | None:
        """The offset in `text` just after the first repeated block's closing marker, or None."""
        start = len(self._buf)  # where `text` begins in the buffer
        buf = self._buf = self._buf + text
        while True:
            at = buf.find(self._open)
            if at < 0:
                keep = len(self._open) - 1
                self._buf = buf[len(buf) - keep :] if len(buf) > keep else buf
                return None
            end = buf.find(self._close, at + len(self._open))
            if end < 0:
                self._buf = buf[at:]
                return None
            end += len(self._close)
            key = _block_key(buf[at + len(self._open) : end - len(self._close)])
            if key in self._seen:
                self._buf = ""
                return max(end - start, 0)
            self._seen.add(key)
            buf = buf[end:]
            start -= end


def _block_key(inner: str) -> str:
    try:
        value = json.loads(inner)
    except (ValueError, RecursionError):
        return "text:" + inner.strip()
    return "json:" + json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
