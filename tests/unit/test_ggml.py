"""Legacy GGML `.bin` files converted to GGUF (cria.models.ggml): round trips of the bundled
model and of small random models through every GGML format, the cache, and every refusal."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from cria.errors import StartupError
from cria.models import ggml
from cria.models.ggml import convert_ggml, ggml_format, gguf_tensor_name, read_ggml
from cria.models.ggml_vocab import HFVocab, read_hf_vocab
from cria.models.spec import bundled_model_path
from tests.ggml_writer import gguf_facts, read_gguf, write_ggjt, write_hf_config, write_tiny_gguf
from tests.hf_tokenizer import write_tokenizer_folder

T = gguf.GGMLQuantizationType
DEFAULTS_WARNING = "a GGML header has no"


def convert(path: Path, cache: Path, **kw: Any) -> Path:
    args: dict[str, Any] = {"n_gqa": None, "hf_config": None, "vocab": None,
                            "chat_template": None, "progress": False}
    return convert_ggml(path, cache, **(args | kw))


def assert_same_tensors(original: Path, converted: Path) -> None:
    """Every tensor of `original` in `converted`, same type, shape and bytes, nothing more."""
    _, a = read_gguf(original)
    _, b = read_gguf(converted)
    assert list(a) == list(b)
    da = np.memmap(original, dtype=np.uint8, mode="r")
    db = np.memmap(converted, dtype=np.uint8, mode="r")
    for name, ta in a.items():
        tb = b[name]
        assert (tb.type, tb.ne, tb.nbytes) == (ta.type, ta.ne, ta.nbytes), name
        assert np.array_equal(da[ta.offset : ta.offset + ta.nbytes],
                              db[tb.offset : tb.offset + tb.nbytes]), name


def defaults_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and DEFAULTS_WARNING in r.getMessage()]


@pytest.fixture(scope="module")
def bundled() -> Path:
    return bundled_model_path()


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ggml")


@pytest.fixture(scope="module")
def ggjt3(bundled: Path, work: Path) -> tuple[Path, dict[str, Any]]:
    out = work / "smollm2.ggmlv3.q4_1.bin"
    return out, write_ggjt(bundled, out, version=3)


@pytest.fixture(scope="module")
def hf_folder(bundled: Path, work: Path) -> Path:
    """The lead's tokenizer folder, with this module's config.json (exact hparams)."""
    folder = write_tokenizer_folder(bundled, work / "hf", with_config=False)
    write_hf_config(folder, bundled)
    return folder


@pytest.fixture(scope="module")
def converted(bundled: Path, ggjt3: tuple[Path, dict[str, Any]], hf_folder: Path,
              work: Path) -> Path:
    meta, _ = read_gguf(bundled)
    return convert(ggjt3[0], work / "cache", vocab=read_hf_vocab(hf_folder),
                   hf_config=json.loads((hf_folder / "config.json").read_text()),
                   chat_template=meta["tokenizer.chat_template"])


def test_formats_are_told_by_magic_and_version(tmp_path: Path, bundled: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "t.gguf", T.F32)
    for magic, version, want in [("ggjt", 3, "ggjt v3"), ("ggjt", 1, "ggjt v1"),
                                 ("ggmf", 1, "ggmf v1"), ("ggml", 1, "ggml")]:
        out = tmp_path / f"{magic}{version}.bin"
        write_ggjt(tiny, out, version=version, magic=magic)
        assert ggml_format(out) == want
    (tmp_path / "junk").write_bytes(b"PK\3\4 not a model")
    (tmp_path / "empty").write_bytes(b"")
    for path in (bundled, tmp_path / "junk", tmp_path / "empty", tmp_path / "missing"):
        assert ggml_format(path) is None


def test_bundled_round_trip_keeps_every_tensor_hparam_and_token(
    bundled: Path, converted: Path, ggjt3: tuple[Path, dict[str, Any]]
) -> None:
    assert converted.parent.name == "ggml" and converted.suffix == ".gguf"
    assert_same_tensors(bundled, converted)
    assert gguf_facts(converted) == gguf_facts(bundled) == {
        k: v for k, v in ggjt3[1].items() if k not in ("n_mult", "format", "tensors")}
    a, _ = read_gguf(bundled)
    b, _ = read_gguf(converted)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template", "llama.vocab_size", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "general.file_type"):
        assert b[key] == a[key], key


def test_llama_cpp_generates_what_the_original_does(bundled: Path, converted: Path) -> None:
    from cria.engine.batch import Batch
    from cria.engine.llama import LlamaContext, LlamaModel

    def run(path: Path) -> tuple[list[int], list[int]]:
        model = LlamaModel(path, n_gpu_layers=0, use_mmap=True)
        ctx = LlamaContext(model, n_ctx_per_seq=256, n_seq=1, n_batch=64, n_threads=1)
        try:
            ids = model.tokenize("<|im_start|>user\nOnce upon a time, 12345 \U0001f999<|im_end|>",
                                 add_special=False, parse_special=True)
            batch = Batch(64)
            batch.add_run(ids, 0, 0, logits="last")
            out: list[int] = []
            row = 0
            for i in range(6):
                assert ctx.decode(batch).name == "OK"
                out.append(int(np.argmax(ctx.logits(batch.n_outputs, model.n_vocab)[row])))
                batch.clear()
                row = batch.add_decodes([out[-1]], [len(ids) + i], [0])
            return ids, out
        finally:
            ctx.close()
            model.close()

    original = run(bundled)
    assert len(original[0]) > 8 and original[0][0] == 1  # <|im_start|> parsed as special
    assert run(converted) == original


def test_n_gqa_alone_applies_the_defaults_with_one_warning(
    bundled: Path, ggjt3: tuple[Path, dict[str, Any]], work: Path, hf_folder: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A vocabulary but no config.json: --n-gqa gives the KV heads, llama defaults the rest."""
    caplog.set_level(logging.INFO, "cria.models")
    vocab = read_hf_vocab(hf_folder / "tokenizer.json")
    out = convert(ggjt3[0], work / "cache", n_gqa=3, vocab=vocab)
    [warning] = defaults_warnings(caplog)
    for text in ("rope base 10000", "rms_norm_eps 5e-06", "context length 2048", "--n-gqa",
                 "-v FOLDER"):
        assert text in warning
    assert "n_head_kv" not in warning  # --n-gqa gave it
    assert any("converted to" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert_same_tensors(bundled, out)
    facts = gguf_facts(out)
    assert (facts["n_head_kv"], facts["rope_theta"], facts["context_length"]) == (3, 10000.0, 2048)
    assert facts["eps"] == float(np.float32(5e-6))
    from cria.engine.llama import LlamaModel

    model = LlamaModel(out, n_gpu_layers=0, use_mmap=True, vocab_only=True)  # llama.cpp takes it
    try:
        assert model.n_vocab == 49152
    finally:
        model.close()


def test_a_legacy_vocabulary_that_cannot_spell_every_byte_is_refused(
    ggjt3: tuple[Path, dict[str, Any]], work: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The bundled model's byte-level BPE vocabulary, read as the SentencePiece one a .bin
    implies, has no <0xNN> tokens: llama.cpp's SPM tokenizer would throw std::out_of_range
    (and abort the process) on a byte it cannot spell."""
    caplog.set_level(logging.INFO, "cria.models")
    with pytest.raises(StartupError, match=r"no token for \d+ of the 256 bytes.*-v"):
        convert(ggjt3[0], work / "cache-lossy", n_gqa=3)
    assert any("lossy" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert not list((work / "cache-lossy").rglob("*.gguf"))


def test_a_legacy_vocabulary_with_byte_tokens_is_written_as_sentencepiece(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", T.F32)
    bin_path = tmp_path / "tiny.bin"
    write_ggjt(src, bin_path)
    meta, _ = read_gguf(convert(bin_path, tmp_path / "cache", n_gqa=2))
    assert meta["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.merges" not in meta
    assert "<0x0A>" in meta["tokenizer.ggml.tokens"]


@pytest.mark.parametrize(("magic", "version", "ttype"), [
    ("ggml", 1, T.F32), ("ggmf", 1, T.F16), ("ggjt", 1, T.F16), ("ggjt", 2, T.Q5_0),
    ("ggjt", 3, T.F32), ("ggjt", 3, T.Q8_0), ("ggjt", 3, T.Q4_K),
])
def test_every_format_round_trips_its_readable_types(
    tmp_path: Path, magic: str, version: int, ttype: T
) -> None:
    """F32 and Q8_0 included: llama.cpp's converter of this version breaks both."""
    size = {"n_embd": 256, "n_ff": 256} if ttype == T.Q4_K else {}
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", ttype, **size)
    src = tmp_path / "tiny.bin"
    write_ggjt(tiny, src, version=version, magic=magic)
    out = convert(src, tmp_path / "cache", n_gqa=2)
    assert_same_tensors(tiny, out)
    a, _ = read_gguf(tiny)
    b, _ = read_gguf(out)
    assert b["tokenizer.ggml.tokens"] == a["tokenizer.ggml.tokens"]  # legacy spellings undone
    assert b["tokenizer.ggml.token_type"] == a["tokenizer.ggml.token_type"]
    scores = a["tokenizer.ggml.scores"]
    assert b["tokenizer.ggml.scores"] == (scores if magic != "ggml" else [0.0] * len(scores))
    assert gguf_facts(out)["n_head_kv"] == 2


@pytest.mark.parametrize(("magic", "version", "ttype"), [
    ("ggjt", 2, T.Q4_0), ("ggjt", 2, T.Q4_1), ("ggjt", 2, T.Q8_0), ("ggjt", 1, T.Q5_1),
    ("ggmf", 1, T.Q4_0), ("ggml", 1, T.Q8_0),
])
def test_layouts_that_changed_are_refused(tmp_path: Path, magic: str, version: int,
                                          ttype: T) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", ttype)
    src = tmp_path / "tiny.bin"
    write_ggjt(tiny, src, version=version, magic=magic)
    label = magic if magic == "ggml" else f"{magic} v{version}"
    with pytest.raises(StartupError, match=f"is {ttype.name} in a {label} file"):
        convert(src, tmp_path / "cache", n_gqa=2)
    assert not (tmp_path / "cache").exists()


def _ggml_with_one_tensor(path: Path, type_id: int, ne: tuple[int, ...], data: bytes) -> Path:
    """A ggjt v3 file with a 1-token vocabulary and one tensor, written by hand."""
    head = struct.pack("<II7i", 0x67676A74, 3, 1, ne[0], 256, 1, 1, ne[0], 0)
    head += struct.pack("<I", 1) + b"a" + struct.pack("<f", 0.0)
    name = b"norm.weight"
    head += struct.pack(f"<3i{len(ne)}i", len(ne), len(name), type_id, *ne) + name
    path.write_bytes(head + b"\0" * (-len(head) % 32) + data)
    return path


def test_removed_and_unknown_types_are_refused(tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="Q4_2, a type llama.cpp removed"):
        read_ggml(_ggml_with_one_tensor(tmp_path / "a.bin", 4, (32,), b"\0" * 20))
    with pytest.raises(StartupError, match="unknown type 99"):
        read_ggml(_ggml_with_one_tensor(tmp_path / "b.bin", 99, (32,), b"\0" * 20))
    # Q8_1's scales were f32 in ggjt v3 (f16 now), and it never held weights.
    with pytest.raises(StartupError, match="is Q8_1 in a ggjt v3 file"):
        read_ggml(_ggml_with_one_tensor(tmp_path / "c.bin", int(T.Q8_1), (32,), b"\0" * 40))


def test_truncated_and_foreign_files_are_refused(tmp_path: Path, bundled: Path) -> None:
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", T.F16)
    src = tmp_path / "tiny.bin"
    write_ggjt(tiny, src)
    data = src.read_bytes()
    for cut in (len(data) - 100, 40, 6):
        (tmp_path / "cut.bin").write_bytes(data[:cut])
        with pytest.raises(StartupError, match="truncated"):
            convert(tmp_path / "cut.bin", tmp_path / "cache", n_gqa=2)
    (tmp_path / "junk.bin").write_bytes(b"\x7fELF" + bytes(100))
    for path in (tmp_path / "junk.bin", bundled):
        with pytest.raises(StartupError, match="not a GGML file"):
            convert(path, tmp_path / "cache")
    (tmp_path / "v4.bin").write_bytes(struct.pack("<II", 0x67676A74, 4) + bytes(100))
    with pytest.raises(StartupError, match="unsupported GGML format version ggjt v4"):
        convert(tmp_path / "v4.bin", tmp_path / "cache")


@pytest.fixture
def tiny_bin(tmp_path: Path) -> tuple[Path, Path]:
    """(GGUF, ggjt v3) of a random model with 4 heads, 2 of them KV heads."""
    tiny = write_tiny_gguf(tmp_path / "tiny.gguf", T.F32)
    src = tmp_path / "tiny.bin"
    write_ggjt(tiny, src)
    return tiny, src


def test_wrong_kv_heads_show_as_a_wk_shape_mismatch(tiny_bin: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    _, src = tiny_bin
    with pytest.raises(StartupError, match=r"attention\.wk\.weight has shape \[64, 32\], expected "
                       r"\[64, 64\].*n_head_kv = 4 \(--n-gqa 1\) is wrong.*--n-gqa 2"):
        convert(src, tmp_path / "cache", n_gqa=1)
    with pytest.raises(StartupError, match=r"assumed: no --n-gqa nor config\.json.*--n-gqa 2"):
        convert(src, tmp_path / "cache")


def test_a_header_that_disagrees_with_the_tensors_is_refused(tiny_bin: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    _, src = tiny_bin
    data = bytearray(src.read_bytes())
    for n_layer, error in [(3, r"missing tensor layers\.2\.attention\.wq\.weight and 8 more"),
                           (1, r"unexpected tensor layers\.1\.")]:
        data[24:28] = struct.pack("<i", n_layer)  # after magic, version, n_vocab..n_head
        (tmp_path / "bad.bin").write_bytes(data)
        with pytest.raises(StartupError, match=error):
            convert(tmp_path / "bad.bin", tmp_path / "cache", n_gqa=2)


def test_gqa_and_config_conflicts_are_refused(tiny_bin: tuple[Path, Path], tmp_path: Path) -> None:
    tiny, src = tiny_bin
    with pytest.raises(StartupError, match="--n-gqa 3 does not divide the 4 attention heads"):
        convert(src, tmp_path / "cache", n_gqa=3)
    config = json.loads(write_hf_config(tmp_path / "hf", tiny).read_text())
    with pytest.raises(StartupError, match="--n-gqa 1 means 4 KV heads but config.json says "
                       "num_key_value_heads = 2"):
        convert(src, tmp_path / "cache", n_gqa=1, hf_config=config)
    with pytest.raises(StartupError, match="config.json hidden_size = 128 but tiny.bin has 64"):
        convert(src, tmp_path / "cache", hf_config=config | {"hidden_size": 128})
    out = convert(src, tmp_path / "cache", n_gqa=2, hf_config=config)  # agreeing: fine
    assert gguf_facts(out) == gguf_facts(tiny)


def _spm_folder(folder: Path, pieces: list[str]) -> Path:
    """A SentencePiece-style (byte-fallback BPE) tokenizer.json for the tiny model's pieces."""
    folder.mkdir(parents=True, exist_ok=True)
    specials = [{"id": i, "content": t, "special": True} for i, t in enumerate(pieces[:3])]
    tokenizer = {
        "added_tokens": specials,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first"},
        "model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>",
                  "vocab": {t: i for i, t in enumerate(pieces)}, "merges": ["\u2581w 0", "\u2581w 1"]},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_a_sentencepiece_tokenizer_folder_is_written_exactly(tiny_bin: tuple[Path, Path],
                                                             tmp_path: Path) -> None:
    tiny, src = tiny_bin
    meta, _ = read_gguf(tiny)
    pieces = meta["tokenizer.ggml.tokens"]
    vocab = read_hf_vocab(_spm_folder(tmp_path / "spm", pieces))
    assert vocab.model == "llama" and vocab.add_space_prefix is True
    assert vocab.special_ids == {"bos": 1, "eos": 2, "unk": 0}
    out = convert(src, tmp_path / "cache", n_gqa=2, vocab=vocab, chat_template="{{ x }}")
    b, _ = read_gguf(out)
    assert b["tokenizer.ggml.tokens"] == pieces
    assert b["tokenizer.ggml.token_type"] == meta["tokenizer.ggml.token_type"]
    scores = b["tokenizer.ggml.scores"]
    # Minus the rank of the merge making the token; the others after every merge, by id.
    w0, w1, w5 = (pieces.index(f"\u2581w{i}") for i in (0, 1, 5))
    assert (scores[w0], scores[w1], scores[w5], scores[0], scores[3]) == (0.0, -1.0, -2.0 - w5, 0, 0)
    assert b["tokenizer.ggml.add_bos_token"] is True and b["tokenizer.chat_template"] == "{{ x }}"
    # Fewer tokens than the model's rows: padded with unused ones.
    short = read_hf_vocab(_spm_folder(tmp_path / "short", pieces[:-5]))
    b, _ = read_gguf(convert(src, tmp_path / "cache", n_gqa=2, vocab=short))
    assert b["tokenizer.ggml.tokens"][-5:] == [f"[PAD{i}]" for i in range(318, 323)]
    assert b["tokenizer.ggml.token_type"][-5:] == [int(gguf.TokenType.UNUSED)] * 5


def test_a_tokenizer_of_another_model_is_refused(tiny_bin: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    tiny, src = tiny_bin
    pieces = read_gguf(tiny)[0]["tokenizer.ggml.tokens"]
    long = read_hf_vocab(_spm_folder(tmp_path / "long", [*pieces, "x", "y", "z"]))
    with pytest.raises(StartupError, match="has 326 tokens but the model has n_vocab = 323"):
        convert(src, tmp_path / "cache", n_gqa=2, vocab=long)
    other = read_hf_vocab(_spm_folder(tmp_path / "other", [p + "x" for p in pieces]))
    with pytest.raises(StartupError, match="does not match the vocabulary in tiny.bin"):
        convert(src, tmp_path / "cache", n_gqa=2, vocab=other)
    assert not list((tmp_path / "cache").glob("ggml/*"))


def test_the_pre_tokenizer_is_found_without_the_tokenizers_library(
    hf_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert read_hf_vocab(hf_folder / "tokenizer.json").pre == "smollm"  # by chkhsh
    monkeypatch.setattr("cria.models.ggml_pre._chkhsh", lambda _path: None)
    assert read_hf_vocab(hf_folder).pre == "smollm"  # by the pre_tokenizer's structure


def test_conversions_are_cached_until_the_file_or_an_option_changes(
    tiny_bin: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, src = tiny_bin
    cache = tmp_path / "cache"
    first = convert(src, cache, n_gqa=2)
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(ggml, "_write_gguf", _fail)
    assert convert(src, cache, n_gqa=2) == first  # no rewrite: _write_gguf would raise
    assert first.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    templated = convert(src, cache, n_gqa=2, chat_template="{{ t }}")
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = convert(src, cache, n_gqa=2)
    assert len({first, templated, touched}) == 3 and all(p.is_file() for p in (first, touched))
    assert sorted(p.name for p in (cache / "ggml").iterdir()) == sorted(
        p.name for p in (first, templated, touched))  # no temporary files left


def _fail(*_args: Any) -> None:
    raise AssertionError("converted again")


def test_a_failed_conversion_leaves_nothing_that_looks_done(
    tiny_bin: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, src = tiny_bin
    cache = tmp_path / "cache"
    real = gguf.GGUFWriter.write_tensor_data
    calls = []

    def interrupted(self: gguf.GGUFWriter, tensor: Any) -> None:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(self, tensor)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(src, cache, n_gqa=2)
    assert list((cache / "ggml").iterdir()) == []
    monkeypatch.undo()
    out = convert(src, cache, n_gqa=2)
    out.unlink()  # as if a process killed with -9 had left its temporary file
    stale = out.with_name(f".{out.name}.999999999.tmp")
    stale.write_bytes(b"half a model")
    assert convert(src, cache, n_gqa=2) == out
    assert list((cache / "ggml").iterdir()) == [out]


def test_the_progress_bar_goes_to_stderr(tiny_bin: tuple[Path, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    _, src = tiny_bin
    convert(src, tmp_path / "cache", n_gqa=2, progress=True)
    captured = capsys.readouterr()
    assert "converting tiny.bin" in captured.err and captured.out == ""


def test_tensor_names_agree_with_gguf_py() -> None:
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    names = ["tok_embeddings", "norm", "output"] + [
        f"layers.1.{part}" for part in ("attention.wq", "attention.wk", "attention.wv",
                                        "attention.wo", "attention_norm", "ffn_norm",
                                        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")]
    for name in names:
        assert gguf_tensor_name(f"{name}.weight") == f"{mapping.get_name(name)}.weight"
    with pytest.raises(KeyError):
        gguf_tensor_name("layers.0.attention.wqkv.weight")


def test_hf_vocab_digest_changes_with_the_vocabulary() -> None:
    a = HFVocab(model="llama", tokens=(b"a", b"b"), token_types=(1, 1))
    b = HFVocab(model="llama", tokens=(b"a", b"c"), token_types=(1, 1))
    assert a.digest() != b.digest() and a.digest() == HFVocab(
        model="llama", tokens=(b"a", b"b"), token_types=(1, 1)).digest()
