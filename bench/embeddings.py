#!/usr/bin/env python3
"""Embeddings benchmark for any OpenAI-compatible server (cria, llama-server --embeddings, ...).

Reports embeddings/s for 64 short inputs sent as one request, and as 8 concurrent requests of 8
inputs each (the median of --repeats runs each, after one warm-up request). With --chat-gap it
also measures a streaming chat's inter-token gap (p50/p95/max) alone, then while 50 embedding
requests of 16 inputs each run (the server must serve chat and embeddings at once: cria does;
llama-server --embeddings serves embeddings only).

    python bench/embeddings.py --base-url http://127.0.0.1:3000/v1 [--model ID] \
        [--chat-gap] [--json OUT.json]

    # in one run: Cria (with --chat-gap), then llama-server --embeddings --pooling mean, on the
    # same GGUF (default: the bundled model), one server at a time; reports Cria/llama-server
    python bench/embeddings.py --compare [--gguf PATH] [--threads 2] [--json OUT.json]

Dependencies: the standard library and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A bowl of warm soup on a cold evening.",
    "Interest rates rose again this quarter.",
    "The train to the coast leaves at nine.",
    "Photosynthesis turns light into chemical energy.",
    "She planted tomatoes along the garden fence.",
    "The database index made the query much faster.",
    "Snow fell quietly over the mountain village.",
]


def short_inputs(n: int, salt: int = 0) -> list[str]:
    """n distinct short inputs (about 10-15 tokens each)."""
    return [f"{SENTENCES[(i + salt) % len(SENTENCES)]} ({salt}-{i})" for i in range(n)]


async def embed(client: httpx.AsyncClient, model: str, inputs: list[str]) -> float:
    started = time.perf_counter()
    r = await client.post("/embeddings", json={"model": model, "input": inputs, "encoding_format": "float"})
    r.raise_for_status()
    data = r.json()["data"]
    if len(data) != len(inputs):
        raise RuntimeError(f"asked for {len(inputs)} embeddings, got {len(data)}")
    return time.perf_counter() - started


async def one_request_rate(client: httpx.AsyncClient, model: str, n_inputs: int, repeats: int) -> dict[str, Any]:
    times = [await embed(client, model, short_inputs(n_inputs, salt=k)) for k in range(repeats)]
    median = statistics.median(times)
    return {"inputs": n_inputs, "seconds": times, "embeddings_per_s": n_inputs / median}


async def concurrent_rate(
    client: httpx.AsyncClient, model: str, n_inputs: int, n_requests: int, repeats: int
) -> dict[str, Any]:
    per_request = n_inputs // n_requests
    times = []
    for k in range(repeats):
        started = time.perf_counter()
        await asyncio.gather(
            *(embed(client, model, short_inputs(per_request, salt=100 * k + j)) for j in range(n_requests))
        )
        times.append(time.perf_counter() - started)
    median = statistics.median(times)
    return {
        "inputs": per_request * n_requests,
        "requests": n_requests,
        "seconds": times,
        "embeddings_per_s": per_request * n_requests / median,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def chat_gaps(client: httpx.AsyncClient, model: str, max_tokens: int) -> tuple[float, list[float]]:
    """Time to the first content chunk and the gaps (s) between consecutive content chunks of
    one greedy streaming chat."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    stamps: list[float] = []
    started = time.perf_counter()
    async with client.stream("POST", "/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stamps.append(time.perf_counter())
    return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:])]


def gap_summary(gaps: list[float]) -> dict[str, float]:
    return {
        "n": len(gaps),
        "p50_ms": 1e3 * percentile(gaps, 50),
        "p95_ms": 1e3 * percentile(gaps, 95),
        "p99_ms": 1e3 * percentile(gaps, 99),
        "max_ms": 1e3 * max(gaps) if gaps else float("nan"),
    }


async def chat_gap_under_load(
    client: httpx.AsyncClient, model: str, chat_model: str, max_tokens: int, n_requests: int, n_inputs: int
) -> dict[str, Any]:
    await chat_gaps(client, chat_model, 8)  # warm-up
    ttft_alone, gaps_alone = await chat_gaps(client, chat_model, max_tokens)
    unloaded = {**gap_summary(gaps_alone), "ttft_ms": 1e3 * ttft_alone}
    load = [
        asyncio.ensure_future(embed(client, model, short_inputs(n_inputs, salt=1000 + j)))
        for j in range(n_requests)
    ]
    await asyncio.sleep(0.5)  # the embedding load is queued and running
    ttft_loaded, loaded_gaps = await chat_gaps(client, chat_model, max_tokens)
    n_done_during_chat = sum(1 for f in load if f.done())
    started = time.perf_counter()
    await asyncio.gather(*load)
    loaded = {**gap_summary(loaded_gaps), "ttft_ms": 1e3 * ttft_loaded}
    return {
        "chat_max_tokens": max_tokens,
        "embedding_requests": n_requests,
        "inputs_per_request": n_inputs,
        "unloaded": unloaded,
        "loaded": loaded,
        "p95_ratio": loaded["p95_ms"] / unloaded["p95_ms"],
        "embedding_requests_done_when_chat_ended": n_done_during_chat,
        "embedding_tail_s_after_chat": time.perf_counter() - started,
    }


async def run(args: argparse.Namespace, base_url: str, *, chat_gap: bool) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        models = (await client.get("/models")).json()["data"]
        model = args.model or models[-1]["id"]
        await embed(client, model, short_inputs(8, salt=-1))  # warm-up (creates the context)
        out: dict[str, Any] = {"base_url": base_url, "model": model}
        out["one_request"] = await one_request_rate(client, model, args.inputs, args.repeats)
        print(f"one request of {args.inputs}: {out['one_request']['embeddings_per_s']:.1f} embeddings/s")
        out["concurrent"] = await concurrent_rate(client, model, args.inputs, args.concurrency, args.repeats)
        print(
            f"{args.concurrency} concurrent requests: "
            f"{out['concurrent']['embeddings_per_s']:.1f} embeddings/s"
        )
        if chat_gap:
            chat_model = args.chat_model or models[0]["id"]
            gap = await chat_gap_under_load(
                client, model, chat_model, args.chat_tokens, args.gap_requests, args.gap_inputs
            )
            out["chat_gap"] = gap
            print(
                f"chat gap p95: {gap['unloaded']['p95_ms']:.1f} ms alone, "
                f"{gap['loaded']['p95_ms']:.1f} ms under load ({gap['p95_ratio']:.2f}x); "
                f"max {gap['unloaded']['max_ms']:.1f} / {gap['loaded']['max_ms']:.1f} ms; "
                f"TTFT {gap['unloaded']['ttft_ms']:.0f} / {gap['loaded']['ttft_ms']:.0f} ms"
            )
        return out


DEFAULT_LLAMA_BIN = Path.home() / ".cache/cria-peers/llama.cpp-from-llama-cpp-python-0.3.36/bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(argv: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise RuntimeError(f"{argv[0]} did not become healthy; see {log}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """Cria, then llama-server, on the same GGUF, one at a time (each gets the whole machine)."""
    gguf = args.gguf
    if gguf is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from cria.models.spec import bundled_model_path

        gguf = str(bundled_model_path())
    out_dir = Path(args.log_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = str(args.threads)
    results: dict[str, Any] = {"gguf": gguf, "threads": args.threads}
    port = free_port()
    cria = [sys.executable, "-m", "cria", "--host", "127.0.0.1", "--port", str(port), "--threads", t,
            "--parallel", "8", "--context-size", "2048", "--model", gguf]
    proc = serve(cria, port, out_dir / "cria-embeddings.log")
    try:
        results["cria"] = asyncio.run(run(args, f"http://127.0.0.1:{port}/v1", chat_gap=True))
    finally:
        stop(proc)
    llama_bin = Path(args.llama_bin)
    port = free_port()
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = str(llama_bin) + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    # Slots as Cria's --parallel 8, 2048 tokens each; a ubatch as large as a batch, as Cria's.
    server = [str(llama_bin / "llama-server"), "-m", gguf, "--host", "127.0.0.1", "--port", str(port),
              "-t", t, "-tb", t, "--parallel", "8", "-c", str(8 * 2048), "-b", "2048", "-ub", "2048",
              "--embeddings", "--pooling", "mean"]
    proc = serve(server, port, out_dir / "llama-server-embeddings.log", env=env)
    try:
        results["llama-server"] = asyncio.run(run(args, f"http://127.0.0.1:{port}/v1", chat_gap=False))
    finally:
        stop(proc)
    results["ratio_cria_over_llama_server"] = {
        key: results["cria"][key]["embeddings_per_s"] / results["llama-server"][key]["embeddings_per_s"]
        for key in ("one_request", "concurrent")
    }
    print("Cria / llama-server embeddings/s:", json.dumps(results["ratio_cria_over_llama_server"]))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://127.0.0.1:3000/v1")
    ap.add_argument("--model", default=None, help="embedding model id (default: the last listed)")
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chat-gap", action="store_true", help="also measure the chat gap under load")
    ap.add_argument("--chat-model", default=None, help="chat model id (default: the first listed)")
    ap.add_argument("--chat-tokens", type=int, default=128)
    ap.add_argument("--gap-requests", type=int, default=50)
    ap.add_argument("--gap-inputs", type=int, default=16)
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--compare", action="store_true", help="start Cria, then llama-server, and compare")
    ap.add_argument("--gguf", default=None, help="--compare: the model file (default: the bundled one)")
    ap.add_argument("--threads", type=int, default=2, help="--compare: compute threads of each server")
    ap.add_argument("--llama-bin", default=str(DEFAULT_LLAMA_BIN), help="--compare: llama-server's folder")
    ap.add_argument("--log-dir", default="bench/out/logs", help="--compare: server logs go here")
    args = ap.parse_args()
    if args.compare:
        out = compare(args)
    else:
        out = asyncio.run(run(args, args.base_url, chat_gap=args.chat_gap))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
