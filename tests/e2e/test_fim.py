"""Fill-in-the-middle (`suffix` on /v1/completions) on a real server.

The bundled SmolLM2 has no FIM token ids, so the test serves a copy of it whose metadata names
three of its control tokens as llama.cpp's FIM prefix/suffix/middle tokens (the output means
nothing: the model was not trained for it; the prompt layout, the billing and the protocol are
what is checked).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cria.models.gguf import read_metadata
from cria.models.spec import bundled_model_path
from tests.e2e._gguf_edit import copy_with_metadata
from tests.e2e.conftest import MODEL_ID, Server, start_server, stop_server
from tests.openai_schema import validate, validate_each
from tests.unit._gguf import U32, kv

FIM_ID = "smollm2-fim"
# <repo_name>, <reponame>, <file_sep>: control tokens of SmolLM2's vocab.
FIM_TOKENS = {"fim_pre": 3, "fim_suf": 4, "fim_mid": 5}
PROMPT = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def fim_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("fim-model") / f"{FIM_ID}.gguf"
    pairs = [
        kv(f"tokenizer.ggml.{name}_token_id", U32, token) for name, token in FIM_TOKENS.items()
    ]
    copy_with_metadata(bundled_model_path(), path, pairs)
    yield path
    path.unlink(missing_ok=True)  # ~100 MB: not left for pytest's temp-dir rotation


@pytest.fixture(scope="module")
def fim_server(tmp_path_factory: pytest.TempPathFactory, fim_model: Path) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("fim-server"),
        "--model",
        str(fim_model),
        "--parallel",
        "2",
        "--threads",
        "1",
    )
    yield srv
    stop_server(srv)
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture
def fim_http(fim_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fim_server.base_url, timeout=60) as c:
        yield c


def _n_tokens(http: httpx.Client, text: str) -> int:
    r = http.post("/tokenize", json={"content": text, "add_special": False})
    assert r.status_code == 200, r.text
    return int(r.json()["count"])


def _fim_body(**overrides: Any) -> dict[str, Any]:
    return {"model": FIM_ID, "prompt": PROMPT, "suffix": SUFFIX, "max_tokens": 8,
            "temperature": 0, **overrides}  # fmt: skip


def test_the_copy_only_adds_the_fim_keys(fim_model: Path) -> None:
    original = read_metadata(bundled_model_path())
    copy = read_metadata(fim_model)
    added = {f"tokenizer.ggml.{name}_token_id": token for name, token in FIM_TOKENS.items()}
    assert copy == {**original, **added}
    assert list(copy)[-3:] == list(added)  # appended after the original pairs


def test_the_copy_computes_as_the_original(fim_http: httpx.Client, http: httpx.Client) -> None:
    """The tensor data survived the copy: the prompt's logprobs are the bundled model's."""
    body = {
        "prompt": "The capital of France is Paris",
        "max_tokens": 0,
        "echo": True,
        "logprobs": 0,
    }
    ours = fim_http.post("/v1/completions", json={**body, "model": FIM_ID})
    theirs = http.post("/v1/completions", json={**body, "model": MODEL_ID})
    assert ours.status_code == theirs.status_code == 200, (ours.text, theirs.text)
    a, b = (r.json()["choices"][0]["logprobs"]["token_logprobs"] for r in (ours, theirs))
    assert len(a) == len(b) > 3 and a[0] is None and b[0] is None
    assert all(math.isclose(x, y, abs_tol=1e-2) for x, y in zip(a[1:], b[1:])), (a, b)


def test_capabilities_report_fill_in_the_middle(fim_http: httpx.Client) -> None:
    caps = fim_http.get("/v1/capabilities").json()["data"][0]
    assert caps["id"] == FIM_ID
    assert caps["fill_in_the_middle"] is True


def test_suffix_completion(fim_http: httpx.Client) -> None:
    r = fim_http.post("/v1/completions", json=_fim_body())
    assert r.status_code == 200, r.text
    body = r.json()
    validate("CreateCompletionResponse", body)
    assert len(body["choices"]) == 1
    choice = body["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("stop", "length")
    # The model adds no BOS (add_bos_token is false): the prompt is pre + prefix + suf + suffix + mid.
    assert (
        _n_tokens(fim_http, PROMPT)
        == fim_http.post("/tokenize", json={"content": PROMPT}).json()["count"]
    )
    expected = _n_tokens(fim_http, PROMPT) + _n_tokens(fim_http, SUFFIX) + len(FIM_TOKENS)
    assert body["usage"]["prompt_tokens"] == expected
    assert body["usage"]["completion_tokens"] <= 8


def test_suffix_completion_stream(fim_http: httpx.Client) -> None:
    whole = fim_http.post("/v1/completions", json=_fim_body()).json()
    body = _fim_body(stream=True, stream_options={"include_usage": True})
    with fim_http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    validate_each("CreateCompletionStreamResponse", chunks)
    text = "".join(ch["text"] for c in chunks for ch in c["choices"])
    assert text == whole["choices"][0]["text"]
    finish = [ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]]
    assert finish == [whole["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]


def test_suffix_with_two_prompts_and_n(fim_http: httpx.Client) -> None:
    r = fim_http.post("/v1/completions", json=_fim_body(prompt=[PROMPT, "x = "], n=2, max_tokens=2))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    n_suffix = _n_tokens(fim_http, SUFFIX)
    per_prompt = [_n_tokens(fim_http, p) + n_suffix + len(FIM_TOKENS) for p in (PROMPT, "x = ")]
    assert body["usage"]["prompt_tokens"] == sum(per_prompt)


def test_echo_with_suffix_echoes_the_prompt_only(fim_http: httpx.Client) -> None:
    r = fim_http.post("/v1/completions", json=_fim_body(echo=True))
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text.startswith(PROMPT)
    assert SUFFIX.strip() not in text[: len(PROMPT) + 1]
    r = fim_http.post("/v1/completions", json=_fim_body(echo=True, logprobs=1))
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
