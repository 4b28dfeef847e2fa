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

The model's output is parsed into content and calls by `cria.chat.tool_parser` (its names are
re-exported here).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from cria.chat.tool_parser import (  # re-exported: the route and the tests import them from here
    CLOSE_TAG,
    OPEN_TAG,
    CallArguments,
    CallStart,
    ContentText,
    Event,
    ToolCallParser,
    collect_calls,
    new_call_id,
)
from cria.errors import InvalidRequest

__all__ = [
    "CLOSE_TAG",
    "OPEN_TAG",
    "CallArguments",
    "CallStart",
    "ContentText",
    "Event",
    "Function",
    "ToolCallParser",
    "ToolChoice",
    "collect_calls",
    "messages_for_template",
    "new_call_id",
    "parse_tool_choice",
    "parse_tools",
    "tools_system_prompt",
]

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
