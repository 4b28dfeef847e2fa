"""SamplingParams -> the recipe of a llama.cpp sampler chain. Pure; `llama.py` builds it in C."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from cria.engine.types import SamplingParams


@dataclass(frozen=True, slots=True)
class SamplerStep:
    kind: str  # logit_bias | penalties | top_k | top_p | min_p | temp | dist | greedy
    args: tuple[float | int, ...] = ()


def sampler_recipe(
    params: SamplingParams, *, banned: Sequence[int] = ()
) -> tuple[SamplerStep, ...]:
    """The order llama.cpp itself uses: penalties, then truncation, then temperature, then draw.
    (A grammar is not a step of the chain: constrained.ConstrainedSampler applies it around it.)

    Temperature 0 is greedy (argmax after penalties). A request without a seed gets a random
    one, so two unseeded requests differ while a seeded one repeats exactly.
    """
    steps: list[SamplerStep] = []
    biases = dict(params.logit_bias)
    for token in banned:  # e.g. end-of-generation tokens under ignore_eos
        biases[token] = float("-inf")
    if biases:
        flat: list[float | int] = []
        for token, bias in sorted(biases.items()):
            flat += [token, bias]
        steps.append(SamplerStep("logit_bias", tuple(flat)))
    if params.has_penalties:
        steps.append(
            SamplerStep(
                "penalties",
                (
                    params.penalty_last_n,
                    params.repeat_penalty,
                    params.frequency_penalty,
                    params.presence_penalty,
                ),
            )
        )
    if params.is_greedy:
        steps.append(SamplerStep("greedy"))
        return tuple(steps)
    if params.top_k > 0:
        steps.append(SamplerStep("top_k", (params.top_k,)))
    if params.top_p < 1.0:
        steps.append(SamplerStep("top_p", (params.top_p, 1)))
    if params.min_p > 0.0:
        steps.append(SamplerStep("min_p", (params.min_p, 1)))
    steps.append(SamplerStep("temp", (params.temperature,)))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    seed &= 0xFFFFFFFF
    if seed == 0xFFFFFFFF:  # llama.cpp reads this value as "pick a random seed"
        seed = 0xFFFFFFFE
    steps.append(SamplerStep("dist", (seed,)))
    return tuple(steps)
