"""Step planning: which sequences decode a token and which prompt chunks fill the rest.

Also when embedding decodes run between generation steps, and which inputs they take.

Pure policy (no llama.cpp, no threads), so it is tested with real objects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SeqState:
    slot_id: int
    n_prompt_left: int  # prompt tokens still to prefill; 0 once the sequence is decoding


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    slot_id: int
    n_tokens: int
    is_last: bool  # the chunk ends the prompt: its last token's logits are sampled


@dataclass(frozen=True, slots=True)
class StepPlan:
    decodes: tuple[int, ...]  # slot ids that decode one token each, in increasing order
    prefills: tuple[PrefillChunk, ...]

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills

    @property
    def n_tokens(self) -> int:
        return len(self.decodes) + sum(c.n_tokens for c in self.prefills)


def plan_step(seqs: Sequence[SeqState], budget: int) -> StepPlan:
    """Decode every running sequence first (latency), then spend the rest of the token budget
    on prompt chunks in admission order (throughput), so a long prompt never starves streams
    that are already decoding.

    `seqs` is in admission order. Every decoding sequence gets its token even if that alone
    exceeds `budget` (the engine keeps slots <= budget, so it does not).
    """
    # In slot order: llama.cpp groups tokens of consecutive sequence ids into one ubatch.
    decodes = tuple(sorted(s.slot_id for s in seqs if s.n_prompt_left == 0))
    left = budget - len(decodes)
    prefills: list[PrefillChunk] = []
    for s in seqs:
        if left <= 0:
            break
        if s.n_prompt_left == 0:
            continue
        n = min(left, s.n_prompt_left)
        prefills.append(PrefillChunk(s.slot_id, n, is_last=n == s.n_prompt_left))
        left -= n
    return StepPlan(decodes, tuple(prefills))


def pack_inputs(lengths: Iterable[int], *, budget: int, max_seqs: int) -> int:
    """How many of the queued embedding inputs (their token counts, in queue order) go into
    the next embedding decode: as many as fit in `budget` tokens and `max_seqs` sequences, in
    order, but always at least one (an input is never split: the pooling needs it whole)."""
    n, used = 0, 0
    for length in lengths:
        if n >= max_seqs or (n and used + length > budget):
            break
        n += 1
        used += length
    return n


class EmbeddingPacer:
    """When the engine runs an embedding decode, and how many tokens it may take.

    Generation idle: one full batch (`n_batch` tokens) after another. Generation running: at most one embedding
    decode every `every_n_steps` generation steps, sized to take about `share` of the engine's
    time (the measured seconds per embedding token turn time into tokens), though never less
    than one whole input. So most inter-token gaps of a stream carry no embedding work at all,
    and embeddings still get their share of the engine instead of waiting for it to go idle.
    """

    def __init__(self, *, n_batch: int, share: float = 0.25, every_n_steps: int = 25) -> None:
        assert 0.0 < share < 1.0 and every_n_steps >= 1 and n_batch >= 1
        self.n_batch = n_batch
        self.share = share
        self.every_n_steps = every_n_steps
        self._n_steps = 0  # generation steps since the last embedding decode
        self._gen_s = 0.0  # ... and their time
        self._s_per_token: float | None = None  # moving average over embedding decodes

    def on_generation_step(self, seconds: float) -> None:
        self._n_steps += 1
        self._gen_s += seconds

    def on_embedding_decode(self, n_tokens: int, seconds: float) -> None:
        per_token = seconds / max(n_tokens, 1)
        old = self._s_per_token
        self._s_per_token = per_token if old is None else 0.7 * old + 0.3 * per_token
        self._n_steps = 0
        self._gen_s = 0.0

    def token_budget(self, *, is_generating: bool) -> int | None:
        """Tokens the next embedding decode may take, or None: not now."""
        if not is_generating:
            return self.n_batch
        if self._n_steps < self.every_n_steps:
            return None
        if self._s_per_token is None:  # speed not yet known: one input
            return 1
        # Credit for the last every_n_steps steps only: a long stretch of generation before an
        # embedding request arrives must not buy one long stall.
        recent_gen_s = self._gen_s / self._n_steps * self.every_n_steps
        allowed_s = recent_gen_s * self.share / (1.0 - self.share)
        return max(1, min(self.n_batch, int(allowed_s / self._s_per_token)))


class AdapterTurns:
    """Which LoRA adapter set the next step decodes (None: the base model).

    llama.cpp applies one adapter set to a whole context, so a step decodes the sequences of
    one set only, and the others wait. The set in turn keeps it for `quantum` steps while
    another set has work (a switch makes llama.cpp reserve its graph again: not every step),
    then the turn goes to the set that has waited longest. So with G sets holding slots, a
    sequence waits at most (G - 1) * quantum steps between two of its tokens, whatever the
    arrival order; alone, a set keeps every step.
    """

    def __init__(self, quantum: int = 4) -> None:
        assert quantum >= 1
        self.quantum = quantum
        self.current: str | None = None
        self._n_in_turn = 0  # steps the current set has run in this turn
        self._served: dict[str | None, int] = {}  # set -> the step it last ran
        self._step = 0
        self.max_wait_steps = 0  # the longest a set with work waited for its turn (measured)

    def choose(self, sets: Iterable[str | None]) -> str | None:
        """The set for the next step, among `sets` (those with sequences to decode or
        prefill, in admission order of their first sequence). Call once per step."""
        order = list(dict.fromkeys(sets))
        assert order, "no set has work"
        self._step += 1
        keep = self.current in order and (len(order) == 1 or self._n_in_turn < self.quantum)
        if not keep:
            # The set whose last turn is the oldest (never served: from when it first showed).
            for s in order:
                self._served.setdefault(s, self._step - 1)
            others = [s for s in order if s != self.current] or order
            chosen = min(others, key=lambda s: self._served[s])
            self.max_wait_steps = max(self.max_wait_steps, self._step - 1 - self._served[chosen])
            self.current, self._n_in_turn = chosen, 0
        self._n_in_turn += 1
        self._served[self.current] = self._step
        for s in [s for s in self._served if s not in order]:
            del self._served[s]  # gone idle: its wait starts afresh when it comes back
        return self.current
