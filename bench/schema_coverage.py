#!/usr/bin/env python3
"""Which real-world schemas compile? JSONSchemaBench (the half in ../shared/jsonschemabench),
per category, for three compilers, in one run:

* ours: `cria.grammar.json_schema_grammar` returns a grammar (UnsupportedSchema / SchemaError
  are refusals, their reasons counted); compile times are recorded (percentiles).
* llama.cpp's converter as llama-cpp-python ships it (`llama_cpp.llama_grammar.
  json_schema_to_gbnf`): it compiles when the converter returns and llama.cpp's own grammar
  parser accepts the GBNF (`llama_sampler_init_grammar` over the bundled model's vocabulary).
  It drops what it does not understand, so "compiles" says nothing of what it enforces.
* llguidance (PyPI `llguidance`, its defaults): `LLMatcher.validate_grammar` of
  `grammar_from("json_schema", ...)` reports no error.

Each schema gets --timeout seconds per compiler (SIGALRM: a compiler stuck in native code is
only stopped when it returns). Writes --out (JSON) and prints a markdown table.

    .venv/bin/python bench/schema_coverage.py [--corpus ../shared/jsonschemabench] \\
        [--out bench/results/schema-coverage.json] [--only ours,llama.cpp,llguidance]

Dependencies: llama-cpp-python (the server's), llguidance==1.9.1 (`pip install llguidance`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import gzip
import json
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cria.grammar import SchemaError, json_schema_grammar  # noqa: E402
from cria.grammar.base import UnsupportedSchema  # noqa: E402

_QUIET: Any = None


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def fire(*_: Any) -> None:
        raise Timeout

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def load(corpus: Path) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for path in sorted(corpus.glob("*.jsonl.gz")):
        schemas = []
        with gzip.open(path, "rt") as lines:
            for line in lines:
                if line.strip():
                    schema = json.loads(line)["schema"]
                    schemas.append(json.loads(schema) if isinstance(schema, str) else schema)
        out[path.name.split(".")[0]] = schemas
    return out


def ours(schema: Any) -> str | None:
    """None when it compiles, else the refusal reason."""
    try:
        json_schema_grammar(schema)
    except UnsupportedSchema as exc:
        return exc.feature
    except SchemaError as exc:
        return f"invalid: {exc.message[:60]}"
    return None


def gbnf_worker() -> None:
    """Worker process: reads JSON-encoded GBNF texts, one a line, answers "ok" or "refused"
    for each (llama.cpp's parser can crash on some converter output: the parent restarts it)."""
    import llama_cpp

    from cria.models.spec import bundled_model_path

    llama_cpp.llama_backend_init()
    global _QUIET  # the callback must outlive this call
    _QUIET = llama_cpp.llama_log_callback(lambda *_: None)
    llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(bundled_model_path()).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    for line in sys.stdin:
        sampler = llama_cpp.llama_sampler_init_grammar(vocab, json.loads(line).encode(), b"root")
        if sampler:
            llama_cpp.llama_sampler_free(sampler)
        print("ok" if sampler else "refused", flush=True)


def llama_cpp_compiler() -> Callable[[Any], str | None]:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    worker: list[subprocess.Popen[str]] = []

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--gbnf-worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        worker[:] = [proc]
        return proc

    start()

    def compile_(schema: Any) -> str | None:
        try:
            gbnf = json_schema_to_gbnf(json.dumps(schema))
        except Exception as exc:  # the converter's own errors
            return f"converter: {type(exc).__name__}"
        proc = worker[0]
        try:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(gbnf) + "\n")
            proc.stdin.flush()
            answer = proc.stdout.readline().strip()
        except (BrokenPipeError, Timeout):
            answer = ""
        if not answer:  # crashed or stuck: a fresh worker for the next schema
            proc.kill()
            proc.wait()
            start()
            return "llama.cpp crashed or hung on the GBNF"
        return None if answer == "ok" else "llama.cpp refused the GBNF"

    return compile_


def llguidance_compiler() -> Callable[[Any], str | None]:
    import llguidance

    def compile_(schema: Any) -> str | None:
        try:
            grammar = llguidance.grammar_from("json_schema", json.dumps(schema))
            error = llguidance.LLMatcher.validate_grammar(grammar)
        except Exception as exc:
            return f"{type(exc).__name__}"
        return f"{error}"[:60] if error else None

    return compile_


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=ROOT.parent / "shared" / "jsonschemabench")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/schema-coverage.json")
    parser.add_argument("--only", default="ours,llama.cpp,llguidance")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--gbnf-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.gbnf_worker:
        gbnf_worker()
        return
    wanted = args.only.split(",")
    compilers: dict[str, Callable[[Any], str | None]] = {}
    if "ours" in wanted:
        compilers["ours"] = ours
    if "llama.cpp" in wanted:
        compilers["llama.cpp"] = llama_cpp_compiler()
    if "llguidance" in wanted:
        compilers["llguidance"] = llguidance_compiler()

    corpus = load(args.corpus)
    counts: dict[str, dict[str, int]] = {name: {} for name in compilers}
    reasons: dict[str, collections.Counter[str]] = {n: collections.Counter() for n in compilers}
    times: dict[str, list[float]] = {name: [] for name in compilers}
    for category, schemas in corpus.items():
        for name, compile_ in compilers.items():
            ok = 0
            for schema in schemas:
                start = time.perf_counter()
                try:
                    with time_limit(args.timeout):
                        reason = compile_(schema)
                except Timeout:
                    reason = "timeout"
                except RecursionError:
                    reason = "RecursionError"
                elapsed = time.perf_counter() - start
                if reason is None:
                    ok += 1
                    times[name].append(elapsed)
                else:
                    reasons[name][reason] += 1
            counts[name][category] = ok
        line = "  ".join(f"{n} {counts[n][category]}" for n in compilers)
        print(f"{category} ({len(schemas)}): {line}", file=sys.stderr, flush=True)

    total = sum(len(s) for s in corpus.values())
    result = {
        "corpus": str(args.corpus),
        "schemas": {c: len(s) for c, s in corpus.items()},
        "compiled": counts,
        "coverage": {
            name: {
                **{c: round(counts[name][c] / len(s), 4) for c, s in corpus.items()},
                "ALL": round(sum(counts[name].values()) / total, 4),
            }
            for name in compilers
        },
        "compile_seconds": {
            name: {
                "p50": percentile(t, 0.5),
                "p90": percentile(t, 0.9),
                "p99": percentile(t, 0.99),
                "max": max(t, default=0.0),
                "mean": statistics.fmean(t) if t else 0.0,
            }
            for name, t in times.items()
        },
        "refusals": {name: dict(r.most_common(40)) for name, r in reasons.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    names = list(compilers)
    print("| category | schemas | " + " | ".join(names) + " |")
    print("|---|---:|" + "---:|" * len(names))
    for category, schemas in [*corpus.items(), ("ALL", [None] * total)]:
        cells = [f"{100 * result['coverage'][n][category]:.1f}%" for n in names]
        print(f"| {category} | {len(schemas)} | " + " | ".join(cells) + " |")
    print()
    print("| compile time | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for q in ("p50", "p90", "p99", "max"):
        cells = [f"{1000 * result['compile_seconds'][n][q]:.1f} ms" for n in names]
        print(f"| {q} | " + " | ".join(cells) + " |")
    if "ours" in reasons:
        print("\nOur refusals (first reason per schema):")
        for reason, count in reasons["ours"].most_common(15):
            print(f"- {count} {reason}")


if __name__ == "__main__":
    main()
