"""A multi-turn chat that re-sends its history every turn: how much of each prompt is served
from the slot's cache (usage.prompt_tokens_details.cached_tokens) and how much is prefilled.

    python bench/multiturn.py --base-url http://127.0.0.1:3000/v1 --turns 10
"""

from __future__ import annotations

import argparse
import json
import time

import httpx

QUESTIONS = [
    "Tell me about llamas.",
    "Where do they live?",
    "What do they eat?",
    "How long do they live?",
    "Are they related to camels?",
    "How are they used by farmers?",
    "What is their wool like?",
    "How do they communicate?",
    "Can they be kept as pets?",
    "Summarize what you told me.",
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", default="http://127.0.0.1:3000/v1")
    ap.add_argument("--model", default=None)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    with httpx.Client(base_url=args.base_url, timeout=300) as client:
        model = args.model or client.get("/models").json()["data"][0]["id"]
        messages: list[dict[str, str]] = [{"role": "system", "content": "You are a helpful assistant."}]
        rows = []
        for turn in range(args.turns):
            messages.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            started = time.perf_counter()
            r = client.post(
                "/chat/completions",
                json={"model": model, "messages": messages, "max_tokens": args.max_tokens, "temperature": 0},
            )
            r.raise_for_status()
            body = r.json()
            elapsed = time.perf_counter() - started
            usage = body["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            rows.append(
                {
                    "turn": turn + 1,
                    "prompt_tokens": usage["prompt_tokens"],
                    "cached_tokens": cached,
                    "prefilled_tokens": usage["prompt_tokens"] - cached,
                    "completion_tokens": usage["completion_tokens"],
                    "seconds": round(elapsed, 3),
                }
            )
            messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    print(f"{'turn':>4} {'prompt':>7} {'cached':>7} {'prefilled':>9} {'completion':>10} {'s':>7}")
    for row in rows:
        print(f"{row['turn']:>4} {row['prompt_tokens']:>7} {row['cached_tokens']:>7} {row['prefilled_tokens']:>9} {row['completion_tokens']:>10} {row['seconds']:>7}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
