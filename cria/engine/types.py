"""What crosses the HTTP <-> engine seam: small frozen dataclasses, no pydantic, no dicts."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
class GenerationRequest:
    """One sequence to generate. `max_tokens` is already resolved against the slot's context."""

    id: str
    prompt: tuple[int, ...]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens reused from the slot's KV cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Delta:
    """New output of one request. The last Delta has `finish_reason` and `usage` set."""

    text: str
    n_tokens: int
    finish_reason: FinishReason | None = None  # None while running
    usage: Usage | None = None


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
    n_embedding_jobs: int = 0  # embedding requests queued or in progress
    n_embedding_decodes: int = 0
    max_inputs_per_embedding_decode: int = 0  # evidence of batching across requests
