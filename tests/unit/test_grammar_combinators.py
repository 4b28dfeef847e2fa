"""cria.grammar: anyOf / oneOf / allOf, $ref, not, if/then and other combinators.

Grammars are checked by llama.cpp's own grammar sampler, see `_grammar.Vocab`.
"""

from __future__ import annotations

from typing import Any

import pytest

from cria.grammar import (
    SchemaError,
    UnsupportedSchema,
    json_schema_grammar,
)

from ._grammar import Vocab, check
from ._grammar import lm as lm

# --- Combinators and references ---------------------------------------------------------------


def test_any_of_and_one_of(lm: Vocab) -> None:
    for key in ("anyOf", "oneOf"):
        schema = {key: [{"type": "string", "maxLength": 2}, {"type": "integer", "minimum": 0}]}
        check(lm, schema, ["ab", 3], ['"abc"', "-1", "true", "null"])


def test_keywords_beside_any_of_apply_to_every_branch(lm: Vocab) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "additionalProperties": False,
        "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
    }
    check(lm, schema, [{"a": 1}, {"b": 2}, {"a": 1, "b": 2}], ["{}", '{"c": 1}'])


def test_all_of_merges_objects(lm: Vocab) -> None:
    schema = {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "string"}, "a": {"minimum": 0}}, "required": ["b"]},
        ]
    }
    check(
        lm,
        schema,
        [{"a": 1, "b": "x"}, {"a": 0, "b": "x"}],
        ['{"a": -1, "b": "x"}', '{"a": 1}', '{"a": 0, "b": "x", "c": null}'],
    )
    closed = {
        "allOf": [
            {"properties": {"a": {}}, "additionalProperties": False},
            {"properties": {"b": {}}},
        ]
    }
    check(lm, closed, [{"a": 1}], ['{"b": 1}', '{"a": 1, "b": 1}'])
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({"allOf": [{"pattern": "^a"}, {"pattern": "b$"}]})
    assert exc.value.feature == "allOf: pattern"
    with pytest.raises(SchemaError, match="no type"):
        json_schema_grammar({"allOf": [{"type": "string"}, {"type": "integer"}]})


TREE = {
    "$defs": {
        "node": {
            "type": "object",
            "properties": {
                "value": {"type": "integer"},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
            },
            "required": ["value"],
            "additionalProperties": False,
        }
    },
    "$ref": "#/$defs/node",
}


def test_recursive_ref(lm: Vocab) -> None:
    deep = {
        "value": 1,
        "children": [{"value": 2}, {"value": 3, "children": [{"value": 4, "children": []}]}],
    }
    check(
        lm,
        TREE,
        [{"value": 1}, deep],
        [
            '{"value": 1, "children": [{"children": []}]}',
            '{"value": 1, "children": [{"value": "x"}]}',
        ],
    )
    root_recursive = {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"$ref": "#"}]}}
    check(lm, root_recursive, [[], [1, [2, [3, []]]]], ['[1, ["x"]]'])


def test_definitions_and_ref_siblings(lm: Vocab) -> None:
    schema = {
        "definitions": {"pos": {"type": "integer", "minimum": 1}},
        "type": "object",
        "properties": {
            "n": {"$ref": "#/definitions/pos", "description": "annotation only"},
            "small": {"$ref": "#/definitions/pos", "maximum": 3},
        },
    }
    check(lm, schema, [{"n": 5, "small": 3}], ['{"n": 0}', '{"small": 4}'])


@pytest.mark.parametrize(
    ("schema", "path", "feature"),
    [
        ({"$ref": "https://example.com/s.json"}, "", "remote $ref"),
        ({"$ref": "#anchor"}, "", "$ref to an $anchor"),
        ({"properties": {"a": {"not": {"minimum": 3}}}}, "properties.a", "not"),
        (
            {"type": "array", "items": {"type": "array", "contains": {"type": "integer"}}},
            "items",
            "contains",
        ),
        ({"allOf": [{"$ref": "#"}]}, "allOf.0", "recursive allOf"),
        ({"type": "number", "multipleOf": 0.3}, "", "multipleOf"),
        (
            {"type": "string", "format": "email", "maxLength": 6},
            "",
            "combined string constraints",
        ),
        ({"type": "string", "minLength": 2001}, "", "minLength above 2000"),
        (
            {"type": "object", "allOf": [{}], "unevaluatedProperties": False},
            "",
            "unevaluatedProperties",
        ),
    ],
)
def test_unsupported_features(schema: dict[str, Any], path: str, feature: str) -> None:
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar(schema)
    assert (exc.value.feature, exc.value.path) == (feature, path)
    assert str(exc.value)


def test_unevaluated_properties_without_applicators(lm: Vocab) -> None:
    schema = {"type": "object", "properties": {"a": {}}, "unevaluatedProperties": False}
    check(lm, schema, [{"a": 1}], ['{"b": 1}'])
    items = {"type": "array", "prefixItems": [{"type": "integer"}], "unevaluatedItems": False}
    check(lm, items, [[], [1]], ["[1, 2]"])


def test_declared_keys_with_special_characters(lm: Vocab) -> None:
    props = {'a"b': {"type": "integer"}, "é": {"type": "null"}}
    schema = {"type": "object", "properties": props, "additionalProperties": True}
    # Declared keys are written as their compact JSON (non-ASCII raw); extra keys use no escapes.
    good = [{'a"b': 1}, {"é": None}, {"x": "y"}, {"a": 1}, {"éé": 1}]
    bad = ['{"a\\"b": "1"}', '{"é": 1}', '{"\\u00e9": 1}', '{"x\\"": 1}']
    check(lm, schema, good, bad, escaped=False)


def test_ref_to_itself_only() -> None:
    with pytest.raises(SchemaError, match="itself"):
        json_schema_grammar({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        (False, ""),
        ({"type": "float"}, ""),
        ({"type": "object", "properties": {"a": {"type": ["string", "string"]}}}, "properties.a"),
        ({"type": "object", "required": "a"}, ""),
        ({"type": "object", "properties": []}, ""),
        (
            {
                "type": "array",
                "items": {"type": "array", "minItems": 3, "maxItems": 2},
                "minItems": 1,
            },
            "",
        ),
        ({"enum": []}, ""),
        ({"$ref": "#/$defs/missing"}, ""),
        ({"type": "object", "properties": {"x": {"$ref": "#/$defs/missing"}}}, "properties.x"),
        ({"type": "object", "required": ["b"], "additionalProperties": False}, ""),
        ({"type": "string", "minLength": -1}, ""),
        ({"type": "integer", "minimum": "0"}, ""),
        ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, ""),
        ([], ""),
    ],
)
def test_invalid_schemas(schema: Any, path: str) -> None:
    with pytest.raises(SchemaError) as exc:
        json_schema_grammar(schema)
    assert not isinstance(exc.value, UnsupportedSchema), exc.value
    assert exc.value.path == path


def test_annotations_are_ignored(lm: Vocab) -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.com/x",
        "$comment": "c",
        "title": "T",
        "description": "d",
        "default": 1,
        "examples": [1],
        "deprecated": False,
        "readOnly": True,
        "writeOnly": False,
        "strict": True,
        "type": "integer",
    }
    check(lm, schema, [1], ['"1"'])
