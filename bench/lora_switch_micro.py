"""The LoRA switch alone, at the engine's level: llama_decode steps timed without HTTP.

A switch (llama_set_adapters_lora) is cheap in itself but makes llama.cpp reserve its compute
graph again at the next decode. To see that cost apart from batching, the same 4-sequence decode
steps run on one adapter (no switch), alternating between two adapters every
engine.py ADAPTER_QUANTUM steps (Cria's schedule) and every step (the worst case); 8-sequence
steps on the base model and on one adapter show what the adapter and the halved batch cost.
A second pair of modes puts each set's sequences where the bench's two-adapter scenario puts
them (slots taken in arrival order, the sets interleaved): with one KV stream per sequence,
llama.cpp runs a batch of non-consecutive sequence ids as several ubatches.
The context is the server's (8 sequences of 2048 tokens, n_batch 512, 2 threads).

The machine is shared, so single runs drift: modes are interleaved over several repetitions
(order rotated), every step is timed, and the switch's own cost is read *within* a run of an
every-quantum mode, as the median step right after a switch minus the median of the other steps
of the same run (same sequences, same seconds), then the median over repetitions. Ratios
between modes use each mode's least disturbed repetition (others' bursts only add time).
Used by bench/lora_switch.py, after its servers have stopped.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadgen import PROMPTS

PROMPT_TOKENS = 48  # each sequence's prompt, prefilled once
A_SEQS, B_SEQS = (0, 1, 2, 3), (4, 5, 6, 7)
# Where the two sets' sequences sit when 8 requests, a b b a a b b a, take slots as they come
# (bench/lora_switch.py's two-adapter scenario): llama.cpp splits a batch into ubatches of
# consecutive sequence ids (one KV stream per sequence), so {0, 3, 4, 7} is 3 graph runs.
A_MIXED, B_MIXED = (0, 3, 4, 7), (1, 2, 5, 6)
Plan = Callable[[int], tuple[str | None, tuple[int, ...]]]


def _alternate(a: tuple[int, ...], b: tuple[int, ...], every: int) -> Plan:
    return lambda i: ("a", a) if (i // every) % 2 == 0 else ("b", b)


def _modes(q: int) -> dict[str, tuple[str, Plan]]:
    """key -> (label, step index -> the adapter and the sequences that step decodes)."""
    return {
        "base8": ("base, 8 seqs/step", lambda i: (None, A_SEQS + B_SEQS)),
        "a8": ("a, 8 seqs/step", lambda i: ("a", A_SEQS + B_SEQS)),
        "a4": ("a, 4 seqs/step (0-3, no switch)", lambda i: ("a", A_SEQS)),
        "alt_q": (f"a/b every {q} steps (0-3 / 4-7)", _alternate(A_SEQS, B_SEQS, q)),
        "alt_1": ("a/b every step (0-3 / 4-7)", _alternate(A_SEQS, B_SEQS, 1)),
        "a4_mixed": ("a, 4 seqs/step (0,3,4,7, no switch)", lambda i: ("a", A_MIXED)),
        "alt_q_mixed": (
            f"a/b every {q} steps (0,3,4,7 / 1,2,5,6)",
            _alternate(A_MIXED, B_MIXED, q),
        ),
    }


def _med(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def switch_micro(
    base: Path, adapters: dict[str, Path], steps: int, reps: int = 5
) -> dict[str, Any]:
    """ms per decode step of each mode and the cost of one switch (see the module's doc)."""
    from cria.engine.batch import Batch
    from cria.engine.engine import ADAPTER_QUANTUM
    from cria.engine.llama import DecodeResult, LlamaContext, LlamaModel
    from cria.engine.types import AdapterFile

    files = [AdapterFile(n, p, 1.0) for n, p in adapters.items()]
    model = LlamaModel(base, n_gpu_layers=0, use_mmap=True, adapters=files)
    ctx = LlamaContext(model, n_ctx_per_seq=2048, n_seq=8, n_batch=512, n_threads=2)
    batch = Batch(512)
    modes = _modes(ADAPTER_QUANTUM)
    names = list(modes)
    per_rep: dict[str, list[float]] = {m: [] for m in modes}  # mean ms/step of each rep
    switch_cost: dict[str, list[float]] = {"alt_q": [], "alt_q_mixed": []}  # within each run
    switches: dict[str, int] = {}
    prompts: dict[int, list[int]] = {}

    def run(mode: str, n: int) -> tuple[list[float], list[bool]]:
        """Per-step ms, and whether each step came right after a switch."""
        plan = modes[mode][1]
        pos = {s: len(prompts[s]) for s in prompts}
        for s in prompts:
            ctx.seq_rm(s, pos[s], -1)
        ctx.use_adapter(plan(0)[0])  # a mode starts on its own set: that switch is not timed
        ms, switched = [], []
        for i in range(n):
            adapter, seqs = plan(i)
            batch.clear()
            batch.add_decodes([prompts[s][-1] for s in seqs], [pos[s] for s in seqs], seqs)
            n0 = ctx.n_adapter_switches
            t0 = time.perf_counter()
            ctx.use_adapter(adapter)
            if ctx.decode(batch) is not DecodeResult.OK:
                raise RuntimeError(f"decode failed in {mode}")
            ms.append(1e3 * (time.perf_counter() - t0))
            switched.append(ctx.n_adapter_switches != n0)
            for s in seqs:
                pos[s] += 1
        return ms, switched

    try:
        for s in A_SEQS + B_SEQS:
            toks = model.tokenize(PROMPTS[s], add_special=True, parse_special=False)
            prompts[s] = toks[:PROMPT_TOKENS]
            ctx.use_adapter("a" if s in A_MIXED else "b")
            batch.clear()
            batch.add_run(prompts[s], 0, s, logits="last")
            if ctx.decode(batch) is not DecodeResult.OK:
                raise RuntimeError("prefill failed")
        for mode in modes:  # warm-up: every shape and set decoded once
            run(mode, 2 * ADAPTER_QUANTUM)
        for rep in range(reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]  # rotate the order
            for mode in order:
                ms, switched = run(mode, steps)
                per_rep[mode].append(statistics.fmean(ms))
                switches[mode] = sum(switched)
                if mode in switch_cost:
                    after = [t for t, sw in zip(ms, switched) if sw]
                    other = [t for t, sw in zip(ms, switched) if not sw]
                    if after and other:
                        switch_cost[mode].append(
                            statistics.median(after) - statistics.median(other)
                        )
    except Exception as exc:
        return {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        ctx.close()
        model.close()
    ms_step = {m: statistics.median(v) for m, v in per_rep.items()}
    # Across runs, the least disturbed repetition of each mode (min): other people's bursts
    # on this machine only ever add time.
    lo = {m: min(v) for m, v in per_rep.items()}
    q = ADAPTER_QUANTUM
    cost_q, cost_mixed = _med(switch_cost["alt_q"]), _med(switch_cost["alt_q_mixed"])
    n_1 = switches["alt_1"]
    return {
        "status": "ok",
        "steps": steps,
        "reps": reps,
        "quantum": q,
        "prompt_tokens": PROMPT_TOKENS,
        "modes": {
            label: {
                "key": m,
                "ms_per_step": round(ms_step[m], 3),
                "min_rep": round(lo[m], 3),
                "reps": [round(x, 3) for x in per_rep[m]],
                "switches_per_rep": switches[m],
            }
            for m, (label, _) in modes.items()
        },
        "switch_cost_ms_per_rep": {m: [round(x, 3) for x in v] for m, v in switch_cost.items()},
        "derived": {
            f"ms per switch (within every-{q} runs, 0-3 / 4-7)": cost_q,
            f"ms per switch (within every-{q} runs, mixed slots)": cost_mixed,
            "ms per switch (every-step vs no-switch runs, min reps)": (
                round((lo["alt_1"] - lo["a4"]) * steps / n_1, 3) if n_1 else None
            ),
            f"switching every {q} steps adds (cost / {q} / a-4 step)": (
                round(cost_q / q / lo["a4"], 4) if cost_q is not None else None
            ),
            "a 4-seq step on slots 0,3,4,7 / on 0-3 (ubatch split)": round(
                lo["a4_mixed"] / lo["a4"], 4
            ),
            "adapter a / base step, 8 seqs (LoRA compute)": round(lo["a8"] / lo["base8"], 4),
            "tok/s of 4-seq / 8-seq steps on a (the halved batch)": round(
                4 * lo["a8"] / (8 * lo["a4"]), 4
            ),
            "predicted two/one tok/s: 4 a8 / (8 alt_q_mixed)": round(
                4 * lo["a8"] / (8 * lo["alt_q_mixed"]), 4
            ),
        },
    }
