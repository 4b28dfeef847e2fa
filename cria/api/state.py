"""What the routes need, built once in create_app() and kept on app.state."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from cria.chat.template import ChatTemplate
from cria.engine.base import EngineBase
from cria.errors import InvalidRequest, ModelNotFound
from cria.models.spec import EmbeddingSpec, ModelSpec
from cria.settings import Settings
from cria.telemetry.metrics import Metrics
from cria.telemetry.tracing import Tracing


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    spec: ModelSpec
    engine: EngineBase
    template: ChatTemplate
    created: int  # the served model's "created" timestamp
    metrics: Metrics
    embedding_spec: EmbeddingSpec | None = None  # a dedicated embedding model, if any
    embedding_created: int = 0
    tracing: Tracing | None = None  # None: tracing is off (no --zipkin-endpoint)

    @property
    def model_ids(self) -> list[str]:
        ids = [self.spec.id, *self.spec.adapter_ids]
        if self.embedding_spec is not None:
            ids.append(self.embedding_spec.id)
        return ids

    def check_model(self, model: str) -> str | None:
        """For the generation routes: the chat model or one of its LoRA adapters, never the
        dedicated embedding model. Returns the adapter's name (None: the base model)."""
        if self.embedding_spec is not None and model == self.embedding_spec.id:
            raise InvalidRequest(
                f"'{model}' is an embedding model: use POST /v1/embeddings with it, or "
                f"'{self.spec.id}' here",
                param="model",
                code="model_not_supported",
            )
        self._check_known(model)
        return model if model in self.spec.adapter_ids else None

    def check_embedding_model(self, model: str) -> None:
        """For /v1/embeddings: the dedicated embedding model if there is one, else the chat
        model."""
        if model in self.spec.adapter_ids:
            raise InvalidRequest(
                f"'{model}' is a LoRA adapter of '{self.spec.id}', for generation; embeddings "
                f"come from '{self.embedding_spec.id if self.embedding_spec else self.spec.id}'",
                param="model",
                code="model_not_supported",
            )
        if self.embedding_spec is not None and model == self.spec.id:
            raise InvalidRequest(
                f"'{model}' is this server's chat model; embeddings come from "
                f"'{self.embedding_spec.id}'",
                param="model",
                code="model_not_supported",
            )
        self._check_known(model)

    def _check_known(self, model: str) -> None:
        if model not in self.model_ids:
            served = "', '".join(self.model_ids)
            raise ModelNotFound(
                f"the model '{model}' does not exist; this server serves '{served}'",
                param="model",
            )


def state_of(request: Request) -> AppState:
    state = request.app.state.cria
    assert isinstance(state, AppState)
    return state
