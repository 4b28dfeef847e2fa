"""LiteLLM against the real server, as its docs show for an OpenAI-compatible endpoint:
`model="openai/<model>"` with `api_base` and `api_key` (`text_completion` then calls the native
/v1/completions route). LiteLLM must not reach the network: the model cost map is the bundled one
(`LITELLM_LOCAL_MODEL_COST_MAP`) and offline mode (`LITELLM_OFFLINE_MODE`) covers the other
catalogs and tokenizers it would fetch; both are set before the import. (LiteLLM's telemetry is
the proxy's, off unless an operator opts in; the SDK used here sends none.)"""

from __future__ import annotations

import os

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import litellm
import openai
import pytest

from tests.e2e.clients_common import MAX_TOKENS, WEATHER_PROMPT, check_usage, check_weather_args
from tests.e2e.conftest import MODEL_ID, Server

litellm.suppress_debug_info = True  # no "Provider List: ..." banners on stdout

# LiteLLM's lazily imported GitHub Copilot authenticator declares ReadOnly TypedDict items, which
# pydantic warns about when it builds their schema (inside litellm, on the first completion).
# Its stream wrapper reads `model_fields` / `model_computed_fields` on a pydantic instance
# (deprecated since pydantic 2.11).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Items? .* using the `ReadOnly` qualifier:UserWarning"),
    pytest.mark.filterwarnings(
        "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance:pydantic.warnings.PydanticDeprecatedSince211"
    ),
]

MODEL = f"openai/{MODEL_ID}"
HELLO = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module", autouse=True)
def _litellm_resources() -> Iterator[None]:
    """Close what LiteLLM leaves open, so no unclosed-resource warning fires later in the run.
    Its sync calls log through `asyncio.get_event_loop()`, which makes (and never closes) a
    loop for the main thread: it gets ours instead. Its text completions make a new OpenAI
    client per call, on `litellm.client_session` when set (ours, closed here); and it caches
    the OpenAI clients of its chat completions."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    session = httpx.Client(timeout=120)
    litellm.client_session = session
    yield
    litellm.client_session = None
    session.close()
    cache = litellm.in_memory_llm_clients_cache
    for cached in list(cache.cache_dict.values()):
        if isinstance(cached, openai.OpenAI):
            cached.close()
    cache.flush_cache()
    asyncio.set_event_loop(None)
    loop.close()


@pytest.fixture
def endpoint(server: Server) -> dict[str, Any]:
    return {"api_base": server.v1, "api_key": "unused", "timeout": 120, "num_retries": 0}


def test_offline_settings_took_effect() -> None:
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"].lower() == "true"
    assert litellm.model_cost  # the bundled map was loaded


def test_completion(endpoint: dict[str, Any]) -> None:
    r = litellm.completion(model=MODEL, messages=HELLO, max_tokens=32, temperature=0, **endpoint)
    assert isinstance(r, litellm.ModelResponse)
    assert r.model == MODEL_ID
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.role == "assistant"
    assert not choice.message.tool_calls
    check_usage(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)


def test_stream_with_usage(endpoint: dict[str, Any]) -> None:
    stream = litellm.completion(
        model=MODEL, messages=HELLO, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True}, **endpoint,
    )
    text, finish, usage = "", None, None
    n = 0
    for chunk in stream:
        n += 1
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
        usage = getattr(chunk, "usage", None) or usage
    assert n > 2 and text
    assert finish in ("stop", "length")
    assert usage is not None
    check_usage(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert usage.completion_tokens <= 32


@pytest.mark.parametrize("stream", [False, True])
def test_tools_forced(endpoint: dict[str, Any], stream: bool) -> None:
    r = litellm.completion(
        model=MODEL, messages=[{"role": "user", "content": WEATHER_PROMPT}], tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=MAX_TOKENS, temperature=0, stream=stream, **endpoint,
    )
    if stream:
        chunks = list(r)
        r = litellm.stream_chunk_builder(chunks, messages=[{"role": "user", "content": WEATHER_PROMPT}])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) >= 1
    for call in calls:
        assert call.id and call.type == "function"
        assert call.function.name == "get_weather"
        check_weather_args(call.function.arguments)


def test_embedding(endpoint: dict[str, Any]) -> None:
    r = litellm.embedding(model=MODEL, input=["The cat sat on the mat.", "Llamas live in the Andes."], **endpoint)
    assert isinstance(r, litellm.EmbeddingResponse)
    assert [d["index"] for d in r.data] == [0, 1]
    vectors = [d["embedding"] for d in r.data]
    assert len(vectors[0]) == len(vectors[1]) > 0
    assert all(isinstance(x, float) for x in vectors[0])
    assert vectors[0] != vectors[1]
    assert r.usage.prompt_tokens > 0


def test_text_completion(endpoint: dict[str, Any]) -> None:
    r = litellm.text_completion(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, **endpoint)
    assert isinstance(r, litellm.TextCompletionResponse)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")  # /v1/completions answered
    choice = r.choices[0]
    assert isinstance(choice.text, str) and choice.text
    assert choice.finish_reason in ("stop", "length")
    check_usage(r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens)
    assert r.usage.completion_tokens <= 8
