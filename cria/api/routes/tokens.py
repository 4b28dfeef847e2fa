"""Extensions (as llama.cpp's server has them): POST /tokenize and POST /detokenize.

/tokenize counts tokens the way the generation routes will: `content` (llama-server's field)
or `prompt` as /v1/completions tokenizes it, or `messages` (with `tools`) as
/v1/chat/completions renders them through the chat template.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cria.api import protocol, strict
from cria.api.lifecycle import ClientGone, read_json
from cria.api.routes.chat import render_prompt
from cria.api.state import state_of
from cria.chat.tools import parse_tool_choice, parse_tools
from cria.errors import InvalidRequest

router = APIRouter()


class TokenizeRequest(protocol._Request):
    model: str | None = None
    content: str | None = None
    prompt: str | None = None
    messages: Annotated[list[protocol.ChatMessage], Field(min_length=1)] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    add_special: bool = True  # with content/prompt: add BOS when the model wants it
    with_pieces: bool = False


class DetokenizeRequest(protocol._Request):
    model: str | None = None
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    state = state_of(request)
    try:
        req = await read_json(request, TokenizeRequest, max_bytes=state.settings.max_body_bytes)
    except ClientGone:
        return Response(status_code=499)
    if req.model is not None:
        state.check_model(req.model)
    ignored = strict.check(req, lenient=state.settings.lenient)
    given = [name for name in ("content", "prompt", "messages") if getattr(req, name) is not None]
    if len(given) != 1:
        raise InvalidRequest("give exactly one of content, prompt or messages", param="content")
    if req.messages is not None and "add_special" in req.model_fields_set:
        raise InvalidRequest(
            "add_special applies to content or prompt (the chat template decides for messages)",
            param="add_special",
        )
    if req.messages is None:
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            if name in req.model_fields_set:
                raise InvalidRequest(f"{name} applies to messages only", param=name)
    engine = state.engine
    if req.messages is not None:
        functions = parse_tools(req.tools) if req.tools is not None else []
        choice = parse_tool_choice(req.tool_choice, functions)
        parallel = req.parallel_tool_calls is not False
        tokens = render_prompt(state, req.messages, functions, choice, parallel=parallel)
    else:
        text = req.content if req.content is not None else req.prompt
        assert text is not None
        tokens = engine.tokenize(text, add_special=req.add_special)
    body: dict[str, Any] = {"model": state.spec.id, "count": len(tokens)}
    if req.with_pieces:
        body["tokens"] = [
            {"id": t, "piece": engine.token_piece(t).decode("utf-8", errors="replace")}
            for t in tokens
        ]
    else:
        body["tokens"] = tokens
    return JSONResponse(body, headers=strict.ignored_headers(ignored))


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    state = state_of(request)
    try:
        req = await read_json(request, DetokenizeRequest, max_bytes=state.settings.max_body_bytes)
    except ClientGone:
        return Response(status_code=499)
    if req.model is not None:
        state.check_model(req.model)
    ignored = strict.check(req, lenient=state.settings.lenient)
    n_vocab = state.engine.n_vocab
    for i, t in enumerate(req.tokens):
        if not 0 <= t < n_vocab:
            raise InvalidRequest(f"tokens[{i}] = {t} is not a token id in [0, {n_vocab})", param=f"tokens[{i}]")
    return JSONResponse(
        {"model": state.spec.id, "content": state.engine.detokenize(req.tokens)},
        headers=strict.ignored_headers(ignored),
    )
