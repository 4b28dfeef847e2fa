#!/usr/bin/env python3
"""What serving two LoRA adapters at once costs: Cria against llama.cpp's llama-server.

llama.cpp applies one adapter set per context, so every llama_decode runs one set. Cria's engine
decodes one set per step and rotates the sets (scheduler.py AdapterTurns, a turn of
engine.py ADAPTER_QUANTUM steps); llama-server batches only the slots whose set equals that of
the first busy slot (by slot id), so the others wait until those finish. This bench makes two
synthetic GGUF adapters from the bundled model (tests/lora_fixtures.py, seeds 1 and 2, strength
0.3) and runs, on each server in turn (never both at once; rounds interleaved A B A B ...),
streaming /v1/completions, greedy, ignore_eos, the same prompts (bench/loadgen.py's first 8):

  base  8 streams on the base model          one4  4 streams on adapter a (the a-half of two)
  one   8 streams on adapter a               two   4 streams on a + 4 on b, concurrently

It reports aggregate completion tok/s (medians over rounds), two/one (the cost of two sets),
two/one4, Cria/llama-server, per-set fairness (per-stream decode tok/s min/max, TTFT, the
largest gap between two tokens of a stream), Cria's /health engine counters per scenario
(adapter switches, steps, mean step time, max_adapter_wait_steps), and an engine-level check
of the switch alone (bench/lora_switch_micro.py: llama_decode timed directly, no HTTP; the same
4-sequence steps on one adapter and alternating every ADAPTER_QUANTUM steps or every step, the
sets' sequences in contiguous or interleaved slots). The warm-up checks that base, a and b give
three different greedy texts on each server (llama-server lists the adapters it loaded).

    .venv/bin/python bench/lora_switch.py [--rounds 3] [--max-tokens 64] \
        [--out bench/results/lora-switch.json]

Each request's prompt starts with a number unique to its round, scenario and stream, so that no
server reuses a cached prompt from an earlier run (both servers get the same texts).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO)]
import compare  # noqa: E402  (bench/compare.py: servers, environment, machine info)
import loadgen  # noqa: E402
from lora_switch_micro import switch_micro  # noqa: E402

SERVERS = ("cria", "llama-server")
SCENARIOS = ("base", "one", "one4", "two")
GROUP_A = (0, 3, 4, 7)  # prompts of the a-streams (370 prompt tokens; the b-streams' 355)
GROUP_B = (1, 2, 5, 6)
ADAPTER_IDS = {"a": 0, "b": 1}  # llama-server's ids: the order of the paths in --lora


log = compare.log


def plan(scenario: str) -> list[tuple[int, str | None]]:
    """(prompt index, adapter or None) of each stream of a scenario."""
    if scenario == "base":
        return [(i, None) for i in range(8)]
    if scenario == "one":
        return [(i, "a") for i in range(8)]
    if scenario == "one4":
        return [(i, "a") for i in GROUP_A]
    return sorted([(i, "a") for i in GROUP_A] + [(i, "b") for i in GROUP_B])


def body_extra(server: str, adapter: str | None) -> dict[str, Any] | None:
    if server != "llama-server":
        return None
    return {
        "lora": [
            {"id": i, "scale": 1.0 if name == adapter else 0.0} for name, i in ADAPTER_IDS.items()
        ]
    }


def stream_args(
    server: compare.Server, name: str, base_id: str, adapter: str | None, max_tokens: int
) -> argparse.Namespace:
    model = adapter if (name == "cria" and adapter) else base_id
    return compare.loadgen_args(
        server.base_url,
        model,
        "completions",
        concurrency=8,
        requests=1,
        max_tokens=max_tokens,
        extra_body=body_extra(name, adapter),
    )


async def run_streams(
    server: compare.Server,
    name: str,
    base_id: str,
    streams: list[tuple[int, str | None]],
    max_tokens: int,
    nonce: int,
) -> tuple[list[dict[str, Any]], float]:
    """All streams at once; per-stream figures and the wall time from first send to last end."""
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(600.0), limits=httpx.Limits(max_connections=16)
    ) as client:

        async def one(k: int, p: int, adapter: str | None) -> loadgen.Result:
            a = stream_args(server, name, base_id, adapter, max_tokens)
            prompt = f"{nonce + k}. {loadgen.PROMPTS[p]}"
            return await loadgen.stream_one(client, a, loadgen.Result(k, p), prompt, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(k, p, ad) for k, (p, ad) in enumerate(streams)))
        wall = time.perf_counter() - t0
    # Gaps once every stream has its first token: what the rotation costs a stream, apart
    # from the stalls while other streams' prompts are prefilled (both servers have those).
    firsts = [r.first_token for r in results if r.first_token is not None]
    all_started = max(firsts) if len(firsts) == len(results) else float("inf")
    rows = []
    for r, (_, adapter) in zip(results, streams):
        gaps = r.itls
        steady = [b - a for a, b in zip(r.chunk_times, r.chunk_times[1:]) if a >= all_started]
        rows.append(
            {
                "adapter": adapter,
                "prompt_index": r.prompt_index,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.tokens if r.error is None else None,
                "ttft_ms": loadgen._ms(r.ttft),
                "decode_tok_s": loadgen._r(r.decode_tok_s),
                "itl_p50_ms": loadgen._ms(loadgen.percentile(gaps, 50)),
                "max_gap_ms": loadgen._ms(max(gaps) if gaps else None),
                "steady_max_gap_ms": loadgen._ms(max(steady) if steady else None),
                "end_ms": loadgen._ms(r.end - t0),
                "error": r.error,
            }
        )
    return rows, wall


def summarise(rows: list[dict[str, Any]], wall: float, max_tokens: int) -> dict[str, Any]:
    ok = [r for r in rows if r["error"] is None]
    tokens = sum(r["completion_tokens"] or 0 for r in ok)
    out: dict[str, Any] = {
        "aggregate_tok_s": round(tokens / wall, 2) if wall > 0 else None,
        "wall_s": round(wall, 3),
        "errors": len(rows) - len(ok),
        "error_samples": sorted({str(r["error"]) for r in rows if r["error"]})[:3],
        "short_of_max_tokens": sum(1 for r in ok if r["completion_tokens"] != max_tokens),
        "max_gap_ms": max((r["max_gap_ms"] or 0.0 for r in ok), default=None),
        "steady_max_gap_ms": max((r["steady_max_gap_ms"] or 0.0 for r in ok), default=None),
        "ttft_ms_max": max((r["ttft_ms"] or 0.0 for r in ok), default=None),
        "groups": {},
    }
    for adapter in dict.fromkeys(r["adapter"] for r in rows):
        g = [r for r in ok if r["adapter"] == adapter]
        dec = [r["decode_tok_s"] for r in g if r["decode_tok_s"] is not None]
        out["groups"][str(adapter or "base")] = {
            "streams": len(g),
            "decode_tok_s_min": min(dec, default=None),
            "decode_tok_s_max": max(dec, default=None),
            "ttft_ms_max": max((r["ttft_ms"] or 0.0 for r in g), default=None),
            "max_gap_ms": max((r["max_gap_ms"] or 0.0 for r in g), default=None),
            "steady_max_gap_ms": max((r["steady_max_gap_ms"] or 0.0 for r in g), default=None),
            "last_end_ms": max((r["end_ms"] or 0.0 for r in g), default=None),
        }
    return out


ENGINE_KEYS = ("n_steps", "step_seconds", "n_seq_steps", "n_adapter_switches")


def engine_stats(server: compare.Server) -> dict[str, Any] | None:
    try:
        body = httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        return None
    engine = body.get("engine")
    return engine if isinstance(engine, dict) else None


def engine_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    """Cria's engine counters over one scenario (max_adapter_wait_steps: since start-up)."""
    if not before or not after or any(k not in after for k in ENGINE_KEYS):
        return {}
    d = {k: after[k] - before[k] for k in ENGINE_KEYS}
    n = d["n_steps"]
    return {
        "n_steps": n,
        "n_adapter_switches": d["n_adapter_switches"],
        "mean_step_ms": round(1e3 * d["step_seconds"] / n, 3) if n else None,
        "seqs_per_step": round(d["n_seq_steps"] / n, 2) if n else None,
        "max_adapter_wait_steps": after.get("max_adapter_wait_steps"),
    }


def make_server(
    name: str, args: argparse.Namespace, rnd: int, adapters: dict[str, Path], llama_bin: Path | None
) -> compare.Server:
    srv = compare.make_server(name, args, rnd, llama_bin, None, args.log_dir)
    if name == "cria":
        srv.argv += ["-l", *(f"{n}={p}" for n, p in adapters.items())]
    else:
        # One --lora with the paths comma-separated: given twice, only the last one counts.
        srv.argv += ["--lora", ",".join(str(p) for p in adapters.values())]
        srv.argv += ["--lora-init-without-apply", "-cb"]
    return srv


def check_adapters(
    srv: compare.Server, name: str, base_id: str, adapters: dict[str, Path]
) -> dict[str, str]:
    """Warm-up, one request at a time (first-use costs out of the way), that also checks that
    each model id really runs its own weights: greedy texts of base, a and b must all differ."""
    if name == "llama-server":
        listed = httpx.get(f"http://127.0.0.1:{srv.port}/lora-adapters", timeout=10).json()
        paths = [Path(x["path"]).name for x in sorted(listed, key=lambda x: x["id"])]
        if paths != [p.name for p in adapters.values()]:
            raise RuntimeError(f"llama-server loaded adapters {paths}, not {list(adapters)}")
    texts: dict[str, str] = {}
    for adapter in (None, "a", "b"):
        a = stream_args(srv, name, base_id, adapter, 16)
        body = {
            "model": a.model, "prompt": loadgen.PROMPTS[0], "max_tokens": 16,
            "temperature": 0, **(a.extra_body or {}),
        }  # fmt: skip
        r = httpx.post(srv.base_url + "/completions", json=body, timeout=300)
        if r.status_code != 200:
            raise RuntimeError(
                f"warm-up ({adapter or 'base'}): HTTP {r.status_code} {r.text[:200]}"
            )
        texts[adapter or "base"] = r.json()["choices"][0]["text"]
    if len(set(texts.values())) != len(texts):
        raise RuntimeError(f"base/a/b outputs are not all different: {texts}")
    return texts


def bench_server(
    name: str, args: argparse.Namespace, rnd: int, adapters: dict[str, Path], llama_bin: Path | None
) -> dict[str, Any]:
    rec: dict[str, Any] = {"server": name, "round": rnd, "status": "ok", "scenarios": {}}
    srv = make_server(name, args, rnd, adapters, llama_bin)
    rec["argv"] = srv.argv
    try:
        srv.start()
        rec["startup_s"] = round(srv.wait_healthy(args.startup_timeout), 2)
        base_id = (
            (httpx.get(f"http://127.0.0.1:{srv.port}/health", timeout=10).json().get("model"))
            if name == "cria"
            else srv.model_id()
        )
        rec["warmup_texts"] = check_adapters(srv, name, base_id, adapters)
        for i, sc in enumerate(SCENARIOS):
            nonce = 1000 * rnd + 100 * i
            before = engine_stats(srv) if name == "cria" else None
            with compare.ForeignCpu(srv.proc.pid if srv.proc else None) as foreign:
                rows, wall = asyncio.run(
                    run_streams(srv, name, base_id, plan(sc), args.max_tokens, nonce)
                )
            s = summarise(rows, wall, args.max_tokens)
            s["foreign_cores"] = foreign.stop()
            if name == "cria":
                s["engine"] = engine_delta(before, engine_stats(srv))
            s["streams"] = rows
            rec["scenarios"][sc] = s
            log(
                f"  {name} round {rnd} {sc}: {s['aggregate_tok_s']} tok/s, "
                f"max gap {s['max_gap_ms']} ms, errors {s['errors']}"
            )
    except Exception as exc:
        rec.update(status="failed", error=f"{type(exc).__name__}: {exc}"[:1500])
        log(f"  {name} round {rnd} FAILED: {rec['error'][:300]}")
    finally:
        srv.stop()
    return rec


# --------------------------------------------------------------------------------------------
# Aggregation and report
# --------------------------------------------------------------------------------------------


def med(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def aggregate(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in rounds if r["status"] == "ok"]
    by = {n: [r for r in ok if r["server"] == n] for n in SERVERS}
    medians: dict[str, Any] = {}
    for n, recs in by.items():
        m: dict[str, Any] = {}
        for sc in SCENARIOS:
            ss = [r["scenarios"][sc] for r in recs if sc in r["scenarios"]]
            d: dict[str, Any] = {
                k: med([s[k] for s in ss])
                for k in (
                    "aggregate_tok_s",
                    "max_gap_ms",
                    "steady_max_gap_ms",
                    "ttft_ms_max",
                    "wall_s",
                )
            }
            d["errors"] = sum(s["errors"] for s in ss)
            d["rounds"] = [s["aggregate_tok_s"] for s in ss]
            groups = {g for s in ss for g in s["groups"]}
            d["groups"] = (
                {
                    g: {
                        k: med([s["groups"][g][k] for s in ss if g in s["groups"]])
                        for k in ss[0]["groups"].get(g, {})
                        if k != "streams"
                    }
                    for g in sorted(groups)
                }
                if ss
                else {}
            )
            if ss and "engine" in ss[0]:
                keys = ss[0]["engine"].keys()
                d["engine"] = {k: med([s["engine"].get(k) for s in ss]) for k in keys}
            m[sc] = d
        for num, den in (("two", "one"), ("two", "one4"), ("one", "base")):
            paired = [
                ratio(
                    r["scenarios"][num]["aggregate_tok_s"], r["scenarios"][den]["aggregate_tok_s"]
                )
                for r in recs
                if num in r["scenarios"] and den in r["scenarios"]
            ]
            m[f"{num}/{den}"] = {"median": med(paired), "rounds": paired}
        medians[n] = m
    vs: dict[str, Any] = {}
    for sc in SCENARIOS:
        pairs = [
            ratio(c["scenarios"][sc]["aggregate_tok_s"], ls["scenarios"][sc]["aggregate_tok_s"])
            for c in by["cria"]
            for ls in by["llama-server"]
            if c["round"] == ls["round"] and sc in c["scenarios"] and sc in ls["scenarios"]
        ]
        vs[sc] = {
            "of_medians": ratio(
                medians["cria"][sc]["aggregate_tok_s"],
                medians["llama-server"][sc]["aggregate_tok_s"],
            ),
            "paired_median": med(pairs),
            "paired_rounds": pairs,
        }
    busy = [s.get("foreign_cores") for r in ok for s in r["scenarios"].values()]
    busy = [b for b in busy if b is not None]
    return {
        "medians": medians,
        "cria/llama-server": vs,
        "foreign_cores_max": max(busy, default=None),
        "foreign_cores_median": med(busy),
    }


def f(x: Any, nd: int = 1) -> str:
    return "-" if x is None else (f"{x:.{nd}f}" if isinstance(x, float) else str(x))


def render(
    agg: dict[str, Any],
    args: argparse.Namespace,
    micro: dict[str, Any] | None,
    rounds: list[dict[str, Any]],
) -> str:
    m, vs = agg["medians"], agg["cria/llama-server"]
    out = [
        f"Aggregate completion tok/s, median of {args.rounds} round(s), max_tokens "
        f"{args.max_tokens}, --parallel 8, 2 threads (paired Cria/llama-server in brackets)",
        f"{'scenario':<26}{'cria':>9}{'llama-srv':>11}{'cria/ls':>16}",
    ]
    labels = {
        "base": "base (8 streams)",
        "one": "one adapter (8 on a)",
        "one4": "one adapter (4 on a)",
        "two": "two adapters (4 a + 4 b)",
    }
    for sc in SCENARIOS:
        c, ls = m["cria"][sc]["aggregate_tok_s"], m["llama-server"][sc]["aggregate_tok_s"]
        v = vs[sc]
        out.append(
            f"{labels[sc]:<26}{f(c):>9}{f(ls):>11}"
            f"{f(v['of_medians'], 2) + ' (' + f(v['paired_median'], 2) + ')':>16}"
        )
    for key in ("two/one", "two/one4", "one/base"):
        out.append(
            f"{'ratio ' + key:<26}{f(m['cria'][key]['median'], 2):>9}"
            f"{f(m['llama-server'][key]['median'], 2):>11}"
        )
    out.append("")
    out.append(
        "two adapters, per set (medians): decode tok/s per stream min-max | TTFT max | "
        "largest gap between two tokens (all; once all streams started) | last stream done"
    )
    for n in SERVERS:
        for g, d in m[n]["two"]["groups"].items():
            out.append(
                f"  {n:<13}{g}: {f(d['decode_tok_s_min'])}-{f(d['decode_tok_s_max'])} tok/s"
                f" | {f(d['ttft_ms_max'], 0)} ms | {f(d['max_gap_ms'], 0)}; "
                f"{f(d['steady_max_gap_ms'], 0)} ms"
                f" | {f(d['last_end_ms'], 0)} ms"
            )
    out.append("")
    out.append(
        "Cria engine per scenario (medians): steps, adapter switches, mean step ms, "
        "sequences/step; max_adapter_wait_steps"
    )
    for sc in SCENARIOS:
        e = m["cria"][sc].get("engine") or {}
        out.append(
            f"  {sc:<5} {f(e.get('n_steps'), 0)} steps, {f(e.get('n_adapter_switches'), 0)}"
            f" switches, {f(e.get('mean_step_ms'), 2)} ms/step, "
            f"{f(e.get('seqs_per_step'), 2)} seq/step; max wait "
            f"{f(e.get('max_adapter_wait_steps'), 0)} steps"
        )
    out.append(
        f"other processes kept {f(agg['foreign_cores_median'], 2)} cores busy during a "
        f"scenario (median; max {f(agg['foreign_cores_max'], 2)})"
    )
    failed = [
        f"{r['server']} round {r['round']}: {r['error']}" for r in rounds if r["status"] != "ok"
    ]
    out.extend("FAILED " + x for x in failed)
    if micro and micro.get("status") == "ok":
        out.append("")
        out.append(
            f"Engine-level switch check (llama_decode only, {micro['steps']} steps x "
            f"{micro['reps']} reps; ms/step median and least disturbed rep):"
        )
        for mode, d in micro["modes"].items():
            out.append(
                f"  {mode:<40}{f(d['ms_per_step'], 2):>8}{f(d['min_rep'], 2):>8} ms/step"
                f"{'':>4}{d['switches_per_rep']} switches/rep"
            )
        for k, v in micro["derived"].items():
            out.append(f"  {k}: {f(v, 3)}")
    elif micro:
        out.append(f"\nEngine-level switch check FAILED: {micro.get('error')}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", default=str(BENCH / "results" / "lora-switch.json"))
    p.add_argument("--logs", default=str(BENCH / "out" / "lora-switch-logs"))
    p.add_argument("--llama-bin", default=None, help="folder with llama-server (see compare.py)")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--micro-steps", type=int, default=32, help="0: skip the engine check")
    p.add_argument("--micro-reps", type=int, default=5)
    a = p.parse_args(argv)
    # What compare.make_server reads.
    a.threads, a.parallel, a.model, a.log_dir = 2, 8, compare.default_model(), Path(a.logs)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    notes: list[str] = []
    llama_bin = compare.find_llama_bin(args, notes)
    if llama_bin is None:
        raise SystemExit("llama-server not available: " + "; ".join(notes))
    info = compare.machine_info(args, llama_bin, None)
    t_start = time.perf_counter()
    rounds: list[dict[str, Any]] = []
    micro: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="lora-switch-") as tmp:
        from tests.lora_fixtures import make_gguf_adapter

        base = Path(args.model)
        adapters = {
            n: make_gguf_adapter(base, Path(tmp) / f"{n}.gguf", seed=s, strength=0.3)
            for n, s in (("a", 1), ("b", 2))
        }
        log(f"adapters {', '.join(str(p) for p in adapters.values())}; model {base}")
        try:
            for rnd in range(1, args.rounds + 1):
                for name in SERVERS:
                    rounds.append(bench_server(name, args, rnd, adapters, llama_bin))
            micro = (
                switch_micro(base, adapters, args.micro_steps, args.micro_reps)
                if args.micro_steps
                else None
            )
        finally:
            compare.stop_all()
    agg = aggregate(rounds)
    table = render(agg, args, micro, rounds)
    result = {
        "config": {k: str(v) for k, v in vars(args).items()},
        "machine": info,
        "adapters": "tests.lora_fixtures.make_gguf_adapter(base, out, seed=1|2, strength=0.3)",
        "plans": {sc: plan(sc) for sc in SCENARIOS},
        "elapsed_s": round(time.perf_counter() - t_start, 1),
        **agg,
        "engine_switch_check": micro,
        "rounds": rounds,
        "table": table,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compare.write_json(out, result)
    print()
    print(table)
    print(f"\nwrote {out} ({result['elapsed_s']:.0f} s)")
    return 0 if all(r["status"] == "ok" for r in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
