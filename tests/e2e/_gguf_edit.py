"""Copy a GGUF (v3) model while adding metadata key/values, for tests that need a model with
metadata the bundled one lacks (e.g. fill-in-the-middle token ids).

The key/value section and the tensor infos are copied verbatim, the new pairs are appended to
the key/value section (n_kv bumped), and the tensor data section is re-aligned to
`general.alignment` and copied verbatim: tensor offsets are relative to that section, so they
stay valid.
"""

from __future__ import annotations

import shutil
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from cria.models.gguf import _read, _string, _u32, _u64  # the package's own GGUF reader
from tests.unit._gguf import _FMT, ARRAY, STRING, U32

DEFAULT_ALIGNMENT = 32
ALIGNMENT_KEY = "general.alignment"


def _skip_value(f: BinaryIO, vtype: int) -> None:
    if vtype == STRING:
        f.seek(_u64(f), 1)
    elif vtype == ARRAY:
        item_type, count = _u32(f), _u64(f)
        if item_type in _FMT:
            f.seek(struct.calcsize(_FMT[item_type]) * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, item_type)
    elif vtype in _FMT:
        f.seek(struct.calcsize(_FMT[vtype]), 1)
    else:
        raise ValueError(f"unknown GGUF value type {vtype}")


def copy_with_metadata(src: Path, dst: Path, pairs: Iterable[bytes]) -> Path:
    """Copy the GGUF at `src` to `dst`, appending `pairs` (encoded with tests.unit._gguf.kv)
    to its metadata. The keys must not be in the file already."""
    added = list(pairs)
    with src.open("rb") as f:
        if _read(f, 4) != b"GGUF":
            raise ValueError(f"{src} is not a GGUF file")
        version = _u32(f)
        if version != 3:
            raise ValueError(f"GGUF version {version}: only version 3 is handled")
        n_tensors, n_kv = _u64(f), _u64(f)
        kv_start = f.tell()
        alignment = DEFAULT_ALIGNMENT
        keys = set()
        for _ in range(n_kv):
            key = _string(f)
            vtype = _u32(f)
            keys.add(key)
            if key == ALIGNMENT_KEY:
                assert vtype == U32, "general.alignment must be a uint32"
                alignment = _u32(f)
            else:
                _skip_value(f, vtype)
        kv_section = _read_range(f, kv_start)
        for pair in added:
            (n,) = struct.unpack_from("<Q", pair)
            key = pair[8 : 8 + n].decode("utf-8")
            if key in keys:
                raise ValueError(f"{src} already has the key {key!r}")
        tensors_start = f.tell()
        for _ in range(n_tensors):
            f.seek(_u64(f), 1)  # name
            n_dims = _u32(f)
            f.seek(8 * n_dims + 4 + 8, 1)  # dims, type, offset
        tensor_infos = _read_range(f, tensors_start)
        data_start = _align(f.tell(), alignment)
        f.seek(data_start)

        with dst.open("wb") as out:
            out.write(b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv + len(added)))
            out.write(kv_section)
            out.write(b"".join(added))
            out.write(tensor_infos)
            out.write(b"\0" * (_align(out.tell(), alignment) - out.tell()))
            shutil.copyfileobj(f, out, length=1 << 22)
    return dst


def _read_range(f: BinaryIO, start: int) -> bytes:
    """The bytes from `start` to the current position (which is kept)."""
    end = f.tell()
    f.seek(start)
    data = _read(f, end - start)
    assert f.tell() == end
    return data


def _align(offset: int, alignment: int) -> int:
    return offset + (-offset % alignment)
