"""A step's batch: fill it from the plan, run one `llama_decode`, score prompts, sample.

Split from the step (engine.py) so that the step reads as admit / plan / decode / postprocess;
this is the part that touches the batch and the logits row by row.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from cria.engine.batch import Batch
from cria.engine.constrained import ConstrainedSampler
from cria.engine.llama import DecodeResult, LlamaContext, LlamaModel, SamplerChain
from cria.engine.logprobs import log_softmax, top_tokens
from cria.engine.output import Output
from cria.engine.sampling import sampler_recipe
from cria.engine.scheduler import StepPlan
from cria.engine.seq import _Seq
from cria.engine.slots import SlotTable
from cria.engine.timing import StepTiming
from cria.engine.types import GenerationRequest, TokenLogprob
from cria.errors import EngineFailure

# The engine's log lines keep one logger name, whichever of its modules writes them.
log = logging.getLogger("cria.engine.engine")


class Batcher:
    """Runs the planned batch on the engine's context (made once the model has loaded).
    A failed decode or prompt scoring fails its requests through `output`; `slots` learns
    which KV caches a failed decode left unknown."""

    def __init__(
        self,
        ctx: LlamaContext,
        model: LlamaModel,
        batch: Batch,
        *,
        eog_ids: list[int],
        timing: StepTiming,
        output: Output,
        slots: SlotTable,
    ) -> None:
        self._ctx = ctx
        self.model = model
        self._batch = batch
        self._eog_ids = eog_ids
        self._timing = timing
        self._output = output
        self._slots = slots
        self.n_steps = 0
        self.max_seqs_per_step = 0

    def decode(self, plan: StepPlan, by_slot: dict[int, _Seq]) -> list[tuple[_Seq, int]]:
        """Fill the batch from the plan and run one llama_decode. Returns the sequences to
        sample, each with its output row in the step's logits."""
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
        self.n_steps += 1
        self.max_seqs_per_step = max(self.max_seqs_per_step, len(fed))
        self._output.flush()
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
                self._output.fail(seq, EngineFailure(message))
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
                self._output.fail(
                    seq, EngineFailure(f"could not compute the prompt's logprobs: {exc}")
                )
                failed.add(id(seq))
        if failed:
            to_sample = [(seq, row) for seq, row in to_sample if id(seq) not in failed]
        return to_sample

    def _score_prompt(self, seq: _Seq, first_row: int, start: int, n: int) -> None:
        """Log-probabilities of the prompt tokens that follow the chunk's positions."""
        assert seq.prompt_lps is not None
        prompt, k = seq.req.prompt, seq.req.logprobs or 0
        logits = self._ctx.logits(self._batch.n_outputs, self.model.n_vocab)
        n = min(n, len(prompt) - 1 - start)  # the last prompt token predicts no prompt token
        for block in range(0, n, 64):  # bounded temporaries (rows x vocab floats)
            rows = log_softmax(logits[first_row + block : first_row + min(block + 64, n)])
            for i, row in enumerate(rows):
                token = prompt[start + block + i + 1]
                seq.prompt_lps.append(self._token_logprob(token, row, k))

    def sample(self, sampled: list[tuple[_Seq, int]]) -> list[int]:
        """One token per sequence. Plain greedy rows are an argmax over the step's logits in
        one numpy call; the rest run their llama.cpp sampler chain."""
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
        piece = self.model.token_piece
        top = tuple((t, piece(t), lp) for t, lp in top_tokens(row, k))
        return TokenLogprob(token, piece(token), float(row[token]), top)


def new_sampler(
    req: GenerationRequest, model: LlamaModel, eog_ids: list[int]
) -> SamplerChain | ConstrainedSampler | None:
    """The request's llama.cpp sampler chain; None for plain greedy, which `Batcher.sample`
    does as one argmax over the step's logits."""
    params = req.sampling
    recipe = sampler_recipe(params, banned=eog_ids if req.ignore_eos else ())
    if params.grammar is not None:
        return ConstrainedSampler(
            recipe, model=model, grammar=params.grammar, trigger=params.grammar_trigger
        )
    if not params.is_plain_greedy:
        return SamplerChain(recipe, model=model)
    return None
