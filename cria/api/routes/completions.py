"""POST /v1/completions: translate, submit, format. No engine logic here."""

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
from cria.api.state import state_of
from cria.engine.engine import Engine
from cria.engine.types import GenerationRequest, Usage
from cria.errors import InvalidRequest

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def _tokenize_prompts(engine: Engine, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        prompts: list[Any] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [prompt]
    else:
        prompts = list(prompt)
    out: list[list[int]] = []
    for p in prompts:
        tokens = engine.tokenize(p) if isinstance(p, str) else list(p)
        if not tokens and engine.model is not None and engine.model.bos is not None:
            tokens = [engine.model.bos]  # an empty prompt starts from BOS, as OpenAI allows
        if not tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        out.append(tokens)
    return out


def _check_unsupported(req: protocol.CompletionRequest) -> None:
    if req.logprobs is not None:
        raise InvalidRequest("logprobs are not supported yet", param="logprobs", code="unsupported_parameter")
    if req.best_of is not None and req.best_of != (req.n or 1):
        raise InvalidRequest("best_of is not supported", param="best_of", code="unsupported_parameter")
    if req.suffix:
        raise InvalidRequest("suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    state = state_of(request)
    engine = state.engine
    try:
        req = await read_json(request, protocol.CompletionRequest, max_bytes=state.settings.max_body_bytes)
    except ClientGone:
        return Response(status_code=499)
    state.check_model(req.model)
    _check_unsupported(req)
    prompts = _tokenize_prompts(engine, req.prompt)
    n = req.n or 1
    n_vocab = engine.n_vocab
    requested = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    gens: list[GenerationRequest] = []
    for tokens in prompts:
        max_tokens = engine.resolve_max_tokens(len(tokens), requested, param="max_tokens")
        for j in range(n):
            gens.append(
                GenerationRequest(
                    id=new_id("req"),
                    prompt=tuple(tokens),
                    max_tokens=max_tokens,
                    sampling=sampling_from(req, n_vocab=n_vocab, choice=j),
                    stop=req.stop_list,
                    ignore_eos=bool(req.ignore_eos),
                )
            )
    echoes = [engine.detokenize(p) if req.echo else "" for p in prompts]
    streams = submit_all(engine, gens)
    trace = None if state.tracing is None else state.tracing.for_request(model=req.model, max_tokens=requested)
    response_id, created = new_id("cmpl"), int(time.time())
    prompt_lengths = [len(p) for p in prompts]

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events() -> AsyncIterator[dict[str, Any]]:
            usages: list[Usage] = []
            sent_echo: set[int] = set()
            async for index, delta in merge(streams, state.metrics, trace=trace):
                text = delta.text
                if index not in sent_echo:
                    sent_echo.add(index)
                    text = echoes[index // n] + text
                if not text and delta.finish_reason is None:
                    continue
                if delta.usage is not None:
                    usages.append(delta.usage)
                choice = protocol.completion_choice(index, text, delta.finish_reason)
                yield protocol.completion(response_id, created, req.model, [choice], None)
            if include_usage:
                yield protocol.completion(
                    response_id, created, req.model, [], sum_usage(prompt_lengths, usages)
                )

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
    choices = [
        protocol.completion_choice(i, echoes[i // n] + r.text, r.finish_reason)
        for i, r in enumerate(results)
    ]
    usage = sum_usage(prompt_lengths, [r.usage for r in results])
    return JSONResponse(protocol.completion(response_id, created, req.model, choices, usage))
