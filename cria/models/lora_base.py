"""The base model an adapter is checked against: its tensors' names, shapes and types, read
without gguf-py (whose type table lags llama.cpp's: a base with MXFP4 weights would not read)
and without reading any tensor data. Split GGUFs are read across their files."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cria.errors import StartupError
from cria.models.gguf import MAGIC, GGUFError, _string, _u32, _u64, _value

FLAG = "--lora-adapters"


@dataclass(frozen=True, slots=True)
class BaseModel:
    """What an adapter is checked against: tensor name -> (ne, ggml type id), and the hyper-
    parameters the PEFT conversion needs."""

    path: Path
    architecture: str
    metadata: Mapping[str, Any]
    tensors: Mapping[str, tuple[tuple[int, ...], int]]

    def hparam(self, key: str) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    ne: tuple[int, ...]
    type: int
    offset: int  # relative to the data section


def scan_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorInfo], int]:
    """Metadata (long arrays as their length), tensor infos and the data section's offset,
    without reading any tensor data. Raises GGUFError or OSError."""
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise GGUFError("not a GGUF file")
        version = _u32(f)
        if version not in (2, 3):
            raise GGUFError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = _u64(f), _u64(f)
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = _string(f)
            meta[key] = _value(f, _u32(f), False)
        tensors: dict[str, TensorInfo] = {}
        for _ in range(n_tensors):
            name = _string(f)
            n_dims = _u32(f)
            if n_dims > 4:
                raise GGUFError(f"tensor {name!r} has {n_dims} dimensions")
            ne = tuple(_u64(f) for _ in range(n_dims))
            tensors[name] = TensorInfo(ne=ne, type=_u32(f), offset=_u64(f))
        align = meta.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise GGUFError(f"invalid general.alignment {align!r}")
        return meta, tensors, -(-f.tell() // align) * align


def _shards(path: Path, meta: Mapping[str, Any]) -> list[Path]:
    """A split GGUF's files (llama.cpp's PREFIX-%05d-of-%05d.gguf), the first one given."""
    count = meta.get("split.count")
    if not isinstance(count, int) or count <= 1:
        return [path]
    m = re.fullmatch(r"(.*)-00001-of-(\d{5})\.gguf", path.name)
    if m is None or int(m.group(2)) != count:
        raise GGUFError(
            f"a split GGUF ({count} files) not named like PREFIX-00001-of-{count:05d}.gguf"
        )
    return [
        path.with_name(f"{m.group(1)}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)
    ]


@functools.lru_cache(maxsize=4)
def _read_base_cached(path: Path, _size: int, _mtime_ns: int) -> BaseModel:
    try:
        meta, tensors, _ = scan_gguf(path)
        for shard in _shards(path, meta)[1:]:
            tensors.update(scan_gguf(shard)[1])
    except (GGUFError, OSError) as exc:
        raise StartupError(f"{FLAG}: cannot read the base model {path}: {exc}") from None
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise StartupError(f"{FLAG}: the base model {path} has no general.architecture")
    shapes = {name: (t.ne, t.type) for name, t in tensors.items()}
    return BaseModel(path=path, architecture=arch, metadata=meta, tensors=shapes)


def read_base(base: Path) -> BaseModel:
    """The base model's tensors and metadata, read once per file version."""
    try:
        st = base.stat()
    except OSError as exc:
        raise StartupError(f"{FLAG}: cannot read the base model {base}: {exc}") from None
    return _read_base_cached(base.resolve(), st.st_size, st.st_mtime_ns)


def missing_data(path: Path) -> str | None:
    """What is wrong if the file ends before its tensors' data does (a truncated download or
    copy: llama.cpp would fail only once the engine loads it), else None. Tensors of a type this
    gguf package does not size are left out of the check."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        _meta, tensors, data_start = scan_gguf(path)
        size = path.stat().st_size
    except (GGUFError, OSError) as exc:
        return f"cannot read its tensor table: {exc}"
    end = 0
    for info in tensors.values():
        try:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(info.type)]
        except (ValueError, KeyError):
            continue
        n = 1
        for d in info.ne:
            n *= d
        end = max(end, data_start + info.offset + n // block * type_size)
    if end > size:
        return f"truncated: its tensors need {end} bytes and the file has {size}"
    return None
