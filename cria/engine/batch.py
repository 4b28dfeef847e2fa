"""Batch: a reusable llama_batch whose arrays are numpy buffers (filled by slice assignment)."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

from cria.engine._bindings import llama_cpp


class Batch:
    """A reusable llama_batch of at most `capacity` tokens, one sequence id per token.

    Its arrays are numpy buffers owned here (not llama_batch_init's), so a prompt chunk or all
    of a step's decode tokens are written with one slice assignment instead of one ctypes call
    per field per token.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._token = np.zeros(capacity, dtype=np.int32)
        self._pos = np.zeros(capacity, dtype=np.int32)
        self._n_seq_id = np.ones(capacity, dtype=np.int32)
        self._seq = np.zeros(capacity, dtype=np.int32)
        self._logits = np.zeros(capacity, dtype=np.int8)
        seq_base = self._seq.ctypes.data
        seq_ptr_t = ctypes.POINTER(llama_cpp.llama_seq_id)
        self._seq_ptrs = (seq_ptr_t * capacity)(
            *(ctypes.cast(seq_base + 4 * i, seq_ptr_t) for i in range(capacity))
        )
        b: Any = llama_cpp.llama_batch()
        b.n_tokens = 0
        b.token = self._token.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token))
        b.embd = ctypes.POINTER(ctypes.c_float)()
        b.pos = self._pos.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
        b.n_seq_id = self._n_seq_id.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(seq_ptr_t))
        b.logits = self._logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self._batch = b
        self.n_tokens = 0
        self.n_outputs = 0  # tokens whose logits are computed; their rows are in batch order

    def clear(self) -> None:
        self.n_tokens = 0
        self.n_outputs = 0

    def add_decodes(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int]) -> int:
        """Append one token per sequence, all with logits. Returns the first output row."""
        i, n = self.n_tokens, len(tokens)
        assert i + n <= self.capacity, "batch overflow"
        self._token[i : i + n] = tokens
        self._pos[i : i + n] = positions
        self._seq[i : i + n] = seqs
        self._logits[i : i + n] = 1
        self.n_tokens = i + n
        row = self.n_outputs
        self.n_outputs += n
        return row

    def add_run(
        self, tokens: Sequence[int], start_pos: int, seq: int, *, logits: str
    ) -> int | None:
        """Append consecutive tokens of one sequence (a prompt chunk) with logits for none of
        them, the last one, or all of them (a prompt whose log-probabilities are asked for).
        Returns the output row of its first token with logits, or None."""
        i, n = self.n_tokens, len(tokens)
        assert i + n <= self.capacity, "batch overflow"
        self._token[i : i + n] = tokens
        self._pos[i : i + n] = np.arange(start_pos, start_pos + n, dtype=np.int32)
        self._seq[i : i + n] = seq
        self._logits[i : i + n] = logits == "all"
        self.n_tokens = i + n
        if logits == "none":
            return None
        if logits == "last":
            self._logits[i + n - 1] = 1
        row = self.n_outputs
        self.n_outputs += n if logits == "all" else 1
        return row

    def add_sequence(self, tokens: Sequence[int], seq: int) -> None:
        """Append a whole sequence from position 0, every token an output (pooled embeddings
        read all of a sequence's hidden states)."""
        i, n = self.n_tokens, len(tokens)
        assert i + n <= self.capacity, "batch overflow"
        self._token[i : i + n] = tokens
        self._pos[i : i + n] = np.arange(n, dtype=np.int32)
        self._seq[i : i + n] = seq
        self._logits[i : i + n] = 1
        self.n_tokens = i + n
        self.n_outputs += n

    def close(self) -> None:
        """Nothing to free in C: the arrays belong to this object."""
