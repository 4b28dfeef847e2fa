"""The engine: one thread owns llama.cpp and serves every request by continuous batching.

    HTTP handler ── submit(GenerationRequest) ──► inbox ──► waiting ──► slot (prefix reuse)
         ▲                                                                │
         └── RequestStream (async iterator of Delta) ◄── call_soon_threadsafe ◄── step()

A step admits (admission.py), plans (decode every running sequence, then prompt chunks within
the batch budget), runs one `llama_decode` for all of them (batching.py), then samples,
detokenizes and matches stops (output.py). Between steps the same thread runs embedding decodes
on a context of their own (embedder.py), paced so that generation is not starved.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from cria.engine.admission import MIN_SAVED_TOKENS, Admission
from cria.engine.base import EngineBase, EngineConfig, EngineState, StepObserver
from cria.engine.batch import Batch
from cria.engine.batching import Batcher, new_sampler
from cria.engine.embedder import Embedder, EmbeddingJob
from cria.engine.llama import LlamaContext, LlamaModel
from cria.engine.output import Output, _deliver
from cria.engine.prompt_cache import PromptCache
from cria.engine.scheduler import AdapterTurns, SeqState, plan_step
from cria.engine.seq import _Seq, _TextWork
from cria.engine.slots import SlotTable
from cria.engine.stream import RequestStream
from cria.engine.text import StopMatcher
from cria.engine.timing import StepTiming
from cria.engine.types import EmbeddingRequest, EmbeddingResult, EngineStats, GenerationRequest
from cria.errors import CriaError, EngineFailure, EngineUnavailable, Overloaded

# Re-exported: worker.py and remote.py hand output over with `_deliver`.
__all__ = ["MIN_SAVED_TOKENS", "Engine", "_Seq", "_TextWork", "_deliver"]

log = logging.getLogger(__name__)

# With LoRA adapters, the steps an adapter set keeps while another set waits (AdapterTurns).
ADAPTER_QUANTUM = 4


class Engine(EngineBase):
    def __init__(
        self,
        load_model: Callable[[], LlamaModel],
        config: EngineConfig,
        *,
        load_embedding_model: Callable[[], LlamaModel] | None = None,
    ) -> None:
        """`load_embedding_model`: a dedicated model for embeddings; by default the chat model
        makes them."""
        self.config = config
        self._load_model = load_model
        self._load_embedding_model = load_embedding_model
        self.model: LlamaModel | None = None
        self.embedding_model: LlamaModel | None = None
        self.embedding_max_tokens = 0  # longest input an embedding may have (set once loaded)
        self._state = EngineState.LOADING
        self._failure: str | None = None
        self._cond = threading.Condition()
        self._inbox: deque[_Seq] = deque()
        self._aborts: set[str] = set()
        self._n_queued = 0  # submitted, not yet in a slot (guarded by _cond)
        self._embed_inbox: deque[EmbeddingJob] = deque()
        self._n_embed_jobs = 0  # embedding requests not yet finished (guarded by _cond)
        self._is_stopping = False
        self._thread = threading.Thread(target=self._run, name="cria-engine", daemon=True)
        # Engine-thread state:
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []  # in admission order
        self._slots = SlotTable(config.n_slots, config.adapters)
        self._prompt_cache: PromptCache[np.ndarray] | None = (
            PromptCache(config.prompt_cache_bytes) if config.prompt_cache_bytes else None
        )
        self._admission = Admission(self._slots, self._prompt_cache)
        self._adapter_turns: AdapterTurns | None = None  # with LoRA adapters: whose step it is
        self._ctx: LlamaContext | None = None
        self._batch: Batch | None = None
        self._batcher: Batcher | None = None  # made with the context
        self._embedder: Embedder | None = None
        self._output = Output(self._finish)
        # Text work of the last step's tokens, done while the next step decodes (overlap_text).
        self._owed: list[_TextWork] = []
        self._by_slot: dict[int, _Seq] = {}
        self._eog_ids: list[int] = []
        self._timing = StepTiming()
        self._ready = threading.Event()
        self._observer: StepObserver | None = None

    def set_observer(self, observer: StepObserver | None) -> None:
        """Call before start(): the engine thread reads it without a lock."""
        self._observer = observer

    # ---- public API (any thread) ----

    def start(self) -> None:
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    @property
    def state(self) -> EngineState:
        if self._state is EngineState.READY and not self._thread.is_alive():
            return EngineState.DEAD
        return self._state

    def submit(
        self, req: GenerationRequest, *, loop: asyncio.AbstractEventLoop | None = None
    ) -> RequestStream:
        """Queue a request; returns its stream of Deltas. Called on the event loop that reads
        the stream, or with the `loop` (any object with call_soon_threadsafe) that takes the
        engine's output."""
        self._check_request(req)
        stream = RequestStream(req.id, self.abort)
        seq = _Seq(
            req=req,
            stream=stream,
            loop=loop or asyncio.get_running_loop(),
            t_submitted=time.perf_counter(),
        )
        with self._cond:
            if self._n_queued >= self.config.max_queue:
                raise Overloaded(
                    f"the server is busy: {self._n_queued} requests are waiting; retry later"
                )
            self._n_queued += 1
            self._inbox.append(seq)
            self._cond.notify()
        return stream

    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        self._require_embedder()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EmbeddingResult] = loop.create_future()
        self.submit_embedding(req, future, loop)
        try:
            return await future
        except asyncio.CancelledError:
            self.abort(req.id)
            raise

    def submit_embedding(self, req: EmbeddingRequest, future: Any, loop: Any) -> None:
        """Queue an embedding job; its outcome is handed over with
        `loop.call_soon_threadsafe(embedder._set_outcome, future, outcome)`."""
        self._require_embedder()
        job = EmbeddingJob(req, future, loop)
        with self._cond:
            if self._n_embed_jobs >= self.config.max_queue:
                raise Overloaded(
                    f"the server is busy: {self._n_embed_jobs} embedding requests are queued; "
                    "retry later"
                )
            self._n_embed_jobs += 1
            self._embed_inbox.append(job)
            self._cond.notify()

    def _embedding_finished(self, _job: EmbeddingJob) -> None:
        with self._cond:
            self._n_embed_jobs -= 1

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._aborts.add(request_id)
            self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            n_waiting = self._n_queued
            n_embedding_jobs = self._n_embed_jobs
        timing, batcher = self._timing, self._batcher
        slots = self._slots.slots  # read racily from another thread: a snapshot for display
        cache = self._prompt_cache
        turns = self._adapter_turns
        return EngineStats(
            python_us_per_step=timing.python_us_per_step,
            python_us_per_seq=timing.python_us_per_seq,
            python_share=timing.python_share,
            step_seconds=timing.busy_s,
            python_seconds=timing.python_s,
            n_seq_steps=timing.n_seq_steps,
            n_steps=batcher.n_steps if batcher is not None else 0,
            max_seqs_per_step=batcher.max_seqs_per_step if batcher is not None else 0,
            n_running=len(self._running),
            n_waiting=n_waiting,
            n_slots=self.config.n_slots,
            n_embedding_jobs=n_embedding_jobs,
            n_embedding_decodes=self._embedder.n_decodes if self._embedder is not None else 0,
            max_inputs_per_embedding_decode=(
                self._embedder.max_inputs_per_decode if self._embedder is not None else 0
            ),
            n_slots_free=sum(1 for s in slots if not s.is_busy),
            n_kv_used_cells=sum(len(s.cached) for s in slots),
            n_kv_total_cells=self.config.n_slots * self.config.n_ctx_per_seq,
            n_prompt_cache_entries=len(cache) if cache is not None else 0,
            prompt_cache_bytes=cache.n_bytes if cache is not None else 0,
            n_adapter_switches=self._ctx.n_adapter_switches if self._ctx is not None else 0,
            max_adapter_wait_steps=turns.max_wait_steps if turns is not None else 0,
        )

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._is_stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ---- the engine thread ----

    def _run(self) -> None:
        try:
            self.model = self._load_model()
            self._ctx = LlamaContext(
                self.model,
                n_ctx_per_seq=self.config.n_ctx_per_seq,
                n_seq=self.config.n_slots,
                n_batch=self.config.n_batch,
                n_threads=self.config.n_threads,
            )
            self._batch = Batch(self.config.n_batch)
            if self.model.adapters:
                self._adapter_turns = AdapterTurns(ADAPTER_QUANTUM)
            self._eog_ids = [t for t in range(self.model.n_vocab) if self.model.is_eog(t)]
            self._output.model = self.model
            self._batcher = Batcher(
                self._ctx,
                self.model,
                self._batch,
                eog_ids=self._eog_ids,
                timing=self._timing,
                output=self._output,
                slots=self._slots,
            )
            self._start_embedder()
        except Exception as exc:
            log.error("the engine could not start: %s", exc)
            self._failure = str(exc)
            self._state = EngineState.DEAD
            self._ready.set()
            return
        self._state = EngineState.READY
        self._ready.set()
        log.info(
            "engine ready: %d slots x %d tokens, batch %d, %d threads",
            self.config.n_slots,
            self.config.n_ctx_per_seq,
            self.config.n_batch,
            self.config.n_threads,
        )
        try:
            while self._take_inbox():
                self.step()
            owed, self._owed = self._owed, []
            self._output.text(owed)  # the last step's text (overlap_text), while the model is there
        except BaseException as exc:  # a bug in the loop itself: fail everyone, stay visible
            log.exception("the engine loop died")
            self._failure = f"engine loop died: {exc!r}"
            self._state = EngineState.DEAD
            for seq in self._unanswered():
                self._output.emit(seq, EngineUnavailable("the engine stopped"))
            self._fail_embeddings(EngineUnavailable("the engine stopped"))
            self._output.flush()
            raise
        finally:
            self._close()
        for seq in self._unanswered():
            self._output.emit(seq, EngineUnavailable("the server is shutting down"))
        self._fail_embeddings(EngineUnavailable("the server is shutting down"))
        self._output.flush()

    def _unanswered(self) -> list[_Seq]:
        """Requests whose stream has not had its last item: queued, running, or finished with
        their last text still owed (overlap_text)."""
        seqs = [*self._inbox, *self._waiting, *self._running, *(w[0] for w in self._owed)]
        unique = {id(seq): seq for seq in seqs if not seq.is_closed}
        return list(unique.values())

    def _start_embedder(self) -> None:
        """The embedding model (the chat model unless a dedicated one is given) and its
        Embedder; the context itself is created at the first embedding request."""
        assert self.model is not None
        model = self._load_embedding_model() if self._load_embedding_model else self.model
        self.embedding_model = model
        n_max = self.config.n_ctx_per_seq
        if model.n_ctx_train > 0:
            n_max = min(n_max, model.n_ctx_train)
        self.embedding_max_tokens = n_max
        # A decode must hold the longest input whole (see EmbeddingContext).
        self._embedder = Embedder(
            model,
            n_batch=max(self.config.n_batch, n_max),
            n_budget=self.config.n_batch,
            n_threads=self.config.n_threads,
            on_finished=self._embedding_finished,
        )

    def _fail_embeddings(self, error: CriaError) -> None:
        with self._cond:
            jobs, self._embed_inbox = list(self._embed_inbox), deque()
        if self._embedder is not None:
            for job in jobs:
                self._embedder.add(job)
            self._embedder.fail_all(error)

    def _close(self) -> None:
        for seq in self._running:
            if seq.sampler is not None:
                seq.sampler.close()
        if self._batch is not None:
            self._batch.close()
        if self._ctx is not None:
            self._ctx.close()
        if self._embedder is not None:
            self._embedder.close()
        if self.embedding_model is not None and self.embedding_model is not self.model:
            self.embedding_model.close()
        if self.model is not None:
            self.model.close()

    def _take_inbox(self) -> bool:
        """Move new requests and aborts in; block while idle. False once stopping."""
        with self._cond:
            while (
                not self._is_stopping
                and not self._inbox
                and not self._aborts
                and not self._running
                and not self._waiting
                and not self._embed_inbox
                and not (self._embedder is not None and self._embedder.has_work)
            ):
                self._cond.wait()
            if self._is_stopping:
                return False
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            embed_jobs, self._embed_inbox = list(self._embed_inbox), deque()
            aborts, self._aborts = self._aborts, set()
        assert self._embedder is not None
        for job in embed_jobs:
            self._embedder.add(job)
        if aborts:
            self._apply_aborts(aborts)
        return True

    def _apply_aborts(self, ids: set[str]) -> None:
        for seq in [s for s in self._waiting if s.req.id in ids]:
            self._waiting.remove(seq)
            self._dequeued()
        for seq in [s for s in self._running if s.req.id in ids]:
            log.debug("request %s aborted", seq.req.id)
            seq.is_closed = True
            self._finish(seq)
        if self._embedder is not None:
            self._embedder.abort(ids)

    def _dequeued(self) -> None:
        with self._cond:
            self._n_queued -= 1

    def step(self) -> None:
        """One engine step: admit, plan, decode, postprocess; then at most one embedding
        decode, when the pacer allows one (always while generation is idle)."""
        started = time.perf_counter()
        assert self._ctx is not None and self._batcher is not None
        if self._output.has_items and self._waiting and self._slots.n_free:
            # Admitting may save or restore KV states: hand the output over first.
            self._output.flush()
        self._admission.admit(
            self._ctx, self._waiting, self._running, start=self._start, dequeued=self._dequeued
        )
        plan = plan_step(self._turn(), self.config.n_batch)
        sampled = self._batcher.decode(plan, self._by_slot) if not plan.is_empty else []
        if self._owed:  # the last step's text, while this step's llama_decode computes
            owed, self._owed = self._owed, []
            self._output.text(owed)
            self._output.flush()
        if sampled:
            work = self._output.postprocess(sampled, self._batcher.sample)
            if self.config.overlap_text and self._running:
                self._owed = work  # the next step follows at once: it does this work
            else:
                self._output.text(work)
        if not self._running or (self._embedder is not None and self._embedder.has_work):
            self._output.flush()
        # else the next step hands this output over just before its llama_decode: the event
        # loop then takes the GIL while the engine has no use for it, not in the middle of
        # planning and batch filling (a GIL hand-over can cost up to the switch interval).
        if not plan.is_empty:
            seconds = time.perf_counter() - started
            n_seqs = len(plan.decodes) + len(plan.prefills)
            self._timing.add_step(seconds, n_seqs)
            if self._observer is not None:
                self._observer.observe_step(seconds, n_seqs)
            if self._embedder is not None:
                self._embedder.on_generation_step(seconds)
        if self._embedder is not None:
            self._embedder.run(is_generating=bool(self._running or self._waiting))

    def _turn(self) -> list[SeqState]:
        """The sequences this step may decode: all of them, unless LoRA adapters are in use;
        then those of one adapter set (llama.cpp applies one set to the whole context), the
        set in turn (AdapterTurns), which the context is switched to."""
        running = [s for s in self._running if s.slot is not None]
        if self._adapter_turns is not None and running:
            assert self._ctx is not None
            adapter = self._adapter_turns.choose(s.req.adapter for s in running)
            self._ctx.use_adapter(adapter)
            running = [s for s in running if s.req.adapter == adapter]
        return [SeqState(s.slot.id, s.n_prompt_left) for s in running if s.slot is not None]

    def _start(self, seq: _Seq, slot_id: int, n_reuse: int) -> None:
        """Make an admitted request (its slot acquired) a running one."""
        assert self.model is not None
        seq.n_cached = n_reuse
        seq.t_admitted = time.perf_counter()
        try:
            seq.sampler = new_sampler(seq.req, self.model, self._eog_ids)
        except Exception as exc:
            log.exception("could not build the sampler of %s", seq.req.id)
            self._output.fail(seq, EngineFailure(f"could not set up sampling: {exc}"))
            return
        seq.stops = StopMatcher(seq.req.stop, repeated_block=seq.req.stop_at_repeated_block)
        self._running.append(seq)
        self._by_slot[slot_id] = seq

    def _finish(self, seq: _Seq) -> None:
        """Free the request's slot (its cache stays for prefix reuse) and sampler."""
        if seq.is_finished:
            return
        seq.is_finished = True
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot is not None:
            if self._by_slot.get(seq.slot.id) is seq:
                del self._by_slot[seq.slot.id]
            self._slots.release(seq.slot.id)
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None

