"""The only module that imports `llama_cpp`: thin classes over its low-level C API.

No ctypes pointer leaves this module. Everything here except `LlamaModel.tokenize`,
`token_piece` and `detokenize` (read-only vocabulary look-ups) runs on the engine thread.
"""

from __future__ import annotations

import ctypes
import enum
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cria.engine._bindings import llama_cpp
from cria.engine.batch import Batch
from cria.engine.lora import AdapterLoadError, AdapterSwitch, LoraAdapter
from cria.engine.sampling import SamplerStep
from cria.engine.types import AdapterFile

log = logging.getLogger("cria.llama")

# ggml_log_level: NONE=0, DEBUG=1, INFO=2, WARN=3, ERROR=4, CONT=5 (continues the last line).
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


class _LogRouter:
    """Routes llama.cpp's log lines into Python logging. The C callback object must stay
    referenced for as long as llama.cpp may call it, so the router keeps it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffer = ""
        self._level = logging.DEBUG
        self.callback = llama_cpp.llama_log_callback(self._on_log)

    def _on_log(self, level: int, text: bytes | None, _user_data: object) -> None:
        piece = (text or b"").decode("utf-8", errors="replace")
        with self._lock:
            if level != 5:
                self._level = _LEVELS.get(level, logging.DEBUG)
            self._buffer += piece
            if "\n" not in self._buffer:
                return
            *lines, self._buffer = self._buffer.split("\n")
            level_now = self._level
        for line in lines:
            if line.strip():
                log.log(level_now, "%s", line.rstrip())


_router: _LogRouter | None = None


def init_backend() -> None:
    """Initialise llama.cpp once per process and route its logs."""
    global _router  # the one process-wide C callback; kept alive here on purpose
    if _router is None:
        _router = _LogRouter()
        llama_cpp.llama_log_set(_router.callback, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()


def supports_gpu_offload() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def library_version() -> str:
    return str(getattr(llama_cpp, "__version__", None) or "unknown")


class LlamaError(RuntimeError):
    pass


class ExternalTokenizer(Protocol):
    """A tokenizer that stands in for the GGUF's own (-v/-r; cria.models.tokenizer): its ids
    are the model's, checked to fit its vocabulary before loading."""

    n_vocab: int
    bos: int | None
    add_bos: bool
    eog_ids: frozenset[int]

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_piece(self, token: int) -> bytes: ...


class LlamaModel:
    def __init__(
        self,
        path: Path,
        *,
        n_gpu_layers: int,
        use_mmap: bool,
        vocab_only: bool = False,
        tokenizer: ExternalTokenizer | None = None,
        adapters: Sequence[AdapterFile] = (),
    ) -> None:
        """`vocab_only`: metadata and vocabulary, no weights (tokenizing beside an engine that
        runs in another process). `tokenizer`: tokenize, detokenize and tell end-of-generation
        tokens with it instead of the GGUF's vocabulary. `adapters`: LoRA adapters to load (not
        with `vocab_only`), each selected per request by its name."""
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.vocab_only = vocab_only
        no_devices = (ctypes.c_void_p * 1)()  # NULL-terminated and empty
        if vocab_only:
            # No device at all: llama.cpp would otherwise query every GPU (creating a CUDA
            # context, hundreds of MiB of GPU memory) before it notices there is nothing to load.
            params.devices = ctypes.cast(no_devices, ctypes.c_void_p)
        # llama.h's load_mode (this version has no use_mmap): MMAP = 1, NONE = 0 (read).
        params.load_mode = 1 if use_mmap else 0
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise LlamaError(f"llama.cpp could not load {path}")
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self.n_ctx_train = int(llama_cpp.llama_model_n_ctx_train(model))
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        bos = int(llama_cpp.llama_vocab_bos(self._vocab))
        self.bos: int | None = bos if 0 <= bos < self.n_vocab else None
        self._pieces: dict[int, bytes] = {}
        self._eog = [bool(llama_cpp.llama_vocab_is_eog(self._vocab, t)) for t in range(self.n_vocab)]
        self._tokenizer = tokenizer
        self.adapters: list[LoraAdapter] = []
        if not vocab_only:
            try:
                self.adapters = [LoraAdapter(model, a) for a in adapters]
            except AdapterLoadError as exc:
                llama_cpp.llama_model_free(model)
                raise LlamaError(str(exc)) from None
        if tokenizer is not None:
            self.add_bos, self.bos = tokenizer.add_bos, tokenizer.bos
            self._eog = [t in tokenizer.eog_ids for t in range(self.n_vocab)]
        self.n_embd_out = int(llama_cpp.llama_model_n_embd_out(model))
        self.architecture = self.meta("general.architecture") or ""

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text, or None if the model has no such key."""
        buf = ctypes.create_string_buffer(256)
        n = int(llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, 256))
        if n < 0:
            return None
        if n >= 256:
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self._model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    @property
    def declared_pooling(self) -> Pooling | None:
        """The pooling the GGUF declares (`<arch>.pooling_type`), if it is one that yields one
        vector per sequence; None for generative models, which declare none."""
        raw = self.meta(f"{self.architecture}.pooling_type")
        try:
            return Pooling(int(raw)) if raw is not None else None
        except ValueError:  # NONE (per-token) or RANK (a reranker's score): not a vector
            return None

    @property
    def ptr(self) -> Any:
        return self._model

    @property
    def vocab(self) -> Any:
        return self._vocab

    def check_grammar(self, grammar: str) -> bool:
        """Whether llama.cpp parses `grammar` (read-only: safe off the engine thread)."""
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode(), b"root")
        if not sampler:
            return False
        llama_cpp.llama_sampler_free(sampler)
        return True

    def fim_tokens(self) -> tuple[int, int, int] | None:
        """The fill-in-the-middle tokens (prefix, suffix, middle), if the model has them."""
        ids = (
            int(llama_cpp.llama_vocab_fim_pre(self._vocab)),
            int(llama_cpp.llama_vocab_fim_suf(self._vocab)),
            int(llama_cpp.llama_vocab_fim_mid(self._vocab)),
        )
        return ids if all(0 <= t < self.n_vocab for t in ids) else None

    def is_eog(self, token: int) -> bool:
        return self._eog[token]

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        if self._tokenizer is not None:
            return self._tokenizer.tokenize(text, add_special=add_special, parse_special=parse_special)
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (llama_cpp.llama_token * n_max)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            n_max = -n
            buf = (llama_cpp.llama_token * n_max)()
            n = llama_cpp.llama_tokenize(
                self._vocab, data, len(data), buf, n_max, add_special, parse_special
            )
        if n < 0:
            raise LlamaError("tokenization failed")
        return list(buf[:n])

    def token_piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as empty)."""
        piece = self._pieces.get(token)
        if piece is None and self._tokenizer is not None:
            piece = self._pieces[token] = self._tokenizer.token_piece(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
            piece = buf.raw[: max(n, 0)]
            self._pieces[token] = piece
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_piece(t) for t in tokens).decode("utf-8", errors="replace")

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None


class Pooling(enum.Enum):
    """How an embedding context turns a sequence's hidden states into one vector (llama.cpp's
    llama_pooling_type values)."""

    MEAN = llama_cpp.LLAMA_POOLING_TYPE_MEAN
    CLS = llama_cpp.LLAMA_POOLING_TYPE_CLS
    LAST = llama_cpp.LLAMA_POOLING_TYPE_LAST


class DecodeResult(enum.Enum):
    OK = 0
    NO_KV_SLOT = 1  # recoverable: the batch did not fit the KV cache
    ABORTED = 2
    FAILED = 3  # an error inside llama.cpp


def _decode(ctx: Any, batch: Batch) -> DecodeResult:
    b = batch._batch  # Batch is this module's
    b.n_tokens = batch.n_tokens
    ret = int(llama_cpp.llama_decode(ctx, b))
    if ret == 0:
        return DecodeResult.OK
    if ret == 1:
        return DecodeResult.NO_KV_SLOT
    if ret == 2:
        return DecodeResult.ABORTED
    log.error("llama_decode returned %d", ret)
    return DecodeResult.FAILED


_U8_P = ctypes.POINTER(ctypes.c_uint8)


class LlamaContext:
    """One llama_context with `n_seq` sequences of `n_ctx_per_seq` tokens each."""

    def __init__(
        self, model: LlamaModel, *, n_ctx_per_seq: int, n_seq: int, n_batch: int, n_threads: int
    ) -> None:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx_per_seq * n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        # One KV stream per sequence (as llama.cpp's server): each slot owns n_ctx_per_seq cells
        # and attention reads only its own stream (~20% faster decode at 8 streams here than a
        # unified cache). The price: llama.cpp splits a batch into ubatches of *consecutive*
        # sequence ids with equal token counts, so the engine orders decode tokens by slot id
        # and packs busy slots at low ids (see scheduler.py and slots.py).
        params.kv_unified = False
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise LlamaError("llama.cpp could not create a context (out of memory?)")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)
        self._model_adapters = model.adapters
        self._adapter = AdapterSwitch(ctx)
        self.n_ctx_per_seq = n_ctx_per_seq

        self.n_outputs = 0

    @property
    def ptr(self) -> Any:
        return self._ctx

    def decode(self, batch: Batch) -> DecodeResult:
        self.n_outputs = batch.n_outputs
        return _decode(self._ctx, batch)

    def logits(self, n_outputs: int, n_vocab: int) -> np.ndarray:
        """The last decode's logits: a (n_outputs, n_vocab) view, rows in batch order. Valid
        until the next decode."""
        ptr = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_outputs, n_vocab))

    @property
    def adapter(self) -> str | None:
        """The LoRA adapter the next decode runs with (None: the base model)."""
        return self._adapter.current

    @property
    def n_adapter_switches(self) -> int:
        return self._adapter.n_switches

    def use_adapter(self, name: str | None) -> None:
        """Decode with this LoRA adapter from now on (a no-op if it is the current one)."""
        self._adapter.use(name, self._model_adapters)

    def seq_copy_prefix(self, src: int, dst: int, n_tokens: int) -> bool:
        """Make `dst` hold the first n_tokens of `src`. Across KV streams llama.cpp copies only
        whole streams (the copy runs at the next decode), so the tail is dropped after. False
        when it cannot be (memories that cannot drop part of a sequence): `dst` then holds all
        of `src`."""
        llama_cpp.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        return self.seq_rm(dst, n_tokens)

    def seq_state_save(self, seq: int) -> np.ndarray:
        """The KV state of one sequence, as a uint8 array (for the host-memory prompt cache).

        llama.cpp writes straight into the array: one pass over fresh memory, where a ctypes
        buffer copied into bytes made two (the page faults of fresh memory are most of the
        cost: a few MB per few hundred tokens, paid while every stream waits for the step)."""
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, seq))
        buf = np.empty(size, dtype=np.uint8)
        n = int(llama_cpp.llama_state_seq_get_data(self._ctx, buf.ctypes.data_as(_U8_P), size, seq))
        if n != size:  # llama.cpp writes all of it or nothing
            raise LlamaError(f"llama.cpp saved {n} of {size} bytes of sequence {seq}'s state")
        return buf

    def seq_state_load(self, seq: int, state: np.ndarray) -> bool:
        """Restore a state saved by seq_state_save into sequence `seq` (read in place)."""
        n = len(state)
        return int(llama_cpp.llama_state_seq_set_data(self._ctx, state.ctypes.data_as(_U8_P), n, seq)) > 0

    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        """Drop positions [p0, p1) of a sequence (p1 = -1: to the end)."""
        return bool(llama_cpp.llama_memory_seq_rm(self._mem, seq, p0, p1))

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


class EmbeddingContext:
    """A llama_context with embeddings on: each sequence of a decode is pooled into one vector.

    The model's own pooling when its GGUF declares one, else mean pooling (generative models).
    One unified KV buffer of `n_tokens` cells, cleared before every decode: a decode's
    sequences are independent inputs, all starting at position 0. n_ubatch = n_batch, so a
    whole decode is one ubatch and the pooling sees every input whole (llama.cpp pools per
    ubatch; a split input would get the vector of its last part).
    """

    def __init__(self, model: LlamaModel, *, n_tokens: int, n_seq: int, n_threads: int) -> None:
        self.pooling = model.declared_pooling or Pooling.MEAN
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_tokens
        params.n_batch = n_tokens
        params.n_ubatch = n_tokens
        params.n_seq_max = n_seq
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        params.embeddings = True
        params.pooling_type = self.pooling.value
        # Unified: all sequences in one ubatch (separate streams split a batch per sequence).
        params.kv_unified = True
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not ctx:
            raise LlamaError("llama.cpp could not create the embedding context (out of memory?)")
        self._ctx = ctx
        self._mem = llama_cpp.llama_get_memory(ctx)  # NULL for models without a KV cache (BERT)
        self.n_embd = model.n_embd_out

    def decode(self, batch: Batch) -> DecodeResult:
        """Decode `batch` (sequences added with Batch.add_sequence) from an empty cache."""
        if self._mem:
            llama_cpp.llama_memory_clear(self._mem, False)
        return _decode(self._ctx, batch)

    def pooled(self, seq: int) -> np.ndarray:
        """Sequence `seq`'s vector from the last decode (a view, valid until the next one)."""
        ptr = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
        if not ptr:
            raise LlamaError(f"llama.cpp has no pooled embedding for sequence {seq}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_embd,))

    def close(self) -> None:
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


class SamplerChain:
    """A llama.cpp sampler chain built from a recipe; sampling runs in C."""

    def __init__(self, recipe: Sequence[SamplerStep], *, model: LlamaModel) -> None:
        params = llama_cpp.llama_sampler_chain_default_params()
        params.no_perf = True
        self._chain = llama_cpp.llama_sampler_chain_init(params)
        try:
            for step in recipe:
                llama_cpp.llama_sampler_chain_add(self._chain, self._build(step, model.n_vocab))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _build(step: SamplerStep, n_vocab: int) -> Any:
        a: Any = step.args
        if step.kind == "greedy":
            return llama_cpp.llama_sampler_init_greedy()
        if step.kind == "dist":
            return llama_cpp.llama_sampler_init_dist(int(a[0]))
        if step.kind == "temp":
            return llama_cpp.llama_sampler_init_temp(float(a[0]))
        if step.kind == "top_k":
            return llama_cpp.llama_sampler_init_top_k(int(a[0]))
        if step.kind == "top_p":
            return llama_cpp.llama_sampler_init_top_p(float(a[0]), int(a[1]))
        if step.kind == "min_p":
            return llama_cpp.llama_sampler_init_min_p(float(a[0]), int(a[1]))
        if step.kind == "logit_bias":
            n = len(a) // 2
            arr = (llama_cpp.llama_logit_bias * n)()
            for i in range(n):
                arr[i].token = int(a[2 * i])
                arr[i].bias = float(a[2 * i + 1])
            return llama_cpp.llama_sampler_init_logit_bias(n_vocab, n, arr)
        if step.kind == "penalties":
            return llama_cpp.llama_sampler_init_penalties(
                n_vocab, int(a[0]), float(a[1]), float(a[2]), float(a[3])
            )
        raise ValueError(f"unknown sampler step {step.kind!r}")

    @property
    def ptr(self) -> Any:
        return self._chain

    def sample(self, ctx: LlamaContext, row: int) -> int:
        """Sample (and accept) a token from output row `row` of the last decode (llama.cpp
        reads a negative index as counting outputs from the end)."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx.ptr, row - ctx.n_outputs))

    def close(self) -> None:
        if self._chain:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
