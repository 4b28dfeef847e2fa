"""A minimal GGUF metadata reader: enough to validate a model before llama.cpp loads it.

Reads the header and the key/value section only (never tensors). Pure Python, no numpy.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

MAGIC = b"GGUF"

# GGUF value types -> struct format (scalars only; 8 = string, 9 = array).
_SCALARS: dict[int, str] = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}
_STRING, _ARRAY = 8, 9
# Arrays longer than this are skipped (kept as their length) unless their key is wanted.
_KEEP_ARRAY_MAX = 64


class GGUFError(ValueError):
    pass


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise GGUFError("truncated GGUF header")
    return data


def _u32(f: BinaryIO) -> int:
    return int(struct.unpack("<I", _read(f, 4))[0])


def _u64(f: BinaryIO) -> int:
    return int(struct.unpack("<Q", _read(f, 8))[0])


def _string(f: BinaryIO) -> str:
    n = _u64(f)
    if n > 1 << 28:
        raise GGUFError("implausible string length in GGUF header")
    return _read(f, n).decode("utf-8", errors="replace")


def _value(f: BinaryIO, vtype: int, keep: bool) -> Any:
    if vtype in _SCALARS:
        fmt = _SCALARS[vtype]
        return struct.unpack(fmt, _read(f, struct.calcsize(fmt)))[0]
    if vtype == _STRING:
        return _string(f)
    if vtype == _ARRAY:
        itype, count = _u32(f), _u64(f)
        if keep or count <= _KEEP_ARRAY_MAX:
            return [_value(f, itype, True) for _ in range(count)]
        if itype in _SCALARS:
            f.seek(struct.calcsize(_SCALARS[itype]) * count, 1)
            if f.tell() > _size(f):  # seeking past the end does not fail by itself
                raise GGUFError("truncated GGUF header")
        else:
            for _ in range(count):
                _value(f, itype, False)
        return count
    raise GGUFError(f"unknown GGUF value type {vtype}")


def _size(f: BinaryIO) -> int:
    return os.fstat(f.fileno()).st_size


def is_gguf(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def read_metadata(path: Path, *, keep_arrays: Callable[[str], bool] = lambda _k: False) -> dict[str, Any]:
    """Return the GGUF key/value metadata. Long arrays are replaced by their length unless
    `keep_arrays(key)` is true."""
    with path.open("rb") as f:
        if f.read(4) != MAGIC:
            raise GGUFError("not a GGUF file")
        version = _u32(f)
        if version < 2:
            raise GGUFError(f"GGUF version {version} is too old")
        _n_tensors, n_kv = _u64(f), _u64(f)
        meta: dict[str, Any] = {"GGUF.version": version}
        for _ in range(n_kv):
            key = _string(f)
            meta[key] = _value(f, _u32(f), keep_arrays(key))
        return meta
