#!/usr/bin/env python3
"""Per-token cost of grammar-constrained sampling, in process (no server), on the bundled
model's vocabulary (49,152 tokens).

1. `engines`: on the same schemas and the same token sequences (outputs that validated, from
   a bench/schema_validity.py run, re-tokenized; plus this folder's structured_speed schema),
   per token: llama.cpp's grammar sampler on Cria's GBNF - checking one token (what Cria does
   first), masking the whole vocabulary (what it does when the drawn token is refused) and
   accepting the token - against llguidance 1.9.1 (its own JSON-schema compiler, defaults)
   computing the full token mask and consuming the token. Also each one's compile time.
2. `sampler`: the real model decoding one sequence with the structured_speed prompt and schema:
   time per token of Cria's samplers (plain greedy argmax, ConstrainedSampler greedy and at
   temperature 1) beside llama_decode's, how often the drawn token is refused (the slow path),
   and a llguidance-masked sampler sketch (mask, apply it to the logits with numpy, draw) for
   what adopting it would cost per token.

    .venv/bin/python bench/structured_cost.py [--validity bench/results/schema-validity.json] \
        [--schemas 60] [--tokens 300] [--full-every 1] [--out bench/results/structured-cost.json]

Run it under `taskset -c N` with N cores alone; --threads defaults to the affinity.
Dependencies: llguidance==1.9.1 (the `bench` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

import llguidance  # noqa: E402
import llguidance.llamacpp  # noqa: E402
import llguidance.numpy as llg_np  # noqa: E402

from cria.engine._bindings import llama_cpp  # noqa: E402
from cria.engine.constrained import (  # noqa: E402
    ConstrainedSampler,
    _Candidates,
    _grammar_sampler,
)
from cria.engine.llama import Batch, LlamaContext, LlamaModel  # noqa: E402
from cria.engine.sampling import SamplerStep  # noqa: E402
from cria.grammar import json_schema_grammar  # noqa: E402

perf = time.perf_counter


def stats_us(xs: list[float]) -> dict[str, Any]:
    if not xs:
        return {"n": 0}
    a = np.array(xs) * 1e6
    return {
        "n": len(xs),
        "mean_us": round(float(a.mean()), 1),
        "p50_us": round(float(np.percentile(a, 50)), 1),
        "p99_us": round(float(np.percentile(a, 99)), 1),
        "max_us": round(float(a.max()), 1),
    }


def model_path() -> str:
    from cria.models.spec import bundled_model_path

    return str(bundled_model_path())


# ------------------------------------------------------------------------------------------
# 1. llama.cpp's grammar sampler vs llguidance on the same token sequences
# ------------------------------------------------------------------------------------------


def llama_cpp_replay(
    model: LlamaModel, gbnf: str, tokens: list[int], full_every: int
) -> dict[str, Any]:
    t0 = perf()
    grammar = _grammar_sampler(model.vocab, gbnf)
    compile_s = perf() - t0
    one, every = _Candidates(1), _Candidates(model.n_vocab)
    zeros = np.zeros(model.n_vocab, dtype=np.float32)
    check, full, accept, allowed = [], [], [], []
    refused_at = None
    try:
        for i, tok in enumerate(tokens):
            if i % full_every == 0:
                every.fill(zeros)
                t0 = perf()
                llama_cpp.llama_sampler_apply(grammar, every.ref)
                full.append(perf() - t0)
                allowed.append(int(np.isfinite(every.data["logit"]).sum()))
            one.one(tok)
            t0 = perf()
            llama_cpp.llama_sampler_apply(grammar, one.ref)
            check.append(perf() - t0)
            if not np.isfinite(one.data["logit"][0]):
                refused_at = i
                break
            t0 = perf()
            llama_cpp.llama_sampler_accept(grammar, tok)
            accept.append(perf() - t0)
    finally:
        llama_cpp.llama_sampler_free(grammar)
    return {"compile_s": compile_s, "check": check, "full": full, "accept": accept,
            "allowed": allowed, "refused_at": refused_at}


def llg_replay(tokenizer: Any, schema: Any, tokens: list[int], n_vocab: int) -> dict[str, Any]:
    t0 = perf()
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"[:200]}
    compile_s = perf() - t0
    if matcher.is_error():
        return {"error": matcher.get_error()[:200]}
    mask = llg_np.allocate_token_bitmask(1, n_vocab)
    masks, consume, allowed = [], [], []
    refused_at = None
    for i, tok in enumerate(tokens):
        t0 = perf()
        llg_np.fill_next_token_bitmask(matcher, mask)
        masks.append(perf() - t0)
        if not (int(mask[0, tok >> 5]) >> (tok & 31)) & 1:
            refused_at = i
            break
        allowed.append(int(np.unpackbits(mask.view(np.uint8), bitorder="little")[:n_vocab].sum()))
        t0 = perf()
        ok = matcher.consume_token(tok)
        consume.append(perf() - t0)
        if not ok:
            refused_at = i
            break
    return {"compile_s": compile_s, "mask": masks, "consume": consume, "allowed": allowed,
            "refused_at": refused_at, "error": matcher.get_error() if matcher.is_error() else None}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def engines(args: argparse.Namespace, model: LlamaModel, cases: list[dict[str, Any]]) -> dict[str, Any]:
    t0 = perf()
    tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(model.vocab)
    tok_s = perf() - t0
    eos = int(llama_cpp.llama_vocab_eos(model.vocab))
    agg: dict[str, list[float]] = {k: [] for k in (
        "lcpp_check", "lcpp_full", "lcpp_accept", "llg_mask", "llg_consume",
        "lcpp_compile", "llg_compile", "ours_gbnf_compile")}
    per_case = []
    for case in cases:
        t0 = perf()
        gbnf = json_schema_grammar(case["schema"])
        agg["ours_gbnf_compile"].append(perf() - t0)
        tokens = model.tokenize(case["text"], add_special=False, parse_special=False)[: args.tokens]
        complete = len(tokens) < args.tokens and _parses(case["text"])
        if complete:
            tokens.append(eos)  # the end is a token both must allow
        a = llama_cpp_replay(model, gbnf, tokens, args.full_every)
        b = llg_replay(tokenizer, case["schema"], tokens, model.n_vocab)
        agg["lcpp_check"] += a["check"]
        agg["lcpp_full"] += a["full"]
        agg["lcpp_accept"] += a["accept"]
        agg["lcpp_compile"].append(a["compile_s"])
        if "mask" in b:
            agg["llg_mask"] += b["mask"]
            agg["llg_consume"] += b["consume"]
            agg["llg_compile"].append(b["compile_s"])
        row = {
            "id": case["id"], "tokens": len(tokens), "complete": complete,
            "lcpp_refused_at": a["refused_at"], "llg_refused_at": b.get("refused_at"),
            "llg_error": b.get("error"),
            "lcpp_full_mean_us": stats_us(a["full"]).get("mean_us"),
            "llg_mask_mean_us": stats_us(b.get("mask", [])).get("mean_us"),
            "lcpp_allowed_mean": round(statistics.fmean(a["allowed"]), 1) if a["allowed"] else None,
            "llg_allowed_mean": round(statistics.fmean(b["allowed"]), 1) if b.get("allowed") else None,
        }
        per_case.append(row)
        print(f"  {case['id']}: {len(tokens)} tokens, llama.cpp full mask {row['lcpp_full_mean_us']} us"
              f" (refused at {a['refused_at']}), llguidance mask {row['llg_mask_mean_us']} us"
              f" (refused at {b.get('refused_at')}, error {b.get('error')})", flush=True)
    summary = {k: stats_us(v) for k, v in agg.items()}
    lc, lf, la = (summary[k].get("mean_us") for k in ("lcpp_check", "lcpp_full", "lcpp_accept"))
    lm, lcon = summary["llg_mask"].get("mean_us"), summary["llg_consume"].get("mean_us")
    if lc and lf and la and lm and lcon:
        summary["ratios"] = {
            "lcpp_full_mask / llg_mask": round(lf / lm, 1),
            "lcpp_check+accept / llg_mask+consume": round((lc + la) / (lm + lcon), 2),
            "lcpp_full+accept / llg_mask+consume": round((lf + la) / (lm + lcon), 1),
        }
    summary["llg_tokenizer_build_s"] = round(tok_s, 3)
    return {"summary": summary, "cases": per_case}


# ------------------------------------------------------------------------------------------
# 2. The real model: Cria's samplers per token, and a llguidance-masked sketch
# ------------------------------------------------------------------------------------------


def chatml(system: str, user: str) -> str:  # the bundled model's template
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


class LlgSampler:
    """Sketch: llguidance's mask applied to the logits with numpy, then llama.cpp's chain."""

    def __init__(self, recipe: tuple[SamplerStep, ...], model: LlamaModel, tokenizer: Any, schema: Any) -> None:
        from cria.engine.llama import SamplerChain

        self.chain = SamplerChain(recipe, model=model)
        self.matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema))
        self.mask = llg_np.allocate_token_bitmask(1, model.n_vocab)
        self.cand = _Candidates(model.n_vocab)
        self.n = model.n_vocab
        self.mask_s: list[float] = []

    def sample(self, ctx: LlamaContext, row: int) -> int:
        t0 = perf()
        llg_np.fill_next_token_bitmask(self.matcher, self.mask)
        self.mask_s.append(perf() - t0)
        logits = llama_cpp.llama_get_logits_ith(ctx.ptr, row - ctx.n_outputs)
        values = np.ctypeslib.as_array(logits, shape=(self.n,))
        bits = np.unpackbits(self.mask.view(np.uint8), bitorder="little")[: self.n]
        self.cand.fill(values)
        self.cand.data["logit"][bits == 0] = -np.inf
        llama_cpp.llama_sampler_apply(self.chain.ptr, self.cand.ref)
        token = self.cand.selected
        llama_cpp.llama_sampler_accept(self.chain.ptr, token)
        self.matcher.consume_token(token)
        return token


def generate(model: LlamaModel, ctx: LlamaContext, prompt: list[int], sampler: Any, n: int) -> dict[str, Any]:
    batch = Batch(max(512, len(prompt)))
    ctx.seq_rm(0, 0)
    batch.add_run(prompt, 0, 0, logits="last")
    ctx.decode(batch)
    out, sample_s, decode_s = [], [], []
    row = 0
    for i in range(n):
        t0 = perf()
        if sampler is None:
            token = int(ctx.logits(batch.n_outputs, model.n_vocab)[row].argmax())
        else:
            token = sampler.sample(ctx, row)
        sample_s.append(perf() - t0)
        out.append(token)
        if model.is_eog(token):
            break
        batch.clear()
        row = batch.add_decodes([token], [len(prompt) + i], [0])
        t0 = perf()
        ctx.decode(batch)
        decode_s.append(perf() - t0)
    return {"tokens": out, "sample": sample_s, "decode": decode_s}


def sampler_bench(args: argparse.Namespace, model: LlamaModel) -> tuple[dict[str, Any], str]:
    import structured_speed as ss

    threads = args.threads or len(os.sched_getaffinity(0))
    ctx = LlamaContext(model, n_ctx_per_seq=2048, n_seq=1, n_batch=512, n_threads=threads)
    prompt = model.tokenize(chatml("You answer with JSON only.", ss.PROMPTS[0]), add_special=False,
                            parse_special=True)
    gbnf = json_schema_grammar(ss.SCHEMA)
    tokenizer = llguidance.llamacpp.lltokenizer_from_vocab(model.vocab)
    greedy = (SamplerStep("greedy"),)
    temp1 = (SamplerStep("temp", (1.0,)), SamplerStep("dist", (1234,)))
    variants: list[tuple[str, Any]] = [
        ("plain greedy (numpy argmax)", lambda: None),
        ("plain temperature 1 (llama.cpp chain)", lambda: __import__(
            "cria.engine.llama", fromlist=["SamplerChain"]).SamplerChain(temp1, model=model)),
        ("grammar greedy (ConstrainedSampler)", lambda: ConstrainedSampler(
            greedy, model=model, grammar=gbnf, trigger=None)),
        ("grammar temperature 1 (ConstrainedSampler)", lambda: ConstrainedSampler(
            temp1, model=model, grammar=gbnf, trigger=None)),
        ("llguidance greedy (sketch)", lambda: LlgSampler(greedy, model, tokenizer, ss.SCHEMA)),
        ("llguidance temperature 1 (sketch)", lambda: LlgSampler(temp1, model, tokenizer, ss.SCHEMA)),
    ]
    out: dict[str, Any] = {"threads": threads, "prompt_tokens": len(prompt)}
    text = ""
    for name, make in variants:
        sampler = make()
        refused = [0]
        if isinstance(sampler, ConstrainedSampler):
            allows = sampler._allows

            def counting(grammar: Any, token: int, _a: Any = allows, _r: list[int] = refused) -> bool:
                ok = _a(grammar, token)
                _r[0] += not ok
                return ok

            sampler._allows = counting  # type: ignore[method-assign]
        r = generate(model, ctx, prompt, sampler, args.gen_tokens)
        row = {"tokens": len(r["tokens"]), "sample": stats_us(r["sample"]), "decode": stats_us(r["decode"])}
        if isinstance(sampler, ConstrainedSampler):
            row["refused_first_draws"] = refused[0]
            row["refused_share"] = round(refused[0] / len(r["tokens"]), 3)
            if name.startswith("grammar greedy"):
                text = model.detokenize([t for t in r["tokens"] if not model.is_eog(t)])
        if isinstance(sampler, LlgSampler):
            row["llg_mask"] = stats_us(sampler.mask_s)
        out[name] = row
        print(f"  {name}: sample {row['sample'].get('mean_us')} us/token (p99 "
              f"{row['sample'].get('p99_us')}), decode {row['decode'].get('mean_us')} us, "
              f"refused {row.get('refused_first_draws')}", flush=True)
    ctx.close()
    return out, text


def load_cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    path = Path(args.validity)
    if not path.exists():
        print(f"no {path}: only the structured_speed schema")
        return []
    data = json.loads(path.read_text())
    from schema_validity import load_corpus

    schemas = {r["id"]: r["schema"] for rows in load_corpus().values() for r in rows}
    seen, cases = set(), []
    sample_schemas = {s["id"]: s["schema"] for s in data.get("sample", [])}
    for r in data["records"]:
        if r.get("outcome") == "stop" and r.get("valid") and r["id"] not in seen:
            schema = sample_schemas.get(r["id"]) or schemas.get(r["id"])
            if schema is None:
                continue
            seen.add(r["id"])
            cases.append({"id": r["id"], "schema": schema, "text": r["content"]})
    cases.sort(key=lambda c: c["id"])
    step = max(1, len(cases) // args.schemas) if args.schemas else 1
    return cases[::step][: args.schemas]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--validity", default=str(BENCH / "results" / "schema-validity.json"))
    p.add_argument("--schemas", type=int, default=60, help="corpus schemas to replay (0: all)")
    p.add_argument("--tokens", type=int, default=300, help="at most this many tokens per output")
    p.add_argument("--full-every", type=int, default=1, help="time llama.cpp's full mask every Nth token")
    p.add_argument("--gen-tokens", type=int, default=256, help="tokens per sampler run")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-sampler", action="store_true")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import structured_speed as ss

    args = parse_args(argv)
    model = LlamaModel(Path(model_path()), n_gpu_layers=0, use_mmap=True)
    result: dict[str, Any] = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
                              "n_vocab": model.n_vocab, "llguidance": llguidance.__version__}
    bench_text = None
    if not args.skip_sampler:
        print("sampler (real model, one sequence):")
        result["sampler"], bench_text = sampler_bench(args, model)
    cases = load_cases(args)
    if bench_text:
        cases.insert(0, {"id": "structured_speed/orders", "schema": ss.SCHEMA, "text": bench_text})
    print(f"engines ({len(cases)} schemas):")
    result["engines"] = engines(args, model, cases)
    print(json.dumps(result["engines"]["summary"], indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
