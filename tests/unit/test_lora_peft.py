"""LoRA adapters: PEFT folders converted to GGUF (the same adapter in llama.cpp's layout, exactly), and both run in llama.cpp."""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGUFWriter

from cria.engine._bindings import llama_cpp
from cria.errors import StartupError
from cria.models import lora_peft
from cria.models.lora import (
    AdapterEntry,
    parse_adapter_list,
    prepare_adapters,
)
from cria.models.lora_peft import convert_peft, permute_qk, unpermute_qk
from tests.lora_fixtures import (
    HF_MODULES,
    bf16_round,
    lora_pairs,
    make_gguf_adapter,
    make_peft_folder,
)
from tests.unit._lora import ALL_HF, LAYER_HF, LAYERS, _error, _kv, _tensors

# --- PEFT -> GGUF -----------------------------------------------------------------------------


def test_permutation_round_trip() -> None:
    w = np.arange(576 * 3, dtype=np.float32).reshape(576, 3)
    for heads in (9, 3):
        p = permute_qk(w, heads)
        assert not np.array_equal(p, w) and np.array_equal(unpermute_qk(p, heads), w)


@pytest.mark.parametrize("which", ["bundled", "tiny"])
def test_a_converted_peft_adapter_is_the_same_adapter_in_gguf_layout(
    which: str, base: Path, tiny: Path, tmp_path: Path
) -> None:
    model, modules, layers = (
        (base, LAYER_HF, LAYERS) if which == "bundled" else (tiny, ALL_HF, None)
    )
    folder = make_peft_folder(
        model, tmp_path / "my-lora", targets=modules, layers=layers, rank=6, alpha=12.0, seed=3
    )
    ref = make_gguf_adapter(
        model,
        tmp_path / "ref.gguf",
        targets=[HF_MODULES[m][1] for m in modules],
        layers=layers,
        rank=6,
        alpha=12.0,
        seed=3,
    )
    out = convert_peft(AdapterEntry("my-lora", folder, 1.0), model, tmp_path / "cache")
    assert out.parent == tmp_path / "cache" / "lora" and out.name.startswith("my-lora-")
    got, want = _tensors(out), _tensors(ref)
    n_pairs = 7 * len(LAYERS) if which == "bundled" else 7 * 2 + 2
    assert sorted(got) == sorted(want) and len(got) == 2 * n_pairs
    for name, (ttype, shape, data) in want.items():
        assert got[name][:2] == (ttype, shape) and ttype == "F32", name
        assert np.array_equal(got[name][2], data), name
    assert _kv(out) == {
        "general.architecture": "llama",
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": 12.0,
    }
    # the permutation mattered: q/k in Hugging Face's row order differ from llama.cpp's
    from safetensors.numpy import load_file

    hf = load_file(str(folder / "adapter_model.safetensors"))
    for part in ("q", "k"):
        hf_b = hf[f"base_model.model.model.layers.0.self_attn.{part}_proj.lora_B.weight"]
        assert not np.array_equal(hf_b, want[f"blk.0.attn_{part}.weight.lora_b"][2])


def test_rslora_alpha_and_alpha_pattern(base: Path, tmp_path: Path) -> None:
    config = {"use_rslora": True, "alpha_pattern": {"v_proj": 4.0}}
    folder = make_peft_folder(
        base, tmp_path / "rs", rank=16, alpha=8.0, layers=(0, 1), config=config
    )
    out = convert_peft(AdapterEntry("rs", folder, 1.0), base, tmp_path / "cache")
    # PEFT scales by lora_alpha / sqrt(r), llama.cpp by alpha / r: alpha = 8 * sqrt(16) = 32
    assert _kv(out)["adapter.lora.alpha"] == 32.0
    got = _tensors(out)
    want = lora_pairs(
        base, rank=16, targets=("attn_q", "attn_k", "attn_v", "ffn_down"), layers=(0, 1)
    )
    for name, (a, b) in want.items():
        factor = 0.5 if "attn_v" in name else 1.0  # v_proj: alpha 4 of 8, folded into lora_b
        assert np.array_equal(got[name + ".lora_a"][2], a)
        np.testing.assert_allclose(got[name + ".lora_b"][2], b * factor, rtol=1e-7)


def test_bf16_weights(base: Path, tmp_path: Path) -> None:
    folder = make_peft_folder(base, tmp_path / "bf", layers=(2,), bf16=True)
    got = _tensors(convert_peft(AdapterEntry("bf", folder, 1.0), base, tmp_path / "cache"))
    want = _tensors(
        make_gguf_adapter(
            base,
            tmp_path / "ref.gguf",
            targets=("attn_q", "attn_k", "attn_v", "ffn_down"),
            layers=(2,),
        )
    )
    for name, (_, _, data) in want.items():
        # the permutation moves rows, it rounds nothing: rounding before or after is the same
        assert np.array_equal(got[name][2], bf16_round(data)), name


def _q_a(layer: int = 0) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        ({"config": {"use_dora": True}}, "a DoRA adapter (use_dora)"),
        ({"config": {"peft_type": "IA3"}}, "peft_type is 'IA3'"),
        ({"config": {"lora_alpha": 0}}, "lora_alpha must be a nonzero number"),
        ({"config": {"lora_alpha": "16"}}, "lora_alpha must be a nonzero number"),
        ({"config": {"r": 0}}, "r must be a positive integer"),
        ({"config": {"lora_bias": True}}, "lora_bias"),
        ({"config": {"alora_invocation_tokens": [5, 6]}}, "an aLoRA"),
        (
            {"config": {"rank_pattern": {"q_proj": 4}}},
            "self_attn.q_proj has rank 8, adapter_config.json says 4",
        ),
        ({"config": {"rank_pattern": {"(": 4}}}, "not a valid pattern"),
        (
            {"extra_tensors": {_q_a(): np.zeros((8, 600), np.float32)}},
            "do not fit the base model's blk.0.attn_q.weight (576 x 576): an adapter for another "
            "base model (HuggingFaceTB/SmolLM2-135M-Instruct)?",
        ),
        (
            {
                "extra_tensors": {
                    "base_model.model.lm_head.lora_A.weight": np.zeros((8, 576), np.float32),
                    "base_model.model.lm_head.lora_B.weight": np.zeros((49152, 8), np.float32),
                }
            },
            "lm_head -> output.weight is not a tensor of the base model (it shares token_embd",
        ),
        (
            {
                "extra_tensors": {
                    "base_model.model.model.layers.0.self_attn.rotary.lora_A.weight": np.zeros(
                        (8, 4), np.float32
                    )
                }
            },
            "module model.layers.0.self_attn.rotary has no llama.cpp tensor",
        ),
        (
            {"extra_tensors": {"base_model.model.lm_head.weight": np.zeros((4, 4), np.float32)}},
            "tensor base_model.model.lm_head.weight is not a LoRA A/B matrix (full weights from modules_to_save",
        ),
        (
            {
                "extra_tensors": {
                    "base_model.model.model.layers.3.mlp.up_proj.lora_A.weight": np.zeros(
                        (8, 576), np.float32
                    )
                }
            },
            "model.layers.3.mlp.up_proj has lora_A but not its pair",
        ),
        (
            {
                "extra_tensors": {
                    "base_model.model.model.layers.99.mlp.up_proj.lora_A.weight": np.zeros(
                        (8, 576), np.float32
                    ),
                    "base_model.model.model.layers.99.mlp.up_proj.lora_B.weight": np.zeros(
                        (1536, 8), np.float32
                    ),
                }
            },
            "-> blk.99.ffn_up.weight is not a tensor of the base model",
        ),
        (
            {"extra_tensors": {"x": np.zeros((8,), np.int32)}},
            "tensor x is I32: only F32, F16 and BF16 convert",
        ),
        (
            {"targets": ("embed_tokens",)},
            "model.embed_tokens: the base model ties its output to the embeddings",
        ),
    ],
)
def test_peft_refusals(make: dict[str, Any], fragment: str, base: Path, tmp_path: Path) -> None:
    folder = make_peft_folder(base, tmp_path / "p", layers=(0,), **make)
    with pytest.raises(StartupError) as excinfo:
        convert_peft(AdapterEntry("p", folder, 1.0), base, tmp_path / "cache")
    message = _error(excinfo)
    assert message.startswith("--lora-adapters 'p' (") and fragment in message, message
    assert not list((tmp_path / "cache").glob("lora/*"))


def test_peft_folder_refusals(base: Path, tmp_path: Path) -> None:
    pickle = tmp_path / "pickle"
    pickle.mkdir()
    (pickle / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16}))
    (pickle / "adapter_model.bin").write_bytes(b"\x80\x02")
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder, fragment in (
        (pickle, "adapter_model.bin is a PyTorch pickle, which needs torch"),
        (empty, "no adapter_config.json"),
    ):
        with pytest.raises(StartupError) as excinfo:
            convert_peft(AdapterEntry("f", folder, 1.0), base, tmp_path / "cache")
        assert fragment in _error(excinfo)
    # a base whose architecture the converter does not know
    other = tmp_path / "qwen.gguf"
    writer = GGUFWriter(other, "qwen2")
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    folder = make_peft_folder(base, tmp_path / "p", layers=(0,))
    with pytest.raises(StartupError) as excinfo:
        convert_peft(AdapterEntry("p", folder, 1.0), other, tmp_path / "cache")
    assert "this one is 'qwen2': convert it with llama.cpp's convert_lora_to_gguf.py" in _error(
        excinfo
    )


def test_conversion_is_cached_and_redone_when_a_source_changes(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    folder = make_peft_folder(base, tmp_path / "c", layers=(0,))
    entry = AdapterEntry("c", folder, 1.0)
    first = convert_peft(entry, base, cache)
    mtime = first.stat().st_mtime_ns

    def no_write(*_args: object) -> None:
        raise AssertionError("converted again")

    with monkeypatch.context() as m:
        m.setattr(lora_peft, "_write_gguf", no_write)
        assert convert_peft(entry, base, cache) == first  # a hit: nothing written
        assert convert_peft(AdapterEntry("c", tmp_path / "c", 0.5), base, cache) == first
    assert first.stat().st_mtime_ns == mtime
    make_peft_folder(base, folder, layers=(0,), seed=1)  # new weights
    second = convert_peft(entry, base, cache)
    assert second != first and not np.array_equal(
        _tensors(second)["blk.0.attn_q.weight.lora_a"][2],
        _tensors(first)["blk.0.attn_q.weight.lora_a"][2],
    )
    (folder / "adapter_config.json").write_text(
        (folder / "adapter_config.json")
        .read_text()
        .replace('"lora_alpha": 16.0', '"lora_alpha": 4.0')
    )
    third = convert_peft(entry, base, cache)
    assert third not in (first, second) and _kv(third)["adapter.lora.alpha"] == 4.0
    monkeypatch.setattr(lora_peft, "CONVERTER_VERSION", lora_peft.CONVERTER_VERSION + 1)
    assert convert_peft(entry, base, cache) not in (first, second, third)
    assert not [p for p in (cache / "lora").iterdir() if not p.name.endswith(".gguf")]


def test_a_failed_conversion_leaves_nothing_behind(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_peft_folder(base, tmp_path / "f", layers=(0,))
    import gguf

    def broken(self: Any, *_args: object, **_kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", broken)
    with pytest.raises(StartupError) as excinfo:
        convert_peft(AdapterEntry("f", folder, 1.0), base, tmp_path / "cache")
    assert "cannot write the converted adapter" in _error(excinfo)
    assert list((tmp_path / "cache" / "lora").iterdir()) == []


def test_prepare_adapters(base: Path, tmp_path: Path) -> None:
    gguf_file = make_gguf_adapter(base, tmp_path / "sql.gguf", layers=(1,))
    folder = make_peft_folder(base, tmp_path / "chat-lora", layers=(1,), rank=4, alpha=4.0)
    entries = parse_adapter_list([str(gguf_file), f"{folder}:0.5"])
    infos = prepare_adapters(entries, base, tmp_path / "cache")
    assert [(i.name, i.source, i.scale, i.rank, i.alpha, i.n_tensors) for i in infos] == [
        ("sql", "gguf", 1.0, 8, 16.0, 6),
        ("chat-lora", "peft", 0.5, 4, 4.0, 8),
    ]
    assert infos[0].path == gguf_file and infos[1].path.parent == tmp_path / "cache" / "lora"
    for entries, fragment in (
        (
            [AdapterEntry("a", gguf_file, 1.0), AdapterEntry("a", folder, 1.0)],
            "two adapters are named 'a'",
        ),
        (
            [AdapterEntry("gone", tmp_path / "gone.gguf", 1.0)],
            "'gone' (" + str(tmp_path / "gone.gguf") + "): no such file",
        ),
    ):
        with pytest.raises(StartupError) as excinfo:
            prepare_adapters(entries, base, tmp_path / "cache")
        assert fragment in _error(excinfo)


# --- in llama.cpp -----------------------------------------------------------------------------

PROMPT = [1, 50, 300, 31, 253, 134, 30, 39, 210, 28]  # ids < 323 (tiny): attention needs several


def _load(path: Path) -> Any:
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = 0
    ptr = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    assert ptr
    return ptr


@pytest.fixture(scope="module")
def model(base: Path) -> Iterator[Any]:
    ptr = _load(base)
    yield ptr
    llama_cpp.llama_model_free(ptr)


@pytest.fixture(scope="module")
def tiny_model(tiny: Path) -> Iterator[Any]:
    ptr = _load(tiny)
    yield ptr
    llama_cpp.llama_model_free(ptr)


def _run(
    model: Any, adapter: Path | None, *, scale: float = 1.0, n_greedy: int = 8
) -> tuple[np.ndarray, list[int]]:
    """The prompt's last logits and a greedy continuation, with the adapter at `scale`."""
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 64, 64, 1, 1
    ctx = llama_cpp.llama_init_from_model(model, params)
    assert ctx
    lora = None
    try:
        if adapter is not None:
            lora = llama_cpp.llama_adapter_lora_init(model, str(adapter).encode())
            assert lora is not None and bool(lora), adapter
            ptrs = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
            assert llama_cpp.llama_set_adapters_lora(ctx, ptrs, 1, (ctypes.c_float * 1)(scale)) == 0
        tokens, first, greedy = list(PROMPT), None, []
        for _ in range(n_greedy + 1):
            batch_tokens = tokens if first is None else tokens[-1:]
            arr = (llama_cpp.llama_token * len(batch_tokens))(*batch_tokens)
            assert (
                llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(batch_tokens)))
                == 0
            )
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)
            ).copy()
            if first is None:
                first = logits
            tokens.append(int(np.argmax(logits)))
            greedy.append(tokens[-1])
        assert first is not None and np.isfinite(first).all()
        return first, greedy[:n_greedy]
    finally:
        llama_cpp.llama_free(ctx)
        if lora is not None:
            llama_cpp.llama_adapter_lora_free(lora)


@pytest.mark.parametrize("which", ["bundled", "tiny"])
def test_llama_cpp_runs_the_converted_adapter_like_the_handmade_one(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Bundled: every layer module in every layer. Tiny: those, embed_tokens and lm_head."""
    path: Path = request.getfixturevalue("base" if which == "bundled" else "tiny")
    llm = request.getfixturevalue("model" if which == "bundled" else "tiny_model")
    modules = LAYER_HF if which == "bundled" else ALL_HF
    folder = make_peft_folder(path, tmp_path / "all", targets=modules, rank=8, alpha=16.0, seed=7)
    (info,) = prepare_adapters([AdapterEntry("all", folder, 1.0)], path, tmp_path / "cache")
    ref = make_gguf_adapter(
        path, tmp_path / "ref.gguf", targets=[HF_MODULES[m][1] for m in modules], seed=7
    )
    base_logits, base_greedy = _run(llm, None)
    conv_logits, conv_greedy = _run(llm, info.path)
    ref_logits, ref_greedy = _run(llm, ref)
    np.testing.assert_array_equal(conv_logits, ref_logits)
    assert conv_greedy == ref_greedy
    assert np.abs(conv_logits - base_logits).max() > 0.5 and conv_greedy != base_greedy
    zero_logits, _ = _run(llm, info.path, scale=0.0)  # the change is the adapter's
    np.testing.assert_allclose(zero_logits, base_logits, atol=1e-4)


def test_the_default_synthetic_adapter_changes_greedy_output(
    model: Any, base: Path, tmp_path: Path
) -> None:
    path = make_gguf_adapter(base, tmp_path / "d.gguf")
    base_logits, base_greedy = _run(model, None)
    logits, greedy = _run(model, path)
    assert greedy != base_greedy and np.abs(logits - base_logits).max() > 1.0
    # and its strength is sane: a changed distribution, not noise from overflow
    assert math.isfinite(float(np.abs(logits).max())) and np.abs(logits).max() < 1e3
