"""Structured output: response_format and tool schemas -> a llama.cpp grammar, or a 400.

A schema is first checked against the meta-schema of the draft its `$schema` names (2020-12 when
it names none, as OpenAI; invalid -> 400), then compiled to GBNF by cria.grammar; a feature the
grammar cannot enforce is a 400 naming it, never dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cria.api.protocol import ResponseFormat
from cria.chat.tools import Function, ToolChoice
from cria.errors import InvalidRequest
from cria.grammar import (
    SchemaError,
    UnsupportedSchema,
    json_object_grammar,
    json_schema_grammar,
    tool_call_grammar,
)

# With tool_choice auto, the output is free until a tool call's opening tag; the tool grammar
# applies from the tag on.
TOOL_CALL_TRIGGER = "<tool_call>"


def validator_class(schema: Any) -> Any:
    """jsonschema's validator for the draft `schema` declares (draft 4 reads `exclusiveMinimum:
    true` and `definitions` its own way), Draft 2020-12 when it declares none or an unknown one."""
    import jsonschema  # type: ignore[import-untyped]  # here: only requests with a schema need it
    from jsonschema import validators

    return validators.validator_for(schema, default=jsonschema.Draft202012Validator)


def _check_schema(schema: Any, param: str) -> None:
    if not isinstance(schema, dict | bool):
        raise InvalidRequest(f"{param} must be a JSON Schema object", param=param)
    import jsonschema  # type: ignore[import-untyped]  # here: only requests with a schema need it

    try:
        validator_class(schema).check_schema(schema)
    except RecursionError:
        raise InvalidRequest(f"{param} is nested too deeply", param=param) from None
    except jsonschema.SchemaError as exc:
        where = ".".join(str(p) for p in exc.absolute_path)
        raise InvalidRequest(
            f"{param} is not a valid JSON Schema{f' (at {where})' if where else ''}: {exc.message}",
            param=param,
        ) from None


def _compile(schema: Any, param: str) -> str:
    _check_schema(schema, param)
    try:
        return json_schema_grammar(schema)
    except RecursionError:
        raise InvalidRequest(f"{param} is nested too deeply", param=param) from None
    except UnsupportedSchema as exc:
        at = f" (at {exc.path})" if exc.path else ""
        raise InvalidRequest(
            f"{param} uses {exc.feature}{at}, which this server cannot enforce: {exc}",
            param=param,
            code="unsupported_schema",
        ) from None
    except SchemaError as exc:
        at = f" (at {exc.path})" if exc.path else ""
        raise InvalidRequest(f"{param} is not a valid schema{at}: {exc}", param=param) from None


def response_format_grammar(response_format: ResponseFormat | None) -> str | None:
    """The grammar that enforces `response_format`, or None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return json_object_grammar()
    spec = response_format.json_schema
    if spec is None:
        raise InvalidRequest(
            "response_format.json_schema is required with type json_schema",
            param="response_format.json_schema",
        )
    if not spec.name:
        raise InvalidRequest(
            "response_format.json_schema.name must not be empty", param="response_format.json_schema.name"
        )
    if spec.schema_ is None:  # OpenAI allows it to be absent: any JSON object
        return json_object_grammar()
    return _compile(spec.schema_, "response_format.json_schema.schema")


def check_tool_schemas(functions: Sequence[Function]) -> None:
    """Each function's parameters must be a valid schema this server can enforce."""
    for i, fn in enumerate(functions):
        _compile(fn.parameters, f"tools[{i}].function.parameters")


def _chosen(functions: Sequence[Function], choice: ToolChoice) -> list[Function]:
    return [f for f in functions if choice.mode != "named" or f.name == choice.name]


def tool_grammar(functions: Sequence[Function], choice: ToolChoice, *, parallel: bool) -> str:
    """The grammar of tool calls allowed by `choice` (auto, required: any function; named: that
    one)."""
    chosen = _chosen(functions, choice)
    return tool_call_grammar([(f.name, f.parameters) for f in chosen], parallel=parallel)


def call_checker(functions: Sequence[Function], choice: ToolChoice) -> Callable[[str, Any], bool]:
    """`accept(name, arguments)`: the function is one `choice` allows and the arguments validate
    against its parameters. The grammar already ensures both; this is the last check before a
    call goes out, so that a call that does not validate is never returned."""
    validators = {}
    for f in _chosen(functions, choice):
        parameters = f.parameters or {"type": "object"}
        validators[f.name] = validator_class(parameters)(parameters)

    def accept(name: str, arguments: Any) -> bool:
        validator = validators.get(name)
        try:
            return validator is not None and bool(validator.is_valid(arguments))
        except RecursionError:
            return False

    return accept
