"""LoRA adapters on the real server (-l): each is a model id with the base model as parent,
a request's `model` picks it, and the base model's output stays what it was, also while
adapter requests run beside it. The adapters are made here from the bundled model's shapes:
one GGUF LoRA written with the gguf writer, one PEFT folder (converted at start-up)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cria.models.spec import bundled_model_path
from tests.e2e.conftest import MODEL_ID, Server, start_server, stop_server
from tests.e2e.test_metrics import scrape, value
from tests.lora_fixtures import make_gguf_adapter, make_peft_folder

PROMPTS = [
    "Write one sentence about the sea.",
    "List three fruits.",
    "What is the capital of France?",
]


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("lora")
    base = bundled_model_path()
    gguf = make_gguf_adapter(base, tmp / "sea-lora.gguf", seed=1, strength=0.3)
    peft = make_peft_folder(base, tmp / "fruit-lora", rank=8, alpha=16.0, seed=2, strength=0.3)
    srv = start_server(
        tmp, "--parallel", "4", "--cache-dir", str(tmp / "cache"),
        "-l", str(gguf), f"fruit={peft}:0.9",
    )  # fmt: skip
    yield srv
    stop_server(srv)


def _chat(srv: Server, model: str, prompt: str, max_tokens: int = 24) -> openai.types.chat.ChatCompletion:
    with openai.OpenAI(base_url=srv.v1, api_key="unused", max_retries=0, timeout=120) as client:
        return client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
        )


def _text(srv: Server, model: str, prompt: str) -> str:
    return _chat(srv, model, prompt).choices[0].message.content or ""


def test_adapters_are_listed_with_their_parent(lora_server: Server) -> None:
    data = httpx.get(lora_server.v1 + "/models", timeout=10).json()["data"]
    by_id = {card["id"]: card for card in data}
    assert set(by_id) == {MODEL_ID, "sea-lora", "fruit"}
    for name in ("sea-lora", "fruit"):
        assert by_id[name]["parent"] == MODEL_ID
        assert by_id[name]["object"] == "model"
        one = httpx.get(f"{lora_server.v1}/models/{name}", timeout=10).json()
        assert one == by_id[name]
    assert "parent" not in by_id[MODEL_ID] or by_id[MODEL_ID]["parent"] is None


def test_base_output_is_unchanged_and_adapters_change_it(lora_server: Server, server: Server) -> None:
    for prompt in PROMPTS[:2]:
        plain = _text(server, MODEL_ID, prompt)  # a server without adapters
        assert _text(lora_server, MODEL_ID, prompt) == plain
        sea, fruit = _text(lora_server, "sea-lora", prompt), _text(lora_server, "fruit", prompt)
        assert sea != plain and fruit != plain and sea != fruit
        assert _text(lora_server, "sea-lora", prompt) == sea  # greedy: the same again


def test_concurrent_base_and_adapter_requests_each_get_their_own_output(lora_server: Server) -> None:
    jobs = [(model, prompt) for prompt in PROMPTS for model in (MODEL_ID, "sea-lora", "fruit")]
    alone = {job: _text(lora_server, *job) for job in jobs}
    lora_server.wait_idle()
    before = lora_server.engine_stats()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = dict(zip(jobs, pool.map(lambda job: _text(lora_server, *job), jobs)))
    for (model, prompt), text in together.items():
        if model == MODEL_ID:
            assert text == alone[(model, prompt)]  # the base model: exactly as alone
            continue
        # Under an adapter a greedy near-tie can flip with the batch's shape (llama.cpp's
        # numerics, also with one adapter and no switching), so: the output is its own
        # adapter's: not the base model's, and as close to its own alone as to any other's.
        own = _shared_prefix(text, alone[(model, prompt)])
        others = [_shared_prefix(text, alone[(m, prompt)]) for m in (MODEL_ID, "sea-lora", "fruit") if m != model]
        assert text != alone[(MODEL_ID, prompt)] and own >= max(others), (model, prompt, text)
    after = lora_server.wait_idle()
    # Steps ran one adapter set at a time, switching between them.
    assert after["n_adapter_switches"] > before["n_adapter_switches"]
    assert after["max_adapter_wait_steps"] >= 1


def _cached(srv: Server, model: str, prompt: str) -> int:
    r = httpx.post(
        srv.v1 + "/completions",
        json={"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def _shared_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_no_prefix_is_reused_across_adapters(lora_server: Server) -> None:
    prompt = "A lighthouse keeper and his cat watched the ships go by, night after night. " * 6
    assert _cached(lora_server, MODEL_ID, prompt) == 0  # new to this server
    assert _cached(lora_server, MODEL_ID, prompt) > 0  # the base model's own KV
    # The same tokens under an adapter: the base model's keys and values are not its own.
    assert _cached(lora_server, "fruit", prompt) == 0
    assert _cached(lora_server, "fruit", prompt) > 0
    assert _cached(lora_server, "sea-lora", prompt) == 0
    assert _cached(lora_server, MODEL_ID, prompt) > 0  # and the base model's is still there


def test_metrics_are_labelled_by_model(lora_server: Server) -> None:
    before, _ = scrape(lora_server)
    _text(lora_server, "fruit", PROMPTS[0])
    _text(lora_server, MODEL_ID, PROMPTS[0])
    after, _ = scrape(lora_server)
    for model in ("fruit", MODEL_ID):
        def delta(family: str, sample: str, m: str = model) -> float:
            return value(after, family, sample, model=m) - value(before, family, sample, model=m)

        assert delta("cria_request_success", "cria_request_success_total") == 1
        assert delta("cria_generated_tokens", "cria_generated_tokens_total") > 0
    assert value(after, "cria_request_success", "cria_request_success_total", model="sea-lora") >= 0
    assert ("cria_request_success_total", (("finish_reason", "stop"), ("model", "sea-lora"))) in after[
        "cria_request_success"
    ]


def test_an_adapter_is_not_an_embedding_model(lora_server: Server) -> None:
    r = httpx.post(lora_server.v1 + "/embeddings", json={"model": "fruit", "input": "x"}, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model"


def test_an_unknown_adapter_is_404(lora_server: Server) -> None:
    r = httpx.post(
        lora_server.v1 + "/chat/completions",
        json={"model": "no-such-lora", "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 404
    assert "fruit" in r.json()["error"]["message"]


def test_a_converted_peft_adapter_is_cached(lora_server: Server, tmp_path: Path) -> None:
    cache = [p for p in Path(lora_server.log_path.parent / "cache").rglob("*.gguf")]
    assert len(cache) == 1  # the PEFT folder, converted once; the GGUF adapter is used as is


@pytest.mark.parametrize("kind", ["alpha_string", "not_adapter", "arch_int"])
def test_a_malformed_adapter_stops_start_up_with_one_line_naming_it(tmp_path: Path, kind: str) -> None:
    """llama.cpp would abort the whole process on some of these (a GGML_ASSERT): the checks in
    Python come first."""
    from tests.e2e.test_startup import assert_one_line_error, run_cria
    from tests.lora_fixtures import make_malformed

    bad = make_malformed(bundled_model_path(), tmp_path / f"bad-{kind}.gguf", kind)
    assert_one_line_error(run_cria("-l", f"broken={bad}", "--cache-dir", str(tmp_path)), "broken")


def test_adapters_and_a_tokenizer_work_in_the_engine_process(lora_server: Server, tmp_path: Path) -> None:
    """--engine-process on: the child process loads the adapters and the external tokenizer
    (WorkerSpec.load_model) and gives what the in-process engine gives."""
    from tests.hf_tokenizer import write_tokenizer_folder

    base = bundled_model_path()
    gguf = make_gguf_adapter(base, tmp_path / "sea-lora.gguf", seed=1, strength=0.3)
    tokenizer = write_tokenizer_folder(base, tmp_path / "tok", with_config=False)
    srv = start_server(
        tmp_path, "--parallel", "2", "--engine-process", "on", "-l", str(gguf),
        "-v", str(tokenizer), "--cache-dir", str(tmp_path / "cache"),
    )  # fmt: skip
    try:
        for model in (MODEL_ID, "sea-lora"):
            assert _text(srv, model, PROMPTS[0]) == _text(lora_server, model, PROMPTS[0])
    finally:
        stop_server(srv)


def test_a_small_prompt_cache_keeps_each_adapters_prompt(tmp_path: Path) -> None:
    """One slot, three models taking turns on one prompt, a prompt cache that holds two of
    their KV states: the entry a request restores is looked up before the slot it takes is
    saved, so that save cannot evict it."""
    base = bundled_model_path()
    a1 = make_gguf_adapter(base, tmp_path / "a1.gguf", seed=1, strength=0.3)
    a2 = make_gguf_adapter(base, tmp_path / "a2.gguf", seed=2, strength=0.3)
    srv = start_server(
        tmp_path, "--parallel", "1", "-c", "512", "--prompt-cache-mib", "2", "-l", str(a1), str(a2),
    )  # fmt: skip
    prompt = "The lighthouse keeper counted the ships that passed his rock every night. " * 3
    try:
        order = [MODEL_ID, "a1", "a2"] * 3
        cached = [_cached(srv, model, prompt) for model in order]
    finally:
        stop_server(srv)
    assert cached[:3] == [0, 0, 0]
    # With room for two states and three taking turns, every other one can come back; with the
    # save first (the old order), each save evicted the very entry the request was after: none.
    assert sum(n > 0 for n in cached[3:]) >= 3, cached
