"""The chat template: messages OpenAI allows render (null content included); whatever a GGUF's
template raises on them is a 400 naming `messages`, never an unhandled exception (a 500)."""

from __future__ import annotations

import pytest

from cria.chat.template import ChatTemplate
from cria.errors import InvalidRequest
from cria.models.spec import CHATML_TEMPLATE


def _chatml() -> ChatTemplate:
    return ChatTemplate(CHATML_TEMPLATE, bos_token="", eos_token="")


@pytest.mark.parametrize(
    "assistant",
    [
        {"role": "assistant"},  # no content at all: OpenAI's spec allows it
        {"role": "assistant", "content": None},
    ],
)
def test_an_assistant_turn_without_content_renders_as_an_empty_turn(
    assistant: dict[str, object],
) -> None:
    messages = [{"role": "user", "content": "Hi"}, assistant, {"role": "user", "content": "Again"}]
    text = _chatml().render(messages)
    assert text == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n"
        "<|im_start|>user\nAgain<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert "content" not in assistant or assistant["content"] is None  # the input is not modified


def test_tool_calls_keep_a_null_content_for_templates_that_test_it() -> None:
    # As DeepSeek's and others' templates do: "calls only" is told apart by `content is none`.
    source = (
        "{% for m in messages %}{% if m.content is none %}CALLS:{{ m.tool_calls | length }}"
        "{% else %}TEXT:{{ m.content }}{% endif %}|{% endfor %}"
    )
    template = ChatTemplate(source, bos_token="", eos_token="")
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}]
    text = template.render(
        [
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "assistant", "content": None},
        ]
    )
    assert text == "CALLS:1|TEXT:|"


@pytest.mark.parametrize(
    ("source", "kind"),
    [
        # A null content concatenated (a tool-call turn keeps its null): TypeError.
        ("{% for m in messages %}{{ m.role + ': ' + m.content }}{% endfor %}", "TypeError"),
        ("{{ 1 // (messages | length - 1) }}", "ZeroDivisionError"),
        ("{{ range(1, 2, 0) | list }}", "ValueError"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ],
)
def test_what_a_template_raises_is_a_400_naming_messages(source: str, kind: str) -> None:
    template = ChatTemplate(source, bos_token="", eos_token="")
    calls = [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": {}}}]
    with pytest.raises(InvalidRequest) as raised:
        template.render([{"role": "assistant", "content": None, "tool_calls": calls}])
    assert raised.value.param == "messages"
    assert "chat template failed" in raised.value.message and kind in raised.value.message


def test_raise_exception_in_a_template_is_a_400() -> None:
    source = "{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}{% endif %}ok"
    template = ChatTemplate(source, bos_token="", eos_token="")
    assert template.render([{"role": "user", "content": "Hi"}]) == "ok"
    with pytest.raises(InvalidRequest) as raised:
        template.render([{"role": "assistant", "content": "Hi"}])
    assert raised.value.param == "messages" and "user first" in raised.value.message
