"""Hand-written GGUF files for the tests (little-endian, version 3), built with struct."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

# GGUF value types
U8, I8, U16, I16, U32, I32, F32, BOOL, STRING, ARRAY, U64, I64, F64 = range(13)

_FMT = {U8: "<B", I8: "<b", U16: "<H", I16: "<h", U32: "<I", I32: "<i", F32: "<f", BOOL: "<?",
        U64: "<Q", I64: "<q", F64: "<d"}


def gguf_string(s: str | bytes) -> bytes:
    data = s.encode("utf-8") if isinstance(s, str) else s
    return struct.pack("<Q", len(data)) + data


def gguf_value(vtype: int, value: Any, item_type: int | None = None) -> bytes:
    if vtype == STRING:
        return gguf_string(value)
    if vtype == ARRAY:
        assert item_type is not None
        items = list(value)
        body = b"".join(gguf_value(item_type, v) for v in items)
        return struct.pack("<IQ", item_type, len(items)) + body
    return struct.pack(_FMT[vtype], value)


def kv(key: str, vtype: int, value: Any, item_type: int | None = None) -> bytes:
    return gguf_string(key) + struct.pack("<I", vtype) + gguf_value(vtype, value, item_type)


def gguf_bytes(
    pairs: Iterable[bytes], *, version: int = 3, n_tensors: int = 0, n_kv: int | None = None
) -> bytes:
    pairs = list(pairs)
    count = len(pairs) if n_kv is None else n_kv
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, count) + b"".join(pairs)


def write_gguf(path: Path, pairs: Iterable[bytes], **kwargs: Any) -> Path:
    path.write_bytes(gguf_bytes(pairs, **kwargs))
    return path


def model_pairs(
    arch: str = "llama",
    *,
    context_length: int | None = 4096,
    chat_template: str | None = "{{ messages }}",
    n_tokens: int = 100,
    bos: int | None = 1,
    eos: int | None = 2,
) -> list[bytes]:
    """The metadata a small model would carry, with a token list longer than 64 entries."""
    pairs = [kv("general.architecture", STRING, arch), kv("general.name", STRING, "tiny")]
    if context_length is not None:
        pairs.append(kv(f"{arch}.context_length", U32, context_length))
    tokens = ["<unk>", "<s>", "</s>", *(f"t{i}" for i in range(3, n_tokens))]
    pairs.append(kv("tokenizer.ggml.tokens", ARRAY, tokens, STRING))
    pairs.append(kv("tokenizer.ggml.scores", ARRAY, [0.0] * n_tokens, F32))
    if bos is not None:
        pairs.append(kv("tokenizer.ggml.bos_token_id", U32, bos))
    if eos is not None:
        pairs.append(kv("tokenizer.ggml.eos_token_id", U32, eos))
    if chat_template is not None:
        pairs.append(kv("tokenizer.chat_template", STRING, chat_template))
    return pairs
