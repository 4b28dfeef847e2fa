"""--overlap-output on: each step's text work runs while the next step decodes.

On a GPU llama_decode returns before the computation ends, and `auto` turns this on there; here
on the CPU it is forced on, and everything a client sees must be what the plain engine gives.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MODEL_ID, Server, completion_chunks, start_server, stop_server


@pytest.fixture(scope="module")
def overlapped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("overlap"), "--parallel", "4", "--overlap-output", "on"
    )
    yield srv
    stop_server(srv)
    log = Path(srv.log_path).read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def complete(server: Server, body: dict[str, object]) -> dict[str, object]:
    r = httpx.post(server.v1 + "/completions", json={"model": MODEL_ID, **body}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out, dict)
    return out


def stream(server: Server, body: dict[str, object]) -> tuple[str, str | None, dict[str, object]]:
    """Streamed text, finish reason and usage of a one-choice completion."""
    text, reason, usage = "", None, {}
    for chunk in completion_chunks(server, {"model": MODEL_ID, **body}):
        if chunk["choices"]:
            text += chunk["choices"][0]["text"]
            reason = chunk["choices"][0]["finish_reason"] or reason
        else:
            usage = chunk["usage"]
    return text, reason, usage


def fresh(prompt: str) -> str:
    """A prompt no cache holds yet (both servers compute it from scratch)."""
    return f"[{uuid.uuid4().hex[:8]}] {prompt}"


def choices(out: dict[str, object]) -> list[tuple[str, str]]:
    return [(c["text"], c["finish_reason"]) for c in out["choices"]]  # type: ignore[attr-defined]


def assert_all_slots_free(server: Server) -> None:
    stats = server.wait_idle()
    assert stats["n_slots_free"] == stats["n_slots"], stats


def test_same_output_as_the_plain_engine(server: Server, overlapped: Server) -> None:
    """Greedy output, finish reasons, usage and logprobs do not depend on the overlap."""
    for prompt, extra in [
        ("Once upon a time", {"max_tokens": 24, "ignore_eos": True}),
        ("Write a haiku about rain.", {"max_tokens": 64}),  # may end by end-of-generation
        ("Count: one, two,", {"max_tokens": 12, "logprobs": 2}),
        ("The capital of France", {"max_tokens": 0, "echo": True}),
    ]:
        body = {"prompt": fresh(prompt), "temperature": 0, **extra}
        plain, over = complete(server, body), complete(overlapped, body)
        assert choices(over) == choices(plain)
        assert over["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]  # type: ignore[index]
        if "logprobs" in extra:
            assert over["choices"][0]["logprobs"]["tokens"] == plain["choices"][0]["logprobs"]["tokens"]  # type: ignore[index]


def test_stop_string_ends_the_request_and_its_slot_stays_usable(overlapped: Server) -> None:
    """A stop string is found after the next step has already decoded the sequence's token:
    the request still ends there, its slot is freed, and the slot's cache stays right."""
    prompt = fresh("The history of the city begins")
    body = {"prompt": prompt, "temperature": 0, "max_tokens": 40, "ignore_eos": True}
    full = complete(overlapped, body)["choices"][0]["text"]  # type: ignore[index]
    assert isinstance(full, str) and len(full) > 20
    stop = full[12:16]
    expected = full[: full.index(stop)]
    stopped = complete(overlapped, {**body, "stop": [stop]})
    assert choices(stopped) == [(expected, "stop")]
    assert stopped["usage"]["completion_tokens"] < 40  # type: ignore[index]
    text, reason, usage = stream(overlapped, {**body, "stop": [stop]})
    assert (text, reason) == (expected, "stop")
    assert usage["completion_tokens"] == stopped["usage"]["completion_tokens"]  # type: ignore[index]
    assert_all_slots_free(overlapped)
    # The same prompt again reuses the cached prefix and generates the same tokens.
    again = complete(overlapped, body)
    assert again["choices"][0]["text"] == full  # type: ignore[index]
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0  # type: ignore[index]


def test_concurrent_mixed_requests_then_idle(overlapped: Server) -> None:
    """More requests than slots, with stops, n, lengths and streaming mixed: each streamed text
    equals its non-streamed twin, and every slot is free afterwards."""
    bodies = [
        {"prompt": fresh(f"Story number {i}:"), "temperature": 0, "max_tokens": 8 + 5 * i, "ignore_eos": True}
        for i in range(6)
    ]
    bodies[1]["stop"] = [" the", "."]
    bodies[2]["n"] = 2
    bodies[3]["max_tokens"] = 1
    with ThreadPoolExecutor(8) as pool:
        plain = list(pool.map(lambda b: complete(overlapped, b), bodies))
        streamed = list(pool.map(lambda b: stream(overlapped, b), [b for b in bodies if "n" not in b]))
    singles = [p for p, b in zip(plain, bodies) if "n" not in b]
    for p, (text, reason, usage) in zip(singles, streamed):
        assert choices(p) == [(text, reason)]
        assert usage["completion_tokens"] == p["usage"]["completion_tokens"]  # type: ignore[index]
    assert len(plain[2]["choices"]) == 2  # type: ignore[arg-type]
    assert plain[3]["usage"]["completion_tokens"] == 1  # type: ignore[index]
    assert_all_slots_free(overlapped)


def test_disconnects_free_their_slots(overlapped: Server) -> None:
    body = {"model": MODEL_ID, "prompt": fresh("Tell me a long story"), "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    for _ in range(3):
        with httpx.stream("POST", overlapped.v1 + "/completions", json=body, timeout=60) as r:
            for n, _line in enumerate(r.iter_lines()):
                if n > 6:
                    break
    deadline = time.monotonic() + 30
    while overlapped.engine_stats()["n_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_all_slots_free(overlapped)
    out = complete(overlapped, {"prompt": fresh("After the cancellations"), "max_tokens": 5, "ignore_eos": True})
    assert out["usage"]["completion_tokens"] == 5  # type: ignore[index]
