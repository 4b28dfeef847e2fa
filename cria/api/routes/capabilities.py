"""GET /v1/capabilities (extension): per model, what this server honours for it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse

from cria.api import protocol, strict
from cria.api.state import AppState, state_of

router = APIRouter()

EXTENSIONS = ["top_k", "min_p", "repeat_penalty", "ignore_eos"]


def _honoured(model: type[BaseModel]) -> list[str]:
    """Top-level fields a route honours (fields honoured only with some values included)."""
    return sorted(name for name in model.model_fields if name not in EXTENSIONS)


def _value_limits(model: type[BaseModel]) -> dict[str, str]:
    return {
        name: reason for name, (_ok, reason) in strict.JUDGED.items() if name in model.model_fields
    }


def _chat_model(state: AppState) -> dict[str, Any]:
    settings, engine = state.settings, state.engine
    return {
        "id": state.spec.id,
        "object": "model.capabilities",
        "architecture": state.spec.architecture,
        "context_size": settings.context_size,
        "slots": settings.parallel,
        "gpu_layers": settings.n_gpu_layers if settings.wants_gpu else 0,
        "chat_template": state.spec.has_chat_template,
        # Through the model's own template when it renders `tools`, else a system-prompt
        # convention; calls are parsed from <tool_call> blocks either way.
        "tools": "template" if state.template.supports_tools else "convention",
        "tool_choice": ["none", "auto", "required", "function"],
        "structured_output": ["json_object", "json_schema"],
        "logprobs": {"chat_top_logprobs_max": protocol.MAX_TOP_LOGPROBS,
                     "completions_logprobs_max": protocol.MAX_COMPLETION_LOGPROBS,
                     "prompt_logprobs": True},
        "fill_in_the_middle": engine.fim_tokens() is not None,
        "embeddings": state.embedding_spec is None,
        "strict": not settings.lenient,
        "parameters": {
            "/v1/chat/completions": _honoured(protocol.ChatCompletionRequest),
            "/v1/completions": _honoured(protocol.CompletionRequest),
            "extensions": EXTENSIONS,
        },
        "parameter_values": _value_limits(protocol.ChatCompletionRequest),
    }


def _embedding_model(state: AppState) -> dict[str, Any]:
    assert state.embedding_spec is not None
    return {
        "id": state.embedding_spec.id,
        "object": "model.capabilities",
        "embeddings": True,
        "chat": False,
        "strict": not state.settings.lenient,
        "parameters": {"/v1/embeddings": _honoured(protocol.EmbeddingRequest)},
    }


@router.get("/v1/capabilities")
async def capabilities(request: Request) -> JSONResponse:
    state = state_of(request)
    data = [_chat_model(state)]
    if state.embedding_spec is not None:
        data.append(_embedding_model(state))
    return JSONResponse({"object": "list", "data": data})
