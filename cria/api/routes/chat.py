"""POST /v1/chat/completions: render the chat template, submit, format. No engine logic."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cria.api import protocol, strict
from cria.api.generate import (
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
from cria.api.state import AppState, state_of
from cria.api.structured import (
    TOOL_CALL_TRIGGER,
    call_checker,
    check_tool_schemas,
    response_format_grammar,
    tool_grammar,
)
from cria.chat.tools import (
    CLOSE_TAG,
    OPEN_TAG,
    CallArguments,
    CallStart,
    ContentText,
    Event,
    Function,
    ToolCallParser,
    ToolChoice,
    collect_calls,
    messages_for_template,
    parse_tool_choice,
    parse_tools,
)
from cria.engine.types import FinishReason, GenerationRequest, Usage
from cria.errors import InvalidRequest

log = logging.getLogger(__name__)
router = APIRouter()


def _message_dicts(messages: list[protocol.ChatMessage]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.content is None:
            if m.role != "assistant":
                raise InvalidRequest(f"messages[{i}].content is required", param=f"messages[{i}].content")
            text = m.refusal  # a refused turn sent back as history
        elif isinstance(m.content, str):
            text = m.content
        else:
            texts: list[str] = []
            for j, part in enumerate(m.content):
                if part.type not in ("text", "refusal"):
                    raise InvalidRequest(
                        f"content part type '{part.type}' is not supported by this model (text only)",
                        param=f"messages[{i}].content[{j}]",
                    )
                field = "refusal" if part.type == "refusal" else "text"
                part_text = getattr(part, field)
                if part_text is None:
                    raise InvalidRequest(
                        f"messages[{i}].content[{j}].{field} is required for a '{part.type}' part",
                        param=f"messages[{i}].content[{j}].{field}",
                    )
                texts.append(part_text)
            text = "\n".join(texts)
        if m.role == "tool" and m.tool_call_id is None:
            raise InvalidRequest(
                f"messages[{i}].tool_call_id is required for role tool",
                param=f"messages[{i}].tool_call_id",
            )
        if m.tool_calls is not None and m.role != "assistant":
            raise InvalidRequest(
                f"messages[{i}].tool_calls is only allowed on assistant messages",
                param=f"messages[{i}].tool_calls",
            )
        # Templates know "system"; OpenAI's newer "developer" role means the same thing.
        role = "system" if m.role == "developer" else m.role
        message: dict[str, Any] = {"role": role, "content": text}
        if m.name is not None:
            message["name"] = m.name
        if m.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


@dataclass(frozen=True, slots=True)
class _Plan:
    """What a chat request becomes before it reaches the engine."""

    prompt: list[int]
    tool_choice: ToolChoice
    grammar: str | None = None
    grammar_trigger: str | None = None
    max_calls: int | None = None  # the most calls a choice may return (None: no limit)
    accept_call: Callable[[str, Any], bool] | None = None  # the last check of each call

    @property
    def parses_tools(self) -> bool:
        return self.tool_choice.mode != "none"

    def parser(self) -> ToolCallParser:
        return ToolCallParser(max_calls=self.max_calls, accept=self.accept_call)


def _plan(state: AppState, req: protocol.ChatCompletionRequest) -> _Plan:
    functions = parse_tools(req.tools) if req.tools is not None else []
    check_tool_schemas(functions)
    choice = parse_tool_choice(req.tool_choice, functions)
    # A named function is called once (as OpenAI does, and as LangChain's bind_tools and
    # instructor expect); otherwise parallel_tool_calls false means at most one call.
    parallel = req.parallel_tool_calls is not False and choice.mode != "named"
    grammar = response_format_grammar(req.response_format)
    trigger = None
    if choice.mode in ("required", "named"):
        if grammar is not None:
            raise InvalidRequest(
                "response_format cannot be enforced together with a forced tool call",
                param="response_format",
            )
        grammar = tool_grammar(functions, choice, parallel=parallel)
    elif choice.mode == "auto" and grammar is None:
        # Free text, but a tool call, once the model starts one, is well-formed and valid.
        grammar, trigger = tool_grammar(functions, choice, parallel=parallel), TOOL_CALL_TRIGGER
    elif choice.mode == "auto":
        raise InvalidRequest(
            "response_format json_object/json_schema together with tools is not supported; "
            "use tool_choice 'required' or 'none'",
            param="response_format",
        )
    if grammar is not None and req.ignore_eos:
        raise InvalidRequest(
            "ignore_eos cannot be combined with structured output or tools (the grammar ends "
            "the output)",
            param="ignore_eos",
        )
    if grammar is not None and not state.engine.check_grammar(grammar):
        # A schema whose grammar llama.cpp refuses (e.g. left recursion): the request's fault.
        raise InvalidRequest(
            "the schema cannot be turned into a grammar llama.cpp accepts (is it left-recursive?)",
            param="response_format" if req.response_format is not None else "tools",
        )
    tokens = render_prompt(state, req.messages, functions, choice, parallel=parallel)
    if choice.mode == "none":
        return _Plan(tokens, choice, grammar, trigger)
    accept = call_checker(functions, choice)
    return _Plan(tokens, choice, grammar, trigger, None if parallel else 1, accept)


def render_prompt(
    state: AppState,
    messages: list[protocol.ChatMessage],
    functions: list[Function],
    choice: ToolChoice,
    *,
    parallel: bool,
) -> list[int]:
    """The prompt tokens of a conversation: the model's chat template, tools included."""
    template = state.template
    rendered, tools_value = messages_for_template(
        _message_dicts(messages),
        functions,
        choice,
        template_has_tools=template.supports_tools,
        parallel=parallel,
    )
    text = template.render(rendered, add_generation_prompt=True, tools=tools_value)
    bos = template.bos_token
    # The template usually writes BOS itself; add it only when the model wants it and it is not there.
    add_special = not (bos and text.startswith(bos))
    return state.engine.tokenize(text, add_special=add_special)


def _tool_extras(req: protocol.ChatCompletionRequest) -> list[strict.Unhonoured]:
    """Unknown keys inside tool definitions and tool_choice (free-form JSON in the model)."""
    out: list[strict.Unhonoured] = []
    for i, tool in enumerate(req.tools or []):
        out += strict.dict_extras(tool, {"type", "function"}, f"tools[{i}].")
        if isinstance(tool, dict):
            out += strict.dict_extras(
                tool.get("function"),
                {"name", "description", "parameters", "strict"},
                f"tools[{i}].function.",
            )
    out += strict.dict_extras(req.tool_choice, {"type", "function"}, "tool_choice.")
    if isinstance(req.tool_choice, dict):
        out += strict.dict_extras(req.tool_choice.get("function"), {"name"}, "tool_choice.function.")
    return out


def _check_combinations(req: protocol.ChatCompletionRequest) -> None:
    if req.stream_options is not None and not req.stream:
        raise InvalidRequest("stream_options is only allowed with stream: true", param="stream_options")
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise InvalidRequest(
            "give max_completion_tokens or max_tokens (deprecated), not both", param="max_tokens"
        )


def _logprobs_count(req: protocol.ChatCompletionRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise InvalidRequest("top_logprobs requires logprobs to be true", param="top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def _event_delta(event: Event) -> dict[str, Any]:
    if isinstance(event, ContentText):
        return {"content": event.text}
    if isinstance(event, CallStart):
        call = {"name": event.name, "arguments": ""}
        return {"tool_calls": [{"index": event.index, "id": event.id, "type": "function", "function": call}]}
    assert isinstance(event, CallArguments)
    return {"tool_calls": [{"index": event.index, "function": {"arguments": event.fragment}}]}


def _finish(reason: FinishReason, parser: ToolCallParser | None) -> str:
    """The choice's finish_reason; logs the calls the parser dropped."""
    if parser is None:
        return reason.value
    for why, name in parser.dropped:
        # A call that passed the grammar but not its schema is a bug in the grammar compiler.
        level = logging.WARNING if why in ("refused", "not_json") else logging.DEBUG
        log.log(level, "a tool call%s was dropped: %s", f" of {name!r}" if name else "", why)
    return "tool_calls" if parser.n_calls and reason is FinishReason.STOP else reason.value


@router.post("/v1/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    state = state_of(request)
    engine = state.engine
    try:
        req = await read_json(request, protocol.ChatCompletionRequest, max_bytes=state.settings.max_body_bytes)
    except ClientGone:
        return Response(status_code=499)
    adapter = state.check_model(req.model)
    ignored = strict.check(req, lenient=state.settings.lenient, more=_tool_extras(req))
    _check_combinations(req)
    n_logprobs = _logprobs_count(req)
    plan = _plan(state, req)
    tokens = plan.prompt
    requested: int | None
    if req.max_completion_tokens is not None:
        requested, param = req.max_completion_tokens, "max_completion_tokens"
    else:
        requested, param = req.max_tokens, "max_tokens"
    max_tokens = engine.resolve_max_tokens(len(tokens), requested, param=param)
    n = req.n or 1
    check_logprobs_budget(n, max_tokens, n_logprobs, stream=bool(req.stream), param="top_logprobs")
    n_vocab = engine.n_vocab
    group = new_id("grp") if n > 1 else None
    gens = [
        GenerationRequest(
            id=new_id("req"),
            prompt=tuple(tokens),
            max_tokens=max_tokens,
            sampling=sampling_from(
                req, n_vocab=n_vocab, choice=j, grammar=plan.grammar, grammar_trigger=plan.grammar_trigger
            ),
            stop=req.stop_list,
            # A model that writes the same call again stops there (the repeat is not returned).
            stop_at_repeated_block=(OPEN_TAG, CLOSE_TAG) if plan.parses_tools else None,
            ignore_eos=bool(req.ignore_eos),
            logprobs=n_logprobs,
            group=group,
            adapter=adapter,
        )
        for j in range(n)
    ]
    streams = submit_all(engine, gens)
    trace = None if state.tracing is None else state.tracing.for_request(model=req.model, max_tokens=max_tokens)
    response_id, created = new_id("chatcmpl"), int(time.time())
    headers = strict.ignored_headers(ignored)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(choices: list[dict[str, Any]], usage: Usage | None = None) -> dict[str, Any]:
            return protocol.chat_chunk(
                response_id, created, req.model, choices, with_usage=include_usage, usage=usage
            )

        text_chunk = protocol.TextChunk(
            lambda i, t: chunk([protocol.chat_chunk_choice(i, {"content": t})])
        )

        async def events() -> AsyncIterator[dict[str, Any] | str]:
            parsers = [plan.parser() if plan.parses_tools else None for _ in range(n)]
            for j in range(n):
                yield chunk([protocol.chat_chunk_choice(j, {"role": "assistant", "content": ""})])
            usages: list[tuple[int, Usage]] = []
            async for index, delta in merge(streams, state.metrics, trace=trace):
                lps = protocol.chat_logprobs(delta.logprobs) if n_logprobs is not None else None
                parser = parsers[index]
                if parser is None:
                    if lps:
                        yield chunk([protocol.chat_chunk_choice(index, {"content": delta.text}, logprobs=lps)])
                    elif delta.text:
                        yield text_chunk(index, delta.text)  # the hot path
                else:
                    evs = parser.feed(delta.text)
                    if delta.finish_reason is not None:
                        evs += parser.finish()
                    for k, ev in enumerate(evs):
                        yield chunk([protocol.chat_chunk_choice(index, _event_delta(ev), logprobs=lps if k == 0 else None)])
                    if lps and not evs:
                        yield chunk([protocol.chat_chunk_choice(index, {}, logprobs=lps)])
                if delta.finish_reason is not None:
                    assert delta.usage is not None
                    usages.append((0, delta.usage))
                    yield chunk([protocol.chat_chunk_choice(index, {}, _finish(delta.finish_reason, parser))])
            if include_usage:
                yield chunk([], sum_usage([len(tokens)], usages))

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
    choices = []
    for i, r in enumerate(results):
        lps = protocol.chat_logprobs(r.logprobs) if n_logprobs is not None else None
        if plan.parses_tools:
            parser = plan.parser()
            content, calls = collect_calls([*parser.feed(r.text), *parser.finish()])
            reason = _finish(r.finish_reason, parser)
            choices.append(protocol.chat_choice(i, content, reason, tool_calls=calls, logprobs=lps))
        else:
            choices.append(protocol.chat_choice(i, r.text, r.finish_reason, logprobs=lps))
    usage = sum_usage([len(tokens)], [(0, r.usage) for r in results])
    body = protocol.chat_completion(response_id, created, req.model, choices, usage)
    return JSONResponse(body, headers=headers)
