"""POST /v1/chat/completions: render the chat template, submit, format. No engine logic."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cria.api import protocol
from cria.api.generate import (
    cancel_all,
    collect,
    merge,
    new_id,
    sampling_from,
    submit_all,
    sum_usage,
)
from cria.api.lifecycle import ClientGone, read_json, unless_disconnected
from cria.api.sse import SSEResponse
from cria.api.state import AppState, state_of
from cria.engine.types import GenerationRequest, Usage
from cria.errors import InvalidRequest

router = APIRouter()


def _message_dicts(messages: list[protocol.ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.content is None:
            if m.role != "assistant":
                raise InvalidRequest(f"messages[{i}].content is required", param=f"messages[{i}].content")
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            texts: list[str] = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequest(
                        f"content part type '{part.type}' is not supported by this model (text only)",
                        param=f"messages[{i}].content[{j}]",
                    )
                texts.append(part.text)
            text = "\n".join(texts)
        # Templates know "system"; OpenAI's newer "developer" role means the same thing.
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": text}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def _check_unsupported(req: protocol.ChatCompletionRequest) -> None:
    if req.logprobs or req.top_logprobs is not None:
        raise InvalidRequest("logprobs are not supported yet", param="logprobs", code="unsupported_parameter")
    if req.tools:
        raise InvalidRequest("tools are not supported yet", param="tools", code="unsupported_parameter")
    if req.tool_choice not in (None, "none", "auto"):
        raise InvalidRequest("tool_choice is not supported yet", param="tool_choice", code="unsupported_parameter")
    if req.response_format is not None and req.response_format.get("type") not in (None, "text"):
        raise InvalidRequest(
            "response_format other than text is not supported yet",
            param="response_format",
            code="unsupported_parameter",
        )


def _prompt_tokens(state: AppState, req: protocol.ChatCompletionRequest) -> list[int]:
    text = state.template.render(_message_dicts(req.messages), add_generation_prompt=True)
    bos = state.template.bos_token
    # The template usually writes BOS itself; add it only when the model wants it and it is not there.
    add_special = not (bos and text.startswith(bos))
    return state.engine.tokenize(text, add_special=add_special)


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    state = state_of(request)
    engine = state.engine
    try:
        req = await read_json(request, protocol.ChatCompletionRequest, max_bytes=state.settings.max_body_bytes)
    except ClientGone:
        return Response(status_code=499)
    state.check_model(req.model)
    _check_unsupported(req)
    tokens = _prompt_tokens(state, req)
    requested: int | None
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = req.max_tokens, "max_tokens"
    max_tokens = engine.resolve_max_tokens(len(tokens), requested, param=param)
    n = req.n or 1
    n_vocab = engine.n_vocab
    gens = [
        GenerationRequest(
            id=new_id("req"),
            prompt=tuple(tokens),
            max_tokens=max_tokens,
            sampling=sampling_from(req, n_vocab=n_vocab, choice=j),
            stop=req.stop_list,
            ignore_eos=bool(req.ignore_eos),
        )
        for j in range(n)
    ]
    streams = submit_all(engine, gens)
    trace = None if state.tracing is None else state.tracing.for_request(model=req.model, max_tokens=max_tokens)
    response_id, created = new_id("chatcmpl"), int(time.time())

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
            return protocol.chat_chunk(
                response_id, created, req.model, choices, with_usage=include_usage, usage=usage
            )

        async def events() -> AsyncIterator[dict[str, Any]]:
            for j in range(n):
                yield chunk([protocol.chat_chunk_choice(j, {"role": "assistant", "content": ""})])
            usages: list[Usage] = []
            async for index, delta in merge(streams, state.metrics, trace=trace):
                if delta.text:
                    yield chunk([protocol.chat_chunk_choice(index, {"content": delta.text})])
                if delta.finish_reason is not None:
                    assert delta.usage is not None
                    usages.append(delta.usage)
                    yield chunk([protocol.chat_chunk_choice(index, {}, delta.finish_reason)])
            if include_usage:
                yield chunk([], sum_usage([len(tokens)], usages))

        return SSEResponse(
            events(),
            on_disconnect=lambda: cancel_all(streams, state.metrics),
            on_error=lambda error: state.metrics.record_error(error.type),
        )

    try:
        results = await unless_disconnected(request, collect(streams, state.metrics, trace=trace))
    except ClientGone:  # collect() closed the streams
        state.metrics.record_cancelled()
        return Response(status_code=499)
    choices = [protocol.chat_choice(i, r.text, r.finish_reason) for i, r in enumerate(results)]
    usage = sum_usage([len(tokens)], [r.usage for r in results])
    return JSONResponse(protocol.chat_completion(response_id, created, req.model, choices, usage))
