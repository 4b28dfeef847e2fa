"""Defects an adversarial review found (each a grammar looser than its schema), kept fixed."""

from __future__ import annotations

import pytest

from cria.engine.constrained import _utf8_tail
from cria.grammar import UnsupportedSchema, json_schema_grammar

from ._grammar import Vocab
from ._grammar import lm as lm


def test_max_contains_counts_even_when_min_contains_is_zero(lm: Vocab) -> None:
    with pytest.raises(UnsupportedSchema):
        json_schema_grammar({"type": "array", "items": {"type": "integer"}, "contains": {"type": "integer"},
                             "minContains": 0, "maxContains": 0})
    # contains that every item matches: maxContains bounds the items.
    grammar = json_schema_grammar({"type": "array", "contains": True, "minContains": 0, "maxContains": 1})
    assert lm.accepts(grammar, "[]")
    assert lm.accepts(grammar, "[1]")
    assert not lm.accepts(grammar, "[1, 2]")


def test_a_ref_under_a_nested_id_that_means_another_target_is_refused() -> None:
    schema = {
        "$id": "http://x/r", "type": "object", "required": ["p"],
        "properties": {"p": {"$id": "http://x/sub/", "$defs": {"T": {"type": "string"}}, "$ref": "#/$defs/T"}},
        "$defs": {"T": {"type": "integer"}},
    }
    with pytest.raises(UnsupportedSchema) as exc:
        json_schema_grammar(schema)
    assert exc.value.feature == "$id"


def test_a_ref_under_a_nested_id_that_finds_nothing_there_keeps_the_root_reading(lm: Vocab) -> None:
    # JSON Schema Store gives definitions ids and still points at the root's definitions.
    schema = {
        "$id": "https://example.org/base.json",
        "definitions": {"path": {"$id": "path", "type": "string", "maxLength": 3},
                        "nullable-path": {"$id": "nullable-path", "anyOf": [{"$ref": "#/definitions/path"}, {"type": "null"}]}},
        "$ref": "#/definitions/nullable-path",
    }
    grammar = json_schema_grammar(schema)
    assert lm.accepts(grammar, '"abc"') and lm.accepts(grammar, "null")
    assert not lm.accepts(grammar, '"abcd"')


@pytest.mark.parametrize(
    ("data", "tail"),
    [(b"abc", b""), ("é".encode(), b""), ("é".encode()[:1], b"\xc3"), ("€".encode()[:2], b"\xe2\x82"),
     (b"\xe0\x88\x92", None), (b"\xe0\x88", None), (b"\xed\xa0\x80", None), (b"\xff", None), (b"\xc3(", None)],
)
def test_utf8_tail(data: bytes, tail: bytes | None) -> None:
    assert _utf8_tail(data) == tail
