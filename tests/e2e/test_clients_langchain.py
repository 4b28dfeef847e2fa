"""LangChain (`langchain-openai`) against the real server, used as its docs show for an
OpenAI-compatible server: `ChatOpenAI(base_url=..., api_key=..., use_responses_api=False)` and
`OpenAIEmbeddings(..., check_embedding_ctx_length=False)` (which sends text, not tiktoken tokens:
tiktoken would download its BPE files). Structure is asserted, never wording."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import tiktoken
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings

from tests.e2e.clients_common import (
    CITY_PROMPT,
    MAX_TOKENS,
    WEATHER_PROMPT,
    WEATHER_REPLY,
    City,
    check_city,
    check_usage,
    check_weather_args,
)
from tests.e2e.clients_common import get_weather as _get_weather
from tests.e2e.conftest import MODEL_ID, Server

get_weather = tool(_get_weather)


@pytest.fixture
def llm(server: Server) -> ChatOpenAI:
    return ChatOpenAI(
        model=MODEL_ID, base_url=server.v1, api_key="unused", use_responses_api=False,
        temperature=0, max_tokens=MAX_TOKENS, max_retries=0, timeout=120,
    )


def _check_text(message: BaseMessage) -> None:
    assert isinstance(message, AIMessage)
    assert isinstance(message.content, str) and message.content
    assert message.tool_calls == [] and message.invalid_tool_calls == []
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.response_metadata["model_name"] == MODEL_ID
    usage = message.usage_metadata
    assert usage is not None
    check_usage(usage["input_tokens"], usage["output_tokens"], usage["total_tokens"])


def _check_weather_call(message: AIMessage) -> dict[str, Any]:
    assert message.invalid_tool_calls == [], message.invalid_tool_calls
    assert len(message.tool_calls) == 1, message.tool_calls
    call = message.tool_calls[0]
    assert call["name"] == "get_weather"
    assert call["id"]
    check_weather_args(call["args"])
    return call  # type: ignore[return-value]


def test_invoke(llm: ChatOpenAI) -> None:
    _check_text(llm.invoke("Say hello."))


def test_stream_with_usage(server: Server) -> None:
    llm = ChatOpenAI(
        model=MODEL_ID, base_url=server.v1, api_key="unused", use_responses_api=False,
        temperature=0, max_tokens=32, max_retries=0, stream_usage=True,
    )
    chunks = list(llm.stream("Say hello."))
    assert len(chunks) > 2  # streamed token by token, not as one piece
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    full = chunks[0]
    for c in chunks[1:]:
        full = full + c
    assert isinstance(full.content, str) and full.content
    assert full.response_metadata["finish_reason"] in ("stop", "length")
    usage = full.usage_metadata
    assert usage is not None  # the last chunk's usage (stream_options.include_usage)
    assert 0 < usage["output_tokens"] <= 32
    check_usage(usage["input_tokens"], usage["output_tokens"], usage["total_tokens"])


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm: ChatOpenAI, method: str) -> None:
    structured = llm.with_structured_output(City, method=method, include_raw=True)  # type: ignore[arg-type]
    result = structured.invoke(CITY_PROMPT)
    assert isinstance(result, dict)
    assert result["parsing_error"] is None
    check_city(result["parsed"])
    raw = result["raw"]
    assert isinstance(raw, AIMessage)
    if method == "function_calling":  # a forced call (tool_choice names it, parallel_tool_calls false)
        assert raw.response_metadata["finish_reason"] == "tool_calls"
        assert len(raw.tool_calls) == 1 and raw.tool_calls[0]["name"] == "City"
    else:
        assert raw.response_metadata["finish_reason"] == "stop"
        assert raw.tool_calls == []


def test_bind_tools_forced(llm: ChatOpenAI) -> None:
    message = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(WEATHER_PROMPT)
    assert isinstance(message, AIMessage)
    _check_weather_call(message)
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.content == ""


def test_bind_tools_forced_streamed(llm: ChatOpenAI) -> None:
    chunks: Iterator[BaseMessage] = llm.bind_tools([get_weather], tool_choice="get_weather").stream(WEATHER_PROMPT)
    full: Any = None
    for c in chunks:
        full = c if full is None else full + c
    assert isinstance(full, AIMessageChunk)
    _check_weather_call(full)
    assert full.response_metadata["finish_reason"] == "tool_calls"


def test_tool_round_trip(llm: ChatOpenAI) -> None:
    """Forced call -> the tool runs -> its ToolMessage goes back -> the model answers in text."""
    messages: list[BaseMessage] = [HumanMessage(WEATHER_PROMPT)]
    ai = llm.bind_tools([get_weather], tool_choice="get_weather").invoke(messages)
    assert isinstance(ai, AIMessage)
    call = _check_weather_call(ai)
    messages.append(ai)
    result = get_weather.invoke(call)
    assert isinstance(result, ToolMessage)
    assert result.tool_call_id == call["id"] and result.content == WEATHER_REPLY
    messages.append(result)
    # tool_choice "none" (passed through to the API): the turn after the result is text.
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(messages)
    _check_text(final)


def _decode_b64(vector: str) -> list[float]:
    raw = base64.b64decode(vector)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def test_embeddings(server: Server, http: httpx.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tiktoken(*args: object, **kwargs: object) -> None:
        raise AssertionError("tiktoken used: it would download its BPE files")

    monkeypatch.setattr(tiktoken, "get_encoding", no_tiktoken)
    monkeypatch.setattr(tiktoken, "encoding_for_model", no_tiktoken)
    embeddings = OpenAIEmbeddings(
        model=MODEL_ID, base_url=server.v1, api_key="unused",  # type: ignore[arg-type]
        check_embedding_ctx_length=False, max_retries=0,
    )
    texts = ["The cat sat on the mat.", "Llamas live in the Andes."]
    docs = embeddings.embed_documents(texts)
    assert len(docs) == 2
    dim = len(docs[0])
    assert dim > 0 and all(len(v) == dim for v in docs)
    for v in docs:
        assert all(isinstance(x, float) for x in v)
        assert math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-4)  # L2-normalized
    assert docs[0] != docs[1]
    query = embeddings.embed_query(texts[1])
    assert len(query) == dim
    assert query == pytest.approx(docs[1], abs=1e-5)
    # The SDK asked for base64 (its default): the decoded floats are the server's float ones.
    r = http.post("/v1/embeddings", json={"model": MODEL_ID, "input": texts, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    floats = [d["embedding"] for d in r.json()["data"]]
    r64 = http.post("/v1/embeddings", json={"model": MODEL_ID, "input": texts, "encoding_format": "base64"})
    assert r64.status_code == 200, r64.text
    for d, want in zip(r64.json()["data"], floats):
        assert _decode_b64(d["embedding"]) == pytest.approx(want, abs=1e-6)
    for got, want in zip(docs, floats):
        assert got == pytest.approx(want, abs=1e-5)
