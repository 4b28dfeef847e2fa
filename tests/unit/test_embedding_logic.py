"""Embeddings' pure logic: input packing, pacing against generation, vector finishing, base64."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator

import numpy as np
import pytest

from cria.api.protocol import embedding_list, encode_base64
from cria.engine.scheduler import EmbeddingPacer, pack_inputs
from cria.engine.vectors import finish_vector

# ---- pack_inputs ----


def test_pack_takes_inputs_in_order_within_the_budget() -> None:
    assert pack_inputs([3, 4, 5, 6], budget=12, max_seqs=8) == 3
    assert pack_inputs([3, 4, 5], budget=12, max_seqs=8) == 3
    assert pack_inputs([3, 4, 5], budget=11, max_seqs=8) == 2


def test_pack_never_skips_ahead() -> None:
    # The 9 does not fit; the 1 behind it waits too (arrival order is kept).
    assert pack_inputs([4, 9, 1], budget=10, max_seqs=8) == 1


def test_pack_always_takes_one_input_even_over_budget() -> None:
    assert pack_inputs([50, 1], budget=10, max_seqs=8) == 1
    assert pack_inputs([50], budget=1, max_seqs=1) == 1


def test_pack_respects_the_sequence_limit() -> None:
    assert pack_inputs([1] * 10, budget=100, max_seqs=4) == 4


def test_pack_of_nothing_is_zero() -> None:
    assert pack_inputs([], budget=100, max_seqs=4) == 0


def test_pack_reads_lengths_lazily() -> None:
    def lengths() -> Iterator[int]:
        yield 5
        yield 5
        raise AssertionError("read past the first input that does not fit")

    assert pack_inputs(lengths(), budget=6, max_seqs=8) == 1


# ---- EmbeddingPacer ----


def test_pacer_idle_generation_gets_full_batches() -> None:
    pacer = EmbeddingPacer(n_batch=2048)
    assert pacer.token_budget(is_generating=False) == 2048
    pacer.on_embedding_decode(2048, 1.0)
    assert pacer.token_budget(is_generating=False) == 2048


def test_pacer_waits_for_generation_steps_then_takes_its_share() -> None:
    pacer = EmbeddingPacer(n_batch=2048, share=0.25, every_n_steps=10)
    pacer.on_embedding_decode(1000, 1.0)  # 1 ms per token
    for _ in range(9):
        pacer.on_generation_step(0.01)
        assert pacer.token_budget(is_generating=True) is None
    pacer.on_generation_step(0.01)
    # 10 steps of 10 ms = 100 ms of generation; a 25% share is 100 * 0.25/0.75 = 33 ms.
    assert pacer.token_budget(is_generating=True) == 33
    pacer.on_embedding_decode(33, 0.033)
    assert pacer.token_budget(is_generating=True) is None  # counting starts again


def test_pacer_share_of_time_holds_over_many_steps() -> None:
    pacer = EmbeddingPacer(n_batch=100_000, share=0.2, every_n_steps=5)
    per_token = 0.002
    pacer.on_embedding_decode(100, 100 * per_token)
    gen_s = embed_s = 0.0
    for _ in range(1000):
        pacer.on_generation_step(0.01)
        gen_s += 0.01
        budget = pacer.token_budget(is_generating=True)
        if budget is not None:
            pacer.on_embedding_decode(budget, budget * per_token)
            embed_s += budget * per_token
    assert embed_s / (gen_s + embed_s) == pytest.approx(0.2, abs=0.02)


def test_pacer_credit_does_not_pile_up_while_no_embedding_waits() -> None:
    pacer = EmbeddingPacer(n_batch=100_000, share=0.25, every_n_steps=10)
    pacer.on_embedding_decode(1000, 1.0)  # 1 ms per token
    for _ in range(10_000):  # a long chat before any embedding request came
        pacer.on_generation_step(0.01)
    assert pacer.token_budget(is_generating=True) == 33  # as after just 10 steps


def test_pacer_without_a_measured_speed_takes_one_input() -> None:
    pacer = EmbeddingPacer(n_batch=512, every_n_steps=1)
    pacer.on_generation_step(0.01)
    assert pacer.token_budget(is_generating=True) == 1


def test_pacer_budget_is_capped_by_the_batch() -> None:
    pacer = EmbeddingPacer(n_batch=64, every_n_steps=1)
    pacer.on_embedding_decode(1000, 0.001)
    pacer.on_generation_step(10.0)
    assert pacer.token_budget(is_generating=True) == 64


# ---- finish_vector ----


def test_finish_vector_is_unit_length_float32() -> None:
    raw = np.array([3.0, 4.0, 0.0], dtype=np.float32)
    vec = finish_vector(raw)
    assert vec == pytest.approx((0.6, 0.8, 0.0))
    assert all(float(np.float32(v)) == v for v in vec)  # float32 values, exactly
    assert math.fsum(v * v for v in vec) == pytest.approx(1.0, abs=1e-6)
    assert raw.tolist() == [3.0, 4.0, 0.0]  # input untouched


def test_finish_vector_truncates_then_renormalizes() -> None:
    raw = np.array([1.0, 1.0, 100.0, -7.0], dtype=np.float32)
    vec = finish_vector(raw, 2)
    assert len(vec) == 2
    assert vec == pytest.approx((math.sqrt(0.5), math.sqrt(0.5)))


def test_finish_vector_keeps_a_zero_vector_finite() -> None:
    assert finish_vector(np.zeros(4, dtype=np.float32)) == (0.0, 0.0, 0.0, 0.0)


def test_finish_vector_random_vectors_are_normalized() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        raw = rng.normal(size=576).astype(np.float32) * rng.uniform(0.01, 100)
        vec = np.array(finish_vector(raw, int(rng.integers(1, 577))))
        assert np.linalg.norm(vec) == pytest.approx(1.0, abs=1e-5)


# ---- base64 and the response body ----


def test_base64_is_little_endian_float32() -> None:
    values = [1.0, -2.5, 0.1]
    raw = base64.b64decode(encode_base64(values))
    assert len(raw) == 12
    assert list(struct.unpack("<3f", raw)) == pytest.approx(values)
    assert np.frombuffer(raw, dtype="<f4").tolist() == [float(np.float32(v)) for v in values]


def test_base64_round_trips_float32_values_exactly() -> None:
    vec = finish_vector(np.arange(1, 9, dtype=np.float32))
    decoded = np.frombuffer(base64.b64decode(encode_base64(vec)), dtype="<f4").tolist()
    assert decoded == list(vec)


def test_embedding_list_shape() -> None:
    body = embedding_list("m", [(1.0, 0.0), (0.0, 1.0)], 7, as_base64=False)
    assert body["object"] == "list" and body["model"] == "m"
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert all(d["object"] == "embedding" for d in body["data"])
    assert body["data"][1]["embedding"] == [0.0, 1.0]
    assert body["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    as_b64 = embedding_list("m", [(1.0, 0.0)], 1, as_base64=True)
    assert isinstance(as_b64["data"][0]["embedding"], str)
