"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from cria.api import protocol
from cria.api.state import AppState, state_of
from cria.errors import ModelNotFound

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = state_of(request)
    return JSONResponse({"object": "list", "data": _cards(state)})


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> JSONResponse:
    for card in _cards(state_of(request)):
        if card["id"] == model_id:
            return JSONResponse(card)
    raise ModelNotFound(f"the model '{model_id}' does not exist", param="model")


def _cards(state: AppState) -> list[dict[str, Any]]:
    cards = [protocol.model_card(state.spec.id, state.created)]
    # Adapters as vLLM lists them: their own ids, with the base model as parent.
    for adapter in state.spec.adapters:
        card = protocol.model_card(adapter.name, state.created)
        card.update(parent=state.spec.id, root=str(adapter.path))
        cards.append(card)
    if state.embedding_spec is not None:
        cards.append(protocol.model_card(state.embedding_spec.id, state.embedding_created))
    return cards
