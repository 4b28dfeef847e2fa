"""cria.grammar: Limits: ambiguity, nesting, size and llama.cpp's repetition limits.

Grammars are checked by llama.cpp's own grammar sampler, see `_grammar.Vocab`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import llama_cpp
import pydantic
import pytest
from openai.lib._pydantic import to_strict_json_schema

from cria.grammar import (
    UnsupportedSchema,
    json_schema_grammar,
    tool_call_grammar,
)
from cria.grammar.limits import _check_repetitions

from ._grammar import Vocab, check
from ._grammar import lm as lm

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
        return lm.full_mask(smpl)[1]
    finally:
        llama_cpp.llama_sampler_free(smpl)


def refused(schema: Any) -> UnsupportedSchema:
    """The UnsupportedSchema the schema raises, in bounded time (a guard against a compiler
    that explodes before it refuses, not a speed test: ~1 s on a loaded core is normal)."""
    start = time.perf_counter()
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar(schema)
    assert time.perf_counter() - start < 10
    assert str(exc.value)
    return exc.value


def test_reviewer_schema_merges_into_one_unambiguous_array(lm: Vocab) -> None:
    # Branches that differ only in minItems (0, 1, 2: joined, minItems 0) become one, so the
    # grammar no longer triples llama.cpp's parse stacks at each "[" (10 s per apply by the 8th).
    start = time.perf_counter()
    grammar = json_schema_grammar(layered(12, min_items))
    assert time.perf_counter() - start < 10  # it exploded (minutes) before the merge
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
            {"anyOf": [{"type": "null"}, {"allOf": [{"$ref": "#"}], "minLength": 1}]},
            "anyOf.1.anyOf.1",
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
    for schema, feature in [  # lower bounds above 2000 (upper ones are lowered to 2000)
        ({"type": "string", "minLength": 5000}, "minLength above 2000"),
        ({"type": "array", "minItems": 2001}, "minItems above 2000"),
        ({"type": "string", "pattern": "^a{3000}$"}, "pattern: quantifier above 2000"),
        ({"type": "string", "pattern": "^(a{0,100}){0,30}$"}, "schema too large"),
    ]:
        assert refused(schema).feature == feature, schema
    long = json_schema_grammar({"type": "string", "maxLength": 10**6})  # stricter: 2000
    assert lm.accepts(long, '"' + "ab" * 1000 + '"')
    assert not lm.accepts(long, '"' + "ab" * 1000 + 'c"')
    many = check(lm, {"type": "array", "items": {"type": "integer"}, "maxItems": 2001}, [[1]], [])
    assert lm.accepts(many, "[" + ",".join(["1"] * 2000) + "]")
    assert not lm.accepts(many, "[" + ",".join(["1"] * 2001) + "]")


def test_many_declared_keys_with_extra_keys(lm: Vocab) -> None:
    # The grammar of "any other key" spells out the declared ones; split into rules so that
    # llama.cpp's parser does not refuse it.
    props = {f"p{i}": {"type": "integer"} for i in range(1000)}
    schema = {"type": "object", "properties": props, "additionalProperties": True}
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
