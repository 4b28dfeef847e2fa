"""PEFT LoRA folders (what Hugging Face training saves: adapter_config.json and
adapter_model.safetensors) converted to GGUF LoRAs for llama.cpp, without torch.

Follows llama.cpp's convert_lora_to_gguf.py on a llama base (convert_hf_to_gguf LlamaModel):
- names: base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight -> blk.N.attn_q.weight
  .lora_a, and so on for k, v, o, gate, up, down; embed_tokens -> token_embd, lm_head -> output;
- layouts: lora_A [r, in] and lora_B [out, r] are written as they are (GGUF ne is the numpy
  shape reversed: ne=[in, r] and [r, out], which llama.cpp expects); for embeddings lora_A is
  transposed (ne=[r, n_vocab]: llama.cpp picks its rows per token);
- q/k: the base conversion permuted the rows of q_proj and k_proj (LlamaModel.permute, for
  llama.cpp's RoPE layout). Rows are outputs, and lora_B holds the outputs of B @ A, so the
  same permutation goes to lora_B of q_proj (n_head) and k_proj (n_head_kv); lora_A is kept.
- alpha: llama.cpp scales by alpha / rank with rank the tensor's, PEFT by lora_alpha / r, or by
  lora_alpha / sqrt(r) with use_rslora: the GGUF gets lora_alpha (lora_alpha * sqrt(r) with
  rslora); a module whose PEFT scale differs (alpha_pattern, rslora with rank_pattern) gets the
  ratio folded into its lora_B, so every module scales exactly as in PEFT.
Tensors are written as float32: exact for the F32, F16 and BF16 that training saves, and an
adapter is small next to its base (this one's scale folding stays exact too).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeGuard

import numpy as np

from cria.models.lora import AdapterEntry, adapter_error
from cria.models.lora_base import BaseModel, read_base

CONVERTER_VERSION = 1
_SUPPORTED_ARCHS = ("llama",)
_LLAMA_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_RE = re.compile(r"(?:model\.)?layers\.(\d+)\.(\w+\.\w+)")
_SUFFIXES = {
    ".lora_A.weight": ("A", False),
    ".lora_B.weight": ("B", False),
    ".lora_embedding_A": ("A", True),
    ".lora_embedding_B": ("B", True),
}
_PREFIX = "base_model.model."


@dataclass(frozen=True, slots=True)
class _Config:
    r: int
    alpha: float
    rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    base_model: str  # base_model_name_or_path, for error messages


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute on the rows (axis 0) of `w`."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of permute_qk: GGUF row order back to Hugging Face's."""
    return (
        w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read_config(entry: AdapterEntry, path: Path) -> _Config:
    def bad(what: str) -> NoReturn:
        adapter_error(entry, path, what)

    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        bad(f"cannot read it as JSON: {exc}")
    if not isinstance(cfg, dict):
        bad("not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        bad(f"peft_type is {cfg.get('peft_type')!r}: only LORA adapters convert")
    refused = {
        "use_dora": "a DoRA adapter (use_dora): llama.cpp applies plain LoRA only",
        "use_qalora": "a QA-LoRA adapter (use_qalora): llama.cpp applies plain LoRA only",
        "lora_bias": "lora_bias: llama.cpp has no LoRA bias",
        "layer_replication": "layer_replication changes the model's layers: not supported",
        "alora_invocation_tokens": "an aLoRA (alora_invocation_tokens): only plain LoRA is supported",
        "invocation_string": "an aLoRA (invocation_string): only plain LoRA is supported",
    }
    for key, what in refused.items():
        if cfg.get(key):
            bad(what)
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        bad(f"r must be a positive integer, not {r!r}")
    if not _number(alpha) or alpha == 0:
        # llama.cpp reads alpha 0 as "no alpha" (scale 1), PEFT as a scale of 0.
        bad(f"lora_alpha must be a nonzero number, not {alpha!r}")
    patterns: list[dict[str, Any]] = []
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict):
            bad(f"{key} must be an object")
        for k, v in pattern.items():
            good = isinstance(v, int) and v >= 1 if key == "rank_pattern" else _number(v) and v != 0
            if not good or isinstance(v, bool):
                bad(f"{key}[{k!r}] is {v!r}")
            try:
                re.compile(k)
            except re.error:
                bad(f"{key} key {k!r} is not a valid pattern")
        patterns.append(pattern)
    base_model = str(cfg.get("base_model_name_or_path") or "")
    rslora = bool(cfg.get("use_rslora"))
    return _Config(int(r), float(alpha), rslora, patterns[0], patterns[1], base_model)


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's get_pattern_key: the first key (a regex) that matches the module's name's tail."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _safetensors(entry: AdapterEntry, path: Path) -> dict[str, np.ndarray]:
    """Every tensor as float32. safetensors' numpy API has no bfloat16 (numpy lacks the type), so
    BF16 is read from the file directly: the top 16 bits of a float32."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(path), framework="np") as f:
            keys = list(f.keys())
            header: dict[str, Any] | None = None
            for key in keys:
                dtype = f.get_slice(key).get_dtype()
                if dtype in ("F32", "F16", "F64"):
                    out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
                elif dtype == "BF16":
                    if header is None:
                        with path.open("rb") as raw:
                            (n,) = struct.unpack("<Q", raw.read(8))
                            header = json.loads(raw.read(n))
                            header["__data__"] = 8 + n
                    info = header[key]
                    begin, end = info["data_offsets"]
                    bits = np.fromfile(
                        path,
                        dtype="<u2",
                        count=(end - begin) // 2,
                        offset=header["__data__"] + begin,
                    )
                    out[key] = (
                        (bits.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
                    )
                else:
                    adapter_error(
                        entry, path, f"tensor {key} is {dtype}: only F32, F16 and BF16 convert"
                    )
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        adapter_error(entry, path, f"not a readable safetensors file ({exc})")
    return out


def _gguf_name(module: str, embedding: bool) -> str | None:
    """The llama.cpp tensor a PEFT module adapts (llama), or None."""
    if embedding:
        return "token_embd.weight" if re.fullmatch(r"(?:model\.)?embed_tokens", module) else None
    if module == "lm_head":
        return "output.weight"
    m = _LAYER_RE.fullmatch(module)
    if m and m.group(2) in _LLAMA_MODULES:
        return f"blk.{int(m.group(1))}.{_LLAMA_MODULES[m.group(2)]}.weight"
    return None


def _convert_tensors(
    entry: AdapterEntry, folder: Path, cfg: _Config, tensors: dict[str, np.ndarray], base: BaseModel
) -> tuple[float, list[tuple[str, np.ndarray]]]:
    weights = folder / "adapter_model.safetensors"

    def bad(what: str) -> NoReturn:
        adapter_error(entry, weights, what)

    pairs: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, bool] = {}
    for key, array in tensors.items():
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(_PREFIX):
            bad(
                f"tensor {key} is not a LoRA A/B matrix (full weights from modules_to_save, "
                "biases or trainable tokens cannot be applied by llama.cpp)"
            )
        part, embedding = _SUFFIXES[suffix]
        module = key[len(_PREFIX) : -len(suffix)]
        if kinds.setdefault(module, embedding) != embedding:
            bad(f"{module} mixes lora_embedding and lora_A/lora_B tensors")
        pairs.setdefault(module, {})[part] = array
    if not pairs:
        bad("no LoRA tensors")
    n_head, n_head_kv = base.hparam("attention.head_count"), base.hparam("attention.head_count_kv")
    n_head_kv = n_head if n_head_kv is None else n_head_kv
    if not isinstance(n_head, int) or not isinstance(n_head_kv, int) or n_head < 1 or n_head_kv < 1:
        bad(f"the base model's head counts ({n_head!r}, {n_head_kv!r}) are not single numbers")
    gguf_alpha = cfg.alpha * math.sqrt(cfg.r) if cfg.rslora else cfg.alpha
    out: list[tuple[str, np.ndarray]] = []
    for module in sorted(pairs, key=_module_order):
        ab, embedding = pairs[module], kinds[module]
        name = _gguf_name(module, embedding)
        if name is None:
            bad(
                f"module {module} has no llama.cpp tensor (supported: "
                f"{', '.join(k.split('.')[1] for k in _LLAMA_MODULES)}, embed_tokens, lm_head)"
            )
        if set(ab) != {"A", "B"}:
            bad(f"{module} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        if name not in base.tensors:
            tied = " (it shares token_embd with the input)" if name == "output.weight" else ""
            bad(f"{module} -> {name} is not a tensor of the base model{tied}")
        if embedding and "output.weight" not in base.tensors:
            bad(
                f"{module}: the base model ties its output to the embeddings, and llama.cpp "
                "would apply this LoRA to both: adapters on embed_tokens need an untied base"
            )
        ne = base.tensors[name][0]
        if a.ndim != 2 or b.ndim != 2 or len(ne) != 2 or a.shape[0] != b.shape[1]:
            bad(f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not a pair")
        rank = a.shape[0]
        n_in, n_out = (ne[1], ne[0]) if embedding else (ne[0], ne[1])
        if a.shape[1] != n_in or b.shape[0] != n_out:
            bad(
                f"{module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not fit the base "
                f"model's {name} ({n_out} x {n_in}): an adapter for another base model"
                + (f" ({cfg.base_model})?" if cfg.base_model else "?")
            )
        expected = _pattern_value(cfg.rank_pattern, module, cfg.r)
        if rank != expected:
            bad(f"{module} has rank {rank}, adapter_config.json says {expected}")
        alpha = float(_pattern_value(cfg.alpha_pattern, module, cfg.alpha))
        # PEFT's scale over the one llama.cpp will apply (gguf_alpha / rank); 1 unless patterns.
        factor = (alpha / cfg.alpha) * (math.sqrt(rank) / math.sqrt(cfg.r) if cfg.rslora else 1.0)
        if factor != 1.0:
            b = (b.astype(np.float64) * factor).astype(np.float32)
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = n_head if "attn_q" in name else n_head_kv
            if b.shape[0] % (2 * heads):
                bad(f"{module}: {b.shape[0]} rows do not split into {heads} heads")
            b = permute_qk(b, heads)
        if embedding:
            a = a.T
        out.append((name + ".lora_a", np.ascontiguousarray(a, dtype=np.float32)))
        out.append((name + ".lora_b", np.ascontiguousarray(b, dtype=np.float32)))
    return gguf_alpha, out


def _module_order(module: str) -> tuple[int, str]:
    m = _LAYER_RE.fullmatch(module)
    return (int(m.group(1)), m.group(2)) if m else (-1, module)


def _cache_key(config: Path, weights: Path, base: BaseModel) -> str:
    h = hashlib.sha256(f"cria-peft-lora v{CONVERTER_VERSION}\n".encode())
    for path in (config, weights):
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        h.update(b"\0")
    st = base.path.stat()
    h.update(f"{base.path}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _write_gguf(out: Path, arch: str, alpha: float, tensors: list[tuple[str, np.ndarray]]) -> None:
    """Write to a temporary file beside `out`, then rename: a reader never sees half a file."""
    from gguf import GGUFWriter

    tmp = out.with_name(f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        writer = GGUFWriter(tmp, arch)
        try:
            writer.add_type("adapter")
            writer.add_string("adapter.type", "lora")
            writer.add_float32("adapter.lora.alpha", alpha)
            for name, array in tensors:
                writer.add_tensor(name, array)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def convert_peft(entry: AdapterEntry, base: Path, cache_dir: Path) -> Path:
    """The GGUF LoRA for PEFT folder `entry.path`, in cache_dir/lora/, converted once per
    version of the folder's two files, of the base model file and of this converter.
    Raises StartupError naming the adapter and what cannot be converted."""
    folder = entry.path
    config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config.is_file():
        adapter_error(entry, folder, "not a PEFT adapter folder: no adapter_config.json")
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            adapter_error(
                entry,
                folder,
                "adapter_model.bin is a PyTorch pickle, which needs torch to read: "
                "save the adapter as safetensors (save_pretrained's default) and try again",
            )
        adapter_error(entry, folder, "no adapter_model.safetensors")
    model = read_base(base)
    if model.architecture not in _SUPPORTED_ARCHS:
        adapter_error(
            entry,
            folder,
            f"PEFT conversion supports llama-architecture base models, this one is "
            f"'{model.architecture}': convert it with llama.cpp's convert_lora_to_gguf.py",
        )
    try:
        key = _cache_key(config, weights, model)
    except OSError as exc:
        adapter_error(entry, folder, f"cannot read it: {exc}")
    lora_dir = cache_dir / "lora"
    try:
        lora_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        adapter_error(entry, folder, f"cannot use --cache-dir {cache_dir}: {exc}")
    out = lora_dir / f"{entry.name}-{key}.gguf"
    if out.is_file():
        return out
    cfg = _read_config(entry, config)
    alpha, tensors = _convert_tensors(entry, folder, cfg, _safetensors(entry, weights), model)
    try:
        _write_gguf(out, model.architecture, alpha, tensors)
    except OSError as exc:
        adapter_error(entry, folder, f"cannot write the converted adapter to {out}: {exc}")
    return out
