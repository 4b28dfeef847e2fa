"""cria.grammar: Strings (patterns, formats, lengths) and numbers.

Grammars are checked by llama.cpp's own grammar sampler, see `_grammar.Vocab`.
"""

from __future__ import annotations

import json
from fractions import Fraction
from typing import Any

import pytest

from cria.grammar import (
    SchemaError,
    UnsupportedSchema,
    json_schema_grammar,
)

from ._grammar import Vocab, check
from ._grammar import lm as lm

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
    for fmt in ("email", "uri", "hostname", "duration", "unknown-format"):  # unknown: ignored
        json_schema_grammar({"type": "string", "format": fmt})
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({"type": "string", "pattern": "^a", "format": "uri"})
    assert exc.value.feature == "combined string constraints"
    with pytest.raises(UnsupportedSchema) as exc:  # uri has no bounded length
        json_schema_grammar({"type": "string", "format": "uri", "maxLength": 100})
    assert exc.value.feature == "combined string constraints"
    with pytest.raises(UnsupportedSchema) as exc:  # no match of the pattern is short enough
        json_schema_grammar({"type": "string", "pattern": "^a{5}$", "maxLength": 3})
    assert exc.value.feature == "pattern with minLength/maxLength"
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
    with pytest.raises(UnsupportedSchema) as exc:  # rounded inward, no integer is left
        json_schema_grammar({"type": "number", "minimum": 0.1, "maximum": 0.5})
    assert exc.value.feature == "non-integer bound on a number"
    with pytest.raises(SchemaError, match="no integer"):
        json_schema_grammar({"type": "integer", "minimum": 3, "exclusiveMaximum": 3})
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar({"type": "integer", "multipleOf": 2.5})
    assert exc.value.feature == "multipleOf"


def test_integer_bounds_with_fractional_values(lm: Vocab) -> None:
    check(lm, {"type": "integer", "exclusiveMinimum": 0.5, "maximum": 2.5}, [1, 2], ["0", "3"])
