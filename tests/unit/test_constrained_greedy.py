"""Greedy constrained sampling: when the argmax is refused by the grammar, the sampler checks
the next most likely tokens one by one before a pass over the whole vocabulary. The result
must be exactly what the full pass gives (the grammar-allowed argmax), on the real model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from cria.engine.constrained import ConstrainedSampler
from cria.engine.llama import Batch, LlamaContext, LlamaModel
from cria.engine.sampling import SamplerStep
from cria.grammar import json_schema_grammar
from cria.models.spec import bundled_model_path

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "bb", "ccc"]}, "maxItems": 3},
        "when": {"type": "string", "format": "date"},
    },
    "required": ["name", "age", "tags", "when"],
}
PROMPT = "<|im_start|>user\nWrite a person as YAML, with a list of hobbies.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def lm() -> Iterator[tuple[LlamaModel, LlamaContext]]:
    model = LlamaModel(bundled_model_path(), n_gpu_layers=0, use_mmap=True)
    ctx = LlamaContext(
        model,
        n_ctx_per_seq=1024,
        n_seq=1,
        n_batch=256,
        n_threads=min(2, len(os.sched_getaffinity(0))),
    )
    yield model, ctx
    ctx.close()
    model.close()


def _generate(
    model: LlamaModel, ctx: LlamaContext, sampler: ConstrainedSampler, n: int = 80
) -> list[int]:
    prompt = model.tokenize(PROMPT, add_special=False, parse_special=True)
    batch = Batch(max(256, len(prompt)))
    ctx.seq_rm(0, 0)
    batch.add_run(prompt, 0, 0, logits="last")
    ctx.decode(batch)
    out: list[int] = []
    row = 0
    try:
        for i in range(n):
            token = sampler.sample(ctx, row)
            out.append(token)
            if model.is_eog(token):
                break
            batch.clear()
            row = batch.add_decodes([token], [len(prompt) + i], [0])
            ctx.decode(batch)
    finally:
        sampler.close()
    return out


@pytest.mark.parametrize(
    "recipe",
    [
        (SamplerStep("greedy"),),
        (SamplerStep("penalties", (64, 1.3, 0.2, 0.1)), SamplerStep("greedy")),
    ],
    ids=["greedy", "penalties-greedy"],
)
def test_tries_give_the_full_pass_result(lm: tuple[LlamaModel, LlamaContext], recipe: Any) -> None:
    model, ctx = lm
    gbnf = json_schema_grammar(SCHEMA)
    fast = ConstrainedSampler(recipe, model=model, grammar=gbnf, trigger=None)
    hits: list[int | None] = []
    original = fast._greedy_allowed

    def counting(refused: int) -> int | None:
        hits.append(original(refused))
        return hits[-1]

    fast._greedy_allowed = counting  # type: ignore[method-assign]
    slow = ConstrainedSampler(recipe, model=model, grammar=gbnf, trigger=None)
    slow.GREEDY_TRIES = 0  # always the full pass
    a = _generate(model, ctx, fast)
    b = _generate(model, ctx, slow)
    assert a == b
    # The prompt asks for YAML: the argmax is refused, and the tries found the allowed one.
    assert any(h is not None for h in hits), hits


def test_temperature_sampling_keeps_the_full_pass() -> None:
    """Only a chain that ends in greedy after in-place edits takes the shortcut."""
    model = LlamaModel(bundled_model_path(), n_gpu_layers=0, use_mmap=True)
    try:
        gbnf = json_schema_grammar({"type": "boolean"})
        for recipe, greedy in [
            ((SamplerStep("greedy"),), True),
            ((SamplerStep("logit_bias", (1, -1.0)), SamplerStep("greedy")), True),
            (
                (
                    SamplerStep("top_k", (40,)),
                    SamplerStep("temp", (0.7,)),
                    SamplerStep("dist", (1,)),
                ),
                False,
            ),
        ]:
            s = ConstrainedSampler(recipe, model=model, grammar=gbnf, trigger=None)
            try:
                assert s._greedy is greedy
            finally:
                s.close()
    finally:
        model.close()
