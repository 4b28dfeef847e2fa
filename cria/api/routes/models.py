"""GET /v1/models and /v1/models/{id}."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from cria.api import protocol
from cria.api.state import state_of

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = state_of(request)
    return JSONResponse({"object": "list", "data": [protocol.model_card(state.spec.id, state.created)]})


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> JSONResponse:
    state = state_of(request)
    state.check_model(model_id)
    return JSONResponse(protocol.model_card(state.spec.id, state.created))
