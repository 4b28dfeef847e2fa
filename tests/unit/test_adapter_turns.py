"""LoRA adapter sets in the pure policy: whose turn a step is, and KV reuse kept per adapter."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cria.engine.prompt_cache import PromptCache
from cria.engine.scheduler import AdapterTurns
from cria.engine.slots import SlotTable


def test_a_set_alone_keeps_every_step() -> None:
    turns = AdapterTurns(quantum=2)
    assert [turns.choose(["a"]) for _ in range(10)] == ["a"] * 10
    assert turns.max_wait_steps == 0


def test_two_sets_alternate_by_quantum() -> None:
    turns = AdapterTurns(quantum=3)
    picks = [turns.choose([None, "a"]) for _ in range(12)]
    assert picks == [None] * 3 + ["a"] * 3 + [None] * 3 + ["a"] * 3
    assert turns.max_wait_steps == 3


def test_the_longest_waiting_set_goes_next() -> None:
    turns = AdapterTurns(quantum=1)
    assert turns.choose(["a", "b", "c"]) == "a"
    assert turns.choose(["a", "b", "c"]) == "b"
    assert turns.choose(["a", "b", "c"]) == "c"
    assert turns.choose(["a", "b", "c"]) == "a"


def test_a_set_that_goes_idle_hands_over_at_once() -> None:
    turns = AdapterTurns(quantum=8)
    assert turns.choose(["a", "b"]) == "a"
    assert turns.choose(["b"]) == "b"  # a finished: no waiting out a's quantum
    assert turns.choose(["a", "b"]) == "b"  # b's turn goes on; a waits its quantum at most


@settings(max_examples=200, deadline=None)
@given(
    quantum=st.integers(1, 6),
    schedule=st.lists(
        st.sets(st.sampled_from([None, "a", "b", "c"]), min_size=1), min_size=1, max_size=120
    ),
)
def test_no_set_waits_longer_than_its_bound(quantum: int, schedule: list[set[str | None]]) -> None:
    """Whatever sets come and go, one that keeps having work is served within
    (other sets) x quantum steps: here at most 3 others."""
    turns = AdapterTurns(quantum=quantum)
    last: dict[str | None, int] = {}
    for step, sets in enumerate(schedule):
        order = sorted(sets, key=str)
        chosen = turns.choose(order)
        assert chosen in sets
        for s in list(last):
            if s not in sets:
                del last[s]
        for s in sets:
            last.setdefault(s, step - 1)
        last[chosen] = step
        for s in sets:
            assert step - last[s] - 1 <= 3 * quantum
    assert turns.max_wait_steps <= 3 * quantum


def test_slots_reuse_only_their_own_adapters_cache() -> None:
    table = SlotTable(2)
    prompt = list(range(40))
    slot = table.acquire(0, 0, adapter="a")
    slot.cached.extend(prompt)
    table.release(0)
    assert table.choose(prompt, adapter="a") == (0, 39)
    # Same tokens, another adapter (or the base model): nothing is reusable, anywhere.
    assert table.choose(prompt, adapter=None)[1] == 0  # type: ignore[index]
    assert table.choose(prompt, adapter="b")[1] == 0  # type: ignore[index]
    assert table.best_donor(prompt, exclude=1, adapter=None) is None
    assert table.best_donor(prompt, exclude=1, adapter="a") == (0, 39)
    assert table.holder(prompt[:10], exclude=1, adapter=None) is None
    assert table.holder(prompt[:10], exclude=1, adapter="a") == 0
    with pytest.raises(AssertionError):
        table.acquire(0, 10, adapter="b")  # reusing KV across adapters is a bug
    table.acquire(0, 0, adapter="b")
    assert table.slots[0].adapter == "b" and table.slots[0].cached == []


def test_a_copied_prefix_keeps_the_donors_adapter() -> None:
    table = SlotTable(2)
    table.acquire(0, 0, adapter="a").cached.extend(range(20))
    assert table.acquire_copy(1, 0, 10).adapter == "a"
    table.release(1)
    table.acquire_tokens(1, list(range(5)), adapter=None)
    assert table.slots[1].adapter is None


def test_the_prompt_cache_is_kept_per_adapter() -> None:
    cache: PromptCache[np.ndarray] = PromptCache(1 << 20)
    tokens = list(range(50))
    cache.put(tokens, np.zeros(100, dtype=np.uint8), adapter="a")
    assert cache.covers(tokens, adapter="a") and not cache.covers(tokens, adapter=None)
    assert cache.best([*tokens, 7], adapter=None) is None
    assert cache.best([*tokens, 7], adapter="b") is None
    hit = cache.best([*tokens, 7], adapter="a")
    assert hit is not None and hit[1] == 50 and hit[0].adapter == "a"
    cache.put(tokens, np.zeros(100, dtype=np.uint8), adapter=None)  # the same tokens, base model
    assert len(cache) == 2
    cache.discard(tokens, adapter="a")
    assert len(cache) == 1 and cache.best([*tokens, 7], adapter=None) is not None


def test_turns_serve_every_set_in_a_random_run() -> None:
    """A long random run: each set gets steps in proportion, none starves."""
    rng = random.Random(0)
    turns = AdapterTurns(quantum=4)
    counts = dict.fromkeys(["x", "y", None], 0)
    for _ in range(3000):
        sets = [s for s in counts if rng.random() < 0.9] or ["x"]
        counts[turns.choose(sets)] += 1
    assert min(counts.values()) > 600, counts
    assert list(itertools.islice(counts, 3)) == ["x", "y", None]


def test_each_adapters_requests_gather_in_its_own_run_of_slots() -> None:
    """Requests of two adapters arriving interleaved: without homes they would take slots
    0..7 alternately (a on 0,2,4,6): four ubatches a step. With homes, each set's slots are
    consecutive: a from one end, b from the other."""
    table = SlotTable(8, adapters=("a", "b"))
    for i in range(8):
        adapter = "ab"[i % 2]
        choice = table.choose([1, 2, 3], adapter)
        assert choice is not None
        table.acquire(choice[0], 0, adapter)
    by_set = {s: [slot.id for slot in table.slots if slot.adapter == s] for s in "ab"}
    for ids in by_set.values():
        assert len(ids) == 4 and ids == list(range(ids[0], ids[0] + 4)), by_set


def test_without_adapters_the_lowest_free_slot_is_chosen() -> None:
    table = SlotTable(4)
    assert table.choose([1, 2], None) == (0, 0)
    table.acquire(0, 0)
    assert table.choose([1, 2], None) == (1, 0)


def test_a_cached_prefix_still_beats_the_placement() -> None:
    table = SlotTable(8, adapters=("a",))
    table.acquire(0, 0, adapter="a").cached.extend(range(10))
    table.release(0)
    table.acquire(7, 0, adapter=None)
    assert table.choose(list(range(12)), "a") == (0, 10)  # not beside a's own, but cached
    assert table.choose([5, 6], "a") == (0, 0)  # nothing cached: farthest from the base (7)
