"""instructor against the real server, as its docs show:
`instructor.from_openai(OpenAI(base_url=...), mode=...)` with a pydantic `response_model`, in TOOLS
(a forced tool call), JSON_SCHEMA (`response_format` json_schema) and JSON (`json_object` plus the
schema in the system prompt) modes, and partial streaming (`create_partial`).
`max_retries=1` is a single attempt: a server fault is not hidden behind instructor's re-asks."""

from __future__ import annotations

import json
from typing import Any, Literal

import instructor
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.e2e.clients_common import CITY_PROMPT, MAX_TOKENS, City, check_city, check_usage
from tests.e2e.conftest import MODEL_ID, Server

ASK = [{"role": "user", "content": CITY_PROMPT}]
# For JSON mode, where only "a JSON object" is enforced: one worked example shows the tiny model
# the shape (without it, it tends to copy the schema from the system prompt).
FEW_SHOT = [
    {"role": "user", "content": "Rome is the capital of Italy."},
    {"role": "assistant", "content": '{"name": "Rome", "country": "Italy"}'},
    {"role": "user", "content": "Paris is the capital of France."},
]


class Weather(BaseModel):
    """Enum, integer and nested model (a $ref into $defs) in one schema."""

    city: City
    unit: Literal["celsius", "fahrenheit"]
    temperature: int


@pytest.fixture
def openai_client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def _create(client: instructor.Instructor, model: type[BaseModel], messages: list[dict[str, str]]) -> tuple[Any, Any]:
    return client.chat.completions.create_with_completion(
        model=MODEL_ID, response_model=model, messages=messages,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS, temperature=0, max_retries=1,
    )


def test_tools_mode(openai_client: openai.OpenAI) -> None:
    client = instructor.from_openai(openai_client, mode=instructor.Mode.TOOLS)
    city, completion = _create(client, City, ASK)
    check_city(city)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"  # forced by tool_choice naming the function
    calls = choice.message.tool_calls
    assert calls and all(c.function.name == "City" for c in calls)
    jsonschema.validate(json.loads(calls[0].function.arguments), City.model_json_schema())
    check_usage(completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens)


def test_tools_mode_nested_schema(openai_client: openai.OpenAI) -> None:
    client = instructor.from_openai(openai_client, mode=instructor.Mode.TOOLS)
    messages = [{"role": "user", "content": "In Paris, France it is 18 degrees celsius."}]
    weather, completion = _create(client, Weather, messages)
    assert isinstance(weather, Weather)
    check_city(weather.city)
    assert weather.unit in ("celsius", "fahrenheit") and isinstance(weather.temperature, int)
    assert completion.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("model", [City, Weather])
def test_json_schema_mode(openai_client: openai.OpenAI, model: type[BaseModel]) -> None:
    client = instructor.from_openai(openai_client, mode=instructor.Mode.JSON_SCHEMA)
    messages = ASK if model is City else [{"role": "user", "content": "In Paris, France it is 18 degrees celsius."}]
    value, completion = _create(client, model, messages)
    assert isinstance(value, model)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls is None
    # Enforced by the grammar: the content itself validates against the schema.
    jsonschema.validate(json.loads(choice.message.content), model.model_json_schema())
    check_usage(completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens)


def test_json_mode(openai_client: openai.OpenAI) -> None:
    client = instructor.from_openai(openai_client, mode=instructor.Mode.JSON)
    city, completion = _create(client, City, FEW_SHOT)
    check_city(city)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(json.loads(choice.message.content), dict)  # json_object is enforced


@pytest.mark.parametrize(
    ("mode", "messages"),
    [(instructor.Mode.TOOLS, ASK), (instructor.Mode.JSON_SCHEMA, ASK), (instructor.Mode.JSON, FEW_SHOT)],
    ids=["tools", "json_schema", "json"],
)
def test_create_partial(openai_client: openai.OpenAI, mode: instructor.Mode, messages: list[dict[str, str]]) -> None:
    client = instructor.from_openai(openai_client, mode=mode)
    partials = list(client.chat.completions.create_partial(
        model=MODEL_ID, response_model=City, messages=messages,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS, temperature=0, max_retries=1,
    ))
    assert partials
    # Each partial is the model with the fields seen so far; the last one is complete.
    for p in partials:
        assert set(type(p).model_fields) == {"name", "country"}
    last = partials[-1]
    check_city(City.model_validate(last.model_dump()))
    if mode is not instructor.Mode.TOOLS:
        # Content streams token by token: the object fills in over several chunks.
        assert len(partials) > 2
        assert any(p.name is None or p.country is None for p in partials)
