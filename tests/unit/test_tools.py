"""Function calling: request validation, prompt building, the incremental tool call parser, and
the engine's stop at a repeated call."""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest

from cria.chat.template import ChatTemplate
from cria.chat.tools import (
    CLOSE_TAG,
    OPEN_TAG,
    CallArguments,
    CallStart,
    ContentText,
    Event,
    Function,
    ToolCallParser,
    ToolChoice,
    collect_calls,
    messages_for_template,
    new_call_id,
    parse_tool_choice,
    parse_tools,
    tools_system_prompt,
)
from cria.engine.text import RepeatedBlocks, StopMatcher
from cria.errors import InvalidRequest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get-time_2"}}


def functions() -> list[Function]:
    return parse_tools([WEATHER, TIME])


def assert_invalid(call: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        call()
    assert info.value.param == param, info.value.message


# ---------------------------------------------------------------- parse_tools


def test_parse_tools_reads_every_field() -> None:
    strict = {"type": "function", "function": {**WEATHER["function"], "strict": True}}  # type: ignore[dict-item]
    [weather, time] = parse_tools([strict, TIME])
    assert weather == Function(
        "get_weather",
        "Current weather in a city.",
        WEATHER["function"]["parameters"],  # type: ignore[index]
        strict=True,
    )
    assert time == Function("get-time_2", None, {"type": "object", "properties": {}}, strict=False)


def test_missing_parameters_are_not_shared_between_functions() -> None:
    a, b = parse_tools([TIME, {"type": "function", "function": {"name": "other"}}])
    a.parameters["properties"]["x"] = {}
    assert b.parameters == {"type": "object", "properties": {}}


def test_null_optional_fields_mean_absent() -> None:
    tool = {
        "type": "function",
        "function": {"name": "f", "description": None, "parameters": None, "strict": None},
    }
    assert parse_tools([tool]) == [Function("f", None, {"type": "object", "properties": {}})]


def test_at_most_128_tools() -> None:
    many = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(128)]
    assert len(parse_tools(many)) == 128
    many.append({"type": "function", "function": {"name": "one_more"}})
    assert_invalid(lambda: parse_tools(many), "tools")


def fn(**fields: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **fields}}


@pytest.mark.parametrize(
    ("tools", "param"),
    [
        ([], "tools"),
        ({"type": "function"}, "tools"),
        (["f"], "tools[0]"),
        ([{"function": {"name": "f"}}], "tools[0].type"),
        ([{"type": "code_interpreter"}], "tools[0].type"),
        ([{"type": "function"}], "tools[0].function"),
        ([{"type": "function", "function": "f"}], "tools[0].function"),
        ([{"type": "function", "function": {}}], "tools[0].function.name"),
        ([fn(name=3)], "tools[0].function.name"),
        ([fn(name="")], "tools[0].function.name"),
        ([fn(name="has space")], "tools[0].function.name"),
        ([fn(name="dot.ted")], "tools[0].function.name"),
        ([fn(name="x" * 65)], "tools[0].function.name"),
        ([fn(name="f\n")], "tools[0].function.name"),
        ([TIME, fn(description=3)], "tools[1].function.description"),
        ([TIME, fn(parameters=[])], "tools[1].function.parameters"),
        ([TIME, fn(parameters="{}")], "tools[1].function.parameters"),
        ([TIME, fn(strict="yes")], "tools[1].function.strict"),
        ([TIME, WEATHER, TIME], "tools[2].function.name"),
    ],
)
def test_parse_tools_rejects(tools: Any, param: str) -> None:
    assert_invalid(lambda: parse_tools(tools), param)


def test_longest_allowed_name() -> None:
    assert parse_tools([fn(name="x" * 64)])[0].name == "x" * 64


def test_duplicate_names_are_reported() -> None:
    with pytest.raises(InvalidRequest, match="duplicate"):
        parse_tools([TIME, TIME])


# ---------------------------------------------------------------- parse_tool_choice


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        (None, ToolChoice("auto")),
        ("auto", ToolChoice("auto")),
        ("none", ToolChoice("none")),
        ("required", ToolChoice("required")),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            ToolChoice("named", "get_weather"),
        ),
    ],
)
def test_parse_tool_choice(tool_choice: Any, expected: ToolChoice) -> None:
    assert parse_tool_choice(tool_choice, functions()) == expected


@pytest.mark.parametrize("tool_choice", [None, "none", "auto"])
def test_tool_choice_without_tools_is_none(tool_choice: Any) -> None:
    assert parse_tool_choice(tool_choice, []) == ToolChoice("none")


@pytest.mark.parametrize(
    ("tool_choice", "tools"),
    [
        ("required", []),
        ({"type": "function", "function": {"name": "get_weather"}}, []),
        ({"type": "function", "function": {"name": "nope"}}, [WEATHER]),
        ({"type": "function", "function": {}}, [WEATHER]),
        ({"type": "function", "function": {"name": 3}}, [WEATHER]),
        ({"type": "function", "function": "get_weather"}, [WEATHER]),
        ({"type": "function", "name": "get_weather"}, [WEATHER]),
        ({"function": {"name": "get_weather"}}, [WEATHER]),
        ({"type": "allowed_tools", "mode": "auto", "tools": [WEATHER]}, [WEATHER]),
        ("always", [WEATHER]),
        ("", [WEATHER]),
        (True, [WEATHER]),
        (["auto"], [WEATHER]),
    ],
)
def test_parse_tool_choice_rejects(tool_choice: Any, tools: list[Any]) -> None:
    parsed = parse_tools(tools) if tools else []
    assert_invalid(lambda: parse_tool_choice(tool_choice, parsed), "tool_choice")


def test_allowed_tools_is_said_to_be_unsupported() -> None:
    with pytest.raises(InvalidRequest, match="not supported"):
        parse_tool_choice({"type": "allowed_tools"}, functions())


# ---------------------------------------------------------------- tools_system_prompt


def test_system_prompt_lists_every_function_and_the_format() -> None:
    prompt = tools_system_prompt(functions(), parallel=True)
    tools = re.search(r"<tools>\n(.*)\n</tools>", prompt, re.S)
    assert tools is not None
    listed = [json.loads(line) for line in tools.group(1).splitlines()]
    assert listed == [
        {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "parameters": WEATHER["function"]["parameters"],  # type: ignore[index]
        },
        {"name": "get-time_2", "parameters": {"type": "object", "properties": {}}},
    ]
    assert '<tool_call>\n{"name": "FUNCTION_NAME", "arguments": {...}}\n</tool_call>' in prompt
    assert "<tool_response>" in prompt
    assert "several" in prompt


def test_system_prompt_says_one_call_when_not_parallel() -> None:
    prompt = tools_system_prompt(functions(), parallel=False)
    assert "at most one function" in prompt
    assert "several" not in prompt


def test_system_prompt_keeps_unicode() -> None:
    tool = fn(description="Météo à Zürich")
    assert "Météo à Zürich" in tools_system_prompt(parse_tools([tool]), parallel=True)


# ---------------------------------------------------------------- messages_for_template


def history() -> list[dict[str, Any]]:
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{ "city" : "Zürich" }'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12C"},
        {"role": "user", "content": "Thanks"},
    ]


def test_template_with_tools_gets_structured_calls_and_the_tools() -> None:
    messages = history()
    original = copy.deepcopy(messages)
    out, tools = messages_for_template(
        messages, functions(), ToolChoice("auto"), template_has_tools=True, parallel=True
    )
    assert messages == original, "the input must not be modified"
    assert out == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Zürich"}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C", "name": "get_weather"},
        {"role": "tool", "tool_call_id": "call_2", "content": "12C", "name": "get_weather"},
        {"role": "user", "content": "Thanks"},
    ]
    assert tools == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Current weather in a city.",
                "parameters": WEATHER["function"]["parameters"],  # type: ignore[index]
            },
        },
        {
            "type": "function",
            "function": {"name": "get-time_2", "parameters": {"type": "object", "properties": {}}},
        },
    ]


def test_template_with_tools_and_choice_none_gets_no_tools() -> None:
    out, tools = messages_for_template(
        history(), functions(), ToolChoice("none"), template_has_tools=True, parallel=True
    )
    assert tools is None
    assert out[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


def test_convention_turns_the_history_into_text() -> None:
    messages = history()
    original = copy.deepcopy(messages)
    out, tools = messages_for_template(
        messages, functions(), ToolChoice("auto"), template_has_tools=False, parallel=True
    )
    assert messages == original
    assert tools is None
    prompt = tools_system_prompt(functions(), parallel=True)
    assert out == [
        {"role": "system", "content": "Be brief.\n\n" + prompt},
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {
            "role": "assistant",
            "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>',
        },
        {
            "role": "user",
            "content": "<tool_response>\n18C\n</tool_response>\n<tool_response>\n12C\n</tool_response>",
        },
        {"role": "user", "content": "Thanks"},
    ]


def test_convention_keeps_assistant_text_before_its_calls() -> None:
    messages = history()
    messages[2]["content"] = "Let me look."
    out, _ = messages_for_template(
        messages, functions(), ToolChoice("auto"), template_has_tools=False, parallel=True
    )
    assert out[2]["content"].startswith("Let me look.\n<tool_call>\n")


def test_convention_prompt_becomes_the_first_message_without_a_system_one() -> None:
    messages = history()[1:]
    out, _ = messages_for_template(
        messages, functions(), ToolChoice("required"), template_has_tools=False, parallel=False
    )
    assert out[0] == {"role": "system", "content": tools_system_prompt(functions(), parallel=False)}
    assert out[1] == messages[0]


def test_convention_prompt_with_an_empty_system_message() -> None:
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "hi"}]
    out, _ = messages_for_template(
        messages, functions(), ToolChoice("auto"), template_has_tools=False, parallel=True
    )
    assert out == [
        {"role": "system", "content": tools_system_prompt(functions(), parallel=True)},
        {"role": "user", "content": "hi"},
    ]


def test_convention_with_choice_none_still_converts_the_history() -> None:
    out, tools = messages_for_template(
        history(), functions(), ToolChoice("none"), template_has_tools=False, parallel=True
    )
    assert tools is None
    assert out[0] == {"role": "system", "content": "Be brief."}
    assert out[2]["content"].startswith("<tool_call>")
    assert "tool_calls" not in out[2]
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user", "user"]


def test_tool_messages_apart_are_not_merged() -> None:
    messages = history()
    messages.insert(4, {"role": "assistant", "content": "One down."})
    out, _ = messages_for_template(
        messages, functions(), ToolChoice("auto"), template_has_tools=False, parallel=True
    )
    assert [m["role"] for m in out] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "user",
    ]
    assert out[5]["content"] == "<tool_response>\n12C\n</tool_response>"


def test_convention_history_renders_with_a_plain_chatml_template() -> None:
    chatml = (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    out, _ = messages_for_template(
        history(), functions(), ToolChoice("auto"), template_has_tools=False, parallel=True
    )
    prompt = ChatTemplate(chatml, bos_token="", eos_token="").render(out)
    assert "None" not in prompt
    assert "<|im_start|>user\n<tool_response>\n18C\n</tool_response>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_convention_call_round_trips_through_the_parser() -> None:
    out, _ = messages_for_template(
        history(), functions(), ToolChoice("auto"), template_has_tools=False, parallel=True
    )
    content, calls = collect_calls(parse(out[2]["content"]))
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Zürich"}),
    ]


def with_call(**function: Any) -> list[dict[str, Any]]:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}", **function}}
    return [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
    ]


@pytest.mark.parametrize("template_has_tools", [True, False])
@pytest.mark.parametrize(
    ("messages", "param"),
    [
        (with_call(arguments='{"city": "Par'), "messages[1].tool_calls[0].function.arguments"),
        (with_call(arguments=""), "messages[1].tool_calls[0].function.arguments"),
        (with_call(arguments="[1]"), "messages[1].tool_calls[0].function.arguments"),
        (with_call(arguments={"city": "Paris"}), "messages[1].tool_calls[0].function.arguments"),
        (with_call(name=None), "messages[1].tool_calls[0].function.name"),
        (
            [{"role": "assistant", "content": None, "tool_calls": {"id": "c"}}],
            "messages[0].tool_calls",
        ),
        (
            [{"role": "assistant", "content": None, "tool_calls": ["c"]}],
            "messages[0].tool_calls[0]",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"type": "function", "function": {}}],
                }
            ],
            "messages[0].tool_calls[0].id",
        ),
        (
            [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "x"}]}],
            "messages[0].tool_calls[0].type",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "c", "type": "function"}],
                }
            ],
            "messages[0].tool_calls[0].function",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "tool", "tool_call_id": "c", "content": "1"},
            ],
            "messages[1].tool_call_id",
        ),
        (
            [*with_call(), {"role": "tool", "tool_call_id": "other", "content": "1"}],
            "messages[2].tool_call_id",
        ),
        ([*with_call(), {"role": "tool", "content": "1"}], "messages[2].tool_call_id"),
        (
            # The answer must come after the call.
            [{"role": "tool", "tool_call_id": "c", "content": "1"}, *with_call()],
            "messages[0].tool_call_id",
        ),
    ],
)
def test_messages_for_template_rejects(
    messages: list[dict[str, Any]], param: str, template_has_tools: bool
) -> None:
    assert_invalid(
        lambda: messages_for_template(
            messages,
            functions(),
            ToolChoice("auto"),
            template_has_tools=template_has_tools,
            parallel=True,
        ),
        param,
    )


# ---------------------------------------------------------------- ToolCallParser


def counter() -> Iterator[str]:
    n = 0
    while True:
        yield f"id{n}"
        n += 1


def parser() -> ToolCallParser:
    ids = counter()
    return ToolCallParser(id_factory=lambda: next(ids))


def parse(text: str, pieces: list[int] | None = None) -> list[Event]:
    """All the events for `text` fed in pieces ending at the offsets `pieces` (one piece if None)."""
    p = parser()
    events: list[Event] = []
    start = 0
    for end in [*(pieces or []), len(text)]:
        events += p.feed(text[start:end])
        start = end
    return events + p.finish()


def normalized(events: list[Event]) -> list[Event]:
    """Adjacent content merged and adjacent fragments of one call merged: what must not depend on
    how the output was split."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, ContentText) and isinstance(last, ContentText):
            out[-1] = ContentText(last.text + event.text)
        elif isinstance(event, CallArguments) and isinstance(last, CallArguments):
            assert event.index == last.index
            out[-1] = CallArguments(last.index, last.fragment + event.fragment)
        else:
            out.append(event)
    return out


def test_plain_content_streams_at_once() -> None:
    p = parser()
    assert p.feed("Hello") == [ContentText("Hello")]
    assert p.feed(", world.") == [ContentText(", world.")]
    assert p.finish() == []
    assert p.n_calls == 0


def test_only_a_possible_tag_start_and_trailing_whitespace_are_held_back() -> None:
    p = parser()
    assert p.feed("a < b") == [ContentText("a < b")]
    assert p.feed(" and <tool") == [ContentText(" and")]
    assert p.feed("s>") == [ContentText(" <tools>")]
    assert p.feed("\n\n") == []
    assert p.feed("x") == [ContentText("\n\nx")]
    assert p.feed(" <") == []
    assert p.finish() == [ContentText(" <")]


def test_partial_tag_at_the_end_becomes_content() -> None:
    assert parse("Hi <tool_ca") == [ContentText("Hi"), ContentText(" <tool_ca")]
    assert parse("Hi\n") == [ContentText("Hi"), ContentText("\n")]


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_one_call() -> None:
    assert parse(CALL) == [
        CallStart(0, "id0", "get_weather"),
        CallArguments(0, '{"city": "Paris"}'),
    ]


def test_content_then_call() -> None:
    events = parse("Let me check.\n\n" + CALL + "\n")
    assert events == [
        ContentText("Let me check."),
        CallStart(0, "id0", "get_weather"),
        CallArguments(0, '{"city": "Paris"}'),
    ]
    assert collect_calls(events) == (
        "Let me check.",
        [
            {
                "id": "id0",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    )


def test_two_calls() -> None:
    text = CALL + "\n\n" + '<tool_call>{"name":"get-time_2","arguments":{}}</tool_call>\n'
    p = parser()
    events = p.feed(text) + p.finish()
    assert events == [
        CallStart(0, "id0", "get_weather"),
        CallArguments(0, '{"city": "Paris"}'),
        CallStart(1, "id1", "get-time_2"),
        CallArguments(1, "{}"),
    ]
    assert p.n_calls == 2
    content, calls = collect_calls(events)
    assert content is None
    assert [c["id"] for c in calls] == ["id0", "id1"]


def test_braces_and_escaped_quotes_inside_strings() -> None:
    arguments = r'{"q": "a } \" {", "nested": {"list": [1, {"k": "]\\"}], "e": "\\\\"}}'
    assert json.loads(arguments)
    events = parse(f'<tool_call>\n{{"name": "search", "arguments": {arguments}}}\n</tool_call>')
    assert events == [CallStart(0, "id0", "search"), CallArguments(0, arguments)]


def test_arguments_keep_their_inner_whitespace_but_not_the_leading_one() -> None:
    arguments = '{\n  "a" : 1,\n\t"b": [ ]\n}'
    events = parse(f'<tool_call>{{ "name" : "f" , "arguments" :\n  {arguments} }}</tool_call>')
    assert events == [CallStart(0, "id0", "f"), CallArguments(0, arguments)]


def test_parameters_key() -> None:
    events = parse('<tool_call>\n{"name": "f", "parameters": {"x": 1}}\n</tool_call>')
    assert events == [CallStart(0, "id0", "f"), CallArguments(0, '{"x": 1}')]


def test_escaped_name_is_unescaped() -> None:
    events = parse('<tool_call>{"name": "get\\u005fweather\\"", "arguments": {}}</tool_call>')
    assert events[0] == CallStart(0, "id0", 'get_weather"')


def test_a_call_is_told_whole_as_soon_as_its_arguments_end() -> None:
    p = parser()
    assert p.feed('<tool_call>\n{"name": "f", "arguments": ') == []
    assert p.feed('{"a"') == []
    assert p.feed(": [1, {}") == []
    assert p.feed("]}") == [CallStart(0, "id0", "f"), CallArguments(0, '{"a": [1, {}]}')]
    assert p.feed("}\n</tool_call>\n") == []
    assert p.finish() == []
    assert p.n_calls == 1 and p.dropped == []


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\nhello",
        "<tool_call>[1]",
        '<tool_call>{"nam": "f", "arguments": {}}',
        '<tool_call>{"name" "f", "arguments": {}}',
        '<tool_call>{"name": f, "arguments": {}}',
        '<tool_call>{"name": "", "arguments": {}}',
        '<tool_call>{"name": "a\\qb", "arguments": {}}',
        '<tool_call>{"name": "a\nb", "arguments": {}}',
        '<tool_call>{"name": "f" "arguments": {}}',
        '<tool_call>{"name": "f", "args": {}}',
        '<tool_call>{"name": "f", "arguments": "{}"}',
        '<tool_call>{"name": "f", "arguments": [1]}',
        '<tool_call>{"arguments": {}, "name": "f"}',
    ],
)
def test_malformed_block_is_dropped_up_to_its_closing_tag(block: str) -> None:
    p = parser()
    events = p.feed("Before.\n" + block + "\n</tool_call>\nAfter.") + p.finish()
    assert events == [ContentText("Before."), ContentText("After.")]
    assert [why for why, _ in p.dropped] == ["malformed"]


def test_malformed_block_never_becomes_content() -> None:
    p = parser()
    assert p.feed("<tool_call>\n") == []
    assert p.feed("hel") == []
    assert p.feed("lo</tool_") == []
    assert p.feed("call> ok") == [ContentText("ok")]


def test_block_after_a_malformed_one_is_a_call() -> None:
    events = normalized(
        parse('<tool_call>nope <tool_call>{"name": "f", "arguments": {}}</tool_call>')
    )
    assert events == [CallStart(0, "id0", "f"), CallArguments(0, "{}")]


def test_malformed_block_right_after_a_call() -> None:
    events = normalized(parse(CALL + "\n<tool_call>oops"))
    assert events == [CallStart(0, "id0", "get_weather"), CallArguments(0, '{"city": "Paris"}')]


@pytest.mark.parametrize(
    "text, content",
    [
        ("<tool_call>", None),
        ('<tool_call>\n{"name": "f", "argu', None),
        ('ok <tool_call>\n{"name": "f"', "ok"),
        ('<tool_call>\n{"name": "get_time", "arguments": {"timezone": "Europe/Pa', None),
        ('Sure. <tool_call>\n{"name": "f", "arguments": {"a": {"b": [1, 2], "c": "}', "Sure."),
    ],
)
def test_block_cut_by_max_tokens_is_dropped(text: str, content: str | None) -> None:
    p = parser()
    events = [*p.feed(text), *p.finish()]
    assert collect_calls(events) == (content, [])
    assert [why for why, _ in p.dropped] == ["cut"]


def test_a_cut_call_after_a_whole_one_leaves_the_whole_one() -> None:
    text = CALL + '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'
    for how, events in events_for_every_split(text):
        assert collect_calls(events) == (
            None,
            [
                {
                    "id": "id0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        ), how


def test_arguments_that_are_not_json_are_dropped() -> None:
    p = parser()
    events = p.feed('<tool_call>{"name": "f", "arguments": {"a": 1,}}</tool_call>') + p.finish()
    assert events == []
    assert p.dropped == [("not_json", "f")]


def test_a_call_repeating_an_earlier_one_is_dropped() -> None:
    again = '<tool_call>{"name":"get_weather","arguments":{ "city" :"Paris"}}</tool_call>'
    other = CALL.replace("Paris", "Rome")
    p = parser()
    events = p.feed(CALL + "\n" + CALL + "\n" + again + other + CALL) + p.finish()
    content, calls = collect_calls(events)
    assert content is None
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"city": "Paris"},
        {"city": "Rome"},
    ]
    assert [c["id"] for c in calls] == ["id0", "id1"]
    assert [why for why, _ in p.dropped] == ["duplicate"] * 3


def test_the_same_arguments_for_another_function_are_not_a_repeat() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": {}}</tool_call>'
    assert [e.name for e in parse(text) if isinstance(e, CallStart)] == ["f", "g"]


def test_max_calls() -> None:
    ids = counter()
    p = ToolCallParser(id_factory=lambda: next(ids), max_calls=1)
    events = p.feed(CALL + CALL.replace("Paris", "Rome")) + p.finish()
    assert events == [
        CallStart(0, "id0", "get_weather"),
        CallArguments(0, '{"city": "Paris"}'),
    ]
    assert p.dropped == [("too_many", "get_weather")]


def test_accept_decides_last() -> None:
    seen: list[tuple[str, Any]] = []

    def accept(name: str, arguments: Any) -> bool:
        seen.append((name, arguments))
        return arguments.get("city") != "Rome"

    ids = counter()
    p = ToolCallParser(id_factory=lambda: next(ids), accept=accept)
    text = CALL.replace("Paris", "Rome") + CALL + CALL
    events = p.feed(text) + p.finish()
    assert events == [
        CallStart(0, "id0", "get_weather"),
        CallArguments(0, '{"city": "Paris"}'),
    ]
    assert seen == [("get_weather", {"city": "Rome"}), ("get_weather", {"city": "Paris"})]
    assert [why for why, _ in p.dropped] == ["refused", "duplicate"]


def test_call_without_closing_tag_is_complete() -> None:
    events = parse('<tool_call>\n{"name": "f", "arguments": {"a": 1}}')
    assert events == [CallStart(0, "id0", "f"), CallArguments(0, '{"a": 1}')]


def test_forgotten_closing_tag_before_the_next_call() -> None:
    text = '<tool_call>{"name": "f", "arguments": {}}\n<tool_call>{"name": "g", "arguments": {}}'
    assert parse(text) == [
        CallStart(0, "id0", "f"),
        CallArguments(0, "{}"),
        CallStart(1, "id1", "g"),
        CallArguments(1, "{}"),
    ]


def test_extra_text_between_the_arguments_and_the_closing_tag_is_skipped() -> None:
    events = parse('<tool_call>{"name": "f", "arguments": {}, "id": "x"} trailing</tool_call>')
    assert events == [CallStart(0, "id0", "f"), CallArguments(0, "{}")]


def test_text_after_and_between_calls_is_content_without_surrounding_whitespace() -> None:
    text = "Sure.\n" + CALL + "\nand\n" + CALL.replace("Paris", "Rome") + "\n\nDone.\n"
    events = normalized(parse(text))
    assert [e.text for e in events if isinstance(e, ContentText)] == ["Sure.", "and", "Done.\n"]
    assert [e.index for e in events if isinstance(e, CallStart)] == [0, 1]


def test_whitespace_only_text_around_calls_is_dropped() -> None:
    events = parse("\n  " + CALL + " \n\t " + CALL + "\n\n")
    assert not any(isinstance(e, ContentText) for e in events)


def test_stray_closing_tag_is_content() -> None:
    assert normalized(parse("a </tool_call> b")) == [ContentText("a </tool_call> b")]


def test_bare_json_call_is_content() -> None:
    text = '{"name": "f", "arguments": {}}'
    assert parse(text) == [ContentText(text)]


def test_unicode_in_arguments_and_content() -> None:
    text = 'Voilà 🦙\n<tool_call>{"name": "f", "arguments": {"ville": "Zürich 日本"}}</tool_call>'
    content, calls = collect_calls(parse(text, list(range(1, len(text)))))
    assert content == "Voilà 🦙"
    assert json.loads(calls[0]["function"]["arguments"]) == {"ville": "Zürich 日本"}


def test_collect_calls_with_blank_content() -> None:
    assert collect_calls([]) == (None, [])
    assert collect_calls([ContentText("  \n")]) == (None, [])
    assert collect_calls([ContentText(" a ")]) == (" a ", [])


def test_call_ids() -> None:
    ids = {new_call_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", i) for i in ids)
    default = ToolCallParser()
    real = default.feed(CALL + CALL.replace("Paris", "Rome")) + default.finish()
    starts = [e for e in real if isinstance(e, CallStart)]
    assert len(starts) == 2 and starts[0].id != starts[1].id
    assert all(re.fullmatch(r"call_[0-9a-f]{24}", s.id) for s in starts)


# ---------------------------------------------------------------- the split does not matter

SAMPLES = [
    "Just an answer, no tools. a < b, <b>bold</b>, <tool_cal and <tool_callx>.\n",
    CALL,
    "Let me check.\n\n" + CALL + "\n" + CALL.replace("Paris", "Zürich") + "\n",
    r'<tool_call>{"name": "s", "arguments": {"q": "a } \" {", "x": [{"y": "\\"}]}]}}</tool_call>',
    '<tool_call>\n{ "name" :"f",\n"parameters":\n\n {\n "a": [ 1, 2 ]\n }\n}\n</tool_call> Done.',
    '<tool_call>\nhello <tool_call>{"name": "f", "arguments": {}}</tool_call>\n <tool_call>oops',
    '<tool_call>{"name": "f", "arguments": {}}\n<tool_call>{"name": "g", "arguments": {"a": "</tool_call>"}}',
    '<tool_call>\n{"name": "f", "arguments": {"city": "Pa',
    'I will <tool_call>\n{"name": "f", "argu',
    "\n\n  \n",
]


def events_for_every_split(text: str) -> Iterator[tuple[str, list[Event]]]:
    yield "char by char", parse(text, list(range(1, len(text))))
    for cut in range(1, len(text)):
        yield f"cut at {cut}", parse(text, [cut])
    rng = random.Random(text)
    for attempt in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        yield f"random {attempt}: {cuts}", parse(text, cuts)


@pytest.mark.parametrize("text", SAMPLES)
def test_events_do_not_depend_on_the_split(text: str) -> None:
    expected = normalized(parse(text))
    for how, events in events_for_every_split(text):
        assert normalized(events) == expected, how
        # Nothing empty comes out, and content never ends up as whitespace between calls.
        assert all(e.text for e in events if isinstance(e, ContentText)), how
        assert all(e.fragment for e in events if isinstance(e, CallArguments)), how


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(6 if depth < 3 else 3)
    if kind == 0:
        return rng.choice(['a } " {', "\\", "</tool_call>", "<tool_call>", "[", "é🦙", ""])
    if kind == 1:
        return rng.choice([0, -1.5e3, True, None])
    if kind == 2:
        return "x"
    if kind == 3:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {f"k{i}": random_json(rng, depth + 1) for i in range(rng.randrange(3))}


def random_output(rng: random.Random) -> str:
    """Content and calls (well formed or not, with random whitespace), maybe cut anywhere."""
    noise = ["x", " ", "\n", "<", "<tool_ca", "</tool_call>", "{", '"', "\\", "}", "<tool_call>"]

    def ws() -> str:
        return rng.choice(["", " ", "\n", " \n\t"])

    parts: list[str] = []
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.4:
            parts.append("".join(rng.choice(noise) for _ in range(rng.randint(1, 6))))
            continue
        arguments = {f"a{i}": random_json(rng) for i in range(rng.randrange(3))}
        indent = rng.choice([None, 1])
        key = rng.choice(['"arguments"', '"parameters"', '"argument"'])
        parts.append(
            f'{ws()}<tool_call>{ws()}{{{ws()}"name"{ws()}:{ws()}"f"{ws()},{ws()}{key}{ws()}:{ws()}'
            f"{json.dumps(arguments, indent=indent)}{ws()}}}{ws()}"
            + rng.choice(["</tool_call>", "", "junk</tool_call>"])
            + ws()
        )
    text = "".join(parts)
    return text[: rng.randint(1, len(text))] if rng.random() < 0.3 else text


def test_split_invariance_on_random_outputs() -> None:
    rng = random.Random(7)
    n_calls = 0
    for _ in range(400):
        text = random_output(rng)
        expected = normalized(parse(text))
        n_calls += sum(isinstance(e, CallStart) for e in expected)
        assert normalized(parse(text, list(range(1, len(text))))) == expected, text
        for _ in range(3):
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 5))))
            assert normalized(parse(text, cuts)) == expected, (text, cuts)
    assert n_calls > 200, "the generator should make calls"


def test_random_outputs_give_only_whole_distinct_calls_and_no_markup() -> None:
    rng = random.Random(11)
    n_calls = 0
    for _ in range(400):
        text = random_output(rng)
        p = parser()
        content, calls = collect_calls([*p.feed(text), *p.finish()])
        assert OPEN_TAG not in (content or ""), text
        keys = set()
        for call in calls:
            arguments = json.loads(call["function"]["arguments"])
            assert isinstance(arguments, dict), text
            keys.add((call["function"]["name"], json.dumps(arguments, sort_keys=True)))
        assert len(keys) == len(calls), text
        assert p.n_calls == len(calls)
        n_calls += len(calls)
    assert n_calls > 100, "the generator should make calls"


# ---------------------------------------------------------------- the engine stops a repeat

BLOCKS = (OPEN_TAG, CLOSE_TAG)


def emitted(matcher: StopMatcher, text: str, cuts: list[int]) -> tuple[str, bool]:
    """What the engine would emit for `text` fed in pieces ending at `cuts`, and whether it
    stopped (the generation would end there)."""
    out, start = [], 0
    for end in [*cuts, len(text)]:
        piece, is_stopped = matcher.push(text[start:end])
        out.append(piece)
        start = end
        if is_stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_generation_stops_right_after_a_repeated_call() -> None:
    other = CALL.replace("Paris", "Rome")
    text = CALL + "\n" + other + "\n" + CALL + "\n" + CALL + "\n<tool_call>\n{"
    expected = CALL + "\n" + other + "\n" + CALL
    rng = random.Random(3)
    splits = [[], list(range(1, len(text)))]
    splits += [sorted(rng.sample(range(1, len(text)), 6)) for _ in range(100)]
    for cuts in splits:
        assert emitted(StopMatcher([], repeated_block=BLOCKS), text, cuts) == (expected, True)


def test_a_repeat_with_other_whitespace_or_key_order_is_a_repeat() -> None:
    again = '<tool_call>{ "arguments":{"city":"Paris"},\n"name":"get_weather"}</tool_call>'
    text = CALL + again + " trailing"
    assert emitted(StopMatcher([], repeated_block=BLOCKS), text, []) == (CALL + again, True)


def test_distinct_calls_and_text_do_not_stop() -> None:
    text = "a <tool_call>x</tool_call> b " + CALL + CALL.replace("Paris", "Rome") + " <tool_cal"
    assert emitted(StopMatcher([], repeated_block=BLOCKS), text, [5, 17, 40]) == (text, False)
    # Repeated text outside blocks is not a repeat either.
    assert emitted(StopMatcher([], repeated_block=BLOCKS), "ab ab ab", [2, 4]) == (
        "ab ab ab",
        False,
    )


def test_stop_strings_still_apply_with_repeats() -> None:
    m = StopMatcher(["END"], repeated_block=BLOCKS)
    assert emitted(m, CALL + " EN" + "D" + CALL, [len(CALL) + 2]) == (CALL + " ", True)
    m = StopMatcher(["END"], repeated_block=BLOCKS)
    assert emitted(m, CALL + CALL + "END", [len(CALL) + 5]) == (CALL + CALL, True)
    # A held-back stop-string prefix is not yet looked at for repeats; it is once released.
    m = StopMatcher([CLOSE_TAG + "!"], repeated_block=BLOCKS)
    assert emitted(m, CALL + CALL + "?", [len(CALL) * 2]) == (CALL + CALL, True)


def test_repeated_blocks_rejects_empty_markers() -> None:
    with pytest.raises(ValueError):
        RepeatedBlocks("", CLOSE_TAG)
