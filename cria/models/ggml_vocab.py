"""Vocabularies for GGUFs converted from legacy GGML files (see `cria.models.ggml`).

A GGML `.bin` carries only token texts and (usually) SentencePiece scores: no merges, no token
types, no special-token ids. The exact tokenizer lives in a Hugging Face `tokenizer.json`, which
`read_hf_vocab` reads as plain JSON (no `transformers`), so the converted GGUF tokenizes exactly
like the original model. `legacy_vocab` turns the `.bin`'s own vocabulary into the SentencePiece
("llama") vocabulary the original GGML llama files were made from, as well as it can.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from cria.errors import StartupError
from cria.models.ggml_pre import pre_name

log = logging.getLogger("cria.models")

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (int(t) for t in gguf.TokenType)
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPACE = "\u2581"  # SentencePiece's visible space


@dataclass(frozen=True, slots=True)
class HFVocab:
    """A vocabulary ready to be written into a GGUF: read from a tokenizer folder
    (`read_hf_vocab`) or made from a GGML file's own vocabulary (`legacy_vocab`)."""

    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: tuple[bytes, ...]
    token_types: tuple[int, ...]
    scores: tuple[float, ...] | None = None
    merges: tuple[str, ...] = ()
    pre: str | None = None  # tokenizer.ggml.pre, gpt2 only
    special_ids: dict[str, int] = field(default_factory=dict)  # "bos", "eos", "unk", "pad"
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    source: str = ""  # the tokenizer.json it was read from, for messages

    def digest(self) -> str:
        """A hash of everything written to the GGUF: part of the conversion cache key."""
        h = hashlib.sha256()
        head = [self.model, self.pre, sorted(self.special_ids.items()), self.add_bos,
                self.add_eos, self.add_space_prefix, list(self.token_types), self.scores]
        h.update(json.dumps(head).encode())
        for tok in self.tokens:
            h.update(len(tok).to_bytes(4, "little") + tok)
        h.update("\n".join(self.merges).encode())
        return h.hexdigest()

    def write_to(self, writer: gguf.GGUFWriter, n_vocab: int) -> None:
        """Write the tokenizer keys, padded with unused tokens up to the model's `n_vocab`
        (embedding rows a tokenizer never produces, as convert_hf_to_gguf.py pads them)."""
        n_pad = n_vocab - len(self.tokens)
        if n_pad < 0:
            raise StartupError(
                f"{self.source}: the tokenizer has {len(self.tokens)} tokens but the model has "
                f"n_vocab = {n_vocab}: it belongs to a different model"
            )
        tokens = list(self.tokens) + [f"[PAD{i}]".encode() for i in range(len(self.tokens), n_vocab)]
        types = list(self.token_types) + [UNUSED] * n_pad
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        if self.scores is not None:
            writer.add_token_scores(list(self.scores) + [-1000.0] * n_pad)
        if self.merges:
            writer.add_token_merges(list(self.merges))
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for name, token_id in sorted(self.special_ids.items()):
            adders[name](token_id)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def legacy_vocab(items: Sequence[tuple[bytes, float]]) -> HFVocab:
    """The `.bin`'s vocabulary as a SentencePiece vocabulary, undoing what the GGML-era
    converters (convert-pth-to-ggml.py, convert.py) did to each piece: the unknown piece was
    written as " \u2047 ", control pieces as empty text, byte pieces <0xNN> as the raw byte and
    "\u2581" as a space. Ids 0, 1, 2 are llama's <unk>, <s>, </s>; their texts are only renamed
    when they are one of those legacy forms (another model's names stay as they are)."""
    legacy_names = {0: (b" \xe2\x81\x87 ", b"", b"<unk>"), 1: (b"", b"<s>"), 2: (b"", b"</s>")}
    names = {0: b"<unk>", 1: b"<s>", 2: b"</s>"}
    tokens: list[bytes] = []
    types: list[int] = []
    for i, (text, _score) in enumerate(items):
        if i in names:
            tokens.append(names[i] if text in legacy_names[i] else text)
            types.append(UNKNOWN if i == 0 else CONTROL)
        elif not text:
            tokens.append(f"<ctrl{i}>".encode())  # empty texts are ambiguous in a token list
            types.append(CONTROL)
        elif 3 <= i <= 258 and len(text) == 1 and text[0] == i - 3:
            tokens.append(f"<0x{text[0]:02X}>".encode())
            types.append(BYTE)
        else:
            tokens.append(text.replace(b" ", _SPACE.encode()))
            types.append(NORMAL)
    return HFVocab(
        model="llama",
        tokens=tuple(tokens),
        token_types=tuple(types),
        scores=tuple(score for _text, score in items),
        special_ids={"unk": 0, "bos": 1, "eos": 2},
        source="the GGML file's own vocabulary",
    )


def agreement(vocab: HFVocab, items: Sequence[tuple[bytes, float]]) -> float:
    """The share of the `.bin`'s ordinary tokens whose text equals `vocab`'s token of the same
    id (raw, or in the legacy SentencePiece spelling): far below 1 means a tokenizer folder of a
    different model, whose ids would make the model read nonsense."""
    same = total = 0
    for i, (text, _score) in enumerate(items[: len(vocab.tokens)]):
        if not text or i < 3 or vocab.token_types[i] not in (NORMAL, BYTE):
            continue
        tok = vocab.tokens[i]
        match = _BYTE_TOKEN.fullmatch(tok.decode("utf-8", "replace"))
        spm = bytes([int(match.group(1), 16)]) if match else tok.replace(_SPACE.encode(), b" ")
        total += 1
        same += text in (tok, spm)
    return same / total if total else 1.0


def read_hf_vocab(folder_or_tokenizer_json: Path) -> HFVocab:
    """Read a Hugging Face tokenizer (a folder with tokenizer.json, or that file itself; the
    tokenizer_config.json beside it gives the special tokens and add_bos/add_eos)."""
    path = Path(folder_or_tokenizer_json)
    tj_path = path / "tokenizer.json" if path.is_dir() else path
    tokenizer = _load_json(tj_path, required=True)
    config = _load_json(tj_path.parent / "tokenizer_config.json", required=False)
    special_map = _load_json(tj_path.parent / "special_tokens_map.json", required=False)
    model = tokenizer.get("model")
    if not isinstance(model, dict):
        raise StartupError(f"{tj_path}: no \"model\" object: not a Hugging Face tokenizer.json")
    kind = model.get("type")
    try:
        if kind == "BPE":
            spm = bool(model.get("byte_fallback")) or _has_type(tokenizer.get("pre_tokenizer"),
                                                                "Metaspace")
            vocab = _bpe_spm(tokenizer, tj_path) if spm else _bpe_gpt2(tokenizer, config, tj_path)
        elif kind == "Unigram":
            vocab = _unigram(tokenizer, tj_path)
        else:
            raise StartupError(f"{tj_path}: a {kind} tokenizer cannot be used for a llama GGUF "
                               "(only BPE and Unigram are supported)")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StartupError(f"{tj_path}: malformed tokenizer.json ({exc!r})") from None
    return _with_specials(vocab, tokenizer, config | special_map, tj_path)


def _load_json(path: Path, *, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise StartupError(f"{path}: no such file (a tokenizer folder needs tokenizer.json)")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StartupError(f"{path}: cannot read it as JSON: {exc}") from None
    if not isinstance(data, dict):
        raise StartupError(f"{path}: expected a JSON object")
    return data


def _id_table(tokenizer: dict[str, Any], base: dict[str, int]) -> dict[int, tuple[str, int]]:
    """id -> (text, type) for the model's vocabulary plus the added tokens."""
    table = {int(i): (text, NORMAL) for text, i in base.items()}
    for added in tokenizer.get("added_tokens") or []:
        kind = CONTROL if added.get("special") else USER_DEFINED
        table[int(added["id"])] = (str(added["content"]), kind)
    return table


def _ordered(table: dict[int, tuple[str, int]], path: Path) -> list[tuple[str, int]]:
    """The tokens by id; holes (ids no token has) become unused padding tokens."""
    if not table:
        raise StartupError(f"{path}: the tokenizer has no tokens")
    n = max(table) + 1
    if min(table) < 0 or n > 1 << 24:
        raise StartupError(f"{path}: token ids out of range")
    return [table.get(i, (f"[PAD{i}]", UNUSED)) for i in range(n)]


def _merges(model: dict[str, Any]) -> tuple[str, ...]:
    """Merges as "a b" strings: tokenizers >= 0.20 writes them as [a, b] pairs."""
    return tuple(m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or [])


def _bpe_gpt2(tokenizer: dict[str, Any], config: dict[str, Any], path: Path) -> HFVocab:
    model = tokenizer["model"]
    merges = _merges(model)
    if not merges:
        raise StartupError(f"{path}: a byte-level BPE tokenizer without merges")
    rows = _ordered(_id_table(tokenizer, model["vocab"]), path)
    return HFVocab(
        model="gpt2",
        tokens=tuple(text.encode() for text, _ in rows),
        token_types=tuple(kind for _, kind in rows),
        merges=merges,
        pre=pre_name(tokenizer, config, path),
        add_space_prefix=False,
        source=str(path),
    )


def _spm_type(text: str, kind: int, unk: str | None) -> int:
    if text == unk:
        return UNKNOWN
    if kind == NORMAL and _BYTE_TOKEN.fullmatch(text):
        return BYTE
    return kind


def _bpe_spm(tokenizer: dict[str, Any], path: Path) -> HFVocab:
    """A SentencePiece BPE model saved as tokenizer.json (Llama 1/2, Mistral): llama.cpp's
    SentencePiece tokenizer merges the pair whose result has the highest score, so the score
    of a token is minus the rank of the merge that makes it (earlier merges first)."""
    model = tokenizer["model"]
    merges = _merges(model)
    rank: dict[str, int] = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    rows = _ordered(_id_table(tokenizer, model["vocab"]), path)
    unk = model.get("unk_token")
    types = [_spm_type(text, kind, unk) for text, kind in rows]
    scores = [
        -float(rank.get(text, len(merges) + i)) if kind == NORMAL else 0.0
        for i, ((text, _), kind) in enumerate(zip(rows, types))
    ]
    return HFVocab(
        model="llama",
        tokens=tuple(text.encode() for text, _ in rows),
        token_types=tuple(types),
        scores=tuple(scores),
        add_space_prefix=_space_prefix(tokenizer),
        source=str(path),
    )


def _unigram(tokenizer: dict[str, Any], path: Path) -> HFVocab:
    model = tokenizer["model"]
    pieces = model["vocab"]
    unk_id = model.get("unk_id")
    table = {i: (str(text), NORMAL) for i, (text, _score) in enumerate(pieces)}
    table.update(_id_table(tokenizer, {}))
    rows = _ordered(table, path)
    unk = rows[unk_id][0] if isinstance(unk_id, int) and 0 <= unk_id < len(rows) else None
    scores = [float(pieces[i][1]) if i < len(pieces) else 0.0 for i in range(len(rows))]
    return HFVocab(
        model="llama",
        tokens=tuple(text.encode() for text, _ in rows),
        token_types=tuple(_spm_type(text, kind, unk) for text, kind in rows),
        scores=tuple(scores),
        add_space_prefix=_space_prefix(tokenizer),
        source=str(path),
    )


def _has_type(node: Any, kind: str) -> bool:
    if not isinstance(node, dict):
        return False
    if node.get("type") == kind:
        return True
    return any(_has_type(n, kind) for key in ("pretokenizers", "normalizers")
               for n in node.get(key) or [])


def _space_prefix(tokenizer: dict[str, Any]) -> bool:
    """Whether the tokenizer puts "\u2581" before the text: a Prepend normalizer (Llama 2) or a
    Metaspace pre-tokenizer that prepends (Mistral, newer exports)."""
    pre = tokenizer.get("pre_tokenizer")
    nodes = [pre, *((pre or {}).get("pretokenizers") or [])]
    for node in nodes:
        if isinstance(node, dict) and node.get("type") == "Metaspace":
            scheme = node.get("prepend_scheme", "always" if node.get("add_prefix_space", True)
                              else "never")
            return bool(scheme != "never")
    return _has_type(tokenizer.get("normalizer"), "Prepend")


def _special_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _with_specials(vocab: HFVocab, tokenizer: dict[str, Any], config: dict[str, Any],
                   path: Path) -> HFVocab:
    ids = {text.decode("utf-8", "replace"): i for i, text in enumerate(vocab.tokens)}
    special = dict(vocab.special_ids)
    for name in ("bos", "eos", "unk", "pad"):
        text = _special_text(config.get(f"{name}_token"))
        if text is None and name == "unk" and vocab.model == "llama":
            text = tokenizer["model"].get("unk_token")
        if text is not None and text in ids:
            special[name] = ids[text]
        elif text is not None:
            log.warning("%s: the %s token %r is not in the vocabulary: left out", path, name, text)
    add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
    if add_bos is None and "bos" in special:
        add_bos = _post_processor_adds(tokenizer, vocab.tokens[special["bos"]].decode())
    return HFVocab(
        model=vocab.model, tokens=vocab.tokens, token_types=vocab.token_types,
        scores=vocab.scores, merges=vocab.merges, pre=vocab.pre, special_ids=special,
        add_bos=add_bos if isinstance(add_bos, bool) else None,
        add_eos=add_eos if isinstance(add_eos, bool) else None,
        add_space_prefix=vocab.add_space_prefix, source=vocab.source,
    )


def _post_processor_adds(tokenizer: dict[str, Any], bos: str) -> bool | None:
    """Whether a TemplateProcessing post-processor starts every sequence with `bos`."""
    proc = tokenizer.get("post_processor")
    nodes = [proc, *((proc or {}).get("processors") or [])]
    for node in nodes:
        if isinstance(node, dict) and node.get("type") == "TemplateProcessing":
            first = (node.get("single") or [{}])[0]
            return bool(first.get("SpecialToken", {}).get("id") == bos)
    return None
