"""Synthetic LoRA adapters for the bundled model (or any llama GGUF), for unit and end-to-end tests.

Everything comes from one generator, `lora_pairs`: A/B matrices in llama.cpp's layout, seeded
per tensor name, so that a GGUF written directly (`make_gguf_adapter`) and a PEFT folder
written in Hugging Face's layout (`make_peft_folder`: q/k rows un-permuted, embeddings' A
transposed) hold the same adapter: converting the folder must give that GGUF back exactly.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

# Hugging Face module -> (its path under model.layers.N, llama.cpp's name)
HF_MODULES = {
    "q_proj": ("self_attn.q_proj", "attn_q"),
    "k_proj": ("self_attn.k_proj", "attn_k"),
    "v_proj": ("self_attn.v_proj", "attn_v"),
    "o_proj": ("self_attn.o_proj", "attn_output"),
    "gate_proj": ("mlp.gate_proj", "ffn_gate"),
    "up_proj": ("mlp.up_proj", "ffn_up"),
    "down_proj": ("mlp.down_proj", "ffn_down"),
    "embed_tokens": ("", "token_embd"),
    "lm_head": ("", "output"),
}
ONE_OFF = ("token_embd", "output")  # llama.cpp targets outside the layers
Pairs = dict[str, tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class BaseShapes:
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    ne: Mapping[str, tuple[int, ...]]  # tensor name -> GGUF ne


@functools.lru_cache(maxsize=4)
def base_shapes(base: Path) -> BaseShapes:
    # Cria's scanner, not gguf-py's GGUFReader: that one takes ~3 s on the bundled model's
    # tokenizer arrays. A wrong shape here would not go unnoticed: llama.cpp checks every
    # adapter made from these against its own model (test_lora_files.py loads them).
    from cria.models.lora_base import scan_gguf

    meta, tensors, _ = scan_gguf(base)
    arch = str(meta["general.architecture"])

    def hp(key: str) -> int:
        return int(meta[f"{arch}.{key}"])

    ne = {name: t.ne for name, t in tensors.items()}
    return BaseShapes(
        arch, hp("block_count"), hp("attention.head_count"), hp("attention.head_count_kv"), ne
    )


def _tensor_name(target: str, layer: int | None) -> str:
    return f"{target}.weight" if target in ONE_OFF else f"blk.{layer}.{target}.weight"


def lora_pairs(
    base: Path,
    *,
    rank: int = 8,
    seed: int = 0,
    targets: Sequence[str] = ("attn_q", "attn_v", "ffn_down"),
    strength: float = 1.0,
    layers: Sequence[int] | None = None,
) -> Pairs:
    """GGUF tensor name -> (lora_a, lora_b) as numpy arrays in llama.cpp's layout (numpy shape =
    GGUF ne reversed): a (r, n_in), b (n_out, r); token_embd: a (n_vocab, r), b (n_embd, r).
    A's rows have unit norm per input, B's entries `strength / sqrt(r)`: at alpha = 2r the
    delta on a layer's output is ~2 x strength per element, enough to change greedy output."""
    shapes = base_shapes(base)
    out: Pairs = {}
    for target in targets:
        for layer in [None] if target in ONE_OFF else (layers or range(shapes.n_layer)):
            name = _tensor_name(target, layer)
            n_in, n_out = shapes.ne[name][:2]
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            if target == "token_embd":  # ne [n_embd, n_vocab]: a picks rows per token
                a = rng.standard_normal((n_out, rank))
                b = rng.standard_normal((n_in, rank)) * (0.1 * strength / math.sqrt(rank))
            else:
                a = rng.standard_normal((rank, n_in)) / math.sqrt(n_in)
                b = rng.standard_normal((n_out, rank)) * (strength / math.sqrt(rank))
            out[name] = (a.astype(np.float32), b.astype(np.float32))
    return out


def write_lora_gguf(
    out: Path,
    tensors: Mapping[str, np.ndarray] | Sequence[tuple[str, np.ndarray]],
    *,
    arch: str = "llama",
    alpha: float | None = 16.0,
    general_type: str | None = "adapter",
    adapter_type: str | None = "lora",
    kv: Callable[[GGUFWriter], None] | None = None,
    raw_dtypes: Mapping[str, GGMLQuantizationType] | None = None,
) -> Path:
    """The low-level writer: numpy arrays as given (float32 -> F32, float16 -> F16, uint8 with
    a raw dtype -> that type), metadata as given (None: left out); `kv` adds more."""
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(out, arch)
    if general_type is not None:
        writer.add_type(general_type)
    if adapter_type is not None:
        writer.add_string("adapter.type", adapter_type)
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", alpha)
    if kv is not None:
        kv(writer)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    for name, array in items:
        raw = (raw_dtypes or {}).get(name)
        writer.add_tensor(name, np.ascontiguousarray(array), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def pairs_as_tensors(pairs: Pairs) -> list[tuple[str, np.ndarray]]:
    return [
        (f"{name}.lora_{p}", m) for name, (a, b) in pairs.items() for p, m in (("a", a), ("b", b))
    ]


def make_gguf_adapter(
    base: Path,
    out: Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    targets: Sequence[str] = ("attn_q", "attn_v", "ffn_down"),
    strength: float = 1.0,
    layers: Sequence[int] | None = None,
) -> Path:
    """A synthetic GGUF LoRA in llama.cpp's layout (float32), `targets` llama.cpp names."""
    shapes = base_shapes(base)
    pairs = lora_pairs(
        base, rank=rank, seed=seed, targets=targets, strength=strength, layers=layers
    )
    return write_lora_gguf(out, pairs_as_tensors(pairs), arch=shapes.arch, alpha=alpha)


def llama_permutation(n_rows: int, n_head: int) -> np.ndarray:
    """Row indices of convert_hf_to_gguf's LlamaModel.permute: gguf_rows = hf_rows[perm]."""
    rows = np.arange(n_rows)
    return rows.reshape(n_head, 2, n_rows // n_head // 2).swapaxes(1, 2).reshape(n_rows)


def hf_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF (permuted) row order back to Hugging Face's, with the index vector above."""
    out = np.empty_like(w)
    out[llama_permutation(w.shape[0], n_head)] = w
    return out


def save_safetensors_bf16(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    """safetensors' numpy API cannot write bfloat16: the format by hand (truncating, not
    rounding, float32 to its top 16 bits)."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    blobs, offset = [], 0
    for name, array in tensors.items():
        blob = (
            (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16)
            .astype("<u2")
            .tobytes()
        )
        header[name] = {
            "dtype": "BF16",
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def bf16_round(array: np.ndarray) -> np.ndarray:
    """What save_safetensors_bf16 keeps of a float32 array."""
    return ((array.astype(np.float32).view(np.uint32) >> 16) << 16).view(np.float32)


def make_peft_folder(
    base: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16.0,
    seed: int = 0,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "down_proj"),
    strength: float = 1.0,
    layers: Sequence[int] | None = None,
    config: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, np.ndarray] | None = None,
    bf16: bool = False,
) -> Path:
    """A PEFT LoRA folder as Hugging Face training saves it: adapter_config.json and
    adapter_model.safetensors with HF names and layouts (lora_A [r, in], lora_B [out, r], q/k
    un-permuted, lora_embedding_A [r, n_vocab], lora_embedding_B [n_embd, r]), holding the same
    adapter as make_gguf_adapter with the llama.cpp names of `targets`. `config` overrides keys
    of adapter_config.json; `extra_tensors` are added as they are."""
    from safetensors.numpy import save_file

    shapes = base_shapes(base)
    gguf_targets = [HF_MODULES[t][1] for t in targets]
    pairs = lora_pairs(
        base, rank=rank, seed=seed, targets=gguf_targets, strength=strength, layers=layers
    )
    tensors: dict[str, np.ndarray] = {}
    for name, (a, b) in pairs.items():
        if name == "token_embd.weight":
            stem = "base_model.model.model.embed_tokens"
            tensors[f"{stem}.lora_embedding_A"] = np.ascontiguousarray(a.T)
            tensors[f"{stem}.lora_embedding_B"] = b
            continue
        if name == "output.weight":
            tensors["base_model.model.lm_head.lora_A.weight"] = a
            tensors["base_model.model.lm_head.lora_B.weight"] = b
            continue
        _, layer, target, _ = name.split(".")
        hf = next(k for k, (_, g) in HF_MODULES.items() if g == target)
        if target in ("attn_q", "attn_k"):
            b = hf_rows(b, shapes.n_head if target == "attn_q" else shapes.n_head_kv)
        stem = f"base_model.model.model.layers.{layer}.{HF_MODULES[hf][0]}"
        tensors[f"{stem}.lora_A.weight"] = a
        tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b)
    tensors.update(extra_tensors or {})
    cfg: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": None,
    }
    cfg.update(config or {})
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    if bf16:
        save_safetensors_bf16(tensors, out_dir / "adapter_model.safetensors")
    else:
        save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir


def make_tiny_base(
    path: Path,
    *,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_layer: int = 2,
    n_ff: int = 128,
    seed: int = 0,
) -> Path:
    """A small random llama GGUF (F32) with its own output.weight, which the bundled model lacks
    (it ties it to token_embd): embedding and lm_head adapters need one. Other head counts
    than the bundled model's, too. Its vocabulary: <unk> <s> </s>, bytes, 64 pieces."""
    rng = np.random.default_rng(seed)
    pieces = [
        "<unk>",
        "<s>",
        "</s>",
        *(f"<0x{b:02X}>" for b in range(256)),
        *(f"\u2581w{i}" for i in range(64)),
    ]
    w = GGUFWriter(path, "llama")
    w.add_context_length(256)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(64)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * 64)  # unknown, control, byte, normal
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    n_kv = n_embd // n_head * n_head_kv

    def add(name: str, *ne: int) -> None:
        w.add_tensor(name, (rng.standard_normal(tuple(reversed(ne))) * 0.1).astype(np.float32))

    add("token_embd.weight", n_embd, len(pieces))
    add("output.weight", n_embd, len(pieces))
    w.add_tensor("output_norm.weight", np.ones(n_embd, np.float32))
    for i in range(n_layer):
        for part, ne in (
            ("attn_q", (n_embd, n_embd)),
            ("attn_k", (n_embd, n_kv)),
            ("attn_v", (n_embd, n_kv)),
            ("attn_output", (n_embd, n_embd)),
            ("ffn_gate", (n_embd, n_ff)),
            ("ffn_up", (n_embd, n_ff)),
            ("ffn_down", (n_ff, n_embd)),
        ):
            add(f"blk.{i}.{part}.weight", *ne)
        for part in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{part}.weight", np.ones(n_embd, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- malformed adapters: kind -> a fragment of the StartupError each must give ----------------

MALFORMED: dict[str, str] = {
    "alpha_string": "adapter.lora.alpha must be a float32, not a string",
    "alpha_int_array": "adapter.lora.alpha must be a float32, not an array of int32",
    "alpha_nan": "adapter.lora.alpha is nan",
    "general_type_int": "general.type must be a string, not a uint32",
    "arch_int": "general.architecture must be a string, not an array of uint8",
    "not_adapter": "general.type is 'model'",
    "no_general_type": "general.type is missing",
    "control_vector": "adapter.type is 'cvec'",
    "alora": "an aLoRA",
    "wrong_arch": "made for a 'qwen2' model, but the base model is 'llama'",
    "missing_base_tensor": "'blk.99.attn_q.weight' is not a tensor of the base model",
    "wrong_shape": "'blk.0.attn_q.weight' maps 608 inputs to 576 outputs, the base model's 576",
    "rank_mismatch": "'blk.0.attn_q.weight': its lora_a has rank 8, its lora_b 4",
    "embd_rank_mismatch": "'token_embd.weight': its lora_a has rank 8, its lora_b 4",
    "embd_on_tied": "the base model has no output.weight",
    "duplicate_key": "metadata key general.type appears twice",
    "lone_lora_a": "'blk.0.attn_q.weight' has a lora_a but no lora_b",
    "bad_suffix": "is neither a .lora_a nor a .lora_b",
    "three_d": "lora tensors are 2-D",
    "int_type": "is I32: lora tensors must be",
    "no_tensors": "no lora_a/lora_b tensors",
    "truncated": "truncated",
    "truncated_header": "not a readable GGUF file",
    "empty_file": "not a GGUF file",
    "not_gguf": "not a GGUF file",
}


def make_malformed(base: Path, out: Path, kind: str) -> Path:
    """A broken LoRA of `kind` (a key of MALFORMED), otherwise a valid adapter for `base`."""
    pairs = lora_pairs(base, rank=8, targets=("attn_q",), layers=(0,))
    good = pairs_as_tensors(pairs)
    a, b = pairs["blk.0.attn_q.weight"]
    write = functools.partial(write_lora_gguf, out)
    if kind == "alpha_string":
        return write(good, alpha=None, kv=lambda w: w.add_string("adapter.lora.alpha", "16"))
    if kind == "alpha_int_array":
        return write(good, alpha=None, kv=lambda w: w.add_array("adapter.lora.alpha", [16]))
    if kind == "alpha_nan":
        return write(good, alpha=float("nan"))
    if kind == "general_type_int":
        return write(good, general_type=None, kv=lambda w: w.add_uint32("general.type", 1))
    if kind == "arch_int":  # the writer always adds general.architecture: rewrite it in place
        path = write(good, arch="llama")
        data = path.read_bytes()
        i = data.index(b"general.architecture") + len(b"general.architecture")
        # STRING "llama" (type, u64 length, 5 bytes) -> an array of one uint8: the same 17 bytes
        return _rewrite(path, data[:i] + struct.pack("<IIQB", 9, 0, 1, 7) + data[i + 17 :])
    if kind == "not_adapter":
        return write(good, general_type="model")
    if kind == "no_general_type":
        return write(good, general_type=None)
    if kind == "control_vector":
        return write(good, adapter_type="cvec")
    if kind == "alora":
        return write(good, kv=lambda w: w.add_array("adapter.alora.invocation_tokens", [1, 2]))
    if kind == "wrong_arch":
        return write(good, arch="qwen2")
    if kind == "missing_base_tensor":
        return write(
            [*good, ("blk.99.attn_q.weight.lora_a", a), ("blk.99.attn_q.weight.lora_b", b)]
        )
    if kind == "wrong_shape":
        return write(
            [
                ("blk.0.attn_q.weight.lora_a", np.zeros((8, a.shape[1] + 32), np.float32)),
                ("blk.0.attn_q.weight.lora_b", b),
            ]
        )
    if kind == "rank_mismatch":
        return write(
            [("blk.0.attn_q.weight.lora_a", a), ("blk.0.attn_q.weight.lora_b", b[:, :4].copy())]
        )
    if kind == "embd_rank_mismatch":
        embd = lora_pairs(base, rank=8, targets=("token_embd",))["token_embd.weight"]
        return write(
            [
                ("token_embd.weight.lora_a", embd[0]),
                ("token_embd.weight.lora_b", embd[1][:, :4].copy()),
            ]
        )
    if kind == "embd_on_tied":  # a good pair, but the bundled model ties output to token_embd
        embd = lora_pairs(base, rank=8, targets=("token_embd",))["token_embd.weight"]
        return write([("token_embd.weight.lora_a", embd[0]), ("token_embd.weight.lora_b", embd[1])])
    if kind == "duplicate_key":  # the writer keeps one value per key: rename one after
        path = write(good, kv=lambda w: w.add_string("generaX.type", "adapter"))
        return _rewrite(path, path.read_bytes().replace(b"generaX.type", b"general.type"))
    if kind == "lone_lora_a":
        return write([("blk.0.attn_q.weight.lora_a", a)])
    if kind == "bad_suffix":
        return write([*good, ("blk.0.attn_q.weight.lora_c", a)])
    if kind == "three_d":
        return write(
            [("blk.0.attn_q.weight.lora_a", np.stack([a, a])), ("blk.0.attn_q.weight.lora_b", b)]
        )
    if kind == "int_type":
        return write(
            [("blk.0.attn_q.weight.lora_a", a.astype(np.int32)), ("blk.0.attn_q.weight.lora_b", b)]
        )
    if kind == "no_tensors":
        return write([])
    if kind == "truncated":
        path = write(good)
        return _rewrite(path, path.read_bytes()[:-1000])
    if kind == "truncated_header":
        path = write(good)
        return _rewrite(path, path.read_bytes()[:60])
    if kind == "empty_file":
        out.write_bytes(b"")
        return out
    if kind == "not_gguf":
        out.write_bytes(b"PK\x03\x04 a zip, say")
        return out
    raise ValueError(f"unknown kind {kind}")


def _rewrite(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
