#!/usr/bin/env python3
"""What grammar-constrained decoding costs: streamed `json_schema` chats against unconstrained
ones on the same prompts, one Cria server, interleaved rounds.

Every request asks for the same JSON document (orders of a shop) and generates exactly
--max-tokens tokens: the unconstrained ones with `ignore_eos`, the constrained ones because
the schema's `orders` needs at least 24 entries (hundreds of tokens), so the grammar never lets
them end early (a grammar at its end would force the end-of-generation token, and shorter
outputs would change the batch occupancy being compared). Both are greedy (--temperature 0,
as bench/loadgen.py) unless told otherwise. Within each round the two modes run back to back
(order alternating between rounds) at each concurrency; the ratios constrained / plain are
paired within rounds, the median over rounds is reported. A warm-up runs every prompt once in
each mode first, so both find their prompt in the prefix cache.

Also from /health around each run: the engine's step time per sequence-step, split into
"decode + sampling" and its Python share (the grammar's cost is in sampling).

    .venv/bin/python bench/structured_speed.py [--rounds 3] [--concurrency 1,8] \
        [--max-tokens 256] [--temperature 0] [--out bench/results/structured-speed.json]

Dependencies: httpx (bench/requirements.txt); it reuses bench/loadgen.py (streaming and
statistics) and bench/compare.py (server start-up, CPU-contention check).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import compare  # noqa: E402
import loadgen  # noqa: E402

ITEM = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "maxLength": 16},
        "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
        "price": {"type": "number"},
    },
    "required": ["sku", "quantity", "price"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "maxLength": 60},
            },
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "items": {"type": "array", "items": ITEM, "minItems": 1, "maxItems": 5},
        "gift": {"type": "boolean"},
    },
    "required": ["id", "customer", "status", "items", "gift"],
    "additionalProperties": False,
}
# A realistic schema (nested object, arrays, enum, bounds); minItems keeps every constrained
# output longer than max_tokens, so both modes generate the same number of tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "shop": {"type": "string", "maxLength": 40},
        "date": {"type": "string", "format": "date"},
        "orders": {"type": "array", "items": ORDER, "minItems": 24, "maxItems": 40},
    },
    "required": ["shop", "date", "orders"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "orders", "schema": SCHEMA}}

SHOPS = [
    "a bookshop",
    "a bakery",
    "a hardware store",
    "a flower shop",
    "a bicycle shop",
    "a tea merchant",
    "a toy store",
    "a music shop",
]
PROMPTS = [
    f"Write today's orders of {shop} as JSON and nothing else, in this form: "
    '{"shop": "...", "date": "YYYY-MM-DD", "orders": [{"id": 1, "customer": {"name": "...", '
    '"email": "..."}, "status": "pending|paid|shipped|delivered|cancelled", "items": [{"sku": '
    '"...", "quantity": 1, "price": 9.99}], "gift": false}, ...]}. List at least 24 orders.'
    for shop in SHOPS
]
MODES = ("plain", "schema")


def body_for(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fields added to loadgen's chat body (which sends ignore_eos and temperature 0)."""
    extra: dict[str, Any] = {"temperature": args.temperature}
    if args.temperature > 0:
        extra["seed"] = 1234
    if mode == "schema":
        extra["ignore_eos"] = False  # refused with a grammar, which ends the output itself
        extra["response_format"] = RESPONSE_FORMAT
    return extra


async def run_mode(
    base_url: str, model: str, mode: str, c: int, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    """loadgen's streaming load, on this script's prompts, with the mode's fields."""
    la = compare.loadgen_args(
        base_url, model, "chat", concurrency=c, requests=n, max_tokens=args.max_tokens,
        extra_body=body_for(mode, args),
    )
    async with loadgen.make_client(la) as client:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)
        results: list[loadgen.Result] = []

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                p = i % len(PROMPTS)
                res = loadgen.Result(i, p)
                results.append(await loadgen.stream_one(client, la, res, PROMPTS[p], la.max_tokens))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(c)))
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return loadgen.summarise(results, wall, la)


def engine_split(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Per sequence-step over one run: the engine's step time, its Python part, and the rest
    (llama_decode + sampling, where the grammar's cost lands)."""
    seqs = after["n_seq_steps"] - before["n_seq_steps"]
    steps = after["n_steps"] - before["n_steps"]
    busy = after["step_seconds"] - before["step_seconds"]
    py = after["python_seconds"] - before["python_seconds"]
    if seqs <= 0 or steps <= 0:
        return {}
    return {
        "steps": steps,
        "seqs_per_step": round(seqs / steps, 2),
        "step_ms": round(1e3 * busy / steps, 3),
        "us_per_seq_step": round(1e6 * busy / seqs, 1),
        "decode_sample_us_per_seq_step": round(1e6 * (busy - py) / seqs, 1),
        "python_us_per_seq_step": round(1e6 * py / seqs, 1),
    }


def engine_stats(server: compare.Server) -> dict[str, Any]:
    engine: dict[str, Any] = httpx.get(server.base_url[:-3] + "/health", timeout=30).json()["engine"]
    return engine


KEEP = (
    "aggregate_output_tok_s", "decode_tok_s_p50", "itl_ms_p50", "itl_ms_p95", "ttft_ms_p50",
    "wall_s", "completed", "errors", "error_samples", "requests_not_max_tokens",
    "total_completion_tokens", "mean_prompt_tokens",
)


def one_run(server: compare.Server, model: str, mode: str, c: int, args: argparse.Namespace) -> dict[str, Any]:
    n = c * args.requests_per_stream
    before = engine_stats(server)
    with compare.ForeignCpu(server.proc.pid if server.proc else None) as foreign:
        s = asyncio.run(run_mode(server.base_url, model, mode, c, n, args))
    out = {k: s[k] for k in KEEP}
    out["foreign_cores"] = foreign.stop()
    out.update(engine_split(before, engine_stats(server)))
    return out


def paired(rounds: list[dict[str, Any]], c: int, metric: str) -> dict[str, Any]:
    xs = []
    for r in rounds:
        a, b = r[str(c)]["schema"].get(metric), r[str(c)]["plain"].get(metric)
        if a and b:
            xs.append(round(a / b, 3))
    return {"median": statistics.median(xs) if xs else None, "rounds": xs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", default="1,8", help="comma-separated stream counts")
    p.add_argument("--requests-per-stream", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--parallel", type=int, default=8, help="the server's --parallel")
    p.add_argument("--threads", type=int, default=None, help="the server's --threads (default: its own)")
    p.add_argument("--model", default=None, help="GGUF path (default: the bundled model)")
    p.add_argument("--out", default=None, help="write the results here (JSON)")
    p.add_argument("--log", default=None, help="server log (default: next to --out, or /tmp)")
    args = p.parse_args(argv)
    args.levels = [int(x) for x in args.concurrency.split(",") if x.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out) if args.out else None
    log_path = Path(args.log) if args.log else (
        out.with_suffix(".server.log") if out else Path("/tmp/structured-speed-server.log")
    )
    model_path = args.model or compare.default_model()
    port = compare.free_port()
    argv_ = [compare.main_python(), "-m", "cria", "--host", "127.0.0.1", "--port", str(port),
             "--parallel", str(args.parallel), "--model", model_path]
    if args.threads:
        argv_ += ["--threads", str(args.threads)]
    server = compare.Server("cria", argv_, port, "/health", log_path)
    busy = compare.foreign_cores_now()
    compare.log(f"other processes keep {busy} cores busy; starting {' '.join(argv_)}")
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "server_argv": argv_,
        "config": {k: v for k, v in vars(args).items()},
        "schema": SCHEMA,
        "prompts": PROMPTS,
        "python": platform.python_version(),
        "foreign_cores_before": busy,
        "rounds": [],
    }
    try:
        server.start()
        server.wait_healthy(300)
        model = server.model_id()
        for mode in MODES:  # warm-up: every prompt once per mode (prefix cache, grammar code paths)
            compare.log(f"warm-up {mode}")
            asyncio.run(run_mode(server.base_url, model, mode, len(PROMPTS), len(PROMPTS),
                                 argparse.Namespace(**{**vars(args), "max_tokens": 8})))
        for rnd in range(args.rounds):
            rec: dict[str, Any] = {}
            for c in args.levels:
                order = MODES if (rnd + c) % 2 == 0 else MODES[::-1]
                rec[str(c)] = {}
                for mode in order:
                    s = one_run(server, model, mode, c, args)
                    rec[str(c)][mode] = s
                    compare.log(
                        f"round {rnd + 1} c={c} {mode}: {s['aggregate_output_tok_s']} tok/s, "
                        f"decode p50 {s['decode_tok_s_p50']}, errors {s['errors']}, "
                        f"short {s['requests_not_max_tokens']}, foreign {s['foreign_cores']}, "
                        f"decode+sample {s.get('decode_sample_us_per_seq_step')} us/seq-step"
                    )
            result["rounds"].append(rec)
    finally:
        server.stop()
    rounds = result["rounds"]
    summary: dict[str, Any] = {}
    for c in args.levels:
        row: dict[str, Any] = {}
        for m in ("aggregate_output_tok_s", "decode_tok_s_p50", "itl_ms_p50", "ttft_ms_p50",
                  "decode_sample_us_per_seq_step", "python_us_per_seq_step"):
            for mode in MODES:
                vals = [r[str(c)][mode].get(m) for r in rounds if r[str(c)][mode].get(m) is not None]
                row[f"{mode}_{m}"] = statistics.median(vals) if vals else None
        for m in ("aggregate_output_tok_s", "decode_tok_s_p50"):
            row[f"ratio_{m}"] = paired(rounds, c, m)
        us = [r[str(c)]["schema"].get("decode_sample_us_per_seq_step", 0)
              - r[str(c)]["plain"].get("decode_sample_us_per_seq_step", 0) for r in rounds]
        row["grammar_us_per_token_from_engine"] = round(statistics.median(us), 1) if us else None
        summary[str(c)] = row
    result["summary"] = summary
    log_text = log_path.read_text(errors="replace")
    result["server_log_tracebacks"] = log_text.count("Traceback")
    print(json.dumps(summary, indent=2))
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
