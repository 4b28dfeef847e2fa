"""Shared helpers of the cria.grammar tests: the bundled model's vocabulary and a grammar
sampler driven one token at a time (llama.cpp's own), and `check`."""

from __future__ import annotations

import ctypes
import json
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import llama_cpp
import numpy as np
import pytest

from cria.grammar import (
    json_schema_grammar,
)
from cria.models.spec import bundled_model_path

_TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])


class Vocab:
    """The bundled model's vocabulary and a grammar sampler driven one token at a time."""

    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab
        self.eos = llama_cpp.llama_vocab_eos(vocab)
        self.n_tokens = llama_cpp.llama_vocab_n_tokens(vocab)
        assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (llama_cpp.llama_token * (len(data) + 8))()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, False)
        assert n >= 0
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def sampler(self, grammar: str) -> Any:
        smpl = llama_cpp.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        assert smpl, f"llama.cpp could not parse the grammar:\n{grammar}"
        return smpl

    @staticmethod
    def allowed(smpl: Any, token: int) -> bool:
        data = llama_cpp.llama_token_data(id=token, logit=0.0, p=0.0)
        arr = llama_cpp.llama_token_data_array(
            data=ctypes.pointer(data), size=1, selected=-1, sorted=False
        )
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return bool(data.logit != -math.inf)

    def accepts(self, grammar: str, text: str) -> bool:
        smpl = self.sampler(grammar)
        try:
            for token in self.tokenize(text):
                if not self.allowed(smpl, token):
                    return False
                llama_cpp.llama_sampler_accept(smpl, token)  # only after apply allowed it
            return self.allowed(smpl, self.eos)
        finally:
            llama_cpp.llama_sampler_free(smpl)

    def full_mask(self, smpl: Any) -> tuple[np.ndarray, float]:
        """The grammar applied to the whole vocabulary (disallowed tokens get -inf), and the
        seconds the apply took."""
        cands = np.zeros(self.n_tokens, dtype=_TOKEN_DATA)
        cands["id"] = np.arange(self.n_tokens)
        arr = llama_cpp.llama_token_data_array(
            data=cands.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=self.n_tokens,
            selected=-1,
            sorted=False,
        )
        start = time.perf_counter()
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return cands, time.perf_counter() - start

    def generate(self, grammar: str, rng: random.Random, max_tokens: int = 400) -> str:
        """Random tokens among those the grammar allows, until it allows the end."""
        smpl = self.sampler(grammar)
        out = b""
        try:
            for _ in range(max_tokens):
                cands, _seconds = self.full_mask(smpl)
                allowed = cands["id"][np.isfinite(cands["logit"])]
                if self.eos in allowed:
                    return out.decode()
                token = int(rng.choice(list(allowed)))
                llama_cpp.llama_sampler_accept(smpl, token)
                out += self.piece(token)
        finally:
            llama_cpp.llama_sampler_free(smpl)
        raise AssertionError(f"no end after {max_tokens} tokens: {out!r}")


@pytest.fixture(scope="module")
def lm() -> Iterator[Vocab]:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(bundled_model_path()).encode(), params)
    assert model
    yield Vocab(llama_cpp.llama_model_get_vocab(model))
    llama_cpp.llama_model_free(model)


def check(lm: Vocab, schema: Any, good: list[Any], bad: list[str], *, escaped: bool = True) -> str:
    """`good`: values the grammar must accept, serialized compactly and pretty, with raw
    non-ASCII characters and (if `escaped`) with \\u escapes; `bad`: texts it must reject.
    Returns the grammar."""
    grammar = json_schema_grammar(schema)
    for value in good:
        texts = [
            json.dumps(value, ensure_ascii=False),
            json.dumps(value, ensure_ascii=False, indent=2),
            json.dumps(value, ensure_ascii=False, separators=(",", ":")),
        ]
        for text in texts + ([json.dumps(value)] if escaped else []):
            assert lm.accepts(grammar, text), f"rejected {text!r}\n{grammar}"
    for text in bad:
        assert not lm.accepts(grammar, text), f"accepted {text!r}\n{grammar}"
    return grammar


PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["name", "tags"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
    "required": ["city"],
    "additionalProperties": False,
}
