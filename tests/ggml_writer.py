"""Legacy GGML model files made from a llama GGUF, for the tests of `cria.models.ggml`.

`write_ggjt` is the reverse of the converter, written independently of it (its own name table,
its own header writer), so that a round trip GGUF -> GGML -> GGUF tests the converter against
the original file rather than against itself. `write_tiny_gguf` makes a small random llama
GGUF with the tensor type a test needs (F32, F16, Q8_0...), and `write_hf_config` the
config.json that carries a GGUF's exact hyperparameters.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

MAGIC = {"ggml": 0x67676D6C, "ggmf": 0x67676D66, "ggjt": 0x67676A74}
# GGUF name -> GGML name (llama.cpp's convert-pth-to-ggml.py names).
_GLOBAL = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight",
           "output.weight": "output.weight"}
_LAYER = {
    "attn_q": "attention.wq", "attn_k": "attention.wk", "attn_v": "attention.wv",
    "attn_output": "attention.wo", "attn_norm": "attention_norm", "ffn_norm": "ffn_norm",
    "ffn_gate": "feed_forward.w1", "ffn_down": "feed_forward.w2", "ffn_up": "feed_forward.w3",
}
_TT = gguf.TokenType


def ggml_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    blk, layer, part, suffix = gguf_name.split(".")
    assert blk == "blk" and suffix == "weight", gguf_name
    return f"layers.{layer}.{_LAYER[part]}.weight"


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: gguf.GGMLQuantizationType
    ne: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
    """A GGUF's metadata (strings as str, undecodable bytes kept by surrogateescape) and its
    tensor directory. Much faster than gguf.GGUFReader, which takes seconds per 50k-token
    vocabulary: the tests read several files."""
    with open(path, "rb") as f:

        def unpack(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(unpack("<Q")).decode("utf-8", "surrogateescape")

        def value(vtype: int) -> Any:
            if vtype == 8:
                return string()
            if vtype == 9:
                itype, count = unpack("<I"), unpack("<Q")
                if itype in _SCALAR:
                    fmt = _SCALAR[itype]
                    return list(struct.unpack(f"<{count}{fmt[1]}", f.read(count * struct.calcsize(fmt))))
                return [value(itype) for _ in range(count)]
            return unpack(_SCALAR[vtype])

        assert f.read(4) == b"GGUF"
        _version, n_tensors, n_kv = unpack("<I"), unpack("<Q"), unpack("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            ne = tuple(unpack("<Q") for _ in range(unpack("<I")))
            infos.append((name, gguf.GGMLQuantizationType(unpack("<I")), ne, unpack("<Q")))
        align = int(meta.get("general.alignment", 32))
        start = f.tell() + (-f.tell() % align)
    tensors = {}
    for name, ttype, ne, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[ttype]
        nbytes = int(np.prod(ne)) // block * size
        tensors[name] = GGUFTensor(name, ttype, ne, start + offset, nbytes)
    return meta, tensors


def gguf_facts(gguf_path: Path) -> dict[str, Any]:
    """The hyperparameters of a llama GGUF, under the names tests compare."""
    meta, tensors = read_gguf(gguf_path)
    assert meta["general.architecture"] == "llama"
    n_embd = int(meta["llama.embedding_length"])
    n_head = int(meta["llama.attention.head_count"])
    return {
        "n_vocab": len(meta["tokenizer.ggml.tokens"]),
        "n_embd": n_embd,
        "n_head": n_head,
        "n_head_kv": int(meta.get("llama.attention.head_count_kv", n_head)),
        "n_layer": int(meta["llama.block_count"]),
        "n_ff": int(meta["llama.feed_forward_length"]),
        "n_rot": int(meta.get("llama.rope.dimension_count", n_embd // n_head)),
        "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)),
        "eps": float(meta["llama.attention.layer_norm_rms_epsilon"]),
        "context_length": int(meta["llama.context_length"]),
        "ftype": int(meta.get("general.file_type", 0)),
        "tied": "output.weight" not in tensors,
    }


def _n_mult(n_embd: int, n_ff: int) -> int:
    """An n_mult that llama.cpp's GGML loader turns back into n_ff (cosmetic: the converter
    reads n_ff from a tensor shape)."""
    for n_mult in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if ((2 * (4 * n_embd) // 3 + n_mult - 1) // n_mult) * n_mult == n_ff:
            return n_mult
    return 256


def _legacy_token(text: bytes, token_type: int) -> bytes:
    """A SentencePiece piece as the GGML-era converters wrote it."""
    if token_type == _TT.UNKNOWN:
        return " \u2047 ".encode()
    if token_type == _TT.CONTROL:
        return b""
    if token_type == _TT.BYTE:
        return bytes([int(text[3:5], 16)])
    return text.replace("\u2581".encode(), b" ")


def write_ggjt(gguf_path: Path, out: Path, *, version: int = 3, magic: str = "ggjt") -> dict[str, Any]:
    """Write the llama GGUF `gguf_path` as a GGML file: magic "ggjt" (version 1-3), "ggmf"
    (version 1) or "ggml" (unversioned, no scores). Tensor bytes are copied as they are, whatever
    the format could hold, so tests can check that the converter refuses old layouts. Returns
    gguf_facts plus n_mult, the format and the tensors' GGML names, types and shapes."""
    facts = gguf_facts(gguf_path)
    meta, gtensors = read_gguf(gguf_path)
    tokens = [t.encode("utf-8", "surrogateescape") for t in meta["tokenizer.ggml.tokens"]]
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [int(_TT.NORMAL)] * len(tokens)
    if meta.get("tokenizer.ggml.model") == "llama":
        tokens = [_legacy_token(t, k) for t, k in zip(tokens, types)]
    facts["n_mult"] = _n_mult(facts["n_embd"], facts["n_ff"])
    facts["format"] = magic if magic == "ggml" else f"{magic} v{version}"
    facts["tensors"] = {}
    raw = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    with open(out, "wb") as f:
        f.write(struct.pack("<I", MAGIC[magic]))
        if magic != "ggml":
            f.write(struct.pack("<I", version))
        hp = [facts["n_vocab"], facts["n_embd"], facts["n_mult"], facts["n_head"],
              facts["n_layer"], facts["n_rot"], facts["ftype"]]
        f.write(struct.pack("<7i", *hp))
        for text, score in zip(tokens, scores):
            f.write(struct.pack("<I", len(text)) + text)
            if magic != "ggml":
                f.write(struct.pack("<f", score))
        for t in gtensors.values():
            name = ggml_name(t.name).encode()
            f.write(struct.pack(f"<3i{len(t.ne)}i", len(t.ne), len(name), int(t.type), *t.ne))
            f.write(name)
            if magic == "ggjt":
                f.write(b"\0" * (-f.tell() % 32))
            f.write(raw[t.offset : t.offset + t.nbytes].tobytes())
            facts["tensors"][name.decode()] = (t.type, t.ne)
    return facts


def write_hf_config(folder: Path, gguf_path: Path) -> Path:
    """A Hugging Face config.json with the GGUF's exact hyperparameters."""
    facts = gguf_facts(gguf_path)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": facts["n_embd"],
        "intermediate_size": facts["n_ff"],
        "num_attention_heads": facts["n_head"],
        "num_key_value_heads": facts["n_head_kv"],
        "num_hidden_layers": facts["n_layer"],
        "rms_norm_eps": facts["eps"],
        "rope_theta": facts["rope_theta"],
        "max_position_embeddings": facts["context_length"],
        "vocab_size": facts["n_vocab"],
        "tie_word_embeddings": facts["tied"],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def write_tiny_gguf(path: Path, ttype: gguf.GGMLQuantizationType, *, seed: int = 0,
                    n_embd: int = 64, n_head: int = 4, n_head_kv: int = 2, n_layer: int = 2,
                    n_ff: int = 128) -> Path:
    """A small random llama GGUF whose matrices are `ttype` (norms F32) and whose vocabulary
    is SentencePiece-like: <unk> <s> </s>, the 256 byte tokens, then 64 pieces. k-quants need
    n_embd and n_ff multiples of 256."""
    rng = np.random.default_rng(seed)
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [f"\u2581w{i}" for i in range(64)]
    n_vocab = len(pieces)
    types = [_TT.UNKNOWN, _TT.CONTROL, _TT.CONTROL] + [_TT.BYTE] * 256 + [_TT.NORMAL] * 64
    w = gguf.GGUFWriter(path, "llama")
    w.add_context_length(512)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(0 if ttype == gguf.GGMLQuantizationType.F32 else 1)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(64)])
    w.add_token_types(types)
    n_kv = n_embd // n_head * n_head_kv

    def add(name: str, ne: tuple[int, ...], kind: gguf.GGMLQuantizationType) -> None:
        data = rng.standard_normal(tuple(reversed(ne))).astype(np.float32) * 0.05
        if kind == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, data)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            try:
                w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
            except NotImplementedError:  # k-quants: gguf-py only decodes them; any bytes do
                shape = gguf.quants.quant_shape_to_byte_shape(data.shape, kind)
                w.add_tensor(name, rng.integers(0, 256, shape, dtype=np.uint8), raw_dtype=kind)

    add("token_embd.weight", (n_embd, n_vocab), ttype)
    add("output_norm.weight", (n_embd,), gguf.GGMLQuantizationType.F32)
    add("output.weight", (n_embd, n_vocab), ttype)
    for i in range(n_layer):
        for part, ne in (("attn_q", (n_embd, n_embd)), ("attn_k", (n_embd, n_kv)),
                         ("attn_v", (n_embd, n_kv)), ("attn_output", (n_embd, n_embd)),
                         ("ffn_gate", (n_embd, n_ff)), ("ffn_down", (n_ff, n_embd)),
                         ("ffn_up", (n_embd, n_ff))):
            add(f"blk.{i}.{part}.weight", ne, ttype)
        for part in ("attn_norm", "ffn_norm"):
            add(f"blk.{i}.{part}.weight", (n_embd,), gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
