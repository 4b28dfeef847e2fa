"""Embeddings on the engine thread: a llama_context of their own (embeddings on), the inputs of
every queued request batched as separate sequences of one decode, paced by EmbeddingPacer so
that generation goes on while embeddings are computed.

Everything here runs on the engine thread, except `EmbeddingJob` creation (on the event loop).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from cria.engine.batch import Batch
from cria.engine.llama import DecodeResult, EmbeddingContext, LlamaModel
from cria.engine.scheduler import EmbeddingPacer, pack_inputs
from cria.engine.types import EmbeddingRequest, EmbeddingResult
from cria.engine.vectors import finish_vector
from cria.errors import CriaError, EngineFailure

log = logging.getLogger(__name__)

MAX_SEQS_PER_DECODE = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass(slots=True, eq=False)  # eq=False: hashed by identity
class EmbeddingJob:
    """One embedding request on its way through the engine."""

    req: EmbeddingRequest
    future: asyncio.Future[EmbeddingResult]
    loop: asyncio.AbstractEventLoop
    vectors: list[tuple[float, ...] | None] = field(default_factory=list)
    n_left: int = 0  # inputs still to embed; -1 once the job failed

    def __post_init__(self) -> None:
        self.vectors = [None] * len(self.req.inputs)
        self.n_left = len(self.req.inputs)


class Embedder:
    """Owns the embedding context (created at the first job: chat-only servers never pay for
    it) and the queue of inputs waiting for it, in arrival order across requests."""

    def __init__(
        self,
        model: LlamaModel,
        *,
        n_batch: int,
        n_budget: int,
        n_threads: int,
        on_finished: Callable[[EmbeddingJob], None],
    ) -> None:
        self.model = model
        self.n_batch = n_batch  # capacity of a decode: holds the longest input allowed
        self._n_threads = n_threads
        self._on_finished = on_finished  # called once per job that leaves (done, failed, aborted)
        self._n_seqs = min(MAX_SEQS_PER_DECODE, n_batch)
        self._pending: deque[tuple[EmbeddingJob, int]] = deque()  # (job, input index)
        # A decode takes at most n_budget tokens (--batch-size), unless one input alone is longer:
        # a request for a chat arriving meanwhile waits for one decode at most.
        self._pacer = EmbeddingPacer(n_batch=min(n_budget, n_batch))
        self._ctx: EmbeddingContext | None = None
        self._batch: Batch | None = None
        self.n_decodes = 0
        self.max_inputs_per_decode = 0

    @property
    def has_work(self) -> bool:
        return bool(self._pending)

    def add(self, job: EmbeddingJob) -> None:
        self._pending.extend((job, i) for i in range(len(job.req.inputs)))

    def abort(self, ids: set[str]) -> None:
        dropped = {job for job, _i in self._pending if job.req.id in ids}
        if dropped:
            self._pending = deque(p for p in self._pending if p[0] not in dropped)
            for job in dropped:
                log.debug("embedding request %s aborted", job.req.id)
                self._on_finished(job)

    def on_generation_step(self, seconds: float) -> None:
        self._pacer.on_generation_step(seconds)

    def run(self, *, is_generating: bool) -> None:
        """At most one embedding decode, if the pacer allows one now."""
        if not self._pending:
            return
        budget = self._pacer.token_budget(is_generating=is_generating)
        if budget is None:
            return
        n = pack_inputs(
            (len(job.req.inputs[i]) for job, i in self._pending), budget=budget, max_seqs=self._n_seqs
        )
        items = [self._pending.popleft() for _ in range(n)]
        try:
            ctx, batch = self._context()
        except Exception as exc:
            log.exception("could not create the embedding context")
            for job in dict.fromkeys(job for job, _i in items):
                self._fail(job, EngineFailure(f"could not set up embeddings: {exc}"))
            return
        batch.clear()
        for seq, (job, i) in enumerate(items):
            batch.add_sequence(job.req.inputs[i], seq)
        started = time.perf_counter()
        result = ctx.decode(batch)
        seconds = time.perf_counter() - started
        self._pacer.on_embedding_decode(batch.n_tokens, seconds)
        log.debug("embedding decode: %d inputs, %d tokens, %.3f s", n, batch.n_tokens, seconds)
        self.n_decodes += 1
        self.max_inputs_per_decode = max(self.max_inputs_per_decode, len(items))
        if result is not DecodeResult.OK:
            for job in dict.fromkeys(job for job, _i in items):
                self._fail(job, EngineFailure(f"llama.cpp failed to compute embeddings ({result.name})"))
            return
        for seq, (job, i) in enumerate(items):
            if job.n_left < 0:  # failed on an earlier input of this decode
                continue
            try:
                job.vectors[i] = finish_vector(ctx.pooled(seq), job.req.dimensions)
            except Exception as exc:
                log.exception("reading embedding %d of %s failed", i, job.req.id)
                self._fail(job, EngineFailure(f"embedding failed: {exc}"))
                continue
            job.n_left -= 1
            if job.n_left == 0:
                vectors = tuple(v for v in job.vectors if v is not None)
                assert len(vectors) == len(job.vectors)
                self._settle(job, EmbeddingResult(vectors, job.req.n_tokens))

    def fail_all(self, error: CriaError) -> None:
        for job in dict.fromkeys(job for job, _i in self._pending):
            self._fail(job, error)

    def close(self) -> None:
        if self._batch is not None:
            self._batch.close()
        if self._ctx is not None:
            self._ctx.close()

    def _context(self) -> tuple[EmbeddingContext, Batch]:
        if self._ctx is None or self._batch is None:
            self._ctx = EmbeddingContext(
                self.model, n_tokens=self.n_batch, n_seq=self._n_seqs, n_threads=self._n_threads
            )
            self._batch = Batch(self.n_batch)
            log.info(
                "embedding context ready: %s pooling, %d tokens and %d inputs per decode",
                self._ctx.pooling.name.lower(),
                self.n_batch,
                self._n_seqs,
            )
        return self._ctx, self._batch

    def _fail(self, job: EmbeddingJob, error: CriaError) -> None:
        """Drop the job's other inputs and hand it the error."""
        self._pending = deque(p for p in self._pending if p[0] is not job)
        job.n_left = -1  # failed: later results of this decode are ignored
        self._settle(job, error)

    def _settle(self, job: EmbeddingJob, outcome: EmbeddingResult | CriaError) -> None:
        self._on_finished(job)
        try:
            job.loop.call_soon_threadsafe(_set_outcome, job.future, outcome)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _set_outcome(future: asyncio.Future[EmbeddingResult], outcome: EmbeddingResult | CriaError) -> None:
    if future.done():  # cancelled: the client went away
        return
    if isinstance(outcome, CriaError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
