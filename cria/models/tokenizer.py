"""An external Hugging Face tokenizer (`-v` / `-r`) that stands in for a GGUF's own.

The engine delegates tokenize / token_piece / detokenize / is_eog / bos / add_bos to it, so each
must mean exactly what llama.cpp's calls mean for the same vocabulary: `tokenize` takes the
`add_special` / `parse_special` flags of llama_tokenize, and `token_piece` gives the bytes of
llama_token_to_piece(special=False), which streamed detokenization and stop strings are built on.
It is built on the `tokenizers` library (Rust) and is immutable once made, so the HTTP side may
tokenize on the event loop while the engine thread detokenizes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from cria.errors import StartupError
from cria.models.tokenizer_source import (
    TokenizerSource,
    hub_cache_dir,
    hub_offline,
    resolve_tokenizer,
)

log = logging.getLogger("cria.models")

__all__ = [
    "ExternalTokenizer",
    "TokenizerSource",
    "check_compatible",
    "hub_cache_dir",
    "hub_offline",
    "resolve_tokenizer",
]

# Token texts llama.cpp's vocabulary loader makes end-of-generation (llama-vocab.cpp: the EOT and
# EOG lists and the FIM pad/repo/separator tokens, which it adds to the EOG set too).
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",  # DeepSeek's fullwidth bars
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]",
    "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>",
    "<|file_sep|>",
})

_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, inverted (what byte-level BPE
    vocabularies are written in; llama.cpp's unicode_utf8_to_byte)."""
    printable = [
        *range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)
    ]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = _gpt2_byte_decoder()


def _json_file(path: Path, origin: str) -> tuple[str, dict[str, Any]]:
    """A JSON object file's text and value, or StartupError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise StartupError(f"{origin}: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise StartupError(f"{origin}: {path} is not a JSON object")
    return text, data


def _read_json(path: Path | None, origin: str) -> dict[str, Any]:
    return {} if path is None else _json_file(path, origin)[1]


def _component_types(node: Any) -> set[str]:
    """The `type` of a tokenizer.json component and of all it nests (Sequence decoders...)."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _component_types(value)
    elif isinstance(node, list):
        for item in node:
            found |= _component_types(item)
    return found


def _piece_style(spec: dict[str, Any]) -> str:
    """How token text maps to bytes: "byte_level" (GPT-2 byte map), "spm" ('▁' for space and
    <0xNN> byte tokens), "wordpiece" (## continues a word) or "raw" (the text itself)."""
    decoder = _component_types(spec.get("decoder"))
    if "ByteLevel" in decoder:
        return "byte_level"
    if decoder & {"Metaspace", "ByteFallback"} or "▁" in json.dumps(spec.get("decoder")):
        return "spm"
    if "WordPiece" in decoder:
        return "wordpiece"
    if not decoder and "ByteLevel" in _component_types(spec.get("pre_tokenizer")):
        return "byte_level"
    if not decoder and "Metaspace" in _component_types(spec.get("pre_tokenizer")):
        return "spm"
    return "raw"


def _piece(text: str, style: str, prefix: str) -> bytes:
    if style == "byte_level":
        try:
            return bytes(_BYTE_DECODER[c] for c in text)
        except KeyError:  # not a byte-level token after all: its text as it is
            return text.encode("utf-8")
    if style == "spm":
        byte = _BYTE_TOKEN.fullmatch(text)
        if byte is not None:
            return bytes([int(byte.group(1), 16)])
        return text.replace("▁", " ").encode("utf-8")
    if style == "wordpiece":
        return (text[len(prefix):] if text.startswith(prefix) else " " + text).encode("utf-8")
    return text.encode("utf-8")


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes CONTROL though the tokenizer does not mark them
    special (convert_hf_to_gguf's does_token_look_special)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))  # fullwidth bars
        or (text.startswith("<unused") and text.endswith(">"))
    )


def _mark_control(spec: dict[str, Any]) -> bool:
    """Mark the added tokens that look special as special, as llama.cpp's GGUFs have them:
    then parse_special=False splits their text too, and they render as nothing. Returns
    whether it changed any."""
    changed = False
    for token in spec.get("added_tokens") or []:
        if isinstance(token, dict) and not token.get("special"):
            if _looks_special(str(token.get("content", ""))):
                token["special"] = changed = True
    return changed


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: text, or an AddedToken object."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _int_ids(value: Any) -> list[int]:
    """config.json / generation_config.json token ids: one int or a list of them."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class ExternalTokenizer:
    """A tokenizer.json (with its tokenizer_config.json, config.json, generation_config.json)
    answering as llama.cpp's vocabulary calls do."""

    n_vocab: int  # highest id + 1 (what the model's vocabulary must hold)
    bos: int | None
    eos: int | None
    add_bos: bool  # add_special adds BOS (and EOS where add_eos)
    add_eos: bool
    bos_text: str  # "" when there is none
    eos_text: str
    eog_ids: frozenset[int]  # EOS and the end-of-turn tokens: generation stops at them
    special_ids: frozenset[int]  # control and unknown tokens: their pieces are empty
    chat_template: str | None

    def __init__(self, source: TokenizerSource) -> None:
        self.source = source
        origin = source.origin
        path = source.tokenizer_json
        raw, spec = _json_file(path, origin)
        try:
            text = json.dumps(spec) if _mark_control(spec) else raw
            self._tok = Tokenizer.from_str(text)
            # parse_special=False: special tokens' text is split as plain text. A second
            # instance rather than toggling the flag per call, which would race between threads.
            self._tok_plain = Tokenizer.from_str(text)
            self._tok_plain.encode_special_tokens = True
        except Exception as exc:  # tokenizers raises a bare Exception for a bad file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise StartupError(f"{origin}: {path} is not a tokenizer.json: {first}") from None
        config = _read_json(source.tokenizer_config, origin)
        special_map = _read_json(source.special_tokens_map, origin)
        model_config = _read_json(source.config_json, origin)
        generation = _read_json(source.generation_config, origin)

        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.n_vocab = max(vocab.values(), default=-1) + 1
        added = self._tok.get_added_tokens_decoder()
        special = {i for i, token in added.items() if token.special}
        model: dict[str, Any] = spec["model"] if isinstance(spec.get("model"), dict) else {}
        unk = model.get("unk_token")
        unk_id = vocab.get(unk) if isinstance(unk, str) else model.get("unk_id")
        if isinstance(unk_id, int) and 0 <= unk_id < self.n_vocab:
            special.add(unk_id)  # llama.cpp renders UNKNOWN like CONTROL: as nothing
        self.special_ids = frozenset(special)

        style = _piece_style(spec)
        prefix = str(model.get("continuing_subword_prefix") or "##")
        pieces: list[bytes] = []
        for i in range(self.n_vocab):
            token = self._tok.id_to_token(i)
            if token is None or i in special:
                pieces.append(b"")
            elif i in added:  # user-defined: its text verbatim, as llama.cpp gives it
                pieces.append(added[i].content.encode("utf-8"))
            else:
                pieces.append(_piece(token, style, prefix))
        self._pieces: tuple[bytes, ...] = tuple(pieces)

        self.bos = self._special_id("bos", config, special_map, model_config, generation)
        self.eos = self._special_id("eos", config, special_map, model_config, generation)
        self.add_bos, self.add_eos = self._adds(config)
        self.bos_text = self._text(self.bos)
        self.eos_text = self._text(self.eos)
        self.eog_ids = self._eog(vocab, model_config, generation)
        self.chat_template = self._chat_template(config, source)

    # -- construction helpers -------------------------------------------------------------

    def _in_vocab(self, token: int | None) -> int | None:
        return token if token is not None and 0 <= token < self.n_vocab else None

    def _special_id(self, kind: str, *configs: dict[str, Any]) -> int | None:
        """From tokenizer_config.json / special_tokens_map.json by text, else config.json /
        generation_config.json by id (the first, where it is a list)."""
        tok_config, special_map, model_config, generation = configs
        for source in (tok_config, special_map):
            text = _token_text(source.get(f"{kind}_token"))
            if text is not None and (found := self._tok.token_to_id(text)) is not None:
                return self._in_vocab(found)
        for source in (model_config, generation):
            ids = [i for i in _int_ids(source.get(f"{kind}_token_id")) if self._in_vocab(i) is not None]
            if ids:
                return ids[0]
        return None

    def _adds(self, config: dict[str, Any]) -> tuple[bool, bool]:
        """Whether add_special adds BOS / EOS: tokenizer_config.json's add_bos_token and
        add_eos_token where they are set (transformers rebuilds the post-processor from them),
        else what the tokenizer.json post-processor does to a probe text."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        lead: list[int] = []
        trail: list[int] = []
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                lead, trail = full[:start], full[start + len(plain) :]
                break
        # A post-processor's lone leading / trailing token names BOS / EOS when nothing else does.
        if self.bos is None and len(lead) == 1:
            self.bos = self._in_vocab(lead[0])
        if self.eos is None and len(trail) == 1:
            self.eos = self._in_vocab(trail[0])
        add_bos = config.get("add_bos_token")
        add_eos = config.get("add_eos_token")
        if not isinstance(add_bos, bool):
            add_bos = self.bos is not None and lead == [self.bos]
        if not isinstance(add_eos, bool):
            add_eos = self.eos is not None and trail == [self.eos]
        return add_bos and self.bos is not None, add_eos and self.eos is not None

    def _text(self, token: int | None) -> str:
        if token is None:
            return ""
        return self._tok.id_to_token(token) or ""

    def _eog(
        self, vocab: dict[str, int], model_config: dict[str, Any], generation: dict[str, Any]
    ) -> frozenset[int]:
        ids = {vocab[text] for text in EOG_TEXTS if text in vocab}
        # llama.cpp's exceptions: gpt-oss's <|end|> only separates messages, and where a
        # <|tool_response>/<|plamo:eos|> marker exists </s> is an ordinary token.
        if {"<|return|>", "<|call|>", "<|end|>"} <= vocab.keys() or {
            "<|calls|>", "<|flush|>", "<|end|>"
        } <= vocab.keys():
            ids.discard(vocab["<|end|>"])
        if "</s>" in vocab and vocab.keys() & {"<|tool_response>", "<|plamo:eos|>"}:
            ids.discard(vocab["</s>"])
        for source in (generation, model_config):
            ids.update(_int_ids(source.get("eos_token_id")))
        if self.eos is not None:
            ids.add(self.eos)
        return frozenset(i for i in ids if 0 <= i < self.n_vocab)

    @staticmethod
    def _chat_template(config: dict[str, Any], source: TokenizerSource) -> str | None:
        """tokenizer_config.json's chat_template (a list of named ones: "default"), else a
        chat_template.jinja / chat_template.json beside it."""
        template: Any = config.get("chat_template")
        if template is None and source.chat_template_file is not None:
            path = source.chat_template_file
            try:
                raw = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise StartupError(f"{source.origin}: cannot read {path}: {exc}") from None
            if path.suffix == ".json":
                template = _read_json(path, source.origin).get("chat_template")
            else:
                template = raw
        if isinstance(template, list):
            named = {
                t.get("name"): t.get("template") for t in template if isinstance(t, dict)
            }
            template = named.get("default")
        return template if isinstance(template, str) and template else None

    # -- the vocabulary calls the engine delegates -----------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """llama_tokenize's meaning: `add_special` adds BOS (and EOS) where this tokenizer
        does; `parse_special` turns special tokens' text into their ids, else it is text."""
        tok = self._tok if parse_special else self._tok_plain
        ids: list[int] = tok.encode(text, add_special_tokens=False).ids
        if add_special:
            if self.add_bos and self.bos is not None:
                ids.insert(0, self.bos)
            if self.add_eos and self.eos is not None:
                ids.append(self.eos)
        return ids

    def token_piece(self, token: int) -> bytes:
        """The bytes of one token, as llama_token_to_piece(special=False) gives them: special
        and control tokens render as nothing; an id outside the vocabulary too."""
        return self._pieces[token] if 0 <= token < self.n_vocab else b""

    def detokenize(self, tokens: Iterable[int]) -> str:
        return b"".join(self.token_piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token in self.eog_ids

    def token_text(self, token: int) -> str | None:
        """The vocabulary entry itself (e.g. "<|im_end|>", "Ġhello"), for messages."""
        return self._tok.id_to_token(token)

    def token_ids(self, texts: Sequence[str]) -> list[int | None]:
        return [self._tok.token_to_id(t) for t in texts]


# The share of the model's token texts a replacement tokenizer must spell the same, id by id.
MIN_AGREEMENT = 0.9


def check_compatible(
    tok: ExternalTokenizer, n_vocab_model: int, origin: str, model_tokens: Sequence[str] = ()
) -> None:
    """The tokenizer must be the model's own vocabulary (with other rules, a fixed template...):
    a larger one would let the model emit ids it cannot embed, and one whose ids spell other
    texts than the GGUF's (`model_tokens`) makes the model read nonsense. A smaller one is
    allowed with a warning: the ids it lacks decode to nothing."""
    if tok.n_vocab > n_vocab_model:
        raise StartupError(
            f"{origin}: the tokenizer has {tok.n_vocab} tokens but the model's vocabulary has "
            f"{n_vocab_model}: they do not belong together"
        )
    if model_tokens:
        n = min(len(model_tokens), tok.n_vocab)
        compared = [i for i in range(n) if i not in tok.special_ids]
        same = sum(1 for i in compared if tok.token_text(i) == model_tokens[i])
        if compared and same < MIN_AGREEMENT * len(compared):
            raise StartupError(
                f"{origin}: this tokenizer does not match the model's vocabulary (only {same} of "
                f"{len(compared)} token texts agree, id by id): it belongs to another model"
            )
    if tok.n_vocab < n_vocab_model:
        log.warning(
            "%s: the tokenizer has %d tokens, the model %d: the %d ids beyond it decode to "
            "nothing", origin, tok.n_vocab, n_vocab_model, n_vocab_model - tok.n_vocab,
        )
