"""Embedding vectors: truncation to `dimensions` and L2 normalization (as OpenAI's are)."""

from __future__ import annotations

import numpy as np


def finish_vector(raw: np.ndarray, dimensions: int | None = None) -> tuple[float, ...]:
    """The first `dimensions` components of `raw` (all when None), scaled to unit L2 norm, as
    float32 values. A zero vector stays zero. `raw` is not modified."""
    vec = np.asarray(raw, dtype=np.float32)
    if dimensions is not None:
        vec = vec[:dimensions]
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    out = vec / np.float32(norm) if norm > 0.0 else vec.copy()
    return tuple(out.astype(np.float32).tolist())
