"""Each app has its own metrics registry: two apps live in one process without clashing."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from cria.api.app import create_app
from cria.engine.base import EngineConfig
from cria.engine.engine import Engine
from cria.engine.llama import LlamaModel
from cria.engine.types import FinishReason, Timings, Usage
from cria.models.spec import CHATML_TEMPLATE, ModelSpec
from cria.settings import Settings


def _never_loaded() -> LlamaModel:
    raise AssertionError("the engine is never started here")


def _app_metrics(model_id: str):  # type: ignore[no-untyped-def]
    spec = ModelSpec(
        path=Path(f"/nonexistent/{model_id}.gguf"),
        id=model_id,
        architecture="llama",
        n_ctx_train=None,
        chat_template=CHATML_TEMPLATE,
        has_chat_template=False,
        bos_text="",
        eos_text="",
    )
    engine = Engine(
        _never_loaded,
        EngineConfig(n_ctx_per_seq=64, n_slots=1, n_batch=16, n_threads=1, max_queue=1),
    )
    app = create_app(Settings(), spec, engine)
    return app.state.cria.metrics


def _generated(text: bytes) -> float:
    for family in text_string_to_metric_families(text.decode()):
        if family.name == "cria_generated_tokens":
            return sum(s.value for s in family.samples if s.name == "cria_generated_tokens_total")
    raise AssertionError("cria_generated_tokens missing")


def test_two_apps_have_separate_registries() -> None:
    one, two = _app_metrics("model-one"), _app_metrics("model-two")  # a shared registry would raise
    assert one.registry is not two.registry
    one.record_finished(FinishReason.LENGTH, Usage(3, 4), Timings(0.0, 0.1, 0.2, 0.5, 4))
    assert _generated(one.render()) == 4
    assert _generated(two.render()) == 0
    assert b'id="model-one"' in one.render() and b'id="model-two"' in two.render()
