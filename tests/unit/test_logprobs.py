"""Log-probabilities (pure numpy) and their OpenAI shapes."""

from __future__ import annotations

import math

import numpy as np

from cria.api.protocol import CompletionLogprobs, chat_logprobs
from cria.engine.logprobs import log_softmax, top_tokens
from cria.engine.types import TokenLogprob


def test_log_softmax_rows_are_normalized() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 1000)).astype(np.float32) * 10
    lp = log_softmax(logits)
    assert lp.shape == logits.shape and lp.dtype == np.float32
    assert np.allclose(np.exp(lp).sum(axis=1), 1.0, atol=1e-4)
    assert np.all(lp <= 0)
    assert np.allclose(log_softmax(logits + 1000.0), lp, atol=1e-3)  # shift-invariant


def test_log_softmax_does_not_modify_its_input() -> None:
    logits = np.array([[1.0, 2.0, 3.0]], dtype=np.float32)
    log_softmax(logits)
    assert logits.tolist() == [[1.0, 2.0, 3.0]]


def test_top_tokens_sorted_with_ties_by_id() -> None:
    row = np.log(np.array([0.1, 0.3, 0.3, 0.2, 0.1], dtype=np.float32))
    assert [t for t, _ in top_tokens(row, 3)] == [1, 2, 3]
    assert top_tokens(row, 0) == []
    assert len(top_tokens(row, 99)) == 5
    assert math.isclose(top_tokens(row, 1)[0][1], math.log(0.3), rel_tol=1e-6)


def _entry(piece: bytes, lp: float, top: tuple[tuple[int, bytes, float], ...] = ()) -> TokenLogprob:
    return TokenLogprob(token=0, piece=piece, logprob=lp, top=top)


def test_chat_logprobs_shape() -> None:
    out = chat_logprobs([_entry("é".encode(), -0.5, ((1, b"a", -0.5), (2, b"\xff", -1.0)))])
    assert out == [{
        "token": "é", "logprob": -0.5, "bytes": [0xC3, 0xA9],
        "top_logprobs": [
            {"token": "a", "logprob": -0.5, "bytes": [97]},
            {"token": "\ufffd", "logprob": -1.0, "bytes": [255]},  # a partial character
        ],
    }]


def test_completion_logprobs_offsets_continue_across_chunks() -> None:
    builder = CompletionLogprobs()
    first = builder.build([None, _entry(b"lo", -1.0, ((5, b"lo", -1.0),))], first_piece=b"Hel")
    assert first["tokens"] == ["Hel", "lo"]
    assert first["token_logprobs"] == [None, -1.0]
    assert first["top_logprobs"] == [None, {"lo": -1.0}]
    assert first["text_offset"] == [0, 3]
    second = builder.build([_entry(b" world", -2.0, ((6, b" world", -2.0),))])
    assert second["text_offset"] == [5]


def test_completion_top_logprobs_always_hold_the_sampled_token() -> None:
    """OpenAI's spec types each top_logprobs entry as an object: with logprobs=0 it is the
    sampled token alone, and a sampled token outside the top n is added to them."""
    assert CompletionLogprobs().build([_entry(b"a", -3.0)])["top_logprobs"] == [{"a": -3.0}]
    out = CompletionLogprobs().build([_entry(b"a", -3.0, ((7, b"b", -0.1),))])
    assert out["top_logprobs"] == [{"b": -0.1, "a": -3.0}]
