"""The engine's record of one request, from submit() to its last Delta.

Its own module so that admission, batching and output (each a module of the engine) share one
definition; only the engine thread touches a `_Seq` once it has been queued.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cria.engine.constrained import ConstrainedSampler
from cria.engine.llama import SamplerChain
from cria.engine.slots import Slot
from cria.engine.stream import RequestStream
from cria.engine.text import Detokenizer, StopMatcher
from cria.engine.types import FinishReason, GenerationRequest, TokenLogprob


@dataclass(slots=True)
class _Seq:
    """Engine-private state of one running request."""

    req: GenerationRequest
    stream: RequestStream
    loop: asyncio.AbstractEventLoop
    slot: Slot | None = None
    n_cached: int = 0  # prompt tokens reused from the slot's cache
    n_generated: int = 0
    pending: int | None = None  # sampled token not yet decoded into the KV cache
    sampler: SamplerChain | ConstrainedSampler | None = None
    detok: Detokenizer = field(default_factory=Detokenizer)
    stops: StopMatcher | None = None
    # perf_counter() instants for Timings (submitted is taken on the event loop)
    t_submitted: float = 0.0
    t_admitted: float = 0.0
    t_first_token: float | None = None
    n_sampled: int = 0
    lps: list[TokenLogprob] = field(default_factory=list)  # logprobs not yet emitted
    # Prompt logprobs (prompt_logprobs requests): filled chunk by chunk, sent with the first Delta.
    prompt_lps: list[TokenLogprob | None] | None = None
    is_finished: bool = False  # out of the running set, its slot released (text may be owed)
    is_closed: bool = False  # failed or aborted: nothing more is sent on its stream

    @property
    def n_prompt_left(self) -> int:
        assert self.slot is not None
        return max(len(self.req.prompt) - len(self.slot.cached), 0)


# One sampled token's text work: the sequence, the token (None: nothing to print, only the
# ending) and, when the sampling step already knows it ends there, why.
_TextWork = tuple[_Seq, int | None, FinishReason | None]
