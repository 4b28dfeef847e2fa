"""Start-up: options, environment, bad models, and a small server for queue limits."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from cria.models.spec import bundled_model_path
from tests.e2e.conftest import Server, start_server, stop_process, stop_server


def run_cria(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRIA_")}
    clean.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "cria", "--host", "127.0.0.1", "--port", "1", *args],
        capture_output=True, text=True, timeout=60, env=clean,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


def test_missing_model_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cria("--model", str(tmp_path / "nope.gguf")), "no such file")


def test_model_that_is_not_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"ggml" + b"\0" * 64)
    assert_one_line_error(run_cria("--model", str(bad)), "not a GGUF")


def test_architecture_mismatch() -> None:
    assert_one_line_error(run_cria("-a", "falcon"), "falcon", "llama")


def test_bad_environment_value_names_the_variable() -> None:
    assert_one_line_error(run_cria(env={"CRIA_CONTEXT_SIZE": "abc"}), "CRIA_CONTEXT_SIZE")
    assert_one_line_error(run_cria(env={"CRIA_PARALLEL": "0"}), "CRIA_PARALLEL")


def test_bad_flag_value_names_the_flag() -> None:
    assert_one_line_error(run_cria("--parallel", "many"), "--parallel")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-v", "no-such-tokenizer.json"], "no-such-tokenizer.json"),
        (["-l", "no-such-adapter.gguf"], "no-such-adapter"),
        (["--model", "no-such-model.bin"], "no-such-model.bin"),
    ],
)
def test_original_options_with_a_missing_file_fail_clearly(args: list[str], fragment: str) -> None:
    assert_one_line_error(run_cria(*args), fragment)


def test_help_lists_every_option_with_its_variable() -> None:
    result = subprocess.run([sys.executable, "-m", "cria", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for flag, env in [("--model-architecture", "CRIA_MODEL_ARCHITECTURE"), ("--port", "CRIA_PORT"),
                      ("--context-size", "CRIA_CONTEXT_SIZE"), ("--zipkin-endpoint", "CRIA_ZIPKIN_ENDPOINT"),
                      ("--parallel", "CRIA_PARALLEL"), ("--max-queue", "CRIA_MAX_QUEUE")]:
        assert flag in result.stdout and env in result.stdout


@pytest.fixture(scope="module")
def small_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One slot, one waiting place; the model given by path (its id is the file's stem), and
    settings from the environment, overridden by the command line."""
    tmp = tmp_path_factory.mktemp("small")
    link = tmp / "tiny-llama.gguf"
    link.symlink_to(bundled_model_path())
    srv = start_server(
        tmp, "--model", str(link), "--parallel", "1", "--use-gpu",
        env={"CRIA_MAX_QUEUE": "1", "CRIA_PARALLEL": "3", "CRIA_CONTEXT_SIZE": "512"},
    )
    yield srv
    stop_server(srv)


def test_model_id_is_file_stem_and_env_applies(small_server: Server) -> None:
    models = httpx.get(small_server.v1 + "/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-llama"]
    stats = small_server.engine_stats()
    assert stats["n_slots"] == 1  # the command line won over CRIA_PARALLEL=3
    r = httpx.post(small_server.v1 + "/completions", json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 600})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"  # CRIA_CONTEXT_SIZE=512


def test_use_gpu_without_gpu_build_warns_once_and_serves(small_server: Server) -> None:
    log = small_server.log_path.read_text()
    warnings = [line for line in log.splitlines() if "--use-gpu" in line and "CUDA" in line]
    assert len(warnings) == 1
    assert small_server.health()["status"] == "ok"


def test_model_that_fails_to_load_gives_503(tmp_path: Path) -> None:
    """A GGUF that passes the start-up checks (sound metadata, no tensor cut off) but that
    llama.cpp cannot load (an architecture it does not know) fails on the engine thread:
    /health and requests say 503, never hang. (A truncated file is caught at start-up.)"""
    from tests.unit._gguf import model_pairs, write_gguf

    broken = write_gguf(tmp_path / "broken.gguf", model_pairs("nosucharch"))
    port_server = _start_unhealthy(tmp_path, "--model", str(broken), "-a", "nosucharch")
    try:
        deadline = time.monotonic() + 60
        while True:
            r = httpx.get(port_server + "/health", timeout=5)
            if r.json()["status"] == "dead":
                break
            assert r.status_code == 503 and r.json()["status"] == "loading"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert r.status_code == 503 and r.json()["error"]
        c = httpx.post(port_server + "/v1/completions", json={"model": "broken", "prompt": "Hi"}, timeout=10)
        assert c.status_code == 503 and c.json()["error"]["code"] == "engine_unavailable"
        assert "retry-after" not in c.headers  # dead: retrying will not help
    finally:
        _stop_unhealthy()


_unhealthy: list[subprocess.Popen[bytes]] = []


def _start_unhealthy(tmp: Path, *args: str) -> str:
    from tests.e2e.conftest import free_port

    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CRIA_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cria", "--host", "127.0.0.1", "--port", str(port), *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean,
    )
    _unhealthy.append(proc)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "cria exited instead of serving 503"
        try:
            httpx.get(base + "/health", timeout=2)
            return base
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("cria never listened")


def _stop_unhealthy() -> None:
    while _unhealthy:
        stop_process(_unhealthy.pop())


def test_full_queue_is_429_and_queued_disconnect_is_dropped(small_server: Server) -> None:
    long_body = {"model": "tiny-llama", "prompt": "Go:", "max_tokens": 400, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as c1, httpx.Client(timeout=60) as c2:
        with c1.stream("POST", small_server.v1 + "/completions", json=long_body) as running:
            assert running.status_code == 200
            lines = running.iter_lines()
            next(line for line in lines if line.startswith("data: "))  # it holds the only slot
            with c2.stream("POST", small_server.v1 + "/completions", json=long_body) as queued:
                assert queued.status_code == 200
                deadline = time.monotonic() + 10
                while small_server.engine_stats()["n_waiting"] != 1:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                third = httpx.post(small_server.v1 + "/completions", json={**long_body, "stream": False}, timeout=60)
                assert third.status_code == 429
                assert third.headers["retry-after"].isdigit()
                assert third.json()["error"]["type"] == "rate_limit_error"
            # the queued client left: its place is freed without ever taking the slot
            deadline = time.monotonic() + 10
            while small_server.engine_stats()["n_waiting"] != 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    stats = small_server.wait_idle(timeout=15)
    assert stats["n_running"] == 0
    ok = httpx.post(small_server.v1 + "/completions", json={"model": "tiny-llama", "prompt": "Hi", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_evicted_prompt_comes_back_from_the_host_memory_cache(small_server: Server) -> None:
    """One slot: a second prompt evicts the first from the slot, which saves it to the prompt
    cache; when the first prompt comes back, its prefix is restored, not prefilled."""
    small_server.wait_idle()
    url = small_server.v1 + "/completions"
    first = f"Session {time.monotonic_ns()}: " + "a long shared system prompt about llamas " * 8
    other = f"Other {time.monotonic_ns()}: " + "something else entirely, about boats " * 8
    body = {"model": "tiny-llama", "max_tokens": 2, "ignore_eos": True}
    a = httpx.post(url, json={**body, "prompt": first}, timeout=60).json()
    b = httpx.post(url, json={**body, "prompt": other}, timeout=60).json()
    again = httpx.post(url, json={**body, "prompt": first}, timeout=60).json()
    assert b["usage"]["prompt_tokens_details"]["cached_tokens"] < 10  # nothing to reuse
    assert again["usage"]["prompt_tokens"] == a["usage"]["prompt_tokens"] > 40
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == a["usage"]["prompt_tokens"] - 1


@pytest.fixture(scope="module")
def two_slots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("two"), "--parallel", "2", "--context-size", "512")
    yield srv
    stop_server(srv)


def test_prompt_cache_saves_what_no_other_slot_holds(two_slots: Server) -> None:
    """A slot whose tokens another slot also holds is cut without saving them (the other can
    give them); once that one is cut too, they are saved, and the prompt comes back restored."""
    url = two_slots.v1 + "/completions"
    model = httpx.get(two_slots.v1 + "/models").json()["data"][0]["id"]
    tag = time.monotonic_ns()
    shared = f"Shared {tag}: " + "a long story about llamas crossing the mountains " * 8
    body = {"model": model, "max_tokens": 1, "ignore_eos": True, "temperature": 0}

    def post(prompt: str, **extra: object) -> dict[str, Any]:
        r = httpx.post(url, json={**body, "prompt": prompt, **extra}, timeout=120)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def cache_entries() -> int:
        return int(two_slots.engine_stats()["n_prompt_cache_entries"])

    two_slots.wait_idle()
    before = cache_entries()
    # A long request holds slot 0 with the shared prompt; a one-token request for the same
    # prompt takes slot 1, which then holds exactly the prompt (copied from slot 0).
    long_one = ThreadPoolExecutor(1).submit(post, shared, max_tokens=300)
    deadline = time.monotonic() + 60
    while two_slots.engine_stats()["n_running"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    post(shared)
    # The only free slot is slot 1: a different prompt cuts it. Slot 0 holds those tokens.
    post(f"Other {tag}: " + "boats and harbours and the sea in winter " * 8)
    assert two_slots.engine_stats()["n_running"] == 1, "the long request ended too soon"
    assert cache_entries() == before  # nothing saved
    long_one.result(timeout=120)
    # Now slot 0 (the prompt and 300 tokens) is cut by another prompt: that is saved.
    post(f"Third {tag}: " + "trains and stations at night " * 8)
    two_slots.wait_idle()
    assert cache_entries() == before + 1
    again = post(shared)
    n_prompt = again["usage"]["prompt_tokens"]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
