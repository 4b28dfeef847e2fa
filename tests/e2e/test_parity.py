"""OpenAI parity on the real server: logprobs, n sharing the prompt's KV, best_of, suffix,
strict mode, /tokenize, /detokenize and /v1/capabilities. Structure and behaviour only."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL_ID, Server, start_server, stop_server
from tests.e2e.test_metrics import scrape, value

PROMPT = "The three primary colours are red, yellow and"


def _sse(http: httpx.Client, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    import json

    chunks = []
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


# ---- logprobs ----


def test_chat_logprobs_shape_and_greedy_token_is_the_top_one(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    assert "".join(e.token for e in content) == choice.message.content
    for e in content:
        assert e.logprob <= 0.0
        assert bytes(e.bytes or []).decode("utf-8", errors="replace") == e.token
        assert len(e.top_logprobs) == 5
        tops = [t.logprob for t in e.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert e.top_logprobs[0].token == e.token
        assert math.isclose(e.top_logprobs[0].logprob, e.logprob, rel_tol=1e-5, abs_tol=1e-6)
        assert sum(math.exp(t) for t in tops) <= 1.0 + 1e-4


def test_chat_logprobs_without_top(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
        temperature=0, logprobs=True, extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 3
    assert all(e.top_logprobs == [] for e in content)


def test_no_logprobs_unless_asked(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert r.choices[0].logprobs is None


def test_streamed_chat_logprobs_equal_non_streamed(http: httpx.Client) -> None:
    body = {
        "model": MODEL_ID, "messages": [{"role": "user", "content": "Count to five."}],
        "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3, "ignore_eos": True,
    }
    whole = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    chunks = _sse(http, "/v1/chat/completions", {**body, "stream": True})
    streamed = [
        e for c in chunks for ch in c["choices"] if ch["logprobs"] for e in ch["logprobs"]["content"]
    ]
    assert [e["token"] for e in streamed] == [e["token"] for e in whole["logprobs"]["content"]]
    assert len(streamed) == 12
    for a, b in zip(streamed, whole["logprobs"]["content"]):
        assert math.isclose(a["logprob"], b["logprob"], abs_tol=1e-4)


def test_completion_logprobs_shape(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None
    assert len(lp.tokens) == len(lp.token_logprobs or []) == len(lp.text_offset or []) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert lp.top_logprobs is not None
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs or [], lp.top_logprobs):
        assert len(top) <= 3 and token in top  # greedy: the sampled token is among the top
        assert math.isclose(max(top.values()), logprob, abs_tol=1e-5)


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    prompt_tokens = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=1).usage.prompt_tokens
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=1, echo=True,
        extra_body={"ignore_eos": True},
    )
    choice = r.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.tokens is not None
    assert len(lp.tokens) == prompt_tokens + 2
    assert choice.text.startswith(PROMPT)
    assert "".join(lp.tokens) == choice.text
    assert lp.token_logprobs[0] is None  # the first token has no context
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])


def test_max_tokens_zero_with_echo_returns_prompt_logprobs_only(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True
    )
    choice = r.choices[0]
    assert choice.text == PROMPT
    assert r.usage.completion_tokens == 0
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert len(choice.logprobs.tokens) == r.usage.prompt_tokens


def test_echo_prompt_logprobs_are_stable_across_calls(client: openai.OpenAI) -> None:
    """The prompt's logprobs do not depend on the cache state (prefix reuse is off for them)."""
    runs = [
        client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=0, logprobs=0, echo=True)
        for _ in range(2)
    ]
    a, b = (r.choices[0].logprobs.token_logprobs for r in runs)  # type: ignore[union-attr]
    assert a is not None and b is not None
    assert all(x == y or math.isclose(x, y, abs_tol=1e-3) for x, y in zip(a[1:], b[1:]))  # type: ignore[arg-type]


def test_bad_logprobs_values_are_400(http: httpx.Client) -> None:
    chat = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x"}]}
    for body, param in [
        ({**chat, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({**chat, "top_logprobs": 2}, "top_logprobs"),
    ]:
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x", "logprobs": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "x", "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


# ---- n with a shared prompt, best_of ----


def test_n_choices_share_one_prefill(server: Server, client: openai.OpenAI) -> None:
    """n choices: the prompt is computed once; the other choices copy its KV cache and
    compute only its last token (to get their own first-token logits)."""
    server.wait_idle()
    before, _ = scrape(server)
    prompt = "A unique prompt about otters and their habits, told at some length: " * 6
    n = 4
    r = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=1.0, seed=7, n=n,
        extra_body={"ignore_eos": True},
    )
    assert len(r.choices) == n and sorted(c.index for c in r.choices) == list(range(n))
    assert len({c.text for c in r.choices}) > 1  # different samples
    n_prompt = r.usage.prompt_tokens
    after, _ = scrape(server)
    computed = (
        value(after, "cria_prompt_tokens", "cria_prompt_tokens_total")
        - value(before, "cria_prompt_tokens", "cria_prompt_tokens_total")
        - value(after, "cria_prefix_cache_hit_tokens", "cria_prefix_cache_hit_tokens_total")
        + value(before, "cria_prefix_cache_hit_tokens", "cria_prefix_cache_hit_tokens_total")
    )
    assert computed <= n_prompt + (n - 1), (computed, n_prompt)


def test_best_of_returns_n_choices_and_bills_all(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=3, n=2, best_of=4,
        extra_body={"ignore_eos": True},
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 16  # every candidate was generated
    assert all(c.logprobs is None for c in r.choices)  # not asked for


def test_best_of_picks_the_most_likely(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=11, n=1, best_of=3,
        logprobs=0, extra_body={"ignore_eos": True},
    )
    best = r.choices[0].logprobs.token_logprobs  # type: ignore[union-attr]
    assert best is not None
    candidates = [
        client.completions.create(
            model=MODEL_ID, prompt=PROMPT, max_tokens=4, temperature=1.0, seed=11 + j,
            logprobs=0, extra_body={"ignore_eos": True},
        ).choices[0].logprobs.token_logprobs  # type: ignore[union-attr]
        for j in range(3)
    ]
    means = [sum(c) / len(c) for c in candidates if c]  # type: ignore[arg-type, misc]
    assert math.isclose(sum(best) / len(best), max(means), abs_tol=1e-3)  # type: ignore[arg-type]


def test_best_of_errors(http: httpx.Client) -> None:
    base = {"model": MODEL_ID, "prompt": "x"}
    for extra in ({"best_of": 1, "n": 2}, {"best_of": 3, "stream": True}, {"best_of": 21}):
        r = http.post("/v1/completions", json={**base, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == "best_of", extra


def test_suffix_without_fim_tokens_is_400(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "def f(", "suffix": "    return x"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "suffix"


# ---- strict mode ----


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        ("/v1/chat/completions", {"frobnicate": 1}, "frobnicate"),
        ("/v1/chat/completions", {"store": True}, "store"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
        ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "mp3"}}, "audio"),
        ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        ("/v1/chat/completions", {"reasoning_effort": "high"}, "reasoning_effort"),
        ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
        ("/v1/chat/completions", {"stream_options": {"include_usage": True, "x": 1}}, "stream_options.x"),
        ("/v1/completions", {"n_predict": 5}, "n_predict"),
        ("/v1/embeddings", {"truncate": True}, "truncate"),
    ],
)
def test_strict_mode_refuses_what_it_does_not_honour(
    http: httpx.Client, path: str, extra: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": MODEL_ID}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "Hi"}]
        body["max_tokens"] = 2
    elif path == "/v1/completions":
        body["prompt"] = "Hi"
    else:
        body["input"] = "Hi"
    r = http.post(path, json={**body, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["code"] in ("unknown_parameter", "unsupported_value")


def test_strict_mode_refuses_unknown_message_fields(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi", "colour": "red"}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "messages[0].colour"


def test_no_op_values_of_openai_fields_are_accepted(client: openai.OpenAI) -> None:
    """Values that ask for nothing this server lacks pass in strict mode."""
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
        store=False, service_tier="auto", modalities=["text"], user="u-1", metadata={"a": "b"},
        safety_identifier="s-1", prompt_cache_key="k", parallel_tool_calls=True,
    )
    assert r.choices[0].finish_reason in ("stop", "length")


def test_assistant_message_sent_back_as_history(client: openai.OpenAI) -> None:
    """The SDK's message object of a previous response can be appended to the history."""
    messages: list[Any] = [{"role": "user", "content": "Hi"}]
    first = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4)
    messages += [first.choices[0].message.model_dump(), {"role": "user", "content": "Again"}]
    second = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=4)
    assert second.choices[0].message.role == "assistant"


@pytest.fixture(scope="module")
def lenient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("lenient"), "--lenient", "--parallel", "2")
    yield srv
    stop_server(srv)


def test_lenient_mode_accepts_and_lists_ignored_fields(lenient: Server) -> None:
    with httpx.Client(base_url=lenient.base_url, timeout=60) as http:
        r = http.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
            "frobnicate": 1, "store": True,
        })
        assert r.status_code == 200
        assert r.headers["x-cria-ignored-params"] == "frobnicate,store"
        r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200
        assert "x-cria-ignored-params" not in r.headers
        caps = http.get("/v1/capabilities").json()["data"][0]
        assert caps["strict"] is False


# ---- extensions ----


def test_tokenize_and_detokenize_round_trip(http: httpx.Client, client: openai.OpenAI) -> None:
    r = http.post("/tokenize", json={"content": PROMPT})
    assert r.status_code == 200
    body = r.json()
    assert body["count"] == len(body["tokens"]) > 0
    # It counts what /v1/completions will bill.
    usage = client.completions.create(model=MODEL_ID, prompt=PROMPT, max_tokens=1).usage
    assert body["count"] == usage.prompt_tokens
    back = http.post("/detokenize", json={"tokens": body["tokens"]}).json()
    assert back["content"] == PROMPT
    pieces = http.post("/tokenize", json={"content": PROMPT, "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == body["tokens"]
    assert "".join(p["piece"] for p in pieces) == PROMPT


def test_tokenize_messages_counts_the_chat_prompt(http: httpx.Client, client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    count = http.post("/tokenize", json={"messages": messages}).json()["count"]
    usage = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=1).usage  # type: ignore[arg-type]
    assert count == usage.prompt_tokens


def test_tokenize_errors(http: httpx.Client) -> None:
    assert http.post("/tokenize", json={}).status_code == 400
    assert http.post("/tokenize", json={"content": "a", "prompt": "b"}).status_code == 400
    r = http.post("/detokenize", json={"tokens": [1, 10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tokens[1]"
    r = http.post("/tokenize", json={"content": "a", "model": "nope"})
    assert r.status_code == 404


def test_capabilities(http: httpx.Client) -> None:
    body = http.get("/v1/capabilities").json()
    assert body["object"] == "list"
    caps = body["data"][0]
    assert caps["id"] == MODEL_ID
    assert caps["tools"] == "convention"  # SmolLM2's template does not render tools
    assert caps["fill_in_the_middle"] is False
    assert caps["embeddings"] is True
    assert caps["strict"] is True
    assert "response_format" in caps["parameters"]["/v1/chat/completions"]
    assert "suffix" in caps["parameters"]["/v1/completions"]
    assert "json_schema" in caps["structured_output"]


# ---- review findings: limits, combinations, free-form objects ----


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": 2, "max_completion_tokens": 2}, "max_tokens"),
        ({"response_format": {"type": "json_object", "schema": {"type": "object"}}}, "response_format.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "bogus": 1}}},
         "response_format.json_schema.bogus"),
        ({"tools": [{"type": "function", "function": {"name": "f"}, "extra": 1}]}, "tools[0].extra"),
        ({"tools": [{"type": "function", "function": {"name": "f", "colour": "red"}}]}, "tools[0].function.colour"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "f", "x": 1}}}, "tool_choice.function.x"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"anyOf": [{"$ref": "#"}, {"type": "string"}]}}}},
         "response_format.json_schema.schema"),  # left recursion
        ({"logit_bias": {"²": 1}}, "logit_bias"),
    ],
)
def test_chat_requests_refused_with_the_param(http: httpx.Client, body: dict[str, Any], param: str) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_deeply_nested_schema_is_400(http: httpx.Client) -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(150):
        schema = {"type": "array", "items": schema}
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "deep", "schema": schema}}})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"


def test_refusal_parts_in_history_are_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_ID, max_tokens=2, messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "refusal", "refusal": "I cannot."}]},
        {"role": "user", "content": "Fine."},
    ])
    assert r.choices[0].message.role == "assistant"


def test_completion_n_and_best_of_limits(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": "Hi", "n": 12, "max_tokens": 1})
    assert r.status_code == 200 and len(r.json()["choices"]) == 12
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": ["a"] * 20, "best_of": 20, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"
    r = http.post("/v1/completions", json={"model": MODEL_ID, "prompt": ["a"] * 300, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_cached_tokens_with_n_count_the_prompt_once(client: openai.OpenAI) -> None:
    prompt = "A fresh prompt about pelicans that no earlier test has sent, long enough to matter. " * 4
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=1, n=3)
    details = r.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None
    assert details.cached_tokens < r.usage.prompt_tokens  # the first choice computed it


def test_tokenize_refuses_fields_it_would_ignore(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"messages": [{"role": "user", "content": "x"}], "add_special": False})
    assert r.status_code == 400 and r.json()["error"]["param"] == "add_special"
    r = http.post("/tokenize", json={"content": "x", "tools": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_non_streamed_logprobs_have_a_memory_budget(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "n": 128,
        "logprobs": True, "top_logprobs": 20, "max_tokens": 1000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
