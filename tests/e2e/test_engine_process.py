"""--engine-process on: the engine runs in a child process; the HTTP side talks to it by a pipe.

`auto` turns it on with GPU offload; here on the CPU it is forced on. What a client sees must be
what the in-process engine gives. A dead engine process is started again (`--engine-restarts`);
past that limit it must give 503s, never a hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL_ID, Server, start_server, stop_server


def engine_pid(server: Server) -> int:
    """The engine process: the server's one child running cria.engine.worker."""
    out = subprocess.run(
        ["ps", "-o", "pid=,args=", "--ppid", str(server.process.pid)],
        capture_output=True, text=True, check=True,
    ).stdout
    pids = [int(line.split()[0]) for line in out.splitlines() if "cria.engine.worker" in line]
    assert len(pids) == 1, out
    return pids[0]


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("engine-process"), "--parallel", "4", "--engine-process", "on"
    )
    yield srv
    child = engine_pid(srv)
    stop_server(srv)
    assert srv.process.returncode in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    deadline = time.monotonic() + 10
    while is_running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not is_running(child), "the engine process outlived the server"
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def fresh(prompt: str) -> str:
    return f"[{uuid.uuid4().hex[:8]}] {prompt}"


def post(server: Server, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(server.v1 + path, json={"model": MODEL_ID, **body}, timeout=120)


def test_runs_in_a_child_process(remote: Server) -> None:
    assert engine_pid(remote) != remote.process.pid
    assert remote.health()["status"] == "ok"


def test_same_output_as_the_in_process_engine(server: Server, remote: Server) -> None:
    for body in [
        {"prompt": fresh("Once upon a time"), "max_tokens": 20, "temperature": 0, "ignore_eos": True},
        {"prompt": fresh("Count: one, two,"), "max_tokens": 10, "temperature": 0, "logprobs": 2, "stop": [","]},
        {"prompt": fresh("Name a colour."), "max_tokens": 0, "echo": True, "logprobs": 1},
        {"prompt": fresh("A list:"), "max_tokens": 12, "temperature": 0.8, "seed": 7, "n": 2},
    ]:
        a, b = post(server, "/completions", body), post(remote, "/completions", body)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        ja, jb = a.json(), b.json()
        assert [(c["text"], c["finish_reason"], c["logprobs"]) for c in jb["choices"]] == [
            (c["text"], c["finish_reason"], c["logprobs"]) for c in ja["choices"]
        ]
        # cached_tokens depends on what each server's caches hold: the random tag shares its
        # first characters with earlier prompts by chance.
        counts = ("prompt_tokens", "completion_tokens", "total_tokens")
        assert [jb["usage"][k] for k in counts] == [ja["usage"][k] for k in counts]


def test_streams_chat_and_embeddings(remote: Server) -> None:
    with openai.OpenAI(base_url=remote.v1, api_key="unused", max_retries=0, timeout=60) as client:
        messages = [{"role": "user", "content": fresh("Say something.")}]
        whole = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16, temperature=0)  # type: ignore[arg-type]
        chunks = list(client.chat.completions.create(
            model=MODEL_ID, messages=messages, max_tokens=16, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        ))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
        emb = client.embeddings.create(model=MODEL_ID, input=["one", "two three"], dimensions=32)
        assert [len(d.embedding) for d in emb.data] == [32, 32]
    r = httpx.post(remote.base_url + "/tokenize", json={"content": "hello world"}, timeout=10)
    assert r.status_code == 200 and r.json()["count"] > 0


def test_bad_input_is_refused_by_the_http_side(remote: Server) -> None:
    r = post(remote, "/completions", {"prompt": [999999], "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = post(remote, "/completions", {"prompt": "x", "max_tokens": 10_000_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_concurrency_cancellation_and_metrics(remote: Server) -> None:
    long = {"model": MODEL_ID, "prompt": fresh("Tell a long story"), "max_tokens": 300,
            "ignore_eos": True, "stream": True}
    for _ in range(2):  # clients that leave mid-stream
        with httpx.stream("POST", remote.v1 + "/completions", json=long, timeout=60) as r:
            for n, _line in enumerate(r.iter_lines()):
                if n > 4:
                    break
    bodies = [{"prompt": fresh(f"Item {i}:"), "max_tokens": 6 + i, "ignore_eos": True} for i in range(10)]
    with ThreadPoolExecutor(10) as pool:
        outs = list(pool.map(lambda b: post(remote, "/completions", b), bodies))
    assert [o.json()["usage"]["completion_tokens"] for o in outs] == [6 + i for i in range(10)]
    stats = remote.wait_idle()
    assert stats["n_slots_free"] == stats["n_slots"] == 4
    assert stats["max_seqs_per_step"] > 1  # still batched across requests
    metrics = httpx.get(remote.base_url + "/metrics", timeout=10).text
    steps = [line for line in metrics.splitlines() if line.startswith("cria_decode_step_seconds_count")]
    assert steps and float(steps[0].split()[-1]) > 0  # step observations cross the pipe


def stream_status(server: Server, body: dict[str, object], hold: float = 0.0) -> int:
    """Status of a streamed completion; with `hold`, the client reads for that long, then leaves."""
    with httpx.stream("POST", server.v1 + "/completions", json={**body, "stream": True}, timeout=120) as r:
        started = time.monotonic()
        if r.status_code == 200:
            for _line in r.iter_lines():
                if hold and time.monotonic() - started > hold:
                    break
        return r.status_code


# Two streamed requests from one process, the second once the first runs; killed by the test.
HOLDER = """
import sys, threading, time, httpx
url, model = sys.argv[1], sys.argv[2]
def run():
    body = {"model": model, "prompt": "Go on:", "max_tokens": 1000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/completions", json=body, timeout=120) as r:
        for _ in r.iter_lines():
            pass
threading.Thread(target=run).start()
time.sleep(0.5)
run()
"""


def test_queue_limit_gives_429_and_recovers(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--parallel", "1", "--max-queue", "1", "--engine-process", "on")
    try:
        body = {"model": MODEL_ID, "prompt": "Go on:", "max_tokens": 200, "ignore_eos": True}
        with ThreadPoolExecutor(6) as pool:
            codes = list(pool.map(lambda _: httpx.post(srv.v1 + "/completions", json=body, timeout=120), range(6)))
        statuses = sorted(r.status_code for r in codes)
        assert 429 in statuses and 200 in statuses, statuses
        for r in codes:
            if r.status_code == 429:
                assert r.json()["error"]["type"] == "rate_limit_error"
        # Streamed requests are refused with a 429 status too, before any SSE is sent.
        with ThreadPoolExecutor(4) as pool:
            streamed = sorted(pool.map(lambda _: stream_status(srv, body), range(4)))
        assert 429 in streamed and 200 in streamed, streamed
        # A client process with one running and one waiting request dies: both connections
        # close at once. When both aborts reach the engine in the same step, no output tells
        # the server that the queue emptied (the engine process reports it within 50 ms
        # instead); either way the server must take new requests again.
        client = subprocess.Popen([sys.executable, "-c", HOLDER, srv.v1, MODEL_ID])
        try:
            assert client.stdout is None
            deadline = time.monotonic() + 30
            while srv.engine_stats()["n_waiting"] < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.05)
        finally:
            client.kill()
            client.wait()
        stats = srv.wait_idle()
        assert stats["n_slots_free"] == 1
        deadline = time.monotonic() + 5
        while True:
            r = httpx.post(srv.v1 + "/completions", json={**body, "max_tokens": 3}, timeout=60)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert r.status_code == 200, r.text
    finally:
        stop_server(srv)


def wait_for_status(srv: Server, wanted: str, timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        health = srv.health()
        if health.get("status") == wanted:
            return health
        assert time.monotonic() < deadline, f"/health never said {wanted!r}: {health}"
        time.sleep(0.05)


def next_engine_pid(server: Server, old: int, timeout: float = 30) -> int:
    """The engine process started after `old` died."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            ["ps", "-o", "pid=,args=", "--ppid", str(server.process.pid)],
            capture_output=True, text=True, check=True,
        ).stdout
        pids = [int(line.split()[0]) for line in out.splitlines() if "cria.engine.worker" in line]
        if pids and pids[0] != old:
            return pids[0]
        assert time.monotonic() < deadline, "no new engine process"
        time.sleep(0.005)


def test_a_dead_engine_process_is_restarted_then_gives_503_not_a_hang(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--parallel", "2", "--engine-process", "on", "--engine-restarts", "2")
    try:
        body = {"model": MODEL_ID, "prompt": "Go on:", "max_tokens": 500, "ignore_eos": True, "stream": True}
        first = engine_pid(srv)
        with httpx.stream("POST", srv.v1 + "/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            os.kill(first, signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data: ")]
        events = [json.loads(line[6:]) for line in rest if line != "data: [DONE]"]
        errors = [e["error"] for e in events if "error" in e]
        assert errors and errors[0]["code"] == "engine_unavailable", rest[-3:]

        # The new process dies too, while it loads (it takes ~0.4 s): the model has loaded
        # before, so this is a crash, not a bad model, and it is started again, a second later.
        second = next_engine_pid(srv, first)
        assert srv.health()["status"] == "loading"
        os.kill(second, signal.SIGKILL)

        # While the next one loads, requests get a 503 that says why, with Retry-After.
        r = httpx.post(srv.v1 + "/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
        if r.status_code != 200:
            error = r.json()["error"]
            assert r.status_code == 503 and error["code"] == "engine_unavailable", r.text
            assert "restarting" in error["message"] and "exited" in error["message"], r.text
            assert r.headers["retry-after"] == "1"  # the OpenAI SDKs wait that long, then retry

        # Started again: the same answers as before, from a new process, and counted.
        health = wait_for_status(srv, "ok")
        engine = health["engine"]
        assert isinstance(engine, dict) and engine["n_engine_restarts"] == 2
        third = engine_pid(srv)
        assert third not in (first, second) and not is_running(first) and not is_running(second)
        r = httpx.post(srv.v1 + "/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        metrics = httpx.get(srv.base_url + "/metrics", timeout=10).text
        assert "cria_engine_restarts_total 2.0" in metrics
        log = srv.log_path.read_text(errors="replace")
        assert "starting it again (restart 1" in log and "starting it again in 1 s (restart 2" in log

        # Past --engine-restarts it stays dead: 503s, never a hang.
        os.kill(third, signal.SIGKILL)
        health = wait_for_status(srv, "dead", timeout=10)
        assert "exited" in str(health["error"])
        r = httpx.get(srv.base_url + "/health", timeout=10)
        assert r.status_code == 503
        r = httpx.post(srv.v1 + "/completions", json={**body, "stream": False, "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        assert "retry-after" not in r.headers  # nothing to wait for
        assert not is_running(third)
        assert "not starting it again: 2 restarts" in srv.log_path.read_text(errors="replace")
    finally:
        srv.process.terminate()
        srv.process.wait(timeout=15)
        srv.log_file.close()
