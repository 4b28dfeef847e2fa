"""Strict mode: every request field this server does not honour is refused, never dropped.

A field is honoured when it changes the output as OpenAI documents it, or when OpenAI itself
gives it no effect on the output (ids such as `user`, cache hints; prefix caching is automatic
here). Undeclared fields, and OpenAI fields whose requested value cannot be honoured (audio
output, `store: true`, predicted outputs...), are refused with 400 naming the `param`. With
`--lenient` they are accepted and each response lists them in the `x-cria-ignored-params`
header.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from cria.errors import InvalidRequest

IGNORED_PARAMS_HEADER = "x-cria-ignored-params"


@dataclass(frozen=True, slots=True)
class Unhonoured:
    param: str
    message: str
    code: str  # unknown_parameter | unsupported_parameter | unsupported_value


def _is_none(value: Any) -> bool:
    return value is None


def _is_in(*allowed: Any) -> Callable[[Any], bool]:
    # Compared with the type too: `store: 0` is not `store: false` (0 == False in Python).
    return lambda value: (
        value is None or any(type(value) is type(a) and value == a for a in allowed)
    )


# OpenAI fields declared as Any in protocol.py: the values this server honours, and why not
# otherwise.
JUDGED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "store": (_is_in(False), "stored completions are not kept by this server"),
    "service_tier": (_is_in("auto", "default"), "this server has one service tier"),
    "modalities": (_is_in(["text"]), "this model outputs text only"),
    "prompt_cache_retention": (
        _is_in("in_memory"),
        "prompts are cached in memory only (automatically)",
    ),
    "prompt_cache_options": (_is_none, "prompt caching is automatic and in memory only"),
    "verbosity": (_is_none, "this model has no verbosity control"),
    "reasoning_effort": (_is_in("none"), "this model is not a reasoning model"),
    "audio": (_is_none, "this model outputs text only"),
    "prediction": (_is_none, "predicted outputs are not supported"),
    "web_search_options": (_is_none, "web search is not available on a local server"),
    "moderation": (_is_none, "moderation is not available on a local server"),
    "function_call": (_is_none, "deprecated: use tools and tool_choice"),
    "functions": (_is_none, "deprecated: use tools and tool_choice"),
    "include_obfuscation": (_is_in(False), "streams are not obfuscated by this server"),
}


def _walk(model: BaseModel, prefix: str) -> Iterator[Unhonoured]:
    for name in model.model_extra or {}:
        yield Unhonoured(
            prefix + name, f"unrecognized request argument supplied: {prefix}{name}", "unknown_parameter"
        )
    for name in type(model).model_fields:
        value = getattr(model, name)
        judged = JUDGED.get(name)
        if judged is not None and not judged[0](value):
            yield Unhonoured(
                prefix + name,
                f"{prefix}{name}={value!r} is not supported: {judged[1]}",
                "unsupported_value",
            )
        elif isinstance(value, BaseModel):
            yield from _walk(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _walk(item, f"{prefix}{name}[{i}].")


def dict_extras(value: Any, allowed: set[str], prefix: str) -> list[Unhonoured]:
    """Keys of a free-form object (e.g. a tool definition) that this server does not know."""
    if not isinstance(value, dict):
        return []
    return [
        Unhonoured(prefix + key, f"unrecognized request argument supplied: {prefix}{key}", "unknown_parameter")
        for key in value
        if key not in allowed
    ]


def unhonoured(request: BaseModel) -> list[Unhonoured]:
    """Every field of a validated request that this server would not honour."""
    return list(_walk(request, ""))


def check(request: BaseModel, *, lenient: bool, more: list[Unhonoured] | None = None) -> list[str]:
    """Refuse the request (400 naming the first such field) if it holds fields this server does
    not honour; with `lenient`, return their names instead (for the response header)."""
    problems = unhonoured(request) + (more or [])
    if not problems:
        return []
    if lenient:
        return [p.param for p in problems]
    first = problems[0]
    hint = " (start the server with --lenient to accept and ignore such fields)"
    raise InvalidRequest(first.message + hint, param=first.param, code=first.code)


def ignored_headers(params: list[str]) -> dict[str, str]:
    return {IGNORED_PARAMS_HEADER: ",".join(params)} if params else {}
