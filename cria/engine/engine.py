"""The engine: one thread owns llama.cpp and serves every request by continuous batching.

    HTTP handler ── submit(GenerationRequest) ──► inbox ──► waiting ──► slot (prefix reuse)
         ▲                                                                │
         └── RequestStream (async iterator of Delta) ◄── call_soon_threadsafe ◄── step()

A step plans (decode every running sequence, then prompt chunks within the batch budget),
runs one `llama_decode` for all of them, then samples, detokenizes and matches stops. Between
steps the same thread runs embedding decodes on a context of their own (embedder.py), paced so
that generation is not starved.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cria.engine.base import EngineBase, EngineConfig, EngineState, StepObserver
from cria.engine.constrained import ConstrainedSampler
from cria.engine.embedder import Embedder, EmbeddingJob
from cria.engine.llama import (
    Batch,
    DecodeResult,
    LlamaContext,
    LlamaModel,
    SamplerChain,
)
from cria.engine.logprobs import log_softmax, top_tokens
from cria.engine.prompt_cache import PromptCache
from cria.engine.sampling import sampler_recipe
from cria.engine.scheduler import SeqState, StepPlan, plan_step
from cria.engine.slots import Slot, SlotTable
from cria.engine.stream import RequestStream
from cria.engine.text import Detokenizer, StopMatcher
from cria.engine.timing import StepTiming
from cria.engine.types import (
    Delta,
    EmbeddingRequest,
    EmbeddingResult,
    EngineStats,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenLogprob,
    Usage,
)
from cria.errors import (
    CriaError,
    EngineFailure,
    EngineUnavailable,
    Overloaded,
)

log = logging.getLogger(__name__)

# A slot about to lose fewer tokens than this is not worth saving to the prompt cache.
MIN_SAVED_TOKENS = 32


@dataclass(slots=True)
class _Seq:
    """Engine-private state of one running request."""

    req: GenerationRequest
    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    slot: Slot | None = None
    n_cached: int = 0  # prompt tokens reused from the slot's cache
    n_generated: int = 0
    pending: int | None = None  # sampled token not yet decoded into the KV cache
    sampler: SamplerChain | ConstrainedSampler | None = None
    detok: Detokenizer = field(default_factory=Detokenizer)
    stops: StopMatcher | None = None
    # perf_counter() instants for Timings (submitted is taken on the event loop)
    t_submitted: float = 0.0
    t_admitted: float = 0.0
    t_first_token: float | None = None
    n_sampled: int = 0
    lps: list[TokenLogprob] = field(default_factory=list)  # logprobs not yet emitted
    # Prompt logprobs (prompt_logprobs requests): filled chunk by chunk, sent with the first Delta.
    prompt_lps: list[TokenLogprob | None] | None = None
    is_finished: bool = False  # out of the running set, its slot released (text may be owed)
    is_closed: bool = False  # failed or aborted: nothing more is sent on its stream

    @property
    def n_prompt_left(self) -> int:
        assert self.slot is not None
        return max(len(self.req.prompt) - len(self.slot.cached), 0)


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
        self._slots = SlotTable(config.n_slots)
        self._prompt_cache: PromptCache[np.ndarray] | None = (
            PromptCache(config.prompt_cache_bytes) if config.prompt_cache_bytes else None
        )
        self._ctx: LlamaContext | None = None
        self._batch: Batch | None = None
        self._embedder: Embedder | None = None
        # Text work of the last step's tokens, done while the next step decodes (overlap_text).
        self._owed: list[_TextWork] = []
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Delta | CriaError]]] = {}
        self._by_slot: dict[int, _Seq] = {}
        self._eog_ids: list[int] = []
        self._timing = StepTiming()
        self._n_steps = 0
        self._max_seqs_per_step = 0
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
        timing = self._timing
        slots = self._slots.slots  # read racily from another thread: a snapshot for display
        cache = self._prompt_cache
        return EngineStats(
            python_us_per_step=timing.python_us_per_step,
            python_us_per_seq=timing.python_us_per_seq,
            python_share=timing.python_share,
            step_seconds=timing.busy_s,
            python_seconds=timing.python_s,
            n_seq_steps=timing.n_seq_steps,
            n_steps=self._n_steps,
            max_seqs_per_step=self._max_seqs_per_step,
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
            self._eog_ids = [t for t in range(self.model.n_vocab) if self.model.is_eog(t)]
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
            self._text(owed)  # the last step's text (overlap_text), while the model is there
        except BaseException as exc:  # a bug in the loop itself: fail everyone, stay visible
            log.exception("the engine loop died")
            self._failure = f"engine loop died: {exc!r}"
            self._state = EngineState.DEAD
            for seq in self._unanswered():
                self._emit(seq, EngineUnavailable("the engine stopped"))
            self._fail_embeddings(EngineUnavailable("the engine stopped"))
            self._flush()
            raise
        finally:
            self._close()
        for seq in self._unanswered():
            self._emit(seq, EngineUnavailable("the server is shutting down"))
        self._fail_embeddings(EngineUnavailable("the server is shutting down"))
        self._flush()

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
        if self._outbox and self._waiting and self._slots.n_free:
            self._flush()  # admitting may save or restore KV states: hand the output over first
        self._admit()
        plan = plan_step(
            [SeqState(s.slot.id, s.n_prompt_left) for s in self._running if s.slot is not None],
            self.config.n_batch,
        )
        sampled = self._decode(plan) if not plan.is_empty else []
        if self._owed:  # the last step's text, while this step's llama_decode computes
            owed, self._owed = self._owed, []
            self._text(owed)
            self._flush()
        if sampled:
            work = self._postprocess(sampled)
            if self.config.overlap_text and self._running:
                self._owed = work  # the next step follows at once: it does this work
            else:
                self._text(work)
        if not self._running or (self._embedder is not None and self._embedder.has_work):
            self._flush()
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

    def _group_is_prefilling(self, seq: _Seq) -> bool:
        """Whether another request of seq's group is still computing the shared prompt."""
        group = seq.req.group
        return group is not None and any(
            s.req.group == group and s.slot is not None and s.n_prompt_left > 1
            for s in self._running
        )

    def _admit(self) -> None:
        assert self._ctx is not None and self.model is not None
        deferred: list[_Seq] = []
        # A deferred request keeps its place: the slots it will need are not given to requests
        # queued after it.
        while self._waiting and self._slots.n_free > len(deferred):
            seq = self._waiting.popleft()
            if self._group_is_prefilling(seq):
                deferred.append(seq)  # admitted once the group's prompt is in the KV cache
                continue
            self._dequeued()
            if seq.req.prompt_logprobs:
                # Every prompt token's logits are needed: nothing cached can stand in for them,
                # so take the slot whose cache is worth least.
                slot_id = self._slots.choose_scratch()
                assert slot_id is not None
                self._save_evicted(slot_id, 0)
                self._ctx.seq_rm(slot_id, 0)
                seq.slot = self._slots.acquire(slot_id, 0)
                seq.prompt_lps = [None]
                self._start(seq, slot_id, 0)
                continue
            choice = self._slots.choose(seq.req.prompt)
            assert choice is not None
            slot_id, n_reuse = choice
            self._save_evicted(slot_id, n_reuse)
            donor = self._slots.best_donor(seq.req.prompt, exclude=slot_id)
            saved = self._prompt_cache.best(seq.req.prompt) if self._prompt_cache else None
            n_donor = donor[1] if donor is not None else 0
            if saved is not None and saved[1] > max(n_reuse, n_donor) and self._ctx.seq_rm(slot_id, 0):
                # The prompt came back after leaving every slot: restore its KV from host memory.
                # The slot's own cache is gone from here on, whether the restore works or not.
                self._slots.forget(slot_id)
                n_reuse = 0
                if self._ctx.seq_state_load(slot_id, saved[0].state) and self._ctx.seq_rm(
                    slot_id, saved[1]
                ):
                    n_reuse = saved[1]
                    seq.slot = self._slots.acquire_tokens(slot_id, saved[0].tokens[:n_reuse])
                    self._start(seq, slot_id, n_reuse)
                    continue
                log.warning("slot %d: a prompt cache entry did not restore; dropped", slot_id)
                self._ctx.seq_rm(slot_id, 0)
                assert self._prompt_cache is not None
                self._prompt_cache.discard(saved[0].tokens)
            if donor is not None and donor[1] > n_reuse:
                # Another slot (busy or idle) already holds a longer prefix of this prompt:
                # copying its KV costs a memory copy instead of a prefill.
                donor_id, n_donor = donor
                if self._ctx.seq_copy_prefix(donor_id, slot_id, n_donor):
                    seq.slot = self._slots.acquire_copy(slot_id, donor_id, n_donor)
                    self._start(seq, slot_id, n_donor)
                    continue
                n_reuse = 0  # the copy could not be cut to the prefix: it goes below
            if not self._ctx.seq_rm(slot_id, n_reuse):
                # Partial removal unsupported (e.g. recurrent models): start afresh.
                self._ctx.seq_rm(slot_id, 0)
                n_reuse = 0
            seq.slot = self._slots.acquire(slot_id, n_reuse)
            self._start(seq, slot_id, n_reuse)
        self._waiting.extendleft(reversed(deferred))

    def _start(self, seq: _Seq, slot_id: int, n_reuse: int) -> None:
        """Make an admitted request (its slot acquired) a running one."""
        assert self.model is not None
        seq.n_cached = n_reuse
        seq.t_admitted = time.perf_counter()
        params = seq.req.sampling
        try:
            recipe = sampler_recipe(params, banned=self._eog_ids if seq.req.ignore_eos else ())
            if params.grammar is not None:
                seq.sampler = ConstrainedSampler(
                    recipe, model=self.model, grammar=params.grammar, trigger=params.grammar_trigger
                )
            elif not params.is_plain_greedy:
                seq.sampler = SamplerChain(recipe, model=self.model)
        except Exception as exc:
            log.exception("could not build the sampler of %s", seq.req.id)
            self._fail(seq, EngineFailure(f"could not set up sampling: {exc}"))
            return
        seq.stops = StopMatcher(seq.req.stop, repeated_block=seq.req.stop_at_repeated_block)
        self._running.append(seq)
        self._by_slot[slot_id] = seq

    def _save_evicted(self, slot_id: int, n_keep: int) -> None:
        """Before a slot's cache is cut to `n_keep` tokens for a new prompt, keep its KV state in
        the host-memory prompt cache, if enough would be lost and it is not there already."""
        cache, ctx = self._prompt_cache, self._ctx
        if cache is None or ctx is None:
            return
        cached = self._slots.slots[slot_id].cached
        if len(cached) - n_keep < MIN_SAVED_TOKENS or cache.covers(cached):
            return
        if self._slots.holder(cached, exclude=slot_id) is not None:
            # Another slot holds these tokens too: a prompt that wants them copies them from
            # there, and that slot saves them when it is reused in turn.
            return
        try:
            cache.put(cached, ctx.seq_state_save(slot_id))
        except Exception:  # a cache is an optimisation: never fail a request over it
            log.exception("could not save slot %d to the prompt cache", slot_id)

    def _decode(self, plan: StepPlan) -> list[tuple[_Seq, int]]:
        """Fill the batch from the plan and run one llama_decode. Returns the sequences to
        sample, each with its output row in the step's logits."""
        assert self._ctx is not None and self._batch is not None
        by_slot = self._by_slot
        batch = self._batch
        batch.clear()
        to_sample: list[tuple[_Seq, int]] = []
        fed: list[tuple[_Seq, Sequence[int]]] = []
        scored: list[tuple[_Seq, int, int, int]] = []  # prompt chunks with logits on every token
        # Everything in slot order, prompt chunks at their slot's place: llama.cpp (one KV
        # stream per sequence) puts runs of consecutive sequence ids in one ubatch.
        chunks = {c.slot_id: c for c in plan.prefills}
        run: list[_Seq] = []  # consecutive decode entries, added with one slice assignment

        def add_run() -> None:
            tokens = [s.pending for s in run]
            positions = [len(s.slot.cached) for s in run]  # type: ignore[union-attr]
            slot_ids = [s.slot.id for s in run]  # type: ignore[union-attr]
            row = batch.add_decodes(tokens, positions, slot_ids)  # type: ignore[arg-type]
            for k, seq in enumerate(run):
                to_sample.append((seq, row + k))
                fed.append((seq, (seq.pending,)))  # type: ignore[arg-type]
            run.clear()

        for slot_id in sorted([*plan.decodes, *chunks]):
            chunk = chunks.get(slot_id)
            seq = by_slot[slot_id]
            if chunk is None:
                run.append(seq)
                continue
            if run:
                add_run()
            assert seq.slot is not None
            start = len(seq.slot.cached)
            tokens_chunk = seq.req.prompt[start : start + chunk.n_tokens]
            if seq.prompt_lps is not None:
                first_row = batch.add_run(tokens_chunk, start, slot_id, logits="all")
                assert first_row is not None
                scored.append((seq, first_row, start, len(tokens_chunk)))
                out_row = first_row + len(tokens_chunk) - 1 if chunk.is_last else None
            else:
                out_row = batch.add_run(
                    tokens_chunk, start, slot_id, logits="last" if chunk.is_last else "none"
                )
            if out_row is not None:
                to_sample.append((seq, out_row))
            fed.append((seq, tokens_chunk))
        if run:
            add_run()
        self._n_steps += 1
        self._max_seqs_per_step = max(self._max_seqs_per_step, len(fed))
        self._flush()
        t0 = time.perf_counter()
        result = self._ctx.decode(batch)
        self._timing.decode_s += time.perf_counter() - t0
        if result is not DecodeResult.OK:
            message = {
                DecodeResult.NO_KV_SLOT: "llama.cpp found no room in the KV cache for this step",
                DecodeResult.ABORTED: "llama.cpp aborted the step",
            }.get(result, "llama.cpp failed to decode this step")
            for seq, _tokens in fed:
                assert seq.slot is not None
                self._ctx.seq_rm(seq.slot.id, 0)
                self._slots.forget(seq.slot.id)
                self._fail(seq, EngineFailure(message))
            return []
        for seq, fed_tokens in fed:
            seq.slot.cached.extend(fed_tokens)  # type: ignore[union-attr]
            seq.pending = None
        failed: set[int] = set()
        for seq, first_row, start, n in scored:
            try:
                self._score_prompt(seq, first_row, start, n)
            except Exception as exc:  # e.g. out of memory: this request fails, not the engine
                log.exception("could not score the prompt of %s", seq.req.id)
                self._fail(seq, EngineFailure(f"could not compute the prompt's logprobs: {exc}"))
                failed.add(id(seq))
        if failed:
            to_sample = [(seq, row) for seq, row in to_sample if id(seq) not in failed]
        return to_sample

    def _score_prompt(self, seq: _Seq, first_row: int, start: int, n: int) -> None:
        """Log-probabilities of the prompt tokens that follow the chunk's positions."""
        assert self._ctx is not None and self.model is not None and self._batch is not None
        assert seq.prompt_lps is not None
        prompt, k = seq.req.prompt, seq.req.logprobs or 0
        logits = self._ctx.logits(self._batch.n_outputs, self.model.n_vocab)
        n = min(n, len(prompt) - 1 - start)  # the last prompt token predicts no prompt token
        for block in range(0, n, 64):  # bounded temporaries (rows x vocab floats)
            rows = log_softmax(logits[first_row + block : first_row + min(block + 64, n)])
            for i, row in enumerate(rows):
                token = prompt[start + block + i + 1]
                seq.prompt_lps.append(self._token_logprob(token, row, k))

    def _sample(self, sampled: list[tuple[_Seq, int]]) -> list[int]:
        """One token per sequence. Plain greedy rows are an argmax over the step's logits in
        one numpy call; the rest run their llama.cpp sampler chain."""
        assert self._ctx is not None and self.model is not None and self._batch is not None
        t0 = time.perf_counter()
        tokens = [0] * len(sampled)
        scored = [k for k, (seq, _row) in enumerate(sampled) if seq.req.logprobs is not None]
        if scored:  # before any sampler touches the logits: these are the model's own
            logits = self._ctx.logits(self._batch.n_outputs, self.model.n_vocab)
            rows_lp = log_softmax(logits[[sampled[k][1] for k in scored]])
            row_lps = dict(zip(scored, rows_lp))
        greedy = [k for k, (seq, _row) in enumerate(sampled) if seq.sampler is None]
        if greedy:
            logits = self._ctx.logits(self._batch.n_outputs, self.model.n_vocab)
            row_ids = [sampled[k][1] for k in greedy]
            first = row_ids[0]
            if row_ids == list(range(first, first + len(row_ids))):
                rows = logits[first : first + len(row_ids)]  # a view: no copy of the logits
            else:
                rows = logits[row_ids]
            masked = [i for i, k in enumerate(greedy) if sampled[k][0].req.ignore_eos]
            if masked:  # the logits are ours until the next decode: mask end-of-generation in place
                rows[np.ix_(masked, self._eog_ids)] = -np.inf
            for k, token in zip(greedy, rows.argmax(axis=1).tolist()):
                tokens[k] = token
        for k, (seq, row) in enumerate(sampled):
            if seq.sampler is not None:
                tokens[k] = seq.sampler.sample(self._ctx, row)
        for k in scored:
            seq, token = sampled[k][0], tokens[k]
            if not self.model.is_eog(token) or seq.req.ignore_eos:
                seq.lps.append(self._token_logprob(token, row_lps[k], seq.req.logprobs or 0))
        self._timing.sample_s += time.perf_counter() - t0
        return tokens

    def _token_logprob(self, token: int, row: np.ndarray, k: int) -> TokenLogprob:
        assert self.model is not None
        piece = self.model.token_piece
        top = tuple((t, piece(t), lp) for t, lp in top_tokens(row, k))
        return TokenLogprob(token, piece(token), float(row[token]), top)

    def _postprocess(self, sampled: list[tuple[_Seq, int]]) -> list[_TextWork]:
        """Sample the step's tokens and settle which sequences go on: a sequence that stops
        (end of generation, max_tokens) leaves the running set here, so the next step is
        planned without it. Its text, and the checks that need text (stop strings), are the
        returned work for `_text`."""
        assert self._ctx is not None and self.model is not None
        model = self.model
        try:
            tokens = self._sample(sampled)
        except Exception as exc:
            log.exception("sampling failed")
            for seq, _row in sampled:
                if not seq.is_finished:
                    self._fail(seq, EngineFailure(f"sampling failed: {exc}"))
            return []
        now = time.perf_counter()
        work: list[_TextWork] = []
        for (seq, _row), token in zip(sampled, tokens):
            if seq.is_finished:  # a stop string ended it while this step decoded (overlap_text)
                continue
            if seq.t_first_token is None:
                seq.t_first_token = now
            seq.n_sampled += 1
            if seq.req.max_tokens == 0:  # only the prompt was wanted (its logprobs, echo)
                seq.lps.clear()
                work.append((seq, None, FinishReason.LENGTH))
            elif model.is_eog(token) and not seq.req.ignore_eos:
                work.append((seq, None, FinishReason.STOP))
            else:
                seq.n_generated += 1
                if seq.n_generated < seq.req.max_tokens:
                    seq.pending = token
                    work.append((seq, token, None))
                    continue
                work.append((seq, token, FinishReason.LENGTH))
            self._finish(seq)
        return work

    def _text(self, work: list[_TextWork]) -> None:
        """Each sampled token's text: detokenize, match stop strings, emit Deltas."""
        assert self.model is not None
        piece = self.model.token_piece
        for seq, token, reason in work:
            if seq.is_closed:
                continue
            try:
                assert seq.stops is not None
                if token is None:
                    assert reason is not None
                    self._complete(seq, "", 0, reason)
                    continue
                text, is_stopped = seq.stops.push(seq.detok.push(piece(token)))
                if is_stopped:
                    self._complete(seq, text, 1, FinishReason.STOP, flush=False)
                elif reason is not None:
                    self._complete(seq, text, 1, reason)
                elif text or seq.lps:
                    self._emit(seq, self._delta(seq, text, 1))
            except Exception as exc:
                log.exception("request %s failed after sampling", seq.req.id)
                self._fail(seq, EngineFailure(f"generation failed: {exc}"))

    def _complete(
        self, seq: _Seq, text: str, n_tokens: int, reason: FinishReason, *, flush: bool = True
    ) -> None:
        assert seq.stops is not None
        if flush:
            tail, is_stopped = seq.stops.push(seq.detok.flush())
            text += tail
            if is_stopped:
                reason = FinishReason.STOP
            else:
                text += seq.stops.flush()
        usage = Usage(len(seq.req.prompt), seq.n_generated, seq.n_cached)
        assert seq.t_first_token is not None  # a request completes only after a sample
        timings = Timings(
            submitted=seq.t_submitted,
            admitted=seq.t_admitted,
            first_token=seq.t_first_token,
            finished=time.perf_counter(),
            n_sampled=seq.n_sampled,
            slot=None if seq.slot is None else seq.slot.id,
        )
        self._emit(seq, self._delta(seq, text, n_tokens, reason, usage, timings))
        self._finish(seq)

    def _delta(
        self,
        seq: _Seq,
        text: str,
        n_tokens: int,
        reason: FinishReason | None = None,
        usage: Usage | None = None,
        timings: Timings | None = None,
    ) -> Delta:
        """A Delta carrying the logprobs gathered since the last one (and, the first time, the
        prompt's)."""
        lps: tuple[TokenLogprob, ...] = ()
        if seq.lps:
            lps, seq.lps = tuple(seq.lps), []
        prompt_lps = None
        if seq.prompt_lps is not None:
            prompt_lps, seq.prompt_lps = tuple(seq.prompt_lps), None
        return Delta(text, n_tokens, reason, usage, timings, lps, prompt_lps)

    def _fail(self, seq: _Seq, error: CriaError) -> None:
        if seq.is_closed:
            return
        self._emit(seq, error)
        seq.is_closed = True
        self._finish(seq)

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

    def _emit(self, seq: _Seq, item: Delta | CriaError) -> None:
        self._outbox.setdefault(seq.loop, []).append((seq.stream, item))

    def _flush(self) -> None:
        """Hand this step's output to the event loop(s): one wake-up per loop per step."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


# One sampled token's text work: the sequence, the token (None: nothing to print, only the
# ending) and, when the sampling step already knows it ends there, why.
_TextWork = tuple[_Seq, int | None, FinishReason | None]


def _deliver(items: list[tuple[RequestStream, Delta | CriaError]]) -> None:
    for stream, item in items:
        stream.put(item)

