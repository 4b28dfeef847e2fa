"""Structured output on the real server: response_format json_object / json_schema is
enforced by llama.cpp's grammar sampler, so every output parses and validates, whatever the
(tiny) model would have written."""

from __future__ import annotations

import json
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.e2e.conftest import MODEL_ID

ADDRESS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
    },
    "required": ["city", "zip"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
        "address": {"$ref": "#/$defs/address"},
        "nickname": {"anyOf": [{"type": "string", "maxLength": 12}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "tags", "address", "nickname"],
    "additionalProperties": False,
    "$defs": {"address": ADDRESS},
}
MESSAGES = [{"role": "user", "content": "Describe a person called Ada as JSON."}]


def _schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


def test_json_schema_is_always_valid_over_many_seeds(http: httpx.Client) -> None:
    """20 samples at temperature 1 (two requests of n=10): all parse and validate."""
    outputs = []
    for seed in (1, 2):
        r = http.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": MESSAGES, "response_format": _schema_format(PERSON),
            "temperature": 1.0, "seed": seed, "n": 10, "max_tokens": 400,
        }, timeout=300)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            assert choice["finish_reason"] == "stop"
            outputs.append(choice["message"]["content"])
    assert len(outputs) == 20
    for text in outputs:
        jsonschema.validate(json.loads(text), PERSON)
    assert len(set(outputs)) > 1


def test_json_object_is_always_an_object(client: openai.OpenAI) -> None:
    """Every output that ends by itself is a JSON object. (Free-form JSON lets the tiny model
    ramble: one cut by max_tokens is unfinished, as OpenAI's would be.)"""
    r = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, response_format={"type": "json_object"},  # type: ignore[arg-type]
        temperature=0.8, seed=5, n=4, max_tokens=300,
    )
    finished = [c for c in r.choices if c.finish_reason == "stop"]
    assert len(finished) >= 2
    for choice in finished:
        assert isinstance(json.loads(choice.message.content or ""), dict)


def test_streamed_json_schema_equals_non_streamed(http: httpx.Client) -> None:
    body = {
        "model": MODEL_ID, "messages": MESSAGES, "response_format": _schema_format(PERSON),
        "temperature": 0.7, "seed": 42, "max_tokens": 400,
    }
    whole = http.post("/v1/chat/completions", json=body, timeout=120).json()["choices"][0]
    parts = []
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for ch in json.loads(line[6:])["choices"]:
                    parts.append(ch["delta"].get("content") or "")
    assert "".join(parts) == whole["message"]["content"]
    jsonschema.validate(json.loads(whole["message"]["content"]), PERSON)


class Step(pydantic.BaseModel):
    explanation: str = pydantic.Field(max_length=40)
    output: str = pydantic.Field(max_length=20)


class Answer(pydantic.BaseModel):
    steps: list[Step] = pydantic.Field(max_length=2)
    final: int
    confidence: Literal["low", "medium", "high"]
    note: str | None = pydantic.Field(max_length=20)


def test_sdk_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    completion = client.beta.chat.completions.parse(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "What is 2 + 3? Answer step by step."}],
        response_format=Answer,
        temperature=0,
        max_tokens=400,
    )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop"
    assert isinstance(message.parsed, Answer)
    assert message.refusal is None


def test_json_schema_with_text_type_is_plain(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_ID, messages=MESSAGES, response_format={"type": "text"}, max_tokens=4
    )
    assert r.choices[0].message.content is not None


@pytest.mark.parametrize(
    ("response_format", "param", "words"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}},
         "response_format.json_schema.schema", "not a valid JSON Schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "^(?=a)b"}}},
         "response_format.json_schema.schema", "lookaround"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "minLength": 3000}}},
         "response_format.json_schema.schema", "minLength"),
        ({"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
         "response_format.json_schema.name", "name"),
        ({"type": "json_schema"}, "response_format.json_schema", "required"),
        ({"type": "yaml"}, "response_format.type", "json_schema"),
    ],
)
def test_bad_or_unenforceable_schemas_are_400(
    http: httpx.Client, response_format: dict[str, Any], param: str, words: str
) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": MESSAGES, "response_format": response_format, "max_tokens": 4})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


def test_structured_output_refuses_ignore_eos(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": MESSAGES, "response_format": {"type": "json_object"},
        "ignore_eos": True, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"


@pytest.mark.parametrize("seed", [1, 2])
def test_bytes_that_are_not_utf8_cannot_stretch_a_string(http: httpx.Client, seed: int) -> None:
    """llama.cpp's grammar reads an overlong UTF-8 sequence (e0 88 92) as one character, but the
    text decodes it as three U+FFFD: with tokens 171 and 10644 (those bytes) pushed up, a string
    of maxLength 1 came out three characters long. Now such tokens are refused."""
    schema = {"type": "string", "maxLength": 1}
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": MESSAGES, "max_tokens": 20, "temperature": 0.7, "seed": seed,
        "logit_bias": {"171": 100, "10644": 100},
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        value = json.loads(choice["message"]["content"])
        jsonschema.validate(value, schema)
        assert "\ufffd" not in value
