"""Tool calling on the real server: tools reach the bundled model through the system-prompt
convention (its template has no tools); forced calls are grammar-enforced, so they always
parse and validate; streaming follows OpenAI's delta format and equals the non-streamed result."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL_ID

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone.",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 20}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}  # type: ignore[index]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _check_calls(message: dict[str, Any], names: set[str]) -> list[dict[str, Any]]:
    calls = message["tool_calls"]
    assert calls, message
    for call in calls:
        assert call["type"] == "function"
        assert call["id"].startswith("call_")
        assert call["function"]["name"] in names
        args = json.loads(call["function"]["arguments"])
        jsonschema.validate(args, SCHEMAS[call["function"]["name"]])
    assert len({c["id"] for c in calls}) == len(calls)
    return calls  # type: ignore[no-any-return]


def _chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    r = http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": ASK, **body}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_required_always_yields_valid_calls(http: httpx.Client) -> None:
    body = _chat(http, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                 temperature=1.0, seed=3, n=10, max_tokens=200)
    for choice in body["choices"]:
        assert choice["finish_reason"] == "tool_calls"
        assert len(_check_calls(choice["message"], set(SCHEMAS))) == 1


def test_parallel_calls_are_each_valid(http: httpx.Client) -> None:
    """parallel_tool_calls (the default): one or more calls, each well-formed. (The tiny
    model tends to repeat calls until max_tokens: then the last one may be cut off.)"""
    body = _chat(http, tools=TOOLS, tool_choice="required", temperature=1.0, seed=8, n=2, max_tokens=120)
    for choice in body["choices"]:
        message = choice["message"]
        if choice["finish_reason"] == "length":
            message = {**message, "tool_calls": message["tool_calls"][:-1]}
        else:
            assert choice["finish_reason"] == "tool_calls"
        if message["tool_calls"]:
            _check_calls(message, set(SCHEMAS))


def test_named_function_is_the_one_called(http: httpx.Client) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    body = _chat(http, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
                 temperature=0.8, seed=1, n=4, max_tokens=200)
    for c in body["choices"]:
        calls = _check_calls(c["message"], {"get_time"})
        assert c["finish_reason"] == "tool_calls"
        assert all(call["function"]["name"] == "get_time" for call in calls)


def test_parallel_tool_calls_false_gives_one_call(http: httpx.Client) -> None:
    body = _chat(http, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                 temperature=1.0, seed=9, n=6, max_tokens=200)
    for c in body["choices"]:
        assert len(_check_calls(c["message"], set(SCHEMAS))) == 1


def test_none_never_calls(http: httpx.Client) -> None:
    body = _chat(http, tools=TOOLS, tool_choice="none", temperature=1.0, seed=4, n=4, max_tokens=40)
    for c in body["choices"]:
        assert "tool_calls" not in c["message"]
        assert c["finish_reason"] in ("stop", "length")


def test_auto_is_text_or_valid_calls(http: httpx.Client) -> None:
    body = _chat(http, tools=TOOLS, temperature=1.0, seed=5, n=6, max_tokens=200)
    for c in body["choices"]:
        if c["finish_reason"] == "tool_calls":
            _check_calls(c["message"], set(SCHEMAS))
        else:
            assert c["message"]["content"] is not None


def test_sdk_parses_forced_tool_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=False, temperature=0, max_tokens=200,
    )
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls
    call = message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def _stream(http: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    chunks = []
    with http.stream("POST", "/v1/chat/completions", json={"model": MODEL_ID, "messages": ASK, **body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_streamed_calls_equal_non_streamed(http: httpx.Client, seed: int) -> None:
    body = {"tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": seed != 3,
            "temperature": 1.0, "seed": seed, "max_tokens": 200}
    whole = _chat(http, **body)["choices"][0]
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in _stream(http, body):
        for ch in chunk["choices"]:
            finish = ch["finish_reason"] or finish
            for d in ch["delta"].get("tool_calls") or []:
                if d["index"] not in calls:  # the first delta of a call carries id, type, name
                    assert {"id", "type"} <= d.keys() and d["function"]["name"]
                    calls[d["index"]] = {"id": d["id"], "name": d["function"]["name"], "arguments": d["function"].get("arguments", "")}
                else:  # later ones only argument fragments; the name is never repeated
                    assert "name" not in d["function"] and "id" not in d
                    calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert finish == whole["finish_reason"]
    expected = whole["message"]["tool_calls"]
    assert [(c["name"], c["arguments"]) for _i, c in sorted(calls.items())] == [
        (c["function"]["name"], c["function"]["arguments"]) for c in expected
    ]


def test_round_trip_renders_calls_and_results(http: httpx.Client, client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL_ID, messages=ASK, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=False, temperature=0, max_tokens=200,
    )
    message = first.choices[0].message
    assert message.tool_calls
    call = message.tool_calls[0]
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": "21 C"}'},
    ]
    second = client.chat.completions.create(model=MODEL_ID, messages=history, tools=TOOLS, max_tokens=30)  # type: ignore[arg-type]
    assert second.choices[0].message.role == "assistant"
    # The call and its result are in the prompt the model saw.
    pieces = http.post("/tokenize", json={"messages": history, "tools": TOOLS, "with_pieces": True}).json()["tokens"]
    prompt = "".join(p["piece"] for p in pieces)
    assert "<tool_response>" in prompt and '"21 C"' in prompt
    assert call.function.name in prompt and "get_time" in prompt  # the tool list too


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]},
         "tools[0].function.parameters"),
        ({"messages": [{"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages[0].tool_call_id"),
    ],
)
def test_bad_tool_requests_are_400(http: httpx.Client, extra: dict[str, Any], param: str) -> None:
    r = http.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": ASK, "max_tokens": 4, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_auto_survives_a_token_that_completes_the_tag_with_junk(http: httpx.Client) -> None:
    """A token such as '>.' completing '<tool_call' carries text the tool grammar refuses:
    it is redrawn (llama.cpp's own lazy grammar would abort the process here)."""
    messages = [{"role": "user", "content": "Repeat exactly, nothing else: <tool_call>. <tool_call>. <tool_call>."}]
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": messages, "tools": TOOLS, "temperature": 0, "max_tokens": 60,
        "logit_bias": {"46": -100, "19369": 5},  # '>' banned, '>.' favoured
    }, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "tool_calls":
        _check_calls(choice["message"], set(SCHEMAS))
    assert http.get("/health").status_code == 200
