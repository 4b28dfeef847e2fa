"""Strict mode (pure): which fields of a validated request are not honoured, and what
check() does with them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from cria.api import strict
from cria.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from cria.errors import InvalidRequest

USER = [{"role": "user", "content": "Hi"}]


def chat(**extra: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(json.dumps({"model": "m", "messages": USER, **extra}))


def test_a_plain_request_has_nothing_unhonoured() -> None:
    assert strict.unhonoured(chat(temperature=0.5, n=2, stop=["x"])) == []
    assert strict.check(chat(), lenient=False) == []


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"frobnicate": 1}, "frobnicate", "unknown_parameter"),
        ({"store": True}, "store", "unsupported_value"),
        ({"store": 0}, "store", "unsupported_value"),  # 0 == False in Python: not false in JSON
        ({"store": 0.0}, "store", "unsupported_value"),
        ({"service_tier": "priority"}, "service_tier", "unsupported_value"),
        ({"modalities": ["audio"]}, "modalities", "unsupported_value"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_value"),
        ({"verbosity": "low"}, "verbosity", "unsupported_value"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction", "unsupported_value"),
        ({"prompt_cache_retention": "24h"}, "prompt_cache_retention", "unsupported_value"),
        ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation", "unsupported_value"),
        ({"messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}]}, "messages[0].audio", "unsupported_value"),
        ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages[0].extra", "unknown_parameter"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}", "x": 1}}]}]},
         "messages[0].tool_calls[0].function.x", "unknown_parameter"),
    ],
)
def test_unhonoured_fields_are_named(extra: dict[str, Any], param: str, code: str) -> None:
    req = chat(**extra)
    problems = strict.unhonoured(req)
    assert [(p.param, p.code) for p in problems] == [(param, code)]
    with pytest.raises(InvalidRequest) as info:
        strict.check(req, lenient=False)
    assert info.value.param == param
    assert info.value.code == code
    assert "--lenient" in info.value.message


@pytest.mark.parametrize(
    "extra",
    [
        {"store": False}, {"service_tier": "auto"}, {"service_tier": "default"},
        {"modalities": ["text"]}, {"reasoning_effort": "none"}, {"prompt_cache_retention": "in_memory"},
        {"user": "u"}, {"safety_identifier": "s"}, {"prompt_cache_key": "k"}, {"metadata": {"a": "b"}},
        {"stream_options": {"include_usage": True, "include_obfuscation": False}},
        {"messages": [{"role": "assistant", "content": "x", "refusal": None, "annotations": [], "audio": None, "function_call": None}]},
    ],
)
def test_no_op_values_are_honoured(extra: dict[str, Any]) -> None:
    assert strict.unhonoured(chat(**extra)) == []


def test_lenient_lists_every_field() -> None:
    req = chat(frobnicate=1, store=True, stream_options={"include_usage": True, "zz": 2})
    # Unknown fields first, then declared ones in declaration order.
    assert strict.check(req, lenient=True) == ["frobnicate", "stream_options.zz", "store"]
    assert strict.ignored_headers(["a", "b"]) == {strict.IGNORED_PARAMS_HEADER: "a,b"}
    assert strict.ignored_headers([]) == {}


def test_completion_and_embedding_requests() -> None:
    req = CompletionRequest.model_validate_json(json.dumps({"model": "m", "prompt": "x", "cache_prompt": True}))
    assert [p.param for p in strict.unhonoured(req)] == ["cache_prompt"]
    emb = EmbeddingRequest.model_validate_json(json.dumps({"model": "m", "input": "x", "truncate": True}))
    assert [p.param for p in strict.unhonoured(emb)] == ["truncate"]
