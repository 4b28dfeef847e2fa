"""Step planning: which sequences decode a token and which prompt chunks fill the rest.

Pure policy (no llama.cpp, no threads), so it is tested with real objects.
"""

from __future__ import annotations

from collections.abc import Sequence
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
