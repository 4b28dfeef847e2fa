#!/usr/bin/env python3
"""Do grammar-constrained outputs validate? Real-world schemas (JSONSchemaBench, the half in
../shared/jsonschemabench) sent as `response_format: json_schema` to a real Cria server.

A sample is drawn from every category (a fixed shuffle per category, round-robin across
categories): schemas that `cria.grammar.json_schema_grammar` compiles without error. Each is
sent with a prompt asking for JSON matching it (the schema's text, cut to --prompt-chars), at
--temperature with each of --seeds, max_tokens --max-tokens. Every output that ends by itself
(`finish_reason: "stop"`) must parse and validate against its schema with `jsonschema`, the
draft its `$schema` names (2020-12 when it names none), without and with a format checker.
Anything else is a grammar bug: each invalid output is saved with its schema id, the output
and the validation error. 400 refusals (`unsupported_schema`, invalid schema) are counted
apart from errors (anything else that is not a 200).

    .venv/bin/python bench/schema_validity.py [--total 240] [--seeds 1,2] [--max-tokens 512] \
        [--out bench/results/schema-validity.json] [--base-url http://127.0.0.1:3000/v1]

Without --base-url it starts its own server (`--parallel 8`). `--write-test-sample PATH`
writes a small fixed sample (compiled and refused schemas of every category) for
tests/e2e/test_schema_validity.py instead of running anything.

Dependencies: httpx, jsonschema (with the `format-nongpl` extra for more format checkers).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gzip
import json
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jsonschema
from jsonschema import validators

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
CORPUS = REPO.parent / "shared" / "jsonschemabench"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(REPO))

SYSTEM = "You answer with JSON only."


def load_corpus(root: Path = CORPUS) -> dict[str, list[dict[str, Any]]]:
    """Category -> its items ({"id", "schema"}), in file order."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(root.glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            out[path.name.split(".")[0]] = [json.loads(line) for line in f if line.strip()]
    if not out:
        raise SystemExit(f"no *.jsonl.gz under {root}")
    return out


class _Timeout(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Timeout


def try_compile(schema: Any, seconds: int = 10) -> tuple[str, str | None]:
    """("ok", None), ("unsupported", feature), ("error", message) or ("timeout", None)."""
    from cria.grammar import SchemaError, UnsupportedSchema, json_schema_grammar

    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    try:
        json_schema_grammar(schema)
        return "ok", None
    except _Timeout:
        return "timeout", None
    except UnsupportedSchema as exc:
        return "unsupported", str(getattr(exc, "feature", "") or exc)[:200]
    except (SchemaError, RecursionError) as exc:
        return "error", f"{type(exc).__name__}: {exc}"[:200]
    except Exception as exc:  # a crash of the compiler is worth reporting too
        return "error", f"CRASH {type(exc).__name__}: {exc}"[:200]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def draw_sample(
    corpus: dict[str, list[dict[str, Any]]], total: int, seed: int = 0
) -> tuple[list[dict[str, Any]], dict[str, dict[str, int]]]:
    """Compiled schemas, round-robin over categories (each in a fixed shuffled order), until
    `total` or every category is exhausted. Also: per category, how many were tried and how
    each attempt ended."""
    orders = {}
    for cat, items in corpus.items():
        idx = list(range(len(items)))
        random.Random(f"{seed}:{cat}").shuffle(idx)
        orders[cat] = collections.deque(idx)
    tried: dict[str, dict[str, int]] = {cat: collections.Counter() for cat in corpus}
    sample: list[dict[str, Any]] = []
    while len(sample) < total and any(orders.values()):
        for cat in corpus:
            if len(sample) >= total:
                break
            while orders[cat]:
                item = corpus[cat][orders[cat].popleft()]
                status, _ = try_compile(item["schema"])
                tried[cat][status] += 1
                if status == "ok":
                    sample.append({"category": cat, **item})
                    break
    return sample, {c: dict(t) for c, t in tried.items()}


def prompt_for(schema: Any, limit: int) -> str:
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    if len(text) > limit:
        text = text[:limit] + " ... (cut)"
    return (
        "Write a JSON document that matches this JSON Schema. Answer with the JSON only.\n\n"
        f"{text}"
    )


def validator_class(schema: Any) -> Any:
    return validators.validator_for(schema, default=jsonschema.Draft202012Validator)


def check(schema: Any, text: str) -> dict[str, Any]:
    """Parse and validate `text`: {"parses", "valid", "valid_with_formats", "error", ...}."""
    try:
        instance = json.loads(text)
    except json.JSONDecodeError as exc:
        return {"parses": False, "valid": False, "valid_with_formats": False, "error": f"JSON: {exc}"}
    cls = validator_class(schema)
    out: dict[str, Any] = {"parses": True, "validator": cls.__name__}
    for key, checker in (("valid", None), ("valid_with_formats", cls.FORMAT_CHECKER)):
        try:
            err = jsonschema.exceptions.best_match(
                cls(schema, format_checker=checker).iter_errors(instance)
            )
        except Exception as exc:  # unresolvable remote $ref and the like: not the output's fault
            out[key] = None
            out[f"{key}_check_failed"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        out[key] = err is None
        if err is not None:
            out[f"{key}_error"] = {
                "message": err.message[:500],
                "path": "/".join(str(p) for p in err.absolute_path),
                "schema_path": "/".join(str(p) for p in err.absolute_schema_path),
            }
    return out


async def one(
    client: httpx.AsyncClient, args: argparse.Namespace, model: str, item: dict[str, Any], seed: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt_for(item["schema"], args.prompt_chars)},
        ],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": item["schema"]}},
        "temperature": args.temperature,
        "seed": seed,
        "max_tokens": args.max_tokens,
    }
    rec: dict[str, Any] = {"id": item["id"], "category": item["category"], "seed": seed}
    t0 = time.perf_counter()
    try:
        r = await client.post(args.base_url.rstrip("/") + "/chat/completions", json=body)
    except httpx.HTTPError as exc:
        rec.update(outcome="error", error=f"{type(exc).__name__}: {exc}")
        return rec
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    rec["status"] = r.status_code
    if r.status_code == 400:
        err = (r.json().get("error") or {}) if r.headers.get("content-type", "").startswith("application/json") else {}
        rec.update(outcome="refused", code=err.get("code"), message=str(err.get("message"))[:300])
        return rec
    if r.status_code != 200:
        rec.update(outcome="error", error=r.text[:500])
        return rec
    choice = r.json()["choices"][0]
    content = choice["message"].get("content") or ""
    rec.update(
        outcome=choice["finish_reason"],
        completion_tokens=r.json()["usage"]["completion_tokens"],
        content=content,
    )
    if choice["finish_reason"] == "stop":
        rec.update(check(item["schema"], content))
    return rec


async def run_all(args: argparse.Namespace, model: str, sample: list[dict[str, Any]]) -> list[dict[str, Any]]:
    jobs = [(item, seed) for seed in args.seed_list for item in sample]
    sem = asyncio.Semaphore(args.concurrency)
    done = 0
    t0 = time.perf_counter()

    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout)) as client:

        async def go(item: dict[str, Any], seed: int) -> dict[str, Any]:
            nonlocal done
            async with sem:
                rec = await one(client, args, model, item, seed)
            done += 1
            if done % 25 == 0 or done == len(jobs):
                print(f"[{time.strftime('%H:%M:%S')}] {done}/{len(jobs)} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
            return rec

        return list(await asyncio.gather(*(go(i, s) for i, s in jobs)))


def summarise(records: list[dict[str, Any]], sample: list[dict[str, Any]]) -> dict[str, Any]:
    outcomes = collections.Counter(r["outcome"] for r in records)
    stops = [r for r in records if r["outcome"] == "stop"]
    per_cat: dict[str, Any] = {}
    for cat in sorted({s["category"] for s in sample}):
        rs = [r for r in records if r["category"] == cat]
        st = [r for r in rs if r["outcome"] == "stop"]
        per_cat[cat] = {
            "schemas": sum(1 for s in sample if s["category"] == cat),
            "requests": len(rs),
            **dict(collections.Counter(r["outcome"] for r in rs)),
            "stop_valid": sum(1 for r in st if r.get("valid")),
        }
    def rate(key: str) -> dict[str, Any]:
        judged = [r for r in stops if r.get(key) is not None]
        ok = sum(1 for r in judged if r[key])
        return {"judged": len(judged), "valid": ok, "invalid": len(judged) - ok,
                "rate": round(ok / len(judged), 4) if judged else None,
                "not_judged": len(stops) - len(judged)}
    return {
        "schemas": len(sample),
        "requests": len(records),
        "outcomes": dict(outcomes),
        "refusal_codes": dict(collections.Counter(r.get("code") for r in records if r["outcome"] == "refused")),
        "stop_parse_failures": sum(1 for r in stops if not r.get("parses")),
        "validity": rate("valid"),
        "validity_with_formats": rate("valid_with_formats"),
        "per_category": per_cat,
    }


def start_server(args: argparse.Namespace, log_path: Path) -> Any:
    import compare  # bench/compare.py: the server start-up and stop

    port = compare.free_port()
    argv = [compare.main_python(), "-m", "cria", "--host", "127.0.0.1", "--port", str(port),
            "--parallel", str(args.parallel)]
    server = compare.Server("cria", argv, port, "/health", log_path)
    server.start()
    server.wait_healthy(300)
    args.base_url = server.base_url
    return server


def write_test_sample(path: Path, per_category: int, refused: int) -> None:
    """Small schemas of every category: up to `per_category` that compile, `refused` that do
    not (UnsupportedSchema), in a fixed order; the e2e test re-checks which is which."""
    corpus = load_corpus()
    items = []
    for cat, rows in corpus.items():
        small = sorted((r for r in rows if len(json.dumps(r["schema"])) < 1500), key=lambda r: r["id"])
        random.Random(f"test:{cat}").shuffle(small)
        # A category of big schemas (Github_ultra) still gets its smallest ones.
        small += sorted((r for r in rows if r not in small), key=lambda r: len(json.dumps(r["schema"])))[:20]
        ok = bad = 0
        for r in small:
            status, _ = try_compile(r["schema"])
            if status == "ok" and ok < per_category:
                ok += 1
                items.append(r)
            elif status == "unsupported" and bad < refused:
                bad += 1
                items.append(r)
            if ok >= per_category and bad >= refused:
                break
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "source": "JSONSchemaBench (Geng et al., arXiv 2501.10868; guidance-ai/jsonschemabench, "
                  "data/), drawn by bench/schema_validity.py --write-test-sample",
        "schemas": items,
    }, indent=1) + "\n")
    print(f"wrote {len(items)} schemas to {path}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total", type=int, default=240, help="schemas in the sample")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--prompt-chars", type=int, default=1500, help="schema text in the prompt, cut here")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    p.add_argument("--parallel", type=int, default=8, help="the server's --parallel (own server)")
    p.add_argument("--base-url", default=None, help="an existing server (default: start one)")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--out", default=None, help="results JSON (every output, invalid ones apart)")
    p.add_argument("--write-test-sample", default=None, metavar="PATH")
    args = p.parse_args(argv)
    args.seed_list = [int(s) for s in args.seeds.split(",") if s.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.write_test_sample:
        write_test_sample(Path(args.write_test_sample), per_category=2, refused=1)
        return 0
    t0 = time.perf_counter()
    corpus = load_corpus()
    sample, tried = draw_sample(corpus, args.total)
    print(f"sample: {len(sample)} schemas "
          f"{dict(collections.Counter(s['category'] for s in sample))} ({time.perf_counter() - t0:.0f} s)")
    out = Path(args.out) if args.out else None
    server = None
    if args.base_url is None:
        log_path = out.with_suffix(".server.log") if out else Path("/tmp/schema-validity-server.log")
        server = start_server(args, log_path)
    try:
        model = httpx.get(args.base_url.rstrip("/") + "/models", timeout=30).json()["data"][0]["id"]
        records = asyncio.run(run_all(args, model, sample))
    finally:
        if server is not None:
            server.stop()
    summary = summarise(records, sample)
    invalid = [
        {**r, "schema": next(s["schema"] for s in sample if s["id"] == r["id"])}
        for r in records
        if r["outcome"] == "stop" and (r.get("valid") is False or r.get("valid_with_formats") is False)
    ]
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv,
        "config": {k: v for k, v in vars(args).items()},
        "compile_attempts": tried,
        "sample": sample,
        "summary": summary,
        "invalid": invalid,
        "errors": [r for r in records if r["outcome"] == "error"],
        "records": records,
        "elapsed_s": round(time.perf_counter() - t0, 1),
    }
    if server is not None:
        result["server_log_tracebacks"] = server.log_path.read_text(errors="replace").count("Traceback")
    print(json.dumps(summary, indent=2))
    print(f"invalid outputs: {len(invalid)}")
    for r in invalid:
        print(f"  {r['id']} seed {r['seed']}: {r.get('valid_error') or r.get('valid_with_formats_error') or r.get('error')}")
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {out}")
    return 0 if not invalid else 1


if __name__ == "__main__":
    sys.exit(main())
