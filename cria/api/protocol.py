"""OpenAI request models (pydantic, strict) and response builders, with OpenAI's names.

Requests are validated strictly: a wrongly typed field is a 400, never coerced. Unknown fields
are ignored, as OpenAI clients send fields that do not concern a local server. Responses are
built as plain dicts: they are written once per token while streaming.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cria.engine.types import FinishReason, Usage

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields common to completions and chat completions."""

    model: str
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    # Extensions shared with llama.cpp's server.
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Probability | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: bool | None = False

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = [self.stop] if isinstance(self.stop, str) else self.stop
        return tuple(s for s in stops if s)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(v, list) and not v for v in value)):
            raise ValueError("prompt must not be an empty list")
        return value


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's limit on inputs per embeddings request


class EmbeddingRequest(_Request):
    model: str
    # One text, many texts, one token list, or many token lists (list[int] before the nested
    # form: pydantic's smart union picks the exact match either way).
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None


# ---- responses ----


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def finish_str(reason: FinishReason | None) -> str | None:
    return None if reason is None else reason.value


def completion_choice(index: int, text: str, reason: FinishReason | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_str(reason)}


def completion(
    id: str, created: int, model: str, choices: list[dict[str, Any]], usage: Usage | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if usage is not None:
        body["usage"] = usage_dict(usage)
    return body


def chat_choice(index: int, text: str, reason: FinishReason | None) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": None},
        "logprobs": None,
        "finish_reason": finish_str(reason),
    }


def chat_completion(
    id: str, created: int, model: str, choices: list[dict[str, Any]], usage: Usage
) -> dict[str, Any]:
    return {
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage_dict(usage),
        "system_fingerprint": None,
    }


def chat_chunk_choice(
    index: int, delta: dict[str, Any], reason: FinishReason | None = None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_str(reason)}


def chat_chunk(
    id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    *,
    with_usage: bool,
    usage: Usage | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": None,
    }
    if with_usage:  # OpenAI sends "usage": null on every chunk but the last when asked for usage
        body["usage"] = None if usage is None else usage_dict(usage)
    return body


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "cria"}


def encode_base64(values: Sequence[float]) -> str:
    """A vector as OpenAI sends it with encoding_format=base64: little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")


def embedding_list(
    model: str, vectors: Sequence[Sequence[float]], n_prompt_tokens: int, *, as_base64: bool
) -> dict[str, Any]:
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": encode_base64(vec) if as_base64 else list(vec),
        }
        for i, vec in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": n_prompt_tokens, "total_tokens": n_prompt_tokens},
    }
