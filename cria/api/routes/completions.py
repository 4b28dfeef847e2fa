"""POST /v1/completions: translate, submit, format. No engine logic here."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cria.api import protocol, strict
from cria.api.generate import (
    ChoiceResult,
    cancel_all,
    check_logprobs_budget,
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
from cria.engine.base import EngineBase
from cria.engine.types import GenerationRequest, TokenLogprob, Usage
from cria.errors import InvalidRequest

router = APIRouter()

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
MAX_SEQUENCES = 128  # prompts x best_of (or n) in one request: OpenAI's bound on n


def _prompt_list(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and isinstance(prompt[0], int):
        return [prompt]
    return list(prompt)


def _tokenize_prompts(engine: EngineBase, prompt: Any) -> list[list[int]]:
    out: list[list[int]] = []
    for p in _prompt_list(prompt):
        tokens = engine.tokenize(p) if isinstance(p, str) else list(p)
        if not tokens and engine.model is not None and engine.model.bos is not None:
            tokens = [engine.model.bos]  # an empty prompt starts from BOS, as OpenAI allows
        if not tokens:
            raise InvalidRequest("the prompt is empty", param="prompt")
        out.append(tokens)
    return out


def _fim_prompts(engine: EngineBase, prompt: Any, suffix: str) -> list[list[int]]:
    """Fill-in-the-middle prompts (prefix-suffix-middle order): the model writes what goes
    between each prompt and `suffix`."""
    fim = engine.fim_tokens()
    if fim is None:
        raise InvalidRequest(
            "suffix needs a model with fill-in-the-middle tokens; this one has none",
            param="suffix",
            code="unsupported_parameter",
        )
    pre, suf, mid = fim
    bos = [engine.model.bos] if engine.add_bos and engine.model and engine.model.bos is not None else []
    after = engine.tokenize(suffix, add_special=False)
    out: list[list[int]] = []
    for p in _prompt_list(prompt):
        before = engine.tokenize(p, add_special=False) if isinstance(p, str) else list(p)
        out.append([*bos, pre, *before, suf, *after, mid])
    return out


def _mean_logprob(result: ChoiceResult) -> float:
    if not result.logprobs:
        return float("-inf")
    return sum(e.logprob for e in result.logprobs) / len(result.logprobs)


def _pick_best(results: list[ChoiceResult], per_prompt: int, n: int) -> list[ChoiceResult]:
    """best_of: of each prompt's `per_prompt` results, the n with the highest mean token
    logprob (OpenAI: "the highest log probability per token"), in that order."""
    picked: list[ChoiceResult] = []
    for start in range(0, len(results), per_prompt):
        group = results[start : start + per_prompt]
        picked += sorted(group, key=_mean_logprob, reverse=True)[:n]
    return picked


@router.post("/v1/completions")
async def create_completion(request: Request) -> Response:
    state = state_of(request)
    engine = state.engine
    try:
        req = await read_json(request, protocol.CompletionRequest, max_bytes=state.settings.max_body_bytes)
    except ClientGone:
        return Response(status_code=499)
    adapter = state.check_model(req.model)
    ignored = strict.check(req, lenient=state.settings.lenient)
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", param="stream_options")
    n = req.n or 1
    best_of = req.best_of or n
    if best_of < n:
        raise InvalidRequest(f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if best_of > n and req.stream:
        raise InvalidRequest("best_of cannot be used with stream", param="best_of")
    echo = bool(req.echo)
    requested = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if requested == 0 and not echo:
        raise InvalidRequest("max_tokens must be at least 1 (0 only with echo)", param="max_tokens")
    if req.suffix:
        if echo and req.logprobs is not None:
            raise InvalidRequest(
                "echo with logprobs is not supported together with suffix", param="suffix"
            )
        prompts = _fim_prompts(engine, req.prompt, req.suffix)
        shown_prompts = _tokenize_prompts(engine, req.prompt) if echo else []
    else:
        prompts = _tokenize_prompts(engine, req.prompt)
        shown_prompts = prompts
    n_sequences = best_of * len(prompts)
    if n_sequences > max(MAX_SEQUENCES, n):
        raise InvalidRequest(
            f"this request asks for {n_sequences} sequences ({len(prompts)} prompts x "
            f"{'best_of' if req.best_of else 'n'} {best_of}); at most {MAX_SEQUENCES} per request",
            param="best_of" if req.best_of else "prompt",
        )
    n_vocab = engine.n_vocab
    wants_logprobs = req.logprobs is not None
    # best_of ranks choices by their tokens' logprobs: computed then, shown only if asked.
    n_logprobs = req.logprobs if wants_logprobs else (0 if best_of > n else None)
    check_logprobs_budget(
        n_sequences, requested + (max(map(len, prompts)) if echo else 0), req.logprobs,
        stream=bool(req.stream), param="logprobs",
    )
    gens: list[GenerationRequest] = []
    for tokens in prompts:
        max_tokens = engine.resolve_max_tokens(len(tokens), requested, param="max_tokens")
        prompt_logprobs = echo and wants_logprobs
        # Choices of one prompt share its KV cache (unless each scores its prompt itself).
        group = new_id("grp") if best_of > 1 and not prompt_logprobs else None
        for j in range(best_of):
            gens.append(
                GenerationRequest(
                    id=new_id("req"),
                    prompt=tuple(tokens),
                    max_tokens=max_tokens,
                    sampling=sampling_from(req, n_vocab=n_vocab, choice=j),
                    stop=req.stop_list,
                    ignore_eos=bool(req.ignore_eos),
                    logprobs=n_logprobs,
                    prompt_logprobs=prompt_logprobs,
                    group=group,
                    adapter=adapter,
                )
            )
    # The prompt as the client sent it (without fill-in-the-middle tokens and suffix).
    streams = submit_all(engine, gens)  # checks the prompts' token ids first
    echoes = [engine.detokenize(p) for p in shown_prompts] if echo else [""] * len(prompts)
    first_pieces = [engine.token_piece(p[0]) for p in prompts]
    trace = None if state.tracing is None else state.tracing.for_request(model=req.model, max_tokens=requested)
    response_id, created = new_id("cmpl"), int(time.time())
    prompt_lengths = [len(p) for p in prompts]
    headers = strict.ignored_headers(ignored)

    def logprobs_of(
        builder: protocol.CompletionLogprobs,
        prompt_index: int,
        prompt_lps: Sequence[TokenLogprob | None] | None,
        lps: Sequence[TokenLogprob],
    ) -> dict[str, Any]:
        entries: list[TokenLogprob | None] = [*(prompt_lps or ()), *lps]
        return builder.build(entries, first_piece=first_pieces[prompt_index])

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        text_chunk = protocol.TextChunk(
            lambda i, t: protocol.completion(
                response_id, created, req.model, [protocol.completion_choice(i, t, None)], None
            )
        )

        async def events() -> AsyncIterator[dict[str, Any] | str]:
            usages: list[tuple[int, Usage]] = []
            sent_echo: set[int] = set()
            builders = [protocol.CompletionLogprobs() for _ in streams]
            async for index, delta in merge(streams, state.metrics, trace=trace):
                text = delta.text
                if text and delta.finish_reason is None and not wants_logprobs and index in sent_echo:
                    yield text_chunk(index, text)  # the hot path: one per token per stream
                    continue
                if index not in sent_echo:
                    sent_echo.add(index)
                    text = echoes[index // n] + text
                if not text and delta.finish_reason is None and not (wants_logprobs and delta.logprobs):
                    continue
                if delta.usage is not None:
                    usages.append((index // n, delta.usage))
                lp = None
                if wants_logprobs:
                    lp = logprobs_of(builders[index], index // n, delta.prompt_logprobs, delta.logprobs)
                choice = protocol.completion_choice(index, text, delta.finish_reason, lp)
                yield protocol.completion(response_id, created, req.model, [choice], None)
            if include_usage:
                yield protocol.completion(
                    response_id, created, req.model, [], sum_usage(prompt_lengths, usages)
                )

        return SSEResponse(
            events(),
            on_disconnect=lambda: cancel_all(streams, state.metrics),
            on_error=lambda error: state.metrics.record_error(error.type),
            headers=headers,
        )

    try:
        results = await unless_disconnected(request, collect(streams, state.metrics, trace=trace))
    except ClientGone:  # collect() closed the streams
        state.metrics.record_cancelled()
        return Response(status_code=499)
    usage = sum_usage(prompt_lengths, [(i // best_of, r.usage) for i, r in enumerate(results)])
    shown = _pick_best(results, best_of, n) if best_of > n else results
    choices = []
    for i, r in enumerate(shown):
        lp = None
        if wants_logprobs:
            lp = logprobs_of(
                protocol.CompletionLogprobs(), i // n, r.prompt_logprobs, r.logprobs
            )
        choices.append(protocol.completion_choice(i, echoes[i // n] + r.text, r.finish_reason, lp))
    body = protocol.completion(response_id, created, req.model, choices, usage)
    return JSONResponse(body, headers=headers)
