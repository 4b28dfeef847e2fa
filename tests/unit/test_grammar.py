"""cria.grammar: JSON Schema -> GBNF, checked by llama.cpp's own grammar sampler.

Every grammar is parsed by `llama_sampler_init_grammar` over the bundled model's vocabulary
(loaded vocabulary-only), and texts are fed token by token: a text is accepted when the sampler
allows each of its tokens and then the end-of-generation token.
"""

from __future__ import annotations

import ctypes
import datetime
import enum
import json
import math
import random
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any, Literal

import jsonschema  # type: ignore[import-untyped, unused-ignore]
import llama_cpp
import numpy as np
import pydantic
import pytest
from openai.lib._pydantic import to_strict_json_schema

from cria.grammar import (
    GrammarBuilder,
    SchemaError,
    UnsupportedSchema,
    json_object_grammar,
    json_schema_grammar,
    literal,
    tool_call_grammar,
)
from cria.grammar.json_schema import _check_repetitions
from cria.models.spec import bundled_model_path

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class Vocab:
    """The bundled model's vocabulary and a grammar sampler driven one token at a time."""

    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab
        self.eos = llama_cpp.llama_vocab_eos(vocab)
        self.n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
        assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        assert n >= 0
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def sampler(self, grammar: str) -> Any:
        smpl = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert smpl, f"llama.cpp could not parse the grammar:\n{grammar}"
        return smpl

    @staticmethod
    def allowed(smpl: Any, token: int) -> bool:
        data = llama_cpp.llama_token_data(id=token, logit=0.0, p=0.0)
        arr = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(data), size=1, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return bool(data.logit != -math.inf)

    def accepts(self, grammar: str, text: str) -> bool:
        smpl = self.sampler(grammar)
        try:
            for token in self.tokenize(text):
                if not self.allowed(smpl, token):
                    return False
                llama_cpp.llama_sampler_accept(smpl, token)  # only after apply allowed it
            return self.allowed(smpl, self.eos)
        finally:
            llama_cpp.llama_sampler_free(smpl)

    def generate(self, grammar: str, rng: random.Random, max_tokens: int = 400) -> str:
        """Random tokens among those the grammar allows, until it allows the end."""
        smpl = self.sampler(grammar)
        out = b""
        try:
            for _ in range(max_tokens):
                cands = np.zeros(self.n_tokens, dtype=_TOKEN_DATA)
                cands["id"] = np.arange(self.n_tokens)
                arr = llama_cpp.llama_token_data_array(
                    data=cands.ctypes.data_as(llama_cpp.llama_token_data_p),
                    size=self.n_tokens,
                    selected=-1,
                    sorted=False,
                )
                llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
                allowed = cands["id"][np.isfinite(cands["logit"])]
                if self.eos in allowed:
                    return out.decode()
                token = int(rng.choice(list(allowed)))
                llama_cpp.llama_sampler_accept(smpl, token)
                out += self.piece(token)
        finally:
            llama_cpp.llama_sampler_free(smpl)
        raise AssertionError(f"no end after {max_tokens} tokens: {out!r}")


@pytest.fixture(scope="module")
def lm() -> Iterator[Vocab]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(bundled_model_path()).encode(), params)
    assert model
    yield Vocab(llama_cpp.llama_model_get_vocab(model))
    llama_cpp.llama_model_free(model)


def check(lm: Vocab, schema: Any, good: list[Any], bad: list[str], *, escaped: bool = True) -> str:
    """`good`: values the grammar must accept, serialized compactly and pretty, with raw
    non-ASCII characters and (if `escaped`) with \\u escapes; `bad`: texts it must reject.
    Returns the grammar."""
    grammar = json_schema_grammar(schema)
    for value in good:
        texts = [
            json.dumps(value, ensure_ascii=False),
            json.dumps(value, ensure_ascii=False, indent=2),
            json.dumps(value, ensure_ascii=False, separators=(",", ":")),
        ]
        for text in texts + ([json.dumps(value)] if escaped else []):
            assert lm.accepts(grammar, text), f"rejected {text!r}\n{grammar}"
    for text in bad:
        assert not lm.accepts(grammar, text), f"accepted {text!r}\n{grammar}"
    return grammar


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

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "tags"],
    "additionalProperties": False,
}


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


def test_extra_keys_when_additional_properties_is_not_false(lm: Vocab) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    check(
        lm,
        schema,
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
    check(lm, schema, good=[{"b": 1}, {"c": 2}], bad=['{"a": 1}', '{"b": 1, "a": 1}'])


def test_min_max_properties_only_when_trivially_satisfied(lm: Vocab) -> None:
    schema = {**PERSON, "minProperties": 2, "maxProperties": 4}
    check(lm, schema, good=[{"name": "a", "tags": []}], bad=[])
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({**PERSON, "minProperties": 3})
    assert exc.value.feature == "minProperties"
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({**PERSON, "maxProperties": 3})
    assert exc.value.feature == "maxProperties"
    with pytest.raises(UnsupportedSchema):
        json_schema_grammar({"type": "object", "maxProperties": 3})


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
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({"type": "array", "uniqueItems": True})
    assert exc.value.feature == "uniqueItems"
    check(lm, {"type": "array", "uniqueItems": False}, [[1, 1]], [])
    check(lm, {"type": "array", "uniqueItems": True, "maxItems": 1}, [[], [1]], ["[1,1]"])


# --- Strings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        ("^[a-z]+\\d{2}$", ["abc12", "z00"], ["abc1", "ABC12", "abc123", "12"]),
        ("^\\d{3}-\\d{4}$", ["555-1234"], ["5551234", "555-12345"]),
        ("^(cat|dog)s?$", ["cat", "dogs"], ["cow", "cats!", ""]),
        ("foo", ["foo", "xxfooyy", "a\nfoo"], ["fo", "oof"]),
        ("^ab", ["ab", "abc"], ["cab"]),
        ("b$", ["b", "ab"], ["ba"]),
        ("^a.c$", ["abc", "a c", 'a"c', "aéc"], ["ac", "a\nc"]),
        ("^[^0-9]+$", ["abc", "a b", 'a"b'], ["a1", ""]),
        ("^[\\w.-]+@[\\w-]+\\.[a-z]{2,}$", ["a.b-c@x-y.org"], ["a@b", "a b@x.io"]),
        ("^\\s*$", ["", " ", "\t\n"], ["a"]),
        ('^say "hi"\\\\$', ['say "hi"\\'], ["say hi"]),
        ("^(a|)b{2,3}c*$", ["bb", "abbbcc"], ["abbbb", "ab"]),
        ("^(?:x|y)(?<n>z)?$", ["x", "yz"], ["z"]),
        ("^\\x41\\u00e9[\\-+]$", ["Aé-", "Aé+"], ["Ae-"]),
        ("^a$|^b", ["a", "bcd"], ["ab"]),
        # Where regex dialects disagree (é is \\w in Python, not in ECMA-262), neither is allowed.
        ("^\\D\\W$", ["a-", "a "], ["1-", "aé", "a_"]),
        ("^[^\\d\\s]\\w$", ["a1", "-_"], ["1a", " a", "éa", "aé"]),
        ("", ["", "anything"], []),
    ],
)
def test_pattern(lm: Vocab, pattern: str, good: list[str], bad: list[str]) -> None:
    # Under a pattern, characters other than " \\ and controls are written raw, not \\u-escaped.
    check(
        lm,
        {"type": "string", "pattern": pattern},
        good,
        [json.dumps(b) for b in bad],
        escaped=False,
    )


@pytest.mark.parametrize(
    ("pattern", "feature"),
    [
        ("^(?=a)a$", "pattern: lookaround"),
        ("^(?!a).$", "pattern: lookaround"),
        ("(?<=a)b", "pattern: lookaround"),
        ("^(a)\\1$", "pattern: backreference"),
        ("\\bword\\b", "pattern: word boundary"),
        ("a^b", "pattern: anchor"),
        ("^(a$)", "pattern: anchor"),
        ("\\p{L}", "pattern: escape \\p"),
        ("(?i)a", "pattern: (?...) group"),
    ],
)
def test_unsupported_patterns(pattern: str, feature: str) -> None:
    schema = {"type": "object", "properties": {"p": {"type": "string", "pattern": pattern}}}
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar(schema)
    assert exc.value.feature == feature
    assert exc.value.path == "properties.p.pattern"


@pytest.mark.parametrize("pattern", ["(a", "a)", "[a", "*a", "a{3,1}", "[z-a]", "a\\"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(SchemaError) as exc:
        json_schema_grammar({"type": "string", "pattern": pattern})
    assert not isinstance(exc.value, UnsupportedSchema)


@pytest.mark.parametrize(
    ("fmt", "good", "bad"),
    [
        ("date", ["2024-02-29", "2000-02-29", "1999-12-31", "2023-04-30"],
         ["2023-02-29", "1900-02-29", "2024-13-01", "2024-04-31", "2024-1-01", "24-01-01"]),
        ("time", ["12:30:00Z", "23:59:59.123+02:00", "00:00:00-11:30"],
         ["12:30:00", "24:00:00Z", "12:60:00Z", "1:00:00Z"]),
        ("date-time", ["2024-01-31T08:00:00Z", "2024-01-31T08:00:00.5+05:30"],
         ["2024-01-31 08:00:00Z", "2024-01-31T08:00Z", "2024-01-31"]),
        ("uuid", ["123e4567-e89b-12d3-a456-426614174000"],
         ["123e4567e89b12d3a456426614174000", "123e4567-e89b-12d3-a456-42661417400g"]),
    ],
)  # fmt: skip
def test_formats(lm: Vocab, fmt: str, good: list[str], bad: list[str]) -> None:
    check(lm, {"type": "string", "format": fmt}, good, [json.dumps(b) for b in bad])


def test_unsupported_formats_and_combinations() -> None:
    for fmt in ("email", "uri", "hostname", "duration"):
        with pytest.raises(UnsupportedSchema) as exc:
            json_schema_grammar({"type": "string", "format": fmt})
        assert exc.value.feature == f"format: {fmt}"
    with pytest.raises(UnsupportedSchema):
        json_schema_grammar({"type": "string", "pattern": "^a+$", "maxLength": 3})
    with pytest.raises(SchemaError, match="minLength is greater"):
        json_schema_grammar({"type": "string", "minLength": 3, "maxLength": 2})


# --- Numbers ----------------------------------------------------------------------------------


def _in(value: Fraction, low: tuple[int, bool] | None, high: tuple[int, bool] | None) -> bool:
    above = low is None or value > low[0] or (low[1] and value == low[0])
    below = high is None or value < high[0] or (high[1] and value == high[0])
    return above and below


_RANGES: list[tuple[tuple[int, bool] | None, tuple[int, bool] | None]] = [
    ((0, True), None),
    ((1, True), (5, True)),
    ((0, False), (10, False)),
    ((-5, True), (5, True)),
    ((-120, True), (-3, True)),
    ((7, True), (1234, True)),
    ((95, True), (105, True)),
    ((-1000, False), (0, True)),
    (None, (-1, True)),
    (None, (10, True)),
    ((3, True), (3, True)),
    ((999, True), None),
]


def _bound_schema(low: tuple[int, bool] | None, high: tuple[int, bool] | None) -> dict[str, Any]:
    schema: dict[str, Any] = {}
    if low is not None:
        schema["minimum" if low[1] else "exclusiveMinimum"] = low[0]
    if high is not None:
        schema["maximum" if high[1] else "exclusiveMaximum"] = high[0]
    return schema


@pytest.mark.parametrize(("low", "high"), _RANGES)
def test_integer_ranges(
    lm: Vocab, low: tuple[int, bool] | None, high: tuple[int, bool] | None
) -> None:
    grammar = json_schema_grammar({"type": "integer", **_bound_schema(low, high)})
    edges = [b[0] for b in (low, high) if b is not None]
    values = {v for e in edges for v in range(e - 12, e + 13)} | {0, 1, -1, 10**15, -(10**15)}
    for value in sorted(values):
        expected = _in(Fraction(value), low, high)
        assert lm.accepts(grammar, str(value)) == expected, (value, grammar)
    assert not lm.accepts(grammar, "-0") or _in(Fraction(0), low, high)
    assert not lm.accepts(grammar, "007")


@pytest.mark.parametrize(("low", "high"), _RANGES)
def test_number_ranges(
    lm: Vocab, low: tuple[int, bool] | None, high: tuple[int, bool] | None
) -> None:
    grammar = json_schema_grammar({"type": "number", **_bound_schema(low, high)})
    edges = [b[0] for b in (low, high) if b is not None]
    texts = {
        f"{e + d}{frac}"
        for e in edges
        for d in (-1, 0, 1)
        for frac in ("", ".0", ".000", ".5", ".001", ".999")
    }
    texts |= {"0", "0.0", "-0.5", "0.5", "1e3"}
    for text in sorted(texts):
        if text.startswith("--") or "e" in text:
            continue
        expected = _in(Fraction(text), low, high)
        assert lm.accepts(grammar, text) == expected, (text, grammar)
    assert not lm.accepts(grammar, "1e3")  # bounded numbers have no exponent


def test_number_bounds_rounding_and_errors() -> None:
    assert json_schema_grammar({"type": "integer", "minimum": 0.5, "maximum": 2.5}).startswith(
        "root"
    )
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({"type": "number", "maximum": 0.5})
    assert exc.value.feature == "non-integer bound on a number"
    with pytest.raises(SchemaError, match="no integer"):
        json_schema_grammar({"type": "integer", "minimum": 3, "exclusiveMaximum": 3})
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({"type": "integer", "multipleOf": 2})
    assert exc.value.feature == "multipleOf"


def test_integer_bounds_with_fractional_values(lm: Vocab) -> None:
    check(lm, {"type": "integer", "exclusiveMinimum": 0.5, "maximum": 2.5}, [1, 2], ["0", "3"])


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
        [{"a": 1, "b": "x"}, {"a": 0, "b": "x", "c": None}],
        ['{"a": -1, "b": "x"}', '{"a": 1}'],
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
        ({"properties": {"a": {"not": {"type": "string"}}}}, "properties.a", "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "", "if/then/else"),
        ({"type": "object", "patternProperties": {"^x": {}}}, "", "patternProperties"),
        ({"type": "object", "propertyNames": {"maxLength": 3}}, "", "propertyNames"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "", "dependentRequired"),
        ({"type": "object", "dependentSchemas": {"a": {}}}, "", "dependentSchemas"),
        ({"type": "array", "items": {"type": "array", "contains": {}}}, "items", "contains"),
        ({"anyOf": [{"type": "string"}, {"nullable": True}]}, "anyOf.1", "nullable"),
        ({"allOf": [{"$ref": "#"}]}, "allOf.0", "recursive allOf"),
        ({"anyOf": [{}], "oneOf": [{}]}, "", "anyOf with oneOf"),
        (
            {"type": "object", "properties": {"t": {"type": "array", "minContains": 1}}},
            "properties.t",
            "minContains",
        ),
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
    schema = {"type": "object", "properties": {'a"b': {"type": "integer"}, "é": {"type": "null"}}}
    # Declared keys are written as their compact JSON (non-ASCII raw); extra keys use no escapes.
    good = [{'a"b': 1}, {"é": None}, {"x": "y"}, {"a": 1}, {"éé": 1}]
    bad = ['{"a\\"b": "1"}', '{"é": 1}', '{"\\u00e9": 1}', '{"x\\"": 1}']
    check(lm, schema, good, bad, escaped=False)


def test_ref_to_itself_only() -> None:
    with pytest.raises(SchemaError, match="itself"):
        json_schema_grammar({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})


def test_input_schema_is_not_modified() -> None:
    schema = to_strict_json_schema(Person)
    schema["properties"]["extra"] = {"type": ["number", "integer"], "allOf": [{"minimum": 0}]}
    before = json.dumps(schema, sort_keys=True)
    json_schema_grammar(schema)
    assert json.dumps(schema, sort_keys=True) == before


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        (False, ""),
        ({"type": "float"}, ""),
        ({"type": "object", "properties": {"a": {"type": ["string", "string"]}}}, "properties.a"),
        ({"type": "object", "required": "a"}, ""),
        ({"type": "object", "properties": []}, ""),
        ({"type": "array", "items": {"type": "array", "minItems": 3, "maxItems": 2}}, "items"),
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


# --- pydantic / the openai SDK ----------------------------------------------------------------


class Color(str, enum.Enum):
    RED = "red"
    GREEN = "green"


class Address(pydantic.BaseModel):
    street: str
    zip_code: str = pydantic.Field(pattern=r"^\d{5}$")


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(description="full name")
    age: int = pydantic.Field(ge=0, le=150)
    color: Color
    nickname: str | None = None
    tags: list[str]
    address: Address
    previous: list[Address]
    kind: Literal["a", "b"]
    born: datetime.date
    score: float


def test_openai_sdk_pydantic_schema(lm: Vocab) -> None:
    schema = to_strict_json_schema(Person)
    grammar = json_schema_grammar(schema)
    person = Person(
        name="Ann",
        age=41,
        color=Color.GREEN,
        tags=["x"],
        address=Address(street="Main St", zip_code="12345"),
        previous=[],
        kind="b",
        born=datetime.date(1983, 5, 1),
        score=9.5,
    )
    assert lm.accepts(grammar, person.model_dump_json())
    assert lm.accepts(grammar, person.model_dump_json(indent=2))
    good = person.model_dump(mode="json")
    for key, bad_value in [
        ("age", 151),
        ("color", "blue"),
        ("kind", "c"),
        ("born", "1983-02-30"),
        ("address", {"street": "s", "zip_code": "1234"}),
        ("address", {"street": "s", "zip_code": "12345", "x": 1}),
        ("nickname", 3),
    ]:
        assert not lm.accepts(grammar, json.dumps({**good, key: bad_value})), key
    assert not lm.accepts(grammar, json.dumps({k: v for k, v in good.items() if k != "nickname"}))


# --- json_object / tools ----------------------------------------------------------------------


def test_json_object_grammar(lm: Vocab) -> None:
    grammar = json_object_grammar()
    for text in ["{}", '{"a": [1, {"b": null}], "c": "d"}', '{\n  "k": true\n}']:
        assert lm.accepts(grammar, text), text
    for text in ["[]", '"s"', "1", "null", '{"a": 1', '{"a": 1}}', "{'a': 1}"]:
        assert not lm.accepts(grammar, text), text


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
    "additionalProperties": False,
}


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


def test_tool_call_grammar_single(lm: Vocab) -> None:
    grammar = tool_call_grammar([("get_weather", WEATHER), ("now", {})], parallel=False)
    assert lm.accepts(grammar, call("get_weather", '{"city": "Paris"}'))
    assert lm.accepts(grammar, call("get_weather", '{"city": "Paris", "unit": "c"}'))
    assert lm.accepts(grammar, call("now", "{}"))
    assert lm.accepts(grammar, call("now", '{"anything": [1]}'))
    assert not lm.accepts(grammar, call("now", "[]"))  # no schema: any object, not any value
    assert not lm.accepts(grammar, call("other", "{}"))  # not one of the functions
    assert not lm.accepts(grammar, call("get_weather", '{"unit": "c"}'))  # violates the schema
    assert not lm.accepts(grammar, call("get_weather", '{"city": "P", "unit": "k"}'))
    assert not lm.accepts(grammar, call("now", "{}") + "\n" + call("now", "{}"))  # not parallel
    assert not lm.accepts(grammar, call("now", "{}") + "\n")  # nothing after the block
    assert not lm.accepts(grammar, call("now", "{}").replace('"name": ', '"name":'))
    assert not lm.accepts(grammar, call("now", "{} "))
    assert not lm.accepts(grammar, "Sure! " + call("now", "{}"))


def test_tool_call_grammar_parallel(lm: Vocab) -> None:
    grammar = tool_call_grammar([("get_weather", WEATHER), ("now", {})], parallel=True)
    one = call("get_weather", '{"city": "Oslo"}')
    assert lm.accepts(grammar, one)
    assert lm.accepts(grammar, one + "\n" + call("now", "{}") + "\n" + one)
    assert not lm.accepts(grammar, one + "\n\n" + one)
    assert not lm.accepts(grammar, one + one)
    assert not lm.accepts(grammar, "")


def test_tool_call_grammar_errors() -> None:
    with pytest.raises(UnsupportedSchema) as exc:
        tool_call_grammar(
            [("f", {"type": "object", "properties": {"a": {"not": {}}}})], parallel=False
        )
    assert exc.value.feature == "not"
    assert exc.value.path == "properties.a"
    assert "function 'f'" in str(exc.value)
    with pytest.raises(SchemaError):
        tool_call_grammar([("f", {}), ("f", {})], parallel=True)
    with pytest.raises(SchemaError):
        tool_call_grammar([], parallel=True)


# --- Builder API and literals -----------------------------------------------------------------


def test_literal_escapes(lm: Vocab) -> None:
    text = 'a"b\\c\nd\te\r\x01é😀'
    assert literal("x") == '"x"'
    grammar = f"root ::= {literal(text)}\n"
    assert lm.accepts(grammar, text)
    assert not lm.accepts(grammar, text[:-1])


def test_builder_names_and_sharing(lm: Vocab) -> None:
    builder = GrammarBuilder()
    assert builder.add_rule("my rule!", '"a"') == "my-rule"
    assert builder.add_rule("my rule!", '"a"') == "my-rule"  # same body: reused
    assert builder.add_rule("my-rule", '"b"') == "my-rule-1"
    assert builder.add_rule("string", '"c"') == "string-1"  # shared rule names are reserved
    assert builder.add_rule("root", '"d"') == "root-1"
    first = builder.schema_rule(
        {"$defs": {"x": {"type": "integer"}}, "$ref": "#/$defs/x"}, name="first"
    )
    second = builder.schema_rule(
        {"$defs": {"x": {"type": "boolean"}}, "$ref": "#/$defs/x"}, name="second"
    )
    assert first != second  # each schema is its own document
    assert builder.schema_rule({"type": "string"}) == "string"
    grammar = builder.render(f"{first} {literal(' ')} {second}")
    assert grammar.count("\nstring ::=") == 1 and grammar.startswith("root ::= ")
    assert lm.accepts(grammar, "12 true")
    assert not lm.accepts(grammar, "true 12")


# --- Random generation ------------------------------------------------------------------------

BOUNDED = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": -5, "maximum": 40},
        "ratio": {"type": "number", "minimum": 0, "maximum": 1},
        "code": {"type": "string", "pattern": "^[A-Z]{2}-\\d{1,3}$"},
        "label": {"type": "string", "maxLength": 4},
        "day": {"type": "string", "format": "date"},
        "color": {"enum": ["red", "green", None]},
        "items": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "maybe": {"anyOf": [{"type": "null"}, {"type": "integer", "minimum": 100, "maximum": 105}]},
    },
    "required": ["id", "code", "color"],
    "additionalProperties": False,
}


def test_random_generations_are_valid(lm: Vocab) -> None:
    rng = random.Random(1234)
    validator = jsonschema.Draft202012Validator(
        BOUNDED, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )
    grammar = json_schema_grammar(BOUNDED)
    for _ in range(4):
        text = lm.generate(grammar, rng)
        validator.validate(json.loads(text))
    tools = tool_call_grammar([("get_weather", WEATHER)], parallel=False)
    text = lm.generate(tools, rng)
    head, tail = '<tool_call>\n{"name": "get_weather", "arguments": ', "}\n</tool_call>"
    assert text.startswith(head) and text.endswith(tail)
    jsonschema.validate(json.loads(text[len(head) : -len(tail)]), WEATHER)


# --- Limits: ambiguity, nesting, size ---------------------------------------------------------


def layered(depth: int, branch: Any) -> dict[str, Any]:
    """$defs L0 = string and Lk = anyOf of branch(ref to L(k-1), j) for j in 0..2; root Ldepth."""
    defs: dict[str, Any] = {"L0": {"type": "string"}}
    for k in range(1, depth + 1):
        defs[f"L{k}"] = {"anyOf": [branch(f"#/$defs/L{k - 1}", j) for j in range(3)]}
    return {"$defs": defs, "$ref": f"#/$defs/L{depth}"}


def min_items(ref: str, j: int) -> dict[str, Any]:  # the reviewer's schema
    return {"type": "array", "items": {"$ref": ref}, "minItems": j}


def exact_items(ref: str, j: int) -> dict[str, Any]:  # 0, 2 or 4 items: cannot be merged
    return {"type": "array", "items": {"$ref": ref}, "minItems": 2 * j, "maxItems": 2 * j}


def nested_list(depth: int, inner: str) -> str:
    return "[" * depth + inner + "]" * depth


def full_apply_seconds(lm: Vocab, grammar: str, prefix: str) -> float:
    """Feed `prefix`, then time one grammar apply over the whole vocabulary."""
    smpl = lm.sampler(grammar)
    try:
        for token in lm.tokenize(prefix):
            assert lm.allowed(smpl, token), prefix
            llama_cpp.llama_sampler_accept(smpl, token)
        cands = np.zeros(lm.n_tokens, dtype=_TOKEN_DATA)
        cands["id"] = np.arange(lm.n_tokens)
        arr = llama_cpp.llama_token_data_array(
            data=cands.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=lm.n_tokens,
            selected=-1,
            sorted=False,
        )
        start = time.perf_counter()
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return time.perf_counter() - start
    finally:
        llama_cpp.llama_sampler_free(smpl)


def refused(schema: Any) -> UnsupportedSchema:
    """The UnsupportedSchema the schema raises, within a second."""
    start = time.perf_counter()
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar(schema)
    assert time.perf_counter() - start < 1
    assert str(exc.value)
    return exc.value


def test_reviewer_schema_merges_into_one_unambiguous_array(lm: Vocab) -> None:
    # Branches that differ only in minItems (0, 1, 2: joined, minItems 0) become one, so the
    # grammar no longer triples llama.cpp's parse stacks at each "[" (10 s per apply by the 8th).
    start = time.perf_counter()
    grammar = json_schema_grammar(layered(12, min_items))
    assert time.perf_counter() - start < 1
    assert "|" not in "".join(line for line in grammar.splitlines() if line.startswith("L"))
    assert lm.accepts(grammar, nested_list(12, '"x"'))
    assert lm.accepts(grammar, nested_list(11, "[]"))
    assert lm.accepts(grammar, '[[[[[[[[[[[[], ["a", "b"]]]]]]]]]]]]')
    assert not lm.accepts(grammar, nested_list(13, '"x"'))
    assert not lm.accepts(grammar, nested_list(12, "1"))
    assert full_apply_seconds(lm, grammar, "[" * 8) < 1


def test_ambiguous_nested_unions_are_refused_quickly(lm: Vocab) -> None:
    # Exact lengths 0, 2 or 4 cannot be joined: arrays of 2 and 4 items are both alive while
    # their first item, an L(k-1), is read, so each level doubles the stacks.
    exc = refused(layered(12, exact_items))
    assert exc.feature == "anyOf: too ambiguous"
    assert exc.path == "$defs.L7"  # the first level past 64 estimated stacks
    small = check(lm, layered(3, exact_items), [[], [[[], []], [[], [], [], []]]], [])
    assert not lm.accepts(small, "[[[]]]")  # one item
    assert not lm.accepts(small, '[["a", "b"], ["c", "d"]]')  # strings one level too high
    assert lm.accepts(small, '[[["a", "b"], []], [[], [], [], []]]')
    # The same union through a recursive $ref grows without bound: refused at any depth.
    recursive = {
        "anyOf": [
            {"type": "array", "items": {"$ref": "#"}, "minItems": 2 * j, "maxItems": 2 * j}
            for j in range(3)
        ]
        + [{"type": "string"}]
    }
    exc = refused(recursive)
    assert (exc.feature, exc.path) == ("anyOf: too ambiguous", "")
    assert "recursive" in str(exc) or "leads back" in str(exc)


def test_tool_schemas_are_checked_too() -> None:
    with pytest.raises(UnsupportedSchema) as exc:
        tool_call_grammar([("f", layered(12, exact_items))], parallel=False)
    assert exc.value.feature == "anyOf: too ambiguous"
    assert str(exc.value).startswith("function 'f': ")


def test_branch_merging_is_exact(lm: Vocab) -> None:
    items = {"type": "integer"}
    joined = {
        "anyOf": [
            {"type": "array", "items": items, "minItems": 1, "maxItems": 2},
            {"type": "array", "items": items, "minItems": 3, "maxItems": 5, "title": "t"},
        ]
    }
    check(lm, joined, [[1], [1, 2, 3, 4, 5]], ["[]", "[1, 2, 3, 4, 5, 6]", '["a"]'])
    apart = {
        "anyOf": [
            {"type": "array", "items": items, "maxItems": 1},
            {"type": "array", "items": items, "minItems": 3},
        ]
    }
    check(lm, apart, [[], [1], [1, 2, 3], [1, 2, 3, 4]], ["[1, 2]"])
    strings = {
        "oneOf": [
            {"type": "string", "maxLength": 2},
            {"type": "string", "minLength": 3, "maxLength": 4},
            {"type": "string", "minLength": 7},
        ]
    }
    check(lm, strings, ["", "abcd", "abcdefg"], ['"abcde"', '"abcdef"'])
    # Equal branches count once.
    array = {"type": "array", "items": items}
    same = {"anyOf": [array, {**array, "description": "d"}, array, {"type": "null"}]}
    assert json_schema_grammar(same) == json_schema_grammar({"anyOf": [array, {"type": "null"}]})
    # Without "type", a branch's type is inferred from its keywords: not merged ({} is any value).
    check(lm, {"anyOf": [{}, {"minLength": 3}]}, ["ab", 5, None], [])


def test_nesting_too_deep_is_refused_not_a_recursion_error() -> None:
    arrays: Any = {"type": "string"}
    for _ in range(150):
        arrays = {"type": "array", "items": arrays}
    assert refused(arrays).feature == "nesting too deep"
    unions: Any = {"type": "string"}
    for _ in range(300):
        unions = {"anyOf": [unions, {"type": "null"}]}
    assert refused(unions).feature == "nesting too deep"
    merged: Any = {"type": "string"}
    for _ in range(2000):
        merged = {"allOf": [merged]}
    assert refused(merged).feature == "nesting too deep"
    pattern = {"type": "string", "pattern": "(" * 400 + "a" + ")" * 400}
    assert refused(pattern).feature == "nesting too deep"
    fine: Any = {"type": "integer"}
    for _ in range(60):
        fine = {"type": "array", "items": fine}
    json_schema_grammar(fine)


@pytest.mark.parametrize(
    ("schema", "path"),
    [
        ({"anyOf": [{"$ref": "#"}, {"type": "string"}]}, "anyOf.0"),
        (
            {"oneOf": [{"type": "null"}, {"allOf": [{"$ref": "#"}], "minLength": 1}]},
            "oneOf.1.oneOf.1",
        ),
        (
            {
                "$defs": {"a": {"anyOf": [{"$ref": "#/$defs/a", "minLength": 1}, {}]}},
                "$ref": "#/$defs/a",
            },
            "$defs.a.anyOf.0.anyOf.0",  # where the inlined copy of a meets its $ref again
        ),
        (
            {
                "$defs": {
                    "a": {"anyOf": [{"$ref": "#/$defs/b"}, {"type": "null"}]},
                    "b": {"anyOf": [{"$ref": "#/$defs/a"}, {"type": "integer"}]},
                },
                "$ref": "#/$defs/a",
            },
            "$defs.b.anyOf.0",
        ),
    ],
)
def test_left_recursion_is_refused(schema: dict[str, Any], path: str) -> None:
    exc = refused(schema)
    assert (exc.feature, exc.path) == ("recursive $ref without nesting", path)
    assert "itself" in str(exc)


class TreeNode(pydantic.BaseModel):
    value: int
    children: list[TreeNode] | None


class Circle(pydantic.BaseModel):
    type: Literal["circle"]
    radius: float


class Square(pydantic.BaseModel):
    type: Literal["square"]
    side: float


class ShapeGroup(pydantic.BaseModel):
    type: Literal["group"]
    items: list[Circle | Square | ShapeGroup]


class File(pydantic.BaseModel):
    name: str
    size: int


class Directory(pydantic.BaseModel):
    name: str
    entries: list[File | Directory]


def test_realistic_recursive_schemas_stay_allowed(lm: Vocab) -> None:
    tree = to_strict_json_schema(TreeNode)
    check(
        lm,
        tree,
        [{"value": 1, "children": None}, {"value": 1, "children": [{"value": 2, "children": []}]}],
        ['{"value": 1}', '{"value": 1, "children": [{"value": 2}]}'],
    )
    check(lm, TreeNode.model_json_schema(), [{"value": 1, "children": None}], ['{"value": "1"}'])
    # Three object types told apart by a first "type" const, one of them recursive.
    shapes = to_strict_json_schema(ShapeGroup)
    drawing = {
        "type": "group",
        "items": [
            {"type": "circle", "radius": 1.5},
            {"type": "group", "items": [{"type": "square", "side": 2}]},
        ],
    }
    check(
        lm,
        shapes,
        [drawing, {"type": "group", "items": []}],
        [
            '{"type": "group", "items": [{"type": "circle", "side": 2}]}',
            '{"type": "group", "items": [{"type": "triangle"}]}',
        ],
    )
    # Told apart only by their second key, after a string: still cheap, recursion included.
    files = to_strict_json_schema(Directory)
    tree_of_files = {
        "name": "/",
        "entries": [{"name": "a", "size": 1}, {"name": "d", "entries": []}],
    }
    check(lm, files, [tree_of_files], ['{"name": "/", "entries": [{"name": "a"}]}'])
    check(lm, Directory.model_json_schema(), [tree_of_files], ['{"name": "/", "entries": [1]}'])
    json_value = {
        "$defs": {
            "v": {
                "anyOf": [
                    {"type": "object", "additionalProperties": {"$ref": "#/$defs/v"}},
                    {"type": "array", "items": {"$ref": "#/$defs/v"}},
                    {"type": "string"},
                    {"type": "number"},
                    {"type": "boolean"},
                    {"type": "null"},
                ]
            }
        },
        "$ref": "#/$defs/v",
    }
    check(lm, json_value, [{"a": [1, "x", None, {"b": True}]}], ["[1,]"])


def test_unions_of_object_types_stay_allowed(lm: Vocab) -> None:
    # A handful of object branches that all start with "{" (and share their first key) is a
    # few parse stacks, not a product: allowed.
    def kind(name: str, extra: dict[str, Any]) -> dict[str, Any]:
        properties = {**extra, "kind": {"const": name}}  # told apart by their last key
        return {
            "type": "object",
            "properties": properties,
            "required": list(properties),
            "additionalProperties": False,
        }

    union = {
        "anyOf": [
            kind("a", {"x": {"type": "integer"}}),
            kind("b", {"x": {"type": "string"}}),
            kind("c", {"x": {"type": "integer"}, "y": {"type": "array"}}),
        ]
    }
    check(
        lm,
        union,
        [{"x": 1, "kind": "a"}, {"x": "s", "kind": "b"}, {"x": 1, "y": [], "kind": "c"}],
        ['{"x": 1, "kind": "b"}', '{"x": "s", "kind": "a"}'],
    )
    many = {
        "anyOf": [
            {"type": "object", "properties": {"id": {"type": "integer"}, f"field{i}": {}}}
            for i in range(8)
        ]
    }
    check(lm, many, [{"id": 1, "field7": [1]}, {}], ['{"id": "1"}'])
    # The same kinds, recursive with the nested value before the key that tells them apart:
    # two are alive at every level, the stacks double with each: refused.
    nested = {"type": "array", "items": {"$ref": "#"}}
    recursive = {"anyOf": [kind("a", {"kids": nested}), kind("b", {"kids": nested})]}
    exc = refused(recursive)
    assert (exc.feature, exc.path) == ("anyOf: too ambiguous", "")
    # With the key that tells them apart first, they part before the nested value: allowed.
    for branch in recursive["anyOf"]:
        branch["properties"] = dict(reversed(branch["properties"].items()))
    good = [{"kind": "a", "kids": [{"kind": "b", "kids": []}]}]
    check(lm, recursive, good, ['{"kind": "a", "kids": [{"kind": "c", "kids": []}]}'])


def test_schema_too_large() -> None:
    def duplicated(depth: int) -> dict[str, Any]:  # each level compiles the next one twice
        if depth == 0:
            return {"type": "string"}
        return {
            "type": "object",
            "properties": {"a": duplicated(depth - 1)},
            "anyOf": [{"required": ["a"]}, {"required": ["b"]}],
        }

    assert refused(duplicated(25)).feature == "schema too large"
    huge = {"enum": [str(i) * 100_000 for i in range(6)]}  # 600 KB of literals
    assert refused(huge).feature == "schema too large"


def test_counts_llama_cpp_cannot_enforce(lm: Vocab) -> None:
    for schema, feature in [
        ({"type": "string", "maxLength": 2001}, "maxLength above 2000"),
        ({"type": "string", "minLength": 5000}, "minLength above 2000"),
        ({"type": "array", "minItems": 2001}, "minItems above 2000"),
        ({"type": "array", "items": {}, "maxItems": 10**6}, "maxItems above 2000"),
        ({"type": "string", "pattern": "^a{3000}$"}, "pattern: quantifier above 2000"),
        ({"type": "string", "pattern": "^(a{0,100}){0,30}$"}, "schema too large"),
    ]:
        assert refused(schema).feature == feature, schema
    long = json_schema_grammar({"type": "string", "maxLength": 2000})
    assert lm.accepts(long, '"' + "ab" * 1000 + '"')
    assert not lm.accepts(long, '"' + "ab" * 1000 + 'c"')
    many = check(lm, {"type": "array", "items": {"type": "integer"}, "maxItems": 2000}, [[1]], [])
    assert lm.accepts(many, "[" + ",".join(["1"] * 2000) + "]")
    assert not lm.accepts(many, "[" + ",".join(["1"] * 2001) + "]")


def test_many_declared_keys_with_extra_keys(lm: Vocab) -> None:
    # The grammar of "any other key" spells out the declared ones; split into rules so that
    # llama.cpp's parser does not refuse it.
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1000)}}
    check(lm, schema, [{"p999": 1, "q": "x"}, {"p1": 2, "p10": 3}], ['{"p5": "x"}'])


@pytest.mark.parametrize(
    "grammar",
    [
        'root ::= "a"{0,2000}',
        'root ::= ("a" "b"){2000}',
        'root ::= (x y){0,666}\nx ::= "a"\ny ::= "b"',
        'root ::= (x y){0,667}\nx ::= "a"\ny ::= "b"',
        'x ::= "a"\ny ::= "b"\nroot ::= (x y){0,1001}',
        'root ::= (("a"){0,3}){0,400}',
        'root ::= (("a"){0,3}){0,401}',
        'root ::= ("a"{0,3}){0,500}',
        'root ::= ("a"{0,3}){0,501}',
        'root ::= "a"{0,40}{0,50}',
        'root ::= "a"{0,40}{0,51}',
        'root ::= ("a"){2001}',
        'root ::= "a"{2001,}',
        *(  # a group that names rules before they are defined: each counts
            "root ::= ("
            + " | ".join(f"r{i}" for i in range(n))
            + ")?\n"
            + "".join(f'r{i} ::= "x"\n' for i in range(n))
            for n in (1999, 2000)
        ),
    ],
)
def test_repetition_check_agrees_with_llama_cpp(lm: Vocab, grammar: str) -> None:
    grammar = grammar.rstrip("\n") + "\n"
    smpl = llama_cpp.llama_sampler_init_grammar(lm.vocab, grammar.encode(), b"root")
    parses = bool(smpl)
    if smpl:
        llama_cpp.llama_sampler_free(smpl)
    try:
        _check_repetitions(grammar)
        accepted = True
    except UnsupportedSchema:
        accepted = False
    assert accepted == parses


def test_repetition_check_refuses_bounds_llama_cpp_drops(lm: Vocab) -> None:
    grammar = 'root ::= "a"{0,2001}\n'
    assert lm.accepts(grammar, "a" * 2500)  # the bound is gone
    with pytest.raises(UnsupportedSchema):
        _check_repetitions(grammar)
