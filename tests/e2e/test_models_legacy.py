"""The original Cria's model options on the real server: a GGML `.bin` (made here from the
bundled GGUF), converted once in --cache-dir and served with -v (a tokenizer folder with
config.json) or --n-gqa; an external tokenizer (-v, -r) on the GGUF; --service-name."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cria.models.spec import bundled_model_path
from tests.e2e.conftest import MODEL_ID, Server, completion_chunks, start_server, stop_server
from tests.e2e.test_startup import assert_one_line_error, run_cria
from tests.ggml_writer import write_ggjt
from tests.hf_tokenizer import hf_cache_layout, write_tokenizer_folder

PROMPTS = ["Once upon a time", "def fibonacci(n):", "Les trois couleurs primaires sont", "1, 2, 3, 5, 8,"]
CORPUS = [
    "Hello, world!",
    "  leading spaces and\ttabs\n\nnewlines",
    "Numbers 1234567 and 3.14159; emoji 🦙🐍 and accents: déjà vu, naïve, Zürich.",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "def f(x):\n    return {'a': [1, 2]}  # code",
    "中文字符和日本語のテキスト",
]
BIN_NAME = "smollm2-135m.ggmlv3.q4_1"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("legacy")
    base = bundled_model_path()
    model = tmp / f"{BIN_NAME}.bin"
    write_ggjt(base, model, version=3)
    return {
        "tmp": tmp,
        "bin": model,
        "tokenizer": write_tokenizer_folder(base, tmp / "tokenizer", with_config=True),
        "cache": tmp / "cache",
    }


@pytest.fixture(scope="module")
def bin_server(files: dict[str, Path]) -> Iterator[Server]:
    srv = start_server(
        files["tmp"], "--parallel", "2", "--model", str(files["bin"]), "-v", str(files["tokenizer"]),
        "--cache-dir", str(files["cache"]),
    )  # fmt: skip
    yield srv
    stop_server(srv)


def _complete(srv: Server, model: str, prompt: str, max_tokens: int = 24) -> dict[str, object]:
    r = httpx.post(
        srv.v1 + "/completions",
        json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    return r.json()


def _chat(srv: Server, model: str, content: str) -> str:
    r = httpx.post(
        srv.v1 + "/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24,
              "temperature": 0},
        timeout=120,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def _ids(srv: Server, text: str) -> list[int]:
    r = httpx.post(srv.base_url + "/tokenize", json={"content": text}, timeout=30)
    assert r.status_code == 200, r.text
    return list(r.json()["tokens"])


def test_a_ggml_bin_with_a_tokenizer_folder_generates_what_the_gguf_does(
    bin_server: Server, server: Server
) -> None:
    assert [c["id"] for c in httpx.get(bin_server.v1 + "/models", timeout=10).json()["data"]] == [BIN_NAME]
    for prompt in PROMPTS:
        ours, theirs = _complete(bin_server, BIN_NAME, prompt), _complete(server, MODEL_ID, prompt)
        assert ours["choices"][0]["text"] == theirs["choices"][0]["text"]  # type: ignore[index]
        assert ours["usage"] == theirs["usage"]
    # The chat template came with the tokenizer folder.
    assert _chat(bin_server, BIN_NAME, "Name a colour.") == _chat(server, MODEL_ID, "Name a colour.")
    for text in CORPUS:
        assert _ids(bin_server, text) == _ids(server, text)


def _serve_bin_once(files: dict[str, Path]) -> None:
    """Start a server on the .bin with the tokenizer folder and the shared cache, answer one
    completion, stop it."""
    srv = start_server(
        files["tmp"], "--parallel", "1", "--model", str(files["bin"]), "-v", str(files["tokenizer"]),
        "--cache-dir", str(files["cache"]),
    )  # fmt: skip
    try:
        assert _complete(srv, BIN_NAME, PROMPTS[0], 4)["choices"]
    finally:
        stop_server(srv)


def test_the_conversion_is_cached_and_redone_when_the_file_changes(
    bin_server: Server, files: dict[str, Path]
) -> None:
    converted = list(files["cache"].rglob("*.gguf"))
    assert len(converted) == 1
    stamp = converted[0].stat().st_mtime_ns
    # Same file, same options: the cached GGUF is served as it is.
    _serve_bin_once(files)
    assert [p.stat().st_mtime_ns for p in files["cache"].rglob("*.gguf")] == [stamp]


def test_a_ggml_bin_with_n_gqa_and_no_config_serves_with_one_warning(files: dict[str, Path]) -> None:
    """A tokenizer.json alone (no config.json): --n-gqa gives the KV heads, llama defaults the
    rest (SmolLM2's rope base differs, so its output may too), and one warning says so."""
    srv = start_server(
        files["tmp"], "--parallel", "1", "--model", str(files["bin"]), "--n-gqa", "3",
        "-v", str(files["tokenizer"] / "tokenizer.json"), "--cache-dir", str(files["tmp"] / "cache-gqa"),
    )  # fmt: skip
    try:
        body = _complete(srv, BIN_NAME, PROMPTS[0], 8)
        assert body["usage"]["completion_tokens"] > 0  # type: ignore[index]
        log = srv.log_path.read_text()
    finally:
        stop_server(srv)
    warnings = [line for line in log.splitlines() if "WARNING" in line and "assum" in line.lower()]
    assert len(warnings) == 1, log


def test_a_ggml_vocabulary_that_cannot_spell_every_byte_is_refused(files: dict[str, Path]) -> None:
    """The bundled model's vocabulary is byte-level BPE: written as the SentencePiece vocabulary
    a .bin implies, it lacks <0xNN> tokens, and llama.cpp's tokenizer would abort the process on
    text that needs one. Refused at start-up instead, pointing at -v."""
    result = run_cria("--model", str(files["bin"]), "--n-gqa", "3", "--cache-dir", str(files["tmp"] / "cache-v"))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cria: error:") and "-v" in last and "bytes" in last, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["-a", "mistral"], ("GGML", "llama")),
        (["--n-gqa", "2"], ("--n-gqa",)),  # 9 heads: 2 does not divide them
        (["--n-gqa", "9"], ("--n-gqa",)),  # divides, but the wk tensor's shape says 3
    ],
)
def test_a_ggml_bin_with_wrong_options_fails_clearly(
    files: dict[str, Path], args: list[str], needles: tuple[str, ...]
) -> None:
    result = run_cria("--model", str(files["bin"]), "--cache-dir", str(files["tmp"] / "cache-bad"), *args)
    # Log lines of the conversion may come first; the error is one line, and the last.
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cria: error:"), result.stderr
    for needle in needles:
        assert needle in last, result.stderr


@pytest.fixture(scope="module")
def tokenizer_server(files: dict[str, Path]) -> Iterator[Server]:
    srv = start_server(files["tmp"], "--parallel", "2", "-v", str(files["tokenizer"] / "tokenizer.json"))
    yield srv
    stop_server(srv)


def test_an_external_tokenizer_on_the_gguf_gives_the_same_ids_and_output(
    tokenizer_server: Server, server: Server
) -> None:
    for text in CORPUS:
        assert _ids(tokenizer_server, text) == _ids(server, text)
    for prompt in PROMPTS[:2]:
        ours = _complete(tokenizer_server, MODEL_ID, prompt)
        theirs = _complete(server, MODEL_ID, prompt)
        assert ours["choices"] == theirs["choices"] and ours["usage"] == theirs["usage"]


def test_streaming_and_stop_strings_work_with_an_external_tokenizer(
    tokenizer_server: Server, server: Server
) -> None:
    body = {"model": MODEL_ID, "prompt": PROMPTS[2], "max_tokens": 32, "temperature": 0}
    whole = _complete(tokenizer_server, MODEL_ID, PROMPTS[2], 32)["choices"][0]["text"]  # type: ignore[index]
    chunks = completion_chunks(tokenizer_server, body)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == whole
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    assert stop.strip()
    cut = httpx.post(tokenizer_server.v1 + "/completions", json={**body, "stop": [stop]}, timeout=60).json()
    ref = httpx.post(server.v1 + "/completions", json={**body, "stop": [stop]}, timeout=60).json()
    assert cut["choices"][0]["text"] == ref["choices"][0]["text"]
    assert stop not in cut["choices"][0]["text"] and cut["choices"][0]["finish_reason"] == "stop"


def test_a_tokenizer_repository_comes_from_the_hugging_face_cache_offline(
    files: dict[str, Path], server: Server
) -> None:
    hub = files["tmp"] / "hub"
    hf_cache_layout(hub, "HuggingFaceTB/SmolLM2-135M-Instruct", files["tokenizer"])
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    srv = start_server(files["tmp"], "--parallel", "1", "-r", "HuggingFaceTB/SmolLM2-135M-Instruct", env=env)
    try:
        for text in CORPUS[:3]:
            assert _ids(srv, text) == _ids(server, text)
    finally:
        stop_server(srv)
    result = run_cria("-r", "nobody/not-cached", env=env)
    assert_one_line_error(result, "nobody/not-cached")


def test_the_service_name_names_the_exported_spans(tmp_path: Path) -> None:
    from tests.e2e.test_tracing import FAST_EXPORT, Receiver  # a real Zipkin-shaped receiver

    receiver = Receiver()
    try:
        srv = start_server(
            tmp_path, "--parallel", "1", "-z", receiver.endpoint, "--service-name", "cria-test",
            env=FAST_EXPORT,
        )  # fmt: skip
        try:
            _complete(srv, MODEL_ID, "Hi", 2)
            deadline = time.monotonic() + 20
            while not receiver.spans and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            stop_server(srv)  # flushes the last spans
        with receiver.lock:
            spans = list(receiver.spans)
    finally:
        receiver.close()
    assert spans
    assert {s["localEndpoint"]["serviceName"] for s in spans} == {"cria-test"}, json.dumps(spans)[:500]


def _shuffled_tokenizer(folder: Path, out: Path) -> Path:
    """The same tokenizer with its ordinary ids reversed: the right size, another vocabulary."""
    import shutil

    shutil.copytree(folder, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    special = {t["id"] for t in spec.get("added_tokens", [])}
    ids = sorted(i for i in vocab.values() if i not in special)
    flip = dict(zip(ids, reversed(ids)))
    spec["model"]["vocab"] = {text: flip.get(i, i) for text, i in vocab.items()}
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def test_a_tokenizer_of_another_vocabulary_is_refused(files: dict[str, Path]) -> None:
    other = _shuffled_tokenizer(files["tokenizer"], files["tmp"] / "tokenizer-shuffled")
    result = run_cria("-v", str(other))
    assert_one_line_error(result, "does not match the model's vocabulary")


def test_a_truncated_gguf_stops_start_up(files: dict[str, Path]) -> None:
    cut = files["tmp"] / "cut.gguf"
    cut.write_bytes(bundled_model_path().read_bytes()[:50_000_000])
    assert_one_line_error(run_cria("--model", str(cut)), "truncated")


def test_a_damaged_cached_conversion_is_converted_again(files: dict[str, Path], bin_server: Server) -> None:
    [converted] = list(files["cache"].rglob("*.gguf"))
    data = converted.read_bytes()
    converted.write_bytes(data[: len(data) // 2])  # as a full disk or a cut copy would leave it
    _serve_bin_once(files)
    assert converted.stat().st_size == len(data)
