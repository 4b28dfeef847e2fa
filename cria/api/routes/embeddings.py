"""POST /v1/embeddings: check and tokenize the inputs, hand them to the engine, format."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cria.api import protocol, strict
from cria.api.generate import new_id
from cria.api.lifecycle import ClientGone, read_json, unless_disconnected
from cria.api.state import state_of
from cria.engine.base import EngineBase
from cria.engine.types import EmbeddingRequest
from cria.errors import InvalidRequest

router = APIRouter()


def _named_inputs(raw: Any) -> list[tuple[str, str | list[int]]]:
    """Each input with the `param` that names it in errors: "input" for a single text or token
    list, "input[i]" for the items of a list."""
    if isinstance(raw, str):
        return [("input", raw)]
    if not raw:
        raise InvalidRequest("input must not be an empty list", param="input")
    if isinstance(raw[0], int):
        return [("input", raw)]
    if len(raw) > protocol.MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"input has {len(raw)} items; at most {protocol.MAX_EMBEDDING_INPUTS} are allowed",
            param="input",
        )
    return [(f"input[{i}]", item) for i, item in enumerate(raw)]


def _tokenize_inputs(engine: EngineBase, raw: Any) -> tuple[tuple[int, ...], ...]:
    out: list[tuple[int, ...]] = []
    for param, item in _named_inputs(raw):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"{param} is an empty string", param=param)
            tokens = engine.tokenize_for_embedding(item)
        else:
            tokens = item
        engine.check_embedding_input(tokens, param=param)
        out.append(tuple(tokens))
    return tuple(out)


@router.post("/v1/embeddings")
async def create_embeddings(request: Request) -> Response:
    state = state_of(request)
    engine = state.engine
    try:
        req = await read_json(request, protocol.EmbeddingRequest, max_bytes=state.settings.max_body_bytes)
    except ClientGone:
        return Response(status_code=499)
    state.check_embedding_model(req.model)
    ignored = strict.check(req, lenient=state.settings.lenient)
    if req.dimensions is not None and req.dimensions > engine.embedding_size:
        raise InvalidRequest(
            f"dimensions is {req.dimensions}; this model's embeddings have "
            f"{engine.embedding_size} dimensions",
            param="dimensions",
        )
    job = EmbeddingRequest(
        id=new_id("emb"), inputs=_tokenize_inputs(engine, req.input), dimensions=req.dimensions
    )
    try:
        result = await unless_disconnected(request, engine.embed(job))
    except ClientGone:
        state.metrics.record_cancelled()
        return Response(status_code=499)
    return JSONResponse(
        protocol.embedding_list(
            req.model,
            result.vectors,
            result.n_prompt_tokens,
            as_base64=req.encoding_format == "base64",
        ),
        headers=strict.ignored_headers(ignored),
    )
