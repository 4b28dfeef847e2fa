"""Every route, streaming and not, through the official client and raw HTTP."""

from __future__ import annotations

import json

import httpx
import openai

from tests.e2e.conftest import MODEL_ID, Server


def sse_events(response: httpx.Response) -> list[str]:
    """The data payloads of an SSE response, in order (comments and blank lines dropped)."""
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


def test_models_list_and_get(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_ID]
    model = client.models.retrieve(MODEL_ID)
    assert model.id == MODEL_ID and model.object == "model"
    assert isinstance(model.created, int) and model.owned_by


def test_health_reports_engine(http: httpx.Client) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["model"] == MODEL_ID
    assert body["engine"]["n_slots"] == 8
    head = http.head("/health")  # what some monitors send
    assert head.status_code == 200 and head.content == b""


def test_completion_non_streaming(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert r.usage is not None
    assert r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_completion_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_ID, prompt="Count: 1, 2, 3,", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage is not None and r.usage.completion_tokens == 16
    assert r.choices[0].finish_reason == "length"


def test_completion_prompt_forms_each_a_choice(client: openai.OpenAI) -> None:
    text = client.completions.create(model=MODEL_ID, prompt="Hello there", max_tokens=3, temperature=0)
    ids = client.completions.create(model=MODEL_ID, prompt=["Hello there", "Good morning"], max_tokens=3, temperature=0)
    assert [c.index for c in ids.choices] == [0, 1]
    assert ids.choices[0].text == text.choices[0].text
    # token prompts: one list, and a list of lists
    tokens = [19556, 665]
    one = client.completions.create(model=MODEL_ID, prompt=tokens, max_tokens=3, temperature=0)
    two = client.completions.create(model=MODEL_ID, prompt=[tokens, tokens], max_tokens=3, temperature=0)
    assert one.usage is not None and one.usage.prompt_tokens == 2
    assert len(two.choices) == 2 and two.choices[0].text == two.choices[1].text == one.choices[0].text
    assert two.usage is not None and two.usage.prompt_tokens == 4


def test_completion_n_and_echo(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=4, n=3, temperature=0.9, seed=5)
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage is not None and r.usage.completion_tokens <= 12
    echoed = client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=4, temperature=0, echo=True)
    plain = client.completions.create(model=MODEL_ID, prompt="The sky is", max_tokens=4, temperature=0)
    assert echoed.choices[0].text == "The sky is" + plain.choices[0].text


def test_completion_streaming_with_usage(server: Server) -> None:
    body = {"model": MODEL_ID, "prompt": "One, two,", "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 6
    text_chunks = chunks[:-1]
    assert all(c["object"] == "text_completion" for c in text_chunks)
    assert [c["choices"][0]["finish_reason"] for c in text_chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in text_chunks[:-1])
    streamed = "".join(c["choices"][0]["text"] for c in text_chunks)
    plain_body = {k: v for k, v in body.items() if k != "stream_options"}  # only with stream
    plain = httpx.post(server.v1 + "/completions", json={**plain_body, "stream": False}, timeout=60).json()
    assert streamed == plain["choices"][0]["text"]


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=12,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert r.choices[0].finish_reason in {"stop", "length"}
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 12


def test_chat_content_parts_and_developer_role(client: openai.OpenAI) -> None:
    as_parts = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "developer", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "Hi!"}]}],
        max_tokens=8, temperature=0,
    )
    as_text = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}],
        max_tokens=8, temperature=0,
    )
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage == as_text.usage or (
        as_parts.usage is not None and as_text.usage is not None
        and as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens
    )


def test_chat_max_completion_tokens(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Write a long story."}],
        max_completion_tokens=5, temperature=0, extra_body={"ignore_eos": True},
    )
    assert r.usage is not None and r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"


def test_chat_streaming(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Tell me about llamas."}],
        max_tokens=10, temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    usage = chunks[-1]
    assert usage.choices == [] and usage.usage is not None and usage.usage.completion_tokens == 10
    last = chunks[-2]
    assert last.choices[0].finish_reason == "length"
    assert all(c.usage is None for c in chunks[:-1])
    content = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    plain = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Tell me about llamas."}],
        max_tokens=10, temperature=0, extra_body={"ignore_eos": True},
    )
    assert content == plain.choices[0].message.content


def test_chat_stream_raw_done_last(server: Server) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server.v1 + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    finishes = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finishes[-1] in {"stop", "length"} and all(f is None for f in finishes[:-1])


def test_chat_n_choices_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, n=2,
        temperature=0.8, seed=1, stream=True,
    )
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}
