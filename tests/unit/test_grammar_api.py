"""cria.grammar: pydantic / the openai SDK, json_object and tool-call grammars, the builder API and random
generation.

Grammars are checked by llama.cpp's own grammar sampler, see `_grammar.Vocab`.
"""

from __future__ import annotations

import datetime
import enum
import json
import random
from typing import Literal

import jsonschema  # type: ignore[import-untyped, unused-ignore]
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

from ._grammar import WEATHER, Vocab
from ._grammar import lm as lm

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
            [("f", {"type": "object", "properties": {"a": {"not": {"minimum": 1}}}})],
            parallel=False,
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


def test_input_schema_is_not_modified() -> None:
    schema = to_strict_json_schema(Person)
    schema["properties"]["extra"] = {"type": ["number", "integer"], "allOf": [{"minimum": 0}]}
    before = json.dumps(schema, sort_keys=True)
    json_schema_grammar(schema)
    assert json.dumps(schema, sort_keys=True) == before
