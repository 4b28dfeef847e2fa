"""The slot table: which slot serves which request, and what each slot's KV cache holds.

Pure policy (no llama.cpp, no threads). Slot i is llama.cpp sequence i.

A slot's KV cache was computed under one LoRA adapter (None: the base model): its tokens are
reused only by a request for that same adapter, since the same tokens give other keys and
values under another adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass(slots=True)
class Slot:
    id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this slot's sequence holds
    is_busy: bool = False
    adapter: str | None = None  # the LoRA adapter `cached` was computed under


class SlotTable:
    def __init__(self, n_slots: int, adapters: Sequence[str] = ()) -> None:
        """`adapters`: the model's LoRA adapters. With some, the requests of one set (an adapter,
        or the base model) gather in slots side by side when nothing cached decides: one
        llama_decode splits into a ubatch per run of consecutive sequence ids, and a step
        decodes one set, so side by side means fewer, fuller ubatches (a 4-sequence step on
        slots 0,3,4,7 took 1.5x as long as on 0-3)."""
        self.slots = [Slot(i) for i in range(n_slots)]
        self._gather = bool(adapters)

    @property
    def n_free(self) -> int:
        return sum(1 for s in self.slots if not s.is_busy)

    def choose(self, prompt: Sequence[int], adapter: str | None = None) -> tuple[int, int] | None:
        """Pick the free slot for `prompt`: the one with the longest common prefix; on a tie the
        lowest id, which keeps busy slots packed at low ids (llama.cpp batches consecutive
        sequence ids together). Returns (slot id, tokens reusable) or None when every slot is
        busy. A longer prefix held by another slot is found by `best_donor`. With adapters, a
        tie goes to where the request's set gathers (see __init__), then the lowest id.

        At most len(prompt) - 1 tokens are reused: the last prompt token is always decoded,
        because its logits give the first sampled token.
        """
        best: tuple[int, int, int, int] | None = None  # (-reuse, placement..., id)
        for slot in self.slots:
            if slot.is_busy:
                continue
            reuse = min(_shared(slot, prompt, adapter), max(len(prompt) - 1, 0))
            key = (-reuse, *self._placement(slot.id, adapter), slot.id)
            if best is None or key < best:
                best = key
        if best is None:
            return None
        return best[3], -best[0]

    def _placement(self, slot_id: int, adapter: str | None) -> tuple[int, int]:
        """Without adapters, nothing: the lowest id wins. With them: next to a busy slot of the
        same set first, then as far as can be from every other set's busy slots."""
        if not self._gather:
            return 0, 0
        n = len(self.slots)
        beside = any(
            0 <= j < n and self.slots[j].is_busy and self.slots[j].adapter == adapter
            for j in (slot_id - 1, slot_id + 1)
        )
        others = [abs(s.id - slot_id) for s in self.slots if s.is_busy and s.adapter != adapter]
        return (0 if beside else 1), -min(others, default=n)

    def choose_scratch(self) -> int | None:
        """A free slot for a request that reuses nothing (its cache is wiped): the one whose
        cache is worth least (fewest tokens; on a tie the lowest id), or None if all are busy."""
        free = [s for s in self.slots if not s.is_busy]
        if not free:
            return None
        return min(free, key=lambda s: (len(s.cached), s.id)).id

    def acquire(self, slot_id: int, n_reuse: int, adapter: str | None = None) -> Slot:
        slot = self.slots[slot_id]
        assert not slot.is_busy, "slot acquired twice"
        assert n_reuse == 0 or slot.adapter == adapter, "KV reused across adapters"
        slot.is_busy = True
        slot.adapter = adapter
        del slot.cached[n_reuse:]
        return slot

    def best_donor(
        self, prompt: Sequence[int], *, exclude: int, adapter: str | None = None
    ) -> tuple[int, int] | None:
        """The slot (busy or free, other than `exclude`) whose cached tokens share the longest
        prefix with `prompt`, capped at len(prompt) - 1. Returns (slot id, prefix length), or
        None when no slot shares anything."""
        cap = max(len(prompt) - 1, 0)
        best: tuple[int, int] | None = None
        for slot in self.slots:
            if slot.id == exclude:
                continue
            n = min(_shared(slot, prompt, adapter), cap)
            if n > 0 and (best is None or n > best[1]):
                best = (slot.id, n)
        return best

    def holder(
        self, tokens: Sequence[int], *, exclude: int, adapter: str | None = None
    ) -> int | None:
        """A slot other than `exclude` whose cache starts with all of `tokens` (computed under
        `adapter`), or None."""
        want = list(tokens)
        n = len(want)
        for slot in self.slots:
            if (
                slot.id != exclude
                and slot.adapter == adapter
                and len(slot.cached) >= n
                and slot.cached[:n] == want
            ):
                return slot.id
        return None

    def acquire_copy(self, slot_id: int, donor_id: int, n_tokens: int) -> Slot:
        """Acquire a free slot whose cache now holds the first `n_tokens` of the donor's."""
        slot = self.slots[slot_id]
        assert not slot.is_busy, "slot acquired twice"
        donor = self.slots[donor_id]
        slot.is_busy = True
        slot.adapter = donor.adapter
        slot.cached[:] = donor.cached[:n_tokens]
        return slot

    def acquire_tokens(
        self, slot_id: int, tokens: Sequence[int], adapter: str | None = None
    ) -> Slot:
        """Acquire a free slot whose cache now holds `tokens` (restored from elsewhere, computed
        under `adapter`)."""
        slot = self.slots[slot_id]
        assert not slot.is_busy, "slot acquired twice"
        slot.is_busy = True
        slot.adapter = adapter
        slot.cached[:] = tokens
        return slot

    def release(self, slot_id: int) -> None:
        """Free the slot; its cached tokens stay for prefix reuse."""
        self.slots[slot_id].is_busy = False

    def forget(self, slot_id: int) -> None:
        """The slot's KV cache is gone (cleared after an error): nothing to reuse."""
        self.slots[slot_id].cached.clear()


def _shared(slot: Slot, prompt: Sequence[int], adapter: str | None) -> int:
    """Tokens of `prompt` the slot's cache can stand in for: none under another adapter."""
    return common_prefix_len(slot.cached, prompt) if slot.adapter == adapter else 0
