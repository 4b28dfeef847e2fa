"""Parsing the model's output into content and tool calls (the convention of `cria.chat.tools`).

The parser (`ToolCallParser`) is incremental and character driven, so that its results do not
depend on how the output is split into pieces. It only ever hands out whole calls: a response
(streamed or not) never carries a call whose `arguments` are not a complete JSON object, nor any
`<tool_call>` markup in its content.

* content: text outside blocks streams out at once, except a suffix that could begin
  `<tool_call>` and trailing whitespace (both held until the next piece shows what they are).
  Whitespace that touches a block (directly before its tag, or directly after its end) is
  dropped, so whitespace-only text around and between blocks never comes out;
* head: after `<tool_call>`, the text must match `{"name": "NAME", "arguments": {` (the key may
  be "parameters"; JSON whitespace anywhere between tokens). As soon as a character makes the
  match impossible, the block is malformed: it is dropped, up to its `</tool_call>` (or the next
  `<tool_call>`, or the end). Block text never becomes content;
* arguments: a small scanner (brace depth, inside a string, after a backslash) finds where the
  object ends. Only then is the call told, as `CallStart` followed by one `CallArguments` with
  the whole object exactly as written. It is dropped instead if the object is not valid JSON, if
  it repeats an earlier call of the response (same name, equal arguments), if `max_calls` calls
  were already told, or if the `accept` check refuses it (the route checks the arguments against
  the function's schema);
* tail: after the object, anything up to `</tool_call>` is skipped (normally `}` and a newline).
  A `<tool_call>` found first starts the next call (a model that forgot the closing tag).

At `finish()`, held-back text becomes content; a block still in its head or its arguments (cut
by max_tokens) is dropped.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ContentText:
    text: str


@dataclass(frozen=True, slots=True)
class CallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class CallArguments:
    index: int
    fragment: str


Event = ContentText | CallStart | CallArguments

# Why a call was not told (ToolCallParser.dropped).
DropReason = Literal["malformed", "cut", "not_json", "duplicate", "too_many", "refused"]

_JSON_WS = " \t\n\r"
# The head of a call, token by token (JSON whitespace allowed before each); None is the name,
# a JSON string. The last token is the arguments' opening brace.
_HEAD: tuple[tuple[str, ...] | None, ...] = (
    ("{",),
    ('"name"',),
    (":",),
    None,
    (",",),
    ('"arguments"', '"parameters"'),
    (":",),
    ("{",),
)


class _Head:
    """Matches the head of one call a character at a time; see `_HEAD`."""

    def __init__(self) -> None:
        self._token = 0
        self._literal = ""  # characters of the current literal token matched so far
        self._name: list[str] | None = None  # raw characters of the name string once opened
        self._escaped = False
        self.name = ""

    def push(self, ch: str) -> bool | None:
        """True: the head is complete (`ch` was its last character); False: it cannot match."""
        token = _HEAD[self._token]
        if token is None:
            return self._push_name(ch)
        if not self._literal and ch in _JSON_WS:
            return None
        self._literal += ch
        if not any(alt.startswith(self._literal) for alt in token):
            return False
        if self._literal in token:
            self._literal = ""
            self._token += 1
            return True if self._token == len(_HEAD) else None
        return None

    def _push_name(self, ch: str) -> bool | None:
        if self._name is None:
            if ch in _JSON_WS:
                return None
            if ch != '"':
                return False
            self._name = []
            return None
        if self._escaped or ch != '"':
            self._escaped = not self._escaped and ch == "\\"
            self._name.append(ch)
            return None
        try:
            self.name = json.loads('"' + "".join(self._name) + '"')
        except ValueError:
            return False
        if not self.name:
            return False
        self._token += 1
        return None


_CONTENT, _HEAD_STATE, _ARGUMENTS, _TAIL = range(4)


def _tag_prefix_len(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of the opening tag."""
    for n in range(min(len(text), len(OPEN_TAG) - 1), 0, -1):
        if OPEN_TAG.startswith(text[-n:]):
            return n
    return 0


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class ToolCallParser:
    """Turns the model's output, fed in arbitrary pieces, into content and whole tool calls.

    See the module docstring for the rules. `feed` returns what can be told so far; `finish`,
    called once at the end of generation, returns the rest. `max_calls`: the most calls told
    (None: no limit); `accept(name, arguments)`: False drops the call.
    """

    def __init__(
        self,
        *,
        id_factory: Callable[[], str] = new_call_id,
        max_calls: int | None = None,
        accept: Callable[[str, Any], bool] | None = None,
    ) -> None:
        self._id_factory = id_factory
        self._max_calls = max_calls
        self._accept = accept
        self._state = _CONTENT
        self._buf = ""  # text not yet accounted for
        self._n_calls = 0
        self._seen: set[tuple[str, str]] = set()  # (name, canonical arguments) of told calls
        self.dropped: list[tuple[DropReason, str]] = []  # (why, function name or "") per drop
        self._after_block = False  # only whitespace since the end of the last block
        self._head = _Head()
        # While in arguments: the text so far and the scanner's state.
        self._args: list[str] = []
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def n_calls(self) -> int:
        """Calls told so far."""
        return self._n_calls

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[Event]:
        events: list[Event] = []
        if self._state == _CONTENT:
            self._emit(events, self._buf)
        elif self._state == _HEAD_STATE:
            self.dropped.append(("cut", self._head.name))
        elif self._state == _ARGUMENTS:
            self.dropped.append(("cut", self._head.name))
        self._buf = ""
        self._state = _CONTENT
        return events

    # Each step consumes what it can of the buffer; True when the state changed (step again).

    def _step(self, events: list[Event]) -> bool:
        if self._state == _CONTENT:
            return self._content(events)
        if self._state == _HEAD_STATE:
            return self._head_step()
        if self._state == _ARGUMENTS:
            return self._arguments(events)
        return self._tail()

    def _emit(self, events: list[Event], text: str) -> None:
        if self._after_block:
            text = text.lstrip()
        if text:
            events.append(ContentText(text))
            self._after_block = False

    def _content(self, events: list[Event]) -> bool:
        at = self._buf.find(OPEN_TAG)
        if at >= 0:
            self._emit(events, self._buf[:at].rstrip())
            self._start_block(self._buf[at + len(OPEN_TAG) :])
            return True
        ready = self._buf[: len(self._buf) - _tag_prefix_len(self._buf)]
        body = ready.rstrip()
        self._emit(events, body)
        self._buf = self._buf[len(body) :]
        return False

    def _start_block(self, rest: str) -> None:
        self._state = _HEAD_STATE
        self._after_block = True  # whatever the block becomes, the whitespace after it goes
        self._head = _Head()
        self._buf = rest

    def _head_step(self) -> bool:
        for i, ch in enumerate(self._buf):
            matched = self._head.push(ch)
            if matched is None:
                continue
            if matched:
                self._state = _ARGUMENTS
                self._args = []
                self._depth, self._in_string, self._escaped = 0, False, False
                self._buf = self._buf[i:]
                return True
            # Not a call: dropped up to its end; the character that broke it is looked at again.
            self.dropped.append(("malformed", self._head.name))
            self._state = _TAIL
            self._buf = self._buf[i:]
            return True
        self._buf = ""
        return False

    def _arguments(self, events: list[Event]) -> bool:
        end = None
        for i, ch in enumerate(self._buf):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif ch == "\\":
                    self._escaped = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    end = i + 1
                    break
        if end is None:
            self._args.append(self._buf)
            self._buf = ""
            return False
        self._args.append(self._buf[:end])
        self._buf = self._buf[end:]
        self._state = _TAIL
        self._complete(events, self._head.name, "".join(self._args))
        return True

    def _complete(self, events: list[Event], name: str, arguments: str) -> None:
        """A call whose arguments are complete: told, or dropped (see the module docstring)."""
        try:
            value = json.loads(arguments)
        except (ValueError, RecursionError):
            self.dropped.append(("not_json", name))
            return
        key = (name, _canonical(value))
        if key in self._seen:
            self.dropped.append(("duplicate", name))
            return
        if self._max_calls is not None and self._n_calls >= self._max_calls:
            self.dropped.append(("too_many", name))
            return
        if self._accept is not None and not self._accept(name, value):
            self.dropped.append(("refused", name))
            return
        self._seen.add(key)
        events.append(CallStart(self._n_calls, self._id_factory(), name))
        events.append(CallArguments(self._n_calls, arguments))
        self._n_calls += 1

    def _tail(self) -> bool:
        close = self._buf.find(CLOSE_TAG)
        reopen = self._buf.find(OPEN_TAG)
        if reopen >= 0 and (close < 0 or reopen < close):
            self._start_block(self._buf[reopen + len(OPEN_TAG) :])
            return True
        if close >= 0:
            self._state = _CONTENT
            self._buf = self._buf[close + len(CLOSE_TAG) :]
            return True
        keep = max(len(CLOSE_TAG), len(OPEN_TAG)) - 1
        self._buf = self._buf[-keep:]
        return False


def collect_calls(events: Iterable[Event]) -> tuple[str | None, list[dict[str, Any]]]:
    """For a response that is not streamed: (content, or None if blank; OpenAI `tool_calls`)."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    arguments: list[list[str]] = []
    for event in events:
        if isinstance(event, ContentText):
            content.append(event.text)
        elif isinstance(event, CallStart):
            calls.append({"id": event.id, "type": "function", "function": {"name": event.name}})
            arguments.append([])
        else:
            arguments[event.index].append(event.fragment)
    for call, fragments in zip(calls, arguments):
        call["function"]["arguments"] = "".join(fragments)
    text = "".join(content)
    return (text if text.strip() else None), calls
