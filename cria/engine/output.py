"""What a step hands back: settle who goes on after sampling, turn tokens into text and Deltas,
and hand each event loop its items in one wake-up per step.

Split from the step (engine.py) because with `overlap_text` this work runs a step late, while
the next `llama_decode` computes: `postprocess` decides at once who leaves the running set, the
text work it returns (`text`) may follow later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cria.engine.llama import LlamaModel
from cria.engine.seq import _Seq, _TextWork
from cria.engine.stream import RequestStream
from cria.engine.types import Delta, FinishReason, Timings, TokenLogprob, Usage
from cria.errors import CriaError, EngineFailure

# The engine's log lines keep one logger name, whichever of its modules writes them.
log = logging.getLogger("cria.engine.engine")

_Sampled = list[tuple[_Seq, int]]


class Output:
    """The engine thread's output side. `finish` takes a sequence out of the running set and
    frees its slot (the engine owns both); `model` is set once loaded."""

    def __init__(self, finish: Callable[[_Seq], None]) -> None:
        self.model: LlamaModel | None = None
        self._finish = finish
        self._outbox: dict[
            asyncio.AbstractEventLoop, list[tuple[RequestStream, Delta | CriaError]]
        ] = {}

    @property
    def has_items(self) -> bool:
        """Whether anything waits to be handed over."""
        return bool(self._outbox)

    def postprocess(
        self, sampled: _Sampled, sample: Callable[[_Sampled], list[int]]
    ) -> list[_TextWork]:
        """Sample the step's tokens and settle which sequences go on: a sequence that stops
        (end of generation, max_tokens) leaves the running set here, so the next step is
        planned without it. Its text, and the checks that need text (stop strings), are the
        returned work for `text`."""
        assert self.model is not None
        model = self.model
        try:
            tokens = sample(sampled)
        except Exception as exc:
            log.exception("sampling failed")
            for seq, _row in sampled:
                if not seq.is_finished:
                    self.fail(seq, EngineFailure(f"sampling failed: {exc}"))
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

    def text(self, work: list[_TextWork]) -> None:
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
                    self.emit(seq, _delta(seq, text, 1))
            except Exception as exc:
                log.exception("request %s failed after sampling", seq.req.id)
                self.fail(seq, EngineFailure(f"generation failed: {exc}"))

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
        self.emit(seq, _delta(seq, text, n_tokens, reason, usage, timings))
        self._finish(seq)

    def fail(self, seq: _Seq, error: CriaError) -> None:
        if seq.is_closed:
            return
        self.emit(seq, error)
        seq.is_closed = True
        self._finish(seq)

    def emit(self, seq: _Seq, item: Delta | CriaError) -> None:
        self._outbox.setdefault(seq.loop, []).append((seq.stream, item))

    def flush(self) -> None:
        """Hand this step's output to the event loop(s): one wake-up per loop per step."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _delta(
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


def _deliver(items: list[tuple[RequestStream, Delta | CriaError]]) -> None:
    for stream, item in items:
        stream.put(item)
