"""Real responses, taken with raw HTTP, validated against OpenAI's official schemas.

The schemas come from OpenAI's openapi.yaml (tests/data/openai_schemas.json, extracted by
tests/tools/extract_openai_schemas.py); a failure lists every field that breaks them.
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL_ID, Server
from tests.e2e.test_tools import WEATHER
from tests.openai_schema import request_fields, validate, validate_each, violations

MAX_TOKENS = 4


def sse_json(response: httpx.Response) -> list[Any]:
    """The JSON payloads of an SSE response, in order; checks it ends with [DONE]."""
    assert response.status_code == 200, response.read()
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


def post_stream(server: Server, path: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", server.v1 + path, json={**body, "stream": True}, timeout=60) as r:
        return sse_json(r)


def chat_body(**overrides: Any) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **overrides,
    }


def completion_body(**overrides: Any) -> dict[str, Any]:
    return {
        "model": MODEL_ID,
        "prompt": "Once upon a time",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **overrides,
    }


# ---- the helper itself (no server) ----


def test_request_fields_follow_allof_and_refs() -> None:
    chat = request_fields("CreateChatCompletionRequest")
    # its own properties, and those of CreateModelResponseProperties -> ModelResponseProperties
    assert {"messages", "model", "response_format", "stream_options", "tools", "max_tokens"} <= chat
    assert {"temperature", "top_p", "user", "top_logprobs", "metadata"} <= chat
    completion = request_fields("CreateCompletionRequest")
    assert {
        "model",
        "prompt",
        "echo",
        "best_of",
        "suffix",
        "logprobs",
        "stream_options",
    } <= completion
    assert "messages" not in completion


def test_validate_reports_every_violation() -> None:
    body = {
        "id": "x",
        "object": "chat.completion",
        "created": "now",
        "model": MODEL_ID,
        "choices": [{}],
    }
    with pytest.raises(AssertionError) as info:
        validate("CreateChatCompletionResponse", body)
    message = str(info.value)
    assert (
        "$.created" in message
        and "$.choices[0]" in message
        and "'message' is a required property" in message
    )
    # nullable (OpenAPI 3.0 style in the spec) is converted: a null usage chunk is valid...
    chunk = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": None,
    }
    validate("CreateChatCompletionStreamResponse", chunk)
    # ...and the enum still applies to non-null values.
    bad = {**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "tired"}]}
    assert any(
        "finish_reason" in line for line in violations("CreateChatCompletionStreamResponse", bad)
    )


# ---- chat completions ----


@pytest.mark.parametrize("n", [1, 2])
def test_chat_completion(http: httpx.Client, n: int) -> None:
    r = http.post("/v1/chat/completions", json=chat_body(n=n))
    assert r.status_code == 200, r.text
    body = r.json()
    validate("CreateChatCompletionResponse", body)
    assert len(body["choices"]) == n


@pytest.mark.parametrize("n", [1, 2])
@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_completion_stream(server: Server, include_usage: bool, n: int) -> None:
    extra: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    chunks = post_stream(server, "/chat/completions", chat_body(n=n, **extra))
    validate_each("CreateChatCompletionStreamResponse", chunks)
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] > 0


# ---- completions ----


@pytest.mark.parametrize("overrides", [{}, {"echo": True}, {"n": 2}, {"prompt": ["Hello", "Good day"]}],
                         ids=["plain", "echo", "n2", "two-prompts"])  # fmt: skip
def test_completion(http: httpx.Client, overrides: dict[str, Any]) -> None:
    r = http.post("/v1/completions", json=completion_body(**overrides))
    assert r.status_code == 200, r.text
    validate("CreateCompletionResponse", r.json())


@pytest.mark.parametrize("overrides", [{}, {"echo": True, "n": 2, "stream_options": {"include_usage": True}}],
                         ids=["plain", "echo-n2-usage"])  # fmt: skip
def test_completion_stream(server: Server, overrides: dict[str, Any]) -> None:
    # The spec has no stream schema for /v1/completions: CreateCompletionStreamResponse is
    # CreateCompletionResponse with a nullable finish_reason (see the extraction script).
    chunks = post_stream(server, "/completions", completion_body(**overrides))
    validate_each("CreateCompletionStreamResponse", chunks)


# ---- embeddings ----


def test_embeddings_float(http: httpx.Client) -> None:
    r = http.post("/v1/embeddings", json={"model": MODEL_ID, "input": ["Hello", "world"]})
    assert r.status_code == 200, r.text
    validate("CreateEmbeddingResponse", r.json())


def test_embeddings_base64(http: httpx.Client) -> None:
    r = http.post(
        "/v1/embeddings", json={"model": MODEL_ID, "input": "Hello", "encoding_format": "base64"}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    # The spec types `embedding` as a number array only, though OpenAI itself sends a base64
    # string of little-endian float32s for encoding_format=base64: check that form, then
    # validate the rest with the vector decoded.
    decoded = []
    for item in body["data"]:
        raw = base64.b64decode(item["embedding"], validate=True)
        assert raw and len(raw) % 4 == 0
        decoded.append({**item, "embedding": list(struct.unpack(f"<{len(raw) // 4}f", raw))})
    validate("CreateEmbeddingResponse", {**body, "data": decoded})


# ---- models ----


def test_models(http: httpx.Client) -> None:
    r = http.get("/v1/models")
    assert r.status_code == 200, r.text
    validate("ListModelsResponse", r.json())
    r = http.get(f"/v1/models/{MODEL_ID}")
    assert r.status_code == 200, r.text
    validate("Model", r.json())


# ---- errors ----


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/chat/completions", {"model": MODEL_ID}, 400),  # messages missing
        ("POST", "/v1/chat/completions", chat_body(temperature="hot"), 400),
        ("POST", "/v1/completions", completion_body(prompt=5), 400),
        ("POST", "/v1/embeddings", {"model": MODEL_ID, "input": []}, 400),
        ("POST", "/v1/chat/completions", chat_body(model="gpt-4o"), 404),
        ("GET", "/v1/models/nope", None, 404),
        ("GET", "/v1/nothing", None, 404),
    ],
    ids=[
        "missing",
        "wrong-type",
        "prompt-type",
        "empty-input",
        "unknown-model",
        "unknown-model-get",
        "no-route",
    ],
)
def test_error_bodies(http: httpx.Client, method: str, path: str, body: Any, status: int) -> None:
    r = http.request(method, path, json=body)
    assert r.status_code == status, r.text
    validate("ErrorResponse", r.json())


def test_error_body_in_a_stream(server: Server) -> None:
    """A request refused before streaming starts is a plain JSON error, not an event stream."""
    r = httpx.post(
        server.v1 + "/chat/completions", json=chat_body(stream=True, model="nope"), timeout=60
    )
    assert r.status_code == 404, r.text
    validate("ErrorResponse", r.json())


# ---- the newer features: logprobs, tools, response_format, echo, best_of ----

FORCED_CALL = {
    "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    "tools": [WEATHER],
    "tool_choice": "required",
    "parallel_tool_calls": False,
    "max_tokens": 60,
}
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_logprobs(server: Server, stream: bool) -> None:
    body = chat_body(logprobs=True, top_logprobs=3, ignore_eos=True)
    if stream:
        chunks = post_stream(server, "/chat/completions", body)
        validate_each("CreateChatCompletionStreamResponse", chunks)
        entries = [
            e
            for c in chunks
            for ch in c["choices"]
            if ch.get("logprobs")
            for e in ch["logprobs"]["content"]
        ]
    else:
        r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        validate("CreateChatCompletionResponse", r.json())
        entries = r.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == MAX_TOKENS and all(len(e["top_logprobs"]) == 3 for e in entries)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_chat_forced_tool_call(server: Server, stream: bool) -> None:
    body = chat_body(**FORCED_CALL)
    if stream:
        chunks = post_stream(server, "/chat/completions", body)
        validate_each("CreateChatCompletionStreamResponse", chunks)
        assert any(ch["delta"].get("tool_calls") for c in chunks for ch in c["choices"])
        finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    else:
        r = httpx.post(server.v1 + "/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        validate("CreateChatCompletionResponse", r.json())
        choice = r.json()["choices"][0]
        assert choice["message"]["tool_calls"]
        finish = [choice["finish_reason"]]
    assert finish == ["tool_calls"]


def test_chat_response_format_json_schema(http: httpx.Client) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    messages = [{"role": "user", "content": "Name a city as JSON."}]
    r = http.post(
        "/v1/chat/completions",
        json=chat_body(messages=messages, response_format=fmt, max_tokens=40),
    )
    assert r.status_code == 200, r.text
    validate("CreateChatCompletionResponse", r.json())
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def _first_echoed_entry_nulls(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI sends null for the first echoed token's token_logprobs and top_logprobs entries
    (it has no context), which the spec's number/object item types do not allow: check that
    form, then return the body without those entries for validate()."""
    choices = []
    for choice in body["choices"]:
        lp = choice["logprobs"]
        if lp is not None and lp["tokens"] and lp["token_logprobs"][0] is None:
            assert lp["top_logprobs"][0] is None, lp
            lp = {
                **lp,
                "token_logprobs": lp["token_logprobs"][1:],
                "top_logprobs": lp["top_logprobs"][1:],
            }
        choices.append({**choice, "logprobs": lp})
    return {**body, "choices": choices}


COMPLETION_CASES = {
    "logprobs2": {"logprobs": 2},
    "echo-logprobs": {"echo": True, "logprobs": 2},
    "max-tokens0-echo-logprobs0": {"max_tokens": 0, "echo": True, "logprobs": 0},
    "best-of3-n1": {"best_of": 3, "n": 1, "temperature": 1.0, "seed": 5},
}


@pytest.mark.parametrize("overrides", list(COMPLETION_CASES.values()), ids=list(COMPLETION_CASES))
def test_completion_features(http: httpx.Client, overrides: dict[str, Any]) -> None:
    r = http.post("/v1/completions", json=completion_body(**overrides))
    assert r.status_code == 200, r.text
    body = r.json()
    echoed = bool(overrides.get("echo")) and overrides.get("logprobs") is not None
    if echoed:
        first = body["choices"][0]["logprobs"]
        assert first["token_logprobs"][0] is None and first["top_logprobs"][0] is None
        body = _first_echoed_entry_nulls(body)
    validate("CreateCompletionResponse", body)
    assert len(body["choices"]) == 1


STREAM_CASES = {
    k: COMPLETION_CASES[k] for k in ("logprobs2", "echo-logprobs", "max-tokens0-echo-logprobs0")
}


@pytest.mark.parametrize("overrides", list(STREAM_CASES.values()), ids=list(STREAM_CASES))
def test_completion_features_stream(server: Server, overrides: dict[str, Any]) -> None:
    chunks = post_stream(server, "/completions", completion_body(**overrides))
    if overrides.get("echo"):
        first = next(c for c in chunks if c["choices"] and c["choices"][0]["logprobs"]["tokens"])
        assert first["choices"][0]["logprobs"]["token_logprobs"][0] is None
        chunks = [_first_echoed_entry_nulls(c) for c in chunks]
    validate_each("CreateCompletionStreamResponse", chunks)
