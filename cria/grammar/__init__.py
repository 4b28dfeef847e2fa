"""Grammars for structured output: JSON Schema -> GBNF for llama.cpp's grammar sampler.

See `cria.grammar.json_schema` for the design and the supported subset of JSON Schema.
"""

from cria.grammar.json_schema import (
    GrammarBuilder,
    SchemaError,
    UnsupportedSchema,
    json_object_grammar,
    json_schema_grammar,
    literal,
)
from cria.grammar.tool_calls import tool_call_grammar

__all__ = [
    "GrammarBuilder",
    "SchemaError",
    "UnsupportedSchema",
    "json_object_grammar",
    "json_schema_grammar",
    "literal",
    "tool_call_grammar",
]
