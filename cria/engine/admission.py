"""Admission: waiting requests into free slots, reusing as much KV as can be found.

Where a prompt's prefix comes from, best first: the host-memory prompt cache (when it holds
more than any slot), another slot's cache (a KV copy), the chosen slot's own cache; what the
chosen slot loses is saved to the prompt cache first. Split from the step (engine.py) so that
admission and the plan stay apart: admission only decides slots and KV; the engine's `start`
makes an admitted request a running one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

import numpy as np

from cria.engine.llama import LlamaContext
from cria.engine.prompt_cache import PromptCache
from cria.engine.seq import _Seq
from cria.engine.slots import SlotTable

# The engine's log lines keep one logger name, whichever of its modules writes them.
log = logging.getLogger("cria.engine.engine")

# A slot about to lose fewer tokens than this is not worth saving to the prompt cache.
MIN_SAVED_TOKENS = 32


class Admission:
    """Owns the engine's SlotTable and PromptCache (both engine-thread state; `stats()` reads
    them racily for display)."""

    def __init__(self, slots: SlotTable, prompt_cache: PromptCache[np.ndarray] | None) -> None:
        self.slots = slots
        self.prompt_cache = prompt_cache

    def admit(
        self,
        ctx: LlamaContext,
        waiting: deque[_Seq],
        running: list[_Seq],
        *,
        start: Callable[[_Seq, int, int], None],
        dequeued: Callable[[], None],
    ) -> None:
        """Give free slots to `waiting` requests in order. Each one taken out of the queue is
        counted with `dequeued()` and, its slot acquired and its KV in place, handed to
        `start(seq, slot_id, n_reuse)`, which adds it to `running` (read here: a request whose
        group is still prefilling waits for it)."""
        deferred: list[_Seq] = []
        # A deferred request keeps its place: the slots it will need are not given to requests
        # queued after it.
        while waiting and self.slots.n_free > len(deferred):
            seq = waiting.popleft()
            if _group_is_prefilling(seq, running):
                deferred.append(seq)  # admitted once the group's prompt is in the KV cache
                continue
            dequeued()
            if seq.req.prompt_logprobs:
                # Every prompt token's logits are needed: nothing cached can stand in for them,
                # so take the slot whose cache is worth least.
                slot_id = self.slots.choose_scratch()
                assert slot_id is not None
                self._save_evicted(ctx, slot_id, 0)
                ctx.seq_rm(slot_id, 0)
                seq.slot = self.slots.acquire(slot_id, 0, seq.req.adapter)
                seq.prompt_lps = [None]
                start(seq, slot_id, 0)
                continue
            # KV is reused only from where it was computed under the request's own adapter.
            adapter = seq.req.adapter
            choice = self.slots.choose(seq.req.prompt, adapter)
            assert choice is not None
            slot_id, n_reuse = choice
            donor = self.slots.best_donor(seq.req.prompt, exclude=slot_id, adapter=adapter)
            # Looked up (and made the most recently used) before the slot's own cache is saved:
            # that save may push the cache over its budget, and must not evict this entry.
            saved = self.prompt_cache.best(seq.req.prompt, adapter) if self.prompt_cache else None
            self._save_evicted(ctx, slot_id, n_reuse)
            n_donor = donor[1] if donor is not None else 0
            if saved is not None and saved[1] > max(n_reuse, n_donor) and ctx.seq_rm(slot_id, 0):
                # The prompt came back after leaving every slot: restore its KV from host memory.
                # The slot's own cache is gone from here on, whether the restore works or not.
                self.slots.forget(slot_id)
                n_reuse = 0
                if ctx.seq_state_load(slot_id, saved[0].state) and ctx.seq_rm(slot_id, saved[1]):
                    n_reuse = saved[1]
                    seq.slot = self.slots.acquire_tokens(
                        slot_id, saved[0].tokens[:n_reuse], adapter
                    )
                    start(seq, slot_id, n_reuse)
                    continue
                log.warning("slot %d: a prompt cache entry did not restore; dropped", slot_id)
                ctx.seq_rm(slot_id, 0)
                assert self.prompt_cache is not None
                self.prompt_cache.discard(saved[0].tokens, adapter)
            if donor is not None and donor[1] > n_reuse:
                # Another slot (busy or idle) already holds a longer prefix of this prompt:
                # copying its KV costs a memory copy instead of a prefill.
                donor_id, n_donor = donor
                if ctx.seq_copy_prefix(donor_id, slot_id, n_donor):
                    seq.slot = self.slots.acquire_copy(slot_id, donor_id, n_donor)
                    start(seq, slot_id, n_donor)
                    continue
                n_reuse = 0  # the copy could not be cut to the prefix: it goes below
            if not ctx.seq_rm(slot_id, n_reuse):
                # Partial removal unsupported (e.g. recurrent models): start afresh.
                ctx.seq_rm(slot_id, 0)
                n_reuse = 0
            seq.slot = self.slots.acquire(slot_id, n_reuse, adapter)
            start(seq, slot_id, n_reuse)
        waiting.extendleft(reversed(deferred))

    def _save_evicted(self, ctx: LlamaContext, slot_id: int, n_keep: int) -> None:
        """Before a slot's cache is cut to `n_keep` tokens for a new prompt, keep its KV state in
        the host-memory prompt cache, if enough would be lost and it is not there already."""
        cache = self.prompt_cache
        if cache is None:
            return
        slot = self.slots.slots[slot_id]
        cached, adapter = slot.cached, slot.adapter
        if len(cached) - n_keep < MIN_SAVED_TOKENS or cache.covers(cached, adapter):
            return
        if self.slots.holder(cached, exclude=slot_id, adapter=adapter) is not None:
            # Another slot holds these tokens too: a prompt that wants them copies them from
            # there, and that slot saves them when it is reused in turn.
            return
        try:
            cache.put(cached, ctx.seq_state_save(slot_id), adapter)
        except Exception:  # a cache is an optimisation: never fail a request over it
            log.exception("could not save slot %d to the prompt cache", slot_id)


def _group_is_prefilling(seq: _Seq, running: list[_Seq]) -> bool:
    """Whether another request of seq's group is still computing the shared prompt."""
    group = seq.req.group
    return group is not None and any(
        s.req.group == group and s.slot is not None and s.n_prompt_left > 1 for s in running
    )
