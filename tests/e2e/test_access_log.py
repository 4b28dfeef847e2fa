"""Access log: one JSON line per request with its request id, route, status, tokens and TTFT."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import MODEL_ID, Server, start_server, stop_server


@pytest.fixture(scope="module")
def json_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("logs"), "--parallel", "2", "--log-format", "json")
    yield srv
    stop_server(srv)
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


def _records(server: Server) -> list[dict[str, Any]]:
    server.log_file.flush()
    records = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def _access_lines(server: Server, request_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:  # the line is written just after the response is sent
        lines = [r for r in _records(server) if r["logger"] == "cria.access" and r["request_id"] == request_id]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_every_log_record_is_json(json_server: Server) -> None:
    assert httpx.get(json_server.base_url + "/health", timeout=10).status_code == 200
    lines = [line for line in json_server.log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, uvicorn's and the engine's too
    assert records and {"time", "level", "logger", "message"} <= set(records[0])
    loggers = {r["logger"] for r in records}
    assert "cria" in loggers and "uvicorn.error" in loggers, loggers
    assert not any(r["logger"] == "uvicorn.access" for r in records)


def test_chat_and_404_each_give_one_access_line(json_server: Server) -> None:
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0}
    r = httpx.post(json_server.v1 + "/chat/completions", json=body, timeout=60)
    assert r.status_code == 200
    usage = r.json()["usage"]
    chat_id = r.headers["x-request-id"]
    assert len(chat_id) == 12

    missing = httpx.get(json_server.base_url + "/nope", headers={"x-request-id": "client-id-1"}, timeout=10)
    assert missing.status_code == 404
    assert missing.headers["x-request-id"] == "client-id-1"

    [chat] = _access_lines(json_server, chat_id)
    assert chat["method"] == "POST" and chat["route"] == "/v1/chat/completions"
    assert chat["status"] == 200
    assert chat["prompt_tokens"] == usage["prompt_tokens"] > 0
    assert chat["completion_tokens"] == usage["completion_tokens"] > 0
    assert isinstance(chat["ttft_ms"], float) and 0 < chat["ttft_ms"] <= chat["total_ms"]

    [nope] = _access_lines(json_server, "client-id-1")
    assert nope["method"] == "GET" and nope["route"] == "/nope" and nope["status"] == 404
    assert (nope["prompt_tokens"], nope["completion_tokens"], nope["ttft_ms"]) == (0, 0, None)
    assert nope["total_ms"] >= 0


def test_streamed_chat_access_line_has_its_tokens(json_server: Server) -> None:
    body = {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 2,
    }
    usage: dict[str, int] = {}
    with httpx.stream("POST", json_server.v1 + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        request_id = r.headers["x-request-id"]
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
    assert usage
    [line] = _access_lines(json_server, request_id)
    assert line["status"] == 200 and line["route"] == "/v1/chat/completions"
    assert line["completion_tokens"] == usage["completion_tokens"]
    assert line["prompt_tokens"] == 2 * usage["prompt_tokens"]  # summed over the two sequences
    assert line["ttft_ms"] is not None
