"""What the routes need, built once in create_app() and kept on app.state."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from cria.chat.template import ChatTemplate
from cria.engine.engine import Engine
from cria.errors import ModelNotFound
from cria.models.spec import ModelSpec
from cria.settings import Settings


@dataclass(frozen=True, slots=True)
class AppState:
    settings: Settings
    spec: ModelSpec
    engine: Engine
    template: ChatTemplate
    created: int  # the served model's "created" timestamp

    def check_model(self, model: str) -> None:
        if model != self.spec.id:
            raise ModelNotFound(
                f"the model '{model}' does not exist; this server serves '{self.spec.id}'",
                param="model",
            )


def state_of(request: Request) -> AppState:
    state = request.app.state.cria
    assert isinstance(state, AppState)
    return state
