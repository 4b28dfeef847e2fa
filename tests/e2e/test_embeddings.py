"""POST /v1/embeddings with the official client and raw HTTP: input forms, encodings, dimensions,
vector properties, batching under concurrency, every error, and a dedicated --embedding-model."""

from __future__ import annotations

import base64
import math
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from cria.models.spec import bundled_model_path
from tests.e2e.conftest import MODEL_ID, Server, start_server, stop_server
from tests.e2e.test_errors import assert_error

EMBEDDINGS = "/v1/embeddings"
N_DIMS = 576  # SmolLM2-135M's hidden size

# Near-paraphrases and an unrelated sentence, checked against the bundled model (mean pooling):
# cosine 0.96 for the pair against 0.65 / 0.59 to the unrelated sentence; the second pair, 0.94
# against 0.66 / 0.72. The test asks for a margin of 0.1.
PARAPHRASES = [
    ("How do I reset my password?", "How can I change my password?", "The volcano erupted last night."),
    ("He bought a new car yesterday.", "Yesterday he purchased a new automobile.", "Penguins live in Antarctica."),
]
PARAPHRASE_A = PARAPHRASES[0][0]


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


def norm(v: Sequence[float]) -> float:
    return math.sqrt(math.fsum(x * x for x in v))


def embed(client: openai.OpenAI, inputs: Any, **kwargs: Any) -> list[list[float]]:
    r = client.embeddings.create(model=MODEL_ID, input=inputs, encoding_format="float", **kwargs)
    assert [d.index for d in r.data] == list(range(len(r.data)))
    return [d.embedding for d in r.data]


def body(**overrides: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "input": "Hello", **overrides}


def test_single_string_with_the_sdk_defaults(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model=MODEL_ID, input="Hello, world!")  # the SDK asks for base64
    assert r.object == "list" and r.model == MODEL_ID
    assert len(r.data) == 1
    item = r.data[0]
    assert item.object == "embedding" and item.index == 0
    assert len(item.embedding) == N_DIMS
    assert all(isinstance(x, float) and math.isfinite(x) for x in item.embedding)
    assert norm(item.embedding) == pytest.approx(1.0, abs=1e-5)
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens


def test_raw_response_shape(http: httpx.Client) -> None:
    r = http.post(EMBEDDINGS, json=body(input=["one", "two"], encoding_format="float", user="u-1"))
    assert r.status_code == 200, r.text
    data = r.json()
    assert set(data) == {"object", "data", "model", "usage"}
    assert data["object"] == "list" and data["model"] == MODEL_ID
    assert [set(d) for d in data["data"]] == [{"object", "embedding", "index"}] * 2
    assert set(data["usage"]) == {"prompt_tokens", "total_tokens"}


def test_list_of_strings_keeps_order_and_indexes(client: openai.OpenAI) -> None:
    texts = ["apples", "A much longer sentence about the history of Rome.", "x", "42", "apples"]
    together = embed(client, texts)
    assert len(together) == len(texts)
    for text, vec in zip(texts, together):
        alone = embed(client, text)[0]
        assert cosine(vec, alone) > 0.9999  # batched with others or alone: the same vector
    assert cosine(together[0], together[4]) > 0.9999
    assert cosine(together[0], together[1]) < 0.9999


def test_usage_counts_every_input(client: openai.OpenAI) -> None:
    one = client.embeddings.create(model=MODEL_ID, input="the quick brown fox").usage.prompt_tokens
    two = client.embeddings.create(model=MODEL_ID, input=["the quick brown fox"] * 2).usage
    assert two.prompt_tokens == 2 * one and two.total_tokens == two.prompt_tokens


def test_token_inputs(client: openai.OpenAI) -> None:
    tokens = [504, 2365, 6354, 16438]
    single = embed(client, tokens)
    assert len(single) == 1 and len(single[0]) == N_DIMS
    nested = embed(client, [tokens, [28, 29], tokens])
    assert len(nested) == 3
    assert cosine(single[0], nested[0]) > 0.9999 and cosine(single[0], nested[2]) > 0.9999
    assert cosine(nested[0], nested[1]) < 0.9999
    r = client.embeddings.create(model=MODEL_ID, input=[tokens, [28, 29]])
    assert r.usage.prompt_tokens == 6  # token lists are embedded as given


def test_base64_equals_float(http: httpx.Client, client: openai.OpenAI) -> None:
    inputs = ["first text", "second, longer text to embed"]
    floats = http.post(EMBEDDINGS, json=body(input=inputs, encoding_format="float")).json()
    b64 = http.post(EMBEDDINGS, json=body(input=inputs, encoding_format="base64")).json()
    for f, b in zip(floats["data"], b64["data"]):
        assert isinstance(b["embedding"], str)
        decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4").tolist()
        assert decoded == f["embedding"]  # exactly: both are the same float32 values
    via_sdk = client.embeddings.create(model=MODEL_ID, input=inputs)  # base64, decoded by the SDK
    assert [d.embedding for d in via_sdk.data] == [d["embedding"] for d in floats["data"]]


def test_dimensions_truncate_and_renormalize(client: openai.OpenAI) -> None:
    full = embed(client, "dimension test")[0]
    short = embed(client, "dimension test", dimensions=64)[0]
    assert len(short) == 64
    assert norm(short) == pytest.approx(1.0, abs=1e-5)
    expected = np.asarray(full[:64]) / np.linalg.norm(full[:64])
    assert np.allclose(short, expected, atol=1e-5)
    assert len(embed(client, "dimension test", dimensions=N_DIMS)[0]) == N_DIMS


def test_cosine_of_a_vector_with_itself_is_one(client: openai.OpenAI) -> None:
    a, b = embed(client, ["the same sentence", "the same sentence"])
    assert cosine(a, b) == pytest.approx(1.0, abs=1e-6)
    assert cosine(a, a) == pytest.approx(1.0, abs=1e-6)
    again = embed(client, "the same sentence")[0]
    assert cosine(a, again) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("first", "second", "unrelated"), PARAPHRASES)
def test_paraphrases_are_closer_than_an_unrelated_sentence(
    client: openai.OpenAI, first: str, second: str, unrelated: str
) -> None:
    a, b, c = embed(client, [first, second, unrelated])
    near = cosine(a, b)
    assert near > cosine(a, c) + 0.1
    assert near > cosine(b, c) + 0.1


def test_concurrent_requests_are_all_correct(client: openai.OpenAI, server: Server) -> None:
    requests = [[f"request {k}, input {i}{'!' * i}" for i in range(3)] for k in range(8)]
    flat = embed(client, [text for inputs in requests for text in inputs])
    expected = [flat[3 * k : 3 * k + 3] for k in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda inputs: embed(client, inputs), requests))
    for want, have in zip(expected, got):
        assert len(have) == len(want)
        for w, h in zip(want, have):
            assert cosine(w, h) > 0.9999
    stats = server.wait_idle()
    assert stats["n_embedding_jobs"] == 0
    # Inputs of several requests went through one decode (each request has 3).
    assert stats["max_inputs_per_embedding_decode"] > 3


def test_embeddings_while_a_chat_streams(client: openai.OpenAI) -> None:
    def chat() -> int:
        stream = client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Count to twenty."}],
            max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True},
        )
        return sum(1 for c in stream if c.choices and c.choices[0].delta.content)

    with ThreadPoolExecutor(5) as pool:
        chat_future = pool.submit(chat)
        embeds = [pool.submit(embed, client, [f"text {k} {i}" for i in range(16)]) for k in range(4)]
        results = [f.result(timeout=120) for f in embeds]
        assert chat_future.result(timeout=120) > 0
    assert all(len(r) == 16 and all(len(v) == N_DIMS for v in r) for r in results)


# ---- errors ----


@pytest.mark.parametrize(
    ("overrides", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": []}, "input"),
        ({"input": ["ok", ""]}, "input[1]"),
        ({"input": [[1, 2], []]}, "input[1]"),
        ({"input": 5}, "input"),
        ({"input": None}, "input"),
        ({"input": ["a", 1]}, "input"),
        ({"input": [1.5, 2]}, "input"),
        ({"input": [True]}, "input"),
        ({"input": {"text": "a"}}, "input"),
        ({"input": [[1], "a"]}, "input"),
        ({"input": [1, 999_999]}, "input"),
        ({"input": [[1], [-1]]}, "input[1]"),
        ({"input": ["x"] * 2049}, "input"),
        ({"encoding_format": "hex"}, "encoding_format"),
        ({"encoding_format": 1}, "encoding_format"),
        ({"dimensions": 0}, "dimensions"),
        ({"dimensions": "8"}, "dimensions"),
        ({"dimensions": N_DIMS + 1}, "dimensions"),
        ({"user": 7}, "user"),
        ({"model": 3}, "model"),
    ],
)
def test_invalid_requests_are_400_naming_the_param(
    http: httpx.Client, overrides: dict[str, Any], param: str
) -> None:
    assert_error(http.post(EMBEDDINGS, json=body(**overrides)), 400, param=param)


def test_missing_fields(http: httpx.Client) -> None:
    assert_error(http.post(EMBEDDINGS, json={"model": MODEL_ID}), 400, param="input", code="missing_required_parameter")
    assert_error(http.post(EMBEDDINGS, json={"input": "a"}), 400, param="model", code="missing_required_parameter")
    assert_error(http.post(EMBEDDINGS, content=b"{", headers={"content-type": "application/json"}), 400, code="invalid_json")


def test_unknown_model_is_404(http: httpx.Client) -> None:
    assert_error(http.post(EMBEDDINGS, json=body(model="nope")), 404, param="model", code="model_not_found")


def test_input_longer_than_the_context_names_its_index(http: httpx.Client) -> None:
    long_text = "embedding " * 3000  # over the server's 2048-token context
    r = http.post(EMBEDDINGS, json=body(input=["a", "b", "c", long_text]))
    assert_error(r, 400, param="input[3]", code="context_length_exceeded")
    assert_error(http.post(EMBEDDINGS, json=body(input=long_text)), 400, param="input", code="context_length_exceeded")
    assert_error(http.post(EMBEDDINGS, json=body(input=[[1] * 2049])), 400, param="input[0]", code="context_length_exceeded")


def test_sdk_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MODEL_ID, input="hi", dimensions=100_000)
    assert info.value.status_code == 400


# ---- a dedicated embedding model ----

EMBEDDER_ID = "embedder"


@pytest.fixture(scope="module")
def two_model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("embedder")
    link = tmp / f"{EMBEDDER_ID}.gguf"
    link.symlink_to(bundled_model_path())
    srv = start_server(
        tmp, "--embedding-model", str(link), "--parallel", "2", "--context-size", "256", "--batch-size", "256"
    )
    yield srv
    stop_server(srv)
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def test_embedding_model_is_listed_beside_the_chat_model(two_model_server: Server) -> None:
    models = httpx.get(two_model_server.v1 + "/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == [MODEL_ID, EMBEDDER_ID]
    card = httpx.get(two_model_server.v1 + f"/models/{EMBEDDER_ID}", timeout=10)
    assert card.status_code == 200 and card.json()["id"] == EMBEDDER_ID


def test_embedding_model_serves_embeddings(two_model_server: Server, client: openai.OpenAI) -> None:
    with openai.OpenAI(base_url=two_model_server.v1, api_key="unused", max_retries=0, timeout=60) as other:
        r = other.embeddings.create(model=EMBEDDER_ID, input=[PARAPHRASE_A, "abc"])
        assert r.model == EMBEDDER_ID and len(r.data) == 2
        same_file = embed(client, [PARAPHRASE_A, "abc"])  # the chat model of the main server
        for d, want in zip(r.data, same_file):
            assert cosine(d.embedding, want) > 0.9999
        chat = other.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )
        assert chat.choices[0].finish_reason in {"stop", "length"}


def test_each_endpoint_rejects_the_other_model(two_model_server: Server) -> None:
    with httpx.Client(base_url=two_model_server.base_url, timeout=30) as http:
        r = http.post(EMBEDDINGS, json=body(model=MODEL_ID))
        assert_error(r, 400, param="model", code="model_not_supported")
        chat = {"model": EMBEDDER_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert_error(http.post("/v1/chat/completions", json=chat), 400, param="model", code="model_not_supported")
        completion = {"model": EMBEDDER_ID, "prompt": "Hi", "max_tokens": 2}
        assert_error(http.post("/v1/completions", json=completion), 400, param="model", code="model_not_supported")
        # The smaller context of this server bounds embedding inputs too.
        r = http.post(EMBEDDINGS, json=body(model=EMBEDDER_ID, input=[[1] * 257]))
        assert_error(r, 400, param="input[0]", code="context_length_exceeded")


def test_the_longest_allowed_input_is_embedded(two_model_server: Server) -> None:
    # 256 tokens (this server's context and batch) fill a whole decode: the next input needs another.
    with openai.OpenAI(base_url=two_model_server.v1, api_key="unused", max_retries=0, timeout=60) as other:
        r = other.embeddings.create(model=EMBEDDER_ID, input=[[28] * 256, [29] * 5], encoding_format="float")
        assert r.usage.prompt_tokens == 261
        assert all(norm(d.embedding) == pytest.approx(1.0, abs=1e-5) for d in r.data)
        assert httpx.get(two_model_server.base_url + "/health", timeout=10).json()["engine"]["n_embedding_decodes"] >= 2


def test_a_client_that_leaves_drops_its_remaining_inputs(two_model_server: Server) -> None:
    # 8 inputs of 100 tokens: 4 decodes of 2 on this server (256 tokens per decode).
    before = two_model_server.engine_stats()["n_embedding_decodes"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            two_model_server.v1 + "/embeddings",
            json={"model": EMBEDDER_ID, "input": [[28 + i] * 100 for i in range(8)]},
            timeout=httpx.Timeout(30, read=0.3),
        )
    deadline = time.monotonic() + 30
    while two_model_server.engine_stats()["n_embedding_jobs"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = two_model_server.engine_stats()
    assert stats["n_embedding_jobs"] == 0
    assert stats["n_embedding_decodes"] - before < 4


def test_get_is_405(http: httpx.Client) -> None:
    assert_error(http.get(EMBEDDINGS), 405)
