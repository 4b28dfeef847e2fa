"""LoRA adapters in llama.cpp: loaded once per model, applied per context as one set at a time.

llama.cpp applies one adapter set to a whole llama_context, so every sequence of one
llama_decode runs under the same set: the engine plans each step for one set (scheduler.py)
and switches here between steps. A switch costs little in itself but makes llama.cpp reserve
its compute graph again at the next decode (`sched_need_reserve`), so the scheduler keeps a set
for several steps when others wait.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from typing import Any

from cria.engine._bindings import llama_cpp
from cria.engine.types import AdapterFile

log = logging.getLogger("cria.llama")


class AdapterLoadError(RuntimeError):
    pass


class LoraAdapter:
    """One llama_adapter_lora, bound to the model it was loaded for (freed with it)."""

    def __init__(self, model_ptr: Any, spec: AdapterFile) -> None:
        self.name = spec.name
        self.scale = spec.scale
        ptr = llama_cpp.llama_adapter_lora_init(model_ptr, str(spec.path).encode())
        # A failed load returns a NULL pointer object, which is not None: test its truth.
        if ptr is None or not ptr:
            raise AdapterLoadError(f"llama.cpp could not load the LoRA adapter '{spec.name}' ({spec.path})")
        self._ptr = ptr

    @property
    def ptr(self) -> Any:
        return self._ptr


class AdapterSwitch:
    """The adapter set a llama_context runs with; `use` changes it only when it differs."""

    def __init__(self, ctx_ptr: Any) -> None:
        self._ctx = ctx_ptr
        self.current: str | None = None  # the adapter's name; None: the base model
        self.n_switches = 0

    def use(self, name: str | None, adapters: Sequence[LoraAdapter]) -> None:
        if name == self.current:
            return
        if name is None:
            llama_cpp.llama_set_adapters_lora(self._ctx, None, 0, None)
        else:
            chosen = [a for a in adapters if a.name == name]
            assert chosen, f"unknown adapter {name}"
            n = len(chosen)
            ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * n)(*(a.ptr for a in chosen))
            scales = (ctypes.c_float * n)(*(a.scale for a in chosen))
            llama_cpp.llama_set_adapters_lora(self._ctx, ptrs, n, scales)
        self.current = name
        self.n_switches += 1
