"""`$ref` under a nested `$id`: where it would mean another target than the one `_resolve`
finds in the whole document, the schema is refused (a grammar following the wrong target could
be looser than the schema)."""

from __future__ import annotations

from typing import Any

from cria.grammar.base import SchemaError, UnsupportedSchema, _at
from cria.grammar.schemas import _resolve

_SUBSCHEMA: tuple[str, ...] = (
    "items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
    "additionalItems", "unevaluatedItems", "unevaluatedProperties",
)  # fmt: skip
_SUBSCHEMA_MAPS: tuple[str, ...] = (
    "properties", "patternProperties", "$defs", "definitions", "dependentSchemas", "dependencies",
)  # fmt: skip
_SUBSCHEMA_LISTS: tuple[str, ...] = ("allOf", "anyOf", "oneOf", "prefixItems", "items")


def check_nested_ids(schema: Any, document: Any = None, resource: Any = None, path: str = "") -> None:
    """A `$ref` inside a subschema with its own `$id` resolves against that resource (a new
    base), while `_resolve` resolves against the whole document. Where the two targets differ,
    the grammar could follow the wrong one and be looser than the schema: refused. A pointer
    that finds nothing in the resource (schemas that give every definition an `$id` and still
    point at the root's definitions) keeps the document's reading, as other converters do."""
    if document is None:
        document = schema
    if not isinstance(schema, dict):
        return
    if schema is not document and isinstance(schema.get("$id"), str) and not schema["$id"].startswith("#"):
        resource = schema
    ref = schema.get("$ref")
    if resource is not None and isinstance(ref, str) and ref.startswith("#"):
        try:
            inner = _resolve(resource, ref, path)[0]
        except SchemaError:
            inner = None
        if inner is not None and inner is not _resolve(document, ref, path)[0]:
            raise UnsupportedSchema(
                "$id", "a $ref inside a subschema with its own $id (a new base URI)", path=path
            )
    for key in _SUBSCHEMA:
        if isinstance(schema.get(key), dict):
            check_nested_ids(schema[key], document, resource, _at(path, key))
    for key in _SUBSCHEMA_MAPS:
        if isinstance(schema.get(key), dict):
            for name, sub in schema[key].items():
                check_nested_ids(sub, document, resource, _at(path, key, name))
    for key in _SUBSCHEMA_LISTS:
        if isinstance(schema.get(key), list):
            for i, sub in enumerate(schema[key]):
                check_nested_ids(sub, document, resource, _at(path, key, i))
