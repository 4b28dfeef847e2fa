"""What the client-library tests (tests/e2e/test_clients_*.py) share: one structured-output
model, one tool, the prompts, and checks of structure (never of the tiny model's wording)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
from pydantic import BaseModel

# Enough for one forced call with its markup, and a short bound on a runaway.
MAX_TOKENS = 200

CITY_PROMPT = "Paris is the capital of France. Extract the city and its country."
WEATHER_PROMPT = "What is the weather in Paris?"
WEATHER_REPLY = "18 C, sunny"


class City(BaseModel):
    """A city and the country it is in."""

    name: str
    country: str


def get_weather(city: str) -> str:
    """Current weather for a city."""
    assert isinstance(city, str)
    return WEATHER_REPLY


def check_city(value: object) -> City:
    """A validated `City` (the library parsed the server's output into the model)."""
    assert isinstance(value, City), repr(value)
    assert isinstance(value.name, str) and isinstance(value.country, str)
    return value


def check_weather_args(arguments: str | dict[str, Any]) -> dict[str, Any]:
    """Tool-call arguments as the server sent them: a JSON object that fits `get_weather`'s
    parameters (grammar-enforced for a forced call)."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    jsonschema.validate(args, {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    })
    return args


def check_usage(prompt_tokens: int | None, completion_tokens: int | None, total_tokens: int | None = None) -> None:
    assert isinstance(prompt_tokens, int) and prompt_tokens > 0, prompt_tokens
    assert isinstance(completion_tokens, int) and 0 < completion_tokens <= MAX_TOKENS, completion_tokens
    if total_tokens is not None:
        assert total_tokens == prompt_tokens + completion_tokens
