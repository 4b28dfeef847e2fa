"""The host-memory prompt cache: longest-prefix look-up, LRU eviction within a byte budget."""

from __future__ import annotations

from cria.engine.prompt_cache import PromptCache


def test_best_finds_the_longest_shared_prefix() -> None:
    cache = PromptCache(1000)
    cache.put([1, 2, 3, 4], b"a" * 10)
    cache.put([1, 2, 9], b"b" * 10)
    found = cache.best([1, 2, 3, 4, 5, 6])
    assert found is not None and found[0].state == b"a" * 10 and found[1] == 4
    assert cache.best([7, 8]) is None


def test_best_is_capped_below_the_whole_prompt() -> None:
    cache = PromptCache(1000)
    cache.put([1, 2, 3], b"x")
    found = cache.best([1, 2, 3])
    assert found is not None and found[1] == 2  # the last prompt token is always decoded


def test_least_recently_used_is_evicted_first() -> None:
    cache = PromptCache(25)
    cache.put([1], b"a" * 10)
    cache.put([2], b"b" * 10)
    assert cache.best([1, 5]) is not None  # touch [1]: [2] is now the oldest
    cache.put([3], b"c" * 10)
    assert cache.n_bytes == 20 and len(cache) == 2
    assert cache.best([2, 5]) is None
    assert cache.best([1, 5]) is not None and cache.best([3, 5]) is not None


def test_an_entry_larger_than_the_budget_is_not_kept() -> None:
    cache = PromptCache(5)
    cache.put([1, 2], b"123456")
    assert len(cache) == 0 and cache.n_bytes == 0


def test_a_longer_entry_replaces_its_prefix() -> None:
    cache = PromptCache(100)
    cache.put([1, 2], b"ab")
    cache.put([1, 2, 3], b"abc")
    assert len(cache) == 1 and cache.n_bytes == 3
    assert cache.covers([1, 2]) and cache.covers([1, 2, 3]) and not cache.covers([1, 2, 3, 4])


def test_discard_forgets_one_entry_and_its_bytes() -> None:
    cache = PromptCache(100)
    cache.put([1, 2], b"ab")
    cache.put([7], b"xyz")
    cache.discard((1, 2))
    cache.discard([9])  # not there: nothing happens
    assert len(cache) == 1 and cache.n_bytes == 3 and cache.best([1, 2, 3]) is None
