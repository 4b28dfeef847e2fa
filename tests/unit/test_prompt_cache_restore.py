"""The real engine (bundled model, in process) when a prompt cache entry does not restore."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from cria.engine.base import EngineConfig
from cria.engine.engine import Engine
from cria.engine.llama import LlamaModel
from cria.engine.types import GenerationRequest, SamplingParams, Usage
from cria.models.spec import bundled_model_path


def _generate(engine: Engine, text: str) -> tuple[str, Usage]:
    async def run() -> tuple[str, Usage]:
        stream = engine.submit(
            GenerationRequest(
                id=f"r-{time.monotonic_ns()}",
                prompt=tuple(engine.tokenize(text)),
                max_tokens=4,
                sampling=SamplingParams(temperature=0.0),
                ignore_eos=True,
            )
        )
        out, usage = "", None
        async for delta in stream:
            out += delta.text
            usage = delta.usage or usage
        assert usage is not None
        return out, usage

    return asyncio.run(run())


def test_an_entry_that_does_not_restore_is_dropped_and_the_prompt_prefilled() -> None:
    engine = Engine(
        lambda: LlamaModel(bundled_model_path(), n_gpu_layers=0, use_mmap=True),
        EngineConfig(n_ctx_per_seq=256, n_slots=1, n_batch=256, n_threads=1, max_queue=4,
                     prompt_cache_bytes=64 << 20),
    )
    engine.start()
    try:
        assert engine.wait_ready(timeout=120)
        first = "A long shared system prompt about llamas and their mountains. " * 5
        other = "Something else entirely, about boats and the sea in winter. " * 5
        text, usage = _generate(engine, first)
        _generate(engine, other)  # the one slot is cut: the first prompt goes to the cache
        assert engine.stats().n_prompt_cache_entries == 1
        restored_text, restored = _generate(engine, first)
        assert restored.cached_tokens == usage.prompt_tokens - 1 and restored_text == text
        # The slot now holds the start of the first prompt and then something else.
        branch = first[:120] + "and then a story about trains and their stations."
        _generate(engine, branch)
        # Damage the first prompt's saved state: llama.cpp refuses to load it.
        cache = engine._prompt_cache
        assert cache is not None
        key = next(k for k in cache._entries if len(k[1]) >= usage.prompt_tokens)
        object.__setattr__(cache._entries[key], "state", np.zeros(16, dtype=np.uint8))
        # The entry holds more of the prompt than the slot: its restore is tried, empties the
        # slot, fails. The slot's shared start is gone with it: nothing may count as cached.
        _again_text, again = _generate(engine, first)
        assert again.cached_tokens == 0
        assert key not in cache._entries  # the bad entry is dropped, not tried again
        assert engine.stats().n_running == 0
    finally:
        engine.stop()
