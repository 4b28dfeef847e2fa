"""read_metadata / is_gguf on GGUF files written by hand."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import pytest

from cria.models.gguf import GGUFError, is_gguf, read_metadata

from ._gguf import (
    ARRAY,
    BOOL,
    F32,
    F64,
    I8,
    I16,
    I32,
    I64,
    STRING,
    U8,
    U16,
    U32,
    U64,
    gguf_bytes,
    gguf_string,
    kv,
    write_gguf,
)


def test_every_scalar_type_and_a_string(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf",
        [
            kv("u8", U8, 255),
            kv("i8", I8, -128),
            kv("u16", U16, 65535),
            kv("i16", I16, -32768),
            kv("u32", U32, 4_000_000_000),
            kv("i32", I32, -2_000_000_000),
            kv("f32", F32, 0.5),
            kv("bool_t", BOOL, True),
            kv("bool_f", BOOL, False),
            kv("u64", U64, 1 << 63),
            kv("i64", I64, -(1 << 62)),
            kv("f64", F64, math.pi),
            kv("general.architecture", STRING, "llama"),
            kv("unicode", STRING, "日本 🦙"),
        ],
    )
    meta = read_metadata(path)
    assert meta == {
        "GGUF.version": 3,
        "u8": 255,
        "i8": -128,
        "u16": 65535,
        "i16": -32768,
        "u32": 4_000_000_000,
        "i32": -2_000_000_000,
        "f32": 0.5,
        "bool_t": True,
        "bool_f": False,
        "u64": 1 << 63,
        "i64": -(1 << 62),
        "f64": math.pi,
        "general.architecture": "llama",
        "unicode": "日本 🦙",
    }
    assert meta["bool_t"] is True


def test_no_key_values(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "empty.gguf", [], version=2, n_tensors=7)
    assert read_metadata(path) == {"GGUF.version": 2}


def test_short_arrays_are_kept(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf",
        [
            kv("langs", ARRAY, ["en", "fr"], STRING),
            kv("ints", ARRAY, list(range(64)), I32),  # exactly the limit: kept
            kv("empty", ARRAY, [], U8),
        ],
    )
    meta = read_metadata(path)
    assert meta["langs"] == ["en", "fr"]
    assert meta["ints"] == list(range(64))
    assert meta["empty"] == []


def test_long_arrays_are_skipped_as_their_length_and_later_keys_still_read(tmp_path: Path) -> None:
    path = write_gguf(
        tmp_path / "m.gguf",
        [
            kv("scores", ARRAY, [1.0] * 65, F32),
            kv("tokens", ARRAY, [f"tok{i}" for i in range(1000)], STRING),
            kv("after", U32, 7),
        ],
    )
    meta = read_metadata(path)
    assert meta["scores"] == 65
    assert meta["tokens"] == 1000
    assert meta["after"] == 7


def test_long_array_of_arrays_is_skipped(tmp_path: Path) -> None:
    inner = struct.pack("<IQ", U16, 3) + struct.pack("<3H", 1, 2, 3)
    outer = gguf_string("merges") + struct.pack("<IIQ", ARRAY, ARRAY, 70) + inner * 70
    path = write_gguf(tmp_path / "m.gguf", [outer, kv("after", STRING, "ok")])
    meta = read_metadata(path)
    assert meta["merges"] == 70
    assert meta["after"] == "ok"


def test_nested_short_array_is_kept(tmp_path: Path) -> None:
    inner = struct.pack("<IQ", U16, 2) + struct.pack("<2H", 4, 5)
    outer = gguf_string("pairs") + struct.pack("<IIQ", ARRAY, ARRAY, 2) + inner * 2
    meta = read_metadata(write_gguf(tmp_path / "m.gguf", [outer]))
    assert meta["pairs"] == [[4, 5], [4, 5]]


def test_keep_arrays_keeps_a_wanted_long_array(tmp_path: Path) -> None:
    tokens = [f"tok{i}" for i in range(200)]
    path = write_gguf(
        tmp_path / "m.gguf",
        [
            kv("tokenizer.ggml.tokens", ARRAY, tokens, STRING),
            kv("other", ARRAY, list(range(100)), U32),
        ],
    )
    seen: list[str] = []

    def keep(key: str) -> bool:
        seen.append(key)
        return key == "tokenizer.ggml.tokens"

    meta = read_metadata(path, keep_arrays=keep)
    assert meta["tokenizer.ggml.tokens"] == tokens
    assert meta["other"] == 100
    assert "tokenizer.ggml.tokens" in seen and "other" in seen


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"ggjt" + b"\x00" * 64)  # a legacy GGML magic
    assert not is_gguf(path)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_metadata(path)


def test_empty_file_is_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    assert not is_gguf(path)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_metadata(path)


def test_is_gguf_on_missing_path_and_directory(tmp_path: Path) -> None:
    assert not is_gguf(tmp_path / "missing.gguf")
    assert not is_gguf(tmp_path)
    assert is_gguf(write_gguf(tmp_path / "ok.gguf", []))


def test_version_1_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "old.gguf", [], version=1)
    with pytest.raises(GGUFError, match="version 1 is too old"):
        read_metadata(path)


@pytest.mark.parametrize("keep", [4, 5, 9, 13, 21, 40])
def test_truncated_header_raises(tmp_path: Path, keep: int) -> None:
    full = gguf_bytes([kv("general.architecture", STRING, "llama")])
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:keep])
    assert is_gguf(path)
    with pytest.raises(GGUFError, match="truncated"):
        read_metadata(path)


def test_truncated_in_every_position_of_the_key_values(tmp_path: Path) -> None:
    full = gguf_bytes(
        [kv("a", U32, 1), kv("langs", ARRAY, ["en", "fr"], STRING), kv("z", STRING, "end")]
    )
    path = tmp_path / "cut.gguf"
    for n in range(4, len(full)):
        path.write_bytes(full[:n])
        with pytest.raises(GGUFError, match="truncated"):
            read_metadata(path)
    path.write_bytes(full)
    assert read_metadata(path)["z"] == "end"


def test_more_key_values_announced_than_present(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "m.gguf", [kv("a", U8, 1)], n_kv=2)
    with pytest.raises(GGUFError, match="truncated"):
        read_metadata(path)


def test_truncated_inside_a_skipped_string_array(tmp_path: Path) -> None:
    full = gguf_bytes([kv("tokens", ARRAY, [f"t{i}" for i in range(100)], STRING)])
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:-3])
    with pytest.raises(GGUFError, match="truncated"):
        read_metadata(path)


def test_truncated_inside_a_skipped_scalar_array(tmp_path: Path) -> None:
    full = gguf_bytes([kv("scores", ARRAY, [0.0] * 100, F32)])
    path = tmp_path / "cut.gguf"
    path.write_bytes(full[:-40])
    with pytest.raises(GGUFError, match="truncated"):
        read_metadata(path)


def test_unknown_value_type(tmp_path: Path) -> None:
    bad = gguf_string("weird") + struct.pack("<I", 99) + b"\x00" * 8
    path = write_gguf(tmp_path / "m.gguf", [bad])
    with pytest.raises(GGUFError, match="unknown GGUF value type 99"):
        read_metadata(path)


def test_implausible_string_length(tmp_path: Path) -> None:
    bad = struct.pack("<Q", 1 << 40) + b"key"
    path = write_gguf(tmp_path / "m.gguf", [bad])
    with pytest.raises(GGUFError, match="implausible string length"):
        read_metadata(path)


def test_invalid_utf8_in_a_string_is_replaced(tmp_path: Path) -> None:
    pair = gguf_string("name") + struct.pack("<I", STRING) + gguf_string(b"a\xffb")
    path = write_gguf(tmp_path / "m.gguf", [pair])
    assert read_metadata(path)["name"] == "a\ufffdb"
