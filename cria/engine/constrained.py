"""Grammar-constrained sampling: a llama.cpp sampler chain plus a grammar (see
`ConstrainedSampler`), kept apart from the model and context wrappers in `cria.engine.llama`."""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np

from cria.engine._bindings import llama_cpp
from cria.engine.llama import LlamaContext, LlamaError, LlamaModel, SamplerChain
from cria.engine.sampling import SamplerStep


def _grammar_sampler(vocab: Any, grammar: str) -> Any:
    """llama.cpp's grammar sampler (root rule "root")."""
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), b"root")
    if not sampler:
        raise LlamaError("llama.cpp could not parse the grammar")
    return sampler


_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class _Candidates:
    """A llama_token_data_array over a numpy buffer of `capacity` candidates."""

    def __init__(self, capacity: int) -> None:
        assert _TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)
        self.data = np.zeros(capacity, dtype=_TOKEN_DATA)
        self.ids = np.arange(capacity, dtype=np.int32)
        self.array = llama_cpp.llama_token_data_array(
            self.data.ctypes.data_as(llama_cpp.llama_token_data_p), capacity, -1, False
        )
        self.ref = ctypes.byref(self.array)

    def fill(self, logits: np.ndarray) -> None:
        """Every token, with these logits."""
        self.data["id"] = self.ids
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.array.size = len(self.data)
        self.array.selected = -1
        self.array.sorted = False

    def one(self, token: int) -> None:
        """Just `token` (for a grammar check)."""
        self.data[0] = (token, 0.0, 0.0)
        self.array.size = 1
        self.array.selected = -1
        self.array.sorted = False

    @property
    def selected(self) -> int:
        return int(self.data["id"][self.array.selected])


class ConstrainedSampler:
    """A sampler chain plus a grammar, as llama.cpp's own server samples: draw from the chain
    first and keep the token if the grammar allows it (one check); only otherwise apply the
    grammar to the whole vocabulary and draw again. Checking every candidate costs tens of
    milliseconds per token on a 49k vocabulary; most tokens pass the cheap check.
    Greedy outputs are exactly the grammar-constrained argmax.

    With a `trigger` (literal text), the output is free until the trigger appears; the grammar
    then applies from the trigger's first character on. This is done here rather than with
    llama.cpp's lazy grammar: a token that completes the trigger may carry text the grammar
    refuses (llama.cpp then throws a C++ exception through ctypes and the process aborts), and
    its trigger regex is searched over the whole output at every token. Here such a token is
    refused and another drawn, and the search looks at the last piece only.
    """

    MAX_REDRAWS = 16  # tokens refused in a row at a trigger before giving up on the call
    # Greedy: when the argmax is refused, the next most likely tokens are checked one by one (a
    # check costs tens of microseconds) before a pass over the whole vocabulary (tens of ms).
    GREEDY_TRIES = 32

    def __init__(
        self, recipe: Sequence[SamplerStep], *, model: LlamaModel, grammar: str, trigger: str | None
    ) -> None:
        self._model = model
        self._source = grammar
        self._chain = SamplerChain(recipe, model=model)
        # The chain ends with greedy and its other steps only edit logits in place (bias,
        # penalties): after it runs, the candidates hold the final logits, in token order.
        self._greedy = bool(recipe) and recipe[-1].kind == "greedy" and all(
            step.kind in ("logit_bias", "penalties") for step in recipe[:-1]
        )
        self._grammar: Any = None
        try:
            if trigger is None:
                self._grammar = _grammar_sampler(model.vocab, grammar)
            else:
                _grammar_sampler_free(_grammar_sampler(model.vocab, grammar))  # parses?
        except BaseException:
            self._chain.close()
            raise
        self._trigger = trigger.encode() if trigger is not None else b""
        self._recent = b""  # the output's last bytes, while waiting for the trigger
        self._pending = b""  # an incomplete UTF-8 character at the end of the constrained output
        self._all = _Candidates(model.n_vocab)
        self._check = _Candidates(1)

    def _utf8_ok(self, token: int) -> bool:
        """The token keeps the constrained output valid UTF-8. llama.cpp's grammar reads bytes
        leniently (an overlong or surrogate sequence counts as one character), while the text
        is decoded strictly (each bad byte becomes U+FFFD): such a token could take a string
        past its maxLength or outside its pattern. Nor may the output end mid-character."""
        piece = self._model.token_piece(token)
        if not self._pending:
            return piece.isascii() or _utf8_tail(piece) is not None
        if not piece:
            return not self._model.is_eog(token)
        return _utf8_tail(self._pending + piece) is not None

    def _ok(self, token: int) -> bool:
        """The grammar (once started) allows `token`, and it keeps the output valid UTF-8."""
        return self._utf8_ok(token) and self._allows(self._grammar, token)

    def _accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._grammar, token)
        piece = self._model.token_piece(token)
        if self._pending or not piece.isascii():
            self._pending = _utf8_tail(self._pending + piece) or b""

    def _full_pass(self, values: np.ndarray) -> int:
        """The chain's token after the grammar masks the whole vocabulary (and tokens that would
        break UTF-8 are excluded, a few at most)."""
        cur, banned = self._all, list[int]()
        while True:
            cur.fill(values)
            if banned:
                cur.data["logit"][banned] = -np.inf
            llama_cpp.llama_sampler_apply(self._grammar, cur.ref)
            llama_cpp.llama_sampler_apply(self._chain.ptr, cur.ref)
            token = cur.selected
            if self._utf8_ok(token) or len(banned) >= self.MAX_REDRAWS:
                return token
            banned.append(token)

    def _allows(self, grammar: Any, token: int) -> bool:
        check = self._check
        check.one(token)
        llama_cpp.llama_sampler_apply(grammar, check.ref)
        return bool(np.isfinite(check.data["logit"][0]))

    def _start_at(self, tail: bytes) -> bool:
        """Start the grammar on `tail` (the output from the trigger on), if it allows it."""
        try:
            text = tail.decode("utf-8")
        except UnicodeDecodeError:
            return False
        grammar = _grammar_sampler(self._model.vocab, self._source)
        for token in self._model.tokenize(text, add_special=False, parse_special=False):
            if not self._allows(grammar, token):
                _grammar_sampler_free(grammar)
                return False
            llama_cpp.llama_sampler_accept(grammar, token)
        self._grammar = grammar
        return True

    def sample(self, ctx: LlamaContext, row: int) -> int:
        logits = llama_cpp.llama_get_logits_ith(ctx.ptr, row - ctx.n_outputs)
        values = np.ctypeslib.as_array(logits, shape=(len(self._all.data),))
        cur, chain = self._all, self._chain.ptr
        cur.fill(values)
        llama_cpp.llama_sampler_apply(chain, cur.ref)
        token = cur.selected
        if self._grammar is None:
            token = self._free_token(values, token)
        elif not self._ok(token):
            allowed = self._greedy_allowed(token) if self._greedy else None
            token = allowed if allowed is not None else self._full_pass(values)
            self._accept(token)
        else:
            self._accept(token)
        llama_cpp.llama_sampler_accept(chain, token)
        return token

    def _greedy_allowed(self, refused: int) -> int | None:
        """The grammar-allowed argmax of the chain's logits (in `self._all`), if it is among the
        GREEDY_TRIES most likely tokens: exactly what a pass of the grammar over the vocabulary
        and then greedy would pick (ties go to the lower id, as llama.cpp's greedy). None: not
        there; the caller makes the full pass."""
        logits = self._all.data["logit"]
        k = min(self.GREEDY_TRIES, len(logits) - 1)
        if k <= 0:
            return None
        top = np.argpartition(-logits, k)[: k + 1]
        # Candidates strictly above the (k+1)-th largest logit: no token outside `top` ties them.
        floor = float(logits[top].min())
        top = top[logits[top] > floor]
        for token in top[np.lexsort((top, -logits[top]))].tolist():
            if token == refused:
                continue
            if not np.isfinite(logits[token]):
                return None
            if self._ok(token):
                return int(token)
        return None

    def _free_token(self, values: np.ndarray, token: int) -> int:
        """Before the trigger: `token`, unless it completes the trigger with text after it that
        the grammar refuses; then other tokens are drawn (the refused ones excluded)."""
        trigger, banned = self._trigger, list[int]()
        while True:
            text = self._recent + self._model.token_piece(token)
            at = text.find(trigger)
            if at >= 0 and self._start_at(text[at:]):
                return token
            if at < 0 or len(banned) >= self.MAX_REDRAWS:
                # Free text (after too many refusals, a malformed tag stays text too).
                self._recent = text[len(text) - len(trigger) + 1 :] if len(trigger) > 1 else b""
                return token
            banned.append(token)
            cur = self._all
            cur.fill(values)
            cur.data["logit"][banned] = -np.inf
            llama_cpp.llama_sampler_apply(self._chain.ptr, cur.ref)
            token = cur.selected

    def close(self) -> None:
        self._chain.close()
        if self._grammar is not None:
            _grammar_sampler_free(self._grammar)
            self._grammar = None


def _utf8_tail(data: bytes) -> bytes | None:
    """The incomplete character at the end of `data` (b"" if none), or None if `data` is not
    valid UTF-8 so far (overlong forms and surrogates are invalid, as Python decodes)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    try:
        decoder.decode(data, final=False)
    except UnicodeDecodeError:
        return None
    return decoder.getstate()[0]


def _grammar_sampler_free(sampler: Any) -> None:
    llama_cpp.llama_sampler_free(sampler)
