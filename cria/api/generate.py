"""Shared by the completion routes: request fields -> engine types, and reading many streams."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from cria.api.protocol import _SamplingFields
from cria.engine.base import EngineBase
from cria.engine.stream import RequestStream
from cria.engine.types import (
    Delta,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from cria.errors import CriaError, InvalidRequest
from cria.telemetry.logs import note_sequence
from cria.telemetry.metrics import Metrics
from cria.telemetry.tracing import RequestTrace

# ASCII digits only (str.isdigit() accepts "²"), and few enough for int() (which refuses
# strings of more than 4,300 digits): no vocabulary has 10**18 tokens.
_TOKEN_ID = re.compile(r"-?[0-9]{1,18}")


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def sampling_from(
    req: _SamplingFields,
    *,
    n_vocab: int,
    choice: int,
    grammar: str | None = None,
    grammar_trigger: str | None = None,
) -> SamplingParams:
    """The sampling settings of choice number `choice` (seeded choices get seed + choice, so
    n > 1 gives different but reproducible choices)."""
    bias: list[tuple[int, float]] = []
    for key, value in (req.logit_bias or {}).items():
        if not _TOKEN_ID.fullmatch(key) or not 0 <= int(key) < n_vocab:
            shown = key if len(key) <= 40 else key[:40] + "..."
            raise InvalidRequest(f"logit_bias key {shown!r} is not a token id in [0, {n_vocab})", param="logit_bias")
        bias.append((int(key), value))
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repeat_penalty=1.0 if req.repeat_penalty is None else req.repeat_penalty,
        seed=None if req.seed is None else req.seed + choice,
        logit_bias=tuple(bias),
        grammar=grammar,
        grammar_trigger=grammar_trigger,
    )


# Logprob entries (tokens x alternatives) a non-streamed response may hold: ~0.5 KB each until
# the response is written. Streamed responses hand them out as they come.
MAX_LOGPROB_ENTRIES = 1_000_000


def check_logprobs_budget(n_sequences: int, max_tokens: int, n_top: int | None, *, stream: bool, param: str) -> None:
    if n_top is None or stream:
        return
    entries = n_sequences * max_tokens * (n_top + 1)
    if entries > MAX_LOGPROB_ENTRIES:
        raise InvalidRequest(
            f"{n_sequences} sequences x {max_tokens} tokens x {n_top + 1} logprobs is too much for "
            f"one response (at most {MAX_LOGPROB_ENTRIES:,} entries): lower n, max_tokens or "
            f"{param}, or stream the response",
            param=param,
        )


def submit_all(engine: EngineBase, requests: Sequence[GenerationRequest]) -> list[RequestStream]:
    """Submit every request or none: if one is refused, the ones already queued are aborted."""
    if len(requests) > engine.config.max_queue:
        raise InvalidRequest(
            f"this request asks for {len(requests)} sequences; this server queues at most "
            f"{engine.config.max_queue} (--max-queue)",
            param="n",
        )
    streams: list[RequestStream] = []
    try:
        for request in requests:
            stream = engine.submit(request)
            stream.adapter = request.adapter
            streams.append(stream)
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


def close_all(streams: Sequence[RequestStream]) -> None:
    for stream in streams:
        stream.close()


def cancel_all(streams: Sequence[RequestStream], metrics: Metrics) -> None:
    """The client went away: abort every stream, and count the request as cancelled."""
    metrics.record_cancelled()
    close_all(streams)


def _record(
    metrics: Metrics, delta: Delta, trace: RequestTrace | None, adapter: str | None = None
) -> None:
    """Record a sequence's last Delta (tokens, finish reason, engine timings) in the metrics,
    in the request's access line and, when tracing is on, as its queue/prefill/decode spans."""
    assert delta.finish_reason is not None and delta.usage is not None
    assert delta.timings is not None
    metrics.record_finished(delta.finish_reason, delta.usage, delta.timings, adapter=adapter)
    note_sequence(delta.usage, delta.timings)
    if trace is not None:
        trace.record_sequence(delta.finish_reason, delta.usage, delta.timings)


@dataclass(slots=True)
class ChoiceResult:
    text: str
    finish_reason: FinishReason
    usage: Usage
    logprobs: list[TokenLogprob]  # when the request asked for them
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


async def _collect_one(
    stream: RequestStream, metrics: Metrics, trace: RequestTrace | None
) -> ChoiceResult:
    parts: list[str] = []
    logprobs: list[TokenLogprob] = []
    prompt_logprobs = None
    async for delta in stream:
        parts.append(delta.text)
        logprobs.extend(delta.logprobs)
        if delta.prompt_logprobs is not None:
            prompt_logprobs = delta.prompt_logprobs
        if delta.finish_reason is not None:
            assert delta.usage is not None
            _record(metrics, delta, trace, stream.adapter)
            return ChoiceResult(
                "".join(parts), delta.finish_reason, delta.usage, logprobs, prompt_logprobs
            )
    raise CriaError("the request ended without a result")


async def collect(
    streams: Sequence[RequestStream], metrics: Metrics, *, trace: RequestTrace | None = None
) -> list[ChoiceResult]:
    """Every stream's whole result; each finished sequence is recorded in `metrics` (and
    traced with `trace`)."""
    try:
        return list(await asyncio.gather(*(_collect_one(s, metrics, trace) for s in streams)))
    finally:
        for stream in streams:
            stream.close()


async def merge(
    streams: Sequence[RequestStream], metrics: Metrics, *, trace: RequestTrace | None = None
) -> AsyncIterator[tuple[int, Delta]]:
    """Deltas of several streams as they come, tagged with the stream's index; each finished
    sequence is recorded in `metrics` (and traced with `trace`). Closing the iterator closes (aborts) every stream that
    has not finished."""
    if len(streams) == 1:
        try:
            async for delta in streams[0]:
                if delta.finish_reason is not None:
                    _record(metrics, delta, trace, streams[0].adapter)
                yield 0, delta
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue[tuple[int, Delta | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((index, delta))
            queue.put_nowait((index, None))
        except BaseException as exc:
            queue.put_nowait((index, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        n_open = len(streams)
        while n_open:
            index, item = await queue.get()
            if item is None:
                n_open -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                if item.finish_reason is not None:
                    _record(metrics, item, trace, streams[index].adapter)
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


def sum_usage(prompt_lengths: Sequence[int], usages: Sequence[tuple[int, Usage]]) -> Usage:
    """`usages`: (prompt index, usage) of each choice. Prompt tokens count once per prompt (not
    per choice); completion tokens per choice. A prompt's cached tokens are those of its choice
    that reused the least (the others of `n` copy what that one computed)."""
    cached: dict[int, int] = {}
    for prompt, usage in usages:
        cached[prompt] = min(cached.get(prompt, usage.cached_tokens), usage.cached_tokens)
    return Usage(
        prompt_tokens=sum(prompt_lengths),
        completion_tokens=sum(u.completion_tokens for _p, u in usages),
        cached_tokens=sum(cached.values()),
    )
