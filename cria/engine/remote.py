"""RemoteEngine: the engine in a child process (`--engine-process`), behind the Engine interface.

In one process the engine thread and the event loop share the GIL: after every llama_decode the
engine waits for the interpreter while the event loop encodes and writes the streams' chunks. On a
GPU, where a step of 64 sequences takes a few milliseconds, that wait decides the throughput. Here
the engine runs in its own interpreter (worker.py) and this process keeps only what the HTTP side
needs: the vocabulary (a vocab-only model: tokenize, detokenize, grammar checks), the request
checks, and one reader thread that takes each step's output off the pipe and hands it to the
event loop in one call.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import replace
from multiprocessing.connection import Connection
from typing import Any

from cria.engine.base import EngineBase, EngineState, StepObserver
from cria.engine.embedder import _set_outcome
from cria.engine.engine import _deliver
from cria.engine.llama import LlamaModel
from cria.engine.stream import RequestStream
from cria.engine.types import (
    Delta,
    EmbeddingRequest,
    EmbeddingResult,
    EngineStats,
    GenerationRequest,
)
from cria.engine.worker import WorkerSpec, unpack
from cria.errors import CriaError, EngineLoading, EngineUnavailable, Overloaded

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 1.0
# Once the model has loaded, an engine process that dies is started again (a crash in llama.cpp or
# in the GPU driver need not end the service), at most max_restarts times in this window; past
# that it stays dead and /health says so, for a supervisor to act on. A model that never loaded is
# not retried: that is a bad model or option, not a crash.
RESTART_WINDOW_S = 600.0
RESTART_KILL_WAIT_S = 30.0
# The first restart in the window is at once; each next one waits twice as long as the one before
# (1 s, 2 s, ...; at most RESTART_DELAY_MAX_S), e.g. for a driver to release the dead one's memory.
RESTART_DELAY_MAX_S = 8.0


class RemoteEngine(EngineBase):
    def __init__(self, spec: WorkerSpec, *, max_restarts: int = 3) -> None:
        self.config = spec.config
        self._spec = spec
        self._max_restarts = max_restarts
        self._restarts: deque[float] = deque()  # when each restart happened (monotonic)
        self._n_restarts = 0
        self.model: LlamaModel | None = None
        self.embedding_model: LlamaModel | None = None
        self.embedding_max_tokens = 0
        self._embedding_size = 0
        self._failure: str | None = None
        self._state = EngineState.LOADING
        self._ready = threading.Event()
        self._stopping = threading.Event()  # stop() was called (it also wakes a restart's wait)
        self._has_loaded = False  # an engine process has been ready once: the model loads
        self._observer: StepObserver | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._conn: Connection | None = None
        self._reader = threading.Thread(target=self._read, name="cria-engine-reader", daemon=True)
        # _lock guards the tables the reader thread also uses and is never held across I/O;
        # _send_lock orders the messages. The reader takes only _lock, so it always drains the
        # pipe, and a send that waits for the engine process to read can never block it.
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._streams: dict[str, tuple[RequestStream, asyncio.AbstractEventLoop]] = {}
        self._jobs: dict[str, tuple[asyncio.Future[EmbeddingResult], asyncio.AbstractEventLoop]] = {}
        self._stats_calls: dict[int, list[Any]] = {}  # call id -> [Event, EngineStats | None]
        self._call_ids = itertools.count()
        # What submit() bounds: the engine's queue as it last reported it, plus the requests
        # sent that it had not received then.
        self._n_sent = 0
        self._generation = 0  # engine processes started: _n_sent counts for the current one
        self._n_queued_reported = 0
        self._n_received_reported = 0
        self._last_stats = EngineStats(
            n_steps=0,
            max_seqs_per_step=0,
            n_running=0,
            n_waiting=0,
            n_slots=self.config.n_slots,
            n_slots_free=self.config.n_slots,
            n_kv_total_cells=self.config.n_slots * self.config.n_ctx_per_seq,
        )

    # ---- life cycle ----

    def set_observer(self, observer: StepObserver | None) -> None:
        self._observer = observer

    def start(self) -> None:
        self._spawn()
        self._reader.start()

    def _spawn(self) -> None:
        """Start an engine process and send it the spec (the reader waits for its "ready")."""
        ours, theirs = socket.socketpair()
        with theirs:
            process = subprocess.Popen(
                [sys.executable, "-m", "cria.engine.worker", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                start_new_session=True,  # a terminal's Ctrl-C is for this process, which stops it
            )
        conn = Connection(ours.detach())
        try:
            conn.send(self._spec)  # first, before any other thread can send on conn
        except OSError:
            pass  # it died at once: the reader finds its pipe closed
        with self._lock:
            if self._stopping.is_set():  # stop() came first: it will not look at this process
                process.kill()
                process.wait()
                conn.close()
                raise EOFError("the server is stopping")
            self._process, self._conn = process, conn
            self._generation += 1  # the new process counts its requests from zero
            self._n_sent = self._n_queued_reported = self._n_received_reported = 0

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def state(self) -> EngineState:
        return self._state

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:  # from here on no new engine process is started (_spawn)
            self._stopping.set()
        self._send(("stop",))
        process = self._process
        if process is not None:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._conn is not None:
            self._conn.close()
        if self._reader.is_alive():
            self._reader.join(timeout)

    @property
    def embedding_size(self) -> int:
        self._require_embedder()
        return self._embedding_size

    # ---- requests ----

    def submit(self, req: GenerationRequest) -> RequestStream:
        self._check_request(req)
        loop = asyncio.get_running_loop()
        stream = RequestStream(req.id, self.abort)
        with self._lock:
            n_waiting = self._n_queued_reported + self._n_sent - self._n_received_reported
            if n_waiting >= self.config.max_queue:
                raise Overloaded(f"the server is busy: {n_waiting} requests are waiting; retry later")
            # Registered before the send: its output may arrive as soon as the engine has it.
            self._streams[req.id] = (stream, loop)
            self._n_sent += 1
            generation = self._generation
        try:
            self._send(("submit", req))
        except BaseException:
            with self._lock:
                self._streams.pop(req.id, None)
                if self._generation == generation:  # else a restart has reset the count
                    self._n_sent -= 1
            raise
        return stream

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        self._require_embedder()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EmbeddingResult] = loop.create_future()
        with self._lock:
            if len(self._jobs) >= self.config.max_queue:
                raise Overloaded(
                    f"the server is busy: {len(self._jobs)} embedding requests are queued; "
                    "retry later"
                )
            self._jobs[req.id] = (future, loop)
        try:
            self._send(("embed", req))
        except BaseException:
            with self._lock:
                self._jobs.pop(req.id, None)
            raise
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(req.id)
            raise

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)
            self._jobs.pop(request_id, None)
        self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        """A fresh snapshot from the engine process (a round trip of well under a millisecond),
        or the last one if it does not answer."""
        if self._state is not EngineState.READY:
            return replace(self._last_stats, n_engine_restarts=self._n_restarts)
        done = threading.Event()
        call: list[Any] = [done, None]
        with self._lock:
            call_id = next(self._call_ids)
            self._stats_calls[call_id] = call
        if self._send(("stats", call_id)):
            done.wait(STATS_TIMEOUT_S)
        with self._lock:
            self._stats_calls.pop(call_id, None)
        if isinstance(call[1], EngineStats):
            self._last_stats = call[1]
        return replace(self._last_stats, n_engine_restarts=self._n_restarts)

    def _send(self, message: tuple[Any, ...]) -> bool:
        """Send a message to the engine process; False if it is gone. Requests (submit, embed)
        raise EngineUnavailable instead."""
        is_request = message[0] in ("submit", "embed")
        conn = self._conn
        # A request goes only to a ready engine. Its stream is registered before this check, and
        # _restart and _die change the state before they fail every registered stream: so a
        # request either is refused here or is failed there, never left with a dying process.
        state = self._state
        if conn is None or state is EngineState.DEAD or (is_request and state is not EngineState.READY):
            if is_request:
                if state is EngineState.LOADING:
                    raise EngineLoading(
                        f"the engine is restarting ({self._failure or 'loading'}); retry shortly"
                    )
                raise EngineUnavailable(f"the engine is not running: {self._failure or 'stopped'}")
            return False
        try:
            with self._send_lock:
                conn.send(message)
        except (OSError, ValueError) as exc:  # ValueError: the connection was closed
            if is_request:
                raise EngineUnavailable("the engine process is gone") from exc
            return False
        return True

    # ---- the reader thread ----

    def _read(self) -> None:
        try:
            # The vocabulary, for tokenizing here (no weights: a few MiB).
            spec = self._spec
            self.model = spec.load_model(vocab_only=True)
            self.embedding_model = self.model
            if spec.embedding_model is not None:
                self.embedding_model = spec.load_embedding_model(vocab_only=True)
        except Exception as exc:
            log.exception("the engine reader failed")
            self._die(f"the engine reader failed: {exc!r}")
            return
        while True:
            why, may_restart = self._read_process()
            if not (may_restart and self._has_loaded) or self._stopping.is_set():
                break
            if not self._may_restart():
                log.error(
                    "%s; not starting it again: %d restarts in the last %.0f minutes "
                    "(--engine-restarts %d)",
                    why, len(self._restarts), RESTART_WINDOW_S / 60, self._max_restarts,
                )  # fmt: skip
                break
            try:
                self._restart(why)
            except EOFError:  # the server is stopping
                break
            except Exception as exc:
                log.exception("the engine process could not be started again")
                why = f"{why}; it could not be started again: {exc!r}"
                break
        self._die(why)

    def _read_process(self) -> tuple[str, bool]:
        """Read the current engine process's messages until it ends: (why it ended, whether
        starting another may help)."""
        assert self._conn is not None
        conn, process = self._conn, self._process
        why = "the engine process exited"
        try:
            while True:
                message = conn.recv()
                kind = message[0]
                if kind == "out":
                    self._on_output(message[1], message[2], message[3])
                elif kind == "queue":
                    self._on_queue(message[1])
                elif kind == "embedded":
                    with self._lock:
                        job = self._jobs.pop(message[1], None)
                    if job is not None:
                        _call(job[1], _set_outcome, job[0], message[2])
                elif kind == "stats":
                    with self._lock:
                        call = self._stats_calls.get(message[1])
                    if call is not None:
                        call[1] = message[2]
                        call[0].set()
                elif kind == "ready":
                    self.embedding_max_tokens = message[1]
                    self._embedding_size = message[2]  # a vocab-only model does not know it
                    self._has_loaded = True
                    self._failure = None
                    self._state = EngineState.READY
                    self._ready.set()
                    log.info("engine process %d ready", process.pid if process else -1)
                elif kind == "dead":  # the engine loop died, or the model did not load
                    return message[1], True
        except (EOFError, OSError):
            if process is not None:
                try:
                    process.wait(5.0)  # the pipe closes a moment before the exit status is there
                except subprocess.TimeoutExpired:
                    pass
                if process.returncode is not None:
                    why = f"the engine process exited with code {process.returncode}"
            return why, True
        except Exception as exc:
            log.exception("the engine reader failed")
            return f"the engine reader failed: {exc!r}", False

    def _may_restart(self) -> bool:
        """Whether another restart fits in max_restarts per RESTART_WINDOW_S."""
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        return len(self._restarts) < self._max_restarts

    def _restart(self, why: str) -> None:
        """The engine process died once the model had loaded: fail what it held, start another
        (raises EOFError if the server stops meanwhile)."""
        delay = 0.0 if not self._restarts else min(2.0 ** (len(self._restarts) - 1), RESTART_DELAY_MAX_S)
        self._restarts.append(time.monotonic())
        log.error(
            "%s; starting it again%s (restart %d, at most %d in %.0f minutes)",
            why, f" in {delay:.0f} s" if delay else "", self._n_restarts + 1, self._max_restarts,
            RESTART_WINDOW_S / 60,
        )  # fmt: skip
        self._failure = why  # /health: "loading", with this as its error
        self._state = EngineState.LOADING
        # A retry works once the new process is ready: a 503 with Retry-After, which the OpenAI
        # SDKs wait for and retry.
        self._fail_all(EngineLoading(f"the engine stopped: {why}; it is restarting"))
        process, conn = self._process, self._conn
        if process is not None and process.poll() is None:
            process.kill()  # e.g. it said "dead": do not leave it running
        if process is not None:
            # One that SIGKILL cannot end (stuck in a driver) would hold its GPU memory: give up.
            process.wait(RESTART_KILL_WAIT_S)  # raises TimeoutExpired: _read then gives up
        if conn is not None:
            conn.close()
        if delay and self._stopping.wait(delay):
            raise EOFError("the server is stopping")
        self._spawn()
        self._n_restarts += 1

    def _on_queue(self, queue: tuple[int, int]) -> None:
        with self._lock:
            self._n_queued_reported, self._n_received_reported = queue

    def _on_output(
        self, items: list[tuple[Any, ...]], steps: list[tuple[float, int]], queue: tuple[int, int]
    ) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Delta | CriaError]]] = {}
        with self._lock:
            self._n_queued_reported, self._n_received_reported = queue
            for packed in items:
                request_id, item = unpack(packed)
                entry = self._streams.get(request_id)
                if entry is None:  # aborted meanwhile
                    continue
                if isinstance(item, CriaError) or item.finish_reason is not None:
                    del self._streams[request_id]
                by_loop.setdefault(entry[1], []).append((entry[0], item))
        for loop, pairs in by_loop.items():
            _call(loop, _deliver, pairs)
        observer = self._observer
        if observer is not None:
            for seconds, n_seqs in steps:
                observer.observe_step(seconds, n_seqs)

    def _die(self, why: str) -> None:
        self._failure = why
        self._state = EngineState.DEAD
        self._ready.set()
        if not self._stopping.is_set():
            log.error("%s", why)
            if self._process is not None and self._process.poll() is None:
                self._process.kill()  # e.g. the reader failed: do not leave it running
        self._fail_all(EngineUnavailable(f"the engine stopped: {why}"))

    def _fail_all(self, error: EngineUnavailable) -> None:
        """End every stream, embedding job and stats call in flight with this error."""
        with self._lock:
            streams, self._streams = self._streams, {}
            jobs, self._jobs = self._jobs, {}
            for call in self._stats_calls.values():
                call[0].set()
        for stream, loop in streams.values():
            _call(loop, _deliver, [(stream, error)])
        for future, loop in jobs.values():
            _call(loop, _set_outcome, future, error)


def _call(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass
