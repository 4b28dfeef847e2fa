"""LoRA adapter files (-l/--lora-adapters): the entry syntax, and a check of each GGUF LoRA
against the base model, in Python, before llama.cpp ever reads it.

Why check here: llama.cpp's loader (src/llama-adapter.cpp) turns most problems into a failed
load, but some malformed files abort the whole process (GGML_ASSERT), at load or only at the
first decode that uses the adapter:
- general.type, general.architecture or adapter.type not a string (gguf_get_val_str asserts);
- adapter.lora.alpha not a float32 scalar (gguf_get_val_f32 asserts);
- a lora tensor with a third dimension, or a lora on a 3-D base tensor (MoE experts): the load
  compares ne[0] and ne[1] only, then ggml_mul_mat(_id) asserts at the first decode;
- token_embd's lora_a and lora_b of different ranks: not checked at load, ggml_mul_mat asserts;
- a tensor type the matrix product has no kernel for (the integer types);
- a lora on an NVFP4 feed-forward weight (build_ffn asserts).
The failures llama.cpp does report come back as one log line and a NULL pointer; checking them
here too gives the user one StartupError that names the adapter and what is wrong with it.

PEFT folders are converted to GGUF first (lora_peft.py), then checked like any GGUF.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn

from cria.errors import StartupError
from cria.models.gguf import GGUFError, is_gguf
from cria.models.lora_base import FLAG, BaseModel, read_base, scan_gguf

log = logging.getLogger("cria.lora")

# A model id: also a URL path segment (/v1/models/NAME), so not "." or ".." or dots alone.
_NAME_RE = re.compile(r"(?!\.+$)[A-Za-z0-9._-]+")
# A decimal number only: float() would also take "inf", "nan" and "1_0", which are path text.
_SCALE_RE = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")

# ggml type ids (ggml.h) a lora tensor may have: what llama.cpp's convert_lora_to_gguf.py
# writes, and what every backend multiplies. Integer types have no matmul kernel.
_F32, _F16, _Q8_0, _BF16 = 0, 1, 8, 30
_LORA_TYPES = {_F32: "F32", _F16: "F16", _Q8_0: "Q8_0", _BF16: "BF16"}
_NVFP4 = 40
_TOKEN_EMBD = "token_embd.weight"


@dataclass(frozen=True, slots=True)
class AdapterEntry:
    """One -l entry, parsed but not yet checked: `path` may be missing, a file or a folder."""

    name: str
    path: Path
    scale: float


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """A checked adapter. `path` is the GGUF llama.cpp loads (the converted one for PEFT);
    `rank` the largest rank of its pairs; `alpha` None when the file has none (llama.cpp then
    scales by `scale` alone); `n_tensors` the lora tensors llama.cpp loads (two per pair)."""

    name: str
    path: Path
    scale: float
    rank: int
    alpha: float | None
    n_tensors: int
    source: Literal["gguf", "peft"]


# --- the entry syntax -------------------------------------------------------------------------


def _entry_error(text: str, what: str) -> NoReturn:
    raise StartupError(f"{FLAG} {text!r}: {what}")


def parse_adapter_entry(text: str) -> AdapterEntry:
    """`[NAME=]PATH[:SCALE]`. A path that exists as written is never split; `NAME=` is taken
    only when the part before the first '=' holds no path separator; a trailing `:SCALE` only
    when it is a finite decimal number. NAME defaults to the file's stem or the folder's name."""
    raw = text.strip()
    if not raw:
        _entry_error(text, "empty adapter entry")
    name: str | None = None
    rest = raw
    if not Path(raw).expanduser().exists() and "=" in raw:
        head, _, tail = raw.partition("=")
        if "/" not in head and "\\" not in head:
            if not head:
                _entry_error(text, "empty adapter name before '='")
            name, rest = head, tail
    scale = 1.0
    if not Path(rest).expanduser().exists():
        head, sep, tail = rest.rpartition(":")
        if sep and _SCALE_RE.fullmatch(tail):
            if not math.isfinite(float(tail)):
                _entry_error(text, f"the scale {tail} is not a finite number")
            rest, scale = head, float(tail)
    if not rest:
        _entry_error(text, "no adapter path")
    path = Path(rest).expanduser()
    if name is None:
        is_file = path.is_file() or (not path.exists() and path.suffix.lower() == ".gguf")
        name = (path.stem if is_file else path.name) or path.resolve().name
        if not _NAME_RE.fullmatch(name):
            _entry_error(
                text,
                f"the default name {name!r} may hold only A-Z a-z 0-9 . _ -: give one as NAME=PATH",
            )
    elif not _NAME_RE.fullmatch(name):
        _entry_error(text, f"invalid adapter name {name!r}: use only A-Z a-z 0-9 . _ - (not dots alone)")
    return AdapterEntry(name=name, path=path, scale=scale)


def parse_adapter_list(values: list[str] | str) -> list[AdapterEntry]:
    """Entries from the command line (a list) or from CRIA_LORA_ADAPTERS (a JSON list of
    strings, or one string of comma-separated entries). Two entries may not share a name."""
    if isinstance(values, str):
        text = values.strip()
        if text.startswith("["):
            try:
                loaded = json.loads(text)
            except ValueError:
                raise StartupError(f"{FLAG}: {text!r} is not a valid JSON list") from None
            if not isinstance(loaded, list) or not all(isinstance(v, str) for v in loaded):
                raise StartupError(f"{FLAG}: the JSON list must hold strings only")
            values = loaded
        else:
            values = [part for part in text.split(",") if part.strip()]
    entries = [parse_adapter_entry(v) for v in values]
    seen: dict[str, AdapterEntry] = {}
    for entry in entries:
        if entry.name in seen:
            raise StartupError(
                f"{FLAG}: two adapters are named '{entry.name}' ({seen[entry.name].path} and "
                f"{entry.path}): give one another name with NAME=PATH"
            )
        seen[entry.name] = entry
    return entries


# --- the GGUF check ---------------------------------------------------------------------------


def adapter_error(entry: AdapterEntry, path: Path, what: str) -> NoReturn:
    raise StartupError(f"{FLAG} '{entry.name}' ({path}): {what}")


def _describe(field: Any) -> str:
    from gguf import GGUFValueType

    types = list(field.types)
    if not types:
        return "empty"
    if types[0] == GGUFValueType.ARRAY:
        inner = types[1].name.lower() if len(types) > 1 else "nothing"
        return f"an array of {inner}"
    return f"a {types[0].name.lower()}"


def _string_kv(reader: Any, key: str, entry: AdapterEntry, path: Path) -> str | None:
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return None
    if list(field.types) != [GGUFValueType.STRING]:
        adapter_error(entry, path, f"{key} must be a string, not {_describe(field)}")
    return str(field.contents())


def _open_reader(entry: AdapterEntry, path: Path) -> Any:
    """gguf.GGUFReader, its failures (which are of any type on a damaged file) told apart with
    our own scanner: a truncated file then says which tensor runs past its end."""
    from gguf import GGUFReader

    try:
        return GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError, IndexError, KeyError... on damage
        reader_error = f"{type(exc).__name__}: {exc}"
    try:
        _, tensors, data_offset = scan_gguf(path)
    except (GGUFError, OSError) as exc:
        adapter_error(entry, path, f"not a readable GGUF file ({exc})")
    size = path.stat().st_size
    for name, t in tensors.items():
        if t.type in _LORA_TYPES and data_offset + t.offset + _nbytes(t.ne, t.type) > size:
            adapter_error(
                entry, path, f"truncated: the data of tensor '{name}' runs past the end of the file"
            )
    adapter_error(entry, path, f"not a readable GGUF file ({reader_error})")


def _nbytes(ne: tuple[int, ...], type_id: int) -> int:
    n = math.prod(ne)
    return {_F32: 4 * n, _F16: 2 * n, _BF16: 2 * n, _Q8_0: 34 * (n // 32)}[type_id]


def _check_metadata(reader: Any, entry: AdapterEntry, path: Path, base: BaseModel) -> float | None:
    from gguf import GGUFValueType

    for key, field in reader.fields.items():
        if key != field.name:  # gguf-py files a repeated key under "KEY_OFFSET" (llama.cpp refuses)
            adapter_error(entry, path, f"metadata key {field.name} appears twice")
    general_type = _string_kv(reader, "general.type", entry, path)
    if general_type != "adapter":
        what = "missing" if general_type is None else repr(general_type)
        adapter_error(entry, path, f"not a LoRA adapter: general.type is {what}, not 'adapter'")
    arch = _string_kv(reader, "general.architecture", entry, path)
    if arch != base.architecture:
        adapter_error(
            entry, path, f"made for a '{arch}' model, but the base model is '{base.architecture}'"
        )
    adapter_type = _string_kv(reader, "adapter.type", entry, path)
    if adapter_type != "lora":
        what = "missing" if adapter_type is None else repr(adapter_type)
        adapter_error(entry, path, f"adapter.type is {what}, not 'lora' (a control vector?)")
    if "adapter.alora.invocation_tokens" in reader.fields:
        adapter_error(
            entry,
            path,
            "an aLoRA (adapter.alora.invocation_tokens): adapters that switch on "
            "at invocation tokens are not supported, only plain LoRA",
        )
    field = reader.fields.get("adapter.lora.alpha")
    if field is None:
        return None
    if list(field.types) != [GGUFValueType.FLOAT32]:
        adapter_error(entry, path, f"adapter.lora.alpha must be a float32, not {_describe(field)}")
    alpha = float(field.contents())
    if not math.isfinite(alpha):
        adapter_error(entry, path, f"adapter.lora.alpha is {alpha}")
    return alpha


def _ne4(shape: Any) -> tuple[int, int, int, int]:
    ne = [int(x) for x in shape] + [1, 1, 1, 1]
    return ne[0], ne[1], ne[2], ne[3]


def _check_layout(reader: Any, entry: AdapterEntry, path: Path) -> None:
    """Tensor data where llama.cpp's GGUF parser expects it (in order, aligned) and inside the
    file: llama.cpp refuses the first, and reads the second only after allocating."""
    size = path.stat().st_size
    expected = 0
    for t in reader.tensors:
        rel = int(t.data_offset) - int(reader.data_offset)
        if rel != expected:
            adapter_error(
                entry,
                path,
                f"corrupt: tensor '{t.name}' is at data offset {rel}, expected {expected}",
            )
        if int(t.data_offset) + int(t.n_bytes) > size:
            adapter_error(
                entry,
                path,
                f"truncated: the data of tensor '{t.name}' runs past the end of the file",
            )
        expected += -(-int(t.n_bytes) // int(reader.alignment)) * int(reader.alignment)


def check_gguf_adapter(entry: AdapterEntry, base: Path) -> AdapterInfo:
    """Check a GGUF LoRA against the base GGUF (everything llama.cpp checks, and what it would
    abort on). Raises StartupError naming the adapter and the fault."""
    return check_adapter_file(entry, entry.path, read_base(base), source="gguf")


def check_adapter_file(
    entry: AdapterEntry, path: Path, base: BaseModel, *, source: Literal["gguf", "peft"]
) -> AdapterInfo:
    if not path.exists():
        adapter_error(entry, path, "no such file or folder")
    if not path.is_file():
        adapter_error(
            entry, path, "not a file (a PEFT adapter is a folder with adapter_config.json)"
        )
    if not is_gguf(path):
        hint = (
            " (for a PEFT adapter give its folder)"
            if path.suffix in (".safetensors", ".bin")
            else ""
        )
        adapter_error(entry, path, f"not a GGUF file{hint}")
    reader = _open_reader(entry, path)
    alpha = _check_metadata(reader, entry, path, base)
    _check_layout(reader, entry, path)
    pairs: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    for t in reader.tensors:
        name = str(t.name)
        if name.endswith((".lora_a", ".lora_b")):
            pairs.setdefault(name[: -len(".lora_a")], {})[name[-1]] = t
        elif name.endswith("_norm.weight"):
            ignored.append(name)  # llama.cpp skips these (mergekit-extract-lora adds them)
        else:
            adapter_error(entry, path, f"tensor '{name}' is neither a .lora_a nor a .lora_b")
    if not pairs:
        adapter_error(entry, path, "no lora_a/lora_b tensors")
    if ignored:
        log.warning(
            "LoRA adapter '%s': %d norm tensors ignored (llama.cpp does not apply them)",
            entry.name,
            len(ignored),
        )
    ranks = [_check_pair(entry, path, base, name, ab) for name, ab in pairs.items()]
    return AdapterInfo(
        name=entry.name,
        path=path,
        scale=entry.scale,
        rank=max(ranks),
        alpha=alpha,
        n_tensors=2 * len(pairs),
        source=source,
    )


def _check_pair(
    entry: AdapterEntry, path: Path, base: BaseModel, name: str, ab: dict[str, Any]
) -> int:
    """One X.lora_a / X.lora_b pair against base tensor X; returns its rank."""
    for part, other in (("a", "b"), ("b", "a")):
        if part not in ab:
            adapter_error(entry, path, f"'{name}' has a lora_{other} but no lora_{part}")
    a, b = ab["a"], ab["b"]
    for t in (a, b):
        type_id = int(t.tensor_type)
        if type_id not in _LORA_TYPES:
            adapter_error(
                entry,
                path,
                f"tensor '{t.name}' is {t.tensor_type.name}: lora tensors must be "
                f"{', '.join(_LORA_TYPES.values())}",
            )
        ne = _ne4(t.shape)
        if ne[2] != 1 or ne[3] != 1:
            adapter_error(
                entry, path, f"tensor '{t.name}' has shape {list(ne)}: lora tensors are 2-D"
            )
        if type_id == _Q8_0 and ne[0] % 32:
            adapter_error(
                entry, path, f"tensor '{t.name}' is Q8_0 with rows of {ne[0]}, not a multiple of 32"
            )
    if name not in base.tensors:
        adapter_error(
            entry,
            path,
            f"'{name}' is not a tensor of the base model (an adapter for another model?)",
        )
    base_ne, base_type = base.tensors[name]
    w = _ne4(base_ne)
    if w[2] != 1 or w[3] != 1:
        adapter_error(
            entry, path, f"'{name}' is a {len(base_ne)}-D tensor (MoE experts): not supported"
        )
    if base_type == _NVFP4:
        adapter_error(
            entry, path, f"'{name}' is NVFP4 in the base model: llama.cpp cannot apply a LoRA to it"
        )
    an, bn = _ne4(a.shape), _ne4(b.shape)
    # llama.cpp's layout (see build_inp_embd for embeddings, whose lora_a rows are picked per
    # token): lora_a ne=[n_in, r], lora_b ne=[r, n_out]; token_embd: [r, n_vocab], [r, n_embd].
    embd = name == _TOKEN_EMBD
    rank = an[0] if embd else an[1]
    if bn[0] != rank:
        adapter_error(entry, path, f"'{name}': its lora_a has rank {rank}, its lora_b {bn[0]}")
    n_in, n_out = (an[1], bn[1]) if embd else (an[0], bn[1])
    want_in, want_out = (w[1], w[0]) if embd else (w[0], w[1])
    if (n_in, n_out) != (want_in, want_out):
        adapter_error(
            entry,
            path,
            f"'{name}' maps {n_in} inputs to {n_out} outputs, the base model's "
            f"{want_in} to {want_out}: an adapter for another model?",
        )
    if rank < 1:
        adapter_error(entry, path, f"'{name}' has rank 0")
    if embd and "output.weight" not in base.tensors:
        # llama.cpp then multiplies by token_embd for the output too, and applies this lora
        # there as well, in the other layout: ggml_mul_mat asserts at the first decode.
        adapter_error(
            entry,
            path,
            "a LoRA on token_embd.weight, but the base model has no output.weight "
            "(it ties the output to the embeddings): llama.cpp cannot apply it",
        )
    return rank


# --- all of them ------------------------------------------------------------------------------


def prepare_adapters(entries: list[AdapterEntry], base: Path, cache_dir: Path) -> list[AdapterInfo]:
    """Check every adapter (converting PEFT folders into cache_dir/lora first) in order.
    Names must be unique here; the caller checks them against the served model ids."""
    from cria.models.lora_peft import convert_peft

    seen: set[str] = set()
    for entry in entries:
        if entry.name in seen:
            raise StartupError(f"{FLAG}: two adapters are named '{entry.name}'")
        seen.add(entry.name)
    model = read_base(base)
    infos = []
    for entry in entries:
        if entry.path.is_dir():
            converted = convert_peft(entry, base, cache_dir)
            infos.append(check_adapter_file(entry, converted, model, source="peft"))
        elif entry.path.exists():
            infos.append(check_adapter_file(entry, entry.path, model, source="gguf"))
        else:
            adapter_error(entry, entry.path, "no such file or folder")
    return infos


__all__ = [
    "AdapterEntry",
    "AdapterInfo",
    "BaseModel",
    "check_gguf_adapter",
    "parse_adapter_entry",
    "parse_adapter_list",
    "prepare_adapters",
    "read_base",
]
