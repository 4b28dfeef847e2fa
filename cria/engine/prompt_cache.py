"""A host-memory cache of evicted prompts' KV state, as llama.cpp's server keeps one.

When a slot is about to be reused for a different prompt, the engine saves the slot's KV state
here (a few MB for a few hundred tokens); a later request whose prompt shares a longer prefix
with a saved entry than with any slot restores it instead of prefilling. Pure policy and
storage (no llama.cpp): entries are opaque buffers of len() bytes (uint8 arrays from the
engine), evicted least-recently-used within a byte budget. Each entry belongs to the LoRA
adapter its KV was computed under (None: the base model) and serves only that adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence, Sized
from dataclasses import dataclass
from typing import Generic, TypeVar

from cria.engine.slots import common_prefix_len

S = TypeVar("S", bound=Sized)  # a saved state: len() bytes


@dataclass(frozen=True, slots=True)
class CachedPrompt(Generic[S]):
    tokens: tuple[int, ...]
    state: S
    adapter: str | None = None


class PromptCache(Generic[S]):
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: OrderedDict[tuple[str | None, tuple[int, ...]], CachedPrompt[S]] = OrderedDict()
        self.n_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def covers(self, tokens: Sequence[int], adapter: str | None = None) -> bool:
        """True if an entry already holds all of `tokens` (saving them again is pointless)."""
        n, want = len(tokens), tuple(tokens)
        return any(
            a == adapter and len(key) >= n and key[:n] == want for a, key in self._entries
        )

    def put(self, tokens: Sequence[int], state: S, adapter: str | None = None) -> None:
        if len(state) > self.capacity_bytes or not tokens:
            return
        key = tuple(tokens)
        # An entry that is a prefix of the new one is now redundant.
        for old in [
            (a, k)
            for a, k in self._entries
            if a == adapter and len(k) <= len(key) and key[: len(k)] == k
        ]:
            self._drop(old)
        self._entries[(adapter, key)] = CachedPrompt(key, state, adapter)
        self.n_bytes += len(state)
        while self.n_bytes > self.capacity_bytes:
            self._drop(next(iter(self._entries)))

    def best(
        self, prompt: Sequence[int], adapter: str | None = None
    ) -> tuple[CachedPrompt[S], int] | None:
        """The entry sharing the longest prefix with `prompt` (capped at len(prompt) - 1, as
        the last prompt token is always decoded), marked as recently used."""
        cap = max(len(prompt) - 1, 0)
        best: tuple[CachedPrompt[S], int] | None = None
        for entry in self._entries.values():
            if entry.adapter != adapter:
                continue
            n = min(common_prefix_len(entry.tokens, prompt), cap)
            if n > 0 and (best is None or n > best[1]):
                best = (entry, n)
        if best is not None:
            self._entries.move_to_end((adapter, best[0].tokens))
        return best

    def discard(self, tokens: Sequence[int], adapter: str | None = None) -> None:
        """Forget the entry for exactly these tokens (one that would not restore)."""
        key = (adapter, tuple(tokens))
        if key in self._entries:
            self._drop(key)

    def _drop(self, key: tuple[str | None, tuple[int, ...]]) -> None:
        entry = self._entries.pop(key)
        self.n_bytes -= len(entry.state)
