"""Function calling: the OpenAI `tools` request fields, the prompt, and parsing the model's calls.

The convention. Whatever the chat template, the model is asked to call functions in one text
format (Hermes / Qwen style), one block per call, blocks separated by whitespace:

    <tool_call>
    {"name": "NAME", "arguments": {...}}
    </tool_call>

A template that supports tools (HF transformers convention: a `tools` variable, assistant
`tool_calls` with `arguments` as a mapping, `tool` messages) gets them structured and describes
this format itself. A template without tool support (a plain ChatML one) gets the function list
and the format in the system prompt (`tools_system_prompt`); assistant calls in the history are
rendered as `<tool_call>` blocks and tool results as user turns holding `<tool_response>` blocks.
Only the tagged format is recognised: a bare JSON object without the tags is ordinary content.

The parser (`ToolCallParser`) is incremental and character driven, so that its results do not
depend on how the output is split into pieces:

* content: text outside blocks streams out at once, except a suffix that could begin
  `<tool_call>` and trailing whitespace (both held until the next piece shows what they are).
  Whitespace that touches a block (directly before its tag, or directly after its end) is
  dropped, so whitespace-only text around and between blocks never comes out;
* head: after `<tool_call>`, the text must match `{"name": "NAME", "arguments": {` (the key may
  be "parameters"; JSON whitespace anywhere between tokens). `CallStart` is emitted when the
  arguments' opening `{` arrives. The arguments must be a JSON object: OpenAI's `arguments` is
  always one, and it lets the caller rely on it. As soon as a character makes the match
  impossible, the block text read so far (tag included) becomes content again;
* arguments: a small scanner (brace depth, inside a string, after a backslash) finds where the
  object ends; everything up to there streams out as `CallArguments`, exactly as written;
* tail: after the object, anything up to `</tool_call>` is skipped (normally `}` and a newline).
  A `<tool_call>` found first starts the next call (a model that forgot the closing tag).

At `finish()`, held-back text becomes content, a block that never reached `CallStart` becomes
content, and a call whose arguments never completed (cut by max_tokens) adds nothing more.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cria.errors import InvalidRequest

OPEN_TAG = "<tool_call>"
CLOSE_TAG = "</tool_call>"
MAX_TOOLS = 128

_NAME_RE = re.compile(r"[a-zA-Z0-9_-]{1,64}")


# ---------------------------------------------------------------- request fields


@dataclass(frozen=True, slots=True)
class Function:
    name: str
    description: str | None
    parameters: dict[str, Any]  # JSON Schema; {"type": "object", "properties": {}} when missing
    strict: bool = False


def parse_tools(tools: list[Any]) -> list[Function]:
    """Validate OpenAI's `tools` array. The parameter schemas themselves are the caller's to check."""
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be an array", param="tools")
    if not tools:
        raise InvalidRequest("tools must not be empty: omit the field instead", param="tools")
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(
            f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}", param="tools"
        )
    functions: list[Function] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        if tool.get("type") != "function":
            raise InvalidRequest(f"{where}.type must be 'function'", param=f"{where}.type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise InvalidRequest(f"{where}.function must be an object", param=f"{where}.function")
        where = f"{where}.function"
        name = function.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise InvalidRequest(
                f"{where}.name must be 1 to 64 characters among a-z, A-Z, 0-9, '_' and '-'",
                param=f"{where}.name",
            )
        if name in seen:
            raise InvalidRequest(f"duplicate function name {name!r}", param=f"{where}.name")
        seen.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise InvalidRequest(
                f"{where}.description must be a string", param=f"{where}.description"
            )
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        elif not isinstance(parameters, dict):
            raise InvalidRequest(
                f"{where}.parameters must be an object", param=f"{where}.parameters"
            )
        strict = function.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest(f"{where}.strict must be a boolean", param=f"{where}.strict")
        functions.append(Function(name, description, parameters, bool(strict)))
    return functions


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "named"]
    name: str | None = None


def parse_tool_choice(tool_choice: Any, functions: list[Function]) -> ToolChoice:
    """Validate OpenAI's `tool_choice` against the parsed tools.

    Without tools, "none" and "auto" (and no tool_choice) mean "none"; anything that needs a
    function to call is an error.
    """
    if tool_choice is None:
        return ToolChoice("auto" if functions else "none")
    if tool_choice in ("none", "auto"):
        return ToolChoice(tool_choice if functions else "none")
    if tool_choice == "required":
        if not functions:
            raise InvalidRequest("tool_choice 'required' needs tools", param="tool_choice")
        return ToolChoice("required")
    if isinstance(tool_choice, dict):
        if tool_choice.get("type") == "allowed_tools":
            raise InvalidRequest(
                "tool_choice 'allowed_tools' is not supported", param="tool_choice"
            )
        function = tool_choice.get("function")
        if (
            tool_choice.get("type") == "function"
            and isinstance(function, dict)
            and isinstance(function.get("name"), str)
        ):
            name: str = function["name"]
            if not functions:
                raise InvalidRequest(
                    "tool_choice names a function but there are no tools", param="tool_choice"
                )
            if name not in {f.name for f in functions}:
                raise InvalidRequest(
                    f"tool_choice names an unknown function {name!r}", param="tool_choice"
                )
            return ToolChoice("named", name)
    raise InvalidRequest(
        "tool_choice must be 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}',
        param="tool_choice",
    )


# ---------------------------------------------------------------- prompt


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _function_json(function: Function) -> dict[str, Any]:
    out: dict[str, Any] = {"name": function.name}
    if function.description is not None:
        out["description"] = function.description
    out["parameters"] = function.parameters
    return out


def tools_system_prompt(functions: Sequence[Function], *, parallel: bool) -> str:
    """The convention's instructions, for templates without tool support."""
    listing = "\n".join(_dumps(_function_json(f)) for f in functions)
    how_many = (
        "To call several functions, write one <tool_call> block for each call."
        if parallel
        else "Call at most one function per reply."
    )
    return (
        "You can call functions. They are described as JSON inside <tools></tools>:\n"
        f"<tools>\n{listing}\n</tools>\n"
        "To call a function, reply with exactly this, the arguments being a JSON object:\n"
        f'{OPEN_TAG}\n{{"name": "FUNCTION_NAME", "arguments": {{...}}}}\n{CLOSE_TAG}\n'
        f"{how_many} Results come back inside <tool_response></tool_response>. "
        "If no function is needed, answer normally."
    )


def _call_block(name: str, arguments: dict[str, Any]) -> str:
    return f"{OPEN_TAG}\n{_dumps({'name': name, 'arguments': arguments})}\n{CLOSE_TAG}"


def _response_block(content: Any) -> str:
    return f"<tool_response>\n{'' if content is None else content}\n</tool_response>"


def _parsed_calls(message: dict[str, Any], i: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(id, name, arguments as a dict) for each call of an assistant message."""
    calls = message.get("tool_calls")
    if calls is None:
        return []
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise InvalidRequest(f"{where} must be an array", param=where)
    out: list[tuple[str, str, dict[str, Any]]] = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        if not isinstance(call, dict):
            raise InvalidRequest(f"{at} must be an object", param=at)
        if call.get("type", "function") != "function":
            raise InvalidRequest(f"{at}.type must be 'function'", param=f"{at}.type")
        call_id = call.get("id")
        if not isinstance(call_id, str):
            raise InvalidRequest(f"{at}.id must be a string", param=f"{at}.id")
        function = call.get("function")
        if not isinstance(function, dict):
            raise InvalidRequest(f"{at}.function must be an object", param=f"{at}.function")
        name = function.get("name")
        if not isinstance(name, str):
            raise InvalidRequest(
                f"{at}.function.name must be a string", param=f"{at}.function.name"
            )
        raw = function.get("arguments")
        at = f"{at}.function.arguments"
        if not isinstance(raw, str):
            raise InvalidRequest(f"{at} must be a string of JSON", param=at)
        try:
            arguments = json.loads(raw)
        except (ValueError, RecursionError):
            raise InvalidRequest(f"{at} is not valid JSON", param=at) from None
        if not isinstance(arguments, dict):
            raise InvalidRequest(f"{at} must be a JSON object", param=at)
        out.append((call_id, name, arguments))
    return out


def messages_for_template(
    messages: list[dict[str, Any]],
    functions: Sequence[Function],
    choice: ToolChoice,
    *,
    template_has_tools: bool,
    parallel: bool,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and the `tools` variable to render the chat template with.

    With `template_has_tools`, the template gets tool calls and tool messages structured (HF
    convention) and the tools as a variable. Without, everything is turned into plain text
    following the convention (see the module docstring). The input is not modified.
    """
    names_by_id: dict[str, str] = {}
    out: list[dict[str, Any]] = []
    previous_was_tool = False
    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "assistant":
            calls = _parsed_calls(message, i)
            names_by_id.update((call_id, name) for call_id, name, _ in calls)
            converted = {k: v for k, v in message.items() if k != "tool_calls"}
            if calls and template_has_tools:
                converted["tool_calls"] = [
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }
                    for call_id, name, args in calls
                ]
            elif calls:
                content = message.get("content") or ""
                blocks = "\n".join(_call_block(name, args) for _, name, args in calls)
                converted["content"] = f"{content}\n{blocks}" if content else blocks
            out.append(converted)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            where = f"messages[{i}].tool_call_id"
            if not isinstance(call_id, str):
                raise InvalidRequest(f"{where} must be a string", param=where)
            if call_id not in names_by_id:
                raise InvalidRequest(
                    f"{where} {call_id!r} does not answer any earlier assistant tool call",
                    param=where,
                )
            if template_has_tools:
                out.append({**message, "name": names_by_id[call_id]})
            elif previous_was_tool:
                out[-1]["content"] += "\n" + _response_block(message.get("content"))
            else:
                out.append({"role": "user", "content": _response_block(message.get("content"))})
        else:
            out.append(dict(message))
        previous_was_tool = role == "tool"

    if choice.mode == "none":
        return out, None
    if template_has_tools:
        return out, [{"type": "function", "function": _function_json(f)} for f in functions]
    prompt = tools_system_prompt(functions, parallel=parallel)
    if out and out[0].get("role") == "system":
        system = out[0].get("content") or ""
        out[0]["content"] = f"{system}\n\n{prompt}" if system else prompt
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out, None


# ---------------------------------------------------------------- parsing the output


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


class ToolCallParser:
    """Turns the model's output, fed in arbitrary pieces, into content and tool call events.

    See the module docstring for the rules. `feed` returns what can be told so far; `finish`,
    called once at the end of generation, returns the rest.
    """

    def __init__(self, *, id_factory: Callable[[], str] = new_call_id) -> None:
        self._id_factory = id_factory
        self._state = _CONTENT
        self._buf = ""  # text not yet accounted for
        self._n_calls = 0
        self._after_block = False  # only whitespace since the end of the last block
        # While in a head: the text it would give back as content if it does not match.
        self._block_text = ""
        self._head = _Head()
        # While in arguments: the scanner's state.
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def n_calls(self) -> int:
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
            self._emit(events, self._block_text + self._buf)
        self._buf = ""
        return events

    # Each step consumes what it can of the buffer; True when the state changed (step again).

    def _step(self, events: list[Event]) -> bool:
        if self._state == _CONTENT:
            return self._content(events)
        if self._state == _HEAD_STATE:
            return self._head_step(events)
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
            before = self._buf[:at]
            body = before.rstrip()
            self._emit(events, body)
            whitespace = "" if self._after_block else before[len(body) :]
            self._start_block(whitespace + OPEN_TAG, self._buf[at + len(OPEN_TAG) :])
            return True
        ready = self._buf[: len(self._buf) - _tag_prefix_len(self._buf)]
        body = ready.rstrip()
        self._emit(events, body)
        self._buf = self._buf[len(body) :]
        return False

    def _start_block(self, block_text: str, rest: str) -> None:
        self._state = _HEAD_STATE
        self._block_text = block_text
        self._head = _Head()
        self._buf = rest

    def _head_step(self, events: list[Event]) -> bool:
        for i, ch in enumerate(self._buf):
            matched = self._head.push(ch)
            if matched is None:
                continue
            if matched:
                self._state = _ARGUMENTS
                self._depth, self._in_string, self._escaped = 0, False, False
                self._buf = self._buf[i:]
                events.append(CallStart(self._n_calls, self._id_factory(), self._head.name))
                self._n_calls += 1
                return True
            # Not a call: its text is content; the character that broke it is looked at again.
            text = self._block_text + self._buf[:i]
            body = text.rstrip()
            self._emit(events, body)
            self._state = _CONTENT
            self._buf = text[len(body) :] + self._buf[i:]
            return True
        self._block_text += self._buf
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
        fragment = self._buf if end is None else self._buf[:end]
        if fragment:
            events.append(CallArguments(self._n_calls - 1, fragment))
        if end is None:
            self._buf = ""
            return False
        self._state = _TAIL
        self._buf = self._buf[end:]
        return True

    def _tail(self) -> bool:
        close = self._buf.find(CLOSE_TAG)
        reopen = self._buf.find(OPEN_TAG)
        if reopen >= 0 and (close < 0 or reopen < close):
            self._after_block = True
            self._start_block(OPEN_TAG, self._buf[reopen + len(OPEN_TAG) :])
            return True
        if close >= 0:
            self._after_block = True
            self._state = _CONTENT
            self._buf = self._buf[close + len(CLOSE_TAG) :]
            return True
        self._buf = self._buf[-(len(CLOSE_TAG) - 1) :]
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
