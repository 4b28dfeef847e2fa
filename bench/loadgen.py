#!/usr/bin/env python3
"""Load generator for any OpenAI-compatible server (cria, llama.cpp's llama-server, ...).

Streams N requests through C concurrent workers and reports time to first token (TTFT),
inter-token latency (ITL, the gaps between consecutive content chunks), per-request decode
speed, aggregate output throughput and requests/s. Every request is greedy (temperature 0)
and sends the `ignore_eos` extension, so each one generates exactly --max-tokens tokens.

    python bench/loadgen.py --base-url http://127.0.0.1:3000/v1 --model ID \
        --concurrency 8 --requests 32 --max-tokens 128 [--endpoint chat|completions] \
        [--json OUT.json]

    # prompt processing speed: a ~1,500-token prompt, max_tokens 1, 3 runs, median reported
    python bench/loadgen.py --base-url http://127.0.0.1:3000/v1 --model ID --prefill

Dependencies: the standard library and httpx.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

# --------------------------------------------------------------------------------------------
# Prompts: fixed and deterministic, so runs against different servers are comparable.
# --------------------------------------------------------------------------------------------

PARAGRAPHS = [
    "The harbour town woke slowly in winter. Fishing boats rocked against the stone quay while "
    "gulls argued over scraps, and the baker on the corner pulled the first loaves from an oven "
    "that had been burning since four. By seven the market square filled with carts of cabbages, "
    "barrels of salted herring and bolts of rough wool dyed the colour of the sea.",
    "Photosynthesis converts light energy into chemical energy. In the thylakoid membranes of "
    "chloroplasts, pigments absorb photons and drive electrons through a chain of proteins, "
    "pumping protons and producing ATP and NADPH. The Calvin cycle then uses these carriers to "
    "fix carbon dioxide into three-carbon sugars that the plant builds into starch and cellulose.",
    "A hash table stores key and value pairs in an array of buckets. A hash function maps each key "
    "to an index, and collisions are resolved either by chaining entries in a list or by probing "
    "for the next free slot. When the load factor grows too large the table is resized, and every "
    "entry is rehashed into a larger array so that lookups stay close to constant time.",
    "The expedition left base camp before dawn, roped together in teams of three. Above the "
    "icefall the wind rose and snow began to drift across the fixed lines. The leader checked "
    "the oxygen gauges twice an hour, and when the cloud closed over the ridge she ordered "
    "everyone to turn back, a decision that the team would later agree had saved their lives.",
    "Inflation measures how quickly the general level of prices rises. Central banks usually aim "
    "for a low and stable rate, raising interest rates when the economy overheats and lowering "
    "them when demand is weak. Higher rates make borrowing more expensive, which cools spending "
    "and investment, although the effect on prices often takes a year or more to appear.",
    "To make a simple tomato sauce, warm olive oil in a heavy pan and soften a chopped onion with "
    "a pinch of salt. Add two cloves of garlic, cook for a minute, then tip in crushed tomatoes "
    "and a spoon of sugar. Let it simmer gently for half an hour, stirring now and then, and "
    "finish it with torn basil leaves and a knob of cold butter just before serving.",
    "The committee reviewed the proposal in three sessions. Members raised concerns about the "
    "budget, the timeline and the lack of a plan for maintenance once the building was finished. "
    "After a long debate they approved the first phase on condition that the architects return "
    "in the spring with revised drawings and an independent estimate of the running costs.",
    "Sound travels as a pressure wave through air, water or solid materials. Its speed depends on "
    "the stiffness and density of the medium, which is why it moves about four times faster in "
    "water than in air. The pitch we hear is set by the frequency of the wave, while loudness "
    "depends on its amplitude, measured on the logarithmic decibel scale.",
    "Marta opened the letter at the kitchen table, her coffee going cold beside her. It was from "
    "her brother, who had not written in eleven years. He apologised for the silence, described "
    "a small farm in the hills where he kept goats and bees, and asked whether she might visit "
    "in the summer when the chestnut trees were in flower.",
    "Version control systems record the history of a project as a series of snapshots. Each "
    "commit stores the changed files along with a message, an author and a pointer to its "
    "parents. Branches let developers work on features in isolation, and merging combines their "
    "histories, sometimes requiring a person to resolve conflicting edits by hand.",
    "The museum's new wing is devoted to maps. Visitors walk past medieval charts decorated with "
    "sea monsters, printed atlases from the age of exploration and the first satellite images "
    "of the earth. A final room shows how modern navigation systems combine signals from many "
    "satellites to fix a position to within a few metres anywhere on the planet.",
    "Regular exercise strengthens the heart and lungs, improves sleep and lowers the risk of many "
    "chronic diseases. Health agencies recommend at least one hundred and fifty minutes of "
    "moderate activity a week, such as brisk walking or cycling, along with exercises that work "
    "the major muscle groups on two or more days. Even short walks bring measurable benefits.",
]

INSTRUCTIONS = [
    "Summarise the following text.",
    "Continue the story or explanation below in the same style.",
    "Write a short commentary on the passage below.",
    "List the main ideas in the following text.",
]

# Rough prompt lengths in tokens (English runs at about 1.3 tokens a word).
TARGET_TOKENS = [20, 35, 50, 70, 95, 120, 150, 185, 225, 270, 330, 400]
TOKENS_PER_WORD = 1.3


def _words(offset: int, count: int) -> list[str]:
    """`count` words of the paragraphs, read in a cycle starting at paragraph `offset`."""
    out: list[str] = []
    i = offset
    while len(out) < count:
        out.extend(PARAGRAPHS[i % len(PARAGRAPHS)].split())
        i += 1
    return out[:count]


def build_prompts() -> list[str]:
    prompts = []
    for i, tokens in enumerate(TARGET_TOKENS):
        instruction = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        n_words = max(4, round(tokens / TOKENS_PER_WORD) - len(instruction.split()))
        text = " ".join(_words(i * 5 % len(PARAGRAPHS), n_words))
        prompts.append(f"{instruction}\n\n{text}")
    return prompts


def build_prefill_prompt(run: int, n_words: int) -> str:
    """A long prompt; `run` is written first so no two runs share a cached prefix."""
    head = f"{run * 7919 + 1013} Read the following notes carefully, then answer a question about them.\n\n"
    return (
        head
        + " ".join(_words(run * 3, n_words))
        + "\n\nQuestion: what is the first topic?\nAnswer:"
    )


PROMPTS = build_prompts()

# --------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------


@dataclass
class Result:
    index: int
    prompt_index: int
    start: float = 0.0  # perf_counter when the request was sent
    end: float = 0.0
    first_token: float | None = None  # perf_counter of the first non-empty content chunk
    chunk_times: list[float] = field(default_factory=list)  # every content chunk
    completion_tokens: int | None = None  # from the usage chunk
    prompt_tokens: int | None = None
    usage_reported: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tokens(self) -> int:
        return (
            self.completion_tokens if self.completion_tokens is not None else len(self.chunk_times)
        )

    @property
    def decode_tok_s(self) -> float | None:
        if self.first_token is None or not self.chunk_times or self.tokens < 2:
            return None
        dt = self.chunk_times[-1] - self.first_token
        return (self.tokens - 1) / dt if dt > 0 else None


def _body(args: argparse.Namespace, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _url(args: argparse.Namespace, endpoint: str) -> str:
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    return str(args.base_url).rstrip("/") + path


def _content(event: dict[str, Any]) -> str:
    text = ""
    for choice in event.get("choices") or []:
        delta = choice.get("delta")
        if isinstance(delta, dict):
            text += delta.get("content") or ""
        text += choice.get("text") or ""
    return text


async def stream_one(
    client: httpx.AsyncClient,
    args: argparse.Namespace,
    result: Result,
    prompt: str,
    max_tokens: int,
) -> Result:
    body = _body(args, prompt, max_tokens)
    result.start = time.perf_counter()
    try:
        async with client.stream("POST", _url(args, args.endpoint), json=body) as resp:
            if resp.status_code != 200:
                detail = (await resp.aread()).decode("utf-8", "replace")[:300]
                result.error = f"HTTP {resp.status_code}: {detail}"
                return result
            async for line in resp.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except json.JSONDecodeError:
                    result.error = f"bad SSE data: {data[:200]}"
                    break
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    result.error = f"error event: {json.dumps(event['error'])[:300]}"
                    break
                if _content(event):
                    if result.first_token is None:
                        result.first_token = now
                    result.chunk_times.append(now)
                usage = event.get("usage")
                if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
                    result.usage_reported = True
                    result.completion_tokens = int(usage["completion_tokens"])
                    if usage.get("prompt_tokens") is not None:
                        result.prompt_tokens = int(usage["prompt_tokens"])
    except (httpx.HTTPError, OSError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.end = time.perf_counter()
    if result.error is None and result.first_token is None:
        result.error = "no content received"
    return result


# --------------------------------------------------------------------------------------------
# Statistics and reporting
# --------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1000.0, 2)


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def summarise(results: list[Result], wall: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [g for r in ok for g in r.itls]
    decode = [d for r in ok if (d := r.decode_tok_s) is not None]
    total_tokens = sum(r.tokens for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    short = [r for r in ok if r.tokens != args.max_tokens]
    errors = [r for r in results if r.error is not None]
    return {
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": args.endpoint,
        "concurrency": args.concurrency,
        "requests": args.requests,
        "max_tokens": args.max_tokens,
        "completed": len(ok),
        "errors": len(errors),
        "error_samples": sorted({r.error for r in errors if r.error})[:5],
        "wall_s": _r(wall, 3),
        "ttft_ms_p50": _ms(percentile(ttfts, 50)),
        "ttft_ms_p95": _ms(percentile(ttfts, 95)),
        "itl_ms_p50": _ms(percentile(itls, 50)),
        "itl_ms_p95": _ms(percentile(itls, 95)),
        "decode_tok_s_p50": _r(percentile(decode, 50)),
        "aggregate_output_tok_s": _r(total_tokens / wall if wall > 0 else None),
        "requests_per_s": _r(len(ok) / wall if wall > 0 else None, 3),
        "total_completion_tokens": total_tokens,
        "mean_prompt_tokens": _r(statistics.fmean(prompt_tokens) if prompt_tokens else None, 1),
        "usage_missing": sum(1 for r in ok if not r.usage_reported),
        "requests_not_max_tokens": len(short),
        "per_request": [
            {
                "index": r.index,
                "prompt_index": r.prompt_index,
                "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.tokens if r.error is None else None,
                "ttft_ms": _ms(r.ttft),
                "decode_tok_s": _r(r.decode_tok_s),
                "latency_ms": _ms(r.end - r.start),
                "error": r.error,
            }
            for r in results
        ],
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.2f}"
    return str(x)


def print_load_report(s: dict[str, Any]) -> None:
    rows = [
        ("endpoint", s["endpoint"]),
        ("concurrency / requests", f"{s['concurrency']} / {s['requests']}"),
        ("completed / errors", f"{s['completed']} / {s['errors']}"),
        ("mean prompt tokens", s["mean_prompt_tokens"]),
        ("total completion tokens", s["total_completion_tokens"]),
        ("wall time (s)", s["wall_s"]),
        ("TTFT p50 / p95 (ms)", f"{_fmt(s['ttft_ms_p50'])} / {_fmt(s['ttft_ms_p95'])}"),
        ("ITL p50 / p95 (ms)", f"{_fmt(s['itl_ms_p50'])} / {_fmt(s['itl_ms_p95'])}"),
        ("decode tok/s per request p50", s["decode_tok_s_p50"]),
        ("aggregate output tok/s", s["aggregate_output_tok_s"]),
        ("requests/s", s["requests_per_s"]),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"\n{s['model']} @ {s['base_url']}  (max_tokens {s['max_tokens']})")
    for k, v in rows:
        print(f"  {k:<{width}}  {_fmt(v)}")
    if s["usage_missing"]:
        print(f"  note: {s['usage_missing']} request(s) had no usage chunk; counted content chunks")
    if s["requests_not_max_tokens"]:
        print(
            f"  note: {s['requests_not_max_tokens']} request(s) did not produce max_tokens tokens"
        )
    for e in s["error_samples"]:
        print(f"  error: {e}")


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def make_client(args: argparse.Namespace) -> httpx.AsyncClient:
    n = max(1, args.concurrency)
    return httpx.AsyncClient(
        timeout=httpx.Timeout(args.timeout),
        limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
    )


async def resolve_model(client: httpx.AsyncClient, args: argparse.Namespace) -> None:
    if args.model:
        return
    resp = await client.get(args.base_url.rstrip("/") + "/models")
    resp.raise_for_status()
    data = resp.json().get("data") or []
    if not data:
        raise SystemExit("--model not given and GET /models lists none")
    args.model = data[0]["id"]


async def run_load(args: argparse.Namespace) -> dict[str, Any]:
    async with make_client(args) as client:
        await resolve_model(client, args)
        # Warm-up (not counted): loads weights into caches, opens a connection.
        warm = await stream_one(client, args, Result(-1, 0), PROMPTS[0], min(args.max_tokens, 16))
        if warm.error:
            raise SystemExit(f"warm-up request failed: {warm.error}")

        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(args.requests):
            queue.put_nowait(i)
        results: list[Result] = []

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                p = i % len(PROMPTS)
                results.append(
                    await stream_one(client, args, Result(i, p), PROMPTS[p], args.max_tokens)
                )

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
    results.sort(key=lambda r: r.index)
    return summarise(results, wall, args)


async def prefill_once(
    client: httpx.AsyncClient, args: argparse.Namespace, prompt: str
) -> tuple[int, float]:
    body = {
        "model": args.model,
        "prompt": prompt,
        "max_tokens": 1,
        "temperature": 0,
        "stream": False,
    }
    t0 = time.perf_counter()
    resp = await client.post(_url(args, "completions"), json=body)
    wall = time.perf_counter() - t0
    if resp.status_code != 200:
        raise SystemExit(f"prefill request failed: HTTP {resp.status_code}: {resp.text[:300]}")
    usage = resp.json().get("usage") or {}
    if usage.get("prompt_tokens") is None:
        raise SystemExit("prefill response has no usage.prompt_tokens")
    return int(usage["prompt_tokens"]), wall


async def run_prefill(args: argparse.Namespace) -> dict[str, Any]:
    async with make_client(args) as client:
        await resolve_model(client, args)
        # Warm-up (not counted), which also calibrates the words-per-token ratio of this
        # tokenizer so the measured prompts come out near --prefill-tokens.
        guess = round(args.prefill_tokens / TOKENS_PER_WORD)
        tokens, _ = await prefill_once(client, args, build_prefill_prompt(99, guess))
        n_words = max(16, round(guess * args.prefill_tokens / tokens)) if tokens else guess
        runs = []
        for run in range(3):
            tokens, wall = await prefill_once(client, args, build_prefill_prompt(run, n_words))
            runs.append(
                {
                    "prompt_tokens": tokens,
                    "wall_s": round(wall, 4),
                    "tok_s": round(tokens / wall, 2),
                }
            )
    best = statistics.median(r["tok_s"] for r in runs)
    return {
        "base_url": args.base_url,
        "model": args.model,
        "mode": "prefill",
        "prompt_tokens_median": statistics.median(r["prompt_tokens"] for r in runs),
        "wall_s_median": statistics.median(r["wall_s"] for r in runs),
        "prompt_tok_s_median": best,
        "runs": runs,
    }


def print_prefill_report(s: dict[str, Any]) -> None:
    print(f"\n{s['model']} @ {s['base_url']}  prefill (/completions, max_tokens 1, non-streaming)")
    for i, r in enumerate(s["runs"]):
        print(
            f"  run {i}: {r['prompt_tokens']} prompt tokens in {r['wall_s'] * 1000:,.1f} ms = {r['tok_s']:,.2f} tok/s"
        )
    print(
        f"  median prompt tok/s   {s['prompt_tok_s_median']:,.2f}  (median prompt {s['prompt_tokens_median']} tokens)"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--base-url", default="http://127.0.0.1:3000/v1", help="OpenAI base URL, with /v1"
    )
    p.add_argument(
        "--model", default=None, help="model id (default: the first one GET /models lists)"
    )
    p.add_argument("--concurrency", "-c", type=int, default=1, help="concurrent workers")
    p.add_argument("--requests", "-n", type=int, default=16, help="requests in total")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--endpoint", choices=("chat", "completions"), default="chat")
    p.add_argument("--json", metavar="OUT.json", default=None, help="also write the results here")
    p.add_argument("--prefill", action="store_true", help="measure prompt processing speed instead")
    p.add_argument("--prefill-tokens", type=int, default=1500, help="prompt length for --prefill")
    p.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout in seconds (min 600)")
    args = p.parse_args(argv)
    if args.concurrency < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--concurrency, --requests and --max-tokens must be at least 1")
    args.timeout = max(args.timeout, 600.0)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prefill:
        summary = asyncio.run(run_prefill(args))
        print_prefill_report(summary)
    else:
        summary = asyncio.run(run_load(args))
        print_load_report(summary)
    summary["python"] = platform.python_version()
    summary["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(f"  wrote {args.json}")
    return 0 if summary.get("errors", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
