"""Validate bodies against OpenAI's official schemas (tests/data/openai_schemas.json).

    from tests.openai_schema import validate, request_fields

    validate("CreateChatCompletionResponse", body)   # AssertionError listing every violation
    validate_each("CreateChatCompletionStreamResponse", chunks)
    request_fields("CreateChatCompletionRequest")    # {"messages", "model", "temperature", ...}

The JSON file is extracted from OpenAI's openapi.yaml by tests/tools/extract_openai_schemas.py.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMAS_PATH = Path(__file__).parent / "data" / "openai_schemas.json"
BASE_URI = "urn:openai-schemas"
REF_PREFIX = "#/components/schemas/"


@cache
def _document() -> dict[str, Any]:
    doc = json.loads(SCHEMAS_PATH.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def schemas() -> dict[str, Any]:
    """Every extracted component schema, by name."""
    found = _document()["components"]["schemas"]
    assert isinstance(found, dict)
    return found


@cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = DRAFT202012.create_resource(_document())
    registry: Registry[Any] = Registry().with_resource(BASE_URI, resource)
    return registry


@cache
def validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in schemas():
        raise KeyError(f"no schema {schema_name!r} in {SCHEMAS_PATH.name}")
    return Draft202012Validator(
        {"$ref": f"{BASE_URI}{REF_PREFIX}{schema_name}"}, registry=_registry()
    )


def _describe(error: ValidationError, indent: str = "  ") -> list[str]:
    rule = "/".join(str(p) for p in error.relative_schema_path)
    lines = [f"{indent}{error.json_path}: {error.message}  [schema: {rule}]"]
    # anyOf/oneOf: say why each alternative failed, one level down.
    for sub in sorted(error.context or [], key=lambda e: list(e.relative_schema_path)):
        sub_rule = "/".join(str(p) for p in sub.relative_schema_path)
        lines.append(f"{indent}    - {sub.json_path}: {sub.message}  [alternative: {sub_rule}]")
    return lines


def violations(schema_name: str, body: Any) -> list[str]:
    """Every violation of the named schema by body, as "path: message" lines (empty: valid)."""
    errors = sorted(
        validator(schema_name).iter_errors(body),
        key=lambda e: (list(map(str, e.absolute_path)), e.message),
    )
    lines: list[str] = []
    for error in errors:
        lines.extend(_describe(error))
    return lines


def validate(schema_name: str, body: Any) -> None:
    """Raise AssertionError listing every violation of OpenAI's schema `schema_name` by body."""
    found = violations(schema_name, body)
    if found:
        shown = json.dumps(body, ensure_ascii=False)
        if len(shown) > 2000:
            shown = shown[:2000] + "..."
        raise AssertionError(
            f"body does not match OpenAI's {schema_name} ({len(found)} violation(s)):\n"
            + "\n".join(found)
            + f"\nbody: {shown}"
        )


def validate_each(schema_name: str, bodies: list[Any]) -> None:
    """validate() for a list of bodies (a stream's chunks): one AssertionError for them all."""
    found: list[str] = []
    for i, body in enumerate(bodies):
        errors = violations(schema_name, body)
        if errors:
            found.append(f"  body {i}: {json.dumps(body, ensure_ascii=False)[:600]}")
            found.extend("  " + line for line in errors)
    if found:
        raise AssertionError(
            f"{len(bodies)} bodies checked against OpenAI's {schema_name}:\n" + "\n".join(found)
        )


def request_field_schemas(schema_name: str) -> dict[str, Any]:
    """The top-level properties of a request schema, name -> schema, with allOf and $ref merged
    (the spec composes CreateChatCompletionRequest from CreateModelResponseProperties, ...)."""
    fields: dict[str, Any] = {}

    def collect(schema: dict[str, Any]) -> None:
        if "$ref" in schema:
            ref = schema["$ref"]
            assert ref.startswith(REF_PREFIX), ref
            collect(schemas()[ref[len(REF_PREFIX) :]])
        for part in schema.get("allOf", []):
            collect(part)
        for name, sub in schema.get("properties", {}).items():
            # A field several allOf members define must match each definition.
            fields[name] = {"allOf": [fields[name], sub]} if name in fields else sub

    collect(schemas()[schema_name])
    return fields


def request_fields(schema_name: str) -> set[str]:
    """The top-level property names of a request schema (allOf and $ref merged)."""
    return set(request_field_schemas(schema_name))
