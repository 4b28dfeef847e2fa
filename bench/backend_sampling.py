"""Greedy sampling on the host (logits copied out, one numpy argmax) against llama.cpp's backend
sampling (a greedy sampler chain per sequence inside the graph, `llama_set_sampler`; no logits
copied), on the same decode steps of N sequences. Prints one JSON line per mode.

On the CPU (2 cores, tiny synthetic model, 64 sequences) backend sampling made the decode twice
as slow: llama.cpp adds a sampling subgraph per sequence. Whether the saved logits copy pays for
that on a GPU is what this measures there (bench/gpu_check.sh runs it).

    python bench/backend_sampling.py --model tiny.gguf --seqs 64 [--gpu-layers 99]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from cria.engine import llama as L
from cria.engine._bindings import llama_cpp


def run(model: L.LlamaModel, mode: str, n_seqs: int, n_steps: int, threads: int) -> dict[str, object]:
    n_batch = max(512, n_seqs * 16)
    ctx = L.LlamaContext(model, n_ctx_per_seq=512, n_seq=n_seqs, n_batch=n_batch, n_threads=threads)
    chains = []
    if mode == "backend":
        for seq in range(n_seqs):
            chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            if not llama_cpp.llama_set_sampler(ctx.ptr, seq, chain):
                raise SystemExit("llama_set_sampler refused the greedy chain")
            chains.append(chain)
    batch = L.Batch(n_batch)
    rng = np.random.default_rng(1)
    for seq in range(n_seqs):
        batch.add_run(rng.integers(100, 1000, 16).tolist(), 0, seq, logits="last")

    def decode() -> None:
        if ctx.decode(batch) is not L.DecodeResult.OK:
            raise SystemExit("llama_decode failed")

    def sample(n: int) -> list[int]:
        if mode == "backend":
            get, c = llama_cpp.llama_get_sampled_token_ith, ctx.ptr
            return [int(get(c, i - n)) for i in range(n)]  # i counts outputs from the end
        return ctx.logits(n, model.n_vocab).argmax(axis=1).tolist()

    decode()
    tokens = sample(n_seqs)
    decode_s, sample_s = [], []
    for step in range(n_steps):
        batch.clear()
        batch.add_decodes(tokens, [16 + step] * n_seqs, list(range(n_seqs)))
        t0 = time.perf_counter()
        decode()
        t1 = time.perf_counter()
        tokens = sample(n_seqs)
        t2 = time.perf_counter()
        if step >= 10:  # the first steps after attaching samplers re-reserve the graph
            decode_s.append(t1 - t0)
            sample_s.append(t2 - t1)
    ctx.close()
    for chain in chains:
        llama_cpp.llama_sampler_free(chain)
    d, s = 1e3 * float(np.mean(decode_s)), 1e3 * float(np.mean(sample_s))
    return {
        "mode": mode,
        "seqs": n_seqs,
        "decode_ms": round(d, 3),
        "sample_ms": round(s, 3),
        "step_ms": round(d + s, 3),
        "tok_s": round(n_seqs * 1e3 / (d + s), 1),
        "last_tokens": tokens[:4],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=110)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2, help="host, backend, host, backend, ...")
    args = ap.parse_args()
    model = L.LlamaModel(args.model, n_gpu_layers=args.gpu_layers, use_mmap=True)
    results = []
    for _ in range(args.rounds):
        for mode in ("host", "backend"):
            r = run(model, mode, args.seqs, args.steps, args.threads)
            results.append(r)
            print(json.dumps(r), flush=True)
    host = [r for r in results if r["mode"] == "host"]
    backend = [r for r in results if r["mode"] == "backend"]
    same = all(h["last_tokens"] == b["last_tokens"] for h, b in zip(host, backend))
    ratio = float(np.median([b["step_ms"] for b in backend])) / float(np.median([h["step_ms"] for h in host]))
    print(json.dumps({"backend_over_host_step": round(ratio, 3), "same_tokens": same}))
    model.close()


if __name__ == "__main__":
    main()
