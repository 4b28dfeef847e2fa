"""A chat template that renders tools itself (HF convention, Qwen/Hermes style) gets them
through its `tools` variable; the bundled ChatML template does not read it."""

from __future__ import annotations

import json

from cria.chat.template import ChatTemplate
from cria.chat.tools import ToolChoice, messages_for_template, parse_tools
from cria.models.spec import CHATML_TEMPLATE

# A trimmed Hermes/Qwen-style template: tools in the system turn, calls as <tool_call> blocks.
TOOLS_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and tools %}{% continue %}{% endif %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def test_supports_tools_is_detected_from_the_template_source() -> None:
    assert ChatTemplate(TOOLS_TEMPLATE, bos_token="", eos_token="").supports_tools
    assert not ChatTemplate(CHATML_TEMPLATE, bos_token="", eos_token="").supports_tools


def test_tools_and_a_round_trip_render_through_the_template() -> None:
    template = ChatTemplate(TOOLS_TEMPLATE, bos_token="", eos_token="")
    functions = parse_tools(TOOLS)
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C"},
    ]
    messages, tools = messages_for_template(
        history, functions, ToolChoice("auto"), template_has_tools=True, parallel=True
    )
    assert tools is not None and tools[0]["function"]["name"] == "get_weather"
    text = template.render(messages, tools=tools)
    assert "Be brief." in text and "<tools>" in text
    assert json.dumps(tools[0]) in text or '"get_weather"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n21 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tool_choice_none_keeps_tools_out_of_the_template() -> None:
    messages, tools = messages_for_template(
        [{"role": "user", "content": "Hi"}], parse_tools(TOOLS), ToolChoice("none"),
        template_has_tools=True, parallel=True,
    )
    assert tools is None
    text = ChatTemplate(TOOLS_TEMPLATE, bos_token="", eos_token="").render(messages, tools=tools)
    assert "<tools>" not in text
