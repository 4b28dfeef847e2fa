"""SlotTable: which free slot serves a prompt, and how much of its KV cache is reused."""

from __future__ import annotations

import pytest

from cria.engine.slots import SlotTable, common_prefix_len


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [], 0),
        ([1, 2, 3], [], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2, 4], 2),
        ([1, 2], [1, 2, 3, 4], 2),
        ([9, 2, 3], [1, 2, 3], 0),
    ],
)
def test_common_prefix_len(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix_len(a, b) == n
    assert common_prefix_len(b, a) == n


def test_fresh_table_picks_lowest_id_with_no_reuse() -> None:
    table = SlotTable(3)
    assert table.n_free == 3
    assert table.choose([1, 2, 3]) == (0, 0)


def test_longest_common_prefix_wins() -> None:
    table = SlotTable(3)
    table.slots[0].cached = [1, 2, 9]
    table.slots[1].cached = [1, 2, 3, 4, 9]
    table.slots[2].cached = [1]
    assert table.choose([1, 2, 3, 4, 5, 6]) == (1, 4)


def test_reuse_is_capped_at_prompt_length_minus_one() -> None:
    table = SlotTable(1)
    table.slots[0].cached = [1, 2, 3, 4]
    assert table.choose([1, 2, 3, 4]) == (0, 3)  # the last prompt token is always decoded
    assert table.choose([1, 2, 3]) == (0, 2)  # prompt is a prefix of the cache


def test_single_token_prompt_reuses_nothing() -> None:
    table = SlotTable(1)
    table.slots[0].cached = [7, 8]
    assert table.choose([7]) == (0, 0)


def test_empty_prompt_reuses_nothing() -> None:
    table = SlotTable(2)
    table.slots[0].cached = [1]
    assert table.choose([]) == (0, 0)  # tie on reuse 0: the lowest id


def test_tie_prefers_the_lowest_id_to_keep_busy_slots_packed() -> None:
    table = SlotTable(3)
    table.slots[0].is_busy = True
    table.slots[1].cached = [1, 2, 50, 51, 52, 53]
    table.slots[2].cached = [1, 2, 60]
    assert table.choose([1, 2, 3, 4]) == (1, 2)


def test_tie_on_cap_prefers_lowest_id() -> None:
    table = SlotTable(2)
    table.slots[0].cached = [1, 2, 3]
    table.slots[1].cached = [1, 2, 3, 4, 5]  # full match, but capped to 2
    assert table.choose([1, 2, 3]) == (0, 2)


def test_best_donor_looks_at_busy_slots_too() -> None:
    table = SlotTable(3)
    table.slots[0].cached = [1, 2, 3, 4, 5]
    table.slots[0].is_busy = True
    table.slots[1].cached = [1, 2]
    assert table.best_donor([1, 2, 3, 4, 9], exclude=2) == (0, 4)
    assert table.best_donor([1, 2, 3], exclude=2) == (0, 2)  # capped at len(prompt) - 1
    assert table.best_donor([7, 8], exclude=2) is None
    assert table.best_donor([1, 2, 3, 4, 9], exclude=0) == (1, 2)


def test_acquire_copy_takes_the_donor_prefix() -> None:
    table = SlotTable(2)
    table.slots[0].cached = [1, 2, 3, 4]
    table.slots[1].cached = [9, 9, 9]
    slot = table.acquire_copy(1, 0, 3)
    assert slot.is_busy and slot.cached == [1, 2, 3]
    assert table.slots[0].cached == [1, 2, 3, 4]


def test_full_tie_prefers_lowest_id() -> None:
    table = SlotTable(4)
    for slot in table.slots[1:]:
        slot.cached = [5, 6]
    table.slots[0].is_busy = True
    assert table.choose([5, 6, 7]) == (1, 2)


def test_busy_slots_are_never_chosen() -> None:
    table = SlotTable(2)
    table.slots[0].cached = [1, 2, 3, 4]
    table.slots[0].is_busy = True
    assert table.n_free == 1
    assert table.choose([1, 2, 3, 4, 5]) == (1, 0)


def test_all_busy_returns_none() -> None:
    table = SlotTable(2)
    table.acquire(0, 0)
    table.acquire(1, 0)
    assert table.n_free == 0
    assert table.choose([1]) is None


def test_zero_slots_returns_none() -> None:
    assert SlotTable(0).choose([1, 2]) is None


def test_acquire_truncates_cache_to_the_reused_prefix() -> None:
    table = SlotTable(1)
    table.slots[0].cached = [1, 2, 3, 4, 5]
    slot_id, reuse = table.choose([1, 2, 3, 9])  # type: ignore[misc]
    slot = table.acquire(slot_id, reuse)
    assert slot is table.slots[0]
    assert slot.is_busy
    assert slot.cached == [1, 2, 3]


def test_acquire_twice_is_an_error() -> None:
    table = SlotTable(1)
    table.acquire(0, 0)
    with pytest.raises(AssertionError):
        table.acquire(0, 0)


def test_release_keeps_cache_and_forget_clears_it() -> None:
    table = SlotTable(2)
    slot = table.acquire(0, 0)
    slot.cached.extend([4, 5, 6])
    table.release(0)
    assert not slot.is_busy
    assert table.choose([4, 5, 6, 7]) == (0, 3)  # prefix reuse after release
    table.forget(0)
    assert slot.cached == []
    assert table.choose([4, 5, 6, 7]) == (0, 0)


def test_two_requests_sharing_a_system_prompt_reuse_the_cache() -> None:
    table = SlotTable(2)
    system = [100, 101, 102]
    first = table.acquire(*table.choose([*system, 1, 2]))  # type: ignore[misc]
    first.cached.extend([*system, 1, 2, 3])
    table.release(first.id)
    # The next request with the same system prompt lands on the slot that holds it.
    assert table.choose([*system, 7, 8]) == (first.id, len(system))


def test_scratch_slot_is_the_one_with_the_least_cache() -> None:
    table = SlotTable(3)
    table.acquire_tokens(0, [1, 2, 3])
    table.acquire_tokens(1, [1])
    table.acquire_tokens(2, [1, 2])
    for i in range(3):
        table.release(i)
    assert table.choose_scratch() == 1
    table.acquire(1, 0)
    assert table.choose_scratch() == 2
    table.acquire(2, 0)
    table.acquire(0, 0)
    assert table.choose_scratch() is None


def test_holder_finds_another_slot_whose_cache_starts_with_the_tokens() -> None:
    table = SlotTable(3)
    table.acquire_tokens(0, [1, 2, 3])
    table.acquire_tokens(1, [1, 2, 3, 4, 5])  # busy, holds more: still a holder
    table.acquire_tokens(2, [1, 2])
    assert table.holder([1, 2, 3], exclude=0) == 1
    assert table.holder((1, 2), exclude=2) == 0  # any sequence type
    assert table.holder([1, 2, 3, 4, 5], exclude=1) is None  # nobody else holds all of them
    assert table.holder([1, 9], exclude=0) is None
