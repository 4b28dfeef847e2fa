"""The engine's own process (`--engine-process`): `python -m cria.engine.worker FD`.

The HTTP process (remote.py) starts it with one end of a socket pair and sends a WorkerSpec
first. This process runs the ordinary Engine; its main thread reads requests from the pipe, and
what the engine hands over after each step goes back down the pipe in one message. The engine
thread then shares the GIL only with this mostly idle main thread, never with the event loop
that writes the HTTP responses.

    to the engine:   ("submit", GenerationRequest) ("embed", EmbeddingRequest) ("abort", id)
                     ("stats", call id) ("stop",)
    from the engine: ("ready", embedding_max_tokens, embedding size) ("dead", why)
                     ("out", [(request id, Delta | CriaError) or (request id, text, n_tokens)],
                             [(step seconds, n_seqs)], (n waiting, n received))
                     ("queue", (n waiting, n received))
                     ("embedded", request id, EmbeddingResult | CriaError) ("stats", call id, EngineStats)
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cria.engine.base import EngineConfig, EngineState
from cria.engine.embedder import _set_outcome
from cria.engine.engine import Engine, _deliver
from cria.engine.llama import LlamaModel
from cria.engine.types import AdapterFile, Delta
from cria.errors import CriaError

# While requests come and go without output (aborts of waiting ones), the queue's length
# reaches the server at most this late.
QUEUE_REPORT_S = 0.05


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything the engine process needs to build its Engine."""

    model: Path
    n_gpu_layers: int
    use_mmap: bool
    config: EngineConfig
    embedding_model: Path | None = None
    log_level: str = "info"
    log_format: str = "text"
    switch_interval: float = 0.0005
    tokenizer: Any = None  # a TokenizerSource (-v/-r) that stands in for the GGUF's tokenizer
    adapters: tuple[AdapterFile, ...] = ()  # LoRA adapters (-l), checked at start-up

    def load_model(self, *, vocab_only: bool = False) -> LlamaModel:
        """The chat model, with its external tokenizer and its adapters (not with
        `vocab_only`, which only tokenizes)."""
        tokenizer = None
        if self.tokenizer is not None:
            from cria.models.tokenizer import ExternalTokenizer

            tokenizer = ExternalTokenizer(self.tokenizer)
        return LlamaModel(
            self.model,
            n_gpu_layers=0 if vocab_only else self.n_gpu_layers,
            use_mmap=True if vocab_only else self.use_mmap,
            vocab_only=vocab_only,
            tokenizer=tokenizer,
            adapters=self.adapters,
        )

    def load_embedding_model(self, *, vocab_only: bool = False) -> LlamaModel:
        """The dedicated embedding model (--embedding-model; without one the chat model embeds)."""
        assert self.embedding_model is not None
        return LlamaModel(
            self.embedding_model,
            n_gpu_layers=0 if vocab_only else self.n_gpu_layers,
            use_mmap=True if vocab_only else self.use_mmap,
            vocab_only=vocab_only,
        )


class Outlet:
    """Stands in for the event loop the engine hands its output to: each hand-off (one per step)
    becomes one message on the pipe. Also the engine's step observer, whose observations ride
    along with the next message."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()  # the engine thread and the main thread both send
        self._steps: list[tuple[float, int]] = []
        self.engine: Engine | None = None
        self.n_received = 0  # requests received (the main thread counts them)
        self._queue_sent = (0, 0)

    def send(self, message: tuple[Any, ...]) -> None:
        with self._lock:
            self._conn.send(message)

    def queue(self) -> tuple[int, int]:
        """(requests waiting for a slot, requests received): with the count of requests it
        sent, the server knows the queue's length without asking."""
        n_queued = self.engine._n_queued if self.engine is not None else 0
        return n_queued, self.n_received

    def send_queue_if_changed(self) -> None:
        """For changes no output tells of (a waiting request aborted, admissions)."""
        queue = self.queue()
        if queue != self._queue_sent:
            self._queue_sent = queue
            self.send(("queue", queue))

    def observe_step(self, seconds: float, n_seqs: int) -> None:
        self._steps.append((seconds, n_seqs))

    def call_soon_threadsafe(self, fn: Any, *args: Any) -> None:
        try:
            if fn is _deliver:
                (items,) = args
                steps, self._steps = self._steps, []
                queue = self._queue_sent = self.queue()
                self.send(("out", [_pack(s.request_id, item) for s, item in items], steps, queue))
            elif fn is _set_outcome:
                job_id, outcome = args
                self.send(("embedded", job_id, outcome))
            else:
                raise TypeError(f"unexpected hand-off {fn!r}")
        except OSError as exc:  # the HTTP process is gone: as if its event loop were closed
            raise RuntimeError("the server process is gone") from exc


def _pack(request_id: str, item: Delta | CriaError) -> tuple[Any, ...]:
    """A plain Delta (text only, the common case) as (id, text, n_tokens): pickling the
    dataclass costs ~30x more, and a step hands over one per running sequence."""
    if (
        isinstance(item, Delta)
        and item.finish_reason is None
        and not item.logprobs
        and item.prompt_logprobs is None
    ):
        return (request_id, item.text, item.n_tokens)
    return (request_id, item)


def unpack(packed: tuple[Any, ...]) -> tuple[str, Delta | CriaError]:
    if len(packed) == 3:
        return packed[0], Delta(packed[1], packed[2])
    return packed[0], packed[1]


def main(fd: int) -> int:
    # The server process decides when this one ends (a "stop" message, or the pipe closing when
    # it exits): Ctrl-C in a terminal or a service manager's SIGTERM reach the whole process
    # group, and must not end the engine under the requests the server is still finishing.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    conn = Connection(fd)
    spec: WorkerSpec = conn.recv()
    from cria.telemetry.logs import configure_logging

    configure_logging(spec.log_level, spec.log_format)
    sys.setswitchinterval(spec.switch_interval)
    outlet = Outlet(conn)
    engine = Engine(
        spec.load_model,
        spec.config,
        load_embedding_model=None if spec.embedding_model is None else spec.load_embedding_model,
    )
    outlet.engine = engine
    engine.set_observer(outlet)
    engine.start()
    engine.wait_ready()
    if engine.state is not EngineState.READY:
        outlet.send(("dead", engine.failure or "the engine did not start"))
        return 1
    assert engine.embedding_model is not None
    outlet.send(("ready", engine.embedding_max_tokens, engine.embedding_model.n_embd_out))
    try:
        while True:
            if engine.state is not EngineState.READY:  # the engine loop died: say so, and go
                outlet.send(("dead", engine.failure or "the engine stopped"))
                break
            if not conn.poll(QUEUE_REPORT_S):
                outlet.send_queue_if_changed()
                continue
            message = conn.recv()
            kind = message[0]
            if kind == "submit":
                req = message[1]
                outlet.n_received += 1
                try:
                    engine.submit(req, loop=outlet)  # type: ignore[arg-type]
                except CriaError as exc:  # e.g. the queue filled up since the server checked
                    outlet.send(("out", [(req.id, exc)], [], outlet.queue()))
            elif kind == "abort":
                engine.abort(message[1])
            elif kind == "embed":
                ereq = message[1]
                try:
                    engine.submit_embedding(ereq, ereq.id, outlet)
                except CriaError as exc:
                    outlet.send(("embedded", ereq.id, exc))
            elif kind == "stats":
                outlet.send(("stats", message[1], engine.stats()))
            elif kind == "stop":
                break
    except (EOFError, OSError):  # the server process is gone
        pass
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
