"""Extract the OpenAI component schemas the tests need from OpenAI's official OpenAPI spec.

Run once by hand, from the repository root, whenever the spec is updated:

    .venv/bin/python tests/tools/extract_openai_schemas.py [SPEC] [OUT]

SPEC defaults to ../shared/openai/openapi.yaml (OpenAI's openapi.yaml, ~3 MB), OUT to
tests/data/openai_schemas.json. The output is {"source": ..., "derived": ..., "components":
{"schemas": {...}}}: the ROOTS below and every component they reference, transitively, and nothing
else. References keep their spec form, "#/components/schemas/X", and resolve inside the output
file, so tests/openai_schema.py loads it as one JSON Schema (Draft 2020-12) resource.

The spec says "openapi: 3.1.0" but is written half in OpenAPI 3.0 style. What is done about that:

* `nullable: true` (3.0 only; JSON Schema ignores it, so null would be rejected) becomes JSON
  Schema: `type: T` -> `type: [T, "null"]` (and `null` is added to an `enum`, which would
  otherwise still reject it); anything else ($ref, anyOf, allOf, no type) is wrapped as
  `anyOf: [<schema>, {type: "null"}]`, with its annotations (description, default...) kept
  outside. `nullable: false` is dropped.
* `discriminator`, `x-stainless-const`, `x-oaiTypeLabel`, `x-oaiExpandable`, `example`,
  `deprecated`, `format: unixtime`... are kept: Draft 2020-12 ignores unknown keywords and does
  not assert `format`, so they are harmless documentation. `x-oaiMeta` (doc-site examples) is
  dropped to keep the file small.
* `$ref` with sibling keywords is valid in 2020-12 (both apply), so it is left alone.
* The script refuses what it does not translate: 3.0 boolean exclusiveMinimum/Maximum, `$id`,
  references outside #/components/schemas/; and it checks every output schema against the
  Draft 2020-12 meta-schema.

One schema is derived, not copied, and listed under "derived": CreateCompletionStreamResponse.
The spec gives /v1/completions a single response schema, CreateCompletionResponse, used for the
streamed chunks too, but there `choices[].finish_reason` is a required non-null enum, while a
stream (OpenAI's included) sends `finish_reason: null` on every chunk but a choice's last. The
derived copy differs only in allowing that null.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

ROOTS = [
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "CreateCompletionResponse",
    "CreateEmbeddingResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    "CreateChatCompletionRequest",
    "CreateCompletionRequest",
]
REF_PREFIX = "#/components/schemas/"
DROPPED_KEYS = {"x-oaiMeta"}
# Keywords whose value is a map of name -> schema.
SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
# Keywords whose value is a schema or a list of schemas.
SCHEMA_VALUES = {
    "items", "prefixItems", "additionalProperties", "unevaluatedProperties", "unevaluatedItems",
    "propertyNames", "contains", "not", "if", "then", "else", "allOf", "anyOf", "oneOf",
}  # fmt: skip
# Keywords that stay on the outside when a nullable schema is wrapped in anyOf.
ANNOTATIONS = {
    "description",
    "title",
    "default",
    "deprecated",
    "example",
    "examples",
    "x-oaiTypeLabel",
}

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SPEC = REPO.parent / "shared" / "openai" / "openapi.yaml"
DEFAULT_OUT = REPO / "tests" / "data" / "openai_schemas.json"


def refs_in(schema: Any) -> list[str]:
    """Names of the components a schema references."""
    found: list[str] = []
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "$ref":
                if not (isinstance(value, str) and value.startswith(REF_PREFIX)):
                    raise SystemExit(f"unsupported $ref {value!r}")
                found.append(value[len(REF_PREFIX) :])
            elif key not in ("example", "examples", "default", "enum", "const"):
                found.extend(refs_in(value))
    elif isinstance(schema, list):
        for item in schema:
            found.extend(refs_in(item))
    return found


def closure(schemas: dict[str, Any], roots: list[str]) -> list[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        if name not in schemas:
            raise SystemExit(f"schema {name!r} is not in the spec")
        seen.add(name)
        stack.extend(refs_in(schemas[name]))
    return sorted(seen)


def convert(schema: Any, where: str) -> Any:
    """A copy of one schema with OpenAPI 3.0 `nullable` turned into JSON Schema, recursively."""
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise SystemExit(f"{where}: a schema must be an object, not {schema!r}")
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in DROPPED_KEYS:
            continue
        if key in ("$id", "$anchor", "$dynamicAnchor") or (
            key in ("exclusiveMinimum", "exclusiveMaximum") and isinstance(value, bool)
        ):
            raise SystemExit(f"{where}: {key}={value!r} is not translated")
        if key in SCHEMA_MAPS:
            out[key] = {name: convert(sub, f"{where}/{key}/{name}") for name, sub in value.items()}
        elif key in SCHEMA_VALUES:
            if isinstance(value, list):
                out[key] = [convert(sub, f"{where}/{key}/{i}") for i, sub in enumerate(value)]
            else:
                out[key] = convert(value, f"{where}/{key}")
        else:
            out[key] = copy.deepcopy(value)
    nullable = out.pop("nullable", False)
    if nullable is not True:
        return out
    if isinstance(out.get("type"), str) and not ({"$ref", "anyOf", "oneOf", "allOf"} & out.keys()):
        out["type"] = [out["type"], "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        if "const" in out:
            out["enum"] = [out.pop("const"), None]
        return out
    outer = {k: v for k, v in out.items() if k in ANNOTATIONS}
    inner = {k: v for k, v in out.items() if k not in ANNOTATIONS}
    return {**outer, "anyOf": [inner, {"type": "null"}]}


def derived(schemas: dict[str, Any]) -> dict[str, Any]:
    stream = copy.deepcopy(schemas["CreateCompletionResponse"])
    finish = stream["properties"]["choices"]["items"]["properties"]["finish_reason"]
    assert finish["type"] == "string", finish
    finish["type"] = ["string", "null"]
    finish["enum"] = [*finish["enum"], None]
    stream["description"] = (
        "NOT IN THE SPEC: CreateCompletionResponse with choices[].finish_reason nullable, as "
        "streamed chunks send it (see tests/tools/extract_openai_schemas.py)."
    )
    return {"CreateCompletionStreamResponse": stream}


def main(argv: list[str]) -> None:
    spec_path = Path(argv[1]) if len(argv) > 1 else DEFAULT_SPEC
    out_path = Path(argv[2]) if len(argv) > 2 else DEFAULT_OUT
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with spec_path.open(encoding="utf-8") as f:
        spec = yaml.load(f, Loader=loader)  # a safe loader (CSafeLoader if built)
    all_schemas = spec["components"]["schemas"]
    names = closure(all_schemas, ROOTS)
    schemas = {name: convert(all_schemas[name], name) for name in names}
    extra = derived(schemas)
    schemas.update(extra)
    for schema in schemas.values():
        Draft202012Validator.check_schema(schema)
    doc = {
        "source": (
            f"{spec['info']['title']} {spec['info']['version']} (OpenAPI {spec['openapi']}), "
            f"{spec_path.name}: components {', '.join(ROOTS)} and their transitive references; "
            "converted by tests/tools/extract_openai_schemas.py"
        ),
        "derived": sorted(extra),
        "components": {"schemas": dict(sorted(schemas.items()))},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(schemas)} schemas ({len(names)} from the spec) to {out_path}")


if __name__ == "__main__":
    main(sys.argv)
