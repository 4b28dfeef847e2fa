"""The grammar of forced tool calls: `<tool_call>` blocks whose arguments follow each function's
parameters schema (compiled by `cria.grammar.json_schema`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cria.grammar.json_schema import GrammarBuilder, SchemaError, literal


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def _alts(alternatives: Sequence[str]) -> str:
    unique = list(dict.fromkeys(alternatives))
    return unique[0] if len(unique) == 1 else "(" + " | ".join(unique) + ")"


def tool_call_grammar(functions: Sequence[tuple[str, dict[str, Any]]], *, parallel: bool) -> str:
    """A grammar for forced calls of `functions` ((name, parameters schema) pairs; an empty
    schema means any object): one block, or with `parallel` one or more (no upper bound)
    separated by "\\n", and nothing after the last:

        <tool_call>
        {"name": "NAME", "arguments": ARGS}
        </tool_call>
    """
    if not functions:
        raise SchemaError("no function to call")
    names = [name for name, _ in functions]
    if len(set(names)) != len(names):
        raise SchemaError("two functions have the same name")
    builder = GrammarBuilder()
    calls = []
    for name, parameters in functions:
        try:
            arguments = builder.schema_rule(parameters or {"type": "object"}, name=f"{name}-args")
        except SchemaError as exc:
            exc.message = f"function {name!r}: {exc.message}"
            raise
        calls.append(
            _seq(literal(json.dumps(name, ensure_ascii=False) + ', "arguments": '), arguments)
        )
    call = builder.add_rule(
        "tool-call",
        _seq(literal('<tool_call>\n{"name": '), _alts(calls), literal("}\n</tool_call>")),
    )
    return builder.render(f'{call} ("\\n" {call})*' if parallel else call)
