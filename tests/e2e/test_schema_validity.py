"""Real-world schemas on the real server: a fixed sample of JSONSchemaBench (every category;
tests/e2e/data/jsonschemabench_sample.json, drawn by bench/schema_validity.py) sent as
`response_format: json_schema` at temperature 1. A schema the compiler takes must be served,
and every output that ends by itself must validate against it (the draft its `$schema` names);
a schema the compiler refuses must be a 400 `unsupported_schema` naming what it refuses. The
full run (hundreds of schemas, several seeds) is bench/schema_validity.py."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from jsonschema import validators

from cria.grammar import SchemaError, UnsupportedSchema, json_schema_grammar
from tests.e2e.conftest import MODEL_ID, Server

SAMPLE = json.loads((Path(__file__).parent / "data" / "jsonschemabench_sample.json").read_text())["schemas"]
SEEDS = (1, 2)


def _compiles(schema: Any) -> bool:
    """True: the compiler takes it; False: it refuses it (a feature it cannot enforce, or a
    schema it finds invalid or unsatisfiable), which the server must answer with a 400."""
    try:
        json_schema_grammar(schema)
    except (UnsupportedSchema, SchemaError):
        return False
    return True


def _refusal_code(schema: Any) -> str:
    try:
        json_schema_grammar(schema)
    except UnsupportedSchema:
        return "unsupported_schema"
    except SchemaError:
        return "invalid_schema"
    raise AssertionError("compiles")


def _ask(http: httpx.Client, schema: Any, seed: int) -> httpx.Response:
    text = json.dumps(schema, separators=(",", ":"))[:1200]
    body = {
        "model": MODEL_ID,
        "messages": [
            {"role": "system", "content": "You answer with JSON only."},
            {"role": "user", "content": f"Write a JSON document that matches this JSON Schema.\n\n{text}"},
        ],
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        "temperature": 1.0,
        "seed": seed,
        "max_tokens": 200,
    }
    return http.post("/v1/chat/completions", json=body, timeout=300)


def test_sample_covers_every_category() -> None:
    categories = {item["id"].split("/")[0] for item in SAMPLE}
    assert len(categories) == 10
    assert sum(_compiles(item["schema"]) for item in SAMPLE) >= len(SAMPLE) * 3 // 4


def test_real_schemas_are_served_and_outputs_validate(server: Server) -> None:
    jobs = [(item, seed) for item in SAMPLE for seed in SEEDS]
    with httpx.Client(base_url=server.base_url) as http, ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: _ask(http, job[0]["schema"], job[1]), jobs))
    stopped = 0
    for (item, seed), r in zip(jobs, responses):
        where = f"{item['id']} seed {seed}"
        if not _compiles(item["schema"]):
            assert r.status_code == 400, f"{where}: {r.text}"
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error" and error["param"], where
            if _refusal_code(item["schema"]) == "unsupported_schema":
                assert error["code"] == "unsupported_schema", where
            continue
        assert r.status_code == 200, f"{where}: {r.text}"
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length"), where
        if choice["finish_reason"] != "stop":
            continue
        stopped += 1
        instance = json.loads(choice["message"]["content"])
        cls = validators.validator_for(item["schema"], default=jsonschema.Draft202012Validator)
        error = jsonschema.exceptions.best_match(cls(item["schema"]).iter_errors(instance))
        assert error is None, f"{where}: {error.message if error else ''}\n{choice['message']['content']}"
    if stopped < len(jobs) // 4:
        pytest.fail(f"only {stopped} of {len(jobs)} outputs ended by themselves: nothing much was checked")
