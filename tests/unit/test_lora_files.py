"""LoRA adapter files (cria/models/lora.py, lora_peft.py): the -l entry syntax, the checks that
keep malformed GGUFs away from llama.cpp (which aborts on some), and the PEFT -> GGUF
conversion, down to llama.cpp running the converted adapter exactly like the same adapter
written directly in its own layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cria.errors import StartupError
from cria.models.lora import (
    AdapterEntry,
    check_gguf_adapter,
    parse_adapter_entry,
    parse_adapter_list,
)
from tests.lora_fixtures import (
    MALFORMED,
    base_shapes,
    lora_pairs,
    make_gguf_adapter,
    make_malformed,
    write_lora_gguf,
)
from tests.unit._lora import _error

# --- the entry syntax -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name", "path", "scale"),
    [
        ("./sql.gguf", "sql", "sql.gguf", 1.0),
        ("sql=./x/adapter.gguf:0.5", "sql", "x/adapter.gguf", 0.5),
        ("./my-lora/", "my-lora", "my-lora", 1.0),
        ("my-lora", "my-lora", "my-lora", 1.0),
        ("dir.v2/:0.5", "dir.v2", "dir.v2", 0.5),
        ("a.gguf:2", "a", "a.gguf", 2.0),
        ("a.gguf:-0.25", "a", "a.gguf", -0.25),
        ("a.gguf:1e-1", "a", "a.gguf", 0.1),
        ("a.gguf:.5", "a", "a.gguf", 0.5),
        ("  a.gguf:0  ", "a", "a.gguf", 0.0),
        ("v1.2_x-y=/abs/x.gguf", "v1.2_x-y", "/abs/x.gguf", 1.0),
        ("x=a:b.gguf", "x", "a:b.gguf", 1.0),  # "b.gguf" is no number: part of the path
        ("x=run=3.gguf:1.5", "x", "run=3.gguf", 1.5),
        ("x=./run=3/a.gguf", "x", "run=3/a.gguf", 1.0),
        ("./run=3/a.gguf", "a", "run=3/a.gguf", 1.0),  # '/' before '=': no name given
    ],
)
def test_entry_syntax(
    text: str, name: str, path: str, scale: float, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # none of these paths exists
    assert parse_adapter_entry(text) == AdapterEntry(name=name, path=Path(path), scale=scale)


def test_a_path_that_exists_as_written_is_not_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ad.gguf:0.5").write_bytes(b"")
    (tmp_path / "k=v.gguf").write_bytes(b"")
    assert parse_adapter_entry("n=ad.gguf:0.5") == AdapterEntry("n", Path("ad.gguf:0.5"), 1.0)
    assert parse_adapter_entry("ok=k=v.gguf") == AdapterEntry("ok", Path("k=v.gguf"), 1.0)
    # Not "name k, path v.gguf": the file k=v.gguf exists, and its stem is no valid name.
    with pytest.raises(StartupError) as excinfo:
        parse_adapter_entry("k=v.gguf")
    assert "'k=v'" in _error(excinfo) and "NAME=PATH" in _error(excinfo)


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert parse_adapter_entry("s=~/a.gguf:3").path == tmp_path / "a.gguf"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty adapter entry"),
        ("   ", "empty adapter entry"),
        ("=x.gguf", "empty adapter name"),
        ("bad name=x.gguf", "invalid adapter name 'bad name'"),
        ("sql!=x.gguf", "invalid adapter name"),
        ("sql=", "no adapter path"),
        ("sql=:0.5", "no adapter path"),
        ("x.gguf:inf", "default name 'x.gguf:inf'"),  # inf is no scale: then it is a path
        ("x.gguf:nan", "default name"),
        ("x.gguf:1_0", "default name"),
        ("naïve.gguf", "default name 'naïve'"),
    ],
)
def test_entry_errors(
    text: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StartupError) as excinfo:
        parse_adapter_entry(text)
    message = _error(excinfo)
    assert message.startswith("--lora-adapters ") and fragment in message


@pytest.mark.parametrize(
    "values",
    [
        ["a=x.gguf", "b=y.gguf:0.5"],
        '["a=x.gguf", "b=y.gguf:0.5"]',
        '  ["a=x.gguf",\n "b=y.gguf:0.5"] ',
        "a=x.gguf,b=y.gguf:0.5",
        " a=x.gguf , b=y.gguf:0.5 ,",
    ],
)
def test_adapter_lists(values: list[str] | str) -> None:
    assert parse_adapter_list(values) == [
        AdapterEntry("a", Path("x.gguf"), 1.0),
        AdapterEntry("b", Path("y.gguf"), 0.5),
    ]


def test_a_json_list_keeps_commas_in_paths() -> None:
    assert parse_adapter_list('["a=x,1.gguf"]') == [AdapterEntry("a", Path("x,1.gguf"), 1.0)]
    assert parse_adapter_list("") == [] and parse_adapter_list([]) == []


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        (["x.gguf", "sub/x.gguf"], "two adapters are named 'x' (x.gguf and sub/x.gguf)"),
        ("a=x.gguf,a=y.gguf", "two adapters are named 'a'"),
        ("[x.gguf]", "not a valid JSON list"),
        ('["a.gguf", 1]', "must hold strings only"),
        ("b=y.gguf,=x.gguf", "empty adapter name"),
    ],
)
def test_adapter_list_errors(values: list[str] | str, fragment: str) -> None:
    with pytest.raises(StartupError) as excinfo:
        parse_adapter_list(values)
    assert fragment in _error(excinfo)


# --- GGUF checks ------------------------------------------------------------------------------


def test_a_good_adapter_passes(base: Path, tmp_path: Path) -> None:
    path = make_gguf_adapter(base, tmp_path / "good.gguf", rank=4, alpha=8.0)
    info = check_gguf_adapter(AdapterEntry("good", path, 0.75), base)
    assert (info.name, info.path, info.scale, info.rank, info.alpha, info.source) == (
        "good",
        path,
        0.75,
        4,
        8.0,
        "gguf",
    )
    assert info.n_tensors == 2 * 3 * base_shapes(base).n_layer


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_adapters_are_refused_by_name(kind: str, base: Path, tmp_path: Path) -> None:
    path = make_malformed(base, tmp_path / f"{kind}.gguf", kind)
    with pytest.raises(StartupError) as excinfo:
        check_gguf_adapter(AdapterEntry("bad-one", path, 1.0), base)
    message = _error(excinfo)
    assert message.startswith(f"--lora-adapters 'bad-one' ({path}): "), message
    assert MALFORMED[kind] in message, message


def test_what_is_no_gguf_file_is_refused(base: Path, tmp_path: Path) -> None:
    cases = {
        tmp_path / "missing.gguf": "no such file or folder",
        tmp_path: "not a file",
    }
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(b"\x08" + b"\0" * 7 + b"{}      ")
    cases[weights] = "not a GGUF file (for a PEFT adapter give its folder)"
    for path, fragment in cases.items():
        with pytest.raises(StartupError) as excinfo:
            check_gguf_adapter(AdapterEntry("x", path, 1.0), base)
        assert fragment in _error(excinfo)


def test_norm_tensors_are_ignored_as_llama_cpp_does(
    base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ((a, b),) = lora_pairs(base, targets=("attn_q",), layers=(0,)).values()
    tensors = {
        "blk.0.attn_q.weight.lora_a": a,
        "blk.0.attn_q.weight.lora_b": b,
        "blk.0.attn_norm.weight": np.ones(576, np.float32),  # what mergekit-extract-lora adds
    }
    path = write_lora_gguf(tmp_path / "norm.gguf", tensors)
    with caplog.at_level("WARNING", logger="cria.lora"):
        assert check_gguf_adapter(AdapterEntry("n", path, 1.0), base).n_tensors == 2
    assert "1 norm tensors ignored" in caplog.text


def test_f16_bf16_and_q8_0_tensors_pass(base: Path, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    ((a, b),) = lora_pairs(base, rank=32, targets=("attn_q",), layers=(0,)).values()
    tensors = {
        "blk.0.attn_q.weight.lora_a": a.astype(np.float16),
        "blk.0.attn_q.weight.lora_b": quants.quantize(b, T.BF16),
    }
    path = write_lora_gguf(
        tmp_path / "mixed.gguf", tensors, raw_dtypes={"blk.0.attn_q.weight.lora_b": T.BF16}
    )
    assert check_gguf_adapter(AdapterEntry("m", path, 1.0), base).rank == 32
    tensors["blk.0.attn_q.weight.lora_b"] = quants.quantize(b, T.Q8_0)  # rows of r = 32
    path = write_lora_gguf(
        tmp_path / "q8.gguf", tensors, raw_dtypes={"blk.0.attn_q.weight.lora_b": T.Q8_0}
    )
    assert check_gguf_adapter(AdapterEntry("q", path, 1.0), base).rank == 32


# llama.cpp itself, on what the checks refuse: it aborts the process (a GGML_ASSERT at load or at
# the first decode) or crashes. A good adapter in the same harness decodes.
_PROBE = """
import ctypes, sys
from cria.engine._bindings import llama_cpp
llama_cpp.llama_backend_init()
p = llama_cpp.llama_model_default_params(); p.n_gpu_layers = 0
model = llama_cpp.llama_model_load_from_file(sys.argv[1].encode(), p)
adapter = llama_cpp.llama_adapter_lora_init(model, sys.argv[2].encode())
if not adapter:
    sys.exit(3)
cp = llama_cpp.llama_context_default_params(); cp.n_ctx = 64; cp.n_threads = cp.n_threads_batch = 1
ctx = llama_cpp.llama_init_from_model(model, cp)
ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(adapter)
llama_cpp.llama_set_adapters_lora(ctx, ptrs, 1, (ctypes.c_float * 1)(1.0))
tokens = (llama_cpp.llama_token * 4)(1, 2, 3, 4)
print("decoded", llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(tokens, 4)))
"""


@pytest.mark.parametrize(
    ("kind", "how"),
    [
        ("alpha_string", "GGML_ASSERT(type_to_gguf_type<T>::value == type) failed"),  # at load
        ("arch_int", "GGML_ASSERT(type_to_gguf_type<T>::value == type) failed"),
        ("three_d", "GGML_ASSERT(ggml_can_mul_mat(a, b)) failed"),  # at the first decode
        ("embd_on_tied", "GGML_ASSERT(ggml_can_mul_mat(a, b)) failed"),
        ("int_type", None),  # no kernel: a segfault
        (None, None),
    ],
)
def test_llama_cpp_itself_dies_on_what_the_checks_refuse(
    kind: str | None, how: str | None, base: Path, tmp_path: Path
) -> None:
    path = (
        make_gguf_adapter(base, tmp_path / "good.gguf", layers=(0,))
        if kind is None
        else make_malformed(base, tmp_path / f"{kind}.gguf", kind)
    )
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, str(base), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if kind is None:
        assert run.returncode == 0 and "decoded 0" in run.stdout, run.stderr[-2000:]
        return
    assert run.returncode < 0 or run.returncode > 128, (run.returncode, run.stderr[-2000:])
    assert "decoded" not in run.stdout
    if how is not None:
        assert how in run.stderr



@pytest.mark.parametrize(
    ("text", "fragment"),
    [("..=/x.gguf", "not dots alone"), (".=/x.gguf", "not dots alone"), ("/x.gguf:1e400", "not a finite number")],
)
def test_names_of_dots_and_infinite_scales_are_refused(text: str, fragment: str) -> None:
    """A name is a URL path segment too (/v1/models/NAME): '..' would never reach its route."""
    with pytest.raises(StartupError, match=fragment):
        parse_adapter_entry(text)
