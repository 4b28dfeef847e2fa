"""Legacy GGML model files (`*.ggmlv3.q4_0.bin`: ggml, ggmf, ggjt) converted once to GGUF.

llama.cpp dropped these formats in August 2023, but Cria's first README (and TheBloke's
`*-GGML` repositories) used them. The tensors are already in llama.cpp's layout, so conversion
copies their bytes unchanged into a GGUF in a cache folder; what the GGML header lacks (KV-head
count, rope base, norm epsilon, context length, an exact tokenizer) comes from `--n-gqa` or a
Hugging Face folder (`-v`: config.json, tokenizer.json), or is assumed with one warning.

Unlike llama.cpp's convert_llama_ggml_to_gguf.py of the same version, this sizes every tensor
from its type's block size (that script passes F32 rows to gguf-py as if they were bytes, which
divides their first dimension by 4, and fails on Q8_0), checks every shape against the header,
refuses truncated files instead of writing short tensors, and does not copy `rope.freqs`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np

from cria.errors import StartupError
from cria.models.ggml_vocab import HFVocab, agreement, legacy_vocab

log = logging.getLogger("cria.models")

# Bump when the output for the same inputs changes: older cached conversions are then redone.
CONVERTER_VERSION = 1

MAGICS = {0x67676D6C: "ggml", 0x67676D66: "ggmf", 0x67676A74: "ggjt"}
T = gguf.GGMLQuantizationType
# Tensor types whose bytes mean the same today, by format version. llama.cpp itself refused the
# rest: ggjt v2 (PR 1405) removed the nibble shuffling of Q4_0/Q4_1/Q5_0/Q5_1 (older files may
# only be F32/F16; their Q8_0 still had an f32 scale), and ggjt v3 (PR 1508) made the Q4_0, Q4_1
# and Q8_0 scales f16. The k-quants arrived with v3 and are unchanged. Q8_1 (its d and s were
# f32 then, f16 now) and Q8_K are scratch types that llama.cpp never wrote into a model.
_READABLE = {
    "ggml": {T.F32, T.F16},
    "ggmf v1": {T.F32, T.F16},
    "ggjt v1": {T.F32, T.F16},
    "ggjt v2": {T.F32, T.F16, T.Q5_0, T.Q5_1},
    "ggjt v3": {T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
                T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K},
}
_OLD_TYPES = {4: "Q4_2", 5: "Q4_3"}  # removed from ggml in 2023, no decoder left anywhere
_MAX_NAME = 512
_MAX_TOKEN = 1 << 16

_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
          "output.weight": "output.weight"}
_LAYER_NAMES = {
    "attention.wq.weight": "attn_q.weight", "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight", "attention.wo.weight": "attn_output.weight",
    "attention_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight", "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}
# What llama.cpp's converter assumes when told nothing (LLaMA 1: its eps is between 1e-6 of
# LLaMA 1 and 1e-5 of Llama 2).
DEFAULT_ROPE_BASE, DEFAULT_EPS, DEFAULT_CONTEXT = 10000.0, 5e-6, 2048
_HP_NAMES = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")


@dataclass(frozen=True, slots=True)
class GGMLTensor:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row length
    type: gguf.GGMLQuantizationType
    offset: int
    nbytes: int

    def byte_shape(self) -> tuple[int, ...]:
        """The numpy shape of its bytes (what gguf-py wants for raw quantized data)."""
        block, size = gguf.GGML_QUANT_SIZES[self.type]
        return (*reversed(self.ne[1:]), self.ne[0] // block * size)


@dataclass(frozen=True, slots=True)
class GGMLModel:
    path: Path
    format: str  # "ggml", "ggmf v1", "ggjt v3"...
    hparams: dict[str, int]  # _HP_NAMES
    vocab: list[tuple[bytes, float]]
    has_scores: bool
    tensors: list[GGMLTensor]

    def tensor(self, name: str) -> GGMLTensor | None:
        return next((t for t in self.tensors if t.name == name), None)


@dataclass(frozen=True, slots=True)
class _Params:
    n_head_kv: int
    kv_source: str
    rope_base: float
    eps: float
    n_ctx: int
    rope_linear: float | None


def ggml_format(path: Path) -> str | None:
    """"ggml", "ggmf v1", "ggjt v1".."ggjt v3" (any version number is reported, so that an
    unknown one gets a clear refusal), or None for a file that is not GGML (a GGUF included)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return None
    if len(head) < 4:
        return None
    name = MAGICS.get(struct.unpack("<I", head[:4])[0])
    if name is None or name == "ggml":
        return name
    if len(head) < 8:
        return None
    return f"{name} v{struct.unpack('<I', head[4:])[0]}"


class _Reader:
    """Little-endian reads that turn a short read into a 'truncated' StartupError."""

    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise StartupError(f"{self.path}: truncated GGML file (ends inside {what})")
        return data

    def ints(self, n: int, what: str) -> tuple[int, ...]:
        return struct.unpack(f"<{n}i", self.take(4 * n, what))


def read_ggml(path: Path) -> GGMLModel:
    """Parse a GGML file's header, vocabulary and tensor directory (the data is not read) and
    refuse what cannot be converted faithfully."""
    fmt = ggml_format(path)
    if fmt is None:
        raise StartupError(f"{path}: not a GGML file (unknown magic)")
    if fmt not in _READABLE:
        raise StartupError(f"{path}: unsupported GGML format version {fmt} "
                           "(known: ggml, ggmf v1, ggjt v1-v3)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path)
        r.take(4 if fmt == "ggml" else 8, "the magic")
        hp = dict(zip(_HP_NAMES, r.ints(7, "the header")))
        bad = [k for k in _HP_NAMES[:-1] if hp[k] <= 0 and k != "n_mult"]
        if bad or not 0 < hp["n_vocab"] < 1 << 24:
            raise StartupError(f"{path}: corrupt GGML header ({', '.join(bad) or 'n_vocab'} "
                               f"out of range: {hp})")
        has_scores = fmt != "ggml"
        vocab = []
        for i in range(hp["n_vocab"]):
            (n,) = r.ints(1, "the vocabulary")
            if not 0 <= n <= _MAX_TOKEN:
                raise StartupError(f"{path}: corrupt vocabulary (token {i} is {n} bytes long)")
            text = r.take(n, "the vocabulary")
            score = struct.unpack("<f", r.take(4, "the vocabulary"))[0] if has_scores else 0.0
            vocab.append((text, float(score)))
        tensors = _read_tensors(r, path, fmt, size)
    return GGMLModel(path, fmt, hp, vocab, has_scores, tensors)


def _read_tensors(r: _Reader, path: Path, fmt: str, size: int) -> list[GGMLTensor]:
    tensors: list[GGMLTensor] = []
    while r.f.tell() < size:
        n_dims, name_len, type_id = r.ints(3, "a tensor header")
        if not 1 <= n_dims <= 4 or not 0 < name_len <= _MAX_NAME:
            raise StartupError(f"{path}: corrupt tensor header at offset {r.f.tell() - 12} "
                               f"(n_dims={n_dims}, name length {name_len})")
        ne = r.ints(n_dims, "a tensor header")
        try:
            name = r.take(name_len, "a tensor name").decode("utf-8")
        except UnicodeDecodeError:
            raise StartupError(f"{path}: corrupt tensor name at offset {r.f.tell()}") from None
        if fmt.startswith("ggjt"):
            r.f.seek(-r.f.tell() % 32, 1)
        ttype = _tensor_type(path, fmt, name, type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[ttype]
        if min(ne) <= 0 or ne[0] % block:
            raise StartupError(f"{path}: tensor {name} has shape {list(ne)}, not whole "
                               f"{ttype.name} blocks of {block}")
        n_elems = 1
        for n in ne:
            n_elems *= n
        nbytes = n_elems // block * type_size
        offset = r.f.tell()
        if offset + nbytes > size:
            raise StartupError(f"{path}: truncated GGML file (tensor {name} needs {nbytes} bytes "
                               f"at offset {offset}, the file ends at {size})")
        tensors.append(GGMLTensor(name, tuple(ne), ttype, offset, nbytes))
        r.f.seek(nbytes, 1)
    if not tensors:
        raise StartupError(f"{path}: truncated GGML file (no tensors after the vocabulary)")
    return tensors


def _tensor_type(path: Path, fmt: str, name: str, type_id: int) -> gguf.GGMLQuantizationType:
    if type_id in _OLD_TYPES:
        raise StartupError(f"{path}: tensor {name} is {_OLD_TYPES[type_id]}, a type llama.cpp "
                           "removed in 2023: it cannot be converted; get a newer file")
    try:
        ttype = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        raise StartupError(f"{path}: tensor {name} has unknown type {type_id}") from None
    if ttype not in _READABLE[fmt]:
        raise StartupError(
            f"{path}: tensor {name} is {ttype.name} in a {fmt} file, whose {ttype.name} layout "
            "differs from today's (or never held model weights): it cannot be converted "
            "faithfully; get a ggjt v3 or GGUF file of the model"
        )
    return ttype


def _resolve_params(model: GGMLModel, n_gqa: int | None,
                    hf_config: dict[str, Any] | None) -> _Params:
    """KV heads, rope base, norm eps and context length: from config.json exactly, from
    --n-gqa, or llama.cpp's converter's defaults with one warning."""
    hp, path = model.hparams, model.path
    n_head = hp["n_head"]
    kv_gqa = None
    if n_gqa is not None:
        if n_gqa <= 0 or n_head % n_gqa:
            raise StartupError(f"--n-gqa {n_gqa} does not divide the {n_head} attention heads "
                               f"of {path.name}")
        kv_gqa = n_head // n_gqa
    if hf_config is None:
        assumed = [] if kv_gqa is not None else [f"n_head_kv = {n_head} (no grouped-query attention)"]
        assumed += [f"rope base {DEFAULT_ROPE_BASE:g}", f"rms_norm_eps {DEFAULT_EPS:g}",
                    f"context length {DEFAULT_CONTEXT}"]
        log.warning(
            "%s: a GGML header has no KV-head count, rope base, norm epsilon or context length; "
            "assuming %s: pass --n-gqa N (8 for Llama-2 70B) or -v FOLDER with the model's "
            "config.json to set them", path.name, ", ".join(assumed))
        kv = kv_gqa if kv_gqa is not None else n_head
        src = f"--n-gqa {n_gqa}" if kv_gqa is not None else "assumed: no --n-gqa nor config.json"
        return _Params(kv, src, DEFAULT_ROPE_BASE, DEFAULT_EPS, DEFAULT_CONTEXT, None)
    _check_config(model, hf_config)
    kv = int(hf_config.get("num_key_value_heads") or n_head)  # HF: absent means n_head
    if kv_gqa is not None and kv != kv_gqa:
        raise StartupError(f"--n-gqa {n_gqa} means {kv_gqa} KV heads but config.json says "
                           f"num_key_value_heads = {kv}: drop --n-gqa or fix the folder")
    scaling = hf_config.get("rope_scaling")
    linear = None
    if isinstance(scaling, dict):
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            linear = float(scaling["factor"])
        elif kind not in (None, "default"):
            log.warning("%s: config.json rope_scaling type %r is not converted (only linear)",
                        path.name, kind)
    return _Params(
        n_head_kv=kv,
        kv_source="config.json num_key_value_heads",
        rope_base=float(hf_config.get("rope_theta", DEFAULT_ROPE_BASE)),
        eps=float(hf_config.get("rms_norm_eps", 1e-6)),  # HF LlamaConfig's defaults
        n_ctx=int(hf_config.get("max_position_embeddings", DEFAULT_CONTEXT)),
        rope_linear=linear,
    )


def _check_config(model: GGMLModel, cfg: dict[str, Any]) -> None:
    hp = model.hparams
    w1 = model.tensor("layers.0.feed_forward.w1.weight")
    have = {"hidden_size": hp["n_embd"], "num_attention_heads": hp["n_head"],
            "num_hidden_layers": hp["n_layer"], "vocab_size": hp["n_vocab"],
            "intermediate_size": w1.ne[1] if w1 else None,
            "head_dim": hp["n_embd"] // hp["n_head"]}
    for key, value in have.items():
        if key in cfg and value is not None and cfg[key] != value:
            raise StartupError(f"config.json {key} = {cfg[key]} but {model.path.name} has "
                               f"{value}: the -v folder belongs to another model")


def _expected_shapes(model: GGMLModel, p: _Params) -> dict[str, tuple[int, ...]]:
    hp = model.hparams
    n_embd, n_vocab = hp["n_embd"], hp["n_vocab"]
    w1 = model.tensor("layers.0.feed_forward.w1.weight")
    if w1 is None or len(w1.ne) != 2:
        raise StartupError(f"{model.path}: no 2-D layers.0.feed_forward.w1.weight tensor: "
                           "not a llama model")
    n_ff = w1.ne[1]
    n_kv = n_embd // hp["n_head"] * p.n_head_kv
    shapes = {"tok_embeddings.weight": (n_embd, n_vocab), "norm.weight": (n_embd,),
              "output.weight": (n_embd, n_vocab)}
    per_layer = {
        "attention.wq.weight": (n_embd, n_embd), "attention.wk.weight": (n_embd, n_kv),
        "attention.wv.weight": (n_embd, n_kv), "attention.wo.weight": (n_embd, n_embd),
        "attention_norm.weight": (n_embd,), "ffn_norm.weight": (n_embd,),
        "feed_forward.w1.weight": (n_embd, n_ff), "feed_forward.w2.weight": (n_ff, n_embd),
        "feed_forward.w3.weight": (n_embd, n_ff),
    }
    for i in range(hp["n_layer"]):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def _check_tensors(model: GGMLModel, p: _Params) -> None:
    """Every tensor named and shaped as the header says, every required one present."""
    hp, path = model.hparams, model.path
    if hp["n_embd"] % hp["n_head"]:
        raise StartupError(f"{path}: n_embd {hp['n_embd']} is not a multiple of "
                           f"n_head {hp['n_head']}")
    expected = _expected_shapes(model, p)
    head_dim = hp["n_embd"] // hp["n_head"]
    for t in model.tensors:
        if t.name == "rope.freqs":
            continue
        want = expected.get(t.name)
        if want is None:
            raise StartupError(f"{path}: unexpected tensor {t.name} (not a llama model with "
                               f"n_layer = {hp['n_layer']}?)")
        if t.ne == want:
            continue
        msg = f"{path}: tensor {t.name} has shape {list(t.ne)}, expected {list(want)}"
        if t.name.endswith(("attention.wk.weight", "attention.wv.weight")) and len(t.ne) == 2:
            implied = t.ne[1] / head_dim
            msg += (f": n_head_kv = {p.n_head_kv} ({p.kv_source}) is wrong; the tensor implies "
                    f"{implied:g} KV heads")
            if implied and hp["n_head"] % implied == 0:
                msg += f", i.e. --n-gqa {hp['n_head'] // int(implied)}"
        raise StartupError(msg)
    names = {t.name for t in model.tensors}
    missing = [n for n in expected if n not in names and n != "output.weight"]
    if missing:
        raise StartupError(f"{path}: missing tensor {missing[0]}"
                           + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's GGUF name of a GGML llama tensor (as gguf-py's tensor_mapping maps them)."""
    if name in _NAMES:
        return _NAMES[name]
    m = _LAYER.fullmatch(name)
    if m is None or m.group(2) not in _LAYER_NAMES:
        raise KeyError(name)
    return f"blk.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"


def cache_key(path: Path, **inputs: Any) -> str:
    """A hash of the source (resolved path, size, mtime) and every conversion input."""
    st = path.stat()
    src = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
           "version": CONVERTER_VERSION}
    blob = json.dumps({"src": src, **inputs}, sort_keys=True, default=repr)
    return hashlib.sha256(blob.encode()).hexdigest()


def convert_ggml(
    path: Path,
    cache_dir: Path,
    *,
    n_gqa: int | None,
    hf_config: dict[str, Any] | None,
    vocab: HFVocab | None,
    chat_template: str | None,
    architecture: str = "llama",
    progress: bool = True,
) -> Path:
    """The GGUF made from the GGML file `path`, in `cache_dir/ggml/`: converted on the first
    call, found again on later ones (unless the file or an option changed)."""
    if architecture != "llama":
        raise StartupError(f"{path}: only llama GGML files can be converted, not {architecture}")
    path = Path(path).resolve()
    if not path.is_file():
        raise StartupError(f"{path}: no such file")
    key = cache_key(path, n_gqa=n_gqa, hf_config=hf_config, arch=architecture,
                    vocab=vocab.digest() if vocab else None, template=chat_template)
    out_dir = Path(cache_dir).expanduser() / "ggml"
    out = out_dir / f"{path.stem}-{key[:16]}.gguf"
    if out.is_file():
        log.info("%s: using %s, converted earlier", path.name, out)
        return out
    start = time.monotonic()
    try:
        model = read_ggml(path)
    except OSError as exc:
        raise StartupError(f"{path}: cannot read it: {exc}") from None
    params = _resolve_params(model, n_gqa, hf_config)
    _check_tensors(model, params)
    if vocab is None:
        log.warning("%s: using the file's own vocabulary, which is lossy (no merges, no token "
                    "types%s): pass -v FOLDER with the model's tokenizer.json for exact "
                    "tokenization", path.name, "" if model.has_scores else ", no scores")
        vocab = legacy_vocab(model.vocab)
    elif agreement(vocab, model.vocab) < 0.5:
        raise StartupError(f"{vocab.source}: this tokenizer does not match the vocabulary in "
                           f"{path.name} (most token texts differ): -v names another model")
    _check_byte_fallback(vocab, path)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"cannot create the conversion cache {out_dir}: {exc}") from None
    _remove_stale(out_dir, out.name)
    tmp = out_dir / f".{out.name}.{os.getpid()}.tmp"
    try:
        _write_gguf(model, params, vocab, chat_template, tmp, progress)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise StartupError(f"cannot write {out}: {exc}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("%s (%s) converted to %s in %.1f s (%.1f MiB)", path.name, model.format, out,
             time.monotonic() - start, out.stat().st_size / 2**20)
    return out


def _remove_stale(out_dir: Path, name: str) -> None:
    """Delete the temporary files that crashed conversions of the same output left behind (a
    live process's file is its conversion in progress: left alone)."""
    for tmp in out_dir.iterdir():
        if not (tmp.name.startswith(f".{name}.") and tmp.name.endswith(".tmp")):
            continue
        pid = tmp.name[len(name) + 2 : -4]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:
            pass  # another user's live process


def _write_gguf(model: GGMLModel, p: _Params, vocab: HFVocab, chat_template: str | None,
                out: Path, progress: bool) -> None:
    from tqdm import tqdm  # type: ignore[import-untyped]  # a dependency of gguf

    hp = model.hparams
    w = gguf.GGUFWriter(out, "llama", use_temp_file=False)
    w.add_name(model.path.stem)
    w.add_description(f"converted by Cria from the legacy {model.format} file {model.path.name}")
    if hp["ftype"] in gguf.LlamaFileType.__members__.values():
        w.add_file_type(hp["ftype"])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(p.n_ctx)
    w.add_embedding_length(hp["n_embd"])
    w.add_block_count(hp["n_layer"])
    w1 = model.tensor("layers.0.feed_forward.w1.weight")
    assert w1 is not None  # _check_tensors
    w.add_feed_forward_length(w1.ne[1])
    w.add_head_count(hp["n_head"])
    w.add_head_count_kv(p.n_head_kv)
    w.add_rope_dimension_count(hp["n_rot"])
    w.add_rope_freq_base(p.rope_base)
    if p.rope_linear is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(p.rope_linear)
    w.add_layer_norm_rms_eps(p.eps)
    w.add_vocab_size(hp["n_vocab"])
    vocab.write_to(w, hp["n_vocab"])
    if chat_template:
        w.add_chat_template(chat_template)
    tensors = [t for t in model.tensors if t.name != "rope.freqs"]  # inverse frequencies from
    for t in tensors:  # Meta's checkpoints: llama.cpp would read them as rope frequency factors
        w.add_tensor_info(gguf_tensor_name(t.name), t.byte_shape(), np.dtype(np.uint8), t.nbytes,
                          raw_dtype=t.type)
    data = np.memmap(model.path, dtype=np.uint8, mode="r")
    total = sum(t.nbytes for t in tensors)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"converting {model.path.name}",
                  file=sys.stderr, disable=not progress, leave=False) as bar:
            for t in tensors:
                w.write_tensor_data(data[t.offset : t.offset + t.nbytes].reshape(t.byte_shape()))
                bar.update(t.nbytes)
    finally:
        w.close()
        del data
    with open(out, "rb+") as f:  # on disk before the rename makes it look done
        os.fsync(f.fileno())


def _check_byte_fallback(vocab: HFVocab, path: Path) -> None:
    """A SentencePiece vocabulary must spell every byte, as <0xNN> or as the byte itself:
    llama.cpp's SPM tokenizer looks a byte it cannot otherwise encode up with `.at()`, and a
    missing one throws std::out_of_range, which aborts the whole process on that prompt."""
    if vocab.model != "llama":
        return
    texts = set(vocab.tokens)
    missing = [
        b for b in range(256) if f"<0x{b:02X}>".encode() not in texts and bytes([b]) not in texts
    ]
    if missing:
        raise StartupError(
            f"{path}: {vocab.source} has no token for {len(missing)} of the 256 bytes (e.g. "
            f"0x{missing[0]:02X}); llama.cpp would abort on text that needs them. Pass -v with "
            "the model's tokenizer.json"
        )
