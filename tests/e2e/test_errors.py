"""Bad input: OpenAI-shaped errors with the right status, never a 500, a hang or a dead engine."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL_ID, Server

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def assert_error(r: httpx.Response, status: int, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def chat(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **overrides}


def test_malformed_json(http: httpx.Client) -> None:
    r = http.post(CHAT, content=b'{"model": "x", "messages": [', headers={"content-type": "application/json"})
    assert_error(r, 400, code="invalid_json")
    assert_error(http.post(CHAT, content=b"[1, 2]", headers={"content-type": "application/json"}), 400)
    assert_error(http.post(CHAT, content=b""), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "Hi"}]}, "model"),
        (chat(messages=None), "messages"),
        (chat(messages=[]), "messages"),
        (chat(messages=[{"role": "wizard", "content": "Hi"}]), "messages[0].role"),
        (chat(messages=[{"role": "user", "content": 5}]), "messages[0].content"),
        (chat(temperature=3), "temperature"),
        (chat(temperature="hot"), "temperature"),
        (chat(top_p=1.5), "top_p"),
        (chat(max_tokens=0), "max_tokens"),
        (chat(max_tokens="10"), "max_tokens"),
        (chat(max_completion_tokens=0), "max_completion_tokens"),
        (chat(n=0), "n"),
        (chat(stream="yes"), "stream"),
        (chat(stop=["a", "b", "c", "d", "e"]), "stop"),
        (chat(presence_penalty=5), "presence_penalty"),
        (chat(logit_bias={"999999999": 1}), "logit_bias"),
        (chat(logit_bias={"9" * 5000: 1}), "logit_bias"),  # past int()'s digit limit
        (chat(seed=2**64), "seed"),  # int64, as OpenAI's
        (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), "messages[0].content[0]"),
        (chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), "messages[0].content[0].text"),
    ],
)
def test_invalid_chat_fields(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    assert_error(http.post(CHAT, json=body), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL_ID}, "prompt"),
        ({"model": MODEL_ID, "prompt": []}, "prompt"),
        ({"model": MODEL_ID, "prompt": [[]]}, "prompt"),
        ({"model": MODEL_ID, "prompt": 42}, "prompt"),
        ({"model": MODEL_ID, "prompt": [1, 10_000_000]}, "prompt"),
        ({"model": MODEL_ID, "prompt": [-1]}, "prompt"),
        ({"model": MODEL_ID, "prompt": "Hi", "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL_ID, "prompt": "Hi", "n": 1000}, "n"),
        ({"model": MODEL_ID, "prompt": "Hi", "logprobs": 6}, "logprobs"),
        ({"model": MODEL_ID, "prompt": "Hi", "seed": -(2**63) - 1}, "seed"),
        ({"model": MODEL_ID, "prompt": "Hi", "logit_bias": {"1" * 4301: 1}}, "logit_bias"),
        ({"model": MODEL_ID, "prompt": "Hi", "suffix": "x", "echo": True, "logprobs": 1}, "suffix"),
    ],
)
def test_invalid_completion_fields(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    assert_error(http.post(COMPLETIONS, json=body), 400, param=param)


def test_unknown_model_is_404(http: httpx.Client, client: openai.OpenAI) -> None:
    assert_error(http.post(CHAT, json=chat(model="gpt-4o")), 404, param="model", code="model_not_found")
    assert_error(http.post(COMPLETIONS, json={"model": "nope", "prompt": "Hi"}), 404, code="model_not_found")
    assert_error(http.get("/v1/models/nope"), 404, code="model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get(CHAT), 405)


def test_context_overflow_is_400_not_truncation(http: httpx.Client) -> None:
    long_prompt = "word " * 3000
    assert_error(http.post(COMPLETIONS, json={"model": MODEL_ID, "prompt": long_prompt}), 400, code="context_length_exceeded")
    err = assert_error(http.post(COMPLETIONS, json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 5000}), 400, code="context_length_exceeded")
    assert err["param"] == "max_tokens"
    assert_error(http.post(CHAT, json=chat(messages=[{"role": "user", "content": long_prompt}], max_tokens=None)), 400, code="context_length_exceeded")
    assert_error(http.post(CHAT, json=chat(max_tokens=None, max_completion_tokens=4000)), 400, code="context_length_exceeded", param="max_completion_tokens")


def test_body_over_limit_is_413(http: httpx.Client) -> None:
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * (9 * 1024 * 1024)}])).encode()
    assert_error(http.post(CHAT, content=big, headers={"content-type": "application/json"}), 413)


def test_streaming_request_errors_before_headers_are_plain_json(http: httpx.Client) -> None:
    assert_error(http.post(CHAT, json=chat(stream=True, model="nope")), 404)
    assert_error(http.post(COMPLETIONS, json={"model": MODEL_ID, "prompt": "x " * 3000, "stream": True}), 400, code="context_length_exceeded")


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], temperature=5)
    assert info.value.status_code == 400


def test_engine_survives_all_of_the_above(server: Server, client: openai.OpenAI) -> None:
    assert server.health()["status"] == "ok"
    r = client.completions.create(model=MODEL_ID, prompt="Still alive?", max_tokens=2, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens >= 1
    assert server.wait_idle()["n_running"] == 0
