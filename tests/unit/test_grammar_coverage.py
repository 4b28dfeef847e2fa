"""cria.grammar: the rules that let real-world schemas compile, each stricter than its schema
(never looser), and a property test: what a grammar writes validates against its schema.

Grammars are checked by llama.cpp's own grammar sampler, see `_grammar.Vocab`.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped, unused-ignore]
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cria.grammar import SchemaError, UnsupportedSchema, json_schema_grammar

from ._grammar import Vocab, check
from ._grammar import lm as lm

SAMPLE = Path(__file__).parents[1] / "e2e" / "data" / "jsonschemabench_sample.json"


def validator(schema: Any) -> Any:
    cls = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


# --- Counts, lengths and bounds ---------------------------------------------------------------


def test_upper_counts_above_2000_are_lowered(lm: Vocab) -> None:
    grammar = json_schema_grammar({"type": "string", "pattern": "^a{0,5000}$"})
    assert lm.accepts(grammar, '"' + "a" * 2000 + '"')
    assert not lm.accepts(grammar, '"' + "a" * 2001 + '"')
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({"type": "string", "pattern": "^a{2001,}$"})
    assert exc.value.feature == "pattern: quantifier above 2000"


@pytest.mark.parametrize(
    ("schema", "good", "bad"),
    [
        (
            {"pattern": "^[0-9a-z-]*$", "minLength": 2, "maxLength": 4},
            ["ab", "a-1z"],
            ['"a"', '"abcde"', '"AB"'],
        ),
        ({"pattern": "[A-Z]{3}", "minLength": 3, "maxLength": 3}, ["ABC"], ['"ABCD"', '"xAB"']),
        (
            {"pattern": "^(?:\\S+\\s+){0,3}\\S+$", "maxLength": 12},
            ["one", "a b c d"],
            ['"' + "x" * 13 + '"', '"a  "'],
        ),
        (
            {"pattern": "^(ab|cde)+$", "minLength": 5, "maxLength": 6},
            ["ababab"],
            ['"ab"'],
        ),  # stricter: "abcde" is left out
        ({"format": "date", "minLength": 1, "maxLength": 10}, ["2024-02-29"], ['"2023-02-29"']),
        ({"format": "email", "maxLength": 1024}, ["a@b.io"], ['"a"']),
    ],
)
def test_lengths_beside_a_pattern_or_format(
    lm: Vocab, schema: dict[str, Any], good: list[str], bad: list[str]
) -> None:
    schema = {"type": "string", **schema}
    check(lm, schema, good, bad, escaped=False)
    for value in good:
        validator(schema).validate(value)


def test_non_integer_number_bounds_are_rounded_inward(lm: Vocab) -> None:
    schema = {"type": "number", "minimum": 0.5, "exclusiveMaximum": 2.5}
    check(lm, schema, [1, 2, 1.5, 2.0], ["0", "0.7", "2.5", "3"])  # 0.7 is valid: stricter


# --- Unsatisfiable parts are left out --------------------------------------------------------


def test_optional_parts_no_value_matches_are_left_out(lm: Vocab) -> None:
    never = {"type": "object", "enum": ["x"]}  # an enum of strings, typed object
    schema = {"type": "object", "properties": {"a": never, "b": {"type": "integer"}}}
    check(lm, schema, [{}, {"b": 1}], ['{"a": "x"}', '{"a": {}}'])
    with pytest.raises(SchemaError, match="no enum/const value"):
        json_schema_grammar({**schema, "required": ["a"]})
    union = {"anyOf": [{"type": "integer", "minimum": 5, "maximum": 1}, {"type": "boolean"}]}
    check(lm, union, [True], ["3"])
    items = {"type": "array", "items": never}
    check(lm, items, [[]], ['["x"]'])


# --- Objects ----------------------------------------------------------------------------------


def test_min_properties_one_opens_one_extra_key(lm: Vocab) -> None:
    check(lm, {"type": "object", "minProperties": 1}, [{"a": 1}, {"a": 1, "b": 2}], ["{}"])
    typed = {"type": "object", "minProperties": 1, "additionalProperties": {"type": "string"}}
    check(lm, typed, [{"k": "v"}], ["{}", '{"k": 1}'])


def test_max_properties_bounds_extra_keys(lm: Vocab) -> None:
    schema = {"type": "object", "properties": {"a": {}}, "maxProperties": 2}
    check(lm, {**schema, "additionalProperties": True}, [{"a": 1, "b": 2}], ['{"a":1,"b":2,"c":3}'])


# --- uniqueItems ------------------------------------------------------------------------------


def test_unique_items_over_finite_domains(lm: Vocab) -> None:
    schema = {"type": "array", "items": {"enum": ["a", "b", "c"]}, "uniqueItems": True}
    check(lm, schema, [[], ["a", "c"], ["a", "b", "c"]], ['["a","a"]', '["c","a"]', '["d"]'])
    pair = {**schema, "minItems": 2, "maxItems": 2}
    check(lm, pair, [["a", "b"], ["b", "c"]], ['["a"]', '["a","b","c"]'])
    flags = {"type": "array", "items": {"type": "boolean"}, "uniqueItems": True}
    check(lm, flags, [[False, True], [True]], ["[true,true]"])
    with pytest.raises(SchemaError):
        json_schema_grammar({**flags, "minItems": 3})


# --- oneOf proofs -----------------------------------------------------------------------------


def test_one_of_an_enum_and_any_string_is_a_string_but_those(lm: Vocab) -> None:
    schema = {"oneOf": [{"enum": ["linux"]}, {"type": "string"}]}
    check(lm, schema, ["mac", "linu", "linuxx"], ['"linux"'], escaped=False)


def test_one_of_arrays_of_exclusive_items(lm: Vocab) -> None:
    schema = {
        "oneOf": [
            {"type": "array", "items": {"type": "number"}},
            {"type": "array", "items": {"type": "string"}},
        ]
    }
    check(lm, schema, [[1], ["a", "b"]], ["[]", '[1, "a"]'])  # [] matches both


def test_one_of_number_ranges_and_closed_objects(lm: Vocab) -> None:
    ranges = {"type": "integer", "oneOf": [{"minimum": -1, "maximum": -1}, {"minimum": 50}]}
    check(lm, ranges, [-1, 50, 99], ["0", "-2"])
    closed = {
        "oneOf": [
            {"type": "object", "properties": {"a": {}}, "additionalProperties": False},
            {"type": "object", "properties": {"b": {}}, "additionalProperties": False},
        ]
    }
    check(lm, closed, [{"a": 1}, {"b": 2}], ["{}", '{"a": 1, "b": 2}'])  # {} matches both


def test_one_of_through_refs_to_unions(lm: Vocab) -> None:
    schema = {
        "$defs": {"word": {"anyOf": [{"type": "string"}, {"type": "null"}]}},
        "oneOf": [{"$ref": "#/$defs/word"}, {"type": "integer"}],
    }
    check(lm, schema, ["x", None, 3], ["[]"])
    with pytest.raises(UnsupportedSchema) as exc:  # "x" matches both: not provable
        json_schema_grammar({"oneOf": [{"type": "string"}, {"pattern": "^a"}]})
    assert exc.value.feature == "oneOf: branches not exclusive"


# --- not, if/then, allOf of unions ------------------------------------------------------------


def test_not_of_string_values_and_of_a_character_class(lm: Vocab) -> None:
    values = {"type": "string", "not": {"enum": ["test", "src"]}}
    check(lm, values, ["tests", "sr", ""], ['"test"', '"src"'], escaped=False)
    chars = {"type": "string", "minLength": 1, "not": {"pattern": "^[a-z\\s]+$"}}
    check(lm, chars, ["a1", "B"], ['"abc"', '"a b"', '""'], escaped=False)
    both = {"type": "object", "not": {"allOf": [{"required": ["a"]}, {"required": ["b"]}]}}
    check(lm, {**both, "additionalProperties": True}, [{"b": 1}], ['{"a":1,"b":2}'])


def test_if_then_chains_on_one_property(lm: Vocab) -> None:
    schema = {
        "type": "object",
        "properties": {"kind": {"type": "string"}, "x": {}},
        "required": ["kind"],
        "allOf": [
            {
                "if": {"properties": {"kind": {"const": "a"}}},
                "then": {"properties": {"x": {"type": "integer"}}},
            },
            {
                "if": {"properties": {"kind": {"const": "b"}}},
                "then": {"properties": {"x": {"type": "string"}}},
            },
        ],
    }
    good = [{"kind": "a", "x": 1}, {"kind": "b", "x": "s"}, {"kind": "c", "x": None}]
    check(lm, schema, good, ['{"kind": "a", "x": "s"}', '{"kind": "b", "x": 1}'])


def test_all_of_two_unions_is_a_union_of_pairs(lm: Vocab) -> None:
    schema = {
        "allOf": [
            {"anyOf": [{"type": "integer"}, {"type": "string"}]},
            {"anyOf": [{"type": "integer", "minimum": 3}, {"type": "string", "maxLength": 2}]},
        ]
    }
    check(lm, schema, [3, "ab"], ["2", '"abc"'], escaped=False)


def test_keywords_that_cannot_be_enforced_are_refused() -> None:
    for schema, feature in [
        ({"type": "integer", "multipleOf": 2.5}, "multipleOf"),
        ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ]:
        with pytest.raises(UnsupportedSchema) as exc:
            json_schema_grammar(schema)
        assert exc.value.feature == feature


def test_contains_any_item_means_at_least_one(lm: Vocab) -> None:
    check(lm, {"type": "array", "contains": {}}, [[1]], ["[]"])
    check(lm, {"type": "number", "multipleOf": 1}, [3], ["1.5"])
    cents = {"type": "number", "multipleOf": 0.01, "maximum": 99.99}  # integers: stricter
    check(lm, cents, [3, 99], ["1.5", "100"])


# --- if with an unenforceable `not`, multipleOf, grouped anchors, formats beside patterns -----


def test_if_of_a_not_that_cannot_be_enforced_takes_the_else_side(lm: Vocab) -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": ["null", "integer"]}, "b": {"type": "integer"}},
        "if": {"not": {"properties": {"a": {"const": None}}}},  # `not` of a const: unsupported
        "then": {"properties": {"b": {"const": None}}},
        "else": {"required": ["b"]},
    }  # stricter: `a` null or absent (the `if` fails), so `else` applies
    check(lm, schema, [{"a": None, "b": 1}, {"b": 2}], ['{"a": 1, "b": 1}', '{"a": null}', "{}"])


def test_if_with_else_is_not_dropped_beside_switched_conditions(lm: Vocab) -> None:
    schema = {
        "type": "object",
        "properties": {"kind": {"type": "string"}, "x": {}},
        "required": ["kind"],
        "if": {"properties": {"kind": {"const": "z"}}},
        "then": {"properties": {"x": {"type": "boolean"}}},
        "else": {"required": ["x"]},
        "allOf": [
            {
                "if": {"properties": {"kind": {"const": "a"}}},
                "then": {"properties": {"x": {"type": "integer"}}},
            }
        ],
    }  # the own if/then (with else) is taken as holding: x boolean, so kind "a" is unsatisfiable
    check(
        lm, schema, [{"kind": "z", "x": True}], ['{"kind": "z", "x": 1}', '{"kind": "a", "x": 1}']
    )


def test_integer_multiple_of_lists_the_multiples(lm: Vocab) -> None:
    ranged = {"type": "integer", "minimum": -40, "maximum": 40, "multipleOf": 16}
    check(lm, ranged, [-32, 0, 16, 32], ["8", "48", "-48", "16.0"])
    grammar = json_schema_grammar({"type": "number", "multipleOf": 3})  # 256 nearest 0
    assert lm.accepts(grammar, "384") and lm.accepts(grammar, "-381")
    assert not lm.accepts(grammar, "387") and not lm.accepts(grammar, "-384")
    assert not lm.accepts(grammar, "4")
    with pytest.raises(SchemaError):
        json_schema_grammar({"type": "integer", "minimum": 1, "maximum": 4, "multipleOf": 5})


def test_anchors_inside_top_level_groups(lm: Vocab) -> None:
    schema = {"type": "string", "pattern": "(^([0-9]+)\\.([0-9]+)$)|(^\\{[A-F0-9]{4}\\}$)"}
    check(lm, schema, ["4.20", "{AB12}"], ['"x4.20"', '"4.20x"', '"{AB12}x"'], escaped=False)
    check(lm, {"type": "string", "pattern": "(?:(^a$))|b"}, ["a", "xbx"], ['"ax"'], escaped=False)
    with pytest.raises(UnsupportedSchema):  # ^ after something: not at the start
        json_schema_grammar({"type": "string", "pattern": "(x^a)|b"})


def test_uri_beside_a_scheme_prefix_pattern(lm: Vocab) -> None:
    schema = {"type": "string", "format": "uri", "pattern": "^(https?)://"}
    good = ["https://example.com/a?b#c", "http://10.0.0.1:8080"]
    check(lm, schema, good, ['"ftp://example.com"', '"https://"', '"https:x"'], escaped=False)
    ref = {"type": "string", "format": "uri-reference", "pattern": "^https://"}
    check(lm, ref, ["https://a.b/c"], ['"/a/b"', '"http://a.b"'], escaped=False)
    with pytest.raises(UnsupportedSchema):  # not only a scheme prefix
        json_schema_grammar({"type": "string", "format": "uri", "pattern": "^https://x"})


def test_email_with_a_max_length(lm: Vocab) -> None:
    schema = {"type": "string", "format": "email", "maxLength": 20}
    grammar = check(
        lm, schema, ["a@b.co", "john@ex.com", "johnny@exampl"], ['"a@b"' + "x", '"noat"']
    )
    assert not lm.accepts(grammar, '"' + "a" * 10 + "@" + "b" * 10 + '"')
    with pytest.raises(UnsupportedSchema):
        json_schema_grammar({"type": "string", "format": "email", "maxLength": 6})


def test_a_large_enum_is_checked_without_comparing_it_to_itself(lm: Vocab) -> None:
    schema = {"type": "string", "maxLength": 5, "enum": [f"v{i}" for i in range(20_000)]}
    start = time.perf_counter()
    grammar = json_schema_grammar(schema)  # each value against the rest only: not quadratic
    assert time.perf_counter() - start < 5
    assert lm.accepts(grammar, '"v9999"') and not lm.accepts(grammar, '"v10000"')


# --- Property: what the grammar writes matches the schema ------------------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 1000) | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)

_TEXT = st.text(alphabet="abc- 0é", max_size=8)
_RULES: list[tuple[Any, Any]] = [  # one schema per new rule, and values to try against it
    ({"type": "string", "pattern": "^[a-c]+(-[a-c]+)*$", "maxLength": 6}, _TEXT),
    ({"type": "number", "minimum": -0.5, "maximum": 3.7}, st.floats(-2, 5) | st.integers(-2, 5)),
    (
        {"type": "array", "items": {"enum": [1, "a", None]}, "uniqueItems": True},
        st.lists(st.sampled_from([1, "a", None, 2]), max_size=4),
    ),
    ({"oneOf": [{"enum": ["a", "b"]}, {"type": "string"}]}, _TEXT),
    (
        {"oneOf": [{"type": "array", "items": {"type": "integer"}}, {"items": {"type": "string"}}]},
        st.lists(st.integers(0, 9) | _TEXT, max_size=3),
    ),
    (
        {"type": "object", "minProperties": 1, "additionalProperties": {"type": "integer"}},
        st.dictionaries(_TEXT, st.integers(0, 9) | st.none(), max_size=2),
    ),
    ({"type": "string", "not": {"enum": ["", "a"]}}, _TEXT),
    (
        {"type": "number", "multipleOf": 0.05, "minimum": -3.5},
        st.integers(-(10**12), 10**12) | st.floats(-5, 5),
    ),
    (
        {"type": "integer", "multipleOf": 7, "exclusiveMaximum": 30},
        st.integers(-(10**4), 40),
    ),
    ({"type": "string", "format": "email", "maxLength": 12}, st.emails() | _TEXT),
    (
        {"type": "string", "format": "uri", "pattern": "^(https?|ftp)://"},
        st.sampled_from(["https://a.b", "ftp://x.y/z", "http://a", "file://a", "https:/a"]),
    ),
    (
        {"type": "string", "pattern": "(^[a-c]$)|(^[0-9]+-$)"},
        st.text(alphabet="ab1-", max_size=4),
    ),
    (
        {
            "type": "object",
            "properties": {"a": {"type": ["null", "integer"]}},
            "if": {"not": {"properties": {"a": {"const": None}}}},
            "then": {"required": ["zz"]},
        },
        st.fixed_dictionaries({}, optional={"a": st.none() | st.integers(0, 3)}),
    ),
]


def _sample_schemas() -> list[Any]:
    schemas = [entry["schema"] for entry in json.loads(SAMPLE.read_text())["schemas"]]
    return [s for s in schemas if _compiles(s)][:6]


def _compiles(schema: Any) -> bool:
    try:
        json_schema_grammar(schema)
    except SchemaError:
        return False
    return True


_CASES = _RULES + [(schema, _JSON) for schema in _sample_schemas()]


@pytest.mark.parametrize(("schema", "values"), _CASES)
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_values_the_grammar_accepts_match_the_schema(
    lm: Vocab, schema: Any, values: Any, data: Any
) -> None:
    value = data.draw(values)
    if lm.accepts(json_schema_grammar(schema), json.dumps(value, ensure_ascii=False)):
        validator(schema).validate(value)


@pytest.mark.parametrize(("schema", "values"), _CASES)
def test_random_texts_the_grammar_writes_match_the_schema(
    lm: Vocab, schema: Any, values: Any
) -> None:
    grammar = json_schema_grammar(schema)
    for seed in range(3):
        try:
            text = lm.generate(grammar, random.Random(seed), max_tokens=60)
        except AssertionError:  # did not end within the tokens: nothing to check
            continue
        validator(schema).validate(json.loads(text))
