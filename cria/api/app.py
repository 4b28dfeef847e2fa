"""create_app(): the FastAPI app, its state container and its lifespan (engine start/stop)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from cria import __version__
from cria.api.errors import install_error_handlers
from cria.api.middleware import AccessLog, RequestMetrics, RequestTracing
from cria.api.routes import (
    capabilities,
    chat,
    completions,
    embeddings,
    health,
    metrics,
    models,
    tokens,
)
from cria.api.state import AppState
from cria.chat.template import ChatTemplate
from cria.engine.base import EngineBase
from cria.engine.llama import library_version
from cria.models.spec import EmbeddingSpec, ModelSpec
from cria.settings import Settings
from cria.telemetry.metrics import Metrics
from cria.telemetry.tracing import Tracing


def _created(path: Path) -> int:
    return int(path.stat().st_mtime) if path.exists() else int(time.time())


def create_app(
    settings: Settings,
    spec: ModelSpec,
    engine: EngineBase,
    *,
    embedding_spec: EmbeddingSpec | None = None,
) -> FastAPI:
    """Build the app around an engine. The lifespan starts the engine thread (the model loads
    in the background: /health says 503 until it is ready) and stops it on shutdown. The app
    has its own metrics registry, and the engine reports its steps to it; with a Zipkin endpoint
it has its own TracerProvider too, flushed on shutdown."""
    app_metrics = Metrics(
        model_id=spec.id,
        architecture=spec.architecture,
        context_size=settings.context_size,
        gpu_layers=settings.n_gpu_layers,
        llama_cpp_version=library_version(),
        adapter_ids=spec.adapter_ids,
    )
    engine.set_observer(app_metrics)
    tracing = Tracing.create(settings.zipkin_endpoint, service_name=settings.service_name)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            engine.stop()
            if tracing is not None:  # flush the last spans, off the event loop
                await asyncio.to_thread(tracing.shutdown)

    app = FastAPI(
        title="Cria",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.state.cria = AppState(
        settings=settings,
        spec=spec,
        engine=engine,
        template=ChatTemplate(spec.chat_template, bos_token=spec.bos_text, eos_token=spec.eos_text),
        created=_created(spec.path),
        metrics=app_metrics,
        embedding_spec=embedding_spec,
        embedding_created=_created(embedding_spec.path) if embedding_spec is not None else 0,
        tracing=tracing,
    )
    install_error_handlers(app)
    app.add_middleware(RequestMetrics, metrics=app_metrics)
    app.add_middleware(AccessLog)
    if tracing is not None:  # added last: the outermost, so its span covers the whole request
        app.add_middleware(RequestTracing, tracing=tracing)
    for module in (models, completions, chat, embeddings, tokens, capabilities, health, metrics):
        app.include_router(module.router)
    return app
