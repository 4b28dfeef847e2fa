"""sampler_recipe: SamplingParams -> the ordered steps of a llama.cpp sampler chain."""

from __future__ import annotations

import math

import pytest

from cria.engine.sampling import SamplerStep, sampler_recipe
from cria.engine.types import SamplingParams


def kinds(steps: tuple[SamplerStep, ...]) -> list[str]:
    return [s.kind for s in steps]


def test_temperature_zero_is_greedy_with_no_draw() -> None:
    steps = sampler_recipe(SamplingParams(temperature=0.0, top_k=40, top_p=0.5, min_p=0.1, seed=3))
    assert steps == (SamplerStep("greedy"),)


def test_negative_temperature_is_greedy_too() -> None:
    assert kinds(sampler_recipe(SamplingParams(temperature=-1.0))) == ["greedy"]


def test_defaults_are_temperature_then_dist() -> None:
    steps = sampler_recipe(SamplingParams(seed=5))
    assert steps == (SamplerStep("temp", (1.0,)), SamplerStep("dist", (5,)))


def test_full_chain_order_matches_llama_cpp() -> None:
    params = SamplingParams(
        temperature=0.7,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=0.25,
        repeat_penalty=1.1,
        penalty_last_n=32,
        seed=11,
        logit_bias=((10, 2.0),),
    )
    steps = sampler_recipe(params)
    assert kinds(steps) == ["logit_bias", "penalties", "top_k", "top_p", "min_p", "temp", "dist"]
    by_kind = {s.kind: s.args for s in steps}
    assert by_kind["penalties"] == (32, 1.1, 0.25, 0.5)
    assert by_kind["top_k"] == (40,)
    assert by_kind["top_p"] == (0.9, 1)
    assert by_kind["min_p"] == (0.05, 1)
    assert by_kind["temp"] == (0.7,)
    assert by_kind["dist"] == (11,)


def test_greedy_keeps_bias_and_penalties_before_argmax() -> None:
    params = SamplingParams(temperature=0.0, repeat_penalty=1.3, logit_bias=((1, -5.0),))
    assert kinds(sampler_recipe(params)) == ["logit_bias", "penalties", "greedy"]


@pytest.mark.parametrize(
    ("field", "value"),
    [("presence_penalty", 0.1), ("frequency_penalty", -0.1), ("repeat_penalty", 0.9)],
)
def test_any_penalty_turns_on_the_penalties_step(field: str, value: float) -> None:
    params = SamplingParams(seed=1, **{field: value})
    assert kinds(sampler_recipe(params))[0] == "penalties"


def test_neutral_truncation_values_add_no_steps() -> None:
    params = SamplingParams(top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=1)
    assert kinds(sampler_recipe(params)) == ["temp", "dist"]


def test_logit_bias_is_flattened_sorted_by_token() -> None:
    params = SamplingParams(temperature=0.0, logit_bias=((30, 1.5), (7, -2.0), (12, 0.0)))
    (bias, greedy) = sampler_recipe(params)
    assert bias == SamplerStep("logit_bias", (7, -2.0, 12, 0.0, 30, 1.5))
    assert greedy.kind == "greedy"


def test_banned_tokens_get_minus_infinity_overriding_a_bias() -> None:
    params = SamplingParams(temperature=0.0, logit_bias=((2, 5.0), (4, 1.0)))
    (bias, _greedy) = sampler_recipe(params, banned=[2, 3])
    assert bias.kind == "logit_bias"
    tokens, values = bias.args[0::2], bias.args[1::2]
    assert tokens == (2, 3, 4)
    assert values[0] == -math.inf and values[1] == -math.inf
    assert values[2] == 1.0


def test_banned_without_bias_still_makes_a_bias_step() -> None:
    steps = sampler_recipe(SamplingParams(seed=1), banned=(0,))
    assert steps[0] == SamplerStep("logit_bias", (0, -math.inf))


def test_seeded_recipe_repeats_exactly() -> None:
    params = SamplingParams(temperature=0.8, top_k=10, seed=1234)
    assert sampler_recipe(params) == sampler_recipe(params)


@pytest.mark.parametrize(
    ("seed", "expected"),
    [
        (0, 0),
        (42, 42),
        (0xFFFFFFFE, 0xFFFFFFFE),
        (0xFFFFFFFF, 0xFFFFFFFE),  # llama.cpp's "random seed" value is never passed through
        (-1, 0xFFFFFFFE),  # masks to 0xFFFFFFFF
        (-2, 0xFFFFFFFE),
        (1 << 32, 0),
        ((1 << 32) + 5, 5),
        ((1 << 40) + 0xFFFFFFFF, 0xFFFFFFFE),
    ],
)
def test_seed_is_a_32_bit_value_never_the_random_sentinel(seed: int, expected: int) -> None:
    steps = sampler_recipe(SamplingParams(seed=seed))
    assert steps[-1] == SamplerStep("dist", (expected,))


def test_unseeded_requests_get_different_valid_seeds() -> None:
    seeds = set()
    for _ in range(20):
        dist = sampler_recipe(SamplingParams())[-1]
        assert dist.kind == "dist"
        (seed,) = dist.args
        assert isinstance(seed, int)
        assert 0 <= seed < 0xFFFFFFFF
        seeds.add(seed)
    assert len(seeds) > 1
