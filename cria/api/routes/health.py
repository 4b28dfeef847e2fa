"""GET /health: 200 once the model is loaded and the engine thread alive; 503 otherwise.

The body also reports the engine's counters, among them the most sequences ever decoded in one
llama_decode (evidence of continuous batching).
"""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse

from cria.api.state import state_of
from cria.engine.base import EngineState

router = APIRouter()


@router.get("/health")
@router.head("/health", include_in_schema=False)  # monitors often probe with HEAD
async def health(request: Request) -> JSONResponse:
    state = state_of(request)
    engine_state = state.engine.state
    body: dict[str, object] = {"status": "ok" if engine_state is EngineState.READY else engine_state.value}
    body["model"] = state.spec.id
    if engine_state is EngineState.READY:
        body["engine"] = asdict(state.engine.stats())
    elif state.engine.failure:
        body["error"] = state.engine.failure
    return JSONResponse(body, status_code=200 if engine_state is EngineState.READY else 503)
