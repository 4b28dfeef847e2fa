"""What crosses the HTTP <-> engine seam: small frozen dataclasses, no pydantic, no dicts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path


class FinishReason(str, enum.Enum):
    STOP = "stop"  # end-of-generation token or a stop string
    LENGTH = "length"  # max_tokens reached, or the slot's context is full


@dataclass(frozen=True, slots=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # 1 = off
    penalty_last_n: int = 64
    seed: int | None = None  # None = a random seed
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias added to its logit)
    grammar: str | None = None  # GBNF (root rule "root") every sampled token must follow
    # With a trigger (literal text), the output is free until the trigger appears; the grammar
    # applies from the trigger's first character on.
    grammar_trigger: str | None = None

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing that edits the logits: one numpy argmax does it."""
        return (
            self.is_greedy and not self.has_penalties and not self.logit_bias and self.grammar is None
        )

    @property
    def is_greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repeat_penalty != 1.0
        )


@dataclass(frozen=True, slots=True)
class AdapterFile:
    """What the engine needs to load an adapter (picklable: it crosses to the engine process)."""

    name: str  # the model id that selects it
    path: Path  # a GGUF LoRA, checked in Python before llama.cpp reads it (models/lora.py)
    scale: float = 1.0


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate. `max_tokens` is already resolved against the slot's context."""

    id: str
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    # (open, close) markers: the output also stops (finish_reason stop) right after a block
    # from open to close that repeats an earlier one (the same tool call written again).
    stop_at_repeated_block: tuple[str, str] | None = None
    ignore_eos: bool = False
    # Log-probabilities of each sampled token and of its `logprobs` most likely alternatives
    # (None: not computed at all; 0: the sampled token's only).
    logprobs: int | None = None
    prompt_logprobs: bool = False  # also each prompt token's (disables prefix reuse)
    # Requests of one group share a prompt (OpenAI's `n`): the first one admitted prefills it,
    # the others wait for that and copy its KV cache instead of computing it again.
    group: str | None = None
    adapter: str | None = None  # the LoRA adapter to generate with (None: the base model)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the slot's KV cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Timings:
    """`time.perf_counter()` instants of one request's life, taken by the engine (the HTTP
    layer turns them into latency metrics). `n_sampled` counts every sampled token, an
    end-of-generation token included."""

    submitted: float
    admitted: float
    first_token: float
    finished: float  # when the engine completed it (just after its last sample)
    n_sampled: int
    slot: int | None = None  # the slot (llama.cpp sequence) that served it

    @property
    def queue_s(self) -> float:
        return self.admitted - self.submitted

    @property
    def prefill_s(self) -> float:
        return self.first_token - self.admitted

    @property
    def ttft_s(self) -> float:
        return self.first_token - self.submitted

    @property
    def e2e_s(self) -> float:
        return self.finished - self.submitted

    @property
    def inter_token_s(self) -> float | None:
        """Mean time between two sampled tokens of this request; None below two tokens."""
        if self.n_sampled < 2:
            return None
        return (self.finished - self.first_token) / (self.n_sampled - 1)


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token with its log-probability under the model (before any sampling setting), and
    the most likely tokens at its position as (token, bytes, logprob), most likely first."""

    token: int
    piece: bytes
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """New output of one request. The last Delta has `finish_reason`, `usage` and `timings`
    set."""

    text: str
    n_tokens: int
    finish_reason: FinishReason | None = None  # None while running
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token of n_tokens, when asked for
    # With prompt_logprobs, the first Delta has one entry per prompt token (None for the first).
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    """Inputs to embed, each already tokenized and checked against the embedding context."""

    id: str
    inputs: tuple[tuple[int, ...], ...]
    dimensions: int | None = None  # keep the first `dimensions` components (then re-normalize)

    @property
    def n_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.inputs)


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """One L2-normalized vector per input, in input order."""

    vectors: tuple[tuple[float, ...], ...]
    n_prompt_tokens: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    n_steps: int
    max_seqs_per_step: int  # most sequences decoded together in one llama_decode
    n_running: int
    n_waiting: int
    n_slots: int
    python_us_per_step: float = 0.0  # engine time outside llama_decode and sampling, per step
    python_us_per_seq: float = 0.0  # ... per sequence per step
    python_share: float = 0.0  # ... as a share of the step
    step_seconds: float = 0.0  # totals since start, for rates over any interval: steps' time,
    python_seconds: float = 0.0  # ... the engine's Python time in them,
    n_seq_steps: int = 0  # ... and sequences summed over steps
    n_embedding_jobs: int = 0  # embedding requests queued or in progress
    n_embedding_decodes: int = 0
    max_inputs_per_embedding_decode: int = 0  # evidence of batching across requests
    n_slots_free: int = 0
    n_kv_used_cells: int = 0  # tokens held in the slots' KV streams (idle slots keep theirs)
    n_kv_total_cells: int = 0  # slots x context size
    n_prompt_cache_entries: int = 0  # evicted prompts' KV states kept in host memory
    prompt_cache_bytes: int = 0  # ... and their size (at most --prompt-cache-mib)
    n_engine_restarts: int = 0  # times a dead engine process was started again (--engine-process)
    n_adapter_switches: int = 0  # times the steps' LoRA adapter set changed
    max_adapter_wait_steps: int = 0  # the most steps an adapter set with work waited for its turn
