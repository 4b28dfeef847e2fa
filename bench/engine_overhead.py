"""Python overhead of the engine step, without HTTP: N concurrent streams on any GGUF.

With a tiny model (llama_decode of the whole batch takes milliseconds, as a big model's does on
a GPU) this shows what the engine's own Python work costs per running sequence per step.

    python bench/engine_overhead.py --model tiny.gguf --streams 64 --max-tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from cria.cli import GIL_SWITCH_INTERVAL_S
from cria.engine.base import EngineConfig
from cria.engine.engine import Engine
from cria.engine.llama import LlamaModel
from cria.engine.types import GenerationRequest, SamplingParams


async def run(engine: Engine, n_streams: int, max_tokens: int, temperature: float) -> float:
    async def one(i: int) -> int:
        prompt = tuple(engine.tokenize(f"Stream {i}: a few words to start from"))
        stream = engine.submit(
            GenerationRequest(
                id=f"s{i}-{time.monotonic_ns()}",
                prompt=prompt,
                max_tokens=max_tokens,
                sampling=SamplingParams(temperature=temperature, seed=i),
                ignore_eos=True,
            )
        )
        n = 0
        async for delta in stream:
            n += delta.n_tokens
        return n

    started = time.perf_counter()
    counts = await asyncio.gather(*(one(i) for i in range(n_streams)))
    wall = time.perf_counter() - started
    return sum(counts) / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--overlap", action="store_true", help="overlap each step's text work with the next decode")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # as `cria` sets it
    engine = Engine(
        lambda: LlamaModel(args.model, n_gpu_layers=args.gpu_layers, use_mmap=True),
        EngineConfig(n_ctx_per_seq=512, n_slots=args.streams, n_batch=max(512, args.streams),
                     n_threads=args.threads, max_queue=4 * args.streams, overlap_text=args.overlap),
    )
    engine.start()
    engine.wait_ready()
    asyncio.run(run(engine, min(4, args.streams), 16, args.temperature))  # warm-up
    before = engine._timing.n_steps, engine._timing.busy_s
    tok_s = asyncio.run(run(engine, args.streams, args.max_tokens, args.temperature))
    stats = engine.stats()
    engine.stop()
    t = engine._timing
    result = {
        "streams": args.streams,
        "overlap": args.overlap,
        "tokens_per_s": round(tok_s, 1),
        "step_ms": round(1e3 * (t.busy_s - before[1]) / max(t.n_steps - before[0], 1), 3),
        "decode_ms_per_step": round(1e3 * t.decode_s / max(t.n_steps, 1), 3),
        "sample_ms_per_step": round(1e3 * t.sample_s / max(t.n_steps, 1), 3),
        **{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(stats).items()},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
