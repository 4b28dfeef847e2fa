"""Tracing: spans exported to a real Zipkin-compatible receiver on loopback."""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL_ID, Server, free_port, start_server, stop_server

SPANS_PATH = "/api/v2/spans"
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}


class Receiver:
    """A tiny Zipkin: `POST /api/v2/spans` with a JSON list of spans, kept in memory."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != SPANS_PATH:
                    self.send_response(404)
                    self.end_headers()
                    return
                with receiver.lock:
                    receiver.spans.extend(json.loads(body))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}{SPANS_PATH}"

    def spans_of(self, trace_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [s for s in self.spans if s.get("traceId") == trace_id]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def traced_server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[Server]:
    srv = start_server(
        tmp_path_factory.mktemp("traced"), "--parallel", "2", "-z", receiver.endpoint, env=FAST_EXPORT
    )
    yield srv
    stop_server(srv)
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def test_unreachable_endpoint_never_fails_or_slows_requests(tmp_path: Path, server: Server) -> None:
    # First in this module: the traced server (module fixture) is not started yet, so only
    # one extra server runs at a time.
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
    }

    def timed(base: str) -> float:
        start = time.perf_counter()
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200
        return time.perf_counter() - start

    closed = f"http://127.0.0.1:{free_port()}{SPANS_PATH}"  # nothing listens there
    srv = start_server(tmp_path, "--parallel", "2", "-z", closed, env=FAST_EXPORT)
    try:
        times = []
        for _ in range(5):
            times.append(timed(srv.base_url))
            time.sleep(0.3)  # let the exporter try (and fail) between requests
        assert httpx.get(srv.base_url + "/health", timeout=10).status_code == 200
    finally:
        stop_server(srv)
    baseline = min(timed(server.base_url) for _ in range(3))
    assert min(times) < max(1.0, 5 * baseline), (times, baseline)
    assert max(times) < 10, times
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]
    assert log.count("cannot export") <= 1, log[-4000:]


def _wait_for_spans(receiver: Receiver, trace_id: str, names: set[str]) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        spans = receiver.spans_of(trace_id)
        if names <= {s["name"].lower() for s in spans}:
            return spans
        if time.monotonic() > deadline:
            raise AssertionError(f"spans of {trace_id} after 15s: {spans}")
        time.sleep(0.1)


def test_chat_request_spans_join_the_callers_trace(traced_server: Server, receiver: Receiver) -> None:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    r = httpx.post(
        traced_server.v1 + "/chat/completions",
        json={
            "model": MODEL_ID,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        },
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
        timeout=60,
    )
    assert r.status_code == 200
    usage = r.json()["usage"]
    server_name = "post /v1/chat/completions"
    spans = _wait_for_spans(receiver, trace_id, {server_name, "queue", "prefill", "decode"})
    by_name = {s["name"].lower(): s for s in spans}
    server = by_name[server_name]
    assert server["parentId"] == parent_id
    assert server["kind"] == "SERVER"
    assert server["tags"]["http.request.method"] == "POST"
    assert server["tags"]["http.route"] == "/v1/chat/completions"
    assert server["tags"]["http.response.status_code"] == "200"
    for name in ("queue", "prefill", "decode"):
        child = by_name[name]
        assert child["parentId"] == server["id"]
        assert child["tags"]["gen_ai.request.model"] == MODEL_ID
        assert child["tags"]["gen_ai.request.max_tokens"] == "8"
        assert child["tags"]["cria.slot"].isdigit()
        # within the server span
        assert server["timestamp"] <= child["timestamp"]
        assert child["timestamp"] + child.get("duration", 0) <= server["timestamp"] + server["duration"] + 1000
    prefill, decode = by_name["prefill"], by_name["decode"]
    assert prefill["tags"]["gen_ai.usage.input_tokens"] == str(usage["prompt_tokens"])
    assert "cria.prefix_cached_tokens" in prefill["tags"]
    assert decode["tags"]["gen_ai.usage.output_tokens"] == str(usage["completion_tokens"])
    finish = r.json()["choices"][0]["finish_reason"]
    assert json.loads(decode["tags"]["gen_ai.response.finish_reasons"]) == [finish]
    assert by_name["queue"]["timestamp"] <= prefill["timestamp"] <= decode["timestamp"]


def test_streaming_request_without_traceparent_starts_a_trace(
    traced_server: Server, receiver: Receiver
) -> None:
    with httpx.stream(
        "POST",
        traced_server.v1 + "/completions",
        json={"model": MODEL_ID, "prompt": "Once upon", "max_tokens": 4, "stream": True},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert any("[DONE]" in line for line in r.iter_lines())
    deadline = time.monotonic() + 15
    while True:
        with receiver.lock:
            servers = [s for s in receiver.spans if s["name"].lower() == "post /v1/completions"]
        if servers:
            break
        assert time.monotonic() < deadline, "no span for POST /v1/completions"
        time.sleep(0.1)
    server = servers[0]
    assert "parentId" not in server
    spans = _wait_for_spans(receiver, server["traceId"], {"decode"})
    decode = next(s for s in spans if s["name"].lower() == "decode")
    assert decode["parentId"] == server["id"]
    assert 1 <= int(decode["tags"]["gen_ai.usage.output_tokens"]) <= 4
