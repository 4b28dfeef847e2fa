"""Test helper: a Hugging Face tokenizer folder and hub cache made from a GGUF's own vocabulary.

The tests must not download anything, yet `-v FOLDER` and `-r org/name` need real Hugging Face
files. These are rebuilt from the GGUF (the bundled model's vocabulary, merges, token types and
template) with the `tokenizers` library itself, so they tokenize exactly as llama.cpp does with
the GGUF; `hf_cache_layout` then lays such a folder out as huggingface_hub's cache would.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from cria.models.gguf import read_metadata

# gguf's token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# GGUF value types: byte sizes of the scalars; 8 = string, 9 = array.
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9

# The split regexes of llama.cpp's llama3 and qwen2 pre-tokenizers (llama-vocab.cpp).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str) -> tuple[Any, bool]:
    """The HF pre-tokenizer for llama.cpp's `tokenizer.ggml.pre` (see llama-vocab.cpp), and
    whether the BPE model ignores merges for whole-word vocabulary hits (llama3 does)."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("smollm", "codeshell", "exaone", "minerva"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in ("gpt-2", "default", "phi-2", "jina-es", "jina-de"):
        return byte_level, False
    if pre in ("llama3", "llama-bpe", "qwen2"):
        regex = _LLAMA3_REGEX if pre != "qwen2" else _QWEN2_REGEX
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)
        no_regex = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
        return pre_tokenizers.Sequence([split, no_regex]), pre != "qwen2"
    raise NotImplementedError(f"no Hugging Face pre-tokenizer written for tokenizer.ggml.pre={pre!r}")


class _Fields:
    """The GGUF's metadata by key (cria's own reader: 20x faster than gguf.GGUFReader, which
    decodes every tensor record too) and whether it has an output tensor (else it is tied)."""

    def __init__(self, path: Path) -> None:
        self._meta = read_metadata(path, keep_arrays=lambda key: key.startswith("tokenizer."))
        self.has_output = "output.weight" in _tensor_names(path)

    def get(self, key: str, default: Any = None) -> Any:
        return self._meta.get(key, default)

    def strings(self, key: str) -> list[str]:
        return [str(s) for s in self._meta[key]]


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype in _SCALAR_SIZES:
        f.seek(_SCALAR_SIZES[vtype], 1)
    elif vtype == _STRING:
        f.seek(struct.unpack("<Q", f.read(8))[0], 1)
    elif vtype == _ARRAY:
        itype, count = struct.unpack("<IQ", f.read(12))
        if itype in _SCALAR_SIZES:
            f.seek(_SCALAR_SIZES[itype] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, itype)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")


def _tensor_names(path: Path) -> set[str]:
    """The names in the GGUF's tensor records (after the key/value section)."""
    with path.open("rb") as f:
        _magic, _version, n_tensors, n_kv = struct.unpack("<4sIQQ", f.read(24))
        for _ in range(n_kv):
            f.seek(struct.unpack("<Q", f.read(8))[0], 1)  # the key
            _skip_value(f, struct.unpack("<I", f.read(4))[0])
        names = set()
        for _ in range(n_tensors):
            names.add(f.read(struct.unpack("<Q", f.read(8))[0]).decode("utf-8"))
            n_dims = struct.unpack("<I", f.read(4))[0]
            f.seek(8 * n_dims + 4 + 8, 1)  # dims, type, offset
        return names


def _f32(value: float) -> float:
    """A float32 GGUF value as its shortest decimal (9.999999747378752e-06 -> 1e-05)."""
    return float(str(np.float32(value)))


def _tokenizer(meta: _Fields) -> tuple[Tokenizer, list[str], list[int]]:
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(f"only gpt2-style BPE GGUFs are supported here, not {model!r}")
    tokens = meta.strings("tokenizer.ggml.tokens")
    types = [int(t) for t in meta.get("tokenizer.ggml.token_type")]
    merges: list[tuple[str, str]] = []
    for merge in meta.strings("tokenizer.ggml.merges"):
        left, right = merge.split(" ", 1)
        merges.append((left, right))
    pre_tokenizer, ignore_merges = _pre_tokenizer(str(meta.get("tokenizer.ggml.pre", "default")))
    vocab = {text: i for i, text in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                     ignore_merges=ignore_merges)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    # Control tokens are the special ones; user-defined ones are matched in text but not special.
    added = [
        AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
        for i in range(len(tokens))
        if types[i] in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens([a for a in added if a.special])
    tok.add_tokens([a for a in added if not a.special])
    for a in added:  # already in the vocabulary: adding them must keep their ids
        assert tok.token_to_id(a.content) == vocab[a.content], a.content
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A {tokens[bos]} $B",
            special_tokens=[(tokens[bos], int(bos))],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok, tokens, types


def _special(meta: _Fields, tokens: list[str], key: str) -> tuple[int | None, str | None]:
    tid = meta.get(f"tokenizer.ggml.{key}_token_id")
    if tid is None or not 0 <= int(tid) < len(tokens):
        return None, None
    return int(tid), tokens[int(tid)]


def write_tokenizer_folder(
    gguf_path: Path, out: Path, *, with_config: bool = True, chat_template: str | None = "from-gguf"
) -> Path:
    """Write tokenizer.json, tokenizer_config.json and (with `with_config`) config.json for the
    GGUF's vocabulary into `out`, a Hugging Face model folder; returns `out`.

    `chat_template`: "from-gguf" copies the GGUF's template, None writes none, else that text.
    """
    meta = _Fields(gguf_path)
    tok, tokens, types = _tokenizer(meta)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    bos_id, bos_text = _special(meta, tokens, "bos")
    eos_id, eos_text = _special(meta, tokens, "eos")
    _unk_id, unk_text = _special(meta, tokens, "unknown")
    _pad_id, pad_text = _special(meta, tokens, "padding")
    arch = str(meta.get("general.architecture"))
    n_ctx = meta.get(f"{arch}.context_length")
    config: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": types[i] == _CONTROL}
            for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)
        },
        "additional_special_tokens": [
            tokens[i] for i in range(len(tokens)) if types[i] == _CONTROL
            and tokens[i] not in (bos_text, eos_text, unk_text, pad_text)
        ],
        "bos_token": bos_text,
        "eos_token": eos_text,
        "unk_token": unk_text,
        "pad_token": pad_text,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(n_ctx) if n_ctx is not None else None,
        "tokenizer_class": "GPT2Tokenizer",
    }
    template = meta.get("tokenizer.chat_template") if chat_template == "from-gguf" else chat_template
    if template is not None:
        config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    if with_config:
        def hp(name: str) -> Any:
            value = meta.get(f"{arch}.{name}")
            if value is None:
                raise ValueError(f"{gguf_path}: no {arch}.{name} in the GGUF")
            return value

        n_head = int(hp("attention.head_count"))
        hparams = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": int(hp("embedding_length")),
            "intermediate_size": int(hp("feed_forward_length")),
            "num_attention_heads": n_head,
            "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
            "num_hidden_layers": int(hp("block_count")),
            "head_dim": int(meta.get(f"{arch}.rope.dimension_count",
                                     int(hp("embedding_length")) // n_head)),
            "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            "rms_norm_eps": _f32(hp("attention.layer_norm_rms_epsilon")),
            "max_position_embeddings": int(hp("context_length")),
            "vocab_size": int(meta.get(f"{arch}.vocab_size", len(tokens))),
            "tie_word_embeddings": not meta.has_output,
            "hidden_act": "silu",
            "bos_token_id": bos_id,
            "eos_token_id": eos_id,
            "torch_dtype": "bfloat16",
        }
        (out / "config.json").write_text(json.dumps(hparams, indent=2) + "\n")
    return out


def _git_blob_sha1(data: bytes) -> str:
    """The id git (and so the Hub) gives a file: huggingface_hub names non-LFS blobs by it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def hf_cache_layout(
    cache_root: Path, repo_id: str, folder: Path, revision_hash: str = "0" * 40
) -> Path:
    """Lay the files of `folder` out in `cache_root` as huggingface_hub's cache holds a download
    of model `repo_id` at commit `revision_hash` (main): models--org--name/refs/main, blobs/<id>,
    snapshots/<hash>/<file> as relative symlinks to the blobs, trees/<hash>.json (the listing
    that lets an offline snapshot_download tell the snapshot is complete). Returns the snapshot
    folder. With HF_HUB_CACHE=cache_root and HF_HUB_OFFLINE=1, `-r repo_id` then resolves."""
    repo_dir = cache_root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / revision_hash
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "blobs").mkdir(exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(revision_hash)  # no newline, as huggingface_hub writes
    files: dict[str, Any] = {}
    for src in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = src.relative_to(folder)
        data = src.read_bytes()
        blob_id = _git_blob_sha1(data)
        (repo_dir / "blobs" / blob_id).write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(repo_dir / "blobs" / blob_id, link.parent))
        files[rel.as_posix()] = {"size": len(data), "blob_id": blob_id}
    trees = repo_dir / "trees"
    trees.mkdir(exist_ok=True)
    (trees / f"{revision_hash}.json").write_text(
        json.dumps({"format_version": 1, "files": files}, indent=1)
    )
    return snapshot
