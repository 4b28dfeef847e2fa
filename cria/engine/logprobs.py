"""Log-probabilities from a decode's logits, with numpy. Computed only for requests that ask."""

from __future__ import annotations

import numpy as np


def log_softmax(rows: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of a (n, vocab) array of logits (a new float32 array)."""
    x = rows.astype(np.float32, copy=True)
    x -= x.max(axis=-1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return x


def top_tokens(logprobs: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely tokens of one row as (token, logprob), most likely first (ties by
    lower token id, so the order is deterministic)."""
    if k <= 0:
        return []
    k = min(k, logprobs.shape[-1])
    candidates = np.argpartition(-logprobs, k - 1)[:k]
    order = sorted(candidates.tolist(), key=lambda t: (-float(logprobs[t]), t))
    return [(t, float(logprobs[t])) for t in order]
