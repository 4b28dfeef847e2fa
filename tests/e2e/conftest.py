"""The real server as a process on a free port, with the bundled model, and clients for it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import openai
import pytest

MODEL_ID = "smollm2-135m-instruct"
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str  # http://127.0.0.1:PORT
    log_path: Path
    log_file: BinaryIO

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def health(self) -> dict[str, object]:
        r = httpx.get(self.base_url + "/health", timeout=10)
        body = r.json()
        assert isinstance(body, dict)
        return body

    def engine_stats(self) -> dict[str, int]:
        stats = self.health()["engine"]
        assert isinstance(stats, dict)
        return stats

    def wait_idle(self, timeout: float = 30.0) -> dict[str, int]:
        """Wait until no request is running or waiting; returns the engine stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine_stats()
            if stats["n_running"] == 0 and stats["n_waiting"] == 0:
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"engine still busy after {timeout}s: {stats}")
            time.sleep(0.05)


def start_server(tmp: Path, *args: str, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    log_path = tmp / f"cria-{port}.log"
    log = log_path.open("wb")
    cmd = [sys.executable, "-m", "cria", "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CRIA_")}
    full_env.update(env or {})
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = Server(process, f"http://127.0.0.1:{port}", log_path, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.close()
            raise RuntimeError(f"cria exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(server.base_url + "/health", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    stop_server(server)
    raise RuntimeError(f"cria did not become healthy in {START_TIMEOUT}s:\n{log_path.read_text()}")


def completion_chunks(server: Server, body: dict[str, object]) -> list[dict[str, Any]]:
    """The JSON chunks of a streamed /v1/completions (with usage), [DONE] left out."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks: list[dict[str, Any]] = []
    with httpx.stream("POST", server.v1 + "/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it is still there after 15 s."""
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def stop_server(server: Server) -> None:
    stop_process(server.process)
    server.log_file.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("server"), "--parallel", "8")
    yield srv
    stop_server(srv)
    assert srv.process.returncode is not None
    # Nothing a client sent may have crashed a handler or the engine.
    log = srv.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-4000:]


@pytest.fixture(scope="session")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=60) as c:
        yield c
