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
