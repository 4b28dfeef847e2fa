"""The OpenAI Agents SDK over Chat Completions against the real server, as its docs show for
another provider: `OpenAIChatCompletionsModel(model=..., openai_client=AsyncOpenAI(base_url=...))`,
tracing off (`set_tracing_disabled(True)`: nothing is sent to OpenAI's trace endpoint), an
`Agent` with a `function_tool`, `Runner.run`. The first turn forces the tool
(`ModelSettings(tool_choice=...)`); the SDK resets `tool_choice` after a call (its default
`reset_tool_choice`), so the run goes on to a text answer."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import openai
import pytest
from agents import (
    Agent,
    MessageOutputItem,
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    RunResult,
    RunResultStreaming,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)

from tests.e2e.clients_common import (
    CITY_PROMPT,
    MAX_TOKENS,
    WEATHER_PROMPT,
    WEATHER_REPLY,
    City,
    check_city,
    check_weather_args,
)
from tests.e2e.clients_common import get_weather as _get_weather
from tests.e2e.conftest import MODEL_ID, Server

set_tracing_disabled(True)
get_weather = function_tool(_get_weather)
T = TypeVar("T")


@pytest.fixture
def client(server: Server) -> Iterator[openai.AsyncOpenAI]:
    yield openai.AsyncOpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


def _run(client: openai.AsyncOpenAI, step: Callable[[], Awaitable[T]]) -> T:
    """Run in one event loop and close the client there (its pooled sockets belong to it)."""
    async def main() -> T:
        try:
            return await step()
        finally:
            await client.close()

    return asyncio.run(main())


def _weather_agent(client: openai.AsyncOpenAI, **settings: Any) -> Agent[None]:
    return Agent(
        name="weather",
        instructions="Answer questions about the weather.",
        model=OpenAIChatCompletionsModel(model=MODEL_ID, openai_client=client),
        tools=[get_weather],
        model_settings=ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=MAX_TOKENS, **settings),
    )


def _check_tool_run(result: RunResult | RunResultStreaming) -> None:
    items = result.new_items
    calls = [i for i in items if isinstance(i, ToolCallItem)]
    outputs = [i for i in items if isinstance(i, ToolCallOutputItem)]
    assert len(calls) >= 1
    first = calls[0].raw_item
    assert getattr(first, "name", None) == "get_weather"
    check_weather_args(first.arguments)  # type: ignore[union-attr]
    assert outputs and outputs[0].output == WEATHER_REPLY
    assert outputs[0].raw_item["call_id"] == first.call_id  # type: ignore[index, union-attr]
    # The run ends with the model's text, after the tool's result went back to it.
    assert isinstance(items[-1], MessageOutputItem)
    assert isinstance(result.final_output, str) and result.final_output
    usage = result.context_wrapper.usage
    assert usage.requests == len(calls) + 1
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens


def test_tool_agent(client: openai.AsyncOpenAI) -> None:
    agent = _weather_agent(client)
    result = _run(client, lambda: Runner.run(agent, WEATHER_PROMPT, max_turns=4))
    _check_tool_run(result)


def test_tool_agent_streamed(client: openai.AsyncOpenAI) -> None:
    agent = _weather_agent(client, include_usage=True)

    async def run() -> tuple[RunResultStreaming, list[str]]:
        result = Runner.run_streamed(agent, WEATHER_PROMPT, max_turns=4)
        kinds = [event.type async for event in result.stream_events()]
        return result, kinds

    result, kinds = _run(client, run)
    assert "raw_response_event" in kinds and "run_item_stream_event" in kinds
    _check_tool_run(result)


def test_structured_output(client: openai.AsyncOpenAI) -> None:
    agent = Agent(
        name="extractor",
        instructions="Extract the city.",
        model=OpenAIChatCompletionsModel(model=MODEL_ID, openai_client=client),
        output_type=City,  # sent as response_format json_schema, strict
        model_settings=ModelSettings(temperature=0, max_tokens=MAX_TOKENS),
    )
    result = _run(client, lambda: Runner.run(agent, CITY_PROMPT, max_turns=2))
    check_city(result.final_output)
    assert result.context_wrapper.usage.requests == 1
