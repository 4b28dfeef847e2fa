"""GET /metrics: Prometheus text format, from the app's own registry."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from cria.api.state import state_of
from cria.engine.base import EngineState
from cria.telemetry.metrics import CONTENT_TYPE

router = APIRouter()


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = state_of(request)
    stats = state.engine.stats()  # when not ready, the last snapshot: only its restarts count
    if state.engine.state is EngineState.READY:  # the gauges are read at scrape time
        state.metrics.set_engine(stats)
    state.metrics.set_engine_restarts(stats.n_engine_restarts)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)
