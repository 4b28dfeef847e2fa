"""What the HTTP side needs of an engine, wherever the engine runs.

`Engine` (engine.py) runs the engine thread in this process; `RemoteEngine` (remote.py) runs it in
a child process (--engine-process). Both answer the model questions (tokenize, vocabulary,
limits) here, from a model in this process, and check requests the same way before queueing them.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from cria.engine.llama import LlamaModel
from cria.engine.stream import RequestStream
from cria.engine.types import EmbeddingRequest, EmbeddingResult, EngineStats, GenerationRequest
from cria.errors import ContextOverflow, EngineLoading, EngineUnavailable, InvalidRequest


@dataclass(frozen=True, slots=True)
class EngineConfig:
    n_ctx_per_seq: int
    n_slots: int
    n_batch: int
    n_threads: int
    max_queue: int
    prompt_cache_bytes: int = 0  # host memory for evicted prompts' KV state (0: off)
    # Work out each step's text (detokenize, stop strings, hand-off to the event loop) while
    # the next step's llama_decode runs. Worth it only where llama_decode returns before the
    # computation ends (layers offloaded to a GPU); on the CPU it would delay every token by
    # one step.
    overlap_text: bool = False
    adapters: tuple[str, ...] = ()  # the names of the model's LoRA adapters (GenerationRequest.adapter)


class StepObserver(Protocol):
    """Told about every generation step, on the engine thread (keep it cheap: once per step,
    never per token). The metrics object implements it; the engine never imports it."""

    def observe_step(self, seconds: float, n_seqs: int) -> None: ...


class EngineState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DEAD = "dead"


class EngineBase(ABC):
    """The engine's public face. `model` (and `embedding_model`) are set once loaded; in a
    RemoteEngine they hold only the vocabulary."""

    config: EngineConfig
    model: LlamaModel | None
    embedding_model: LlamaModel | None
    embedding_max_tokens: int  # longest input an embedding may have (set once loaded)
    _failure: str | None

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def wait_ready(self, timeout: float | None = None) -> bool: ...

    @abstractmethod
    def stop(self, timeout: float = 10.0) -> None: ...

    @abstractmethod
    def set_observer(self, observer: StepObserver | None) -> None:
        """Call before start()."""

    @property
    @abstractmethod
    def state(self) -> EngineState: ...

    @property
    def failure(self) -> str | None:
        return self._failure

    @abstractmethod
    def submit(self, req: GenerationRequest) -> RequestStream:
        """Queue a request; returns its stream of Deltas. Must be called on the event loop."""

    @abstractmethod
    async def embed(self, req: EmbeddingRequest) -> EmbeddingResult:
        """Embed every input of `req` (checked with check_embedding_input). Must be awaited on
        the event loop; cancelling the await (client gone) drops the inputs not yet computed."""

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def stats(self) -> EngineStats: ...

    def _require_ready(self) -> LlamaModel:
        state = self.state
        if state is EngineState.LOADING:
            if self._failure:  # a dead engine process being started again (remote.py)
                raise EngineLoading(f"the engine is restarting ({self._failure}); retry shortly")
            raise EngineLoading("the model is still loading; retry shortly")
        if state is EngineState.DEAD or self.model is None:
            raise EngineUnavailable(f"the engine is not running: {self._failure or 'stopped'}")
        return self.model

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        """Tokenize text (special tokens such as chat-template markers are parsed)."""
        return self._require_ready().tokenize(text, add_special=add_special, parse_special=True)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._require_ready().detokenize(tokens)

    def check_grammar(self, grammar: str) -> bool:
        """Whether llama.cpp parses this grammar (it reads only the vocabulary)."""
        return self._require_ready().check_grammar(grammar)

    def token_piece(self, token: int) -> bytes:
        model = self._require_ready()
        if not 0 <= token < model.n_vocab:
            raise InvalidRequest(f"token id {token} is outside [0, {model.n_vocab})")
        return model.token_piece(token)

    def fim_tokens(self) -> tuple[int, int, int] | None:
        """(prefix, suffix, middle) fill-in-the-middle tokens, if the model has them."""
        return self._require_ready().fim_tokens()

    @property
    def add_bos(self) -> bool:
        return self._require_ready().add_bos

    @property
    def n_vocab(self) -> int:
        return self._require_ready().n_vocab

    def resolve_max_tokens(self, n_prompt: int, max_tokens: int | None, *, param: str) -> int:
        """max_tokens for a prompt of n_prompt tokens: the request's, or what is left of the
        slot's context. Never truncates: too long is a ContextOverflow."""
        n_ctx = self.config.n_ctx_per_seq
        if max_tokens is None:
            if n_prompt >= n_ctx:
                raise ContextOverflow(
                    f"the prompt has {n_prompt} tokens; this server's context is {n_ctx} tokens",
                    param="messages" if param == "max_completion_tokens" else "prompt",
                )
            return n_ctx - n_prompt
        if n_prompt + max_tokens > n_ctx:
            raise ContextOverflow(
                f"this server's context is {n_ctx} tokens; the request asks for {n_prompt} "
                f"prompt tokens + {max_tokens} completion tokens. Shorten the prompt or lower "
                f"{param}.",
                param=param,
            )
        return max_tokens

    def _check_request(self, req: GenerationRequest) -> None:
        """What submit() refuses before queueing: an empty prompt, one that does not fit the
        slot's context with max_tokens, a token id outside the vocabulary."""
        model = self._require_ready()
        if not req.prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(req.prompt) + req.max_tokens > self.config.n_ctx_per_seq:
            raise ContextOverflow(
                f"prompt ({len(req.prompt)} tokens) + max_tokens ({req.max_tokens}) exceeds the "
                f"context of {self.config.n_ctx_per_seq} tokens",
                param="max_tokens",
            )
        if req.adapter is not None and req.adapter not in self.config.adapters:
            raise InvalidRequest(f"no LoRA adapter is named '{req.adapter}'", param="model")
        n_vocab = model.n_vocab
        if any(t < 0 or t >= n_vocab for t in req.prompt):
            raise InvalidRequest(f"the prompt holds a token id outside [0, {n_vocab})", param="prompt")

    def _require_embedder(self) -> LlamaModel:
        self._require_ready()
        assert self.embedding_model is not None
        return self.embedding_model

    @property
    def embedding_size(self) -> int:
        """Components of an embedding vector (before `dimensions`)."""
        return self._require_embedder().n_embd_out

    def tokenize_for_embedding(self, text: str) -> list[int]:
        """Tokenize with the embedding model's vocabulary, with its special tokens (BOS...)."""
        return self._require_embedder().tokenize(text, add_special=True, parse_special=True)

    def check_embedding_input(self, tokens: Sequence[int], *, param: str) -> None:
        """Raise if `tokens` cannot be embedded: empty, a token id outside the vocabulary, or
        longer than the embedding context (never truncated)."""
        model = self._require_embedder()
        if not tokens:
            raise InvalidRequest(f"{param} is empty", param=param)
        if any(t < 0 or t >= model.n_vocab for t in tokens):
            raise InvalidRequest(f"{param} holds a token id outside [0, {model.n_vocab})", param=param)
        if len(tokens) > self.embedding_max_tokens:
            raise ContextOverflow(
                f"{param} has {len(tokens)} tokens; this server embeds at most "
                f"{self.embedding_max_tokens} tokens per input",
                param=param,
            )
