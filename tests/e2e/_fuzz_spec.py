"""OpenAI's OpenAPI spec cut down for tests/e2e/test_fuzz.py: the operations Cria serves with
the component schemas they reference, in JSON Schema terms (see `load_spec`), and a view of it
restricted to what Cria honours (see `honoured_view`)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.tools.extract_openai_schemas import closure, convert, refs_in

SPEC_PATH = Path(__file__).resolve().parents[3] / "shared" / "openai" / "openapi.yaml"
# The operations Cria serves that OpenAI's spec has (spec paths are relative to /v1).
OPERATIONS = {
    "/models": "get",
    "/models/{model}": "get",
    "/completions": "post",
    "/chat/completions": "post",
    "/embeddings": "post",
}
REF = "#/components/schemas/"


def load_spec(path: Path) -> dict[str, Any]:
    """OpenAI's spec cut down to OPERATIONS and the component schemas they reference."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open(encoding="utf-8") as f:
        spec = yaml.load(f, Loader=loader)
    components = spec["components"]
    paths: dict[str, Any] = {}
    for path_name, method in OPERATIONS.items():
        operation = {k: v for k, v in spec["paths"][path_name][method].items() if k != "x-oaiMeta"}
        # Shared responses (429 TooManyRequests) inlined: only component schemas are kept.
        operation["responses"] = {
            status: components["responses"][r["$ref"].rsplit("/", 1)[1]] if "$ref" in r else r
            for status, r in operation["responses"].items()
        }
        paths[path_name] = {method: operation}
    names = closure(components["schemas"], refs_in(paths))
    schemas = {n: convert(components["schemas"][n], n) for n in names}
    composed = {
        ref[len(REF) :]
        for s in schemas.values()
        for part in _all_of_parts(s)
        for ref in [part.get("$ref", "")]
        if ref.startswith(REF)
    }
    for name, sub in schemas.items():
        _close_objects(sub, closed=name not in composed)
    return {
        "openapi": spec["openapi"],
        "info": spec["info"],
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _all_of_parts(schema: Any) -> Iterator[dict[str, Any]]:
    """Every schema that is a member of an allOf, anywhere inside `schema`."""
    if isinstance(schema, dict):
        for key, value in schema.items():
            if key == "allOf" and isinstance(value, list):
                yield from (v for v in value if isinstance(v, dict))
            if key not in ("enum", "const", "default", "example", "examples"):
                yield from _all_of_parts(value)
    elif isinstance(schema, list):
        for item in schema:
            yield from _all_of_parts(item)


def _close_objects(schema: Any, *, closed: bool = True) -> None:
    """Give every object schema with `properties` and no `additionalProperties`
    `additionalProperties: false`, so that valid cases hold only declared fields (OpenAI refuses
    unknown ones, as Cria's strict mode does): a case spent on a random extra key meets a 400
    and reaches nothing deeper. Members of an allOf stay open (closing each would forbid the
    others' fields), and so does a schema used as one (`closed=False`)."""
    if isinstance(schema, list):
        for item in schema:
            _close_objects(item)
        return
    if not isinstance(schema, dict):
        return
    if closed and "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    for key, value in schema.items():
        if key == "allOf" and isinstance(value, list):
            for part in value:
                _close_objects(part, closed=False)
        elif key in ("properties", "patternProperties", "$defs"):
            for sub in value.values():
                _close_objects(sub)
        elif key in ("items", "prefixItems", "anyOf", "oneOf", "additionalProperties", "not"):
            _close_objects(value)


def required_fields(spec: dict[str, Any], path: str) -> set[str]:
    """The required top-level fields of an operation's JSON body (allOf and $ref followed)."""
    schemas = spec["components"]["schemas"]

    def walk(schema: dict[str, Any]) -> set[str]:
        if "$ref" in schema:
            return walk(schemas[schema["$ref"][len(REF) :]])
        found = set(schema.get("required", []))
        for part in schema.get("allOf", []):
            found |= walk(part)
        return found

    return walk(spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])


# ---- the view of the spec restricted to what Cria honours ----

# Variants (of a oneOf/anyOf, wherever they are referenced) that Cria refuses by design: the
# deprecated function role, content parts a text-only model cannot read, custom tools.
REFUSED_VARIANTS = {
    "ChatCompletionRequestFunctionMessage",
    "ChatCompletionRequestMessageContentPartImage",
    "ChatCompletionRequestMessageContentPartAudio",
    "ChatCompletionRequestMessageContentPartFile",
    "ChatCompletionMessageCustomToolCall",
    "CustomToolChatCompletions",
    "ChatCompletionAllowedToolsChoice",
    "ChatCompletionNamedToolChoiceCustom",
}
# Nested fields Cria refuses (strict mode) or honours only when absent or false.
REFUSED_PROPERTIES = {
    "ChatCompletionRequestMessageContentPartText": {"prompt_cache_breakpoint"},
    "ChatCompletionRequestAssistantMessage": {"audio", "function_call"},
    "ChatCompletionStreamOptions": {"include_obfuscation"},
}
# What OpenAI documents in words only ("Must be a-z, A-Z, 0-9, or contain underscores and
# dashes, with a maximum length of 64"), made a pattern: names of functions and json_schemas.
NAME_PATTERN = "^[a-zA-Z0-9_-]{1,64}$"


def _drop_refused(schema: Any) -> None:
    """Remove REFUSED_VARIANTS from every oneOf/anyOf inside `schema`, in place."""
    if isinstance(schema, list):
        for item in schema:
            _drop_refused(item)
    elif isinstance(schema, dict):
        for key in ("oneOf", "anyOf"):
            if isinstance(schema.get(key), list):
                kept = [
                    v
                    for v in schema[key]
                    if not (
                        isinstance(v, dict) and v.get("$ref", "")[len(REF) :] in REFUSED_VARIANTS
                    )
                ]
                assert kept, schema
                schema[key] = kept
        for key, value in schema.items():
            if key not in ("enum", "const", "default", "example", "examples"):
                _drop_refused(value)


def _object_parts(schema: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A schema and the members of its anyOf/oneOf (a nullable object is anyOf [object, null])."""
    yield schema
    for key in ("anyOf", "oneOf"):
        for part in schema.get(key, []):
            yield from _object_parts(part)


def merged_properties(spec: dict[str, Any], path: str) -> dict[str, Any]:
    """An operation's top-level body fields, name -> schema, with allOf and $ref merged."""
    schemas = spec["components"]["schemas"]
    fields: dict[str, Any] = {}

    def collect(schema: dict[str, Any]) -> None:
        if "$ref" in schema:
            collect(schemas[schema["$ref"][len(REF) :]])
        for part in schema.get("allOf", []):
            collect(part)
        for name, sub in schema.get("properties", {}).items():
            fields[name] = {"allOf": [fields[name], sub]} if name in fields else sub

    collect(spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])
    return fields


def honoured_view(spec: dict[str, Any], honoured: dict[str, set[str]]) -> dict[str, Any]:
    """The POST operations of `spec` named in `honoured`, each body holding only the top-level
    fields given there (as one closed object), and inside them none of what Cria refuses by
    design (REFUSED_VARIANTS, REFUSED_PROPERTIES): what is valid here Cria should serve, so
    generated cases reach sampling, streaming, logprobs, tools and structured output instead of
    strict mode's 400."""
    view = copy.deepcopy(spec)
    schemas = view["components"]["schemas"]
    for name, fields in REFUSED_PROPERTIES.items():
        for part in _object_parts(schemas[name]):
            for field in fields & set(part.get("properties", {})):
                del part["properties"][field]
                part["required"] = [r for r in part.get("required", []) if r != field]
    for name in ("ResponseFormatJsonSchema", "FunctionObject"):
        for part in _object_parts(schemas[name]):
            inner = part.get("properties", {}).get("json_schema", part)
            if "name" in inner.get("properties", {}):
                inner["properties"]["name"] = {
                    **inner["properties"]["name"],
                    "pattern": NAME_PATTERN,
                }
    paths: dict[str, Any] = {}
    for path, fields in honoured.items():
        operation = copy.deepcopy(view["paths"][path]["post"])
        body = {
            "type": "object",
            "properties": {k: v for k, v in merged_properties(view, path).items() if k in fields},
            "required": sorted(required_fields(view, path)),
            "additionalProperties": False,
        }
        operation["requestBody"]["content"]["application/json"]["schema"] = body
        paths[path] = {"post": operation}
    view["paths"] = paths
    _drop_refused(view)
    return view
