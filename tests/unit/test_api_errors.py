"""Validation errors of request bodies -> OpenAI-shaped errors naming the parameter."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from cria.api.errors import _param_of, error_body, error_response, from_validation_error
from cria.api.protocol import ChatCompletionRequest, CompletionRequest
from cria.errors import (
    ContextOverflow,
    EngineLoading,
    EngineUnavailable,
    InvalidRequest,
    Overloaded,
)

USER = [{"role": "user", "content": "hi"}]


def chat_error(body: Any) -> InvalidRequest:
    raw = body if isinstance(body, str) else json.dumps(body)
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate_json(raw)
    return from_validation_error(info.value)


def completion_error(body: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate_json(json.dumps(body))
    return from_validation_error(info.value)


@pytest.mark.parametrize(
    ("loc", "param"),
    [
        ((), None),
        (("temperature",), "temperature"),
        (("messages", 0, "role"), "messages[0].role"),
        (("messages", 3, "content", "str"), "messages[3].content"),
        (("messages", 0, "content", "list[ContentPart]", 1, "type"), "messages[0].content[1].type"),
        (("stop", "str"), "stop"),
        (("stop", "list[str]", 2), "stop[2]"),
        (("prompt", "list[list[int]]", 0, 5), "prompt[0][5]"),
        (("prompt", "function-after[_non_empty(), union[str,list[str]]]"), "prompt"),
        (("logit_bias", "50256"), "logit_bias"),
        (("stream_options", "include_usage"), "stream_options.include_usage"),
        (("x", "int"), "x"),
        (("x", "float"), "x"),
        (("x", "bool"), "x"),
        (("x", "dict"), "x"),
    ],
)
def test_param_of(loc: tuple[int | str, ...], param: str | None) -> None:
    assert _param_of(loc) == param


def test_malformed_json() -> None:
    err = chat_error('{"model": "m", "messages": [')
    assert err.code == "invalid_json"
    assert err.param is None
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert err.message.startswith("malformed JSON in the request body")


@pytest.mark.parametrize("body", ["[]", '"text"', "null", "42"])
def test_body_that_is_not_an_object(body: str) -> None:
    err = chat_error(body)
    assert err.code == "invalid_json"
    assert err.message == "the request body must be a JSON object"


@pytest.mark.parametrize("field", ["model", "messages"])
def test_missing_required_parameter(field: str) -> None:
    body: dict[str, Any] = {"model": "m", "messages": USER}
    del body[field]
    err = chat_error(body)
    assert err.code == "missing_required_parameter"
    assert err.param == field
    assert err.message == f"missing required parameter: '{field}'"


def test_missing_nested_parameter() -> None:
    err = chat_error({"model": "m", "messages": [{"content": "x"}]})
    assert err.code == "missing_required_parameter"
    assert err.param == "messages[0].role"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [*USER, {"role": "user", "content": 5}]}, "messages[1].content"),
        ({"temperature": 3}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "0.5"}, "temperature"),  # strict: never coerced
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": 5}, "stop"),
        ({"logit_bias": {"50": 500}}, "logit_bias"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"repeat_penalty": 0}, "repeat_penalty"),
        ({"seed": "1"}, "seed"),
    ],
)
def test_invalid_value_names_the_parameter(extra: dict[str, Any], param: str) -> None:
    body = {"model": "m", "messages": USER, **extra}
    err = chat_error(body)
    assert err.code == "invalid_value"
    assert err.param == param
    assert err.message.startswith(f"invalid value for '{param}': ")


def test_union_field_lists_each_reason_once() -> None:
    err = chat_error({"model": "m", "messages": USER, "stop": ["a", "b", "c", "d", "e"]})
    assert err.param == "stop"
    assert "valid string" in err.message  # the str member
    assert "at most 4 items" in err.message  # the list member


def test_repeated_reasons_are_not_duplicated() -> None:
    err = completion_error({"model": "m", "prompt": [1, "a"]})
    assert err.param == "prompt"
    reasons = err.message.split(": ", 1)[1].split("; ")
    assert len(reasons) == len(set(reasons))
    assert "Input should be a valid string" in reasons


def test_content_part_error_names_the_message() -> None:
    err = chat_error({"model": "m", "messages": [{"role": "user", "content": [{"text": "a"}]}]})
    assert err.param == "messages[0].content"


@pytest.mark.parametrize("prompt", [[], [[]], [[1], []]])
def test_empty_prompt_list(prompt: list[Any]) -> None:
    err = completion_error({"model": "m", "prompt": prompt})
    assert err.param == "prompt"
    assert err.code == "invalid_value"
    assert "must not be an empty list" in err.message


def test_valid_bodies_pass_and_ignore_unknown_fields() -> None:
    req = ChatCompletionRequest.model_validate_json(
        json.dumps({"model": "m", "messages": USER, "stop": "x", "frobnicate": 1})
    )
    assert req.stop_list == ("x",)
    body = {"model": "m", "prompt": [[1, 2], [3]], "stop": ["", "y"]}
    req2 = CompletionRequest.model_validate_json(json.dumps(body))
    assert req2.stop_list == ("y",)


def test_empty_error_list() -> None:
    err = from_validation_error(ValidationError.from_exception_data("Body", []))
    assert err.message == "invalid request body"
    assert err.param is None


def test_error_body_shape() -> None:
    err = chat_error({"model": "m", "messages": USER, "temperature": 9})
    assert error_body(err) == {
        "error": {
            "message": err.message,
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }


def test_error_classes_fix_status_and_code() -> None:
    overflow = ContextOverflow("too long", param="messages")
    assert (overflow.status, overflow.type, overflow.code) == (
        400,
        "invalid_request_error",
        "context_length_exceeded",
    )
    busy = Overloaded("busy")
    assert (busy.status, busy.type, busy.code) == (429, "rate_limit_error", "server_overloaded")
    assert busy.retry_after == 1
    assert InvalidRequest("x", code="custom").code == "custom"
    assert InvalidRequest("x").code is None


@pytest.mark.parametrize(
    ("error", "retry_after"),
    [
        (Overloaded("busy"), "1"),  # the queue is full: it drains
        (EngineLoading("loading"), "1"),  # the model loads (again): it will be ready
        (EngineUnavailable("dead"), None),  # dead: retrying will not help
        (InvalidRequest("bad"), None),
    ],
)
def test_retry_after_only_where_a_retry_can_work(error: Exception, retry_after: str | None) -> None:
    assert isinstance(error, (Overloaded, EngineUnavailable, InvalidRequest))
    response = error_response(error)
    assert response.headers.get("retry-after") == retry_after
    assert response.status_code == error.status
