"""cria.grammar: Types, objects, enum / const and arrays.

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

from ._grammar import PERSON, Vocab, check
from ._grammar import lm as lm

# --- Types ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        (
            {"type": "string"},
            ["", "héllo", 'q"uote\\', "\n\t\u263a", "😀"],
            ["1", "'x'", '"a'],
        ),
        (
            {"type": "integer"},
            [0, -7, 123456789],
            ["1.5", "01", "+1", "1e3", '"1"', "12345678901234567"],
        ),
        ({"type": "number"}, [0, -7, 1.5, -0.25, 1e-7, 6.02e23], ["1.", ".5", "01", "NaN", "true"]),
        ({"type": "boolean"}, [True, False], ["1", "True", "null"]),
        ({"type": "null"}, [None], ["0", '"null"', "nul"]),
        ({"type": ["string", "null"]}, ["x", None], ["1", "true"]),
        ({"type": ["integer", "number"]}, [1, 1.5], ['"1"']),
        (True, [1, "x", None, [1, {"a": []}], {"k": {"n": [True]}}], ["", "nope", "[1,]"]),
        ({}, [{"a": 1}, [], 3.5], ["{", "'a'"]),
        ({"title": "T", "description": "d", "x-vendor": 1}, [1, "a"], ["x"]),
    ],
)
def test_types(lm: Vocab, schema: Any, good: list[Any], bad: list[str]) -> None:
    check(lm, schema, good, bad)


def test_string_escapes_and_unicode_are_single_characters(lm: Vocab) -> None:
    # One grammar character is one code point: an escape, a raw character, a surrogate pair.
    grammar = json_schema_grammar({"type": "string", "minLength": 2, "maxLength": 3})
    for text in [
        '"ab"',
        '"abc"',
        '"\\n\\"x"',
        '"é😀"',
        '"\\u00e9a"',
        '"a\\/"',
        '"\\ud83d\\ude00a"',
    ]:
        assert lm.accepts(grammar, text), text
    for text in ['"a"', '"abcd"', '"😀"', '"\\n"', '"\\ud83d\\ude00"', '"a\\x"', '"a\tb"']:
        assert not lm.accepts(grammar, text), text
    any_string = json_schema_grammar({"type": "string"})
    assert lm.accepts(any_string, '"\\ud83d\\ude00"')
    assert not lm.accepts(any_string, '"\\ud83dab"')  # half a surrogate pair
    assert not lm.accepts(any_string, '"\\ude00"')


def test_whitespace_is_bounded(lm: Vocab) -> None:
    grammar = json_schema_grammar({"type": "object", "properties": {"a": {"type": "array"}}})
    assert lm.accepts(grammar, '{\n  "a" : [\n    1 ,\n\t2\n  ]\n}')
    assert lm.accepts(grammar, "{" + "\n" + " " * 20 + '"a": []}')
    assert not lm.accepts(grammar, "{" + " " * 30 + '"a": []}')
    assert not lm.accepts(grammar, "{" + "\n" + " " * 21 + '"a": []}')
    assert not lm.accepts(grammar, '{\n\n"a": []}')
    assert not lm.accepts(grammar, ' {"a": []}')  # nothing around the root value
    assert not lm.accepts(grammar, '{"a": []}\n')


# --- Objects ----------------------------------------------------------------------------------


def test_object_required_optional_and_no_extras(lm: Vocab) -> None:
    check(
        lm,
        PERSON,
        good=[
            {"name": "a", "tags": []},
            {"name": "a", "age": 3, "tags": ["x"]},
            {"name": "a", "age": 3, "email": "e", "tags": ["x", "y"]},
            {"name": "a", "email": "e", "tags": []},
        ],
        bad=[
            '{"name": "a"}',  # missing a required key
            '{"tags": []}',
            '{"name": "a", "tags": [], "other": 1}',  # extra key
            '{"name": "a", "age": "3", "tags": []}',  # wrong type
            '{"name": "a", "name": "b", "tags": []}',  # repeated key
            "{}",
        ],
    )


def test_optional_properties_only(lm: Vocab) -> None:
    schema = {
        "type": "object",
        "properties": {k: {"type": "integer"} for k in "abc"},
        "additionalProperties": False,
    }
    good: list[Any] = [{}, {"a": 1}, {"b": 1}, {"c": 1}, {"a": 1, "c": 2}, {"a": 1, "b": 2, "c": 3}]
    check(lm, schema, good, bad=['{"d": 1}', '{"a": 1,}', '{,"a": 1}', '{"a": 1 "b": 2}'])


def test_extra_keys_only_when_additional_properties_allows_them(lm: Vocab) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    check(lm, schema, good=[{"a": 1}], bad=['{"a": 1, "b": "x"}'])  # absent: closed
    check(
        lm,
        {**schema, "additionalProperties": True},
        good=[{"a": 1}, {"a": 1, "b": "x"}, {"a": 1, "ab": [1], "": None, "aa": {}}],
        bad=[
            '{"a": 1, "a": "x"}',  # an extra key cannot repeat a declared one
            '{"b": 1}',
        ],
    )
    typed = {**schema, "additionalProperties": {"type": "integer"}}
    check(lm, typed, good=[{"a": 1, "b": 2, "c": 3}], bad=['{"a": 1, "b": "x"}'])
    only_extras = {"type": "object", "additionalProperties": {"type": "boolean"}}
    check(lm, only_extras, good=[{}, {"x": True, "y": False}], bad=['{"x": 1}'])


def test_object_without_properties_is_any_object(lm: Vocab) -> None:
    check(lm, {"type": "object"}, [{}, {"a": [1, {"b": None}]}], ["[]", '"x"', "1"])
    check(lm, {"type": "object", "additionalProperties": False}, [{}], ['{"a": 1}'])


def test_required_key_not_in_properties(lm: Vocab) -> None:
    schema = {"type": "object", "required": ["id"], "additionalProperties": {"type": "integer"}}
    check(lm, schema, good=[{"id": 1}, {"id": 1, "x": 2}], bad=["{}", '{"id": "1"}'])


def test_false_property_schema_forbids_the_key(lm: Vocab) -> None:
    schema = {"type": "object", "properties": {"a": False, "b": {"type": "integer"}}}
    check(lm, schema, good=[{"b": 1}, {}], bad=['{"a": 1}', '{"b": 1, "a": 1}', '{"c": 2}'])


def test_min_max_properties_are_met_by_construction(lm: Vocab) -> None:
    schema = {**PERSON, "minProperties": 2, "maxProperties": 4}
    check(lm, schema, good=[{"name": "a", "tags": []}], bad=[])
    # minProperties: the first optional properties become required (stricter)
    more = {"name": "a", "age": 1, "tags": []}
    check(lm, {**PERSON, "minProperties": 3}, [more], ['{"name": "a", "tags": []}'])
    # maxProperties: only the first optional properties may be written
    four = '{"name": "a", "age": 1, "email": "e", "tags": []}'
    check(
        lm,
        {**PERSON, "maxProperties": 3},
        [more],
        [four, '{"name": "a", "email": "e", "tags": []}'],
    )
    bounded = {"type": "object", "maxProperties": 2}  # extra keys up to the bound
    check(lm, bounded, [{}, {"a": 1}, {"a": 1, "b": [2]}], ['{"a": 1, "b": 2, "c": 3}'])
    with pytest.raises(UnsupportedSchema) as exc:  # two extra keys could be one repeated
        json_schema_grammar({"type": "object", "minProperties": 2})
    assert exc.value.feature == "minProperties"


# --- enum / const -----------------------------------------------------------------------------


def test_enum_and_const(lm: Vocab) -> None:
    check(lm, {"enum": ["red", "green"]}, ["red", "green"], ['"blue"', '"Red"', "1"])
    mixed = {"enum": [1, None, "x", True, {"a": [1, 2]}, [1.5]]}
    check(lm, mixed, [1, None, "x", True], ["2", "false", '{"a":[1]}'])
    assert lm.accepts(json_schema_grammar(mixed), '{"a":[1,2]}')
    check(lm, {"const": "fixed"}, ["fixed"], ['"other"'])
    check(lm, {"const": {"k": "é\n"}}, [], ['{"k":"e"}'])
    assert lm.accepts(json_schema_grammar({"const": {"k": "é\n"}}), '{"k":"é\\n"}')


def test_enum_keeps_only_values_valid_against_the_rest(lm: Vocab) -> None:
    schema = {"type": "string", "enum": ["a", 1, "bbb", None], "maxLength": 2}
    check(lm, schema, ["a"], ['"bbb"', "1", "null"])
    with pytest.raises(SchemaError, match="no enum"):
        json_schema_grammar({"type": "integer", "enum": ["a"]})


# --- Arrays -----------------------------------------------------------------------------------


def test_array_items_and_bounds(lm: Vocab) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}
    check(lm, schema, [[1], [1, 2], [1, 2, 3]], ["[]", "[1,2,3,4]", '["a"]', "[1,]", "[,1]"])
    check(lm, {"type": "array", "items": {"type": "string"}}, [[], ["a", "b"]], ["[1]"])
    check(lm, {"type": "array", "minItems": 2, "maxItems": 2}, [[1, "x"]], ["[1]", "[1,2,3]"])
    check(lm, {"type": "array", "maxItems": 0}, [[]], ["[1]"])


def test_prefix_items_tuples(lm: Vocab) -> None:
    pair = {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}]}
    check(lm, pair, [[], [1], [1, "a"], [1, "a", None, 2]], ['["a"]', "[1, 2]"])
    closed = {**pair, "items": False, "minItems": 2}
    check(lm, closed, [[1, "a"]], ["[1]", '[1, "a", 3]'])
    extra = {**pair, "items": {"type": "boolean"}, "maxItems": 3}
    check(lm, extra, [[1, "a", True]], ['[1, "a", 1]', '[1, "a", true, false]'])


def test_unique_items(lm: Vocab) -> None:
    # Items of no finite domain: at most one item (stricter), or refused when minItems > 1.
    check(lm, {"type": "array", "uniqueItems": True}, [[], [1]], ["[1,1]", "[1,2]"])
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({"type": "array", "uniqueItems": True, "minItems": 2})
    assert exc.value.feature == "uniqueItems"
    check(lm, {"type": "array", "uniqueItems": False}, [[1, 1]], [])
    check(lm, {"type": "array", "uniqueItems": True, "maxItems": 1}, [[], [1]], ["[1,1]"])
