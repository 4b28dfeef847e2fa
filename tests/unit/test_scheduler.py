"""plan_step: decodes first, then prompt chunks within the token budget in admission order."""

from __future__ import annotations

import random

from cria.engine.scheduler import PrefillChunk, SeqState, StepPlan, plan_step


def test_nothing_to_do_is_an_empty_plan() -> None:
    plan = plan_step([], budget=64)
    assert plan.is_empty
    assert plan.n_tokens == 0
    assert plan == StepPlan((), ())


def test_every_decoding_sequence_gets_one_token() -> None:
    plan = plan_step([SeqState(2, 0), SeqState(0, 0), SeqState(1, 0)], budget=8)
    assert plan.decodes == (0, 1, 2)  # slot order: llama.cpp batches consecutive ids together
    assert plan.prefills == ()
    assert plan.n_tokens == 3
    assert not plan.is_empty


def test_whole_prompt_fits() -> None:
    plan = plan_step([SeqState(0, 10)], budget=16)
    assert plan.decodes == ()
    assert plan.prefills == (PrefillChunk(0, 10, is_last=True),)


def test_prompt_exactly_fills_budget_is_last() -> None:
    plan = plan_step([SeqState(0, 16)], budget=16)
    assert plan.prefills == (PrefillChunk(0, 16, is_last=True),)


def test_long_prompt_is_chunked_and_not_last() -> None:
    plan = plan_step([SeqState(0, 100)], budget=32)
    assert plan.prefills == (PrefillChunk(0, 32, is_last=False),)
    assert plan.n_tokens == 32


def test_decodes_come_before_prefill_and_shrink_its_budget() -> None:
    seqs = [SeqState(0, 50), SeqState(1, 0), SeqState(2, 0)]
    plan = plan_step(seqs, budget=10)
    assert plan.decodes == (1, 2)
    assert plan.prefills == (PrefillChunk(0, 8, is_last=False),)
    assert plan.n_tokens == 10


def test_prefills_follow_admission_order_and_stop_at_budget() -> None:
    seqs = [SeqState(3, 4), SeqState(1, 0), SeqState(0, 5), SeqState(2, 7)]
    plan = plan_step(seqs, budget=12)
    assert plan.decodes == (1,)
    assert plan.prefills == (
        PrefillChunk(3, 4, is_last=True),
        PrefillChunk(0, 5, is_last=True),
        PrefillChunk(2, 2, is_last=False),
    )
    assert plan.n_tokens == 12


def test_later_prompt_waits_when_budget_is_spent() -> None:
    plan = plan_step([SeqState(0, 20), SeqState(1, 3)], budget=20)
    assert plan.prefills == (PrefillChunk(0, 20, is_last=True),)


def test_decodes_exceeding_budget_still_all_run_and_nothing_prefills() -> None:
    seqs = [SeqState(i, 0) for i in range(5)] + [SeqState(5, 3)]
    plan = plan_step(seqs, budget=3)
    assert plan.decodes == (0, 1, 2, 3, 4)
    assert plan.prefills == ()


def test_zero_budget_plans_only_decodes() -> None:
    plan = plan_step([SeqState(0, 0), SeqState(1, 4)], budget=0)
    assert plan.decodes == (0,)
    assert plan.prefills == ()


def test_random_plans_respect_the_invariants() -> None:
    rng = random.Random(7)
    for _ in range(500):
        n = rng.randint(0, 8)
        ids = rng.sample(range(16), n)
        seqs = [SeqState(i, rng.choice([0, 0, rng.randint(1, 40)])) for i in ids]
        budget = rng.randint(0, 64)
        plan = plan_step(seqs, budget)
        decoding = [s.slot_id for s in seqs if s.n_prompt_left == 0]
        prefilling = [s for s in seqs if s.n_prompt_left > 0]
        assert list(plan.decodes) == sorted(decoding)
        assert plan.n_tokens <= max(budget, len(decoding))
        # Chunks are a prefix of the prefilling sequences, in admission order.
        first = prefilling[: len(plan.prefills)]
        assert [c.slot_id for c in plan.prefills] == [s.slot_id for s in first]
        for chunk, seq in zip(plan.prefills, prefilling):
            assert 1 <= chunk.n_tokens <= seq.n_prompt_left
            assert chunk.is_last == (chunk.n_tokens == seq.n_prompt_left)
        # Only the last chunk may be cut short, and only when the budget ran out.
        assert all(c.is_last for c in plan.prefills[:-1])
        if plan.prefills and not plan.prefills[-1].is_last:
            assert plan.n_tokens == budget
        # Budget left over means every prompt was fully scheduled.
        if plan.n_tokens < budget:
            assert len(plan.prefills) == len(prefilling)
            assert all(c.is_last for c in plan.prefills)
