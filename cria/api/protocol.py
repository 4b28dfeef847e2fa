"""OpenAI request models (pydantic, strict) and response builders, with OpenAI's names.

Requests are validated strictly: a wrongly typed field is a 400, never coerced. Fields that
are not declared are kept (`model_extra`) for `strict.py` to refuse (or, with --lenient, to list
as ignored): nothing a client sends is silently dropped. OpenAI fields whose effect depends on
their value (e.g. `store`) are declared as `Any` and judged there too. Responses are built as
plain dicts: they are written once per token while streaming.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cria import __version__
from cria.engine.types import FinishReason, TokenLogprob, Usage

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # judged in strict.py


class _SamplingFields(_Request):
    """Fields common to completions and chat completions."""

    model: str
    temperature: Temperature | None = None
    top_p: Probability | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None  # int64, as OpenAI's
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None  # an end-user id: accepted (it changes no output)
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


MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions
MAX_TOP_LOGPROBS = 20  # ... and for chat's top_logprobs


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 is allowed (as OpenAI does) with echo: the prompt's logprobs alone.
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    best_of: Annotated[int, Field(ge=1, le=20)] | None = None
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
    refusal: str | None = None  # {"type": "refusal"} parts of an assistant turn sent back
    # Parts other than text and refusal are refused by the chat route, naming the part.
    image_url: Any = None
    input_audio: Any = None
    file: Any = None


class FunctionCall(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None  # tool
    # An assistant message as a previous response had it (clients send it back as history):
    refusal: str | None = None
    annotations: list[Any] | None = None  # output annotations: nothing to render
    audio: Any = None  # judged in strict.py
    function_call: Any = None  # judged in strict.py


class JsonSchemaFormat(_Request):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    # Accepted, changing nothing a local server could change: identifiers and cache hints
    # (prefix caching is automatic here).
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    # OpenAI fields honoured only with some values (judged in strict.py).
    store: Any = None
    service_tier: Any = None
    modalities: Any = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    verbosity: Any = None
    reasoning_effort: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    moderation: Any = None
    function_call: Any = None
    functions: Any = None


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

# OpenAI's spec types it as a string (never null): the backend configuration, here the version.
SYSTEM_FINGERPRINT = f"fp_cria_{__version__}"


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def finish_str(reason: FinishReason | str | None) -> str | None:
    return reason.value if isinstance(reason, FinishReason) else reason


def completion_choice(
    index: int,
    text: str,
    reason: FinishReason | str | None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_str(reason)}


def completion(
    id: str, created: int, model: str, choices: list[dict[str, Any]], usage: Usage | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    if usage is not None:
        body["usage"] = usage_dict(usage)
    return body


def chat_choice(
    index: int,
    content: str | None,
    reason: FinishReason | str | None,
    *,
    tool_calls: list[dict[str, Any]] | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "index": index,
        "message": message,
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
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
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def chat_chunk_choice(
    index: int,
    delta: dict[str, Any],
    reason: FinishReason | str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "index": index,
        "delta": delta,
        "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
        "finish_reason": finish_str(reason),
    }


class TextChunk:
    """The JSON of a streamed chunk that carries only text for one choice — the hot path, one
    per token per stream — encoded from a template made once per response instead of building
    and encoding the dict each time. `sample(index, text)` must build the same chunk as a dict;
    the result is byte-identical to encoding it."""

    _TEXT = "\x00cria-text\x00"
    _INDEX = 987654321

    def __init__(self, sample: Callable[[int, str], dict[str, Any]]) -> None:
        encoded = _dumps(sample(self._INDEX, self._TEXT))
        head, self._tail = encoded.split(_dumps(self._TEXT))
        index = f'"index":{self._INDEX}'
        before, self._after_index = head.split(index)
        self._before_index = before + '"index":'

    def __call__(self, index: int, text: str) -> str:
        return f"{self._before_index}{index}{self._after_index}{_dumps(text)}{self._tail}"


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# ---- logprobs ----


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content`: token, logprob, UTF-8 bytes and the top alternatives."""
    return [
        {
            "token": _token_text(e.piece),
            "logprob": e.logprob,
            "bytes": list(e.piece),
            "top_logprobs": [
                {"token": _token_text(p), "logprob": lp, "bytes": list(p)} for _t, p, lp in e.top
            ],
        }
        for e in entries
    ]


class CompletionLogprobs:
    """Builds /v1/completions' `logprobs` object (tokens, token_logprobs, top_logprobs,
    text_offset) for one choice, in pieces as they stream; offsets count characters of the
    choice's text from its start (the echoed prompt included). Only the first echoed prompt
    token has null entries (no context), as OpenAI sends it."""

    def __init__(self) -> None:
        self.offset = 0

    def build(self, entries: Sequence[TokenLogprob | None], first_piece: bytes = b"") -> dict[str, Any]:
        """`None` entries are tokens without a logprob (the first prompt token, whose piece is
        `first_piece`)."""
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for e in entries:
            text = _token_text(first_piece if e is None else e.piece)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            if e is None:
                token_logprobs.append(None)
                top.append(None)
            else:
                token_logprobs.append(e.logprob)
                # The n most likely tokens and, as OpenAI does ("up to logprobs+1 elements"),
                # always the sampled one: a dict even for logprobs=0 (the spec allows no null).
                alternatives = {_token_text(p): lp for _t, p, lp in e.top}
                alternatives.setdefault(text, e.logprob)
                top.append(alternatives)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top,
            "text_offset": offsets,
        }


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
        "system_fingerprint": SYSTEM_FINGERPRINT,
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
