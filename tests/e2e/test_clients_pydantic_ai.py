"""pydantic-ai against the real server, as its docs show for an OpenAI-compatible API:
`Agent(OpenAIChatModel(name, provider=OpenAIProvider(base_url=..., api_key=...)))`, with a
structured `output_type` (the default tool output, and `NativeOutput`: response_format
json_schema) and a function tool. The tiny model need not pick a tool by itself: where a test
needs the tool called, the agent's per-step model settings force it on the first step (the
documented way to vary `tool_choice` across steps), then let the run finish."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import openai
import pytest
from pydantic_ai import Agent, NativeOutput, RunContext
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    RetryPromptPart,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings
from pydantic_ai.usage import UsageLimits

from tests.e2e.clients_common import (
    CITY_PROMPT,
    MAX_TOKENS,
    WEATHER_REPLY,
    City,
    check_city,
    check_weather_args,
    get_weather,
)
from tests.e2e.conftest import MODEL_ID, Server

SETTINGS: ModelSettings = {"temperature": 0, "max_tokens": MAX_TOKENS}
LIMITS = UsageLimits(request_limit=4)
T = TypeVar("T")


@pytest.fixture
def model(server: Server) -> Iterator[OpenAIChatModel]:
    # Our own AsyncOpenAI client (the provider's documented `openai_client`), closed by `_run` in
    # the event loop that used it: else its pooled sockets are left open past the loop.
    client = openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)
    yield OpenAIChatModel(MODEL_ID, provider=OpenAIProvider(openai_client=client))


def _run(model: OpenAIChatModel, step: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await step()
        finally:
            await model.client.close()

    return asyncio.run(main())


def _weather_first(ctx: RunContext[None]) -> ModelSettings:
    """Step 1 must call get_weather; later steps: no function tools (output tools stay)."""
    return {**SETTINGS, "tool_choice": ["get_weather"] if ctx.run_step <= 1 else "none"}


def _parts(messages: list[ModelMessage]) -> list[Any]:
    return [p for m in messages for p in m.parts]


def _check_no_retries(messages: list[ModelMessage]) -> None:
    """Every tool call and output validated the first time (no re-prompt was needed)."""
    retries = [p for p in _parts(messages) if isinstance(p, RetryPromptPart)]
    assert not retries, retries


def _check_responses(messages: list[ModelMessage]) -> None:
    for m in messages:
        if isinstance(m, ModelResponse):
            assert m.model_name == MODEL_ID
            assert m.usage.input_tokens > 0 and m.usage.output_tokens > 0
            assert m.finish_reason in ("stop", "tool_call")


def _check_weather_round_trip(messages: list[ModelMessage]) -> None:
    parts = _parts(messages)
    calls = [p for p in parts if isinstance(p, ToolCallPart) and p.tool_name == "get_weather"]
    returns = [p for p in parts if isinstance(p, ToolReturnPart) and p.tool_name == "get_weather"]
    assert len(calls) == 1, calls
    check_weather_args(calls[0].args_as_dict())
    assert [r.tool_call_id for r in returns] == [calls[0].tool_call_id]
    assert returns[0].content == WEATHER_REPLY


def test_structured_output_tool(model: OpenAIChatModel) -> None:
    agent = Agent(model, output_type=City, model_settings=SETTINGS)
    result = _run(model, lambda: agent.run(CITY_PROMPT, usage_limits=LIMITS))
    check_city(result.output)
    messages = result.all_messages()
    _check_no_retries(messages)
    _check_responses(messages)
    outputs = [p for p in _parts(messages) if isinstance(p, ToolCallPart)]
    assert [p.tool_name for p in outputs] == ["final_result"]
    usage = result.usage
    assert usage.requests == 1 and usage.input_tokens > 0 and usage.output_tokens > 0


def test_structured_output_native(model: OpenAIChatModel) -> None:
    agent = Agent(model, output_type=NativeOutput(City), model_settings=SETTINGS)
    result = _run(model, lambda: agent.run(CITY_PROMPT, usage_limits=LIMITS))
    check_city(result.output)
    messages = result.all_messages()
    _check_no_retries(messages)
    _check_responses(messages)
    assert not [p for p in _parts(messages) if isinstance(p, ToolCallPart)]
    assert result.usage.requests == 1


def test_tool_then_structured_output(model: OpenAIChatModel) -> None:
    agent = Agent(model, output_type=City, tools=[get_weather], model_settings=_weather_first)
    result = _run(model, lambda: agent.run("What is the weather in Paris, France?", usage_limits=LIMITS))
    check_city(result.output)
    messages = result.all_messages()
    _check_no_retries(messages)
    _check_responses(messages)
    _check_weather_round_trip(messages)
    assert result.usage.requests == 2 and result.usage.tool_calls == 1


def test_tool_then_text(model: OpenAIChatModel) -> None:
    agent = Agent(model, tools=[get_weather], model_settings=_weather_first)
    result = _run(model, lambda: agent.run("What is the weather in Paris?", usage_limits=LIMITS))
    assert isinstance(result.output, str) and result.output
    messages = result.all_messages()
    _check_no_retries(messages)
    _check_responses(messages)
    _check_weather_round_trip(messages)
    last = messages[-1]
    assert isinstance(last, ModelResponse)
    assert [type(p) for p in last.parts] == [TextPart]


def test_run_stream_text(model: OpenAIChatModel) -> None:
    agent = Agent(model, model_settings={**SETTINGS, "max_tokens": 32})

    async def run() -> tuple[list[str], str, Any]:
        async with agent.run_stream("Say hello.") as result:
            pieces = [p async for p in result.stream_text(delta=True)]
            output = await result.get_output()
            return pieces, output, result.usage

    pieces, output, usage = _run(model, run)
    assert len(pieces) > 1 and "".join(pieces) == output and output
    assert usage.requests == 1 and usage.input_tokens > 0 and 0 < usage.output_tokens <= 32
